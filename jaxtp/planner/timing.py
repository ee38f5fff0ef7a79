"""FLOPs, roofline step times, MFU and the tensor-parallel ratio R (docs/planner.md sections 3, 4 and 6)."""

from __future__ import annotations

from ..config import ModelConfig
from ..hardware import Hardware
from ..train import train_flops_per_step
from .collectives import Collective, intra_node
from .dims import Dims
from .shapes import MeshShape

__all__ = ["step_flops", "flash_attention_factor", "step_times", "tp_ratio"]


def step_flops(cfg: ModelConfig, d: Dims, batch_size: int, seq_len: int, remat, decode: bool) -> dict:
    """Model FLOPs follow jaxtp.train.train_flops_per_step (PaLM): 6*P*T over matmul params plus attention
    12*L*B*S^2*N*H counted NON-causally - xla computes the full S x S scores and masks them. Hardware FLOPs
    add padded vocab columns, replicated kv projections (stacked: each query head projects its kv head's
    k/v, N/K times; unstacked: every rank projects all K heads), what a flash kernel skips and recomputes
    (flash_attention_factor) and remat's recomputed forward. Decode: 2*P*B + 4*L*B*S*N*H."""

    matmul_params = cfg.matmul_param_count()
    if decode:
        tok, per_param = batch_size, 2.0
        attention = 4.0 * cfg.L * batch_size * seq_len * cfg.N * cfg.H
        model = per_param * matmul_params * tok + attention
    else:
        tok, per_param = batch_size * seq_len, 6.0
        model = float(train_flops_per_step(cfg, batch_size, seq_len))
        attention = 12.0 * cfg.L * batch_size * seq_len**2 * cfg.N * cfg.H
    stacked_replicated = d.params.qkv_fused and not d.kv_sharded and not decode
    kv_heads = cfg.N if stacked_replicated else d.tp_size / d.kv_split * cfg.K
    kv_extra = per_param * 2 * cfg.D * cfg.H * cfg.L * tok * (kv_heads - cfg.K) if d.heads_sharded else 0.0
    hardware = model + per_param * (d.padded_vocab - cfg.V) * cfg.D * tok + kv_extra
    if not decode:
        hardware += attention * (flash_attention_factor(d) - 1)
    if remat in ("full", True) and not decode:
        hardware += model / 3  # one more forward pass
    return {
        "model": model,
        "hardware": hardware,
        "per_device": hardware / d.n_devices * d.duplication,
        "matmul": per_param * matmul_params * tok,
        "attention": attention,
        "convention": "2*P*B + 4*L*B*S*N*H per decode step (S cached positions)"
        if decode
        else "6*P*T + 12*L*B*S^2*N*H, attention counted non-causally (PaLM; equals jaxtp.train.train_flops_per_step)",
    }


