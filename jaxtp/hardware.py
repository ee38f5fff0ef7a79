"""Per-device hardware peaks the planner prices a step with: datasheet presets and this host, measured.

Kept apart from the planner (jaxtp.planner) so its cost model reads as formulas over `Hardware` fields;
the figures and their sources are here, in one table.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from .measure import matmul_peak_flops, median_seconds

__all__ = ["GiB", "Hardware", "HARDWARE", "measure_cpu", "get_hardware"]

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Per-device peaks. `link_bytes_per_s` is what one device pushes into a ring collective along one
    mesh axis inside its fast domain (NVLink island / ICI slice), per direction; `dcn_bytes_per_s` is
    the same across domains (InfiniBand / data-centre network). `node_size` devices share the fast
    domain; a mesh axis whose devices span domains runs at the DCN rate (the slowest ring link)."""

    name: str
    flops_per_s: float  # dense bf16 matmul peak (f32 for the measured CPU)
    hbm_bytes_per_s: float
    hbm_bytes: float
    link_bytes_per_s: float
    node_size: int
    dcn_bytes_per_s: float
    latency_s: float = 1e-6  # per ring hop inside the fast domain (docs/planner.md section 2: ~1 us)
    dcn_latency_s: float = 1e-5  # per hop across domains: an assumption, not a quoted figure
    native_bf16: bool = True  # False: XLA:CPU upcasts bf16 matmuls, so activation collectives move f32
    # False: the backend's XLA pipeline does not rewrite all-reduce + dynamic-slice into reduce-scatter
    # (XLA:CPU, measured on jax 0.10.2); sequence parallelism's and ZeRO's reduce-scatters then run as
    # all-reduces of the same buffer (twice the ring bytes of a reduce-scatter).
    forms_reduce_scatter: bool = True
    # True: an NVIDIA GPU, where attention="auto" (or "cudnn") runs cuDNN's flash attention for the calls it
    # expresses (jaxtp.attention.resolve); elsewhere auto picks xla or blockwise by S x T.
    cudnn_attention: bool = False
    source: str = ""


HARDWARE: dict[str, Hardware | None] = {
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s dense BF16, HBM2e 2,039 GB/s, NVLink3 600 GB/s total
    # (300 GB/s per direction); DGX A100: one 200 Gb/s HDR InfiniBand NIC per GPU (25 GB/s).
    "a100": Hardware(
        "a100",
        312e12,
        2.039e12,
        80 * GiB,
        300e9,
        8,
        25e9,
        cudnn_attention=True,
        source="NVIDIA A100 datasheet; DGX A100 user guide",
    ),
    # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16 (1,979 with sparsity), HBM3 3.35 TB/s, 80 GB,
    # NVLink4 900 GB/s total (450 GB/s per direction: the W of docs/planner.md section 3); DGX H100: one
    # 400 Gb/s ConnectX-7 per GPU (50 GB/s).
    "h100": Hardware(
        "h100",
        989e12,
        3.35e12,
        80 * GiB,
        450e9,
        8,
        50e9,
        cudnn_attention=True,
        source="NVIDIA H100 datasheet; DGX H100 user guide",
    ),
    # NVIDIA H200 SXM datasheet: same Hopper compute (989 TFLOP/s BF16 dense) and NVLink (900 GB/s),
    # 141 GB HBM3e at 4.8 TB/s; 400 Gb/s NIC per GPU in HGX H200 systems.
    "h200": Hardware(
        "h200", 989e12, 4.8e12, 141e9, 450e9, 8, 50e9, cudnn_attention=True, source="NVIDIA H200 datasheet"
    ),
    # Cloud TPU v5e docs: 197 TFLOP/s BF16, 16 GB HBM2 at 819 GB/s, 256-chip pod (2D torus), DCN
    # 6.4 Tb/s per pod (25 Gb/s = 3.1 GB/s per chip). Scaling book: ICI 4.5e10 B/s one way per link,
    # so a bidirectional ring along one torus axis moves 9e10 B/s per chip.
    "tpu-v5e": Hardware(
        "tpu-v5e",
        197e12,
        819e9,
        16e9,
        9e10,
        256,
        3.125e9,
        source="cloud.google.com/tpu/docs/v5e; jax-ml scaling book",
    ),
    # Cloud TPU v5p docs: 459 TFLOP/s BF16, 95 GiB HBM at 2,765 GB/s, 8,960-chip pod (3D torus), ICI
    # 1,200 GB/s bidirectional per chip, DCN 50 Gb/s per chip. jax-ml scaling book: W = 1.8e11 B/s
    # bidirectional along one axis (alpha = C/W ~ 2550).
    "tpu-v5p": Hardware(
        "tpu-v5p",
        459e12,
        2.765e12,
        95 * GiB,
        1.8e11,
        8960,
        6.25e9,
        source="cloud.google.com/tpu/docs/v5p-training; jax-ml scaling book",
    ),
    # Measured at run time (jaxtp.hardware.measure_cpu): f32 matmul FLOP/s and copy bandwidth of this host;
    # fake devices exchange collectives through host memory, so the link rate is the copy rate too.
    "cpu": None,
}


@functools.lru_cache(maxsize=1)
def measure_cpu(n: int = 1024, copy_mib: int = 64) -> Hardware:
    """Time an f32 n x n matmul and a large copy on the first CPU device (medians of a few runs: on shared
    cores the median is the rate a step actually sees; jaxtp.measure times everything that way)."""
    dev = jax.devices("cpu")[0]
    flops = matmul_peak_flops(n, device=dev)
    x = jax.device_put(jnp.ones((copy_mib * 2**18,), jnp.float32), dev)
    bw = 2 * x.nbytes / median_seconds(jax.jit(lambda y: y + 1.0), x)  # read + write
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # host RAM, shared by fake devices
    except (ValueError, OSError, AttributeError):
        total = 16 * GiB
    return Hardware(
        "cpu",
        flops,
        bw,
        float(total),
        bw,
        1 << 30,
        bw,
        latency_s=1e-5,
        dcn_latency_s=1e-5,
        native_bf16=False,
        forms_reduce_scatter=False,
        source="measured: f32 matmul and copy on this host",
    )


def get_hardware(hw: str | Hardware) -> Hardware:
    """A preset by name ("cpu" is measured on this host, once), or `hw` itself."""
    if isinstance(hw, Hardware):
        return hw
    if hw not in HARDWARE:
        raise ValueError(
            f"unknown hardware {hw!r}; choose one of {sorted(HARDWARE)} or pass a jaxtp.hardware.Hardware"
        )
    return measure_cpu() if hw == "cpu" else HARDWARE[hw]
