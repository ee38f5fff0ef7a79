"""Autoregressive generation with a sharded KV cache: prefill once, then one compiled decode step.

Conventions (where the design left a choice):

* **Prompts** are given as a right-padded int batch ``[B, S]`` plus optional ``prompt_lengths`` ``[B]``
  (default: every row uses all S tokens; ids after a row's length are ignored). Internally each row is
  right-aligned (left-padded) to S = max length, with a per-row offset ``S - len_b``: row b's real
  tokens keep positions ``0..len_b-1`` (RoPE and causality see exactly what the row would see alone),
  padding slots are masked out with ``k_valid``, and every row writes the *same* cache slot at each
  decode step, so the cache update is one ``lax.dynamic_update_slice`` along the unsharded seq axis.
* **Cache**: per layer a K and a V array ``[B, T, K, H]`` with logical axes
  ``("batch", "seq", "kv_heads", "head_dim")``, placed by the model's ``layout`` (batch over
  ``data``, kv heads over ``model``, or replicated when the rules resolve kv heads to None), in the compute
  dtype or ``kv_cache_dtype``; an int8 cache keeps each K and V as int8 values plus bf16 scales ``[B, T, K]``
  placed alike (``jaxtp.kv_cache``).
  ``T = S + max_new_tokens`` (or ``cache_len``); slot t of row b holds position ``t - offset_b``.
  A scanned model (``ModelConfig.scan_layers``) keeps one stacked K and one V ``[L, B, T, K, H]``
  (``"layers"`` first, kept whole) and runs prefill and decode as one ``lax.scan`` over its layers, the
  caches in the scan carry: the decode step writes layer i's new position in place at ``[i, :, slot]``.
  (Indexing layer i of the stacked weights from a Python loop would work too, but re-unrolls the graph the
  scan exists to keep small.)
* **Prefill** runs the whole prompt in one pass and writes slots ``0..S-1``; the **decode step**
  writes slot ``S + i - 1``, attends over the filled slots only, in blocks of ``kv_block`` keys up to the
  block holding ``S + i - 1`` (``kv_cache.decode_attention``: a step costs what its position costs, not
  what ``T`` does), and samples. Its shapes depend only on ``(B, T)``, so it compiles
  once per generation (and is reused by later calls with the same shapes); the cache is donated to
  it, so it is updated in place.
* **Sampling** (per step, seeded: step i uses ``fold_in(key(seed), i)``): logits / temperature, then
  top-k (the k highest-scoring tokens; ties broken by lower id), then top-p on the renormalised
  result (the smallest prefix of the sorted distribution whose probability reaches p; the top token
  is always kept). ``temperature=0`` is greedy (argmax; top-k/top-p cannot change it).
* **EOS**: ``eos_id`` is one id or several (chat models end a turn with one token and a text with
  another, e.g. Llama 3's ``<|eot_id|>`` and ``<|end_of_text|>``). Once a row emits any of them, every
  later token of that row is the first one (so strip from the first occurrence of any). When every row
  has finished, generation stops early and the rest is filled with the first eos id.
* Batches whose size does not divide the data axis are padded with copies of row 0 and trimmed.
"""

from __future__ import annotations

import collections
import functools
import math
import numbers
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import kv_cache
from .distributed import to_host
from .kv_cache import CACHE_AXES, DECODE_BLOCK
from .layers import BLOCK_IN
from .model import LAYERS, layer, scan_blocks
from .sharding import constrain

__all__ = [
    "STACKED_CACHE_AXES",
    "TOKENS",
    "ROWS",
    "LOGITS_BV",
    "TRACES",
    "filter_logits",
    "sample_logits",
    "check_sampling",
    "prefill",
    "decode_step",
    "first_token",
    "generate",
    "forced_logits",
    "kv_cache_quality",
    "decode_step_lowered",
    "cache_bytes_per_device",
]

STACKED_CACHE_AXES = (LAYERS,) + CACHE_AXES  # a scanned model's caches: one [L, B, T, K, H] array each
TOKENS = ("batch", "seq")
ROWS = ("batch",)
LOGITS_BV = ("batch", "vocab")

# How many times each jitted function has been traced (a trace precedes every compile).
TRACES: collections.Counter = collections.Counter()

