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
  ``data``, kv heads over ``model``, or replicated when the rules resolve kv heads to None).
  ``T = S + max_new_tokens`` (or ``cache_len``); slot t of row b holds position ``t - offset_b``.
  A scanned model (``ModelConfig.scan_layers``) keeps one stacked K and one V ``[L, B, T, K, H]``
  (``"layers"`` first, kept whole) and runs prefill and decode as one ``lax.scan`` over its layers, the
  caches in the scan carry: the decode step writes layer i's new position in place at ``[i, :, slot]``.
  (Indexing layer i of the stacked weights from a Python loop would work too, but re-unrolls the graph the
  scan exists to keep small.)
* **Prefill** runs the whole prompt in one pass and writes slots ``0..S-1``; the **decode step**
  writes slot ``S + i - 1``, attends over the cache (unwritten slots are in the future, so causal
  masking by position hides them), and samples. Its shapes depend only on ``(B, T)``, so it compiles
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

from .model import LAYERS, layer, scan_blocks
from .sharding import constrain

CACHE_AXES = ("batch", "seq", "kv_heads", "head_dim")
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

def _blocks_forward(model, x_BSD, positions_BS, caches, write_kv):
    """Walk the blocks as Block.__call__ does, but attend over K/V that `write_kv` puts in the cache.

    `write_kv(i, caches, k_new, v_new) -> ((k, v) to attend over, k_valid_BT, k_pos_BT, caches, y)`; the
    caches ride in the scan carry (updated in place under donation) and the y's are stacked like scan
    outputs (prefill builds its caches that way). Returns (final hidden, caches, ys)."""
    layout = model.layout

    def step(block, carry, i):
        x_BSD, caches = carry
        h_BSD = block.attn_norm(x_BSD)
        k_new, v_new = block.attn.project_kv(h_BSD, positions_BS)
        kv, k_valid_BT, k_pos_BT, caches, y = write_kv(i, caches, k_new, v_new)
        x_BSD = x_BSD + block.attn(h_BSD, positions_BS, kv=kv, k_pos_BT=k_pos_BT, k_valid_BT=k_valid_BT)
        x_BSD = constrain(x_BSD, RESIDUAL, layout)
        x_BSD = x_BSD + block.mlp(block.mlp_norm(x_BSD))
        return (constrain(x_BSD, RESIDUAL, layout), caches), y

    (x_BSD, caches), ys = scan_blocks(model, step, (x_BSD, caches))
    return model.final_norm(x_BSD), caches, ys


def _key_positions(offset_B, T: int):
    """Slot t of row b holds position t - offset_b; slots before the row's first token are padding."""
    slot_T = jnp.arange(T, dtype=jnp.int32)
    return slot_T[None, :] - offset_B[:, None], slot_T[None, :] >= offset_B[:, None]


