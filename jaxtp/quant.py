"""Parameter precision: f32 / bf16 casts and int8 weights with per-output-channel scales.

`cast(model, precision)` returns a new model; every array keeps its mesh placement because the
conversion runs inside `jax.jit` with output shardings derived, as at construction, from the
variables' logical names (`sharding.module_shardings`: each layer's own layout).

The conversion (`convert`) casts the state's float `nnx.Param`s itself and leaves everything else to the
modules that own precision-dependent state, through their `set_precision(precision)` hook: jaxtp's
`Linear` and `Embed` set their compute dtype or quantize their weight (per-output-channel symmetric
absmax, jaxtp.int8), and the `Transformer` records float dtypes in its config. A scanned model's stacked
"layers" axis is an output axis here: one scale per layer and channel. The embedding gets one scale per
vocabulary row. Norm scales stay float.

Casting an int8/w8a8 model to "int8" or "w8a8" switches the compute mode and keeps the stored int8
arrays (re-quantizing them would give the same values); casting it to "f32" or "bf16" raises, since the
float weights are gone: cast from the float model instead.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import to_dtype
from .int8 import MODES as QUANTIZED
from .int8 import QMAX, SCALE_FLOOR, Int8Scale, Int8Weight, Quantized, channel_scale, quantize
from .layers import Linear
from .loss import cross_entropy
from .model import param_table
from .sharding import Layout, module_shardings

__all__ = [
    "PRECISIONS",
    "QUANTIZED",
    "QMAX",
    "SCALE_FLOOR",
    "Quantized",
    "Int8Weight",
    "Int8Scale",
    "quantize",
    "channel_scale",
    "is_quantized",
    "precision_of",
    "convert",
    "converting",
    "model_layout",
    "cast",
    "WARNED",
    "warn_if_low_precision_training",
    "precision_report",
    "format_precision_report",
]

PRECISIONS = ("f32", "bf16") + QUANTIZED


def _check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid precisions are {', '.join(PRECISIONS)}")
    return precision


def is_quantized(model) -> bool:
    return any(isinstance(v, Quantized) for _, v in nnx.to_flat_state(nnx.state(model)))


def precision_of(model) -> str:
    """'int8' / 'w8a8' for quantized models; otherwise 'bf16' or 'f32' from the Linear kernels' dtype."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, Linear):
            if m.quant_mode is not None:
                return m.quant_mode
            return "bf16" if m.kernel[...].dtype == jnp.bfloat16 else "f32"
    return "f32"


def convert(model, precision: str):
    """`model` rewritten in place (inside a trace) to `precision`: float `nnx.Param`s cast through its
    state, then every module's `set_precision` hook (see the module docstring). Returns `model`."""
    if is_quantized(model) and precision not in QUANTIZED:
        raise ValueError(
            f"cast(model, {precision!r}): this model is already quantized (int8 weights); its float weights are "
            "gone, so cast the original float model instead"
        )
    if precision not in QUANTIZED:
        dtype = to_dtype(precision)
        floats = lambda _, v: isinstance(v, nnx.Param) and jnp.issubdtype(v[...].dtype, jnp.floating)
        nnx.update(model, jax.tree.map(lambda w: w.astype(dtype), nnx.state(model, floats)))
    for _, m in nnx.iter_modules(model):
        if callable(getattr(m, "set_precision", None)):
            m.set_precision(precision)
    return model


def converting(fn, precision: str):
    """`fn(rngs)` followed by `convert` to `precision` (f32: `fn` itself), as a builder for jaxtp.build's
    abstract targets: a checkpoint or Hugging Face file of that precision restores into it."""
    _check_precision(precision)
    return fn if precision == "f32" else lambda rngs: convert(fn(rngs), precision)


def model_layout(model) -> Layout | None:
    """The layout a model's parameters follow: its own, else its first jaxtp layer's (a user's model built
    by jaxtp.create); None for a model built unsharded."""
    layouts = (getattr(m, "layout", None) for _, m in nnx.iter_modules(model))
    return next((lay for lay in layouts if isinstance(lay, Layout)), None)


def cast(model, precision: str):
    """A new model with parameters in `precision` ("f32" | "bf16" | "int8" | "w8a8"), shards in place.

    "f32"/"bf16": every floating `nnx.Param` (storage) and the compute dtype. "int8": weight-only int8
    Linear kernels and embedding (per-output-channel scales, norms stay float), compute dtype unchanged.
    "w8a8": the same storage with int8 x int8 matmuls (inference only). The input model is untouched.
    Any NNX module works (a user's model of jaxtp layers): each quantized weight keeps its layer's
    placement. A model without a layout (built unsharded) is cast on its device.
    """
    _check_precision(precision)
    graphdef, state = nnx.split(model)

    def build(state):
        with nnx.use_eager_sharding(False):
            return convert(nnx.merge(graphdef, state), precision)

    abstract = nnx.eval_shape(build, state)
    layout = model_layout(model)
    shardings = module_shardings(abstract, layout) if layout is not None else None
    new_state = jax.jit(lambda s: nnx.state(build(s)), out_shardings=shardings)(state)
    return nnx.merge(nnx.graphdef(abstract), new_state)


# ----------------------------------------------------------------------------------------------
# Training guard and quality report

WARNED: set[str] = set()  # the kinds warned about in this process (clear it to warn again)


def warn_if_low_precision_training(model, stacklevel: int = 2) -> str | None:
    """Warn (once per process and kind) when a model about to be trained stores weights below f32.

    Returns the reason ("bf16" or "int8") or None. AdamW updates smaller than half a bf16 ulp of the
    weight round away, so bf16 master weights stall; int8 weights are frozen (not `nnx.Param`).
    """
    reason = _low_precision(model)
    if reason is not None and reason not in WARNED:
        WARNED.add(reason)
        warnings.warn(_LOW_PRECISION[reason], UserWarning, stacklevel=stacklevel)
    return reason


