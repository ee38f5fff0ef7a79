"""Stream a Hugging Face checkpoint straight onto the mesh, one device shard at a time.

Each parameter is built device by device: the slice a device holds is read from the safetensors file
(`get_slice`), converted (bf16 files stay bf16 for precision="bf16"; f32 is widened per shard), copied to
the device and dropped before the next slice is read; `jax.make_array_from_single_device_arrays`
assembles the pieces. Nothing is initialised at random and no full-model copy exists: the host holds
what its devices end up holding plus one shard in flight. Only addressable devices are read for, so
each process of a multi-process run reads only its own devices' slices. A file is opened per read and
closed after it, since the pages of an open memory map count toward the process's resident memory.

precision="int8"/"w8a8" quantises while streaming with the scales `jaxtp.cast` would compute. A kernel's
per-output-channel scale is the absmax over its contracted axes; for a row-parallel kernel (o, down)
those axes are split across devices, so no shard can compute it alone: the scale of each checkpoint row
(= one output channel) is first computed from the whole tensor, read in row chunks, and every shard is
then quantised with its channels' scales. The result equals cast(load(..., "f32"), "int8") exactly.
docs/hf.md has the reasoning and the measurements behind these choices.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from numpy._core import multiarray as np_multiarray

from ..build import abstract_sharded
from ..model import Transformer
from ..quant import PRECISIONS, QMAX, SCALE_FLOOR, Int8Scale, Int8Weight, channel_scale
from ..sharding import Layout
from .config import from_hf
from .files import FLOAT_DTYPES, CheckpointError, open_file, read_json, resolve, tensor_infos, weight_files
from .mapping import IGNORED_SUFFIXES, TensorMap, param_map

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
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

    def abstract(precision):
        return abstract_sharded(lambda rngs: Transformer(cfg, layout=layout, rngs=rngs), mesh, layout,
                                precision=precision)

    float_maps = {p: param_map(p, v, cfg) for p, v in nnx.to_flat_state(nnx.state(abstract("f32")))}
    _check(float_maps, infos, cfg, directory)
    graphdef, target = nnx.split(abstract(precision))
    reader = _Reader(files, infos)
    arrays = []
    with _without_huge_pages():
        for path, var in nnx.to_flat_state(target):
            source = path if not isinstance(var, Int8Scale) else \
                path[:-1] + (("table",) if path[0] == "embed" else ("kernel",))
            arrays.append((path, var.replace(reader.array(var, float_maps[source], var.get_value().sharding))))
    return nnx.merge(graphdef, nnx.from_flat_state(arrays))


@contextlib.contextmanager
def _without_huge_pages():
    """numpy asks the kernel for transparent huge pages for large arrays. Where the kernel compacts memory to
    serve that request (THP defrag "madvise"), the loader's stream of large short-lived shards spent more
    time in page faults than in copying (1 GB bf16 checkpoint to f32 on 8 CPU devices: 5.4 -> 2.9 s). Off
    while loading, restored after; a numpy without the switch is left alone."""
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
            raise CheckpointError(f"{directory} lacks tensor {name!r} that config.json implies; the weights do not "
                                  "match config.json (wrong architecture or an incomplete download)")
        shape, dtype = infos[name]
        if shape != tm.hf_shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(shape)} but config.json implies "
                                  f"{list(tm.hf_shape)}; the weights and config.json disagree")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}; jaxtp.hf loads float checkpoints "
                                  f"({', '.join(FLOAT_DTYPES)}), not pre-quantised ones")
    extra = [n for n in infos if n not in expected and not n.endswith(IGNORED_SUFFIXES)
             and not (cfg.tie_embeddings and n == "lm_head.weight")]
    if extra:
        raise CheckpointError(f"{directory} holds {len(extra)} tensor(s) that config.json does not imply, e.g. "
                              f"{extra[0]!r}; the weights do not match config.json")


class _Reader:
    """Reads jaxtp shards out of the checkpoint's files. A file is opened for each read and closed after it,
    so the pages of its memory map that a read touched stop counting as resident at once."""

    def __init__(self, files, infos):
        self.files, self.infos = files, infos
        self.scales = {}  # HF name -> per-row int8 scales (f32, one per output channel: small)

    def get(self, name, hf_index):
        if any(s.stop <= s.start for s in hf_index):  # wholly inside the vocab padding
            return np.zeros([s.stop - s.start for s in hf_index], _numpy_dtype(self.infos[name][1]))
        with open_file(self.files[name]) as f:
            return f.get_slice(name)[hf_index]

    def array(self, var, mapping, sharding) -> jax.Array:
        """One parameter, built device by device: each shard is read, converted, copied to its device and
        dropped before the next is read (make_array_from_callback would read every shard first). Devices
        holding the same shard (replicas) share one read."""
        names, tm, stacked = mapping
        shape = tuple(var.shape)
        per_layer = shape[1:] if stacked else shape
        quantised = isinstance(var, (Int8Weight, Int8Scale))
        scales = [self.row_scales(n) for n in names] if quantised else None

        def one_layer(i, index):
            if isinstance(var, Int8Scale):
                return _scale_array(scales[i], per_layer)[index]
            read = functools.partial(tm.read, lambda hf_index: self.get(names[i], hf_index), per_layer)
            if isinstance(var, Int8Weight):
                s = _scale_array(scales[i], _scale_shape(per_layer, tm))
                return _quantised_shard(read, index, s[tuple(index[d] if d in tm.row_axis_dims() else slice(None)
                                                             for d in range(len(index)))], tm.row_axis_dims()[0])
            return _to_dtype(read(index), NUMPY_DTYPES[str(var.dtype)])

        def shard(index):
            if stacked:
                return np.stack([one_layer(i, index[1:]) for i in range(index[0].start, index[0].stop)])
            return one_layer(0, index)

        indices = {d: tuple(slice(*s.indices(n)[:2]) for s, n in zip(idx, shape))
                   for d, idx in sharding.addressable_devices_indices_map(shape).items()}
        left = collections.Counter((tuple((s.start, s.stop) for s in idx)) for idx in indices.values())
        held, pieces = {}, []
        for device, index in indices.items():
            key = tuple((s.start, s.stop) for s in index)
            if key not in held:
                held[key] = shard(index)
            pieces.append(jax.device_put(held[key], device).block_until_ready())
            left[key] -= 1
            if not left[key]:
                del held[key]
        return jax.make_array_from_single_device_arrays(shape, sharding, pieces)

    def row_scales(self, name) -> np.ndarray:
        """The int8 scale of every row of HF tensor `name` (one output channel each), read in row chunks;
        kept for the kernel's scale array, which needs the same numbers."""
        if name not in self.scales:
            shape = self.infos[name][0]
            rows, cols = shape[0], math.prod(shape[1:])
            step = max(1, CHUNK_ELEMENTS // max(cols, 1))
            absmax = np.empty((rows,), np.float32)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                chunk = self.get(name, (slice(r0, r1),) + tuple(slice(0, n) for n in shape[1:]))
                absmax[r0:r1] = _row_absmax(chunk.reshape(r1 - r0, -1))
            self.scales[name] = channel_scale(absmax, np)
        return self.scales[name]


def _row_absmax(x_RC) -> np.ndarray:
    """max |x| per row, as f32. For bf16 and f32 on the bit patterns: clearing the sign bit and comparing as
    unsigned integers orders magnitudes exactly as floats do (NaN included, which stays NaN), with no
    float conversion of the chunk."""
    bits = {np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7FFF), np.dtype(np.float32): (np.uint32, 0x7FFFFFFF)}
    if x_RC.dtype not in bits:
        return np.max(np.abs(x_RC.astype(np.float32)), axis=1)
    uint, magnitude = bits[x_RC.dtype]
    top_R = np.max(np.bitwise_and(x_RC.view(uint), uint(magnitude)), axis=1)
    return _to_dtype(top_R.view(x_RC.dtype), np.float32)


