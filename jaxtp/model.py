"""The Transformer LM, its sharded construction, and the parameter table.

`Transformer.create(cfg, mesh, seed)` builds the model inside `jax.jit` with output shardings taken
from the parameters' logical names, so each device only ever computes and holds its own shards. The
RNG is partitionable threefry, so the same seed gives bit-identical parameters on every mesh.

Two config switches change how the blocks run, never what they compute:
  scan_layers  the L blocks become ONE Block whose parameters carry a leading stacked axis of size L,
               named "layers" (nnx.vmap over split RNG keys builds it), and the forward is one
               `lax.scan` over that axis: XLA compiles the block body once, so compile time stops growing
               with depth. Its parameters differ from the unrolled model's for a seed (other RNG splits)
               but are the same on every mesh.
  remat        "full": a block keeps only its input for the backward and recomputes the rest (jax.checkpoint);
               "dots": it keeps the outputs of its projections - matmuls without batch dimensions, linear
               in S - and recomputes the rest, notably attention's score and probability einsums (batched
               over heads, quadratic in S). `checkpoint_dots` would keep those [B, N, S, T] tensors too,
               which is most of the activation memory remat is meant to free.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from . import int8
from .build import create
from .config import DTYPE_NAMES, ModelConfig
from .layers import Block, Embed, Linear, RMSNorm, default_positions
from .sharding import Layout, constrain

__all__ = [
    "LOGITS",
    "LAYERS",
    "REMAT_POLICIES",
    "Transformer",
    "stacked_blocks",
    "scan_blocks",
    "layer",
    "remat_block",
    "abstract_model",
    "ParamInfo",
    "ParamTable",
    "param_table",
]

LOGITS = ("batch", "seq", "vocab")
LAYERS = "layers"  # the logical name of a scanned model's stacked layer axis
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """Decoder-only LM: vocab-parallel embedding, L blocks, final RMSNorm, vocab-parallel head (its own
    kernel, or with cfg.tie_embeddings the embedding table itself)."""

    def __init__(self, cfg: ModelConfig, *, layout: Layout | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layout = layout
        self.padded_vocab = cfg.padded_vocab(1 if layout is None else layout.split_of("vocab"))
        self.embed = Embed(cfg, self.padded_vocab, layout, rngs=rngs)
        self.blocks = (
            stacked_blocks(cfg, layout, rngs)
            if cfg.scan_layers
            else nnx.List([Block(cfg, layout, rngs) for _ in range(cfg.n_layers)])
        )
        self.final_norm = RMSNorm(cfg, layout)
        self.head = (
            None
            if cfg.tie_embeddings
            else Linear(
                "bsd,dv->bsv",
                (cfg.d_model, self.padded_vocab),
                ("embed", "vocab"),
                std=cfg.init_std,
                cfg=cfg,
                rngs=rngs,
                layout=layout,
            )
        )

    @classmethod
    def create(cls, cfg: ModelConfig, mesh, seed: int = 0, rules=None) -> "Transformer":
        """Build sharded on `mesh` inside jit (jaxtp.create): no device materialises a whole TP-sharded weight."""
        layout = Layout.create(cfg, mesh, rules)
        return create(lambda rngs: cls(cfg, layout=layout, rngs=rngs), mesh, rules=layout, seed=seed)

    def hidden(self, tokens_BS, positions_BS=None, **attn_kwargs):
        """Final normalised hidden states [B, S, D] (the head is applied separately)."""
        positions_BS = default_positions(tokens_BS) if positions_BS is None else positions_BS

        def step(block, x_BSD, i):
            return remat_block(block, self.cfg.remat)(x_BSD, positions_BS, attn_kwargs), None

        x_BSD, _ = scan_blocks(self, step, self.embed(tokens_BS))
        return self.final_norm(x_BSD)

    def logits(self, x_BSD):
        """Logits [B, S, V] in f32 of final hidden states, vocab-parallel; padding columns at -1e30."""
        head = self.embed.attend if self.head is None else self.head
        logits_BSV = constrain(head(x_BSD).astype(jnp.float32), LOGITS, self.layout)
        if self.padded_vocab > self.cfg.vocab_size:  # padding columns never win
            pad_V = jnp.arange(self.padded_vocab) >= self.cfg.vocab_size
            logits_BSV = jnp.where(pad_V, -1e30, logits_BSV)
        return logits_BSV

    def __call__(self, tokens_BS, positions_BS=None):
        return self.logits(self.hidden(tokens_BS, positions_BS))

    def set_precision(self, precision: str) -> None:
        """jaxtp.quant.cast's hook: a float precision becomes the config's dtypes (checkpoints record it
        there); the layers hold the rest of the precision state."""
        if precision not in int8.MODES:
            self.cfg = self.cfg.replace(
                param_dtype=DTYPE_NAMES[precision], compute_dtype=DTYPE_NAMES[precision]
            )


def stacked_blocks(cfg: ModelConfig, layout: Layout | None, rngs: nnx.Rngs) -> Block:
    """One Block whose every parameter has a leading axis of size L named "layers": vmap over L split
    `params` keys, each layer drawn from its own key (so any mesh gives the same values)."""

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def make(rngs):
        return Block(cfg, layout, rngs)

    return make(rngs)


def scan_blocks(model: "Transformer", step, carry):
    """`lax.scan` semantics over the model's blocks: `step(block, carry, i) -> (carry, y)`; returns (carry, ys).

    Unrolled model: a Python loop (i an int, ys a list). Scanned model: one `lax.scan` over the stacked
    state (i traced, each y stacked on a leading layer axis), so the body is traced and compiled once."""
    if not model.cfg.scan_layers:
        ys = []
        for i, block in enumerate(model.blocks):
            carry, y = step(block, carry, i)
            ys.append(y)
        return carry, ys
    graphdef, state_L = nnx.split(model.blocks)

    def body(carry, xs):
        state, i = xs
        return step(nnx.merge(graphdef, _unstacked(state)), carry, i)

    return jax.lax.scan(body, carry, (state_L, jnp.arange(model.cfg.n_layers)))


def layer(model: "Transformer", i: int) -> Block:
    """Block i as a module of its own (a scanned model's is a slice of the stacked parameters)."""
    if not model.cfg.scan_layers:
        return model.blocks[i]
    graphdef, state_L = nnx.split(model.blocks)
    return nnx.merge(graphdef, _unstacked(jax.tree.map(lambda w_L: w_L[i], state_L)))


def _unstacked(state):
    """A layer's slice of a stacked state, its metadata made to match: "layers" leaves `out_sharding`
    (as nnx.scan's transform_metadata would do), so the block is an ordinary Block with consistent names."""

    def one(v):
        names = v.get_metadata().get("out_sharding")
        return v.replace(out_sharding=names[1:]) if names and names[0] == LAYERS else v

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def remat_block(block: Block, remat: str):
    """`block` as a function (x_BSD, positions_BS, attn_kwargs) -> x_BSD, rematerialised per `remat`.

    jax.checkpoint needs the parameters as explicit inputs (a policy sees only what flows through
    them), so the block is split and merged inside the checkpointed function."""
    if remat == "none":
        return lambda x_BSD, positions_BS, attn_kwargs: block(x_BSD, positions_BS, **attn_kwargs)
    graphdef, state = nnx.split(block)

    @functools.partial(jax.checkpoint, policy=REMAT_POLICIES[remat])
    def run(state, x_BSD, positions_BS, attn_kwargs):
        return nnx.merge(graphdef, state)(x_BSD, positions_BS, **attn_kwargs)

    return functools.partial(run, state)


def abstract_model(cfg: ModelConfig, layout: Layout | None, seed: int = 0) -> Transformer:
    """Shapes, dtypes and logical names of every parameter, with no allocation."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Transformer(cfg, layout=layout, rngs=nnx.Rngs(seed)))


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter: where it lives and how big it is, globally and on one device. `param_table` lists
    a model's; the planner builds the same records for models it never allocates."""

    path: str  # "/"-joined nnx path, e.g. "blocks/3/attn/q/kernel"
    logical: tuple  # its logical axis names (the `out_sharding` metadata)
    spec: tuple  # per dimension: the tuple of mesh axes it splits over
    shape: tuple  # global shape
    local_shape: tuple  # per-device shape (a split that does not divide rounds up)
    dtype: str

    @property
    def local_bytes(self) -> int:
        return math.prod(self.local_shape) * jnp.dtype(self.dtype).itemsize

    @property
    def sharded_over(self) -> set:
        return {a for axes in self.spec for a in axes}

    @property
    def partition_spec(self) -> jax.sharding.PartitionSpec:
        return jax.sharding.PartitionSpec(*(None if not a else a[0] if len(a) == 1 else a for a in self.spec))


@dataclasses.dataclass
class ParamTable:
    rows: list[ParamInfo]

    @property
    def total_params(self) -> int:
        return sum(math.prod(r.shape) for r in self.rows)

    @property
    def bytes_per_device(self) -> int:
        return sum(r.local_bytes for r in self.rows)

    def __str__(self) -> str:
        head = ("path", "logical axes", "spec", "global", "per device", "dtype", "bytes/dev")
        body = [
            (
                r.path,
                ",".join(str(n) for n in r.logical),
                str(r.partition_spec),
                "x".join(map(str, r.shape)),
                "x".join(map(str, r.local_shape)),
                r.dtype,
                f"{r.local_bytes:,}",
            )
            for r in self.rows
        ]
        widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
        fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))
        lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
        lines.append(f"total: {self.total_params:,} parameters, {self.bytes_per_device:,} bytes per device")
        return "\n".join(lines)


def param_table(model: nnx.Module) -> ParamTable:
    """One row per array variable (params and quantized weights): placement and per-device bytes."""
    rows = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var[...] if isinstance(var, nnx.Variable) else var
        if not hasattr(value, "shape"):
            continue
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        sharding = getattr(value, "sharding", None)
        spec = tuple(getattr(sharding, "spec", None) or ())
        spec += (None,) * (len(value.shape) - len(spec))
        local = tuple(sharding.shard_shape(value.shape)) if sharding is not None else tuple(value.shape)
        axes = tuple(() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec)
        rows.append(
            ParamInfo(
                "/".join(map(str, path)),
                tuple(names or ()),
                axes,
                tuple(value.shape),
                local,
                str(value.dtype),
            )
        )
    return ParamTable(rows)
