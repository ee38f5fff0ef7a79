"""A picture of where a sharded model's weights live: the mesh, and which slice of each weight each device holds.

Two halves, so that the picture can be checked against the real placement:
  layout_cells(model)    pure data: one WeightKind per distinct kind of weight (parameters with the same
                         logical axes, shape, placement and role, e.g. every layer's k and v kernels), with the
                         index range each device holds, read from the arrays' own NamedShardings
                         (`devices_indices_map`), and the pattern that placement forms.
  plot_layout(model, p)  draws that data into one PNG (matplotlib, Agg; no display needed).

A weight is drawn as the 2-D matrix its matmul reads: a Linear kernel's input (contracted) dimensions
merged row-major into rows and its output dimensions into columns (what `layers.matmul_rows` reshapes it
to); any other array puts its first dimension on the rows (a 1-D one is a single row). A cut of the leading
merged dimension stays one block (heads x head_dim split over heads); a cut of a later one leaves a piece in
several parts (scanned layers x embed split over embed: one part per layer), each labelled. Boxes are schematic,
never one cell per element: the sides are clamped to a readable aspect; faint lines mark the units of a
merged leading dimension (each head, each layer) when there are few enough to see. What is exact is the
cut: where each piece starts and ends, and which devices hold it.

The pattern is read from the placement and the layers' roles, not from parameter paths: a dimension split
over a mesh axis that also splits the batch is FSDP (ZeRO-3) storage sharding; a split dimension whose
logical name is "vocab" is vocab-parallel; a Linear split on an input dimension is row-parallel, on an
output dimension column-parallel; no split at all is replicated.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap

import jax
import numpy as np
from flax import nnx

from .config import ModelConfig
from .layers import MLP, Attention, Embed, Linear, RMSNorm
from .sharding import Layout, mesh_axes, split_size

__all__ = [
    "DevicePiece",
    "WeightKind",
    "layout_cells",
    "bounds_of",
    "figure_size",
    "plot_layout",
]

DPI = 100
FIG_WIDTH_IN = 14.0  # four weight panels per row
PANELS_PER_ROW = 4
HEADER_IN = 3.0  # the mesh grid and the legend
PANEL_IN = 3.1  # one row of weight panels
SHARED_FILL = "white"  # a piece held by devices of several colours: white, hatched grey
# What each pattern means for the computation, for the legend (only the patterns drawn are listed).
PATTERN_MEANING = {
    "column-parallel": "a matmul's output dims are split: each device computes its own slice of the output",
    "row-parallel": "a matmul's input dims are split: each device computes a partial sum, reduced across devices",
    "vocab-parallel": "the vocab is split: each device owns a range of token ids (table rows, head columns)",
    "FSDP": "stored split over a data-parallel axis (ZeRO-3), all-gathered where it is read",
    "replicated": "not split: every device holds a full copy",
    "split": "split over a mesh axis that is not data-parallel; its layer is no jaxtp Linear, so no side is named",
}


@dataclasses.dataclass(frozen=True)
class DevicePiece:
    """What one device holds of a weight: [start, stop) per dimension of the global array."""

    device_id: int
    coords: tuple[int, ...]  # the device's position on the mesh, in mesh axis order
    bounds: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class WeightKind:
    """Parameters that share logical axes, shape, placement and role: one panel of the picture."""

    paths: tuple[str, ...]  # every parameter of this kind, "/"-joined nnx paths
    logical: tuple  # logical axis names per dimension (None where unnamed)
    shape: tuple[int, ...]  # global shape
    spec: tuple[tuple[str, ...], ...]  # per dimension: the mesh axes it splits over
    local_shape: tuple[int, ...]  # one device's shard
    pattern: str  # e.g. "column-parallel", "row-parallel + FSDP", "replicated"
    rows: int  # how many leading dimensions the picture merges into rows (the rest are columns)
    pieces: tuple[DevicePiece, ...]  # one per device, in device-id order
    note: str = ""  # why the placement is so, where a layer knows (e.g. kv heads replicated)

    @property
    def names(self) -> tuple[str, ...]:
        """Short names of the member parameters, layer indices dropped ("attn.k.kernel")."""
        out = []
        for p in self.paths:
            short = ".".join(c for c in p.split("/") if not c.isdigit() and c != "blocks")
            if short not in out:
                out.append(short)
        return tuple(out)

    def holders(self) -> dict[tuple[tuple[int, int], ...], tuple[int, ...]]:
        """Each distinct piece (its bounds) -> the ids of the devices holding it, pieces sorted by bounds."""
        out: dict = {}
        for p in self.pieces:
            out.setdefault(p.bounds, []).append(p.device_id)
        return {b: tuple(ids) for b, ids in sorted(out.items())}


def layout_cells(model: nnx.Module) -> list[WeightKind]:
    """Every distinct kind of weight of `model` (arrays with a NamedSharding: a built or an abstract_sharded
    model), in forward-pass order, with each device's slice read from the sharding itself."""
    layout = getattr(model, "layout", None)
    batch_axes = set(mesh_axes(layout.rules.get("batch"))) if isinstance(layout, Layout) else {"data", "fsdp"}
    modules = dict(nnx.iter_modules(model))
    groups: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        sharding = getattr(value, "sharding", None)
        if not isinstance(sharding, jax.sharding.NamedSharding) or not getattr(value, "ndim", 0):
            continue
        owner, parent = modules.get(tuple(path[:-1])), modules.get(tuple(path[:-2]))
        names = (var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None) or ()
        logical = tuple(names) + (None,) * (value.ndim - len(names))
        spec = tuple(mesh_axes(t) for t in tuple(sharding.spec) + (None,) * (value.ndim - len(sharding.spec)))
        rows, inputs = _row_dims(owner, path[-1], value.ndim)
        pattern = _pattern(logical, spec, inputs, batch_axes)
        note = _note(owner, parent, spec, sharding.mesh)
        key = (logical, tuple(value.shape), spec, pattern, rows, note)
        rank = (_reading_rank(owner, parent), path[-1] not in ("kernel", "table"), len(groups))
        group = groups.setdefault(key, {"rank": rank, "paths": [], "value": value})
        group["paths"].append("/".join(map(str, path)))
    kinds = []
    for (logical, shape, spec, pattern, rows, note), g in sorted(
        groups.items(), key=lambda kv: kv[1]["rank"]
    ):
        sharding = g["value"].sharding
        kinds.append(
            WeightKind(
                tuple(g["paths"]),
                logical,
                shape,
                spec,
                tuple(sharding.shard_shape(shape)),
                pattern,
                rows,
                _pieces(sharding, shape),
                note,
            )
        )
    return kinds


