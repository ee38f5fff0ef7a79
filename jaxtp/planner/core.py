"""`plan()`: one step's memory, FLOPs, collectives and time per device, and the `Plan` it returns."""

from __future__ import annotations

import dataclasses
import math

from ..config import ModelConfig, to_dtype
from ..hardware import GiB, Hardware, get_hardware
from ..kv_cache import storage_dtype
from ..sharding import Indivisible, mesh_axes
from .collectives import decode_collectives, priced, summary, train_collectives
from .dims import Dims, dims, planned_rules
from .memory import decode_memory, train_memory
from .params import ParamInfo, optimizer_bytes
from .report import format_plan
from .shapes import MeshShape, mesh_shape
from .timing import step_flops, step_times, tp_ratio

__all__ = ["Plan", "plan"]


@dataclasses.dataclass
class Plan:
    """The answer of `plan()`. Bytes are per device; `collectives` holds per_step / per_layer summaries
    keyed like jaxtp.Collectives.summary() ("all-reduce@model"), by_axis totals with ring times and the
    itemised list; `time` holds compute/memory/communication and serial/overlapped/predicted seconds;
    `valid` is False when the mesh cannot run the config as asked (see `warnings`; `indivisible` lists the
    logical axes the mesh does not divide, planned replicated)."""

    model: dict
    mesh: dict
    setting: dict
    hardware: Hardware
    params: list[ParamInfo]
    memory: dict
    flops: dict
    collectives: dict
    time: dict
    mfu: float
    comm_bound_ratio: float | None
    warnings: list[str]
    valid: bool = True
    indivisible: tuple[Indivisible, ...] = ()

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.hardware.hbm_bytes

    @property
    def comm_bound(self) -> bool:
        return self.comm_bound_ratio is not None and self.comm_bound_ratio < 1

    @property
    def flops_per_step(self) -> float:
        return self.flops["model"]

    def to_dict(self) -> dict:
        hw = dataclasses.asdict(self.hardware)
        return {
            "model": self.model,
            "mesh": self.mesh,
            "setting": self.setting,
            "hardware": hw,
            "parameters": {
                "count": sum(math.prod(i.shape) for i in self.params),
                "bytes_per_device": sum(i.local_bytes for i in self.params),
                "replicated_bytes": sum(i.local_bytes for i in self.params if not i.sharded_over),
            },
            "memory": dict(self.memory),
            "fits": self.fits,
            "flops_per_step": self.flops["model"],
            "flops": dict(self.flops),
            "collectives": self.collectives,
            "time": dict(self.time),
            "mfu": self.mfu,
            "comm_bound_ratio": self.comm_bound_ratio,
            "comm_bound": self.comm_bound,
            "warnings": list(self.warnings),
            "valid": self.valid,
            "indivisible": [b._asdict() for b in self.indivisible],
        }

    def __str__(self) -> str:
        return format_plan(self)


def plan(
    cfg: ModelConfig | str,
    mesh,
    *,
    batch_size: int,
    seq_len: int,
    param_dtype=None,
    compute_dtype=None,
    optimizer="adamw",
    hardware: str | Hardware = "h100",
    remat=None,
    decode: bool = False,
    rules=None,
    kv_cache_dtype: str | None = None,
) -> Plan:
    """Plan one training step (or, with decode=True, one decode step over a `seq_len` KV cache).

    cfg: a ModelConfig or preset name; its `attention` and `attention_block` decide attention's memory
    (xla keeps S x S scores, blockwise and cudnn do not). mesh: a jax Mesh, a spec ("8x8", "2x2x2",
    "data=2,model=4") or a {axis: size} dict; no devices are needed. param_dtype / compute_dtype default to
    the config's (the presets keep f32 master weights). batch_size is global, split over the data axis.
    remat: None or "full" (what to plan, apart from cfg.remat; the model's "dots" policy is not modelled).
    optimizer: "adamw" (the Trainer's), "adam", "sgd", "momentum", "lion" or an optax transformation.
    rules: a preset name (megatron, megatron-sp, fsdp, fsdp-sp) or a dict table, as Transformer.create
    takes; batch_size splits over every batch axis (data+fsdp). hardware: its `forms_reduce_scatter`
    decides whether SP / ZeRO reductions are planned as reduce-scatters (GPU/TPU presets) or as the
    all-reduces XLA:CPU emits, its `cudnn_attention` whether attention="auto" runs cuDNN. kv_cache_dtype
    (decode): as jaxtp.generate takes it - None keeps the compute dtype, "int8" stores int8 values plus a
    bf16 scale per (token, kv head).
    """
    cfg = _config(cfg, param_dtype, compute_dtype)
    if remat not in (None, False, "none", "full", True):
        raise ValueError(f"remat must be None/'none' or 'full', got {remat!r}")
    cache_dtype = storage_dtype(kv_cache_dtype, to_dtype(cfg.compute_dtype))  # checks the name
    hw, ms = get_hardware(hardware), mesh_shape(mesh)
    rules_resolved, indivisible = planned_rules(cfg, ms, rules)
    d = dims(cfg, ms, rules_resolved, batch_size, seq_len, hw)
    warnings, valid = _setting_warnings(cfg, ms, rules_resolved, indivisible, d, batch_size, remat, decode)

    opt_bytes = 0 if decode else optimizer_bytes(d.infos, optimizer)
    memory = decode_memory(cfg, d, kv_cache_dtype) if decode else train_memory(cfg, d, remat, opt_bytes)
    flops = step_flops(cfg, d, batch_size, seq_len, remat, decode)
    items = priced((decode_collectives if decode else train_collectives)(cfg, d), ms, hw)
    times, mfu = step_times(d, memory, flops, items, hw, decode)
    R, times["comm_bound_ratio_megatron"], ratio_warnings = tp_ratio(cfg, d, memory, items, ms, hw, decode)
    warnings += ratio_warnings + _fit_warnings(memory["total"], hw)
    setting = {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_step": d.tokens,
        "decode": decode,
        "param_dtype": cfg.param_dtype,
        "compute_dtype": cfg.compute_dtype,
        "optimizer": optimizer if isinstance(optimizer, str) else "custom",
        "remat": remat,
        "attention": None if decode else d.attention,
        "kv_cache_dtype": str(cache_dtype) if decode else None,
        "kv_heads_replicated": _kv_replicated(cfg, d),
        "rules": {k: "+".join(mesh_axes(v)) or None for k, v in rules_resolved.items()},
        "local": {
            "B_l": d.batch_local,
            "N_l": d.heads_local,
            "K_l": d.kv_heads_local,
            "F_l": d.d_ff_local,
            "V_l": d.vocab_local,
        },
    }
    model = {"param_count": cfg.param_count(), "padded_vocab": d.padded_vocab, **cfg.to_dict()}
    return Plan(
        model,
        dict(ms.shape),
        setting,
        hw,
        list(d.infos),
        memory,
        flops,
        summary(cfg, items, ms, hw),
        times,
        mfu,
        R,
        warnings,
        valid,
        indivisible,
    )