# ----------------------------------------------------------------------------------------- sampling


def _sorted_filtered(logits_BV, top_k, top_p, use_top_k: bool, use_top_p: bool):
    """Sort descending (stable: ties go to the lower id) and mask what top-k / top-p exclude with -inf."""
    V = logits_BV.shape[-1]
    order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True).astype(jnp.int32)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    rank_V = jnp.arange(V, dtype=jnp.int32)
    keep_BV = jnp.ones(sorted_BV.shape, bool)
    if use_top_k:
        keep_BV = keep_BV & (rank_V < top_k)
    if use_top_p:
        probs_BV = jax.nn.softmax(jnp.where(keep_BV, sorted_BV, -jnp.inf), axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # probability of strictly better tokens
        keep_BV = keep_BV & ((before_BV < top_p) | (rank_V == 0) | (top_p >= 1.0))
    return order_BV, jnp.where(keep_BV, sorted_BV, -jnp.inf)


def filter_logits(logits_BV, top_k: int | None = None, top_p: float | None = None):
    """Logits with every token that top-k / top-p exclude set to -inf (original vocab order)."""
    check_sampling(1.0, top_k, top_p)
    return _filter_jit(
        jnp.asarray(logits_BV, jnp.float32),
        jnp.int32(top_k or 0),
        jnp.float32(top_p or 1.0),
        (top_k is not None, top_p is not None),
    )


def _filter(logits_BV, top_k, top_p, use):
    order_BV, kept_BV = _sorted_filtered(logits_BV, top_k, top_p, *use)
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    return jnp.full_like(logits_BV, -jnp.inf).at[rows_B1, order_BV].set(kept_BV)


_filter_jit = jax.jit(_filter, static_argnums=(3,))


def _sample(logits_BV, key, temperature, top_k, top_p, mode):
    greedy, use_top_k, use_top_p = mode
    logits_BV = logits_BV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    order_BV, kept_BV = _sorted_filtered(logits_BV / temperature, top_k, top_p, use_top_k, use_top_p)
    pick_B = jax.random.categorical(key, kept_BV, axis=-1)
    return jnp.take_along_axis(order_BV, pick_B[:, None], axis=-1)[:, 0]


def _mode(temperature, top_k, top_p):
    return (temperature == 0, top_k is not None, top_p is not None)


def sample_logits(
    logits_BV, key, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
):
    """Sample one token id per row from `logits_BV` [B, V] (temperature, then top-k, then top-p)."""
    check_sampling(temperature, top_k, top_p)
    return _sample_jit(
        jnp.asarray(logits_BV),
        key,
        jnp.float32(temperature or 1.0),
        jnp.int32(top_k or 0),
        jnp.float32(top_p or 1.0),
        _mode(temperature, top_k, top_p),
    )


_sample_jit = jax.jit(_sample, static_argnums=(5,))


def check_sampling(temperature, top_k, top_p):
    """Raise a one-line ValueError for sampling settings generate would refuse (callers check before loading)."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1
    ):
        raise ValueError(f"top_k must be an integer >= 1 (or None to disable), got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {top_p!r}")


# ------------------------------------------------------------------------------------ cached forward


def _blocks_forward(model, x_BSD, caches, attend):
    """Walk the blocks through Block.forward with `attend(i, attn, h_BSD, caches) -> (out_BSD, (caches, y))`
    as their attention: it reads and writes the caches. The caches ride in the scan carry (updated in place
    under donation) and the y's are stacked like scan outputs (prefill builds its caches that way).
    Returns (final hidden, caches, ys)."""

    def step(block, carry, i):
        x_BSD, caches = carry
        x_BSD, (caches, y) = block.forward(x_BSD, lambda attn, h_BSD: attend(i, attn, h_BSD, caches))
        return (x_BSD, caches), y

    (x_BSD, caches), ys = scan_blocks(model, step, (x_BSD, caches))
    return model.final_norm(x_BSD), caches, ys


def _key_positions(offset_B, T: int):
    """Slot t of row b holds position t - offset_b; slots before the row's first token are padding."""
    slot_T = jnp.arange(T, dtype=jnp.int32)
    return slot_T[None, :] - offset_B[:, None], slot_T[None, :] >= offset_B[:, None]


@functools.partial(jax.jit, static_argnums=(0, 4), static_argnames=("cache_dtype",))
def prefill(graphdef, state, tokens_BS, offset_B, cache_len: int, cache_dtype=None):
    """Run the (left-aligned) prompt once, jitted; return the caches and the last logits [B, V].

    Caches: per layer a (k, v) pair of [B, T, K, H] entries, or for a scanned model one stacked pair
    [L, B, T, K, H] (the scan's outputs); an entry is an array of `cache_dtype` (None: the compute dtype)
    or, for int8, a kv_cache.Int8KV of values and scales."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    positions_BS, valid_BS = _key_positions(offset_B, tokens_BS.shape[1])

    def attend(i, attn, h_BSD, caches):
        k_BSKH, v_BSKH = attn.project_kv(h_BSD, positions_BS)
        # Within the prompt, attend over the fresh keys only (S, not T): the same numbers, less work.
        out_BSD = attn(h_BSD, positions_BS, kv=(k_BSKH, v_BSKH), k_pos_BT=positions_BS, k_valid_BT=valid_BS)
        dtype = k_BSKH.dtype if cache_dtype is None else cache_dtype
        put = lambda x_BSKH: kv_cache.allocate(x_BSKH, cache_len, dtype, CACHE_AXES, model.layout)
        return out_BSD, (caches, (put(k_BSKH), put(v_BSKH)))

    x_BSD, _, caches = _blocks_forward(model, model.embed(tokens_BS), None, attend)
    if model.cfg.scan_layers:
        caches = tuple(kv_cache.constrain_entry(c, STACKED_CACHE_AXES, model.layout) for c in caches)
    return caches, constrain(model.logits(x_BSD[:, -1:])[:, 0], LOGITS_BV, model.layout)


def _write_slot(caches, i, new_kv, slot, layout):
    """Write one position of layer i's K and V at `slot` (the same in every row: a slice update on an
    unsharded axis); return the caches, layer i's (k, v) entries and the index that reads layer i in them.
    A scanned model's stacked caches are updated at [i, :, slot] (i traced) and read in place at (i,), so
    only the new position is written and no layer's cache is copied out."""
    if isinstance(caches, list):
        kv = tuple(
            kv_cache.constrain_entry(kv_cache.write(c, new_B1KH, (), slot), CACHE_AXES, layout)
            for c, new_B1KH in zip(caches[i], new_kv)
        )
        return caches[:i] + [kv] + caches[i + 1 :], kv, ()
    caches = tuple(
        kv_cache.constrain_entry(kv_cache.write(c, new_B1KH, (i,), slot), STACKED_CACHE_AXES, layout)
        for c, new_B1KH in zip(caches, new_kv)
    )
    return caches, caches, (i,)


