"""The decode step's KV cache: its layout, int8 storage, and attention over the filled prefix only.

A cache entry (one layer's K, or V; or a scanned model's stacked K or V) is either a float array
``[B, T, K, H]`` (``[L, B, T, K, H]``) or an `Int8KV`: int8 values of that shape plus one bf16 scale per
(token, kv head), ``[B, T, K]`` (``[L, B, T, K]``), placed like the values minus head_dim. Scales are
symmetric absmax over head_dim / 127, so a token's quantization never mixes kv heads (each lives on its
own model rank) and needs no collective. Before quantizing, K and V are rotated along head_dim by an
orthonormal Hadamard matrix (`rotate`): a dot product is unchanged by it, and it spreads an outlier channel
over all channels, so the absmax, and with it every value's step, shrinks (docs/attention.md: free-running
greedy agreement with a bf16 cache 0.965 -> 0.996). Scales are bf16, not f32: with head_dim H a token's kv head costs
H + 2 bytes against a bf16 cache's 2H (H=64: 0.516x; f32 scales would give 0.531x). A scale is rounded up
to bf16 and the values are rounded against it, so the absmax still fits in 127 steps and the scale's own
rounding only widens the step by under 2^-7 (docs/attention.md). 16-bit floats (the scales, and a bf16
cache's values) are stored as their uint16 bit patterns (`pack`).

`decode_attention` attends one query position over the cache in blocks of keys, up to the block holding
the current slot (a while loop with a trip count of slot // block + 1): a step costs what the position
reached costs, not what the cache's allocated length does. It keeps an online softmax (running max, sum
and accumulator in f32) and reads grouped queries as a [B, K, G, H] view of q, so the cache is never
repeated per query head. An int8 block is dequantized inside the loop, its scale applied after the dot
(a per-key factor of the scores, and of the probabilities that weight V); q is rotated once before the
loop and the output once after it, so keys and values stay in the rotated basis they were stored in.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .int8 import QMAX, channel_scale
from .sharding import constrain

__all__ = [
    "CACHE_AXES",
    "KV_CACHE_DTYPES",
    "BITS",
    "DECODE_BLOCK",
    "MASKED",
    "Int8KV",
    "storage_dtype",
    "pack",
    "unpack",
    "quantize",
    "dequantize",
    "store",
    "constrain_entry",
    "values",
    "allocate",
    "write",
    "read_block",
    "abstract",
    "bytes_per_device",
    "decode_attention",
]

CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")
KV_CACHE_DTYPES = {
    "f32": jnp.float32,
    "float32": jnp.float32,
    "bf16": jnp.bfloat16,
    "bfloat16": jnp.bfloat16,
    "int8": jnp.int8,
}
BITS = jnp.uint16  # how bf16 data is stored (see `pack`)
DECODE_BLOCK = 256  # keys per step of the decode attention loop
MASKED = -1e30  # a hidden key's score: finite, so a fully hidden block never makes inf - inf


class Int8KV(NamedTuple):
    """An int8 cache entry: values [..., B, T, K, H] and their bf16 scales [..., B, T, K] (stored as bits)."""

    q: jax.Array
    scale: jax.Array


def storage_dtype(kv_cache_dtype, compute_dtype):
    """The cache's dtype: `kv_cache_dtype` by name, or the compute dtype (None). One-line ValueError otherwise."""
    if kv_cache_dtype is None:
        return jnp.dtype(compute_dtype)
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype must be None (the compute dtype) or one of {', '.join(KV_CACHE_DTYPES)}; "
            f"got {kv_cache_dtype!r}"
        )
    return jnp.dtype(KV_CACHE_DTYPES[kv_cache_dtype])


def pack(x):
    """A bf16 array as the cache stores it: its uint16 bit patterns. XLA:CPU has no bf16 data movement: it
    widens a whole bf16 array to f32 around each slice update or slice of it, which would cost every decode
    step O(T). As uint16 the cache moves as plain 16-bit data on every backend and is widened a block at a time."""
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BITS)


