"""Meshes from short specs ("2x4", "data=2,model=4", "2x2x2"), fake CPU devices, distributed init.

A spec with two numbers means (data, model); three mean (data, fsdp, model). Axes are Auto so that
tensor parallelism comes from jit's sharding propagation, not from per-op out_sharding arguments.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np

AXES_2 = ("data", "model")
AXES_3 = ("data", "fsdp", "model")
KNOWN_AXES = ("data", "fsdp", "model")


def _backends_initialised() -> bool:
    from jax._src import xla_bridge

    return bool(getattr(xla_bridge, "_backends", None))


def use_cpu_devices(n: int) -> None:
    """Fake `n` CPU devices. Must run before JAX creates its backends (before any array op)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"use_cpu_devices: n must be a positive integer, got {n!r}")
    if _backends_initialised():
        have = len(jax.devices("cpu"))
        if have == n:
            return
        raise RuntimeError(
            f"use_cpu_devices({n}) was called after JAX initialised its backends with {have} CPU device(s); "
            "call jaxtp.use_cpu_devices first thing, before any JAX array is created "
            f"(or set XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting Python)")
    jax.config.update("jax_num_cpu_devices", n)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'2x4' -> {data: 2, model: 4}; '2x2x2' -> {data, fsdp, model}; 'data=2,model=4' -> as named."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"mesh spec {spec!r} is empty; use e.g. '2x4' (data x model) or 'data=2,model=4'")
    s = spec.strip().replace(" ", "")
    if "=" in s:
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
        ordered = {a: axes[a] for a in KNOWN_AXES if a in axes}
    else:
        if not re.fullmatch(r"-?\d+(x-?\d+)*", s):
            raise ValueError(
                f"mesh spec {spec!r} is malformed; use 'DxM' such as '2x4' (data x model), 'DxFxM', "
                "or 'data=2,model=4'")
        sizes = [int(p) for p in s.split("x")]
        if len(sizes) == 2:
            ordered = dict(zip(AXES_2, sizes))
        elif len(sizes) == 3:
            ordered = dict(zip(AXES_3, sizes))
        else:
            raise ValueError(
                f"mesh spec {spec!r} has {len(sizes)} axes; use 2 (data x model) or 3 (data x fsdp x model)")
    for name, size in ordered.items():
        if size < 1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {size}; every axis must be >= 1")
    return ordered


def make_mesh(spec: str | dict, devices=None) -> jax.sharding.Mesh:
    """Build a Mesh with Auto axes from a spec, on the first prod(sizes) of `devices`."""
    axes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(axes.values())
    if need > len(devices):
        raise ValueError(
            f"mesh {spec!r} needs {need} devices but {len(devices)} are available "
            f"({devices[0].platform if devices else 'none'}); use a smaller mesh or fake more CPU devices "
            "with jaxtp.use_cpu_devices(n) before JAX starts")
    grid = np.array(devices[:need], dtype=object).reshape(tuple(axes.values()))
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.sharding.Mesh(grid, tuple(axes), axis_types=auto)


def mesh_shape(mesh: jax.sharding.Mesh) -> dict[str, int]:
    return dict(mesh.shape)


def axis_size(mesh, name: str) -> int:
    """Size of a mesh axis, 1 when the mesh does not have it (so rules may name absent axes)."""
    return dict(mesh.shape).get(name, 1)


def describe_mesh(mesh: jax.sharding.Mesh) -> str:
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    return f"Mesh({shape}) on {mesh.devices.size} {mesh.devices.flat[0].platform} device(s)\n{ids}"