def _decode_attention(attn, h_B1D, positions_B1, kv, lead, slot, offset_B, block: int):
    """Attention.__call__ for one new position over the cache's filled prefix (kv_cache.decode_attention in
    place of attend, the same constraints): returns ([B, 1, D], key blocks read)."""
    q_B1NH = attn.project_q(constrain(h_B1D, BLOCK_IN, attn.layout), positions_B1)
    out_B1NH, n_read = kv_cache.decode_attention(q_B1NH, *kv, slot, offset_B, lead, block)
    return attn.project_out(out_B1NH), n_read


def _decode(model, caches, tokens_B, slot, offset_B, block: int = DECODE_BLOCK):
    """One token per row, all written at cache slot `slot` (row b's position slot - offset_b); return the
    caches, the logits and how many key blocks the layers read."""
    positions_B1 = (slot - offset_B)[:, None]

    def attend(i, attn, h_B1D, caches):
        caches, kv, lead = _write_slot(caches, i, attn.project_kv(h_B1D, positions_B1), slot, model.layout)
        out_B1D, n_read = _decode_attention(attn, h_B1D, positions_B1, kv, lead, slot, offset_B, block)
        return out_B1D, (caches, n_read)

    x_BSD, caches, n_read = _blocks_forward(model, model.embed(tokens_B[:, None]), caches, attend)
    n_read = sum(n_read) if isinstance(n_read, list) else jnp.sum(n_read)
    return caches, constrain(model.logits(x_BSD)[:, 0], LOGITS_BV, model.layout), n_read


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("block",), donate_argnums=(3,))
def decode_step(
    graphdef,
    mode,
    state,
    caches,
    tokens_B,
    slot,
    offset_B,
    done_B,
    key,
    step,
    temperature,
    top_k,
    top_p,
    eos_id,
    block: int = DECODE_BLOCK,
):
    """Feed `tokens_B` at cache slot `slot`; sample the next token; rows already done emit eos_id. Also
    returns the logits and the key blocks the step's attention read (all layers). Jitted once per cache
    shape and sampling `mode` (greedy, top-k, top-p); the caches are donated, so updated in place."""
    TRACES["decode_step"] += 1
    model = nnx.merge(graphdef, state)
    caches, logits_BV, n_read = _decode(model, caches, tokens_B, slot, offset_B, block)
    key = jax.random.fold_in(key, step)
    next_B = _sample(_rows_whole(logits_BV, model.layout, mode), key, temperature, top_k, top_p, mode)
    next_B = jnp.where(done_B, eos_id[0], next_B)
    done_B = done_B | _is_eos(next_B, eos_id)
    return caches, _rows(next_B, model.layout), _rows(done_B, model.layout), logits_BV, n_read


