"""Parameters as the model declares them: global and per-device shapes, and the roles the formulas read.

Shapes and placements come from an abstract ONE-block model (`abstract_model` + the rules table): every
block declares the same parameters, and tracing all L blocks of a 70b model through nnx.eval_shape takes
minutes where one takes a second. It is built unscanned: a scanned model stacks the same per-layer
shards on an unsplit "layers" axis, so bytes and shapes per layer agree. Which parameter plays which
part (the head's weight, attention's q/k/v kernels, whether they run fused) is asked of the modules
themselves, never read from path strings.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..config import ModelConfig
from ..model import ParamInfo, abstract_model
from ..sharding import Layout, mesh_axes, resolve_rules, spec_for
from ..train import TrainConfig, make_optimizer
from .shapes import MeshShape, mesh_shape

__all__ = ["ParamInfo", "ModelParams", "model_params", "param_infos", "optimizer_bytes"]


@dataclasses.dataclass(frozen=True)
class ModelParams:
    """A model's parameters, one block's worth, with the roles the cost model needs."""

    block: tuple[ParamInfo, ...]  # one Block's parameters (paths relative to the block)
    block_path: tuple  # the nnx path of block 0 in the model, e.g. ("blocks", 0)
    outer: tuple[ParamInfo, ...]  # the parameters outside the blocks: embedding, final norm, head
    head: ParamInfo  # the weight the head multiplies by: its kernel, or the embedding table when tied
    q: ParamInfo  # a block's attention kernels, [D, N, H] and [D, K, H] twice
    k: ParamInfo
    v: ParamInfo
    qkv_fused: bool  # Attention.fused(): q, k, v run as one matmul over stacked kernels
    kv_replicated: bool  # Attention.kv_replicated(): kv heads replicated beside split query heads
    padded_vocab: int  # the embedding's rows: the vocab padded to a multiple of its split

    def expanded(self, n_layers: int) -> list[ParamInfo]:
        """Every parameter of an n_layers model, blocks in order, then the outer ones."""
        return [
            dataclasses.replace(i, path=self.layer_path(layer, i))
            for layer in range(n_layers)
            for i in self.block
        ] + list(self.outer)

    def layer_path(self, layer: int, info: ParamInfo) -> str:
        return "/".join(map(str, (*self.block_path[:-1], layer))) + "/" + info.path


def model_params(cfg: ModelConfig, mesh: MeshShape, rules: dict) -> ModelParams:
    """The parameters of `cfg` on `mesh` under resolved `rules` (cached per config, mesh and table)."""
    return _model_params(
        cfg.replace(n_layers=1, scan_layers=False), tuple(mesh.shape.items()), tuple(rules.items())
    )


@functools.lru_cache(maxsize=64)
def _model_params(cfg: ModelConfig, mesh_items: tuple, rules_items: tuple) -> ModelParams:
    mesh, rules = MeshShape(dict(mesh_items)), dict(rules_items)
    model = abstract_model(cfg, Layout(mesh, rules))
    block, attn = model.blocks[0], model.blocks[0].attn
    relative = {id(var): path for path, var in _flat_params(block)}
    info, block_path = {}, None
    for path, var in _flat_params(model):
        if id(var) in relative:
            block_path = path[: len(path) - len(relative[id(var)])]
            path = relative[id(var)]
        info[id(var)] = _param_info(path, var, mesh, rules)
    head = model.embed.table if model.head is None else model.head.kernel  # as Transformer.logits reads it
    return ModelParams(
        block=tuple(info[i] for i in relative),
        block_path=block_path,
        outer=tuple(p for i, p in info.items() if i not in relative),
        head=info[id(head)],
        q=info[id(attn.q.kernel)],
        k=info[id(attn.k.kernel)],
        v=info[id(attn.v.kernel)],
        qkv_fused=attn.fused(),
        kv_replicated=attn.kv_replicated(),
        padded_vocab=model.padded_vocab,
    )


def _flat_params(module):
    return nnx.to_flat_state(nnx.state(module, nnx.Param))


def _param_info(path: tuple, var, mesh: MeshShape, rules: dict) -> ParamInfo:
    value = var.get_value() if hasattr(var, "get_value") else var.value
    names = tuple(var.get_metadata().get("out_sharding") or ())
    where = "/".join(map(str, path))
    spec = spec_for(names, rules, where) if names else jax.sharding.PartitionSpec()
    spec_axes = tuple(mesh_axes(s) for s in tuple(spec) + (None,) * (len(value.shape) - len(spec)))
    local = tuple(-(-dim // mesh.split(axes)) for dim, axes in zip(value.shape, spec_axes))
    return ParamInfo(where, names, spec_axes, tuple(value.shape), local, str(value.dtype))


def param_infos(cfg: ModelConfig, mesh, rules=None) -> list[ParamInfo]:
    """Every parameter of `cfg` on `mesh` (a Mesh, spec or {axis: size}): global and per-device shapes
    from the model's declarations, under `rules` checked as Transformer.create checks them."""
    mesh = mesh_shape(mesh)
    return model_params(cfg, mesh, resolve_rules(cfg, mesh, rules)).expanded(cfg.L)


def optimizer_bytes(infos: list[ParamInfo], optimizer="adamw") -> int:
    """Per-device optimizer state: the optimizer's own init traced on per-device parameter shapes. Exact
    for element-wise optimizers (Adam, SGD, Lion), whose state shards like the parameters."""
    local = {i.path: jax.ShapeDtypeStruct(i.local_shape, i.dtype) for i in infos}
    state = jax.eval_shape(_optimizer(optimizer).init, local)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


def _optimizer(optimizer) -> optax.GradientTransformation:
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer == "adamw":
        return make_optimizer(TrainConfig())  # exactly what Trainer uses (moments in the param dtype)
    makers = {
        "adam": lambda: optax.adam(1e-3),
        "sgd": lambda: optax.sgd(1e-3),
        "momentum": lambda: optax.sgd(1e-3, momentum=0.9),
        "lion": lambda: optax.lion(1e-4),
    }
    if optimizer not in makers:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; use one of {['adamw', *makers]} or an optax transform"
        )
    return makers[optimizer]()