def flash_attention_factor(d: Dims) -> float:
    """Attention FLOPs a training step does, over the non-causal 12*L*B*S^2*N*H. xla: 1. blockwise and
    cudnn compute only the (query block, key block) pairs the causal mask leaves live, (I+1)/(2I) of them
    for I blocks of attention_block (cuDNN's own tiles assumed alike), and recompute the scores in the
    backward: 7 attention matmuls where xla does 6."""
    if d.attention == "xla":
        return 1.0
    blocks = -(-d.seq_len // d.attention_block)
    return (blocks + 1) / (2 * blocks) * 7 / 6


def step_times(
    d: Dims, memory: dict, flops: dict, items: list[Collective], hw: Hardware, decode: bool
) -> tuple[dict, float]:
    """Roofline pieces, three step times and the predicted MFU.
    compute: hardware FLOPs at the matmul peak. memory: HBM traffic - training reads the weights in the
    forward and backward, writes gradients, reads and writes params + optimizer state in the update, and
    writes then reads every saved activation; decode reads weights and the KV cache once.
    serial = all three in sequence; overlapped = the largest alone (perfect overlap).
    predicted (training) = matmuls at peak with their weight reads hidden inside them, plus the
    memory-bound element-wise and optimizer kernels, plus the model-axis collectives (Megatron's
    all-reduces sit on the critical path; docs/planner.md section 3 plans for little overlap), plus whatever
    of the data-axis gradient all-reduce does not hide behind the backward pass (2/3 of the compute).
    predicted (decode) = max(compute, memory) + collectives."""
    t_compute = flops["per_device"] / hw.flops_per_s
    if decode:
        hbm = memory["params"] + memory["kv_cache"] + memory["activations"]
        elementwise = 0.0
    else:
        elementwise = (
            2 * (memory["params"] + memory["optimizer"])
            + memory["grads"]
            + 2 * (memory["activations"] + memory["logits"])
        )
        hbm = 3 * memory["params"] + elementwise
    t_memory = hbm / hw.hbm_bytes_per_s
    t_crit = sum(c.time_s for c in items if c.critical)
    t_background = sum(c.time_s for c in items if not c.critical)
    t_comm = t_crit + t_background
    if decode:
        predicted = max(t_compute, t_memory) + t_comm
    else:
        predicted = (
            t_compute + elementwise / hw.hbm_bytes_per_s + t_crit + max(0.0, t_background - 2 / 3 * t_compute)
        )
    serial, overlapped = t_compute + t_memory + t_comm, max(t_compute, t_memory, t_comm)
    peak = d.n_devices * hw.flops_per_s
    times = {
        "compute_s": t_compute,
        "memory_s": t_memory,
        "communication_s": t_comm,
        "communication_critical_s": t_crit,
        "hbm_bytes": hbm,
        "serial_s": serial,
        "overlapped_s": overlapped,
        "predicted_s": predicted,
        "bound": max((t_compute, "compute"), (t_memory, "memory"), (t_comm, "communication"))[1],
        "mfu_serial": flops["model"] / (serial * peak),
        "mfu_overlapped": flops["model"] / (overlapped * peak),
    }
    if decode:
        times["mbu"] = hbm / (predicted * hw.hbm_bytes_per_s)
    return times, flops["model"] / (predicted * peak)


def tp_ratio(
    cfg: ModelConfig,
    d: Dims,
    memory: dict,
    items: list[Collective],
    mesh: MeshShape,
    hw: Hardware,
    decode: bool,
) -> tuple[float | None, float | None, list[str]]:
    """(R, Megatron's R, warnings). R = T_math / T_comm of one layer: its TP-sharded matmuls against its
    model-axis collectives. Training uses docs/planner.md section 3's ratio with this step's own
    collectives (7 activation buffers per layer as XLA emits them, where Megatron's formula assumes 4; that
    formula is the second value). Decode: a layer's work is loading its weights and KV cache from HBM
    (docs/planner.md section 6), so R compares that time."""
    n = d.tp_size
    if n < 2:
        return None, None, []
    p_layer = 2 * cfg.D * cfg.N * cfg.H + 2 * cfg.D * cfg.K * cfg.H + 3 * cfg.D * cfg.F
    tok = d.batch_local * (1 if decode else d.seq_len)
    t_math = (2 if decode else 6) * p_layer * tok / n / hw.flops_per_s
    if decode:
        layer_bytes = (
            memory["params"] - 2 * d.vocab_local * cfg.D * d.param_itemsize + memory["kv_cache"]
        ) / cfg.L
        t_math = max(t_math, layer_bytes / hw.hbm_bytes_per_s)
    layer = [c for c in items if c.per_layer and c.axes == d.tp_axes]
    t_comm = sum(c.time_s for c in layer) / cfg.L
    intra = intra_node(mesh, hw, d.tp_axes)
    w, latency = (hw.link_bytes_per_s, hw.latency_s) if intra else (hw.dcn_bytes_per_s, hw.dcn_latency_s)
    megatron = (
        None if decode else p_layer * w / (2 * d.collective_itemsize * hw.flops_per_s * cfg.D * (n - 1))
    )
    R = t_math / t_comm if t_comm > 0 else None
    warnings = []
    if R is not None and R < 1:
        warnings.append(
            f"TP is communication-bound: R = T_math/T_comm = {R:.2f} < 1 per layer on the "
            f"{n}-way {'+'.join(d.tp_axes)!r} axis ({'NVLink/ICI' if intra else 'between nodes'}); "
            "use a smaller model axis or more data parallelism"
        )
    slow = [c.what for c in layer if c.count and c.bytes / c.count / c.group / w < latency]
    if slow:
        warnings.append(
            "latency-bound collectives (per-device message moves in < 1 hop latency): " + ", ".join(slow)
        )
    return R, megatron, warnings
