"""Which Hugging Face tensor holds each jaxtp parameter, and how a slice of one is read from the other.

A torch Linear stores its weight as [out, in]; jaxtp's kernels are [in..., out...] with the head axes
apart (q: [D, N, H] from q_proj [N*H, D]; o: [N, H, D] from o_proj [D, N*H]). Every HF dimension is a
group of jaxtp dimensions flattened row-major (`groups`, in HF order), so a jaxtp slice is read as one
rectangular HF slice: the first dimension of each group picks a contiguous run of rows or columns, whole
in the group's inner dimensions, which are then cut in numpy (no preset splits head_dim, so in practice
nothing extra is read). Vocab rows past the checkpoint's vocab_size are jaxtp's padding: zeros.
A scanned model's block parameters carry a leading layer axis: one read per layer, stacked.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "LAYER",
    "BLOCK_NAMES",
    "TOP_NAMES",
    "CONTRACT",
    "IGNORED_SUFFIXES",
    "TensorMap",
    "tensor_map",
    "layer_name",
    "param_map",
]

LAYER = "model.layers.{i}."
# jaxtp path inside a block -> HF name after "model.layers.{i}."
BLOCK_NAMES = {
    "attn_norm/scale": "input_layernorm.weight",
    "mlp_norm/scale": "post_attention_layernorm.weight",
    "attn/q/kernel": "self_attn.q_proj.weight",
    "attn/k/kernel": "self_attn.k_proj.weight",
    "attn/v/kernel": "self_attn.v_proj.weight",
    "attn/o/kernel": "self_attn.o_proj.weight",
    "attn/q/bias": "self_attn.q_proj.bias",
    "attn/k/bias": "self_attn.k_proj.bias",
    "attn/v/bias": "self_attn.v_proj.bias",
    "attn/q_norm/scale": "self_attn.q_norm.weight",
    "attn/k_norm/scale": "self_attn.k_norm.weight",
    "mlp/gate/kernel": "mlp.gate_proj.weight",
    "mlp/up/kernel": "mlp.up_proj.weight",
    "mlp/down/kernel": "mlp.down_proj.weight",
}
TOP_NAMES = {
    "embed/table": "model.embed_tokens.weight",
    "final_norm/scale": "model.norm.weight",
    "head/kernel": "lm_head.weight",
}
# Kernels contract their leading `contract` axes (Linear.contract); the rest are outputs.
CONTRACT = {
    "attn/q/kernel": 1,
    "attn/k/kernel": 1,
    "attn/v/kernel": 1,
    "attn/o/kernel": 2,
    "mlp/gate/kernel": 1,
    "mlp/up/kernel": 1,
    "mlp/down/kernel": 1,
    "head/kernel": 1,
}
# Tensors some exporters write that carry nothing jaxtp needs (recomputed RoPE tables).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One jaxtp parameter (of one layer) <-> one HF tensor. `groups[k]` lists the jaxtp dims flattened into
    HF dim k; `hf_shape` is the tensor's shape in the checkpoint (unpadded)."""

    hf_name: str
    groups: tuple[tuple[int, ...], ...]
    hf_shape: tuple[int, ...]

    def read(self, get, shape, index) -> np.ndarray:
        """jaxtp array of `shape` restricted to `index` (slices with ints), read through `get(hf_index)`."""
        hf_index, inner_shape, pad = [], [], []
        for k, g in enumerate(self.groups):
            inner = math.prod(shape[d] for d in g[1:])
            lo, hi = index[g[0]].start * inner, index[g[0]].stop * inner
            stop = min(hi, self.hf_shape[k])
            hf_index.append(slice(min(lo, stop), stop))
            pad.append((0, (hi - lo) - (stop - min(lo, stop))))
            inner_shape += [index[g[0]].stop - index[g[0]].start, *(shape[d] for d in g[1:])]
        block = np.asarray(get(tuple(hf_index)))
        if any(p for _, p in pad):
            block = np.pad(block, pad)
        block = block.reshape(inner_shape)
        order = [d for g in self.groups for d in g]
        block = block[tuple(slice(None) if d in [g[0] for g in self.groups] else index[d] for d in order)]
        return block.transpose(np.argsort(order)) if order != sorted(order) else block

    def to_hf(self, full: np.ndarray) -> np.ndarray:
        """The whole jaxtp array back in the checkpoint's layout (padding dropped)."""
        order = [d for g in self.groups for d in g]
        flat = full.transpose(order).reshape([math.prod(full.shape[d] for d in g) for g in self.groups])
        return np.ascontiguousarray(flat[tuple(slice(0, n) for n in self.hf_shape)])

    def row_axis_dims(self) -> tuple[int, ...]:
        """The jaxtp dims that make up the HF rows (a kernel's output channels; an embedding's vocab)."""
        return self.groups[0]


def tensor_map(path: str, shape: tuple[int, ...], vocab_size: int) -> TensorMap:
    """The map of jaxtp parameter `path` ("blocks/3/attn/q/kernel", "blocks/attn/q/kernel" scanned, or a
    top-level one) whose per-layer shape is `shape`. Raises KeyError for paths with no HF counterpart."""
    parts = path.split("/")
    if parts[0] == "blocks":
        rest = "/".join(parts[2:] if parts[1].isdigit() else parts[1:])
        name = LAYER + BLOCK_NAMES[rest]
    else:
        rest, name = path, TOP_NAMES[path]
    n = len(shape)
    if rest in CONTRACT:
        c = CONTRACT[rest]
        groups = (tuple(range(c, n)), tuple(range(c)))
    else:
        groups = (tuple(range(n)),) if n <= 1 or rest.endswith("bias") else tuple((d,) for d in range(n))
    hf_shape = [math.prod(shape[d] for d in g) for g in groups]
    if rest in ("embed/table", "head/kernel"):
        hf_shape[0] = vocab_size
    return TensorMap(name, groups, tuple(hf_shape))


def layer_name(name: str, i: int) -> str:
    return name.replace("{i}", str(i))


def param_map(path, var, cfg) -> tuple[list[str], TensorMap, int | None]:
    """For a model variable at `path` (its per-layer counterpart for a scanned model's stacked arrays):
    (the HF tensor names, one per layer it holds; the map; the stacked layer count, or None unstacked)."""
    names = var.get_metadata().get("out_sharding") or ()
    stacked = bool(names) and names[0] == "layers"
    key = "/".join(map(str, path))
    tm = tensor_map(key, tuple(var.shape[1:] if stacked else var.shape), cfg.vocab_size)
    if not key.startswith("blocks/"):
        return [tm.hf_name], tm, None
    layers = range(cfg.n_layers) if stacked else [int(path[1])]
    return [layer_name(tm.hf_name, i) for i in layers], tm, (cfg.n_layers if stacked else None)
