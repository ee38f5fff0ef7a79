"""Stream a Hugging Face checkpoint straight onto the mesh, one device shard at a time.

Each parameter is built device by device: the rows holding the slice a device needs are read from the
safetensors file into a reused buffer, then cut, transposed and converted in one pass into a fresh host
buffer (bf16 files stay bf16 for precision="bf16"; f32 is widened per shard) that the device adopts
(on CPU without a copy, see `host_buffer`); `jax.make_array_from_single_device_arrays` assembles the
pieces. Nothing is initialised at random and no full-model copy exists: the host holds what its devices
end up holding plus one tensor's rows in flight. Only addressable devices are read for, so each process
of a multi-process run reads only its own devices' slices.

precision="int8"/"w8a8" quantizes while streaming with the scales `jaxtp.cast` would compute. A kernel's
per-output-channel scale is the absmax over its contracted axes; for a row-parallel kernel (o, down)
those axes are split across devices, so no shard can compute it alone: the scale of each checkpoint row
(= one output channel) is first computed from the whole tensor, read in row chunks, and every shard is
then quantized with its channels' scales. The result equals cast(load(..., "f32"), "int8") exactly.
docs/hf.md has the reasoning and the measurements behind these choices.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import os

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from numpy._core import multiarray as np_multiarray

from ..build import abstract_sharded
from ..int8 import QMAX, SCALE_FLOOR, Int8Scale, Int8Weight, channel_scale
from ..model import Transformer
from ..quant import PRECISIONS, converting
from ..sharding import Layout
from .config import from_hf
from .files import (
    FLOAT_DTYPES,
    NUMPY_DTYPES,
    CheckpointError,
    RowReader,
    read_json,
    resolve,
    tensor_infos,
    weight_files,
)
from .mapping import IGNORED_SUFFIXES, TensorMap, param_map

__all__ = ["load", "host_buffer"]

ALIGN = 64  # bytes: the alignment XLA:CPU needs to adopt a host buffer without copying it
STRIP = 8  # source rows per strip of a transposed copy: measured fastest among 4..32 on XLA:CPU hosts
COPY_THREADS = max(1, min(4, os.cpu_count() or 1))
CHUNK_ELEMENTS = 1 << 20  # elements read per step when computing int8 scales: 4 MB of f32


def load(path, mesh, *, precision: str = "f32", rules=None, max_seq_len: int | None = None, **overrides):
    """A `Transformer` sharded on `mesh` with the weights of the checkpoint at `path` (see module doc).

    `precision`: "f32" | "bf16" | "int8" | "w8a8". `rules`: a rules preset or table (default megatron).
    `max_seq_len` overrides config.json's max_position_embeddings; `overrides` set other ModelConfig
    fields that do not change the weights (scan_layers, remat, compute_dtype)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid precisions are {', '.join(PRECISIONS)}")
    directory = resolve(path)
    hf = read_json(directory / "config.json", "a Hugging Face checkpoint needs it")
    cfg = from_hf(hf, max_seq_len, where=str(directory / "config.json"), **overrides)
    layout = Layout.create(cfg, mesh, rules)
    files = weight_files(directory)
    infos = tensor_infos(files)

    build = converting(lambda rngs: Transformer(cfg, layout=layout, rngs=rngs), precision)
    abstract = abstract_sharded(build, mesh, layout)
    graphdef, target = nnx.split(abstract)
    flat = nnx.to_flat_state(target)
    maps = {
        p: param_map(p, v, cfg) for p, v in flat if not isinstance(v, Int8Scale)
    }  # a scale reads its kernel
    _check(maps, infos, cfg, directory)
    reader = _Reader(files, infos)
    arrays = []
    with _without_huge_pages(), contextlib.closing(reader.rows):
        for path, var in flat:
            source = (
                path
                if not isinstance(var, Int8Scale)
                else path[:-1] + (("table",) if path[0] == "embed" else ("kernel",))
            )
            arrays.append((path, var.replace(reader.array(var, maps[source], var.get_value().sharding))))
    return nnx.merge(graphdef, nnx.from_flat_state(arrays))


@contextlib.contextmanager
def _without_huge_pages():
    """numpy asks the kernel for transparent huge pages for large arrays. Where the kernel compacts memory to
    serve that request (THP defrag "madvise"), the loader's stream of large short-lived shards spent more
    time in page faults than in copying (measurements: docs/hf.md). Off while loading, restored after; a
    numpy without the switch is left alone."""
    switch = getattr(np_multiarray, "_set_madvise_hugepage", None)
    before = switch(False) if switch else None
    try:
        yield
    finally:
        if switch:
            switch(before)


