"""Parameter precision: f32 / bf16 casts and int8 weights with per-output-channel scales.

`cast(model, precision)` returns a new model; every array keeps its mesh placement because the
conversion runs inside `jax.jit` with output shardings derived, as at construction, from the
variables' logical names (`sharding.module_shardings`: each layer's own layout).

int8 (after Qwix/AQT, written small): per-output-channel symmetric absmax. A kernel whose leading
`contract` axes are contracted gets a float32 scale of the kernel's shape with those axes reduced to 1,
so the scale carries the kernel's logical names with None on the contracted axes and shards with its
output channels: column-parallel scales split over `model`, row-parallel ones replicate (a scanned
model's stacked "layers" axis is an output axis here: one scale per layer and channel). The embedding
gets one scale per vocabulary row. Norm scales stay float. Quantised arrays live in `Int8Weight` /
`Int8Scale` (not `nnx.Param`), so gradients and optimizers skip them.

  "int8"  weight-only: int8 -> compute dtype right before the einsum, the per-channel scale applied to
          the einsum's result (kernel output axes are result axes, so this is exact up to rounding).
  "w8a8"  inference: per-token dynamic int8 activations, an int8 x int8 -> int32 `lax.dot_general`,
          rescaled by both scales. Per-token absmax over a tensor-parallel contracted axis (the inputs
          of the row-parallel `o` and `down` projections) costs one small max all-reduce ([B, S]
          floats) each, so w8a8 forward has 4 model-axis all-reduces per layer, not 2.

Casting an int8/w8a8 model to "int8" or "w8a8" switches the compute mode and keeps the stored int8
arrays (re-quantising them would give the same values); casting it to "f32" or "bf16" raises, since the
float weights are gone: cast from the float model instead.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PRECISIONS = ("f32", "bf16", "int8", "w8a8")
QUANTISED = ("int8", "w8a8")
FLOAT_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
CONFIG_DTYPES = {"f32": "float32", "bf16": "bfloat16"}
QMAX = 127
SCALE_FLOOR = 1e-30  # an all-zero channel gets this scale (and zeros), never 0/0


class Quantised(nnx.Variable):
    """Base of the int8 storage variables; not an `nnx.Param`, so grads and optimizers skip it."""


class Int8Weight(Quantised):
    """int8 kernel (or embedding table), same shape and logical names as the float weight."""


class Int8Scale(Quantised):
    """float32 per-output-channel scale: the weight's shape with contracted axes reduced to 1."""


# ----------------------------------------------------------------------------------------------
# Quantisation math


def quantize(w, axes) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax int8 over `axes` (keepdims): w ~= q * scale, q in [-127, 127], scale f32."""
    w = jnp.asarray(w).astype(jnp.float32)
    axes = tuple(axes)
    scale = channel_scale(jnp.max(jnp.abs(w), axis=axes, keepdims=True))
    q = jnp.clip(jnp.round(w / scale), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def channel_scale(absmax, xp=jnp):
    """A channel's int8 scale from its absmax, in jax (xp=jnp) or numpy (xp=np, jaxtp.hf's streaming loader).
    It multiplies by the f32 reciprocal of 127 rather than dividing: XLA rewrites a division by a constant
    that way anyway, and written out it is the same IEEE operation in both, so the scales agree bit for bit."""
    return xp.maximum(absmax * xp.float32(1 / QMAX), xp.float32(SCALE_FLOOR))


def dequantize(q, scale, dtype=jnp.float32):
    return q.astype(dtype) * scale.astype(dtype)


def _parse(equation: str):
    lhs, rest = equation.replace(" ", "").split(",")
    rhs, out = rest.split("->")
    contracted = [c for c in rhs if c in lhs and c not in out]
    return lhs, rhs, out, contracted


def _broadcast_to_out(s, letters: str, out: str):
    """Reshape `s` (axes named by `letters`) to broadcast against an array whose axes are `out`."""
    order = sorted(range(len(letters)), key=lambda i: out.index(letters[i]))
    if order != list(range(len(letters))):
        s, letters = jnp.transpose(s, order), "".join(letters[i] for i in order)
    sizes = dict(zip(letters, s.shape))
    return s.reshape([sizes.get(c, 1) for c in out])


def _squeeze_contracted(scale, rhs: str, contracted):
    keep = "".join(c for c in rhs if c not in contracted)
    return jnp.squeeze(scale, axis=tuple(rhs.index(c) for c in contracted)), keep


def int8_einsum(equation: str, x, q, scale, compute_dtype):
    """Weight-only int8: dequantise q to the compute dtype for the einsum, scale the result per channel."""
    lhs, rhs, out, contracted = _parse(equation)
    y = jnp.einsum(equation, x.astype(compute_dtype), q.astype(compute_dtype))
    s, keep = _squeeze_contracted(scale, rhs, contracted)
    return y * _broadcast_to_out(s.astype(y.dtype), keep, out)


def w8a8_einsum(equation: str, x, q, scale, out_dtype):
    """int8 activations (per-token absmax over the contracted axes) x int8 weights -> int32, rescaled."""
    lhs, rhs, out, contracted = _parse(equation)
    if any(c in rhs and c in out for c in lhs):
        raise NotImplementedError(f"w8a8 einsum {equation!r}: batch axes are not supported")
    x_axes = tuple(lhs.index(c) for c in contracted)
    xq, xs = quantize(x, x_axes)
    dims = ((x_axes, tuple(rhs.index(c) for c in contracted)), ((), ()))
    acc = jax.lax.dot_general(xq, q, dims, preferred_element_type=jnp.int32)
    natural = "".join(c for c in lhs if c not in contracted) + "".join(c for c in rhs if c not in contracted)
    xs = jnp.squeeze(xs, axis=x_axes)
    ws, keep = _squeeze_contracted(scale, rhs, contracted)
    y = acc.astype(jnp.float32) * _broadcast_to_out(xs, "".join(c for c in lhs if c not in contracted), natural)
    y = y * _broadcast_to_out(ws.astype(jnp.float32), keep, natural)
    if natural != out:
        y = jnp.transpose(y, [natural.index(c) for c in out])
    return y.astype(out_dtype)


def quantized_einsum(mode: str, equation: str, x, q, scale, compute_dtype):
    """What a quantised `Linear` computes: weight-only ("int8") or int8 x int8 ("w8a8")."""
    if mode == "w8a8":
        return w8a8_einsum(equation, x, q, scale, compute_dtype)
    return int8_einsum(equation, x, q, scale, compute_dtype)


def int8_take(q, scale, tokens, compute_dtype):
    """Embedding lookup of int8 rows, dequantised after the lookup with each row's scale."""
    rows = jnp.take(q, tokens, axis=0).astype(compute_dtype)
    return rows * jnp.take(scale, tokens, axis=0).astype(compute_dtype)


