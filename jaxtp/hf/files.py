"""A Hugging Face checkpoint directory on disk: its config, and which safetensors file holds each tensor.

Only safetensors are read: a PyTorch `.bin`/`.pt`/`.pth` checkpoint is a pickle, which can run code
when loaded, so it is refused with a pointer to safetensors and never opened. Headers are read and
checked (shapes, dtypes, offsets within the file) before any weight is touched, so a truncated or
corrupt file fails before anything is allocated.

Weights are read with plain positioned reads (`RowReader`) rather than safetensors' memory-mapped
`get_slice`: the format is a JSON header followed by each tensor's raw little-endian bytes, so a run of
rows is one contiguous read into a reused buffer; a memory map faults in every page it touches and a
sliced read copies element runs, several times slower (measurements: docs/hf.md).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import NamedTuple

import ml_dtypes
import numpy as np

__all__ = [
    "SINGLE",
    "INDEX",
    "PICKLED",
    "FLOAT_DTYPES",
    "NUMPY_DTYPES",
    "TensorInfo",
    "CheckpointError",
    "resolve",
    "read_json",
    "weight_files",
    "tensor_infos",
    "RowReader",
]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.pt",
    "model.pth",
    "consolidated.00.pth",
)
FLOAT_DTYPES = ("F32", "BF16", "F16")
NUMPY_DTYPES = {
    "F32": np.dtype(np.float32),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
}


class TensorInfo(NamedTuple):
    """Where a tensor's bytes are: `start` is the absolute offset of its data in `file`."""

    shape: tuple[int, ...]
    dtype: str  # the safetensors name: F32, BF16, ...
    file: pathlib.Path
    start: int
    nbytes: int


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the problem and the fix."""


def resolve(path) -> pathlib.Path:
    """A local checkpoint directory; a hub id is fetched through huggingface_hub when that is installed."""
    p = pathlib.Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(
            f"{path} is a file; pass the checkpoint's directory (the one holding config.json)"
        )
    try:  # an optional dependency, imported only when a hub id is given
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"no checkpoint directory at {path}; pass a local directory holding config.json and "
            "*.safetensors (or install huggingface_hub to resolve hub ids)"
        ) from None
    try:
        return pathlib.Path(
            snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.jinja"])
        )
    except Exception as e:  # network, auth, unknown repo: one line, whatever the hub client raised
        raise CheckpointError(
            f"no checkpoint directory at {path}, and fetching it as a hub id failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def read_json(path: pathlib.Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}; {what}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({type(e).__name__}: {e}); re-save or re-download it"
        ) from None


def weight_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """{tensor name: file} from model.safetensors.index.json, or from the single model.safetensors."""
    if (directory / INDEX).exists():
        index = read_json(directory / INDEX, "")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                f"{directory / INDEX} has no weight_map; re-save the checkpoint with "
                "save_pretrained(safe_serialization=True)"
            )
        files = {name: directory / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(
                    f"{f.name} is listed in {INDEX} but missing from {directory}; download the whole checkpoint"
                )
        return files
    if (directory / SINGLE).exists():
        return {name: directory / SINGLE for name in _header(directory / SINGLE)[0]}
    pickled = [p for p in PICKLED if (directory / p).exists()] + [p.name for p in directory.glob("*.bin")]
    if pickled:
        raise CheckpointError(
            f"{directory} holds PyTorch pickle weights ({pickled[0]}), which jaxtp never unpickles "
            "(loading a pickle can run code); convert them to safetensors, e.g. "
            "model.save_pretrained(out, safe_serialization=True) in transformers"
        )
    raise CheckpointError(f"{directory} has no weights: expected {SINGLE}, or {INDEX} with its shards")


def _header(file: pathlib.Path) -> tuple[dict, int]:
    """The safetensors header {name: {dtype, shape, data_offsets}}, checked against the file's size, and the
    offset where the data (which data_offsets count from) begins."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({e}); it is truncated or corrupt: download or save it again"
        ) from None
    header.pop("__metadata__", None)
    for name, t in header.items():
        begin, stop = (int(o) for o in t["data_offsets"])
        item = NUMPY_DTYPES[t["dtype"]].itemsize if t["dtype"] in NUMPY_DTYPES else None
        if not 0 <= begin <= stop or (item and stop - begin != math.prod(t["shape"]) * item):
            raise CheckpointError(
                f"{file} is corrupt: tensor {name!r} spans bytes {begin}..{stop}, which does not "
                f"fit its shape {t['shape']} and dtype {t['dtype']}; download or save it again"
            )
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{file} is truncated: its header needs {8 + n + end:,} bytes, the file has {size:,}; "
            "download or save it again"
        )
    return header, 8 + n


def tensor_infos(files: dict[str, pathlib.Path]) -> dict[str, TensorInfo]:
    """{name: TensorInfo} for every tensor, from the headers only."""
    out = {}
    for file in sorted(set(files.values())):
        header, data_start = _header(file)
        for name, t in header.items():
            if files.get(name) == file:
                begin, stop = (int(o) for o in t["data_offsets"])
                out[name] = TensorInfo(tuple(t["shape"]), t["dtype"], file, data_start + begin, stop - begin)
    missing = sorted(set(files) - set(out))
    if missing:
        raise CheckpointError(
            f"{files[missing[0]].name} lacks {missing[0]} although the index lists it there; "
            "the checkpoint is inconsistent: download or save it again"
        )
    return out


class RowReader:
    """Reads runs of rows (first-axis slices, contiguous in the file) into one reused buffer. The returned
    array is a view of that buffer, valid until the next read: callers copy out what they keep. Files stay
    open until `close`; plain reads, unlike a memory map, leave nothing of the file resident."""

    def __init__(self):
        self.handles, self.buffer, self.last = {}, np.empty(0, np.uint8), None

    def rows(self, name: str, info: TensorInfo, r0: int, r1: int) -> np.ndarray:
        key = (name, r0, r1)
        if key != self.last:
            row_bytes = info.nbytes // max(info.shape[0], 1) if info.shape else info.nbytes
            n = (r1 - r0) * row_bytes if info.shape else info.nbytes
            if self.buffer.size < n:
                self.buffer = np.empty(n, np.uint8)
            self.read_into(info, info.start + r0 * row_bytes, memoryview(self.buffer[:n]))
            self.last = key
        shape = ((r1 - r0),) + info.shape[1:] if info.shape else ()
        return (
            self.buffer[: math.prod(shape) * NUMPY_DTYPES[info.dtype].itemsize]
            .view(NUMPY_DTYPES[info.dtype])
            .reshape(shape)
        )

    def read_into(self, info: TensorInfo, offset: int, view: memoryview):
        """Fill `view` with the file's bytes from `offset`: every read of the loader passes here."""
        if info.file not in self.handles:
            self.handles[info.file] = open(info.file, "rb", buffering=0)
        f = self.handles[info.file]
        f.seek(offset)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise CheckpointError(
                    f"{info.file} ended early: it is truncated or was changed while loading; download or save it again"
                )
            done += got

    def close(self):
        for f in self.handles.values():
            f.close()
        self.handles, self.buffer, self.last = {}, np.empty(0, np.uint8), None
