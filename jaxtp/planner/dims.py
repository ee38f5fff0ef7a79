"""The sizes every formula reads: one frozen `Dims` per (config, mesh, rules, batch, sequence, hardware).

Notation (docs/planner.md): B batch, S sequence, T tokens, D d_model, F d_ff, N heads, K kv heads, H head
dim, L layers, V (padded) vocab, n the tensor-parallel size; "local" means one device's share.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from .. import attention
from ..config import ModelConfig, to_dtype
from ..hardware import Hardware
from ..sharding import Indivisible, indivisible_axes, mesh_axes, resolve_rules, resolve_table
from .params import ModelParams, ParamInfo, model_params
from .shapes import MeshShape

__all__ = ["Dims", "planned_rules", "dims", "attention_kind"]


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes of one planned step. Byte counts are per device; a size is global unless it says local."""

    # ---- mesh and rules
    tp_size: int  # n: devices along the tensor-parallel (model) axes
    dp_size: int  # d: devices the batch splits over (every batch axis: data, and fsdp)
    tp_axes: tuple[str, ...]  # the tensor-parallel mesh axes (("model",); () without TP)
    dp_axes: tuple[str, ...]  # the batch's mesh axes (("data",), ("data", "fsdp"))
    n_devices: int  # devices in the mesh
    duplication: int  # devices that only repeat others' work: product of mesh axes no rule uses
    heads_split: int  # ways the query heads split
    kv_split: int  # ways the kv heads split (1 when replicated)
    mlp_split: int  # ways d_ff splits
    vocab_split: int  # ways the (padded) vocab splits
    seq_parallel: bool  # the residual stream's sequence splits over the TP axes between blocks
    reduce_scatter: bool  # the backend forms reduce-scatters (else all-reduce + slice, as XLA:CPU)
    # ---- shapes
    batch_local: int  # B_l: sequences per device
    seq_len: int  # S
    tokens: int  # B * S, global, per step
    heads_local: int  # N_l
    kv_heads_local: int  # K_l: kv heads a device stores (K when replicated)
    kv_heads_projected: int  # kv heads a device projects: N_l when replicated heads are stacked beside q
    d_ff_local: int  # F_l
    padded_vocab: int  # V, padded to a multiple of the vocab split
    vocab_local: int  # V_l
    # ---- element sizes, bytes
    compute_itemsize: int  # c: activations and matmul inputs
    param_itemsize: int  # stored parameters
    collective_itemsize: int  # activation collectives (f32 where the backend upcasts bf16 matmuls)
    # ---- parameters
    params: ModelParams  # one block's parameters and the outer ones, with their roles
    infos: tuple[ParamInfo, ...]  # every parameter, blocks expanded to L
    param_bytes: int  # all parameters on one device
    tp_sharded_leaves: int  # parameters split over a TP axis (each adds a partial sum to the global norm)
    qkv_stacked_bytes: int  # one layer's stacked q/k/v kernel in the compute dtype, 0 when not fused
    # ---- ZeRO-3 / FSDP: mesh axes that split both the batch and some weight
    zero_axes: tuple[tuple[str, int], ...]  # (mesh axis, size) pairs; () without ZeRO
    zero_size: int  # the product of their sizes (1 without ZeRO)
    data_only_axes: tuple[str, ...]  # the batch axes that are not ZeRO axes
    # ---- attention
    attention: str  # what runs: "xla", "blockwise" or "cudnn" (jaxtp.attention.resolve)
    attention_block: int  # blockwise's query and key block, clipped to S

    def zero_split(self, info: ParamInfo) -> int:
        """How many ways ZeRO splits `info` (its gather undoes exactly that)."""
        return math.prod(size for axis, size in self.zero_axes if axis in info.sharded_over)

    def gathered_bytes(self, info: ParamInfo) -> int:
        """`info` as read under ZeRO: its ZeRO split undone."""
        return info.local_bytes * self.zero_split(info)

    @property
    def grad_bytes(self) -> int:
        """Gradients as the backward leaves them: ZeRO-split parameters' in their gathered shapes."""
        return sum(map(self.gathered_bytes, self.infos))

    @property
    def zero_layer_bytes(self) -> int:
        """One block's weights as ZeRO gathers them while the block runs (0 without ZeRO)."""
        return sum(map(self.gathered_bytes, self.params.block)) if self.zero_axes else 0

    @property
    def zero_axis_names(self) -> tuple[str, ...]:
        return tuple(axis for axis, _ in self.zero_axes)

    @property
    def tokens_local(self) -> int:
        return self.batch_local * self.seq_len

    @property
    def heads_sharded(self) -> bool:
        return self.heads_split > 1

    @property
    def kv_sharded(self) -> bool:
        return self.kv_split > 1

    @property
    def mlp_sharded(self) -> bool:
        return self.mlp_split > 1

    @property
    def vocab_sharded(self) -> bool:
        return self.vocab_split > 1


def planned_rules(cfg: ModelConfig, mesh: MeshShape, rules) -> tuple[dict, tuple[Indivisible, ...]]:
    """resolve_rules, but every logical axis its mesh axes do not divide is replicated instead of refused,
    so an impossible layout is still planned (and marked invalid). Returns the table and those axes."""
    table = resolve_table(mesh, rules)
    bad = indivisible_axes(cfg, mesh, table)
    return resolve_rules(cfg, mesh, {**table, **{b.axis: None for b in bad}}), bad