def _rows(x_B, layout):
    """Per-row outputs keep one placement (batch over data) so the next step's inputs never change it."""
    return constrain(x_B, ROWS, layout)


def _rows_whole(logits_BV, layout, mode):
    """Sampling sorts each row: gather the vocab (only over `model`), keep the batch split over `data`."""
    return logits_BV if mode[0] else constrain(logits_BV, ("batch", None), layout)


@functools.partial(jax.jit, static_argnums=(6, 7))
def first_token(logits_BV, key, temperature, top_k, top_p, eos_id, mode, layout):
    """The token sampled from prefill's logits (step 0) and whether it is an eos, per row; jitted."""
    TRACES["first_token"] += 1
    next_B = _sample(
        _rows_whole(logits_BV, layout, mode), jax.random.fold_in(key, 0), temperature, top_k, top_p, mode
    )
    return _rows(next_B, layout), _rows(_is_eos(next_B, eos_id), layout)


def _is_eos(tokens_B, eos_E):
    """Whether each token is one of the eos ids (-1 entries, and an empty set, match nothing)."""
    return jnp.any((tokens_B[:, None] == eos_E[None, :]) & (eos_E[None, :] >= 0), axis=-1)


# ------------------------------------------------------------------------------------------ the API


def _place(x, names, layout):
    """A host array on the mesh as `names` say (a plain device array without a layout)."""
    return jnp.asarray(x) if layout is None else jax.device_put(x, layout.sharding(names))


class _Batch(NamedTuple):
    """A prompt batch checked and laid out on the host, before anything is traced (`_prepare`)."""

    tokens_BS: np.ndarray  # int32, each row right-aligned; rows padded to split evenly over the data axis
    offset_B: np.ndarray  # int32: row b's first token sits at cache slot offset_b
    n_prompt: int  # real prompt tokens, all rows
    B: int  # the caller's rows
    T: int  # cache length
    eos_ids: list[int]


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _prompt(prompt_tokens_BS, prompt_lengths, vocab_size: int):
    """The prompt [B, S] cut to its longest row, and each row's length [B]; one-line ValueErrors."""
    tokens_BS = np.asarray(prompt_tokens_BS)
    if tokens_BS.ndim != 2:
        raise ValueError(
            f"prompt_tokens_BS must be a [batch, seq] array of token ids, got shape {tokens_BS.shape}"
        )
    if tokens_BS.size == 0:
        raise ValueError(f"empty prompt (shape {tokens_BS.shape}): give at least one token per row")
    if not np.issubdtype(tokens_BS.dtype, np.integer):
        raise ValueError(f"prompt tokens must be integers, got dtype {tokens_BS.dtype}")
    B, S = tokens_BS.shape
    length_B = np.full((B,), S, np.int64) if prompt_lengths is None else np.asarray(prompt_lengths)
    if length_B.shape != (B,) or not np.issubdtype(length_B.dtype, np.integer):
        raise ValueError(f"prompt_lengths must be {B} integers (one per row), got {prompt_lengths!r}")
    if length_B.min() < 1:
        raise ValueError(
            f"empty prompt: row {int(length_B.argmin())} has prompt length {int(length_B.min())}; "
            "every row needs at least one token"
        )
    if length_B.max() > S:
        raise ValueError(f"prompt_lengths max {int(length_B.max())} exceeds the prompt width S={S}")
    tokens_BS = tokens_BS[
        :, : int(length_B.max())
    ]  # columns beyond every row's prompt are padding nobody reads
    real_BS = np.arange(tokens_BS.shape[1])[None, :] < length_B[:, None]
    if np.any(real_BS & ((tokens_BS < 0) | (tokens_BS >= vocab_size))):
        raise ValueError(
            f"prompt token ids must lie in [0, {vocab_size}); got values in "
            f"[{int(tokens_BS[real_BS].min())}, {int(tokens_BS[real_BS].max())}]"
        )
    return tokens_BS, length_B


