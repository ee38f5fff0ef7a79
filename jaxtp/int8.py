"""int8 kernels: symmetric absmax quantization and the matmuls and lookups that read int8 weights.

The layers (`jaxtp.layers.Linear`, `Embed`) own their quantized state and call these; `jaxtp.quant.cast`
asks them to convert. Quantized arrays live in `Int8Weight` / `Int8Scale` (not `nnx.Param`), so
gradients and optimizers skip them.

Per-output-channel symmetric absmax (after Qwix/AQT, written small): a kernel whose leading `contract`
axes are contracted gets a float32 scale of the kernel's shape with those axes reduced to 1, so the
scale carries the kernel's logical names with None on the contracted axes and shards with its output
channels: column-parallel scales split over `model`, row-parallel ones replicate.

  "int8"  weight-only: int8 -> compute dtype right before the einsum, the per-channel scale applied to
          the einsum's result (kernel output axes are result axes, so this is exact up to rounding).
  "w8a8"  inference: per-token dynamic int8 activations, an int8 x int8 -> int32 `lax.dot_general`,
          rescaled by both scales. Per-token absmax over a tensor-parallel contracted axis (the inputs
          of the row-parallel `o` and `down` projections) costs one small max all-reduce ([B, S]
          floats) each, so w8a8 forward has 4 model-axis all-reduces per layer, not 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "MODES",
    "QMAX",
    "SCALE_FLOOR",
    "Quantized",
    "Int8Weight",
    "Int8Scale",
    "quantize",
    "channel_scale",
    "quantize_variable",
    "int8_einsum",
    "w8a8_einsum",
    "quantized_einsum",
    "int8_take",
]

MODES = ("int8", "w8a8")  # weight-only int8, and int8 x int8 matmuls
QMAX = 127
SCALE_FLOOR = 1e-30  # an all-zero channel gets this scale (and zeros), never 0/0


class Quantized(nnx.Variable):
    """Base of the int8 storage variables; not an `nnx.Param`, so grads and optimizers skip it."""


class Int8Weight(Quantized):
    """int8 kernel (or embedding table), same shape and logical names as the float weight."""


class Int8Scale(Quantized):
    """float32 per-output-channel scale: the weight's shape with contracted axes reduced to 1."""


def quantize(w, axes) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax int8 over `axes` (keepdims): w ~= q * scale, q in [-127, 127], scale f32."""
    w = jnp.asarray(w).astype(jnp.float32)
    scale = channel_scale(jnp.max(jnp.abs(w), axis=tuple(axes), keepdims=True))
    q = jnp.clip(jnp.round(w / scale), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def channel_scale(absmax, xp=jnp):
    """A channel's int8 scale from its absmax, in jax (xp=jnp) or numpy (xp=np, jaxtp.hf's streaming loader).
    It multiplies by the f32 reciprocal of 127 rather than dividing: XLA rewrites a division by a constant
    that way anyway, and written out it is the same IEEE operation in both, so the scales agree bit for bit."""
    return xp.maximum(absmax * xp.float32(1 / QMAX), xp.float32(SCALE_FLOOR))


def quantize_variable(var: nnx.Variable, axes) -> tuple[Int8Weight, Int8Scale]:
    """(Int8Weight, Int8Scale) for a float weight variable, reducing over `axes`. The scale keeps the
    weight's logical names with None on the reduced (size-1) axes, so it shards with its channels."""
    axes = tuple(axes)
    names = var.get_metadata().get("out_sharding")
    q, s = quantize(var[...], axes)
    if names is None:
        return Int8Weight(q), Int8Scale(s)
    scale_names = tuple(None if i in axes else n for i, n in enumerate(names))
    return Int8Weight(q, out_sharding=tuple(names)), Int8Scale(s, out_sharding=scale_names)


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
    """Weight-only int8: dequantize q to the compute dtype for the einsum, scale the result per channel."""
    _, rhs, out, contracted = _parse(equation)
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
    x_kept = "".join(c for c in lhs if c not in contracted)
    ws, w_kept = _squeeze_contracted(scale, rhs, contracted)
    natural = x_kept + w_kept  # dot_general's output order
    y = acc.astype(jnp.float32) * _broadcast_to_out(jnp.squeeze(xs, axis=x_axes), x_kept, natural)
    y = y * _broadcast_to_out(ws.astype(jnp.float32), w_kept, natural)
    if natural != out:
        y = jnp.transpose(y, [natural.index(c) for c in out])
    return y.astype(out_dtype)


def quantized_einsum(mode: str, equation: str, x, q, scale, compute_dtype):
    """What a quantized `Linear` computes: weight-only ("int8") or int8 x int8 ("w8a8")."""
    if mode == "w8a8":
        return w8a8_einsum(equation, x, q, scale, compute_dtype)
    return int8_einsum(equation, x, q, scale, compute_dtype)


def int8_take(q_VD, scale_V1, tokens_BS, compute_dtype):
    """Embedding lookup of int8 rows, dequantized after the lookup with each row's scale."""
    rows_BSD = jnp.take(q_VD, tokens_BS, axis=0).astype(compute_dtype)
    return rows_BSD * jnp.take(scale_V1, tokens_BS, axis=0).astype(compute_dtype)
