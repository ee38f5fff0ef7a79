"""Read the compiled program: which collectives XLA inserted, over which mesh axes, moving how many bytes.

Layers never write collectives; this module is how tests and reports prove where they came from.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import jax
import numpy as np

__all__ = [
    "KINDS",
    "Collective",
    "Collectives",
    "parse_collectives",
    "computations",
    "loop_bodies",
    "compiled_text",
    "collectives",
]

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(
    r"=\s*(?P<shape>\(.*?\)|[a-z0-9]+\[[^\]]*\][^ ]*)\s+(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\("
)
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    axes: str  # "model", "data", "data+model", or "?" when the groups match no mesh axes
    group_size: int
    bytes: int  # size of the unsharded buffer the collective produces (reduce-scatter: its input)


@dataclasses.dataclass
class Collectives:
    ops: list[Collective]

    def count(self, kind: str | None = None, axes: str | None = None) -> int:
        return sum(
            1 for op in self.ops if (kind is None or op.kind == kind) and (axes is None or op.axes == axes)
        )

    def bytes(self, kind: str | None = None, axes: str | None = None) -> int:
        return sum(
            op.bytes
            for op in self.ops
            if (kind is None or op.kind == kind) and (axes is None or op.axes == axes)
        )

    def summary(self) -> dict[str, dict[str, int]]:
        """{"all-reduce@model": {"count": 4, "bytes": 65536}, ...}"""
        out: dict = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
        for op in self.ops:
            key = f"{op.kind}@{op.axes}"
            out[key]["count"] += 1
            out[key]["bytes"] += op.bytes
        return dict(sorted(out.items()))

    def __sub__(self, other: "Collectives") -> dict[str, dict[str, int]]:
        a, b = self.summary(), other.summary()
        return {
            k: {f: a.get(k, {}).get(f, 0) - b.get(k, {}).get(f, 0) for f in ("count", "bytes")}
            for k in sorted(set(a) | set(b))
        }


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * _BYTES.get(dtype, 4)
    return total


def _iota(text: str, n: int) -> np.ndarray:
    """'[2,4]T(1,0)' -> arange reshaped and transposed; anything else -> arange(n)."""
    m = re.fullmatch(r"\s*\[([0-9,]+)\](?:T\(([0-9,]+)\))?\s*", text or "")
    if not m:
        return np.arange(n)
    ids = np.arange(n).reshape([int(x) for x in m.group(1).split(",")])
    return ids.transpose([int(x) for x in m.group(2).split(",")]) if m.group(2) else ids


def _groups(line: str, n_devices: int) -> list[list[int]]:
    m = re.search(r"replica_groups=\{(\{[0-9,{} ]*\})\}", line)
    if m:
        return [
            [int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([0-9, ]*)\}", m.group(1))
        ]
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(int(np.prod([int(x) for x in m.group(2).split(",")]))).reshape(
            [int(x) for x in m.group(2).split(",")]
        )
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape).tolist()
    m = re.search(
        r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\((\[[0-9,]+\](?:T\([0-9,]+\))?)\))?\s*"
        r"\{([^}]*)\}",
        line,
    )
    if m:  # mesh form: mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}; no device_ids = iota
        names = re.findall(r"'([^']+)'=", m.group(1))
        sizes = [int(x) for x in re.findall(r"=(\d+)", m.group(1))]
        ids = _iota(m.group(2), int(np.prod(sizes))).reshape(sizes)
        grouped = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(3))]
        rest = [i for i in range(len(names)) if i not in grouped]
        return ids.transpose(rest + grouped).reshape(-1, int(np.prod([sizes[i] for i in grouped]))).tolist()
    m = re.search(r"source_target_pairs=\{([0-9,{} ]*)\}", line)
    if m:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    return [list(range(n_devices))]


def _axes_of_groups(groups: list[list[int]], mesh) -> str:
    """Mesh axes along which the devices of a group differ (ids index the mesh's flattened devices)."""
    if mesh is None:
        return "?"
    names = list(mesh.shape)
    coords = np.stack(np.unravel_index(np.arange(mesh.devices.size), mesh.devices.shape), axis=1)
    varying = set()
    for g in groups:
        if len(g) < 2 or max(g) >= len(coords):
            continue
        c = coords[g]
        varying |= {names[i] for i in range(len(names)) if len(set(c[:, i])) > 1}
    return "+".join(n for n in names if n in varying) or "none"


def parse_collectives(hlo_text: str, mesh=None) -> Collectives:
    """Every collective in an HLO module's text, with the mesh axes its replica groups span (async pairs
    count once, at their -start)."""
    n = mesh.devices.size if mesh is not None else 1
    ops = []
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m or "-done" in line.split("=")[1].split("(")[0]:
            continue
        kind = m.group("kind")
        groups = _groups(line, n)
        size = max((len(g) for g in groups), default=1)
        nbytes = _shape_bytes(m.group("shape"))
        if kind == "reduce-scatter":
            nbytes *= size
        ops.append(Collective(kind, _axes_of_groups(groups, mesh), size, nbytes))
    return Collectives(ops)


_HEADER = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")


def computations(hlo_text: str) -> dict[str, str]:
    """{name: text} of every computation in an HLO module's text (ENTRY included)."""
    comps, name, lines = {}, None, []
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and name is None:
            name, lines = header.group("name"), [line]
        elif name is not None:
            lines.append(line)
            if line.rstrip() == "}":
                comps[name], name = "\n".join(lines), None
    return comps


def loop_bodies(hlo_text: str) -> list[str]:
    """The text of each while loop's body with every computation it calls. A scanned layer stack's body
    appears ONCE in the HLO however many layers it runs, so its collectives are per layer; a loop nested in
    another's body is listed in both."""
    comps = computations(hlo_text)
    bodies = []
    for body in re.findall(r"\bbody=%([\w.\-]+)", hlo_text):
        seen, todo = [], [body]
        while todo:
            c = todo.pop()
            if c not in seen and c in comps:
                seen.append(c)
                todo += _CALLED.findall(comps[c])
        bodies.append("\n".join(comps[c] for c in seen))
    return bodies


def _find_mesh(args):
    for leaf in jax.tree.leaves(args):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


def compiled_text(fn, *args, **kwargs) -> str:
    """The optimised HLO of `fn(*args)` (jit-wrapped if it is not jitted already)."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return jitted.lower(*args, **kwargs).compile().as_text()


def collectives(fn, *args, mesh=None, **kwargs) -> Collectives:
    """Compile `fn(*args)` (jit-wrapping it if needed) and list the collectives in the optimised HLO."""
    mesh = mesh if mesh is not None else _find_mesh((args, kwargs))
    return parse_collectives(compiled_text(fn, *args, **kwargs), mesh)