def _check(maps, infos, cfg, directory):
    """Every tensor the model needs is present with its shape and a float dtype; nothing unknown is left."""
    expected = {n: tm for names, tm, _ in maps.values() for n in names}
    for name, tm in expected.items():
        if name not in infos:
            raise CheckpointError(
                f"{directory} lacks tensor {name!r} that config.json implies; the weights do not "
                "match config.json (wrong architecture or an incomplete download)"
            )
        shape, dtype = infos[name].shape, infos[name].dtype
        if shape != tm.hf_shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(shape)} but config.json implies "
                f"{list(tm.hf_shape)}; the weights and config.json disagree"
            )
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} has dtype {dtype}; jaxtp.hf loads float checkpoints "
                f"({', '.join(FLOAT_DTYPES)}), not pre-quantized ones"
            )
    extra = [
        n
        for n in infos
        if n not in expected
        and not n.endswith(IGNORED_SUFFIXES)
        and not (cfg.tie_embeddings and n == "lm_head.weight")
    ]
    if extra:
        raise CheckpointError(
            f"{directory} holds {len(extra)} tensor(s) that config.json does not imply, e.g. "
            f"{extra[0]!r}; the weights do not match config.json"
        )


class _Reader:
    """Reads jaxtp shards out of the checkpoint's files (see files.RowReader) into host buffers that JAX
    adopts as device memory (see `host_buffer`)."""

    def __init__(self, files, infos):
        self.files, self.infos = files, infos
        self.rows = RowReader()
        self.scales = {}  # HF name -> per-row int8 scales (f32, one per output channel: small)

    def get(self, name, hf_index) -> np.ndarray:
        """The HF slice `hf_index` of tensor `name`: a view of the reader's buffer, valid until the next read."""
        info = self.infos[name]
        if any(s.stop <= s.start for s in hf_index):  # wholly inside the vocab padding
            return np.zeros([s.stop - s.start for s in hf_index], NUMPY_DTYPES[info.dtype])
        rows = self.rows.rows(name, info, hf_index[0].start, hf_index[0].stop)
        return rows[(slice(None),) + tuple(hf_index[1:])]

    def array(self, var, mapping, sharding) -> jax.Array:
        """One parameter, built device by device: each shard is read, converted into a fresh host buffer and
        handed to its device before the next is read (make_array_from_callback would read every shard
        first). Devices holding the same shard (replicas) share one read, each getting its own copy."""
        names, tm, stacked = mapping
        shape = tuple(var.shape)
        per_layer = shape[1:] if stacked else shape
        quantized = isinstance(var, (Int8Weight, Int8Scale))
        scales = [self.row_scales(n) for n in names] if quantized else None

        def fill(out, i, index):
            """Layer i's piece at `index` of this parameter, written into `out`."""
            if isinstance(var, Int8Scale):
                out[...] = _scale_array(scales[i], per_layer)[index]
                return
            read = functools.partial(tm.read, lambda hf_index: self.get(names[i], hf_index), per_layer)
            if isinstance(var, Int8Weight):
                s = _scale_array(scales[i], _scale_shape(per_layer, tm))
                rows = tm.row_axis_dims()
                _quantize_into(
                    out,
                    read,
                    index,
                    s[tuple(index[d] if d in rows else slice(None) for d in range(len(index)))],
                    rows[0],
                )
                return
            _convert_into(out, read(index))

        def shard(index):
            out = host_buffer([s.stop - s.start for s in index], var.dtype)
            if stacked:
                for j, i in enumerate(range(index[0].start, index[0].stop)):
                    fill(out[j], i, index[1:])
            else:
                fill(out, 0, index)
            return out

        indices = {
            d: tuple(slice(*s.indices(n)[:2]) for s, n in zip(idx, shape))
            for d, idx in sharding.addressable_devices_indices_map(shape).items()
        }
        held, pieces = {}, []
        for device, index in indices.items():
            key = tuple((s.start, s.stop) for s in index)
            host = held[key] = _copy(held[key]) if key in held else shard(index)
            pieces.append(jax.device_put(host, device, may_alias=True).block_until_ready())
        return jax.make_array_from_single_device_arrays(shape, sharding, pieces)

    def row_scales(self, name) -> np.ndarray:
        """The int8 scale of every row of HF tensor `name` (one output channel each), read in row chunks;
        kept for the kernel's scale array, which needs the same numbers."""
        if name not in self.scales:
            shape = self.infos[name].shape
            rows, cols = shape[0], math.prod(shape[1:])
            step = max(1, CHUNK_ELEMENTS // max(cols, 1))
            absmax = np.empty((rows,), np.float32)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                chunk = self.get(name, (slice(r0, r1),) + tuple(slice(0, n) for n in shape[1:]))
                absmax[r0:r1] = _row_absmax(chunk.reshape(r1 - r0, -1))
            self.scales[name] = channel_scale(absmax, np)
        return self.scales[name]


def host_buffer(shape, dtype) -> np.ndarray:
    """An empty host array aligned to ALIGN bytes. JAX's CPU backend adopts such an array as a device
    buffer without copying it (`device_put(..., may_alias=True)`; a misaligned one is copied), so on CPU
    devices each shard is written once, straight into the memory the device keeps. On accelerators
    device_put copies it over and the buffer is freed."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + n].view(dtype).reshape(shape)


def _copy(x) -> np.ndarray:
    """A separate buffer per replica: two devices must never share memory (donation writes in place)."""
    out = host_buffer(x.shape, x.dtype)
    np.copyto(out, x)
    return out


def _row_absmax(x_RC) -> np.ndarray:
    """max |x| per row, as f32. For bf16 and f32 on the bit patterns: clearing the sign bit and comparing as
    unsigned integers orders magnitudes exactly as floats do (NaN included, which stays NaN), with no
    float conversion of the chunk."""
    bits = {np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7FFF), np.dtype(np.float32): (np.uint32, 0x7FFFFFFF)}
    if x_RC.dtype not in bits:
        return np.max(np.abs(_as_f32(x_RC)), axis=1)
    uint, magnitude = bits[x_RC.dtype]
    top_R = np.max(np.bitwise_and(x_RC.view(uint), uint(magnitude)), axis=1)
    return _as_f32(top_R.view(x_RC.dtype))


def _convert_into(out, w):
    """out[...] = w in out's dtype; w is usually a transposed view of the checkpoint's rows (a torch weight is
    [out, in], a jaxtp kernel [in, out]).

    Copies and bf16 -> f32 (exact as a 16-bit shift) run on the bits as unsigned integers, which numpy moves
    vectorised; ml_dtypes' bf16 goes element by element through dtype hooks, many times slower on strided
    views. A transposed copy is cut into strips of STRIP source rows, so each strip's reads stay in cache
    (3x faster than one strided copy), and the strips are shared among COPY_THREADS threads (numpy drops
    the GIL while it copies)."""
    bits = {2: np.uint16, 4: np.uint32}
    if w.dtype == out.dtype and w.dtype.itemsize in bits:
        op = functools.partial(_copy_bits, bits[w.dtype.itemsize])
    elif w.dtype == ml_dtypes.bfloat16 and out.dtype == np.float32:
        op = _widen_bf16
    else:
        op = _assign
    if out.ndim == 0 or out.size < STRIP * 1024:
        op(out, w)
        return
    axis = int(np.argmax(np.abs(w.strides)))  # the source's row axis: strips cut across it
    n = out.shape[axis]
    bounds = np.linspace(0, n, COPY_THREADS + 1).astype(int) // STRIP * STRIP
    bounds[-1] = n
    parts = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def run(part):
        for i in range(part[0], part[1], STRIP):
            at = (slice(None),) * axis + (slice(i, min(i + STRIP, part[1])),)
            op(out[at], w[at])

    list(_copy_pool().map(run, parts))


def _copy_bits(uint, out, w):
    np.copyto(out.view(uint), w.view(uint))


def _widen_bf16(out, w):
    np.left_shift(w.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)


def _assign(out, w):
    out[...] = w


@functools.cache
def _copy_pool():
    return concurrent.futures.ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="jaxtp-hf-copy")


def _as_f32(w) -> np.ndarray:
    """A new f32 array of w's values (never a view: `get` returns views of a buffer that is reused)."""
    out = np.empty(w.shape, np.float32)
    _convert_into(out, w)
    return out


def _quantize_into(out, read, index, scale, axis: int):
    """The int8 shard at `index`, read and quantized into `out` a few MB at a time along `axis`, a dimension
    of the checkpoint's rows (contiguous in the file, and each chunk's scales are a slice of `scale`). A
    whole shard's f32 temporaries, freed between parameters, left the heap fragmented (int8 peak/final 1.30)."""
    span = index[axis]
    step = max(1, CHUNK_ELEMENTS * out.shape[axis] // max(1, out.size))
    for r0 in range(span.start, span.stop, step):
        part = slice(r0 - span.start, min(r0 + step, span.stop) - span.start)
        at = tuple(part if d == axis else slice(None) for d in range(out.ndim))
        sub = tuple(
            slice(span.start + part.start, span.start + part.stop) if d == axis else s
            for d, s in enumerate(index)
        )
        out[at] = _quantize(read(sub), scale[at])


def _quantize(w, scale) -> np.ndarray:
    """int8 of w with its channels' scales: round-half-even(w / scale) clipped to +-127, as quant.quantize
    computes it, in place on a fresh f32 copy."""
    w = _as_f32(w)
    np.divide(w, scale, out=w)
    np.rint(w, out=w)
    np.clip(w, -QMAX, QMAX, out=w)
    return w.astype(np.int8)


def _scale_shape(kernel_shape, tm: TensorMap):
    rows = tm.row_axis_dims()
    return tuple(n if d in rows else 1 for d, n in enumerate(kernel_shape))


def _scale_array(row_scales, scale_shape) -> np.ndarray:
    """Per-row scales laid out as the jaxtp scale (contracted dims 1); vocab padding rows get the floor."""
    full = math.prod(scale_shape)
    padded = np.pad(row_scales, (0, full - row_scales.size), constant_values=np.float32(SCALE_FLOOR))
    return padded.reshape(scale_shape)
