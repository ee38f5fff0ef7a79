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

Note: ``jaxtp.generate`` is this module's function (``from jaxtp.generate import ...`` reaches
the module's other names).
"""

from __future__ import annotations

import collections
import math
import numbers
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import kv_cache, layers
from .kv_cache import CACHE_AXES, DECODE_BLOCK
from .model import LAYERS, layer, scan_blocks
from .sharding import constrain

STACKED_CACHE_AXES = (LAYERS,) + CACHE_AXES  # a scanned model's caches: one [L, B, T, K, H] array each
RESIDUAL = ("batch", "seq", "act_embed")  # the residual stream, its positions whole (decode: 1)
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
    return _filter_jit(jnp.asarray(logits_BV, jnp.float32), jnp.int32(top_k or 0), jnp.float32(top_p or 1.0),
                       (top_k is not None, top_p is not None))


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


def sample_logits(logits_BV, key, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None):
    """Sample one token id per row from `logits_BV` [B, V] (temperature, then top-k, then top-p)."""
    check_sampling(temperature, top_k, top_p)
    return _sample_jit(jnp.asarray(logits_BV), key, jnp.float32(temperature or 1.0), jnp.int32(top_k or 0),
                       jnp.float32(top_p or 1.0), _mode(temperature, top_k, top_p))


_sample_jit = jax.jit(_sample, static_argnums=(5,))


def check_sampling(temperature, top_k, top_p):
    """Raise a one-line ValueError for sampling settings generate would refuse (callers check before loading)."""
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature)
            or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None to disable), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {top_p!r}")


# ------------------------------------------------------------------------------------ cached forward

def _blocks_forward(model, x_BSD, caches, attend):
    """Walk the blocks as Block.__call__ does, with `attend(i, attn, h_BSD, caches) -> (out_BSD, caches, y)`
    in place of self-attention: it reads and writes the caches. The caches ride in the scan carry (updated
    in place under donation) and the y's are stacked like scan outputs (prefill builds its caches that way).
    Returns (final hidden, caches, ys)."""
    layout = model.layout

    def step(block, carry, i):
        x_BSD, caches = carry
        out_BSD, caches, y = attend(i, block.attn, block.attn_norm(x_BSD), caches)
        x_BSD = constrain(x_BSD + out_BSD, RESIDUAL, layout)
        x_BSD = x_BSD + block.mlp(block.mlp_norm(x_BSD))
        return (constrain(x_BSD, RESIDUAL, layout), caches), y

    (x_BSD, caches), ys = scan_blocks(model, step, (x_BSD, caches))
    return model.final_norm(x_BSD), caches, ys


def _key_positions(offset_B, T: int):
    """Slot t of row b holds position t - offset_b; slots before the row's first token are padding."""
    slot_T = jnp.arange(T, dtype=jnp.int32)
    return slot_T[None, :] - offset_B[:, None], slot_T[None, :] >= offset_B[:, None]


