"""Meshes from short specs ("2x4", "data=2,model=4", "2x2x2"), fake CPU devices, distributed init.

A spec with two numbers means (data, model); three mean (data, fsdp, model). Axes are Auto so that
tensor parallelism comes from jit's sharding propagation, not from per-op out_sharding arguments.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np

__all__ = [
    "AXES_2",
    "AXES_3",
    "KNOWN_AXES",
    "use_cpu_devices",
    "parse_mesh_spec",
    "make_mesh",
    "axis_size",
    "describe_mesh",
]

AXES_2 = ("data", "model")
AXES_3 = ("data", "fsdp", "model")
KNOWN_AXES = ("data", "fsdp", "model")


def use_cpu_devices(n: int) -> None:
    """Fake `n` CPU devices. Must run before JAX creates its backends (before any array op); afterwards it
    passes only if there are already `n` CPU devices."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"use_cpu_devices: n must be a positive integer, got {n!r}")
    try:
        jax.config.update("jax_num_cpu_devices", n)  # jax refuses a new value once its backends exist
    except RuntimeError:
        have = len(jax.devices("cpu"))
        if have == n:
            return
        raise RuntimeError(
            f"use_cpu_devices({n}) was called after JAX initialised its backends with {have} CPU device(s); "
            "call jaxtp.use_cpu_devices first thing, before any JAX array is created "
            f"(or set XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting Python)"
        ) from None


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'2x4' -> {data: 2, model: 4}; '2x2x2' -> {data, fsdp, model}; 'data=2,model=4' -> as named."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh spec {spec!r} is empty; use e.g. '2x4' (data x model) or 'data=2,model=4'")
    s = spec.strip().replace(" ", "")
    ordered = _named_axes(spec, s) if "=" in s else _sized_axes(spec, s)
    for name, size in ordered.items():
        if size < 1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {size}; every axis must be >= 1")
    return ordered


def _named_axes(spec: str, s: str) -> dict[str, int]:
    """'data=2,model=4' (data and model default to 1), in KNOWN_AXES order."""
    axes: dict[str, int] = {}
    for part in s.split(","):
        m = re.fullmatch(r"([a-z]+)=(-?\d+)", part)
        if not m:
            raise ValueError(f"mesh spec {spec!r}: cannot parse {part!r}; use e.g. 'data=2,model=4'")
        name, size = m.group(1), int(m.group(2))
        if name not in KNOWN_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {KNOWN_AXES}")
        if name in axes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        axes[name] = size
    axes.setdefault("data", 1)
    axes.setdefault("model", 1)
    return {a: axes[a] for a in KNOWN_AXES if a in axes}


def _sized_axes(spec: str, s: str) -> dict[str, int]:
    """'DxM' -> (data, model); 'DxFxM' -> (data, fsdp, model)."""
    if not re.fullmatch(r"-?\d+(x-?\d+)*", s):
        raise ValueError(
            f"mesh spec {spec!r} is malformed; use 'DxM' such as '2x4' (data x model), 'DxFxM', or 'data=2,model=4'"
        )
    sizes = [int(p) for p in s.split("x")]
    if len(sizes) not in (2, 3):
        raise ValueError(
            f"mesh spec {spec!r} has {len(sizes)} axes; use 2 (data x model) or 3 (data x fsdp x model)"
        )
    return dict(zip(AXES_2 if len(sizes) == 2 else AXES_3, sizes))


def make_mesh(spec: str | dict, devices=None) -> jax.sharding.Mesh:
    """Build a Mesh with Auto axes from a spec, on the first prod(sizes) of `devices`."""
    axes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(axes.values())
    if need > len(devices):
        raise ValueError(
            f"mesh {spec!r} needs {need} devices but {len(devices)} are available "
            f"({devices[0].platform if devices else 'none'}); use a smaller mesh or fake more CPU devices "
            "with jaxtp.use_cpu_devices(n) before JAX starts"
        )
    grid = np.array(devices[:need], dtype=object).reshape(tuple(axes.values()))
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.sharding.Mesh(grid, tuple(axes), axis_types=auto)


def axis_size(mesh, name: str) -> int:
    """Size of a mesh axis, 1 when the mesh does not have it (so rules may name absent axes)."""
    return dict(mesh.shape).get(name, 1)


def describe_mesh(mesh: jax.sharding.Mesh) -> str:
    """The mesh's axes and platform, then its grid of device ids (the run report's first section)."""
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    return f"Mesh({shape}) on {mesh.devices.size} {mesh.devices.flat[0].platform} device(s)\n{ids}"