_LOW_PRECISION = {
    "int8": "training a quantized (int8) model: its int8 weights are not nnx.Param and stay frozen; only float "
    "parameters (norm scales) get updates. Train the float model and cast afterwards",
    "bf16": "training with low-precision (bf16) parameters: optimizer updates smaller than the bf16 spacing of a "
    "weight vanish and training stalls. Keep float32 master weights (param_dtype='float32') and use "
    "compute_dtype='bfloat16' instead",
}


def _low_precision(model) -> str | None:
    """ "int8" for a quantized model, "bf16" for floating params narrower than f32, else None."""
    flat = nnx.to_flat_state(nnx.state(model))
    if any(isinstance(v, Quantized) for _, v in flat):
        return "int8"
    narrow = (
        isinstance(v, nnx.Param)
        and jnp.issubdtype(v[...].dtype, jnp.floating)
        and jnp.dtype(v[...].dtype).itemsize < 4
        for _, v in flat
    )
    return "bf16" if any(narrow) else None


@functools.lru_cache(maxsize=8)
def _eval_fns(graphdef):
    """Jitted (forward -> logits, loss) and (forward vs reference logits -> loss, top-1 agreement, KL)."""

    def forward(state, tokens_BS1):
        logits_BSV = nnx.merge(graphdef, state)(tokens_BS1[:, :-1]).astype(jnp.float32)
        return logits_BSV, cross_entropy(logits_BSV, tokens_BS1[:, 1:])

    def compare(state, tokens_BS1, ref_BSV):
        logits_BSV, loss = forward(state, tokens_BS1)
        agree = jnp.mean((jnp.argmax(logits_BSV, -1) == jnp.argmax(ref_BSV, -1)).astype(jnp.float32))
        logp_BSV, logq_BSV = jax.nn.log_softmax(ref_BSV, -1), jax.nn.log_softmax(logits_BSV, -1)
        p_BSV = jnp.exp(logp_BSV)  # padded vocab columns have p = 0 and contribute nothing
        kl = jnp.mean(jnp.sum(jnp.where(p_BSV > 0, p_BSV * (logp_BSV - logq_BSV), 0.0), axis=-1))
        return loss, agree, kl

    return jax.jit(forward), jax.jit(compare)


def precision_report(model, batches, precisions=PRECISIONS) -> dict:
    """Held-out quality and memory of `model` cast to each precision (the f32 cast is the reference).

    `batches`: int32 token windows [B, S+1] (placed on the mesh). Returns {precision: {loss,
    delta_vs_f32, top1_agreement, kl_vs_f32, bytes_per_device, bytes_ratio_vs_f32}}: `loss` is next-token
    cross-entropy in nats per token (= nats/byte for byte tokens), `top1_agreement` and `kl_vs_f32` (mean
    KL(f32 || cast) per token) compare with the f32 cast's logits, `bytes_per_device` sums the cast
    model's per-device shard bytes (scales included). One jitted forward per precision.
    """
    precisions = tuple(_check_precision(p) for p in precisions)
    if not batches:
        raise ValueError("precision_report needs at least one batch of tokens")
    results = {}
    results["f32"], ref_logits = _reference_row(model, batches)
    for precision in (p for p in precisions if p != "f32"):
        results[precision] = _compared_row(cast(model, precision), batches, ref_logits)
    base = results["f32"]
    for r in results.values():
        r["delta_vs_f32"] = r["loss"] - base["loss"]
        r["bytes_ratio_vs_f32"] = r["bytes_per_device"] / base["bytes_per_device"]
    return {p: results[p] for p in precisions}


def _reference_row(model, batches) -> tuple[dict, list]:
    """The f32 cast's report row, and its logits per batch (what the other casts are compared with)."""
    reference = cast(model, "f32")
    graphdef, state = nnx.split(reference)
    forward, _ = _eval_fns(graphdef)
    logits, losses = zip(*(forward(state, tokens) for tokens in batches))
    return _row(reference, [(float(loss), 1.0, 0.0) for loss in losses]), list(logits)


def _compared_row(cast_model, batches, ref_logits) -> dict:
    """A cast's report row: held-out loss, top-1 agreement and KL against the f32 logits, batch means."""
    graphdef, state = nnx.split(cast_model)
    _, compare = _eval_fns(graphdef)
    return _row(
        cast_model, [tuple(map(float, compare(state, t, ref))) for t, ref in zip(batches, ref_logits)]
    )


def _row(cast_model, per_batch) -> dict:
    loss, agree, kl = np.mean(np.array(per_batch), axis=0)
    return {
        "loss": float(loss),
        "top1_agreement": float(agree),
        "kl_vs_f32": float(kl),
        "bytes_per_device": int(param_table(cast_model).bytes_per_device),
    }


def format_precision_report(report: dict) -> str:
    """A small table: precision, bytes/device, held-out nats/byte, delta vs f32, top-1 agreement, KL."""
    head = ("precision", "bytes/device", "x f32", "nats/byte", "delta vs f32", "top-1 agree", "KL(f32||p)")
    body = [
        (
            p,
            f"{r['bytes_per_device']:,}",
            f"{r['bytes_ratio_vs_f32']:.3f}",
            f"{r['loss']:.5f}",
            f"{r['delta_vs_f32']:+.2e}",
            f"{r['top1_agreement']:.4f}",
            f"{r['kl_vs_f32']:.2e}",
        )
        for p, r in report.items()
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *body])
