"""Bytes per device: parameters, optimizer state, saved activations, logits, the backward's working set, the
KV cache. Activations are counted tensor by tensor as XLA keeps them for jaxtp's blocks (read off the
compiled train step's buffers on XLA:CPU and held to `compiled.memory_analysis()` by tests/test_plan.py);
docs/planner.md section 5 gives the formulas and why.
"""

from __future__ import annotations

from .. import kv_cache
from ..config import ModelConfig, to_dtype
from .dims import Dims

__all__ = [
    "train_memory",
    "decode_memory",
    "activation_bytes",
    "activation_bytes_per_token_layer",
    "attention_bytes_per_token_layer",
    "backward_working_set",
    "kv_cache_bytes",
]


def train_memory(cfg: ModelConfig, d: Dims, remat, optimizer_bytes: int) -> dict:
    """Training total = params + optimizer state + token batch (the step's arguments; the new params and
    state are written in place, donated) + the temporary heap at its peak: the larger of the backward
    (saved activations + the working set at the backward's peak) and the optimizer update (all gradients
    + one parameter-sized temporary). That is XLA's memory_analysis() arguments + outputs - aliased + temp."""
    full_remat = remat in ("full", True)
    act = activation_bytes(cfg, d, full_remat)
    logits = d.tokens_local * d.vocab_local * 4  # f32, vocab-parallel, kept for the loss's backward
    working = backward_working_set(cfg, d, logits)
    # FSDP: the gradients accumulate in their gathered shapes (head first) and each layer's weights are
    # gathered while it is differentiated. Plus the stacked q/k/v kernels each layer's backward reads
    # (one layer's under remat).
    backward_peak = (
        act
        + working
        + d.params.head.local_bytes * d.zero_split(d.params.head)
        + d.zero_layer_bytes
        + (1 if full_remat else cfg.L) * d.qkv_stacked_bytes
    )
    # Update: all gradients live plus one parameter-sized temporary (XLA:CPU writes the clipped gradient
    # before the fused Adam update). FSDP without a reduce-scatter (XLA:CPU): the gradients are
    # all-reduced whole, in their gathered shapes, so the update holds that reduction's input and output.
    grads = d.param_bytes if d.reduce_scatter else d.grad_bytes
    update_peak = 2 * grads
    inputs = d.batch_local * (d.seq_len + 1) * 4
    temp = max(int(backward_peak), update_peak)
    return {
        "params": d.param_bytes,
        "grads": grads,
        "optimizer": optimizer_bytes,
        "activations": act,
        "logits": logits,
        "backward_transient": working - logits,
        "inputs": inputs,
        "temp": temp,
        "total": d.param_bytes + optimizer_bytes + inputs + temp,
        "peak_phase": "backward" if backward_peak >= update_peak else "optimizer update",
    }


def activation_bytes(cfg: ModelConfig, d: Dims, full_remat: bool) -> float:
    """What the backward keeps from the forward: every layer's activations (remat: the block inputs, and
    one block's activations while it is recomputed), and outside the blocks the embedding output (gathered
    rows and the masked partial) and the final RMSNorm (f32 and scaled). SP: the stream and the norm's f32
    input hold S/n positions."""
    per_layer = activation_bytes_per_token_layer(cfg, d)
    layers = cfg.L * cfg.D * d.compute_itemsize + per_layer if full_remat else cfg.L * per_layer
    sp = d.tp_size if d.seq_parallel else 1
    outside = cfg.D * d.param_itemsize * (1 + 1 / sp) + cfg.D * (4 / sp + d.compute_itemsize)
    return d.tokens_local * (layers + outside)


def activation_bytes_per_token_layer(cfg: ModelConfig, d: Dims) -> int:
    """Bytes per token per layer that the backward keeps (docs/planner.md section 5 asks for the tensors
    actually saved rather than Korthikanti's 34 s*b*h):
      2 RMSNorms: normalised x in f32 and its scaled output      2*D*(4 + c)
      residual stream after attention and after the MLP          2*D*c
      attention (attention_bytes_per_token_layer)
      SwiGLU: gate, up, sigmoid(gate), silu(gate), silu*up       5*F_l*c
    With sequence parallelism the norms' f32 inputs and the residual stream hold S/n positions; the
    scaled norm outputs are kept as gathered (the matmuls' saved inputs)."""
    sp, c = (d.tp_size if d.seq_parallel else 1), d.compute_itemsize
    return (
        2 * cfg.D * 4 // sp
        + 2 * cfg.D * c
        + 2 * cfg.D * c // sp
        + attention_bytes_per_token_layer(cfg, d)
        + 5 * d.d_ff_local * c
    )