def unpack(x):
    """Stored data as floats: bf16 from packed bits, anything else as it is."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == BITS else x


def _stored_scale(scale):
    """The f32 scale as stored, rounded up (never down: the absmax element must still fit in 127 steps)."""
    rounded = scale.astype(jnp.bfloat16)
    return jnp.where(rounded < scale, jnp.nextafter(rounded, jnp.asarray(jnp.inf, jnp.bfloat16)), rounded)


@functools.lru_cache
def rotation(H: int) -> np.ndarray:
    """An orthonormal, symmetric [H, H] f32 matrix (so its own inverse): normalized Sylvester-Hadamard blocks
    of the largest power of two dividing H along the diagonal (H = 64: one 64 x 64 block; H = 96: three 32s)."""
    b = H & -H
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return np.kron(np.eye(H // b, dtype=np.float32), h / np.float32(math.sqrt(b)))


def rotate(x):
    """x @ rotation(H) over the last axis, in f32. Applied twice it is the identity; dot products over the
    last axis are unchanged by it. head_dim is never sharded, so it needs no collective."""
    return jnp.einsum("...h,hj->...j", x.astype(jnp.float32), jnp.asarray(rotation(x.shape[-1])))


def quantize(x_BSKH) -> Int8KV:
    """Symmetric int8 over head_dim of the rotated values, rounded against the scale as stored."""
    x = rotate(x_BSKH)
    absmax_BSK = jnp.max(jnp.abs(x), axis=-1)
    scale_BSK = _stored_scale(channel_scale(absmax_BSK))  # an all-zero vector: the floor, never 0/0
    q = jnp.round(x / scale_BSK.astype(jnp.float32)[..., None])
    return Int8KV(jnp.clip(q, -QMAX, QMAX).astype(jnp.int8), pack(scale_BSK))


def dequantize(entry: Int8KV, dtype=jnp.float32):
    """The values an int8 entry stands for, rotated back (tests and checks; decode applies scales after its
    dots and rotates only q and the output)."""
    return rotate(entry.q.astype(jnp.float32) * unpack(entry.scale).astype(jnp.float32)[..., None]).astype(
        dtype
    )


def store(x_BSKH, dtype):
    """K or V as the cache holds it: quantized for int8, packed for bf16, else cast."""
    if jnp.dtype(dtype) == jnp.int8:
        return quantize(x_BSKH)
    return pack(x_BSKH) if jnp.dtype(dtype) == jnp.bfloat16 else x_BSKH.astype(dtype)


def _stored_dtype(dtype):
    """The array dtype that holds data of `dtype` (bf16: its bits)."""
    return BITS if jnp.dtype(dtype) == jnp.bfloat16 else dtype


def _logical_dtype(entry):
    """What an entry was stored from: int8, bf16 (packed bits) or the float dtype itself."""
    dtype = values(entry).dtype
    return jnp.dtype(jnp.bfloat16) if dtype == BITS else dtype


def constrain_entry(entry, names, layout):
    """Pin an entry to the cache's placement (`names` for the values; the scales drop head_dim)."""
    if isinstance(entry, Int8KV):
        return Int8KV(constrain(entry.q, names, layout), constrain(entry.scale, names[:-1], layout))
    return constrain(entry, names, layout)


def values(entry):
    """An entry's value array (int8 or float), whose shape is the cache's."""
    return entry.q if isinstance(entry, Int8KV) else entry


def allocate(x_BSKH, cache_len: int, dtype, names, layout):
    """A [B, cache_len, K, H] entry holding x's S positions at slots 0..S-1 (zeros after)."""
    stored = store(x_BSKH, dtype)

    def put(x):
        empty = jnp.zeros((x.shape[0], cache_len) + x.shape[2:], x.dtype)
        return jax.lax.dynamic_update_slice(empty, x, (0,) * x.ndim)

    return constrain_entry(jax.tree.map(put, stored), names, layout)


def write(entry, new_B1KH, lead: tuple, slot):
    """`entry` with one position written at [*lead, :, slot] (quantized for int8): a slice update on the
    unsharded seq axis, in place under donation. `lead` is () for a layer's own entry, (i,) for a stacked one."""
    new = store(new_B1KH, _logical_dtype(entry))

    def put(c, x):
        x = x.reshape((1,) * len(lead) + x.shape)
        return jax.lax.dynamic_update_slice(c, x, (*lead, 0, slot) + (0,) * (c.ndim - len(lead) - 2))

    return jax.tree.map(put, entry, new)


def read_block(entry, lead: tuple, start, size: int):
    """Slots start..start+size-1 of one layer's entry: [B, size, K, H] (an Int8KV: and [B, size, K] scales),
    bf16 unpacked."""

    def piece(c):
        n = len(lead)
        sizes = (1,) * n + (c.shape[n], size) + c.shape[n + 2 :]
        return unpack(
            jax.lax.dynamic_slice(c, (*lead, 0, start) + (0,) * (c.ndim - n - 2), sizes).reshape(sizes[n:])
        )

    return jax.tree.map(piece, entry)