def _to_dtype(w, dtype) -> np.ndarray:
    """w in `dtype`, without a copy when it already is. bf16 -> f32 is exact as a 16-bit shift of the bits,
    which numpy runs vectorised (ml_dtypes' element-wise cast is several times slower)."""
    if w.dtype == ml_dtypes.bfloat16 and dtype == np.float32:
        return np.left_shift(w.view(np.uint16), 16, dtype=np.uint32).view(np.float32)
    return w.astype(dtype, copy=False)


def _quantised_shard(read, index, scale, axis: int) -> np.ndarray:
    """The int8 shard at `index`, read and quantised a few MB at a time along `axis`, a dimension of the
    checkpoint's rows (contiguous in the file, and each chunk's scales are a slice of `scale`). A whole
    shard's f32 temporaries, freed between parameters, left the heap fragmented (int8 peak/final 1.30)."""
    out = np.empty([s.stop - s.start for s in index], np.int8)
    span = index[axis]
    step = max(1, CHUNK_ELEMENTS * out.shape[axis] // max(1, out.size))
    for r0 in range(span.start, span.stop, step):
        part = slice(r0 - span.start, min(r0 + step, span.stop) - span.start)
        at = tuple(part if d == axis else slice(None) for d in range(out.ndim))
        sub = tuple(slice(span.start + part.start, span.start + part.stop) if d == axis else s
                    for d, s in enumerate(index))
        out[at] = _quantise(read(sub), scale[at])
    return out


def _quantise(w, scale) -> np.ndarray:
    """int8 of w with its channels' scales: round-half-even(w / scale) clipped to +-127, as quant.quantize
    computes it, in place on the f32 values (a fresh read, owned here)."""
    w = _to_dtype(w, np.float32)
    w = w if w.flags.writeable else w.copy()
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


def _numpy_dtype(st_dtype: str):
    return {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}[st_dtype]