def _prefill(graphdef, state, tokens_BS, offset_B, cache_len: int, cache_dtype=None):
    """Run the (left-aligned) prompt once; return the caches and the last logits [B, V].

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
        return out_BSD, caches, (put(k_BSKH), put(v_BSKH))

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
        kv = tuple(kv_cache.constrain_entry(kv_cache.write(c, new_B1KH, (), slot), CACHE_AXES, layout)
                   for c, new_B1KH in zip(caches[i], new_kv))
        return caches[:i] + [kv] + caches[i + 1:], kv, ()
    caches = tuple(kv_cache.constrain_entry(kv_cache.write(c, new_B1KH, (i,), slot), STACKED_CACHE_AXES, layout)
                   for c, new_B1KH in zip(caches, new_kv))
    return caches, caches, (i,)


def _decode_attention(attn, h_B1D, positions_B1, kv, lead, slot, offset_B, block: int):
    """Attention.__call__ for one new position over the cache's filled prefix (kv_cache.decode_attention in
    place of attend, the same constraints): returns ([B, 1, D], key blocks read)."""
    h_B1D = constrain(h_B1D, layers.BLOCK_IN, attn.layout)
    q_B1NH = attn.project_q(h_B1D, positions_B1)
    out_B1NH, n_read = kv_cache.decode_attention(q_B1NH, *kv, slot, offset_B, lead, block)
    out_B1NH = constrain(out_B1NH, layers.HEADS, attn.layout)
    return constrain(attn.o(out_B1NH), layers.RESIDUAL, attn.layout), n_read


def _decode(model, caches, tokens_B, slot, offset_B, block: int = DECODE_BLOCK):
    """One token per row, all written at cache slot `slot` (row b's position slot - offset_b); return the
    caches, the logits and how many key blocks the layers read."""
    positions_B1 = (slot - offset_B)[:, None]

    def attend(i, attn, h_B1D, caches):
        caches, kv, lead = _write_slot(caches, i, attn.project_kv(h_B1D, positions_B1), slot, model.layout)
        out_B1D, n_read = _decode_attention(attn, h_B1D, positions_B1, kv, lead, slot, offset_B, block)
        return out_B1D, caches, n_read

    x_BSD, caches, n_read = _blocks_forward(model, model.embed(tokens_B[:, None]), caches, attend)
    n_read = sum(n_read) if isinstance(n_read, list) else jnp.sum(n_read)
    return caches, constrain(model.logits(x_BSD)[:, 0], LOGITS_BV, model.layout), n_read


def _decode_step(graphdef, mode, state, caches, tokens_B, slot, offset_B, done_B, key, step, temperature, top_k,
                 top_p, eos_id, block: int = DECODE_BLOCK):
    """Feed `tokens_B` at cache slot `slot`; sample the next token; rows already done emit eos_id. Also
    returns the logits and the key blocks the step's attention read (all layers)."""
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


def _first_token(logits_BV, key, temperature, top_k, top_p, eos_id, mode, layout):
    TRACES["first_token"] += 1
    next_B = _sample(_rows_whole(logits_BV, layout, mode), jax.random.fold_in(key, 0), temperature, top_k, top_p,
                     mode)
    return _rows(next_B, layout), _rows(_is_eos(next_B, eos_id), layout)


def _is_eos(tokens_B, eos_E):
    """Whether each token is one of the eos ids (-1 entries, and an empty set, match nothing)."""
    return jnp.any((tokens_B[:, None] == eos_E[None, :]) & (eos_E[None, :] >= 0), axis=-1)


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 4), static_argnames=("cache_dtype",))
_decode_step_jit = jax.jit(_decode_step, static_argnums=(0, 1), static_argnames=("block",),
                           donate_argnums=(3,))  # donates the cache
_first_token_jit = jax.jit(_first_token, static_argnums=(6, 7))


# ------------------------------------------------------------------------------------------ the API

def _data_split(layout) -> int:
    if layout is None:
        return 1
    target = layout.rules.get("batch")
    axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    return math.prod(dict(layout.mesh.shape).get(a, 1) for a in axes)


