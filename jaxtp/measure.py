"""Measurements the reports quote: this machine's matmul peak, compiled programs' memory, collectives
and recompiles, and step times.

Timings are medians over repeats after one warm-up call (`median_seconds`), the peak included: on shared
CPU cores the median is the rate a step actually sees, so MFU compares a median step with a median
matmul. The peak is a large f32 matmul on one device (XLA:CPU runs one op on all cores, and the fake
devices of a CPU mesh share those same cores, so this is the machine's peak, not a device's).
"""

from __future__ import annotations

import math
import statistics
import time

import jax
import jax.numpy as jnp

from .hlo import parse_collectives

__all__ = [
    "median_seconds",
    "matmul_peak_flops",
    "per_layer",
    "collectives_of",
    "bytes_per_device",
    "compile_timed",
    "compile_count",
    "memory_per_device",
    "timed_train_step",
]


def median_seconds(fn, *args, repeats: int = 5) -> float:
    """Median wall seconds of `fn(*args)` until its result is ready, after one warm-up call (its compile)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak_flops(n: int = 1024, repeats: int = 5, dtype=jnp.float32, device=None) -> float:
    """FLOP/s of an n x n x n matmul on `device` (default: the first), median of `repeats` timings."""
    a_NN = jax.device_put(jnp.ones((n, n), dtype), device or jax.devices()[0])
    return 2.0 * n**3 / median_seconds(jax.jit(lambda a, b: a @ b), a_NN, a_NN, repeats=repeats)


def per_layer(total: dict, one_layer: dict, n_layers: int) -> dict:
    """(count(L) - count(1)) / (L - 1) per collective kind@axes, for counts and bytes."""
    if n_layers < 2:
        return {}
    keys = set(total) | set(one_layer)
    out = {}
    for k in sorted(keys):
        a, b = total.get(k, {"count": 0, "bytes": 0}), one_layer.get(k, {"count": 0, "bytes": 0})
        d = {f: (a[f] - b[f]) / (n_layers - 1) for f in ("count", "bytes")}
        if d["count"] or d["bytes"]:
            out[k] = {f: (int(v) if float(v).is_integer() else v) for f, v in d.items()}
    return out


def collectives_of(compiled, mesh) -> dict:
    """{"all-reduce@model": {"count", "bytes"}, ...} of a compiled program (jaxtp.hlo)."""
    return parse_collectives(compiled.as_text(), mesh).summary()


def bytes_per_device(tree) -> int:
    """Bytes one device holds of `tree`'s arrays, from their shard shapes (replicated arrays count whole)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compile_timed(jitted, *args):
    """(compiled, seconds) of tracing+lowering and XLA-compiling `jitted` for `args`, timed apart. The jit
    call then reuses this executable, so the first execution is timed without its compile."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, dict(trace_lower_s=t1 - t0, xla_compile_s=t2 - t1, compile_s=t2 - t0)


def compile_count(jitted) -> int:
    """How many executables a `jax.jit` function holds: one per distinct input signature (shapes, dtypes,
    shardings, static arguments). 1 after many calls means it never recompiled."""
    return jitted._cache_size()  # jax has no public per-function count; this is the one private call


def memory_per_device(compiled) -> dict:
    """XLA's per-device bytes of a compiled program; total = what it holds while running: arguments plus
    outputs not aliased onto donated arguments, plus the temporary heap."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def timed_train_step(trainer, batch) -> tuple[float, dict]:
    """(seconds, metrics) of one train step, until params, optimizer state and metrics are all ready."""
    t = time.perf_counter()
    metrics = trainer.train_step(batch)
    jax.block_until_ready((trainer.params, trainer.opt_state, metrics))
    return time.perf_counter() - t, metrics