def _reading_rank(owner, parent) -> int:
    """Where a weight comes in the forward pass, asked of its layers (nnx sorts attributes by name, so
    declaration order is lost): embedding, norms, attention q k v o, MLP gate up down, then the rest."""
    if isinstance(owner, Embed):
        return 0
    for base, siblings in ((2, ("q", "k", "v", "o")), (6, ("gate", "up", "down"))):
        if isinstance(parent, (Attention, MLP)):
            for i, name in enumerate(siblings):
                if getattr(parent, name, None) is owner:
                    return base + i
    return 1 if isinstance(owner, RMSNorm) else 10


def _row_dims(owner, attr, ndim: int) -> tuple[int, int | None]:
    """(dimensions merged into the picture's rows, how many leading dimensions are a matmul's inputs, None if
    it is no matmul's). A Linear's kernel (and int8 scale, shaped like it) has rows = its stacked (scanned
    layers) and contracted dimensions; its bias has only output dimensions. Others put their first on rows."""
    if isinstance(owner, Linear) and attr in ("kernel", "scale", "bias"):
        n_out = len(owner.names) - owner.contract
        inputs = ndim - n_out if attr == "bias" else ndim - len(owner.names) + owner.contract
        return inputs, inputs
    return (1 if ndim > 1 else 0), None


def _pattern(logical, spec, inputs: int | None, batch_axes: set) -> str:
    """The placement's name from the data: which dimensions are split, over which mesh axes, and whether a
    split dimension is a matmul input (`inputs`: the number of leading input dimensions, None if no matmul)."""
    parts = []
    for dim, (name, axes) in enumerate(zip(logical, spec)):
        if not axes:
            continue
        if set(axes) & batch_axes:
            parts.append("FSDP")
        if not set(axes) - batch_axes:
            continue
        if name == "vocab":
            parts.append("vocab-parallel")
        elif inputs is None:
            parts.append("split")
        else:
            parts.append("row-parallel" if dim < inputs else "column-parallel")
    if not parts:
        return "replicated"
    tp = [p for p in parts if p != "FSDP"]
    return " + ".join(dict.fromkeys(tp + (["FSDP"] if "FSDP" in parts else [])))