def abstract(shape_BTKH, dtype, names, sharding):
    """An entry's ShapeDtypeStructs, each placed by `sharding(names)` (which may return None)."""
    if jnp.dtype(dtype) != jnp.int8:
        return jax.ShapeDtypeStruct(shape_BTKH, _stored_dtype(dtype), sharding=sharding(names))
    return Int8KV(
        jax.ShapeDtypeStruct(shape_BTKH, jnp.int8, sharding=sharding(names)),
        jax.ShapeDtypeStruct(shape_BTKH[:-1], BITS, sharding=sharding(names[:-1])),
    )


def bytes_per_device(caches) -> int:
    """Bytes of (abstract) cache entries that one device holds, scales included."""
    local = lambda x: x.shape if x.sharding is None else x.sharding.shard_shape(x.shape)
    return sum(math.prod(local(x)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(caches))


# ------------------------------------------------------------------------------- decode attention


def _scores(q_BKGH, k, H: int):
    """q . k / sqrt(H) in f32, [B, K, G, t]; an int8 block's scale multiplies each key's score."""
    s_BKGT = jnp.einsum(
        "bkgh,btkh->bkgt", q_BKGH, values(k).astype(q_BKGH.dtype), preferred_element_type=jnp.float32
    )
    if isinstance(k, Int8KV):
        s_BKGT = s_BKGT * k.scale.astype(jnp.float32).transpose(0, 2, 1)[:, :, None, :]
    return s_BKGT / math.sqrt(H)


def _weighted_values(p_BKGT, v, dtype):
    """sum_t p_t v_t in f32, [B, K, G, H]; an int8 block's scale folds into the probabilities."""
    if isinstance(v, Int8KV):
        p_BKGT = p_BKGT * v.scale.astype(jnp.float32).transpose(0, 2, 1)[:, :, None, :]
    return jnp.einsum(
        "bkgt,btkh->bkgh", p_BKGT.astype(dtype), values(v).astype(dtype), preferred_element_type=jnp.float32
    )


def decode_attention(q_B1NH, k, v, slot, offset_B, lead: tuple = (), block: int = DECODE_BLOCK):
    """Attention of one new position per row over cache slots offset_b..slot (slot holds the new key).

    `k`, `v`: cache entries (`lead` indexes a stacked one's layer). Blocks of `block` keys are read from
    slot 0 up to the block holding `slot`: slot // block + 1 of them, a dynamic trip count. The last block
    is clamped inside the cache, its keys already seen masked. Returns ([B, 1, N, H] in q's dtype, the
    number of blocks read)."""
    B, _, N, H = q_B1NH.shape
    T, K = values(k).shape[len(lead) + 1], values(k).shape[-2]
    size = min(block, T)
    q_BKGH = q_B1NH.reshape(B, K, N // K, H)
    if isinstance(k, Int8KV):  # int8 keys are stored rotated: q . k = (q R) . (k R)
        q_BKGH = rotate(q_BKGH).astype(q_B1NH.dtype)
    n_blocks = slot // size + 1

    def body(carry):
        j, m_BKG, l_BKG, acc_BKGH = carry
        first = j * size
        start = jnp.minimum(first, T - size)
        slot_t = start + jnp.arange(size)
        visible_BT = (slot_t >= first) & (slot_t <= slot) & (slot_t[None, :] >= offset_B[:, None])
        visible_BKGT = visible_BT[:, None, None, :]
        s_BKGT = jnp.where(visible_BKGT, _scores(q_BKGH, read_block(k, lead, start, size), H), MASKED)
        m_new_BKG = jnp.maximum(m_BKG, s_BKGT.max(axis=-1))
        correction_BKG = jnp.exp(m_BKG - m_new_BKG)
        p_BKGT = jnp.where(visible_BKGT, jnp.exp(s_BKGT - m_new_BKG[..., None]), 0.0)
        acc_BKGH = acc_BKGH * correction_BKG[..., None] + _weighted_values(
            p_BKGT, read_block(v, lead, start, size), q_BKGH.dtype
        )
        return j + 1, m_new_BKG, l_BKG * correction_BKG + p_BKGT.sum(axis=-1), acc_BKGH

    init = (
        jnp.int32(0),
        jnp.full((B, K, N // K), MASKED, jnp.float32),
        jnp.zeros((B, K, N // K), jnp.float32),
        jnp.zeros((B, K, N // K, H), jnp.float32),
    )
    n_read, _, l_BKG, acc_BKGH = jax.lax.while_loop(lambda c: c[0] < n_blocks, body, init)
    out_BKGH = acc_BKGH / l_BKG[..., None]
    if isinstance(v, Int8KV):  # sum_t p_t (v_t R) = (sum_t p_t v_t) R, and R R = I
        out_BKGH = rotate(out_BKGH)
    return out_BKGH.reshape(B, 1, N, H).astype(q_B1NH.dtype), n_read