def _right_aligned(tokens_BS, length_B):
    """Every row moved to end at column S, and its offset S - length: all rows then write the same cache
    slot at each decode step."""
    offset_B = tokens_BS.shape[1] - length_B
    aligned_BS = np.zeros(tokens_BS.shape, np.int32)
    for b, (offset, length) in enumerate(zip(offset_B, length_B)):
        aligned_BS[b, offset:] = tokens_BS[b, :length]
    return aligned_BS, offset_B.astype(np.int32)


def _cache_length(S: int, max_new_tokens: int, cache_len, max_seq_len: int) -> int:
    need = S + max_new_tokens
    if need > max_seq_len:
        raise ValueError(
            f"prompt length {S} + max_new_tokens {max_new_tokens} = {need} exceeds the model's "
            f"max_seq_len={max_seq_len}; shorten the prompt or generate fewer tokens"
        )
    T = need if cache_len is None else int(cache_len)
    if not need <= T <= max_seq_len:
        raise ValueError(
            f"cache_len={cache_len} must lie in [prompt length + max_new_tokens = {need}, max_seq_len = {max_seq_len}]"
        )
    return T


def _eos_ids(eos_id, vocab_size: int) -> list[int]:
    eos_ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, numbers.Integral) else list(eos_id)
    if any(
        isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= e < vocab_size for e in eos_ids
    ):
        raise ValueError(f"eos_id must be an id or a list of ids in [0, {vocab_size}), got {eos_id!r}")
    return eos_ids


def _prepare(model, prompt_tokens_BS, max_new_tokens, sampling, eos_id, prompt_lengths, cache_len) -> _Batch:
    """Validate everything on the host, before anything is traced or compiled; lay the batch out."""
    cfg = model.cfg
    check_sampling(*sampling)
    max_new_tokens = _check_positive("max_new_tokens", max_new_tokens)
    tokens_BS, length_B = _prompt(prompt_tokens_BS, prompt_lengths, cfg.vocab_size)
    T = _cache_length(tokens_BS.shape[1], max_new_tokens, cache_len, cfg.max_seq_len)
    eos_ids = _eos_ids(eos_id, cfg.vocab_size)
    aligned_BS, offset_B = _right_aligned(tokens_BS, length_B)
    B = len(aligned_BS)
    pad = -B % (
        1 if model.layout is None else model.layout.split_of("batch")
    )  # copies of row 0, trimmed later
    aligned_BS, offset_B = (np.concatenate([x, np.repeat(x[:1], pad, 0)]) for x in (aligned_BS, offset_B))
    return _Batch(aligned_BS, offset_B, int(length_B.sum()), B, T, eos_ids)


def _cache_settings(model, kv_cache_dtype, kv_block):
    """The cache's storage dtype and the decode loop's block size, checked on the host."""
    return kv_cache.storage_dtype(kv_cache_dtype, _kv_dtype(model)), _check_positive("kv_block", kv_block)