# ----------------------------------------------------------------------------------------------
# Casting a model


def _check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid precisions are {', '.join(PRECISIONS)}")
    return precision


def is_quantised(model) -> bool:
    return any(isinstance(v, Quantised) for _, v in nnx.to_flat_state(nnx.state(model)))


def precision_of(model) -> str:
    """'int8' / 'w8a8' for quantised models; otherwise 'bf16' or 'f32' from the Linear kernels' dtype."""
    from .layers import Linear

    for _, m in nnx.iter_modules(model):
        if isinstance(m, Linear):
            if getattr(m, "quant_mode", None):
                return m.quant_mode
            return "bf16" if m.kernel[...].dtype == jnp.bfloat16 else "f32"
    return "f32"


def _quantise_var(var, axes):
    """(Int8Weight, Int8Scale) for a float weight variable, reducing over `axes`. The scale keeps the
    weight's logical names with None on the reduced (size-1) axes, so it shards with its channels."""
    axes = tuple(axes)
    names = var.get_metadata().get("out_sharding")
    q, s = quantize(var[...], axes)
    if names is None:
        return Int8Weight(q), Int8Scale(s)
    scale_names = tuple(None if i in axes else n for i, n in enumerate(names))
    return Int8Weight(q, out_sharding=tuple(names)), Int8Scale(s, out_sharding=scale_names)


def _contracted_axes(linear) -> range:
    """The kernel axes a Linear contracts, after any stacked leading axes (a scanned model's "layers"):
    each layer keeps its own per-channel scales, so the stacked axis is never reduced."""
    stacked = linear.kernel[...].ndim - len(linear.names)
    return range(stacked, stacked + linear.contract)


def _convert(model, precision: str):
    """Rewrite `model` in place (inside a trace) to `precision`."""
    from .layers import Embed, Linear

    quantised = is_quantised(model)
    if quantised and precision not in QUANTISED:
        raise ValueError(
            f"cast(model, {precision!r}): this model is already quantised (int8 weights); its float weights are "
            "gone, so cast the original float model instead")
    modules = [m for _, m in nnx.iter_modules(model)]
    if precision in QUANTISED:
        for m in modules:
            if isinstance(m, Linear):
                if not quantised:
                    m.kernel, m.scale = _quantise_var(m.kernel, _contracted_axes(m))
                m.quant_mode = precision
            elif isinstance(m, Embed):
                if not quantised:
                    m.table, m.scale = _quantise_var(m.table, (1,))
                m.quant_mode = precision
        return model
    dtype = FLOAT_DTYPES[precision]
    for m in modules:
        for name, var in list(vars(m).items()):
            if isinstance(var, nnx.Param) and jnp.issubdtype(var[...].dtype, jnp.floating):
                setattr(m, name, var.replace(var[...].astype(dtype)))
        if isinstance(m, (Linear, Embed)):
            m.compute_dtype = jnp.dtype(dtype)
        cfg = getattr(m, "cfg", None)
        if cfg is not None and dataclasses.is_dataclass(cfg) and hasattr(cfg, "param_dtype"):
            m.cfg = dataclasses.replace(cfg, param_dtype=CONFIG_DTYPES[precision],
                                        compute_dtype=CONFIG_DTYPES[precision])
    return model


