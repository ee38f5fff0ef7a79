"""Training: optax AdamW with warmup+cosine and clipping, one jitted step, held-out evaluation.

The step is functional - (params, opt_state, batch) -> (params, opt_state, metrics) - jitted once
with the params and optimizer state donated, so XLA updates them in place. Optimizer moments are
created under jit from the sharded params and inherit their shardings (f32 master weights).

The loss is the LM next-token loss on a [B, S+1] token window by default, or any
`loss_fn(model, batch)` for a user's own NNX model (a classifier of jaxtp layers plus an nnx.Linear
head, ...); the batch is then any pytree of arrays the caller has placed. `evaluate` and
`train_flops_per_step` are LM-only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .loss import cross_entropy, lm_loss
from .model import LAYERS, abstract_model
from .quant import warn_if_low_precision_training

__all__ = [
    "TrainConfig",
    "schedule",
    "decays",
    "decay_mask",
    "make_optimizer",
    "LossFn",
    "Trainer",
    "state_shardings",
    "make_train_step",
    "eval_loss_fn",
    "evaluate",
    "train_flops_per_step",
    "compile_train_step",
    "lower_train_step",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    seed: int = 0

    def __post_init__(self):
        for f in ("steps", "batch_size", "seq_len"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be a positive integer, got {getattr(self, f)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to lr, then cosine decay to lr * min_lr_ratio at the last step."""
    warmup = min(tc.warmup_steps, max(tc.steps - 1, 1))
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.lr, warmup, max(tc.steps, warmup + 1), end_value=tc.lr * tc.min_lr_ratio
    )


def decays(p) -> bool:
    """Whether a parameter gets weight decay: matrices do, norm scales (vectors) do not. A scanned model's
    stacked "layers" axis does not count: its [L, D] norm scales are L vectors."""
    stacked = (p.get_metadata().get("out_sharding") or ()).count(LAYERS) if isinstance(p, nnx.Variable) else 0
    return p.ndim - stacked >= 2


def decay_mask(params):
    """AdamW's mask: a prefix of the params tree, one `decays` bool per Variable (whose metadata names its axes)."""
    return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the warmup + cosine `schedule`, decaying matrices only."""
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask),
    )


LossFn = Callable[[nnx.Module, Any], Any]  # (model, batch) -> loss, or (loss, aux: dict of arrays)


@dataclasses.dataclass
class Trainer:
    """Holds the split model (graphdef, params, rest), the optimizer state and the compiled step."""

    graphdef: nnx.GraphDef
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    tx: optax.GradientTransformation
    step_fn: callable
    step: int = 0
    loss_fn: LossFn = lm_loss

    @classmethod
    def create(cls, model: nnx.Module, tc: TrainConfig, loss_fn: LossFn | None = None) -> "Trainer":
        """Take over `model` (its parameter buffers are donated to the first step: use `trainer.model`
        from then on) and train its `nnx.Param`s with `make_optimizer(tc)`.

        loss_fn(model, batch) returns the scalar loss to minimise, or `(loss, aux)` with `aux` a dict of
        arrays that `train_step` returns beside "loss" and "grad_norm". None (default) is the LM loss,
        `jaxtp.loss.lm_loss`, whose batch is a [B, S+1] token window. With a loss_fn the batch is any
        pytree of arrays (e.g. {"tokens": [B, S], "label": [B]}), placed by the caller (batch over
        `data`), and `model` is any nnx.Module: it needs no `layout` or `cfg`. Its parameters must all be
        placed on one mesh (NamedSharding; Adam moments then take their shardings and the step fixes
        them on both sides) or all be unsharded (one device). Only TrainConfig's optimizer fields (lr,
        warmup_steps, steps, min_lr_ratio, weight_decay, clip_norm, b1, b2) matter here; batch_size and
        seq_len describe the LM data.

        Non-Param state (`rest`: e.g. BatchNorm statistics, dropout RNG counters) is held fixed: the step
        reads it, never updates it. The step compiles once per batch structure/shape/sharding. A model
        storing bf16 or int8 weights gets a warning (jaxtp.quant.warn_if_low_precision_training)."""
        warn_if_low_precision_training(model, stacklevel=3)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = make_optimizer(tc)
        param_sh, opt_sh = state_shardings(params, tx, getattr(model, "layout", None))
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        loss_fn = lm_loss if loss_fn is None else loss_fn
        step_fn = make_train_step(graphdef, rest, tx, param_sh, opt_sh, loss_fn=loss_fn)
        return cls(graphdef, params, rest, opt_state, tx, step_fn, loss_fn=loss_fn)

    def train_step(self, batch) -> dict:
        """One optimizer step on `batch` ([B, S+1] tokens for the LM loss, else loss_fn's batch):
        {"loss", "grad_norm", **aux}, as device arrays."""
        self.params, self.opt_state, metrics = self.step_fn(self.params, self.opt_state, batch)
        self.step += 1
        return metrics

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.rest)


def _mesh_of(params, layout):
    """The mesh the params live on: the layout's, else the one all their NamedShardings share; None when
    they are all unsharded. Params split between a mesh and single devices (or over two meshes) are an
    error, named here rather than by jit."""
    if layout is not None:
        return layout.mesh
    named, other = {}, []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        sh = getattr(x, "sharding", None)
        (
            named.setdefault(sh.mesh, jax.tree_util.keystr(path))
            if isinstance(sh, NamedSharding)
            else other.append(jax.tree_util.keystr(path))
        )
    if not named:
        return None
    if len(named) > 1 or other:
        where = other[0] if other else list(named.values())[1]
        raise ValueError(
            f"Trainer: parameters must all be placed on one mesh (NamedSharding) or all be "
            f"unsharded; {list(named.values())[0]} is on {next(iter(named)).shape_tuple} but "
            f"{where} is not on that mesh (jax.device_put it with a NamedSharding)"
        )
    return next(iter(named))


def state_shardings(params, tx, layout=None):
    """Shardings of the params and of the optimizer state: Adam moments shard exactly like their
    parameters (optax.tree_map_params pairs them); counters are replicated. The mesh is the layout's,
    else the params' own (a user model without a layout). Unsharded params: (None, None)."""
    mesh = _mesh_of(params, layout)
    if mesh is None:
        return None, None
    replicated = NamedSharding(mesh, P())
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    abstract = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, sh: sh,
        abstract,
        param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return param_sh, opt_sh


def make_train_step(graphdef, rest, tx, param_sh=None, opt_sh=None, *, loss_fn: LossFn = lm_loss):
    """The jitted train step (params, opt_state, batch) -> (params, opt_state, metrics), with params and
    optimizer state donated and their shardings fixed on both sides, so it compiles exactly once (a
    test checks the jit cache holds one entry). `loss_fn(model, batch)` -> loss or (loss, aux dict)."""

    def step(params, opt_state, batch):
        def loss_of(p):
            out = loss_fn(nnx.merge(graphdef, p, rest), batch)
            return out if isinstance(out, tuple) else (out, {})

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**aux, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    if param_sh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    metrics_sh = NamedSharding(jax.tree.leaves(param_sh)[0].mesh, P())
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_sh, opt_sh, metrics_sh))