def _note(owner, parent, spec, mesh) -> str:
    """Why a weight sits as it does, where its layer knows: kv heads fewer than the model axis are copied."""
    if isinstance(parent, Attention) and owner in (parent.k, parent.v) and parent.kv_replicated():
        heads_axes = mesh_axes(parent.layout.rules.get("heads"))
        split = split_size(heads_axes, mesh)
        K = owner.kernel.get_value().shape[-2]
        return (
            f"k, v: {K} kv heads < {'+'.join(heads_axes)} axis {split}, so not split over it: every device "
            f"keeps all {K} and uses those its query heads read"
        )
    return ""


def _pieces(sharding: jax.sharding.NamedSharding, shape) -> tuple[DevicePiece, ...]:
    """Each device's [start, stop) per dimension, from the sharding's own device -> index map."""
    coords = {d.id: tuple(int(i) for i in ix) for ix, d in np.ndenumerate(sharding.mesh.devices)}
    index = sharding.devices_indices_map(tuple(shape))
    return tuple(
        DevicePiece(d.id, coords[d.id], bounds_of(index[d], shape)) for d in sorted(index, key=lambda d: d.id)
    )


def bounds_of(index, shape) -> tuple[tuple[int, int], ...]:
    """A tuple of slices (a shard's index) as [start, stop) per dimension."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def figure_size(n_kinds: int) -> tuple[int, int]:
    """The PNG's (width, height) in pixels for `n_kinds` weight panels: fixed, so callers can rely on it."""
    rows = max(1, -(-n_kinds // PANELS_PER_ROW))
    return round(FIG_WIDTH_IN * DPI), round((HEADER_IN + rows * PANEL_IN) * DPI)


def plot_layout(model: nnx.Module, path, title: str | None = None) -> list[WeightKind]:
    """Draw the mesh and every weight kind's placement (layout_cells) into the PNG `path`; returns the data
    drawn. Its pixel size is figure_size(len(kinds))."""
    from matplotlib.figure import Figure  # no pyplot: nothing global changes, saving a PNG uses Agg

    kinds = layout_cells(model)
    if not kinds:
        raise ValueError(
            "plot_layout: the model has no sharded arrays (build it on a mesh: Transformer.create)"
        )
    mesh = _mesh_of(model)
    width_px, height_px = figure_size(len(kinds))
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    colours = _device_colours(mesh, kinds)
    _draw_header(fig, model, mesh, kinds, colours, height_px / DPI, title)
    for i, kind in enumerate(kinds):
        r, c = divmod(i, PANELS_PER_ROW)
        w = FIG_WIDTH_IN / PANELS_PER_ROW
        box = (c * w, height_px / DPI - HEADER_IN - (r + 1) * PANEL_IN, w, PANEL_IN)
        _draw_kind(fig, box, kind, colours, (width_px / DPI, height_px / DPI))
    fig.savefig(path, dpi=DPI)
    return kinds


def _mesh_of(model) -> jax.sharding.Mesh:
    for _, var in nnx.to_flat_state(nnx.state(model)):
        sharding = getattr(var.get_value() if isinstance(var, nnx.Variable) else var, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    raise ValueError("plot_layout: no NamedSharding found")


def _device_colours(mesh, kinds) -> dict[int, tuple]:
    """A colour per device, shared by devices that hold the same piece of every weight: their coordinates on
    the mesh axes that split some weight agree (they differ only on pure data-parallel axes)."""
    from matplotlib import colormaps

    splitting = [i for i, a in enumerate(mesh.axis_names) if any(a in axes for k in kinds for axes in k.spec)]
    classes: dict = {}
    ids = {}
    for ix, d in np.ndenumerate(mesh.devices):
        ids[d.id] = classes.setdefault(tuple(ix[i] for i in splitting), len(classes))
    n = len(classes)
    # Qualitative palettes without their greys (grey would read as "shared"); hsv beyond 18 classes.
    listed = [i for i in range(10) if i != 7] if n <= 9 else [i for i in range(20) if i not in (14, 15)]
    cmap = colormaps["tab10" if n <= 9 else "tab20" if n <= 18 else "hsv"]
    pick = (lambda j: cmap(listed[j])) if n <= 18 else (lambda j: cmap(j / n))
    light = lambda rgba: tuple(0.55 * c + 0.45 for c in rgba[:3]) + (1.0,)
    return {i: light(pick(j)) for i, j in ids.items()}


def _compact(ids) -> str:
    """Device ids as short text: runs become ranges ("0-3,6")."""
    ids, out, start = sorted(ids), [], None
    for i, d in enumerate(ids):
        start = d if start is None else start
        if i + 1 == len(ids) or ids[i + 1] != d + 1:
            out.append(str(start) if start == d else f"{start}-{d}" if d > start + 1 else f"{start},{d}")
            start = None
    return ",".join(out)


def _axes_in(fig, box, size):
    """An Axes over `box` (inches, x0 y0 w h from the figure's bottom-left) whose data units are inches."""
    W, H = size
    ax = fig.add_axes((box[0] / W, box[1] / H, box[2] / W, box[3] / H))
    ax.set_xlim(0, box[2])
    ax.set_ylim(0, box[3])
    ax.axis("off")
    return ax


def _draw_header(fig, model, mesh, kinds, colours, fig_h, title):
    """The mesh as a grid of devices (id and coordinates, coloured), beside the legend and the rules table."""
    size = (FIG_WIDTH_IN, fig_h)
    grid_w = 6.2
    ax = _axes_in(fig, (0.1, fig_h - HEADER_IN, grid_w, HEADER_IN - 0.05), size)
    names, shape = tuple(mesh.axis_names), tuple(mesh.devices.shape)
    devices, coords_of = mesh.devices, {d.id: ix for ix, d in np.ndenumerate(mesh.devices)}
    if devices.ndim == 1:
        names, shape, devices = ("",) + names, (1,) + shape, devices[None]
    # A 2-axis mesh is one grid (rows: first axis); a 3-axis mesh one grid per index of its first axis.
    outer = 1 if devices.ndim == 2 else shape[0]
    grids = [devices] if devices.ndim == 2 else [devices[i] for i in range(outer)]
    gr, gc = grids[0].shape
    top, label_w, gap = 0.5, 0.75, 0.35
    cell = min(0.75, (grid_w - outer * label_w - (outer - 1) * gap) / (outer * gc), (HEADER_IN - 0.95) / gr)
    ax.text(0, HEADER_IN - 0.12, f"mesh {_mesh_text(mesh)}", fontsize=11, weight="bold", va="top")
    ax.text(
        0,
        HEADER_IN - 0.34,
        f"cell: device id, coordinates ({', '.join(mesh.axis_names)})",
        fontsize=8,
        va="top",
        color="#444",
    )
    row_name, col_name = names[-2], names[-1]
    x = label_w
    for g, grid in enumerate(grids):
        y0 = HEADER_IN - top - 0.2
        if devices.ndim == 3:
            ax.text(x + gc * cell / 2, y0 + 0.02, f"{names[0]}={g}", ha="center", va="bottom", fontsize=9)
        for (r, c), d in np.ndenumerate(grid):
            cx, cy = x + c * cell, y0 - (r + 1) * cell
            ax.add_patch(_rect(cx, cy, cell, cell, colours[d.id]))
            coords_text = "(" + ",".join(str(int(i)) for i in coords_of[d.id]) + ")"
            big, small = min(12.0, cell * 72 * 0.4), min(7.0, cell * 72 * 0.85 / (0.6 * len(coords_text)))
            ax.text(
                cx + cell / 2,
                cy + cell * 0.6,
                str(d.id),
                ha="center",
                va="center",
                fontsize=big,
                weight="bold",
            )
            ax.text(cx + cell / 2, cy + cell * 0.22, coords_text, ha="center", va="center", fontsize=small)
            if r == 0:
                ax.text(
                    cx + cell / 2, y0 - gr * cell - 0.05, f"{col_name}={c}", ha="center", va="top", fontsize=7
                )
            if c == 0 and row_name:
                ax.text(cx - 0.05, cy + cell / 2, f"{row_name}={r}", ha="right", va="center", fontsize=7)
        x += gc * cell + gap + (label_w if outer > 1 else 0)
    # Legend and rules, right of the grid.
    ax2 = _axes_in(
        fig, (grid_w + 0.4, fig_h - HEADER_IN, FIG_WIDTH_IN - grid_w - 0.5, HEADER_IN - 0.05), size
    )
    head = title or f"{type(model).__name__}: where each weight lives"
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, ModelConfig) and title is None:
        head = (
            f"{type(model).__name__}: d_model {cfg.D}, {cfg.N} heads, {cfg.K} kv heads, d_ff {cfg.F}, "
            f"vocab {cfg.V}, {cfg.L} layers"
        )
    lines = [
        "Colour = which shards a device holds: same colour, identical shards of every weight (such devices",
        "differ only along data-parallel axes). Each piece of a weight is labelled with the ids of the devices",
        "holding it; a hatched piece is held by devices of several colours.",
        "A weight is drawn as the matrix its matmul reads (input dims down, output dims across), schematically:",
        "the cut is exact, the proportions are not. Faint lines: head (or layer) boundaries.",
    ]
    layout = getattr(model, "layout", None)
    if isinstance(layout, Layout):
        split = [f"{k}\u00a0->\u00a0{v}" for k, v in layout.table() if v != "replicated" and k != "layers"]
        lines += ["", *textwrap.wrap("rules (logical axis -> mesh axis): " + ", ".join(split), 105)]
    drawn = {part for k in kinds for part in k.pattern.split(" + ")}
    lines += [""] + [f"{name}: {meaning}" for name, meaning in PATTERN_MEANING.items() if name in drawn]
    notes = sorted({k.note for k in kinds if k.note})
    lines += [line for note in notes for line in textwrap.wrap(note, 105)]
    ax2.text(0, HEADER_IN - 0.12, head, fontsize=11, weight="bold", va="top")
    ax2.text(0, HEADER_IN - 0.42, "\n".join(lines), fontsize=8, va="top", linespacing=1.4)


def _mesh_text(mesh) -> str:
    devices = mesh.devices.flat
    return (
        " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
        + f"  ({mesh.devices.size} {next(iter(devices)).platform} devices)"
    )


def _rect(x, y, w, h, colour, **kw):
    from matplotlib.patches import Rectangle

    if kw.get("hatch") and hasattr(Rectangle, "set_hatchcolor"):  # matplotlib >= 3.10; older: black hatching
        kw["hatchcolor"] = "#aaaaaa"
    return Rectangle((x, y), w, h, facecolor=colour, edgecolor="black", lw=kw.pop("lw", 0.8), **kw)


def _merged(kind: WeightKind, dims: range):
    """One side of the picture's matrix: (its size, label text, cut text, unit count for faint lines)."""
    if not len(dims):
        return 1, "", "", 0
    names = [str(kind.logical[d] or f"dim{d}") for d in dims]
    sizes = [kind.shape[d] for d in dims]
    label = " x ".join(names) + " = " + " x ".join(map(str, sizes))
    cuts = [
        f"{names[i]} cut over {'+'.join(kind.spec[d])} ({kind.shape[d] // kind.local_shape[d]})"
        for i, d in enumerate(dims)
        if kind.spec[d]
    ]
    units = sizes[0] if len(dims) > 1 and sizes[0] <= 32 else 0
    return math.prod(sizes), label, "; ".join(cuts) or "not cut", units


def _intervals(bounds, shape, dims: range) -> list[tuple[int, int]]:
    """The flat [start, stop) runs that a piece covers on the merged (row-major) side `dims`."""
    if not len(dims):
        return [(0, 1)]
    sub = [shape[d] for d in dims]
    ranges = [np.arange(*bounds[d]) for d in dims]
    flat = np.sort(np.ravel_multi_index(np.meshgrid(*ranges, indexing="ij"), sub).ravel())
    breaks = np.flatnonzero(np.diff(flat) != 1)
    starts = np.concatenate([[flat[0]], flat[breaks + 1]])
    stops = np.concatenate([flat[breaks], [flat[-1]]]) + 1
    return list(zip(starts.tolist(), stops.tolist()))


def _draw_kind(fig, box, kind: WeightKind, colours, size):
    """One weight kind: its names, pattern, the matrix cut into pieces labelled by their holders."""
    ax = _axes_in(fig, box, size)
    W, H = box[2], box[3]
    count = f"  ({len(kind.paths)}\u00a0arrays)" if len(kind.paths) > 1 else ""  # no break inside it
    names = textwrap.wrap(", ".join(kind.names) + count, 44)
    ax.text(0.15, H - 0.08, "\n".join(names[:2]), fontsize=8.5, weight="bold", va="top")
    ax.text(0.15, H - 0.46, kind.pattern, fontsize=10, va="top", color="#0b3d91", weight="bold")
    row_dims, col_dims = range(0, kind.rows), range(kind.rows, len(kind.shape))
    R, row_label, row_cut, row_units = _merged(kind, row_dims)
    C, col_label, col_cut, col_units = _merged(kind, col_dims)
    # The box: inside the panel's free area, aspect clamped so that thin and huge weights stay readable.
    area_w, area_h, left, bottom = W - 0.85, H - 1.75, 0.6, 0.62
    aspect = 0.16 if not len(row_dims) else min(max(R / C, 0.35), 1.6)
    bw = min(area_w, area_h / aspect)
    bh = bw * aspect
    x0, y0 = left + (area_w - bw) / 2, bottom + (area_h - bh) / 2 + 0.1
    col_label, col_cut = _fold(col_label, W - 0.3, 7.5, " = "), _fold(col_cut, W - 0.3, 7, "; ")
    row_label, row_cut = _fold(row_label, bh + 0.5, 7.5, " = "), _fold(row_cut, bh + 0.5, 7, "; ")
    cut_lines = col_cut.count("\n") + 1
    ax.text(x0 + bw / 2, y0 + bh + 0.05 + 0.13 * cut_lines, col_label, ha="center", va="bottom", fontsize=7.5)
    ax.text(x0 + bw / 2, y0 + bh + 0.05, col_cut, ha="center", va="bottom", fontsize=7, color="#8b0000")
    if row_label:
        cut_w = 0.13 * (row_cut.count("\n") + 1)
        ax.text(x0 - 0.07 - cut_w, y0 + bh / 2, row_label, ha="right", va="center", fontsize=7.5, rotation=90)
        ax.text(
            x0 - 0.05, y0 + bh / 2, row_cut, ha="right", va="center", fontsize=7, color="#8b0000", rotation=90
        )
    for bounds, ids in kind.holders().items():
        same = len({colours[i] for i in ids}) == 1
        colour = colours[ids[0]] if same else SHARED_FILL
        text = f"all {len(ids)}" if len(ids) == len(kind.pieces) else _compact(ids)
        rects = [
            (x0 + bw * c0 / C, y0 + bh * (1 - r1 / R), bw * (c1 - c0) / C, bh * (r1 - r0) / R)
            for r0, r1 in _intervals(bounds, kind.shape, row_dims)
            for c0, c1 in _intervals(bounds, kind.shape, col_dims)
        ]
        for rx, ry, rw, rh in rects:
            ax.add_patch(_rect(rx, ry, rw, rh, colour, lw=1.2, hatch=None if same else "///"))
        # Every part of a piece cut apart by a merge (e.g. one per scanned layer) is labelled, if it fits.
        biggest = max(rects, key=lambda r: r[2] * r[3])
        for rx, ry, rw, rh in rects:
            _fit_text(ax, rx + rw / 2, ry + rh / 2, rw, rh, text, colour, required=(rx, ry) == biggest[:2])
    for units, along in ((col_units, "x"), (row_units, "y")):
        for u in range(1, units):
            if along == "x":
                ax.plot([x0 + bw * u / units] * 2, [y0, y0 + bh], color="black", lw=0.4, alpha=0.45)
            else:
                ax.plot([x0, x0 + bw], [y0 + bh * u / units] * 2, color="black", lw=0.4, alpha=0.45)
    ax.add_patch(_rect(x0, y0, bw, bh, "none", lw=1.5))
    share = math.prod(kind.shape) // math.prod(kind.local_shape)
    local = " x ".join(map(str, kind.local_shape))
    ax.text(
        0.15,
        0.42,
        f"each device holds {local}" + (f"  (1/{share})" if share > 1 else "  (a full copy)"),
        fontsize=8,
    )
    if kind.note:
        ax.text(0.15, 0.3, "\n".join(textwrap.wrap(kind.note, 62)), fontsize=7, color="#8b0000", va="top")


def _fold(text: str, length_in: float, fontsize: float, at: str) -> str:
    """`text` broken into lines at `at` when it is longer than `length_in` inches at `fontsize`."""
    return text.replace(at, "\n" + at.lstrip()) if len(text) * fontsize * 0.6 / 72 > length_in else text


def _fit_text(ax, x, y, w, h, text, fill, required=True):
    """Device ids inside a piece: as large as fits (8 pt at most), turned upright in a tall narrow piece."""
    chars = max(len(text), 1)
    fit = lambda across, up: min(8.0, across * 72 * 0.85 / (0.62 * chars), up * 72 * 0.7)
    flat, upright = fit(w, h), fit(h, w)
    rotate = upright > flat * 1.15
    size = upright if rotate else flat
    if size < 5.0 and not required:
        return
    size = max(size, 4.0)
    box = dict(boxstyle="square,pad=0.15", facecolor=fill, edgecolor="none")  # hides hatching, head lines
    ax.text(x, y, text, ha="center", va="center", fontsize=size, rotation=90 if rotate else 0, bbox=box)