def attention_bytes_per_token_layer(cfg: ModelConfig, d: Dims) -> int:
    """What attention keeps per token per layer, by implementation (N_l heads, X_l kv heads projected):
    xla        q, k and v (counted at N heads), output; scores/sqrt(H) and probabilities in f32
                                                                 4*N_l*H*c + 2*N_l*S*4
    blockwise  the custom VJP's residuals q, k, v, output and per-row f32 logsumexp; the output again
               as the output projection reads it; and, measured on XLA:CPU, the f32 dq, dk, dv its
               backward loop starts from, which XLA materialises for every layer at the start of
               the backward; a second f32 per-row vector           N_l*H*(3c + 4) + X_l*H*(2c + 8) + 8*N_l
    cudnn      q, k, v, the output and the f32 softmax statistics, once (not compiler-checked here)
                                                                 2*(N_l + X_l)*H*c + 4*N_l"""
    N_l, X_l, H, c = d.heads_local, d.kv_heads_projected, cfg.H, d.compute_itemsize
    if d.attention == "blockwise":
        return N_l * H * (3 * c + 4) + X_l * H * (2 * c + 2 * 4) + 2 * N_l * 4
    if d.attention == "cudnn":
        return 2 * (N_l + X_l) * H * c + 4 * N_l
    return 4 * N_l * H * c + 2 * N_l * d.seq_len * 4


def backward_working_set(cfg: ModelConfig, d: Dims, logits: int) -> int:
    """Bytes live at the backward's peak beyond the saved activations (logits included).
    xla: the logits, plus the larger of their gradient and the working set of the layer being
    differentiated: dgate/dup [T, F_l] and the score-sized gradients (dprobs, dscores, ...).
    blockwise / cudnn (measured on XLA:CPU for blockwise): the largest of the logits with their gradient
    (at the start of the backward), one [T, F_l] MLP gradient, and attention's backward: dq, dk, dv as the
    loop returns them plus one [B, K, G, block, block] f32 tile (blockwise; cuDNN keeps its tiles on chip)."""
    T_l, F_l, c = d.tokens_local, d.d_ff_local, d.compute_itemsize
    if d.attention == "xla":
        return logits + max(T_l * (2 * F_l * c + 4 * d.heads_local * d.seq_len * 4), logits)
    tile = d.batch_local * d.heads_local * d.attention_block**2 * 4 if d.attention == "blockwise" else 0
    attention = T_l * (d.heads_local + 2 * d.kv_heads_projected) * cfg.H * c + tile
    return max(2 * logits, T_l * F_l * c, attention)


def decode_memory(cfg: ModelConfig, d: Dims, kv_cache_dtype) -> dict:
    """One decode step: parameters, the KV cache, one layer's working set and the last logits. The working
    set: norms in f32, the SwiGLU hidden, and kv_cache.decode_attention's loop body - one block of keys
    and values read out of the cache in the compute dtype (an int8 block dequantized) and its f32 scores."""
    c, keys = d.compute_itemsize, min(d.seq_len, kv_cache.DECODE_BLOCK)
    attention = 2 * keys * d.kv_heads_local * cfg.H * c + d.heads_local * keys * 4
    act = d.batch_local * (4 * cfg.D * 4 + attention + 3 * d.d_ff_local * c)
    kv = kv_cache_bytes(cfg, d, kv_cache_dtype)
    logits = d.batch_local * d.vocab_local * 4
    inputs = d.batch_local * 4
    return {
        "params": d.param_bytes,
        "grads": 0,
        "optimizer": 0,
        "activations": act,
        "logits": logits,
        "kv_cache": kv,
        "inputs": inputs,
        "total": d.param_bytes + kv + act + logits + inputs,
        "peak_phase": "decode",
    }


def kv_cache_bytes(cfg: ModelConfig, d: Dims, kv_cache_dtype=None) -> int:
    """K and V of every layer for B_l rows of S positions, as jaxtp.kv_cache lays one device's entries out:
    2*L*B_l*S*K_l*(H*b + s) bytes, b the cache's element size (None: the compute dtype) and s the bf16
    scale an int8 cache keeps per (token, kv head)."""
    dtype = kv_cache.storage_dtype(kv_cache_dtype, to_dtype(cfg.compute_dtype))
    local = kv_cache.abstract(
        (d.batch_local, d.seq_len, d.kv_heads_local, cfg.H), dtype, kv_cache.CACHE_AXES, lambda names: None
    )
    return 2 * cfg.L * kv_cache.bytes_per_device(local)