@functools.lru_cache(maxsize=8)
def eval_loss_fn(graphdef: nnx.GraphDef):
    """The jitted held-out loss of models with this graphdef: one per model structure, so evaluating
    again (every N steps, or after loading) reuses the compiled program instead of retracing it."""
    return jax.jit(lambda state, t: cross_entropy(nnx.merge(graphdef, state)(t[:, :-1]), t[:, 1:]))


def evaluate(model: nnx.Module, batches) -> dict:
    """Held-out LM loss in nats/byte (tokens are bytes), bits/byte and perplexity, over [B, S+1] token
    batches. LM-only: for a model trained with a custom loss_fn, jit that loss over held-out batches."""
    graphdef, state = nnx.split(model)
    fn = eval_loss_fn(graphdef)
    losses = [float(fn(state, b)) for b in batches]
    nats = sum(losses) / len(losses)
    return {"loss": nats, "bits_per_byte": nats / math.log(2), "perplexity": math.exp(nats)}


def train_flops_per_step(cfg, batch_size: int, seq_len: int) -> float:
    """LM-only. Model FLOPs per step (PaLM convention): 6*P*T over matmul params (the embedding lookup is no
    matmul; the head is) plus attention 12*L*B*S^2*N*H counted non-causally. No remat counted."""
    T = batch_size * seq_len
    matmul_params = cfg.matmul_param_count()
    return (
        6.0 * matmul_params * T + 12.0 * cfg.n_layers * batch_size * seq_len**2 * cfg.n_heads * cfg.head_dim
    )


def compile_train_step(cfg, layout, tc: TrainConfig, batch_sharding):
    """Compile the train step of `cfg` from abstract shapes only (nothing allocated) - used to read
    the collectives of a 1-layer variant next to the real model's."""
    return lower_train_step(cfg, layout, tc, batch_sharding).compile()


def lower_train_step(cfg, layout, tc: TrainConfig, batch_sharding):
    """The train step of `cfg` traced and lowered from abstract shapes (experiments time this apart from
    XLA's compile)."""
    graphdef, params, rest = nnx.split(abstract_model(cfg, layout), nnx.Param, ...)
    shardings = layout.state_shardings(params)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
    tx = make_optimizer(tc)
    param_sh, opt_sh = state_shardings(params, tx, layout)
    opt_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(tx.init, params),
        opt_sh,
    )
    batch = jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len + 1), jnp.int32, sharding=batch_sharding)
    return make_train_step(graphdef, rest, tx, param_sh, opt_sh).lower(params, opt_state, batch)