def dims(cfg: ModelConfig, mesh: MeshShape, rules: dict, batch_size: int, seq_len: int, hw: Hardware) -> Dims:
    """The Dims of a step of `batch_size` x `seq_len` under resolved `rules` on `hw`."""
    params = model_params(cfg, mesh, rules)
    infos = tuple(params.expanded(cfg.L))
    split = lambda name: mesh.split(rules[name])
    tp_axes = mesh_axes(rules["mlp"]) or mesh_axes(rules["heads"]) or mesh_axes(rules["vocab"])
    dp_axes = mesh_axes(rules["batch"])
    used = set(tp_axes) | set(dp_axes)
    zero_axes = tuple((a, mesh.shape[a]) for a in dp_axes if any(a in i.sharded_over for i in infos))
    c = to_dtype(cfg.compute_dtype).itemsize
    heads_local, kv_heads_local = cfg.N // split("heads"), cfg.K // split("kv_heads")
    kv_heads_projected = heads_local if params.kv_replicated and params.qkv_fused else kv_heads_local
    return Dims(
        tp_size=mesh.split(tp_axes),
        dp_size=split("batch"),
        tp_axes=tp_axes,
        dp_axes=dp_axes,
        n_devices=math.prod(mesh.shape.values()),
        duplication=math.prod(s for a, s in mesh.shape.items() if a not in used),
        heads_split=split("heads"),
        kv_split=split("kv_heads"),
        mlp_split=split("mlp"),
        vocab_split=split("vocab"),
        seq_parallel=_seq_parallel(mesh, rules, tp_axes, seq_len),
        reduce_scatter=hw.forms_reduce_scatter,
        batch_local=-(-batch_size // split("batch")),
        seq_len=seq_len,
        tokens=batch_size * seq_len,
        heads_local=heads_local,
        kv_heads_local=kv_heads_local,
        kv_heads_projected=kv_heads_projected,
        d_ff_local=cfg.F // split("mlp"),
        padded_vocab=params.padded_vocab,
        vocab_local=params.padded_vocab // split("vocab"),
        compute_itemsize=c,
        param_itemsize=to_dtype(cfg.param_dtype).itemsize,
        collective_itemsize=c if hw.native_bf16 else 4,  # XLA:CPU computes bf16 matmuls in f32
        params=params,
        infos=infos,
        param_bytes=sum(i.local_bytes for i in infos),
        tp_sharded_leaves=sum(1 for i in infos if set(tp_axes) & i.sharded_over),
        qkv_stacked_bytes=_qkv_stacked_bytes(params, c),
        zero_axes=zero_axes,
        zero_size=math.prod(s for _, s in zero_axes),
        data_only_axes=tuple(a for a in dp_axes if a not in dict(zero_axes)),
        attention=attention_kind(cfg, seq_len, hw, params, heads_local, kv_heads_projected),
        attention_block=min(cfg.attention_block, seq_len),
    )


def _seq_parallel(mesh: MeshShape, rules: dict, tp_axes: tuple, seq_len: int) -> bool:
    """Sequence parallelism: act_seq over (some of) the TP axes, which divide the sequence."""
    sp_axes = mesh_axes(rules["act_seq"])
    return (
        bool(sp_axes)
        and mesh.split(tp_axes) > 1
        and set(sp_axes) <= set(tp_axes)
        and seq_len % mesh.split(sp_axes) == 0
    )


def _qkv_stacked_bytes(params: ModelParams, c: int) -> int:
    """XLA keeps each layer's stacked q/k/v kernel for the backward (layers.Attention.stacked_qkv_kernel):
    [D, K_l, G+2, H] in the compute dtype, or [D, N_l, 3, H] with kv heads replicated beside q."""
    if not params.qkv_fused:
        return 0
    q, k, v = (math.prod(i.local_shape) * c for i in (params.q, params.k, params.v))
    return 3 * q if params.kv_replicated else q + k + v


def attention_kind(
    cfg: ModelConfig,
    seq_len: int,
    hw: Hardware,
    params: ModelParams,
    heads_local: int,
    kv_heads_projected: int,
) -> str:
    """What cfg.attention runs as in a step of seq_len on `hw`: jaxtp.attention.resolve's answer, with cuDNN
    offered where the planned hardware has it (not where this host runs) and the layer would allow it."""
    dtype = to_dtype(cfg.compute_dtype)
    q = jax.ShapeDtypeStruct((1, seq_len, heads_local, cfg.H), dtype)
    k = jax.ShapeDtypeStruct((1, seq_len, kv_heads_projected, cfg.H), dtype)
    # As layers.Attention: no cuDNN when kv heads fewer than q's are replicated beside them.
    layer_ok = not (params.kv_replicated and kv_heads_projected < heads_local)
    if (
        cfg.attention in ("auto", "cudnn")
        and hw.cudnn_attention
        and layer_ok
        and attention.cudnn_expressible(q, k, None, None, True)
    ):
        return "cudnn"
    return attention.resolve("auto" if cfg.attention == "cudnn" else cfg.attention, seq_len, seq_len, False)