def _prefill(graphdef, state, tokens_BS, offset_B, cache_len: int):
    """Run the (left-aligned) prompt once; return the caches and the last logits [B, V].

    Caches: per layer a (k, v) pair of [B, T, K, H] arrays, or for a scanned model one stacked pair
    [L, B, T, K, H] (the scan's outputs)."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    B, S = tokens_BS.shape
    positions_BS, valid_BS = _key_positions(offset_B, S)

    def write_kv(i, caches, k_BSKH, v_BSKH):
        def put(new):
            empty = jnp.zeros((B, cache_len) + new.shape[2:], new.dtype)
            return constrain(jax.lax.dynamic_update_slice(empty, new, (0, 0, 0, 0)), CACHE_AXES, model.layout)
        # Within the prompt, attend over the fresh keys only (S, not T): the same numbers, less work.
        return (k_BSKH, v_BSKH), valid_BS, positions_BS, caches, (put(k_BSKH), put(v_BSKH))

    x_BSD, _, caches = _blocks_forward(model, model.embed(tokens_BS), positions_BS, None, write_kv)
    if model.cfg.scan_layers:
        caches = tuple(constrain(c_LBTKH, STACKED_CACHE_AXES, model.layout) for c_LBTKH in caches)
    return caches, constrain(model.logits(x_BSD[:, -1:])[:, 0], LOGITS_BV, model.layout)


def _cache_len(caches) -> int:
    return caches[0][0].shape[1] if isinstance(caches, list) else caches[0].shape[2]


def _write_slot(caches, i, new_kv, slot, layout):
    """Write one position of layer i's K and V at `slot` (the same in every row: a slice update on an
    unsharded axis); return the caches and layer i's (k, v). A scanned model's stacked caches are updated
    at [i, :, slot] (i traced), so only the new position is written, in place."""
    if isinstance(caches, list):
        kv = tuple(constrain(jax.lax.dynamic_update_slice(c_BTKH, new_B1KH.astype(c_BTKH.dtype), (0, slot, 0, 0)),
                             CACHE_AXES, layout) for c_BTKH, new_B1KH in zip(caches[i], new_kv))
        return caches[:i] + [kv] + caches[i + 1:], kv
    caches = tuple(constrain(jax.lax.dynamic_update_slice(c_LBTKH, new_B1KH[None].astype(c_LBTKH.dtype),
                                                          (i, 0, slot, 0, 0)), STACKED_CACHE_AXES, layout)
                   for c_LBTKH, new_B1KH in zip(caches, new_kv))
    return caches, tuple(constrain(c_LBTKH[i], CACHE_AXES, layout) for c_LBTKH in caches)


def _decode(model, caches, tokens_B, slot, offset_B):
    """One token per row, all written at cache slot `slot` (row b's position slot - offset_b); return logits."""
    k_pos_BT, k_valid_BT = _key_positions(offset_B, _cache_len(caches))
    positions_B1 = (slot - offset_B)[:, None]

    def write_kv(i, caches, k_B1KH, v_B1KH):
        caches, kv = _write_slot(caches, i, (k_B1KH, v_B1KH), slot, model.layout)
        return kv, k_valid_BT, k_pos_BT, caches, None

    x_BSD, caches, _ = _blocks_forward(model, model.embed(tokens_B[:, None]), positions_B1, caches, write_kv)
    return caches, constrain(model.logits(x_BSD)[:, 0], LOGITS_BV, model.layout)


def _decode_step(graphdef, mode, state, caches, tokens_B, slot, offset_B, done_B, key, step, temperature, top_k,
                 top_p, eos_id):
    """Feed `tokens_B` at cache slot `slot`; sample the next token; rows already done emit eos_id."""
    TRACES["decode_step"] += 1
    model = nnx.merge(graphdef, state)
    caches, logits_BV = _decode(model, caches, tokens_B, slot, offset_B)
    key = jax.random.fold_in(key, step)
    next_B = _sample(_rows_whole(logits_BV, model.layout, mode), key, temperature, top_k, top_p, mode)
    next_B = jnp.where(done_B, eos_id[0], next_B)
    done_B = done_B | _is_eos(next_B, eos_id)
    return caches, _rows(next_B, model.layout), _rows(done_B, model.layout), logits_BV


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


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 4))
_decode_step_jit = jax.jit(_decode_step, static_argnums=(0, 1), donate_argnums=(3,))  # donates the cache
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