def _to_host(x) -> np.ndarray:
    """A global array as numpy; across processes, gather it (every process gets the whole array)."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _place(x, names, layout):
    return jnp.asarray(x) if layout is None else jax.device_put(x, layout.sharding(names))


def _prepare(model, prompt_tokens_BS, max_new_tokens, temperature, top_k, top_p, eos_id, prompt_lengths,
             cache_len):
    """Validate everything on the host, before anything is traced or compiled."""
    cfg = model.cfg
    check_sampling(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    tokens = np.asarray(prompt_tokens_BS)
    if tokens.ndim != 2:
        raise ValueError(f"prompt_tokens_BS must be a [batch, seq] array of token ids, got shape {tokens.shape}")
    if tokens.size == 0:
        raise ValueError(f"empty prompt (shape {tokens.shape}): give at least one token per row")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"prompt tokens must be integers, got dtype {tokens.dtype}")
    B, S = tokens.shape
    lengths = np.full((B,), S, np.int64) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"prompt_lengths must be {B} integers (one per row), got {prompt_lengths!r}")
    if lengths.min() < 1:
        raise ValueError(f"empty prompt: row {int(lengths.argmin())} has prompt length {int(lengths.min())}; "
                         "every row needs at least one token")
    if lengths.max() > S:
        raise ValueError(f"prompt_lengths max {int(lengths.max())} exceeds the prompt width S={S}")
    S = int(lengths.max())  # columns beyond every row's prompt are padding nobody reads
    tokens = tokens[:, :S]
    real = np.arange(S)[None, :] < lengths[:, None]
    if np.any(real & ((tokens < 0) | (tokens >= cfg.vocab_size))):
        raise ValueError(f"prompt token ids must lie in [0, {cfg.vocab_size}); got values in "
                         f"[{int(tokens[real].min())}, {int(tokens[real].max())}]")
    offsets = S - lengths  # right-align every prompt: all rows then write the same cache slot each step
    aligned = np.zeros((B, S), np.int32)
    for b in range(B):
        aligned[b, offsets[b]:] = tokens[b, :lengths[b]]
    need = S + int(max_new_tokens)
    if need > cfg.max_seq_len:
        raise ValueError(f"prompt length {S} + max_new_tokens {max_new_tokens} = {need} exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}; shorten the prompt or generate fewer tokens")
    T = need if cache_len is None else int(cache_len)
    if not need <= T <= cfg.max_seq_len:
        raise ValueError(f"cache_len={cache_len} must lie in [prompt length + max_new_tokens = {need}, "
                         f"max_seq_len = {cfg.max_seq_len}]")
    eos_ids = [] if eos_id is None else [eos_id] if isinstance(eos_id, numbers.Integral) else list(eos_id)
    if any(isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= e < cfg.vocab_size for e in eos_ids):
        raise ValueError(f"eos_id must be an id or a list of ids in [0, {cfg.vocab_size}), got {eos_id!r}")
    pad = -B % _data_split(model.layout)  # batch must split evenly over the data axis
    if pad:
        aligned = np.concatenate([aligned, np.repeat(aligned[:1], pad, 0)])
        offsets = np.concatenate([offsets, np.repeat(offsets[:1], pad)])
    return aligned, offsets.astype(np.int32), int(lengths.sum()), B, T, eos_ids


def _cache_settings(model, kv_cache_dtype, kv_block):
    """The cache's storage dtype and the decode loop's block size, checked on the host."""
    if isinstance(kv_block, bool) or not isinstance(kv_block, numbers.Integral) or kv_block < 1:
        raise ValueError(f"kv_block must be an integer >= 1, got {kv_block!r}")
    return kv_cache.storage_dtype(kv_cache_dtype, _kv_dtype(model)), int(kv_block)


def generate(model, prompt_tokens_BS, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_id: int | Sequence[int] | None = None,
             prompt_lengths: Sequence[int] | None = None, *, cache_len: int | None = None,
             kv_cache_dtype: str | None = None, kv_block: int = DECODE_BLOCK,
             return_logits: bool = False, stats: dict | None = None, on_token=None):
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
    tokens, offsets, n_prompt, B, T, eos_ids = _prepare(model, prompt_tokens_BS, max_new_tokens, temperature, top_k, top_p,
                                               eos_id, prompt_lengths, cache_len)
    cache_dtype, block = _cache_settings(model, kv_cache_dtype, kv_block)
    layout = model.layout
    graphdef, state = nnx.split(model)
    mode = _mode(temperature, top_k, top_p)
    sampling = (jnp.float32(temperature or 1.0), jnp.int32(top_k or 0), jnp.float32(top_p or 1.0))
    eos = jnp.asarray(eos_ids or [-1], jnp.int32)
    key = jax.random.key(seed)
    tokens_BS, offset_B = _place(tokens, TOKENS, layout), _place(offsets, ROWS, layout)

    t0 = time.perf_counter()
    caches, logits_BV = _prefill_jit(graphdef, state, tokens_BS, offset_B, T, cache_dtype=cache_dtype)
    tok_B, done_B = _first_token_jit(logits_BV, key, *sampling, eos, mode, layout)
    if stats is not None:
        tok_B.block_until_ready()
    t1 = time.perf_counter()
    if on_token is not None:
        on_token(_to_host(tok_B)[:B])
    out, logits, blocks_read, S = [tok_B], [logits_BV], [], tokens.shape[1]
    for i in range(1, max_new_tokens):  # step i feeds token i-1 at cache slot S+i-1 and samples token i
        caches, tok_B, done_B, logits_BV, n_read = _decode_step_jit(
            graphdef, mode, state, caches, tok_B, jnp.int32(S + i - 1), offset_B, done_B, key, jnp.int32(i),
            *sampling, eos, block=block)
        out.append(tok_B)
        blocks_read.append(n_read)
        if on_token is not None:
            on_token(_to_host(tok_B)[:B])
        if return_logits:
            logits.append(logits_BV)
        if eos_ids and i % 8 == 0 and bool(jnp.all(done_B)):
            break
    result = np.stack([_to_host(t) for t in out], axis=1)[:B]
    t2 = time.perf_counter()
    if result.shape[1] < max_new_tokens:
        result = np.pad(result, ((0, 0), (0, max_new_tokens - result.shape[1])), constant_values=eos_ids[0])
    if stats is not None:
        stats.update(prefill_s=t1 - t0, decode_s=t2 - t1, prefill_tokens=n_prompt,
                     batch=B, decode_steps=len(out) - 1, decode_tokens=B * (len(out) - 1),
                     kv_blocks_read=int(sum(int(n) for n in blocks_read)))
    if not return_logits:
        return result
    all_logits = np.stack([_to_host(t) for t in logits], axis=1)[:B, :, :model.cfg.vocab_size]
    if all_logits.shape[1] < max_new_tokens:
        all_logits = np.pad(all_logits, ((0, 0), (0, max_new_tokens - all_logits.shape[1]), (0, 0)),
                            constant_values=np.nan)
    return result, all_logits


def forced_logits(model, tokens_BS, prompt_len: int, *, kv_cache_dtype: str | None = None,
                  kv_block: int = DECODE_BLOCK) -> np.ndarray:
    """Teacher forcing through the cache: the logits that predict tokens prompt_len..S-1 of each row,
    [B, S - prompt_len, vocab_size], from a prefill of the first `prompt_len` tokens and then one decode step
    per token, each fed the true previous token (so the decode path and its cache are what is measured)."""
    tokens = np.asarray(tokens_BS)
    if tokens.ndim != 2 or not 1 <= prompt_len < tokens.shape[1]:
        raise ValueError(f"forced_logits needs [batch, seq] tokens and 1 <= prompt_len < seq; got shape "
                         f"{tokens.shape}, prompt_len {prompt_len}")
    if tokens.min() < 0 or tokens.max() >= model.cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {model.cfg.vocab_size}); got values in "
                         f"[{tokens.min()}, {tokens.max()}]")
    aligned, offsets, _, B, T, _ = _prepare(model, tokens[:, :prompt_len], tokens.shape[1] - prompt_len, 0.0, None,
                                            None, None, None, None)
    cache_dtype, block = _cache_settings(model, kv_cache_dtype, kv_block)
    forced = np.concatenate([tokens, np.repeat(tokens[:1], len(aligned) - B, 0)]).astype(np.int32)
    layout, (graphdef, state) = model.layout, nnx.split(model)
    offset_B, done_B = _place(offsets, ROWS, layout), _place(np.zeros(len(aligned), bool), ROWS, layout)
    caches, logits_BV = _prefill_jit(graphdef, state, _place(aligned, TOKENS, layout), offset_B, T,
                                     cache_dtype=cache_dtype)
    # key, step, temperature, top_k, top_p, eos ids: unused by a greedy step whose sample is discarded
    fixed = (jax.random.key(0), jnp.int32(0), jnp.float32(1), jnp.int32(0), jnp.float32(1),
             jnp.asarray([-1], jnp.int32))
    logits = [logits_BV]
    for slot in range(prompt_len, tokens.shape[1] - 1):
        caches, _, _, logits_BV, _ = _decode_step_jit(
            graphdef, _mode(0, None, None), state, caches, _place(forced[:, slot], ROWS, layout), jnp.int32(slot),
            offset_B, done_B, *fixed, block=block)
        logits.append(logits_BV)
    return np.stack([_to_host(x) for x in logits], axis=1)[:B, :, :model.cfg.vocab_size]


def _nll(logits_BNV, targets_BN) -> float:
    """Mean -log p(target), in float64."""
    x = logits_BNV.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    log_z = m[..., 0] + np.log(np.exp(x - m).sum(axis=-1))
    return float(np.mean(log_z - np.take_along_axis(x, targets_BN[..., None], axis=-1)[..., 0]))


def kv_cache_quality(model, tokens_BS, prompt_len: int, new_tokens: int = 64, kv_cache_dtype: str = "int8",
                     reference: str | None = "bf16", kv_block: int = DECODE_BLOCK) -> dict:
    """How much a KV cache dtype changes what the model says, against a `reference` cache dtype.

    agreement: greedy generation of `new_tokens` after the first `prompt_len` tokens of each row with either
    cache, the fraction of positions (all rows) holding the same token; one flipped near-tie makes the rest
    of its row differ. step_agreement: the same continuations scored step by step instead, each given the
    reference's history (its greedy tokens teacher-forced through this cache), so a flip costs one step.
    delta_nll: mean -log p of tokens prompt_len..S-1 teacher-forced through prefill + decode steps
    (`forced_logits`), this cache minus the reference: nats per token, i.e. per byte for byte models."""
    tokens = np.asarray(tokens_BS)
    prompt = tokens[:, :prompt_len]
    greedy = {d: generate(model, prompt, new_tokens, temperature=0, kv_cache_dtype=d, kv_block=kv_block)
              for d in (reference, kv_cache_dtype)}
    followed = forced_logits(model, np.concatenate([prompt, greedy[reference]], axis=1), prompt_len,
                             kv_cache_dtype=kv_cache_dtype, kv_block=kv_block).argmax(axis=-1)
    nll = {d: _nll(forced_logits(model, tokens, prompt_len, kv_cache_dtype=d, kv_block=kv_block),
                   tokens[:, prompt_len:]) for d in (reference, kv_cache_dtype)}
    return {"agreement": float(np.mean(greedy[reference] == greedy[kv_cache_dtype])),
            "step_agreement": float(np.mean(followed == greedy[reference])),
            "delta_nll": nll[kv_cache_dtype] - nll[reference], "nll": nll[kv_cache_dtype],
            "nll_reference": nll[reference], "greedy_tokens": int(greedy[reference].size),
            "nll_tokens": int(tokens[:, prompt_len:].size)}


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


def decode_step_lowered(model, batch: int, cache_len: int, temperature: float = 0.0, top_k=None, top_p=None,
                        kv_cache_dtype: str | None = None, kv_block: int = DECODE_BLOCK):
    """The decode step lowered for a [batch, cache_len] cache (for HLO checks: collectives, memory)."""
    dtype, block = _cache_settings(model, kv_cache_dtype, kv_block)
    graphdef, state = nnx.split(model)
    rows = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=_sharding(model.layout)(ROWS))
    args = (state, _abstract_caches(model, batch, cache_len, dtype), rows(jnp.int32), jnp.int32(1), rows(jnp.int32),
            rows(jnp.bool_), jax.random.key(0), jnp.int32(1), jnp.float32(temperature or 1.0), jnp.int32(top_k or 0),
            jnp.float32(top_p or 1.0), jnp.asarray([-1], jnp.int32))
    return _decode_step_jit.lower(graphdef, _mode(temperature, top_k, top_p), *args, block=block)


def cache_bytes_per_device(model, batch: int, cache_len: int, kv_cache_dtype: str | None = None) -> int:
    """Bytes of K and V cache one device holds (all layers; an int8 cache's scales included)."""
    dtype, _ = _cache_settings(model, kv_cache_dtype, DECODE_BLOCK)
    return kv_cache.bytes_per_device(_abstract_caches(model, batch, cache_len, dtype))
