"""Write a jaxtp model as a Hugging Face checkpoint that `transformers.AutoModelForCausalLM.from_pretrained`
loads unchanged: config.json, safetensors (sharded above `max_shard_bytes`, with an index) and, given a
tokenizer, its files.

One tensor at a time is gathered to the host and written. Every tensor's shape and dtype are known from
the config before any is gathered, so each file's safetensors header (names, dtypes, byte offsets) is
written first and the tensors are streamed after it: host memory stays at one tensor, where the
`safetensors` library's writers take a whole file's tensors at once. The layout is safetensors' own:
an 8-byte little-endian header length, the JSON header padded with spaces to 8 bytes, then the data.

Precisions: f32 and bf16 models are written as they are; int8/w8a8 models are dequantized
(int8 x scale) and written as bf16, since the checkpoint format has no place for jaxtp's scales. The
output is written into a temporary directory beside `path` and renamed when complete; an existing
non-empty `path` is refused unless force=True.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ..distributed import to_host
from ..int8 import Int8Scale, Int8Weight
from ..quant import precision_of
from .config import to_hf
from .files import INDEX, SINGLE
from .mapping import param_map

__all__ = ["save"]

ST_DTYPES = {"float32": "F32", "bfloat16": "BF16"}
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' own default max_shard_size
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def save(
    model,
    path,
    tokenizer=None,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    architecture: str | None = None,
    force: bool = False,
) -> pathlib.Path:
    """Write `model` (a jaxtp Transformer, any mesh and precision) as a Hugging Face checkpoint at `path`."""
    path = pathlib.Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise FileExistsError(
            f"{path} already exists and is not empty; choose a new directory or pass force=True"
        )
    cfg = model.cfg
    precision = precision_of(model)
    dtype = "bfloat16" if precision in ("bf16", "int8", "w8a8") else "float32"
    tensors = _tensors(model, dtype)
    hf_config = to_hf(cfg, dtype, architecture, extra=_token_ids(tokenizer))
    writer = jax.process_index() == 0
    tmp = (
        pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.absolute().parent))
        if writer
        else None
    )
    try:
        shards = _shard(tensors, max_shard_bytes)
        for k, names in enumerate(shards):
            file = SINGLE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_file(tmp / file if writer else None, [(n, tensors[n]) for n in names])
        if writer:
            if len(shards) > 1:
                total = sum(math.prod(t[0]) * np.dtype(t[1]).itemsize for t in tensors.values())
                weight_map = {
                    n: f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                    for k, names in enumerate(shards)
                    for n in names
                }
                (tmp / INDEX).write_text(
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
                )
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
            if tokenizer is not None:
                for name in TOKENIZER_FILES:
                    if (tokenizer.path / name).is_file():
                        shutil.copyfile(tokenizer.path / name, tmp / name)
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
    finally:
        if writer and tmp.exists():
            shutil.rmtree(tmp)
    return path


def _token_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    eos = tokenizer.eos_token_ids
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
    return {k: v for k, v in ids.items() if v is not None}


def _tensors(model, dtype: str) -> dict:
    """{HF name: (shape, numpy dtype, fetch)} in checkpoint order; fetch() gathers that one tensor."""
    cfg = model.cfg
    state = dict(nnx.to_flat_state(nnx.state(model)))
    out = {}
    for path, var in state.items():
        if isinstance(var, Int8Scale) or not isinstance(var, (nnx.Param, Int8Weight)):
            continue
        names, tm, stacked = param_map(path, var, cfg)
        scale = state.get(path[:-1] + ("scale",)) if isinstance(var, Int8Weight) else None
        for i, name in enumerate(names):
            out[name] = (
                tm.hf_shape,
                _np_dtype(dtype),
                _fetcher(var, scale, tm, i if stacked else None, dtype),
            )
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _fetcher(var, scale, tm, layer, dtype):
    def fetch():
        w = var[...] if layer is None else var[...][layer]
        if scale is not None:
            s = scale[...] if layer is None else scale[...][layer]
            w = w.astype(jnp.float32) * s
        return tm.to_hf(to_host(w.astype(dtype)))

    return fetch


def _order(name: str):
    """Embedding, layers in numeric order, final norm, head: the order transformers writes."""
    if name.startswith("model.layers."):
        i, rest = name[len("model.layers.") :].split(".", 1)
        return (1, int(i), rest)
    return (0 if "embed_tokens" in name else 2 if name == "model.norm.weight" else 3, 0, name)


def _np_dtype(dtype: str):
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)


def _shard(tensors: dict, max_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, (shape, dt, _) in tensors.items():
        n = math.prod(shape) * dt.itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _write_file(file, items) -> None:
    """safetensors layout, streamed: header first (offsets from the shapes), then one tensor at a time.
    Every process gathers (the gathers are collective); only the writer (file not None) writes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, dt, _) in items:
        n = math.prod(shape) * dt.itemsize
        header[name] = {
            "dtype": ST_DTYPES[dt.name],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f = open(file, "wb") if file is not None else None
    try:
        if f:
            f.write(len(raw).to_bytes(8, "little") + raw)
        for name, (shape, dt, fetch) in items:
            data = fetch()
            if tuple(data.shape) != tuple(shape) or data.dtype != dt:
                raise AssertionError(f"{name}: gathered {data.shape} {data.dtype}, header says {shape} {dt}")
            if f:
                f.write(np.ascontiguousarray(data).tobytes())
    finally:
        if f:
            f.close()