def generate(model, prompt_tokens_BS, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_id: int | Sequence[int] | None = None,
             prompt_lengths: Sequence[int] | None = None, *, cache_len: int | None = None,
             return_logits: bool = False, stats: dict | None = None, on_token=None):
    """Generate `max_new_tokens` tokens per row after a right-padded prompt batch.

    Returns an int32 numpy array [B, max_new_tokens] (with `return_logits`, also the float32 logits
    each token was sampled from, [B, max_new_tokens, vocab_size]). See the module docstring for the
    padding, position, EOS and sampling conventions. `cache_len` (default prompt + new tokens, at most
    max_seq_len) fixes the cache length so calls with different lengths share one compiled step.
    `stats`, if given, receives prefill/decode wall times and token counts (for benchmarks).
    `on_token`, if given, is called with each step's tokens (numpy int32 [B]) as soon as they are sampled,
    for streaming; it makes every step wait for its token on the host.
    """
    tokens, offsets, n_prompt, B, T, eos_ids = _prepare(model, prompt_tokens_BS, max_new_tokens, temperature, top_k, top_p,
                                               eos_id, prompt_lengths, cache_len)
    layout = model.layout
    graphdef, state = nnx.split(model)
    mode = _mode(temperature, top_k, top_p)
    sampling = (jnp.float32(temperature or 1.0), jnp.int32(top_k or 0), jnp.float32(top_p or 1.0))
    eos = jnp.asarray(eos_ids or [-1], jnp.int32)
    key = jax.random.key(seed)
    tokens_BS, offset_B = _place(tokens, TOKENS, layout), _place(offsets, ROWS, layout)

    t0 = time.perf_counter()
    caches, logits_BV = _prefill_jit(graphdef, state, tokens_BS, offset_B, T)
    tok_B, done_B = _first_token_jit(logits_BV, key, *sampling, eos, mode, layout)
    if stats is not None:
        tok_B.block_until_ready()
    t1 = time.perf_counter()
    if on_token is not None:
        on_token(_to_host(tok_B)[:B])
    out, logits, S = [tok_B], [logits_BV], tokens.shape[1]
    for i in range(1, max_new_tokens):  # step i feeds token i-1 at cache slot S+i-1 and samples token i
        caches, tok_B, done_B, logits_BV = _decode_step_jit(
            graphdef, mode, state, caches, tok_B, jnp.int32(S + i - 1), offset_B, done_B, key, jnp.int32(i),
            *sampling, eos)
        out.append(tok_B)
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
                     batch=B, decode_steps=len(out) - 1, decode_tokens=B * (len(out) - 1))
    if not return_logits:
        return result
    all_logits = np.stack([_to_host(t) for t in logits], axis=1)[:B, :, :model.cfg.vocab_size]
    if all_logits.shape[1] < max_new_tokens:
        all_logits = np.pad(all_logits, ((0, 0), (0, max_new_tokens - all_logits.shape[1]), (0, 0)),
                            constant_values=np.nan)
    return result, all_logits


# ------------------------------------------------------------------------------- inspection helpers

def _kv_dtype(model):
    x = jnp.zeros((1, 1, model.cfg.d_model), jnp.float32)
    return jax.eval_shape(lambda: layer(model, 0).attn.project_kv(x, jnp.zeros((1, 1), jnp.int32))[0]).dtype


def decode_step_lowered(model, batch: int, cache_len: int, temperature: float = 0.0, top_k=None, top_p=None):
    """The decode step lowered for a [batch, cache_len] cache (for HLO checks: collectives, memory)."""
    cfg, layout = model.cfg, model.layout
    graphdef, state = nnx.split(model)
    sharding = lambda names: None if layout is None else layout.sharding(names)
    shape, dtype = (batch, cache_len, cfg.n_kv_heads, cfg.head_dim), _kv_dtype(model)
    if cfg.scan_layers:
        kv = jax.ShapeDtypeStruct((cfg.n_layers,) + shape, dtype, sharding=sharding(STACKED_CACHE_AXES))
        caches = (kv, kv)
    else:
        caches = [(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding(CACHE_AXES)),) * 2] * cfg.n_layers
    rows = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=sharding(ROWS))
    args = (state, caches, rows(jnp.int32), jnp.int32(1), rows(jnp.int32), rows(jnp.bool_),
            jax.random.key(0), jnp.int32(1), jnp.float32(temperature or 1.0), jnp.int32(top_k or 0),
            jnp.float32(top_p or 1.0), jnp.asarray([-1], jnp.int32))
    return _decode_step_jit.lower(graphdef, _mode(temperature, top_k, top_p), *args)


def cache_bytes_per_device(model, batch: int, cache_len: int) -> int:
    """Bytes of K and V cache one device holds (all layers)."""
    cfg = model.cfg
    shape = (batch, cache_len, cfg.n_kv_heads, cfg.head_dim)
    local = shape if model.layout is None else model.layout.sharding(CACHE_AXES).shard_shape(shape)
    return 2 * cfg.n_layers * math.prod(local) * jnp.dtype(_kv_dtype(model)).itemsize
