"""Attention math: one `attend` with three implementations and an "auto" choice between them.

  xla        the whole [B, K, G, S, T] score tensor, softmax, one einsum: fastest at short context on CPU,
             but its memory grows with S x T (the backward keeps the probabilities).
  blockwise  FlashAttention-2 in pure JAX: an online softmax over key blocks inside a loop over query
             blocks, and a custom VJP that recomputes each block's probabilities from the saved
             per-row logsumexp. Nothing S x T is stored; a (query block, key block) pair that the
             positions make causally dead is skipped (lax.cond), not computed and masked.
  cudnn      jax.nn.dot_product_attention(implementation="cudnn"), GPU only, for the masks cuDNN can
             express; everything else falls back as "auto" would without it.
Grouped queries read their kv head through a [B, S, K, G, H] view of q (head n reads kv head n // G), so
k and v are never repeated and every head-indexed tensor splits over the heads axis the way q does.
How and why: docs/attention.md.

Shape suffixes: B batch, S query positions, T key positions, N query heads, K kv heads, G = N / K,
H head dim; Q and T2 a query and a key block inside the loops, I and J the query and key block counts.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .config import ATTENTION_CHOICES, DEFAULT_ATTENTION_BLOCK

__all__ = [
    "AUTO_BLOCKWISE_MIN_ST",
    "CUDNN_DTYPES",
    "CUDNN_MAX_HEAD_DIM",
    "attend",
    "resolve",
    "check_implementation",
    "on_gpu",
    "visibility",
    "grouped",
    "attend_xla",
    "cudnn_expressible",
    "attend_cudnn",
    "attend_blockwise",
    "flash",
]

# "auto" picks blockwise once S * T reaches this (where cuDNN does not run). Measured crossover on XLA:CPU:
# train-step time of the `small` preset at a constant 8192 tokens per batch (B = 8192 / S), xla against
# blockwise (attention_block 128), S = T = 64 to 2048, timed round-robin: alike at 64 and 128, blockwise
# ahead from 256 on (by 4x at 2048, where xla's S x T probabilities outgrow the caches).
AUTO_BLOCKWISE_MIN_ST = 256 * 256
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's flash attention runs in half precision only
CUDNN_MAX_HEAD_DIM = 128  # every cuDNN-capable GPU (Hopper and later allow 256)


# ---------------------------------------------------------------------------------------------- dispatch


def attend(
    q_BSNH,
    k_BTKH,
    v_BTKH,
    q_pos_BS,
    k_pos_BT,
    k_valid_BT=None,
    causal: bool = True,
    mask_BST=None,
    *,
    implementation: str = "auto",
    block: int = DEFAULT_ATTENTION_BLOCK,
    cudnn_ok: bool = True,
):
    """Grouped-query attention. Causal by position: key t is visible to query s iff pos_t <= pos_s; with
    causal=False every key is (an encoder). `k_valid_BT` drops padded keys; `mask_BST` (True = may attend,
    broadcastable to [B, S, T]) is any further mask. A query that sees no key averages every value (what
    a -1e30 score fill gives), in all three implementations. `implementation`: auto | xla | blockwise |
    cudnn; `block`: blockwise's block size; `cudnn_ok=False` rules cuDNN out for a reason only the
    caller knows (Attention: kv heads replicated while the query heads are split)."""
    impl = resolve(
        implementation,
        q_BSNH.shape[1],
        k_BTKH.shape[1],
        cudnn_ok and cudnn_expressible(q_BSNH, k_BTKH, k_valid_BT, mask_BST, causal),
    )
    if impl == "cudnn":
        fallback = resolve("auto", q_BSNH.shape[1], k_BTKH.shape[1], False)
        return attend_cudnn(
            q_BSNH,
            k_BTKH,
            v_BTKH,
            q_pos_BS,
            k_pos_BT,
            causal,
            functools.partial(attend, causal=causal, implementation=fallback, block=block),
        )
    if impl == "blockwise":
        return attend_blockwise(
            q_BSNH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, causal, mask_BST, block
        )
    return attend_xla(q_BSNH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, causal, mask_BST)


def resolve(implementation: str, S: int, T: int, cudnn_ok: bool) -> str:
    """The implementation a call runs: "xla", "blockwise" or "cudnn". auto and cudnn take cuDNN on a GPU
    where it can express the call, else xla below AUTO_BLOCKWISE_MIN_ST score entries and blockwise above."""
    check_implementation(implementation)
    if implementation not in ("auto", "cudnn"):
        return implementation
    if on_gpu() and cudnn_ok:
        return "cudnn"
    return "blockwise" if S * T >= AUTO_BLOCKWISE_MIN_ST else "xla"


def check_implementation(implementation: str) -> None:
    """A one-line ValueError for an unknown choice, or for cudnn without a GPU."""
    if implementation not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}; got {implementation!r}")
    if implementation == "cudnn" and not on_gpu():
        raise ValueError(
            f"attention='cudnn' needs a GPU (the backend is {jax.default_backend()}): "
            "use attention='auto' or 'blockwise'"
        )


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def visibility(q_pos_BS, k_pos_BT, k_valid_BT, causal: bool, mask_BST):
    """[B, S, T] bool: which keys each query may attend to (broadcast shapes where an input is absent)."""
    visible_BST = k_pos_BT[:, None, :] <= q_pos_BS[:, :, None] if causal else jnp.ones((1, 1, 1), bool)
    if k_valid_BT is not None:
        visible_BST = visible_BST & k_valid_BT[:, None, :]
    return visible_BST if mask_BST is None else visible_BST & mask_BST


def grouped(q_BSNH, K: int):
    """q as [B, S, K, G, H]: query head n = k * G + g reads kv head k."""
    B, S, N, H = q_BSNH.shape
    return q_BSNH.reshape(B, S, K, N // K, H)


# ---------------------------------------------------------------------------------------------- xla


def attend_xla(
    q_BSNH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT=None, causal: bool = True, mask_BST=None
):
    """All scores at once, masked with -1e30 (a row that sees nothing averages every value); softmax in f32."""
    B, S, N, H = q_BSNH.shape
    T = k_BTKH.shape[1]
    scores_BKGST = jnp.einsum("bskgh,btkh->bkgst", grouped(q_BSNH, k_BTKH.shape[2]), k_BTKH)
    scores_BKGST = scores_BKGST.astype(jnp.float32) / math.sqrt(H)
    visible_BST = jnp.broadcast_to(visibility(q_pos_BS, k_pos_BT, k_valid_BT, causal, mask_BST), (B, S, T))
    scores_BKGST = jnp.where(visible_BST[:, None, None], scores_BKGST, -1e30)
    probs_BKGST = jax.nn.softmax(scores_BKGST, axis=-1).astype(v_BTKH.dtype)
    return jnp.einsum("bkgst,btkh->bskgh", probs_BKGST, v_BTKH).reshape(B, S, N, H)


# ---------------------------------------------------------------------------------------------- cudnn


def cudnn_expressible(q_BSNH, k_BTKH, k_valid_BT, mask_BST, causal: bool) -> bool:
    """Whether cuDNN's flash attention can run this call: half precision, a head dim it takes, no padding
    or extra mask (jaxtp's padding is left padding, which its sequence lengths cannot say), and for causal
    attention queries and keys of one sequence (its causal mask is by index; attend_cudnn checks at run
    time that the positions order them the same way)."""
    H = q_BSNH.shape[-1]
    return (
        q_BSNH.dtype in CUDNN_DTYPES
        and H % 8 == 0
        and H <= CUDNN_MAX_HEAD_DIM
        and k_valid_BT is None
        and mask_BST is None
        and (not causal or q_BSNH.shape[1] == k_BTKH.shape[1])
    )


def attend_cudnn(q_BSNH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, causal: bool, fallback):
    """cuDNN flash attention (GQA native: k, v stay [B, T, K, H]). Causal by position equals cuDNN's causal
    by index only where queries and keys share positions that increase along the sequence: checked on the
    data, `fallback(q, k, v, q_pos, k_pos)` runs otherwise (both branches compile; one runs)."""

    def cudnn(q_BSNH, k_BTKH, v_BTKH):
        return jax.nn.dot_product_attention(q_BSNH, k_BTKH, v_BTKH, is_causal=causal, implementation="cudnn")

    if not causal:
        return cudnn(q_BSNH, k_BTKH, v_BTKH)
    ordered = jnp.all(q_pos_BS == k_pos_BT) & jnp.all(q_pos_BS[:, 1:] > q_pos_BS[:, :-1])
    return jax.lax.cond(
        ordered, cudnn, lambda q, k, v: fallback(q, k, v, q_pos_BS, k_pos_BT), q_BSNH, k_BTKH, v_BTKH
    )


# ---------------------------------------------------------------------------------------------- blockwise


def attend_blockwise(
    q_BSNH,
    k_BTKH,
    v_BTKH,
    q_pos_BS,
    k_pos_BT,
    k_valid_BT=None,
    causal: bool = True,
    mask_BST=None,
    block: int = DEFAULT_ATTENTION_BLOCK,
):
    """FlashAttention-2 over blocks of `block` queries and keys (S and T padded internally); see flash."""
    B, S, N, H = q_BSNH.shape
    K = k_BTKH.shape[2]
    if k_valid_BT is None:
        k_valid_BT = jnp.ones(k_pos_BT.shape, bool)
    if mask_BST is not None:
        mask_BST = jnp.asarray(mask_BST, bool)
        mask_BST = mask_BST.reshape((1,) * (3 - mask_BST.ndim) + mask_BST.shape)
    out_BSKGH, lse_BKGS = flash(
        causal, block, grouped(q_BSNH, K), k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, mask_BST
    )
    # A row that saw no key (lse = -inf) gets xla's answer: the mean of every value.
    saw_BSKG1 = (jnp.moveaxis(lse_BKGS, 3, 1) > -jnp.inf)[..., None]
    mean_B1K1H = jnp.mean(v_BTKH.astype(jnp.float32), axis=1)[:, None, :, None, :].astype(out_BSKGH.dtype)
    return jnp.where(saw_BSKG1, out_BSKGH, mean_B1K1H).reshape(B, S, N, H)


class Tiles(NamedTuple):
    """The inputs padded to whole blocks, and which (query block, key block) pairs can see anything.

    Padded queries sit at the lowest position (they see nothing causally), padded keys are invalid; a
    mask's axes of size 1 stay broadcast."""

    q_BSKGH: jax.Array
    k_BTKH: jax.Array
    v_BTKH: jax.Array
    q_pos_BS: jax.Array
    k_pos_BT: jax.Array
    k_valid_BT: jax.Array
    mask_BST: jax.Array | None
    live_IJ: jax.Array
    causal: bool
    Q: int
    T2: int

    def query_block(self, i):
        return take(self.q_BSKGH, 1, i, self.Q), take(self.q_pos_BS, 1, i, self.Q)

    def key_block(self, j):
        return tuple(
            take(x, 1, j, self.T2) for x in (self.k_BTKH, self.v_BTKH, self.k_pos_BT, self.k_valid_BT)
        )

    def visible(self, i, q_pos_BQ, j, k_pos_BT2, k_valid_BT2):
        """[B, Q, T2] bool for query block i and key block j."""
        mask = None if self.mask_BST is None else take(take(self.mask_BST, 1, i, self.Q), 2, j, self.T2)
        return visibility(q_pos_BQ, k_pos_BT2, k_valid_BT2, self.causal, mask)


def tiles(
    causal: bool, block: int, q_BSKGH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, mask_BST
) -> Tiles:
    S, T = q_BSKGH.shape[1], k_BTKH.shape[1]
    Q, T2 = min(block, S), min(block, T)
    Sp, Tp = -(-S // Q) * Q, -(-T // T2) * T2
    lowest, highest = jnp.iinfo(q_pos_BS.dtype).min, jnp.iinfo(k_pos_BT.dtype).max
    # A key block is live for a query block iff it has a valid key at a position some query of the block
    # reaches (any valid key for causal=False), in some row: decided from the positions, not the indices.
    # The batch is reduced first: for positions broadcast along it (the default 0..S-1) XLA then folds the
    # reduction away, where a padded [B, S] would need an all-reduce over a batch split across devices.
    q_max_I = jnp.max(pad(jnp.max(q_pos_BS, axis=0), 0, Sp, lowest).reshape(Sp // Q, Q), axis=1)
    k_min_T = pad(jnp.min(jnp.where(k_valid_BT, k_pos_BT, highest), axis=0), 0, Tp, highest)
    k_min_J = jnp.min(k_min_T.reshape(Tp // T2, T2), axis=1)
    any_valid_J = jnp.any(pad(jnp.any(k_valid_BT, axis=0), 0, Tp, False).reshape(Tp // T2, T2), axis=1)
    reaches_IJ = k_min_J[None, :] <= q_max_I[:, None] if causal else jnp.ones((Sp // Q, 1), bool)
    live_IJ = any_valid_J[None, :] & reaches_IJ
    if mask_BST is not None:
        mask_BST = pad(pad(mask_BST, 1, Sp, False), 2, Tp, False)
    return Tiles(
        pad(q_BSKGH, 1, Sp, 0),
        pad(k_BTKH, 1, Tp, 0),
        pad(v_BTKH, 1, Tp, 0),
        pad(q_pos_BS, 1, Sp, lowest),
        pad(k_pos_BT, 1, Tp, highest),
        pad(k_valid_BT, 1, Tp, False),
        mask_BST,
        live_IJ,
        causal,
        Q,
        T2,
    )


def pad(x, axis: int, size: int, value):
    """x padded with `value` to `size` along `axis` (an axis of size 1 is a broadcast one: left alone)."""
    if x.shape[axis] in (1, size):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def take(x, axis: int, index, size: int):
    """Block `index` of `size` along `axis` (an axis of size 1 is a broadcast one: the whole of it)."""
    return x if x.shape[axis] == 1 else jax.lax.dynamic_slice_in_dim(x, index * size, size, axis)


def put(x, axis: int, index, size: int, block):
    return jax.lax.dynamic_update_slice_in_dim(x, block.astype(x.dtype), index * size, axis)


def block_scores(q_BQKGH, k_BT2KH, visible_BQT2):
    """[B, K, G, Q, T2] f32 scores, -inf where not visible."""
    s_BKGQT2 = jnp.einsum("bqkgh,btkh->bkgqt", q_BQKGH, k_BT2KH, preferred_element_type=jnp.float32)
    return jnp.where(visible_BQT2[:, None, None], s_BKGQT2 / math.sqrt(q_BQKGH.shape[-1]), -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def flash(causal: bool, block: int, q_BSKGH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, mask_BST):
    """(out [B, S, K, G, H] in q's dtype, lse [B, K, G, S] f32): attention and each row's logsumexp of the
    visible scores (-inf, and out 0, for a row that sees nothing)."""
    return flash_forward(causal, block, q_BSKGH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, mask_BST)


def flash_forward(causal, block, q_BSKGH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, mask_BST):
    """Per query block, an online softmax over the live key blocks: running max m, running sum l and
    unnormalised output acc, rescaled by exp(m_old - m_new) whenever the max grows."""
    t = tiles(causal, block, q_BSKGH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, mask_BST)
    B, S, K, G, H = q_BSKGH.shape
    Sp, Tp = t.q_BSKGH.shape[1], t.k_BTKH.shape[1]

    def query_block(i, carry):
        out_BSKGH, lse_BKGS = carry
        q_BQKGH, q_pos_BQ = t.query_block(i)

        def update(j, state):
            m_BKGQ, l_BKGQ, acc_BKGQH = state
            k_BT2KH, v_BT2KH, k_pos_BT2, k_valid_BT2 = t.key_block(j)
            s_BKGQT2 = block_scores(q_BQKGH, k_BT2KH, t.visible(i, q_pos_BQ, j, k_pos_BT2, k_valid_BT2))
            m_new = jnp.maximum(m_BKGQ, jnp.max(s_BKGQT2, axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no visible key yet: keep exp() finite
            p_BKGQT2 = jnp.exp(s_BKGQT2 - m_safe[..., None])
            alpha_BKGQ = jnp.exp(m_BKGQ - m_safe)
            pv_BKGQH = jnp.einsum(
                "bkgqt,btkh->bkgqh",
                p_BKGQT2.astype(v_BT2KH.dtype),
                v_BT2KH,
                preferred_element_type=jnp.float32,
            )
            return m_new, alpha_BKGQ * l_BKGQ + p_BKGQT2.sum(-1), alpha_BKGQ[..., None] * acc_BKGQH + pv_BKGQH

        def key_block(j, state):
            return jax.lax.cond(t.live_IJ[i, j], update, lambda j, state: state, j, state)

        init = (jnp.full((B, K, G, t.Q), -jnp.inf), jnp.zeros((B, K, G, t.Q)), jnp.zeros((B, K, G, t.Q, H)))
        m_BKGQ, l_BKGQ, acc_BKGQH = jax.lax.fori_loop(0, Tp // t.T2, key_block, init)
        seen_BKGQ = l_BKGQ > 0
        o_BKGQH = acc_BKGQH / jnp.where(seen_BKGQ, l_BKGQ, 1.0)[..., None]
        lse_BKGQ = jnp.where(seen_BKGQ, m_BKGQ + jnp.log(jnp.where(seen_BKGQ, l_BKGQ, 1.0)), -jnp.inf)
        return (put(out_BSKGH, 1, i, t.Q, jnp.moveaxis(o_BKGQH, 3, 1)), put(lse_BKGS, 3, i, t.Q, lse_BKGQ))

    init = (jnp.zeros((B, Sp, K, G, H), q_BSKGH.dtype), jnp.zeros((B, K, G, Sp), jnp.float32))
    out_BSKGH, lse_BKGS = jax.lax.fori_loop(0, Sp // t.Q, query_block, init)
    return out_BSKGH[:, :S], lse_BKGS[..., :S]


def flash_fwd(causal, block, q_BSKGH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, mask_BST):
    out_BSKGH, lse_BKGS = flash_forward(
        causal, block, q_BSKGH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, mask_BST
    )
    residuals = (q_BSKGH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, mask_BST, out_BSKGH, lse_BKGS)
    return (out_BSKGH, lse_BKGS), residuals


def flash_bwd(causal, block, residuals, cotangents):
    """Per key block, over the live query blocks: P = exp(s - lse) recomputed, dP = dO V^T,
    dS = P (dP - D + dlse) with D = rowsum(dO * O); dQ += dS K, dK += dS^T Q, dV += P^T dO (scaled by
    1/sqrt(H) where s was)."""
    q_BSKGH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, mask_BST, out_BSKGH, lse_BKGS = residuals
    dout_BSKGH, dlse_BKGS = cotangents
    t = tiles(causal, block, q_BSKGH, k_BTKH, v_BTKH, q_pos_BS, k_pos_BT, k_valid_BT, mask_BST)
    B, S, K, G, H = q_BSKGH.shape
    T, Sp, Tp = k_BTKH.shape[1], t.q_BSKGH.shape[1], t.k_BTKH.shape[1]
    scale = 1.0 / math.sqrt(H)
    dout_BSKGH = pad(dout_BSKGH, 1, Sp, 0)
    # D - dlse per row: the part of dS common to the whole row.
    d_BKGS = jnp.einsum(
        "bskgh,bskgh->bkgs", dout_BSKGH.astype(jnp.float32), pad(out_BSKGH, 1, Sp, 0).astype(jnp.float32)
    ) - pad(dlse_BKGS, 3, Sp, 0)
    lse_BKGS = pad(jnp.where(lse_BKGS == -jnp.inf, 0.0, lse_BKGS), 3, Sp, 0)  # seen nothing: P = 0 anyway

    def key_block(j, carry):
        dq_BSKGH, dk_BTKH, dv_BTKH = carry
        k_BT2KH, v_BT2KH, k_pos_BT2, k_valid_BT2 = t.key_block(j)

        def update(i, state):
            dq_BSKGH, dk_BT2KH, dv_BT2KH = state
            q_BQKGH, q_pos_BQ = t.query_block(i)
            do_BQKGH = take(dout_BSKGH, 1, i, t.Q)
            s_BKGQT2 = block_scores(q_BQKGH, k_BT2KH, t.visible(i, q_pos_BQ, j, k_pos_BT2, k_valid_BT2))
            p_BKGQT2 = jnp.exp(s_BKGQT2 - take(lse_BKGS, 3, i, t.Q)[..., None])
            dp_BKGQT2 = jnp.einsum("bqkgh,btkh->bkgqt", do_BQKGH, v_BT2KH, preferred_element_type=jnp.float32)
            ds_BKGQT2 = p_BKGQT2 * (dp_BKGQT2 - take(d_BKGS, 3, i, t.Q)[..., None]) * scale
            dq_BQKGH = take(dq_BSKGH, 1, i, t.Q) + jnp.einsum(
                "bkgqt,btkh->bqkgh",
                ds_BKGQT2.astype(k_BT2KH.dtype),
                k_BT2KH,
                preferred_element_type=jnp.float32,
            )
            dk_BT2KH = dk_BT2KH + jnp.einsum(
                "bkgqt,bqkgh->btkh",
                ds_BKGQT2.astype(q_BQKGH.dtype),
                q_BQKGH,
                preferred_element_type=jnp.float32,
            )
            dv_BT2KH = dv_BT2KH + jnp.einsum(
                "bkgqt,bqkgh->btkh",
                p_BKGQT2.astype(do_BQKGH.dtype),
                do_BQKGH,
                preferred_element_type=jnp.float32,
            )
            return put(dq_BSKGH, 1, i, t.Q, dq_BQKGH), dk_BT2KH, dv_BT2KH

        def query_block(i, state):
            return jax.lax.cond(t.live_IJ[i, j], update, lambda i, state: state, i, state)

        zeros_BT2KH = jnp.zeros((B, t.T2, K, H), jnp.float32)
        dq_BSKGH, dk_BT2KH, dv_BT2KH = jax.lax.fori_loop(
            0, Sp // t.Q, query_block, (dq_BSKGH, zeros_BT2KH, zeros_BT2KH)
        )
        return dq_BSKGH, put(dk_BTKH, 1, j, t.T2, dk_BT2KH), put(dv_BTKH, 1, j, t.T2, dv_BT2KH)

    init = (
        jnp.zeros((B, Sp, K, G, H), jnp.float32),
        jnp.zeros((B, Tp, K, H), jnp.float32),
        jnp.zeros((B, Tp, K, H), jnp.float32),
    )
    dq_BSKGH, dk_BTKH, dv_BTKH = jax.lax.fori_loop(0, Tp // t.T2, key_block, init)
    return (
        dq_BSKGH[:, :S].astype(q_BSKGH.dtype),
        dk_BTKH[:, :T].astype(k_BTKH.dtype),
        dv_BTKH[:, :T].astype(v_BTKH.dtype),
        None,
        None,
        None,
        None,
    )


flash.defvjp(flash_fwd, flash_bwd)