class _Decoder:
    """One generation's fixed inputs (the split model, the sampling mode and its arrays, the rows' offsets)
    and its two compiled calls."""

    def __init__(self, model, batch: _Batch, sampling, seed: int):
        temperature, top_k, top_p = sampling
        self.graphdef, self.state = nnx.split(model)
        self.layout, self.S = model.layout, batch.tokens_BS.shape[1]
        self.mode = _mode(temperature, top_k, top_p)
        self.args = (
            jnp.float32(temperature or 1.0),
            jnp.int32(top_k or 0),
            jnp.float32(top_p or 1.0),
            jnp.asarray(batch.eos_ids or [-1], jnp.int32),
        )
        self.key = jax.random.key(seed)
        self.offset_B = _place(batch.offset_B, ROWS, self.layout)

    def first(self, tokens_BS, T: int, cache_dtype):
        """Prefill and sample token 0: (caches, token [B], done [B], logits [B, V])."""
        caches, logits_BV = prefill(
            self.graphdef,
            self.state,
            _place(tokens_BS, TOKENS, self.layout),
            self.offset_B,
            T,
            cache_dtype=cache_dtype,
        )
        return (caches, *first_token(logits_BV, self.key, *self.args, self.mode, self.layout), logits_BV)

    def step(self, caches, tok_B, done_B, i: int, block: int):
        """Step i: feed token i-1 at cache slot S+i-1, sample token i (decode_step's outputs)."""
        return decode_step(
            self.graphdef,
            self.mode,
            self.state,
            caches,
            tok_B,
            jnp.int32(self.S + i - 1),
            self.offset_B,
            done_B,
            self.key,
            jnp.int32(i),
            *self.args,
            block=block,
        )


def _stacked(steps, B: int, n: int, fill):
    """Per-step device arrays [B', ...] as one host array [B, n, ...] (the caller's rows), an early stop's
    missing steps filled with `fill`."""
    x = np.stack([to_host(s) for s in steps], axis=1)[:B]
    return np.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


def generate(
    model,
    prompt_tokens_BS,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | Sequence[int] | None = None,
    prompt_lengths: Sequence[int] | None = None,
    *,
    cache_len: int | None = None,
    kv_cache_dtype: str | None = None,
    kv_block: int = DECODE_BLOCK,
    return_logits: bool = False,
    stats: dict | None = None,
    on_token=None,
):
    """Generate `max_new_tokens` tokens per row after a right-padded prompt batch.

    Returns an int32 numpy array [B, max_new_tokens] (with `return_logits`, also the float32 logits
    each token was sampled from, [B, max_new_tokens, vocab_size]). See the module docstring for the
    padding, position, EOS and sampling conventions. `cache_len` (default prompt + new tokens, at most
    max_seq_len) fixes the cache length so calls with different lengths share one compiled step.
    `kv_cache_dtype`: None keeps K and V in the compute dtype; "bf16"/"f32" cast them; "int8" stores int8
    values with a bf16 scale per (token, kv head) (jaxtp.kv_cache). `kv_block`: keys per iteration of the
    decode step's attention loop, which reads only the blocks up to the current position.
    `stats`, if given, receives prefill/decode wall times, token counts and `kv_blocks_read` (key blocks
    the decode steps' attention read, summed over steps and layers; for benchmarks).
    `on_token`, if given, is called with each step's tokens (numpy int32 [B]) as soon as they are sampled,
    for streaming; it makes every step wait for its token on the host.
    """
    sampling = (temperature, top_k, top_p)
    batch = _prepare(model, prompt_tokens_BS, max_new_tokens, sampling, eos_id, prompt_lengths, cache_len)
    cache_dtype, block = _cache_settings(model, kv_cache_dtype, kv_block)
    decoder = _Decoder(model, batch, sampling, seed)
    emit = (lambda tok_B: None) if on_token is None else (lambda tok_B: on_token(to_host(tok_B)[: batch.B]))
    t0 = time.perf_counter()
    caches, tok_B, done_B, logits_BV = decoder.first(batch.tokens_BS, batch.T, cache_dtype)
    if stats is not None:
        tok_B.block_until_ready()
    t1 = time.perf_counter()
    emit(tok_B)
    tokens, logits, blocks_read = [tok_B], [logits_BV], []
    for i in range(1, max_new_tokens):
        caches, tok_B, done_B, logits_BV, n_read = decoder.step(caches, tok_B, done_B, i, block)
        emit(tok_B)
        tokens.append(tok_B)
        blocks_read.append(n_read)
        if return_logits:
            logits.append(logits_BV)
        if batch.eos_ids and i % 8 == 0 and bool(jnp.all(done_B)):
            break
    tokens_BN = _stacked(tokens, batch.B, max_new_tokens, batch.eos_ids[0] if batch.eos_ids else 0)
    if stats is not None:
        stats.update(
            prefill_s=t1 - t0,
            decode_s=time.perf_counter() - t1,
            prefill_tokens=batch.n_prompt,
            batch=batch.B,
            decode_steps=len(tokens) - 1,
            decode_tokens=batch.B * (len(tokens) - 1),
            kv_blocks_read=int(sum(int(n) for n in blocks_read)),
        )
    if not return_logits:
        return tokens_BN
    return tokens_BN, _stacked(logits, batch.B, max_new_tokens, np.nan)[:, :, : model.cfg.vocab_size]