def _config(cfg: ModelConfig | str, param_dtype, compute_dtype) -> ModelConfig:
    cfg = ModelConfig.preset(cfg) if isinstance(cfg, str) else cfg
    changes = {
        k: str(to_dtype(v))
        for k, v in (("param_dtype", param_dtype), ("compute_dtype", compute_dtype))
        if v is not None
    }
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _kv_replicated(cfg: ModelConfig, d: Dims) -> bool:
    """kv heads fewer than the query heads' split, copied onto each rank that reads them."""
    return d.heads_sharded and not d.kv_sharded and cfg.K > 1


def _setting_warnings(
    cfg: ModelConfig,
    ms: MeshShape,
    rules: dict,
    indivisible: tuple[Indivisible, ...],
    d: Dims,
    batch_size: int,
    remat,
    decode: bool,
) -> tuple[list[str], bool]:
    """What cannot run as asked (valid=False) and what runs but wastes or surprises."""
    warnings = [
        f"not divisible: {b.describe()} - planned with {b.axis!r} replicated, but Transformer.create "
        "would refuse this mesh"
        for b in indivisible
    ]
    warnings += _sequence_parallel_warnings(ms, rules, d)
    valid = not indivisible and batch_size % d.dp_size == 0
    if batch_size % d.dp_size:
        warnings.append(
            f"batch_size={batch_size} is not divisible by the data axis ({d.dp_size}); planned with "
            f"{d.batch_local} rows per device"
        )
    if d.seq_len > cfg.max_seq_len:
        warnings.append(f"seq_len={d.seq_len} exceeds the config's max_seq_len={cfg.max_seq_len}")
    used = set(d.tp_axes) | set(d.dp_axes)
    warnings += [
        f"mesh axis {axis!r} (size {size}) is unused by the rules table: its devices duplicate the work of the others"
        for axis, size in ms.shape.items()
        if size > 1 and axis not in used
    ]
    if _kv_replicated(cfg, d):
        warnings.append(
            f"kv heads replicated: n_kv_heads={cfg.K} < model axis {d.tp_size}; k/v weights are "
            "replicated "
            + (
                "and every query head projects its own k/v (N/K times the kv projection FLOPs)"
                if d.params.qkv_fused
                else "and the backward adds a dK/dV all-reduce and 2 all-gathers"
            )
        )
    if d.padded_vocab != cfg.V:
        warnings.append(f"vocab padded {cfg.V} -> {d.padded_vocab} to split over the model axis")
    if cfg.attention == "cudnn" and not decode and d.attention != "cudnn":
        warnings.append(
            f"attention='cudnn' cannot run here (no cuDNN on this hardware, or a call it cannot "
            f"express): planned as {d.attention}, what auto falls back to"
        )
    if remat in ("full", True) and not cfg.scan_layers:
        warnings.append(
            "remat planned for an unrolled model: XLA:CPU schedules its recomputation early and "
            "frees little (L=8: 597 -> 540 MiB, scanned 727 -> 134 MiB); set scan_layers=True"
        )
    return warnings, valid


def _sequence_parallel_warnings(ms: MeshShape, rules: dict, d: Dims) -> list[str]:
    sp_axes = mesh_axes(rules["act_seq"])
    if not sp_axes or d.seq_parallel:
        return []
    if d.tp_size < 2 or not set(sp_axes) <= set(d.tp_axes):
        return [
            f"act_seq maps to {'+'.join(sp_axes)!r}, not the tensor-parallel axis: its collectives are not modelled"
        ]
    return [
        f"seq_len={d.seq_len} is not divisible by the {'+'.join(sp_axes)} axis ({ms.split(sp_axes)}): the "
        "residual stream stays whole (no sequence parallelism)"
    ]


def _fit_warnings(total: float, hw: Hardware) -> list[str]:
    if total > hw.hbm_bytes:
        return [
            f"does not fit: {total / GiB:.1f} GiB per device > {hw.hbm_bytes / GiB:.1f} GiB HBM ({hw.name})"
        ]
    if total > 0.9 * hw.hbm_bytes:
        return [
            f"tight: {total / GiB:.1f} GiB of {hw.hbm_bytes / GiB:.1f} GiB HBM; allocator fragmentation and "
            "framework buffers may not fit"
        ]
    return []