def model_layout(model):
    """The layout a model's parameters follow: its own, else its first jaxtp layer's (a user's model built
    by jaxtp.create); None for a model built unsharded."""
    from .sharding import Layout

    layouts = (getattr(m, "layout", None) for _, m in nnx.iter_modules(model))
    return next((lay for lay in layouts if isinstance(lay, Layout)), None)


def cast(model, precision: str):
    """A new model with parameters in `precision` ("f32" | "bf16" | "int8" | "w8a8"), shards in place.

    "f32"/"bf16": every floating `nnx.Param` (storage) and the compute dtype. "int8": weight-only int8
    Linear kernels and embedding (per-output-channel scales, norms stay float), compute dtype unchanged.
    "w8a8": the same storage with int8 x int8 matmuls (inference only). The input model is untouched.
    Any NNX module works (a user's model of jaxtp layers): each quantised weight keeps its layer's
    placement. A model without a layout (built unsharded) is cast on its device.
    """
    from .sharding import module_shardings

    _check_precision(precision)
    graphdef, state = nnx.split(model)

    def build(state):
        with nnx.use_eager_sharding(False):
            return _convert(nnx.merge(graphdef, state), precision)

    abstract = nnx.eval_shape(build, state)
    new_graphdef, _ = nnx.split(abstract)
    layout = model_layout(model)
    shardings = module_shardings(abstract, layout) if layout is not None else None
    new_state = jax.jit(lambda s: nnx.state(build(s)), out_shardings=shardings)(state)
    return nnx.merge(new_graphdef, new_state)


# ----------------------------------------------------------------------------------------------
# Training guard and quality report

_WARNED: set[str] = set()


def warn_if_low_precision_training(model) -> str | None:
    """Warn (once per process and kind) when a model about to be trained stores weights below f32.

    Returns the reason ("bf16" or "int8") or None. AdamW updates smaller than half a bf16 ulp of the
    weight round away, so bf16 master weights stall; int8 weights are frozen (not `nnx.Param`).
    """
    state = nnx.state(model)
    flat = nnx.to_flat_state(state)
    if any(isinstance(v, Quantised) for _, v in flat):
        reason, msg = "int8", ("training a quantised (int8) model: its int8 weights are not nnx.Param and stay "
                               "frozen; only float parameters (norm scales) get updates. Train the float model and "
                               "cast afterwards")
    elif any(isinstance(v, nnx.Param) and jnp.issubdtype(v[...].dtype, jnp.floating)
             and jnp.dtype(v[...].dtype).itemsize < 4 for _, v in flat):
        reason, msg = "bf16", ("training with low-precision (bf16) parameters: optimizer updates smaller than "
                               "the bf16 spacing of a weight vanish and training stalls. Keep float32 master "
                               "weights (param_dtype='float32') and use compute_dtype='bfloat16' instead")
    else:
        return None
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return reason


@functools.lru_cache(maxsize=8)
def _eval_fns(graphdef):
    """Jitted (forward -> logits, loss) and (forward vs reference logits -> loss, top-1 agreement, KL)."""
    from .loss import cross_entropy

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
    from .model import param_table

    precisions = tuple(precisions)
    for p in precisions:
        _check_precision(p)
    if not batches:
        raise ValueError("precision_report needs at least one batch of tokens")
    results, ref_logits = {}, []
    for precision in ("f32",) + tuple(p for p in precisions if p != "f32"):
        cast_model = cast(model, precision)
        graphdef, state = nnx.split(cast_model)
        forward, compare = _eval_fns(graphdef)
        rows = []
        for i, tokens in enumerate(batches):
            if precision == "f32":
                logits, loss = forward(state, tokens)
                ref_logits.append(logits)
                rows.append((float(loss), 1.0, 0.0))
            else:
                rows.append(tuple(float(v) for v in compare(state, tokens, ref_logits[i])))
        loss, agree, kl = np.mean(np.array(rows), axis=0)
        results[precision] = {"loss": float(loss), "top1_agreement": float(agree), "kl_vs_f32": float(kl),
                              "bytes_per_device": int(param_table(cast_model).bytes_per_device)}
    base = results["f32"]
    for r in results.values():
        r["delta_vs_f32"] = r["loss"] - base["loss"]
        r["bytes_ratio_vs_f32"] = r["bytes_per_device"] / base["bytes_per_device"]
    return {p: results[p] for p in precisions}


def format_precision_report(report: dict) -> str:
    """A small table: precision, bytes/device, held-out nats/byte, delta vs f32, top-1 agreement, KL."""
    head = ("precision", "bytes/device", "x f32", "nats/byte", "delta vs f32", "top-1 agree", "KL(f32||p)")
    body = [(p, f"{r['bytes_per_device']:,}", f"{r['bytes_ratio_vs_f32']:.3f}", f"{r['loss']:.5f}",
             f"{r['delta_vs_f32']:+.2e}", f"{r['top1_agreement']:.4f}", f"{r['kl_vs_f32']:.2e}") for p, r in report.items()]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *body])