def forced_logits(
    model, tokens_BS, prompt_len: int, *, kv_cache_dtype: str | None = None, kv_block: int = DECODE_BLOCK
) -> np.ndarray:
    """Teacher forcing through the cache: the logits that predict tokens prompt_len..S-1 of each row,
    [B, S - prompt_len, vocab_size], from a prefill of the first `prompt_len` tokens and then one decode step
    per token, each fed the true previous token (so the decode path and its cache are what is measured)."""
    tokens_BS = np.asarray(tokens_BS)
    if tokens_BS.ndim != 2 or not 1 <= prompt_len < tokens_BS.shape[1]:
        raise ValueError(
            f"forced_logits needs [batch, seq] tokens and 1 <= prompt_len < seq; got shape "
            f"{tokens_BS.shape}, prompt_len {prompt_len}"
        )
    if tokens_BS.min() < 0 or tokens_BS.max() >= model.cfg.vocab_size:
        raise ValueError(
            f"token ids must lie in [0, {model.cfg.vocab_size}); got values in [{tokens_BS.min()}, {tokens_BS.max()}]"
        )
    greedy = (0.0, None, None)  # the step's sample is discarded; its logits are what is measured
    batch = _prepare(
        model, tokens_BS[:, :prompt_len], tokens_BS.shape[1] - prompt_len, greedy, None, None, None
    )
    cache_dtype, block = _cache_settings(model, kv_cache_dtype, kv_block)
    forced_BS = np.concatenate([tokens_BS, np.repeat(tokens_BS[:1], len(batch.tokens_BS) - batch.B, 0)])
    decoder = _Decoder(model, batch, greedy, seed=0)
    caches, _, done_B, logits_BV = decoder.first(batch.tokens_BS, batch.T, cache_dtype)
    logits = [logits_BV]
    for slot in range(prompt_len, tokens_BS.shape[1] - 1):
        tok_B = _place(forced_BS[:, slot].astype(np.int32), ROWS, model.layout)
        caches, _, done_B, logits_BV, _ = decoder.step(caches, tok_B, done_B, slot - prompt_len + 1, block)
        logits.append(logits_BV)
    return _stacked(logits, batch.B, len(logits), np.nan)[:, :, : model.cfg.vocab_size]


def _nll(logits_BNV, targets_BN) -> float:
    """Mean -log p(target), in float64."""
    x = logits_BNV.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    log_z = m[..., 0] + np.log(np.exp(x - m).sum(axis=-1))
    return float(np.mean(log_z - np.take_along_axis(x, targets_BN[..., None], axis=-1)[..., 0]))


