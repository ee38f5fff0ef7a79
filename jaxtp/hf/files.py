"""A Hugging Face checkpoint directory on disk: its config, and which safetensors file holds each tensor.

Only safetensors are read: a PyTorch `.bin`/`.pt`/`.pth` checkpoint is a pickle, which can run code
when loaded, so it is refused with a pointer to safetensors and never opened. Headers are read and
checked (shapes, dtypes, offsets within the file) before any weight is touched, so a truncated or
corrupt file fails before anything is allocated.
"""

from __future__ import annotations

import json
import pathlib

from safetensors import safe_open

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "consolidated.00.pth")
FLOAT_DTYPES = ("F32", "BF16", "F16")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the problem and the fix."""


def resolve(path) -> pathlib.Path:
    """A local checkpoint directory; a hub id is fetched through huggingface_hub when that is installed."""
    p = pathlib.Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint's directory (the one holding config.json)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"no checkpoint directory at {path}; pass a local directory holding config.json and "
                              "*.safetensors (or install huggingface_hub to resolve hub ids)") from None
    try:
        return pathlib.Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as e:  # network, auth, unknown repo: one line, whatever the hub client raised
        raise CheckpointError(f"no checkpoint directory at {path}, and fetching it as a hub id failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_json(path: pathlib.Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent} has no {path.name}; {what}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__}: {e}); re-save or re-download it") \
            from None


def weight_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """{tensor name: file} from model.safetensors.index.json, or from the single model.safetensors."""
    if (directory / INDEX).exists():
        index = read_json(directory / INDEX, "")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{directory / INDEX} has no weight_map; re-save the checkpoint with "
                                  "save_pretrained(safe_serialization=True)")
        files = {name: directory / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(f"{f.name} is listed in {INDEX} but missing from {directory}; "
                                      "download the whole checkpoint")
        return files
    if (directory / SINGLE).exists():
        return {name: directory / SINGLE for name in _header(directory / SINGLE)}
    pickled = [p for p in PICKLED if (directory / p).exists()] + [p.name for p in directory.glob("*.bin")]
    if pickled:
        raise CheckpointError(f"{directory} holds PyTorch pickle weights ({pickled[0]}), which jaxtp never unpickles "
                              "(loading a pickle can run code); convert them to safetensors, e.g. "
                              "model.save_pretrained(out, safe_serialization=True) in transformers")
    raise CheckpointError(f"{directory} has no weights: expected {SINGLE}, or {INDEX} with its shards")


def _header(file: pathlib.Path) -> dict:
    """The safetensors header {name: {dtype, shape, data_offsets}}, checked against the file's size."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}); it is truncated or corrupt: "
                              "download or save it again") from None
    header.pop("__metadata__", None)
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file} is truncated: its header needs {8 + n + end:,} bytes, the file has {size:,}; "
                              "download or save it again")
    return header


def tensor_infos(files: dict[str, pathlib.Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, safetensors dtype)} for every tensor, from the headers only."""
    out = {}
    for file in sorted(set(files.values())):
        for name, t in _header(file).items():
            if files.get(name) == file:
                out[name] = (tuple(t["shape"]), t["dtype"])
    missing = sorted(set(files) - set(out))
    if missing:
        raise CheckpointError(f"{files[missing[0]].name} lacks {missing[0]} although the index lists it there; "
                              "the checkpoint is inconsistent: download or save it again")
    return out


def open_file(file: pathlib.Path):
    """safe_open in numpy mode (bf16 arrives as ml_dtypes.bfloat16). Callers open a file per tensor and close
    it after: the memory map's touched pages count toward the process's resident memory while it is open."""
    try:
        return safe_open(str(file), framework="numpy")
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise CheckpointError(f"{file} could not be opened as safetensors ({e}); download or save it again") \
            from None
