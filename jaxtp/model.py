"""The Transformer LM, its sharded construction, and the parameter table.

`Transformer.create(cfg, mesh, seed)` builds the model inside `jax.jit` with output shardings taken
from the parameters' logical names, so each device only ever computes and holds its own shards. The
RNG is partitionable threefry, so the same seed gives bit-identical parameters on every mesh.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import ModelConfig, to_dtype
from .layers import Block, Embed, Linear, RMSNorm
from .mesh import axis_size
from .sharding import Layout, constrain

LOGITS = ("batch", "seq", "vocab")
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


class Transformer(nnx.Module):
    """Decoder-only LM: vocab-parallel embedding, L blocks, final RMSNorm, untied vocab-parallel head."""

    def __init__(self, cfg: ModelConfig, *, layout: Layout | None = None, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layout = layout
        model_axis = 1 if layout is None else _vocab_split(layout)
        self.padded_vocab = cfg.padded_vocab(model_axis)
        self.embed = Embed(cfg, self.padded_vocab, layout, rngs)
        self.blocks = nnx.List([Block(cfg, layout, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg, layout)
        self.head = Linear("bsd,dv->bsv", (cfg.d_model, self.padded_vocab), ("embed", "vocab"),
                           std=cfg.init_std, cfg=cfg, rngs=rngs, layout=layout)

    @classmethod
    def create(cls, cfg: ModelConfig, mesh, seed: int = 0, rules=None) -> "Transformer":
        """Build sharded on `mesh` inside jit: no device materialises a whole TP-sharded weight."""
        layout = Layout.create(cfg, mesh, rules)
        graphdef, abstract_state = nnx.split(abstract_model(cfg, layout, seed))
        shardings = layout.state_shardings(abstract_state)

        def init():
            with nnx.use_eager_sharding(False):
                return nnx.state(cls(cfg, layout=layout, rngs=nnx.Rngs(seed)))

        # Threefry compiles slowly on XLA:CPU and init runs once: skip backend optimisation (~35% faster).
        compiled = jax.jit(init, out_shardings=shardings).lower().compile(_INIT_COMPILER_OPTIONS)
        return nnx.merge(graphdef, compiled())

    def hidden(self, tokens_BS, positions_BS=None, kv_caches=None, **attn_kwargs):
        """Final normalised hidden states [B, S, D] (the head is applied separately)."""
        B, S = tokens_BS.shape
        if positions_BS is None:
            positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        x_BSD = self.embed(tokens_BS)
        for block in self.blocks:
            x_BSD = block(x_BSD, positions_BS, **attn_kwargs)
        return self.final_norm(x_BSD)

    def logits(self, x_BSD):
        logits_BSV = constrain(self.head(x_BSD).astype(jnp.float32), LOGITS, self.layout)
        if self.padded_vocab > self.cfg.vocab_size:  # padding columns never win
            pad_V = jnp.arange(self.padded_vocab) >= self.cfg.vocab_size
            logits_BSV = jnp.where(pad_V, -1e30, logits_BSV)
        return logits_BSV

    def __call__(self, tokens_BS, positions_BS=None):
        return self.logits(self.hidden(tokens_BS, positions_BS))


def _vocab_split(layout: Layout) -> int:
    target = layout.rules.get("vocab")
    axes = () if target is None else (target,) if isinstance(target, str) else target
    return math.prod(axis_size(layout.mesh, a) for a in axes)


def abstract_model(cfg: ModelConfig, layout: Layout | None, seed: int = 0) -> Transformer:
    """Shapes, dtypes and logical names of every parameter, with no allocation."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Transformer(cfg, layout=layout, rngs=nnx.Rngs(seed)))


@dataclasses.dataclass
class ParamRow:
    path: str
    logical: tuple
    spec: str
    shape: tuple
    local_shape: tuple
    dtype: str
    bytes_per_device: int


@dataclasses.dataclass
class ParamTable:
    rows: list[ParamRow]

    @property
    def total_params(self) -> int:
        return sum(math.prod(r.shape) for r in self.rows)

    @property
    def bytes_per_device(self) -> int:
        return sum(r.bytes_per_device for r in self.rows)

    def __str__(self) -> str:
        head = ("path", "logical axes", "spec", "global", "per device", "dtype", "bytes/dev")
        body = [(r.path, ",".join(str(n) for n in r.logical), r.spec, "x".join(map(str, r.shape)),
                 "x".join(map(str, r.local_shape)), r.dtype, f"{r.bytes_per_device:,}") for r in self.rows]
        widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
        fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))
        lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
        lines.append(f"total: {self.total_params:,} parameters, {self.bytes_per_device:,} bytes per device")
        return "\n".join(lines)


def param_table(model: nnx.Module) -> ParamTable:
    """One row per array variable (params and quantised weights): placement and per-device bytes."""
    rows = []
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var[...] if isinstance(var, nnx.Variable) else var
        if not hasattr(value, "shape"):
            continue
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        sharding = getattr(value, "sharding", None)
        spec = getattr(sharding, "spec", None)
        local = tuple(sharding.shard_shape(value.shape)) if sharding is not None else tuple(value.shape)
        rows.append(ParamRow("/".join(map(str, path)), tuple(names or ()), str(spec) if spec is not None else "-",
                             tuple(value.shape), local, str(value.dtype),
                             int(np.prod(local)) * jnp.dtype(value.dtype).itemsize))
    return ParamTable(rows)