def kv_cache_quality(
    model,
    tokens_BS,
    prompt_len: int,
    new_tokens: int = 64,
    kv_cache_dtype: str = "int8",
    reference: str | None = "bf16",
    kv_block: int = DECODE_BLOCK,
) -> dict:
    """How much a KV cache dtype changes what the model says, against a `reference` cache dtype.

    agreement: greedy generation of `new_tokens` after the first `prompt_len` tokens of each row with either
    cache, the fraction of positions (all rows) holding the same token; one flipped near-tie makes the rest
    of its row differ. step_agreement: the same continuations scored step by step instead, each given the
    reference's history (its greedy tokens teacher-forced through this cache), so a flip costs one step.
    delta_nll: mean -log p of tokens prompt_len..S-1 teacher-forced through prefill + decode steps
    (`forced_logits`), this cache minus the reference: nats per token, i.e. per byte for byte models."""
    tokens = np.asarray(tokens_BS)
    prompt = tokens[:, :prompt_len]
    greedy = {
        d: generate(model, prompt, new_tokens, temperature=0, kv_cache_dtype=d, kv_block=kv_block)
        for d in (reference, kv_cache_dtype)
    }
    followed = forced_logits(
        model,
        np.concatenate([prompt, greedy[reference]], axis=1),
        prompt_len,
        kv_cache_dtype=kv_cache_dtype,
        kv_block=kv_block,
    ).argmax(axis=-1)
    nll = {
        d: _nll(
            forced_logits(model, tokens, prompt_len, kv_cache_dtype=d, kv_block=kv_block),
            tokens[:, prompt_len:],
        )
        for d in (reference, kv_cache_dtype)
    }
    return {
        "agreement": float(np.mean(greedy[reference] == greedy[kv_cache_dtype])),
        "step_agreement": float(np.mean(followed == greedy[reference])),
        "delta_nll": nll[kv_cache_dtype] - nll[reference],
        "nll": nll[kv_cache_dtype],
        "nll_reference": nll[reference],
        "greedy_tokens": int(greedy[reference].size),
        "nll_tokens": int(tokens[:, prompt_len:].size),
    }


# ------------------------------------------------------------------------------- inspection helpers


def _kv_dtype(model):
    x = jnp.zeros((1, 1, model.cfg.d_model), jnp.float32)
    return jax.eval_shape(lambda: layer(model, 0).attn.project_kv(x, jnp.zeros((1, 1), jnp.int32))[0]).dtype


def _sharding(layout):
    """names -> the layout's NamedSharding for them (None without a layout)."""
    return lambda names: None if layout is None else layout.sharding(names)


def _abstract_caches(model, batch: int, cache_len: int, dtype):
    """The caches' ShapeDtypeStructs, placed as prefill places them."""
    cfg, sharding = model.cfg, _sharding(model.layout)
    shape = (batch, cache_len, cfg.n_kv_heads, cfg.head_dim)
    if cfg.scan_layers:
        return (kv_cache.abstract((cfg.n_layers,) + shape, dtype, STACKED_CACHE_AXES, sharding),) * 2
    return [(kv_cache.abstract(shape, dtype, CACHE_AXES, sharding),) * 2] * cfg.n_layers


def decode_step_lowered(
    model,
    batch: int,
    cache_len: int,
    temperature: float = 0.0,
    top_k=None,
    top_p=None,
    kv_cache_dtype: str | None = None,
    kv_block: int = DECODE_BLOCK,
):
    """The decode step lowered for a [batch, cache_len] cache (for HLO checks: collectives, memory)."""
    dtype, block = _cache_settings(model, kv_cache_dtype, kv_block)
    graphdef, state = nnx.split(model)
    rows = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=_sharding(model.layout)(ROWS))
    args = (
        state,
        _abstract_caches(model, batch, cache_len, dtype),
        rows(jnp.int32),
        jnp.int32(1),
        rows(jnp.int32),
        rows(jnp.bool_),
        jax.random.key(0),
        jnp.int32(1),
        jnp.float32(temperature or 1.0),
        jnp.int32(top_k or 0),
        jnp.float32(top_p or 1.0),
        jnp.asarray([-1], jnp.int32),
    )
    return decode_step.lower(graphdef, _mode(temperature, top_k, top_p), *args, block=block)


def cache_bytes_per_device(model, batch: int, cache_len: int, kv_cache_dtype: str | None = None) -> int:
    """Bytes of K and V cache one device holds (all layers; an int8 cache's scales included)."""
    dtype, _ = _cache_settings(model, kv_cache_dtype, DECODE_BLOCK)
    return kv_cache.bytes_per_device(_abstract_caches(model, batch, cache_len, dtype))
