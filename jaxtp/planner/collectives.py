"""The step's collectives, itemised as XLA emits them (jax 0.10.2, measured on XLA:CPU; tests/test_plan.py
and tests/test_strategies.py hold counts and bytes to the compiled HLO), and their ring times.

Model axis (Megatron TP): forward, one all-reduce per row-parallel output - embedding lookup
(vocab-parallel gather, in the table's dtype), attention output projection and MLP down projection per
layer; the vocab-parallel loss adds two [B, S] f32 all-reduces (max and sum of logsumexp). The backward
adds one [B, S, D] all-reduce for the head, and per layer one for the MLP and one for attention. XLA:CPU
does NOT sum partial input-gradients of separate matmuls before reducing them: the MLP op carries 2
[B, S, D] buffers (gate, up), merged into one tuple all-reduce by XLA's combiner. q/k/v run as one matmul
over stacked kernels (layers.Attention.fused), so attention reduces one [B, S, D] sum - or 3 buffers where
they cannot stack (a ZeRO gather of the weights). Megatron's 4 per layer, 5 activations of bytes. The
target-logit [B, S] sum (needed only for the loss value) and the clip-by-global-norm partial sums (two f32
scalars per model-sharded parameter: clipping and the grad_norm metric) ride in combined ops, the latter
in an op of their own.
Replicated kv heads (K < model axis), stacked: each rank projects k/v for its own query heads from the
replicated kernels (expanded by a one-hot matmul), so attention's input-gradients are one [B, S, D] sum
as above and the expansion's transpose sums the kv weight gradients (2 [D, K, H] f32 per layer) over the
model axis inside the global-norm op. Unstacked (a ZeRO gather of the weights), k/v input-gradients are
whole on every rank, but dK, dV are summed over the n/K ranks sharing a kv head ([B,S,1,H] each, one op)
and all-gathered back to [B,S,K,H] (two ops). tests/test_collectives.py measures both.
Sequence parallelism (act_seq over the model axis): every [B, S, D] reduction above (embedding,
out-projection, down-projection, head and block input-gradients) becomes a reduce-scatter along the
sequence - on XLA:CPU an all-reduce of the same buffer followed by a dynamic-slice - and each block's
matmul input is all-gathered (2 per layer forward; their transposes, the output-gradient gathers, 2 per
layer backward), plus the head's input (forward) and the embedding's output-gradient (backward). Norms
then see S/n positions, so their scale gradients are partial sums: per layer they ride in the
input-gradient ops; the final norm's takes an op of its own (the target logit rides in it).
FSDP (weights' embed axis over axes that also split the batch - ZeRO-3): every weight is all-gathered
where it is read (9 per layer), the matmul weights again in the backward (7 per layer, Linear re-gathers
under jax.checkpoint rather than keep them), plus the embedding table, final norm and head (fwd + bwd)
outside the blocks. The gradients leave the backward with the gathered shapes and are reduced over all
batch axes in one combined op (XLA:CPU: an all-reduce of the gathered gradients, then each rank keeps its
slice; a reduce-scatter where the backend forms one).
Data axis: one all-reduce of every local gradient (plus the f32 loss), combined into one op; it can
overlap the backward pass, the model-axis ones sit on the critical path.

Bytes follow jaxtp.hlo: the size of the unsharded buffer a collective produces (an all-reduce's
per-device buffer, an all-gather's gathered output, a reduce-scatter's input).
"""

from __future__ import annotations

import dataclasses

from ..config import ModelConfig
from ..hardware import Hardware
from .dims import Dims
from .shapes import MeshShape

__all__ = ["Collective", "train_collectives", "decode_collectives", "priced", "summary", "intra_node"]


@dataclasses.dataclass(frozen=True)
class Collective:
    """One kind of collective of a step, with its count and bytes per step."""

    kind: str  # "all-reduce", "all-gather" or "reduce-scatter"
    axes: tuple[str, ...]  # the mesh axes its groups span
    group: int  # devices in one ring
    count: int  # ops per step (0: its buffer rides in another op)
    bytes: int  # per step: the unsharded buffers it produces, as jaxtp.hlo counts them
    what: str
    per_layer: bool = False  # issued by every block: count and bytes are L times one layer's
    critical: bool = True  # on the critical path (False: it can overlap the backward)
    time_s: float = 0.0  # ring time per step (set by `priced`)

    @property
    def axis(self) -> str:
        return "+".join(self.axes)

    @property
    def key(self) -> str:
        """As jaxtp.Collectives.summary() keys it: "all-reduce@model"."""
        return f"{self.kind}@{self.axis}"

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "axis": self.axis,
            "group": self.group,
            "count": self.count,
            "bytes": self.bytes,
            "what": self.what,
            "per_layer": self.per_layer,
            "critical": self.critical,
            "time_s": self.time_s,
        }


def _tp(d: Dims, kind: str, count: int, nbytes: float, what: str, **flags) -> Collective:
    return Collective(kind, d.tp_axes, d.tp_size, count, int(nbytes), what, **flags)


def _block_reduction(d: Dims) -> str:
    """How a [B, S, D] reduction runs: a reduce-scatter along the sequence under SP, where formed."""
    return "reduce-scatter" if d.seq_parallel and d.reduce_scatter else "all-reduce"


def train_collectives(cfg: ModelConfig, d: Dims) -> list[Collective]:
    """Every collective of one training step (module docstring)."""
    tp = [*_tp_forward(cfg, d), *_tp_backward(cfg, d), *_sequence_parallel(cfg, d)] if d.tp_size > 1 else []
    return tp + _zero_gathers(cfg, d, train=True) + _gradient_reductions(d)


def _tp_forward(cfg: ModelConfig, d: Dims) -> list[Collective]:
    L, BSD, act_b, rs = cfg.L, d.tokens_local * cfg.D, d.collective_itemsize, _block_reduction(d)
    out = []
    if d.vocab_sharded:
        out.append(_tp(d, rs, 1, BSD * d.param_itemsize, "embedding lookup (vocab-parallel)"))
    if d.heads_sharded:
        out.append(_tp(d, rs, L, L * BSD * act_b, "attention out-projection (fwd)", per_layer=True))
    if d.mlp_sharded:
        out.append(_tp(d, rs, L, L * BSD * act_b, "MLP down-projection (fwd)", per_layer=True))
    if d.vocab_sharded:
        out.append(_tp(d, "all-reduce", 2, 2 * d.tokens_local * 4, "loss: logsumexp max and sum over vocab"))
        out.append(
            _tp(d, "all-reduce", 0, d.tokens_local * 4, "loss: target logit (combined into another op)")
        )
    return out


def _tp_backward(cfg: ModelConfig, d: Dims) -> list[Collective]:
    L, BSD, act_b, rs = cfg.L, d.tokens_local * cfg.D, d.collective_itemsize, _block_reduction(d)
    out = []
    if d.vocab_sharded:
        out.append(_tp(d, rs, 1, BSD * act_b, "head input-gradient (bwd)"))
    if d.mlp_sharded:
        out.append(_tp(d, rs, L, L * 2 * BSD * act_b, "MLP gate+up input-gradients (bwd)", per_layer=True))
    if d.heads_sharded:
        fused = d.params.qkv_fused
        n_in = 1 if fused or not d.kv_sharded else 3
        out.append(
            _tp(
                d,
                rs,
                L,
                L * n_in * BSD * act_b,
                f"attention {'q+k+v' if d.kv_sharded or fused else 'q'} input-gradients (bwd)",
                per_layer=True,
            )
        )
        if not d.kv_sharded:
            out += _replicated_kv(cfg, d)
    if d.tp_sharded_leaves:
        out.append(_tp(d, "all-reduce", 1, 2 * 4 * d.tp_sharded_leaves, "global-norm partial sums"))
    return out


def _replicated_kv(cfg: ModelConfig, d: Dims) -> list[Collective]:
    """kv heads replicated beside split query heads: stacked, the kv weight gradients are summed inside the
    global-norm op (it can overlap the backward, like the data-axis gradients); unstacked, dK and dV are
    summed over each kv group and gathered back."""
    L, H, n, act_b = cfg.L, cfg.H, d.tp_size, d.collective_itemsize
    if d.params.qkv_fused:
        return [
            _tp(
                d,
                "all-reduce",
                0,
                L * 2 * cfg.D * cfg.K * H * d.param_itemsize,
                "kv weight-gradients summed over query heads (combined into the global-norm op)",
                per_layer=True,
                critical=False,
            )
        ]
    return [
        Collective(
            "all-reduce",
            d.tp_axes,
            max(n // cfg.K, 1),
            L,
            L * 2 * d.tokens_local * H * act_b,
            "dK, dV summed over ranks sharing a kv head (bwd)",
            per_layer=True,
        ),
        Collective(
            "all-gather",
            d.tp_axes,
            min(n, cfg.K),
            2 * L,
            L * 2 * d.tokens_local * cfg.K * H * act_b,
            "dK, dV gathered to replicated kv heads (bwd)",
            per_layer=True,
        ),
    ]


def _sequence_parallel(cfg: ModelConfig, d: Dims) -> list[Collective]:
    if not d.seq_parallel:
        return []
    L, BSD, act_b = cfg.L, d.tokens_local * cfg.D, d.collective_itemsize
    n_in = int(d.heads_sharded) + int(d.mlp_sharded)
    out = [
        _tp(
            d,
            "all-gather",
            n_in * L,
            n_in * L * BSD * act_b,
            "attention and MLP inputs gathered along the sequence (fwd)",
            per_layer=True,
        ),
        _tp(
            d,
            "all-gather",
            n_in * L,
            n_in * L * BSD * act_b,
            "output-gradients gathered along the sequence (bwd)",
            per_layer=True,
        ),
    ]
    if d.vocab_sharded:
        again = (
            d.zero_split(d.params.head) > 1
        )  # the head re-runs under jax.checkpoint to re-gather its weight
        out.append(
            _tp(
                d,
                "all-gather",
                1 + again,
                (1 + again) * BSD * act_b,
                "head input gathered (fwd" + (", and again in the bwd)" if again else ")"),
            )
        )
        out.append(_tp(d, "all-gather", 1, BSD * act_b, "embedding output-gradient gathered (bwd)"))
    out.append(
        _tp(
            d,
            "all-reduce",
            0,
            L * 2 * cfg.D * 4,
            "norm-scale gradient partial sums (combined into the input-gradient ops)",
            per_layer=True,
        )
    )
    out.append(_tp(d, "all-reduce", 1, cfg.D * 4, "final-norm scale gradient partial sum"))
    return out


def _zero_gathers(cfg: ModelConfig, d: Dims, train: bool) -> list[Collective]:
    """ZeRO-3: weights gathered where they are read; in training the matmul weights again in the backward,
    and the head twice (a tied table is gathered as the head is: the lookup shares its forward gather)."""
    if d.zero_size < 2:
        return []
    L, head = cfg.L, d.params.head
    gather = lambda count, infos, what, **flags: Collective(
        "all-gather", d.zero_axis_names, d.zero_size, count, sum(map(d.gathered_bytes, infos)), what, **flags
    )
    block = [i for i in d.params.block if d.zero_split(i) > 1]
    outer = [i for i in d.params.outer if d.zero_split(i) > 1]
    if not train:
        return [
            gather(L * len(block), block * L, "block weights gathered", per_layer=True),
            gather(len(outer), outer, "embedding table, final norm and head gathered"),
        ]
    matmul = [i for i in block if len(i.shape) >= 2]
    fwd_only = [i for i in outer if i != head]
    out = [
        gather(L * len(block), block * L, "block weights gathered where read (fwd)", per_layer=True),
        gather(L * len(matmul), matmul * L, "block matmul weights gathered again (bwd)", per_layer=True),
        gather(len(fwd_only), fwd_only, "embedding table and final norm gathered (fwd)"),
    ]
    if head in outer:
        out.append(gather(2, [head, head], "head gathered (fwd and bwd)"))
    return out


def _gradient_reductions(d: Dims) -> list[Collective]:
    """The gradients (and the f32 loss) over the batch axes: one combined op that can overlap the backward."""
    if d.dp_size < 2:
        return []
    full = d.grad_bytes + 4
    if d.zero_size > 1 and d.reduce_scatter:  # ZeRO: reduce-scatter over the fsdp axes, then the data axes
        out = [
            Collective(
                "reduce-scatter",
                d.zero_axis_names,
                d.zero_size,
                1,
                full,
                "gradients (+ loss) over fsdp",
                critical=False,
            )
        ]
        if d.dp_size > d.zero_size:
            out.append(
                Collective(
                    "all-reduce",
                    d.data_only_axes,
                    d.dp_size // d.zero_size,
                    1,
                    d.param_bytes + 4,
                    "gradient shards (+ loss) over data",
                    critical=False,
                )
            )
        return out
    return [
        Collective(
            "all-reduce",
            d.dp_axes,
            d.dp_size,
            1,
            full,
            "gradients (+ loss) over data" + ("+fsdp, in their gathered shapes" if d.zero_size > 1 else ""),
            critical=False,
        )
    ]


def decode_collectives(cfg: ModelConfig, d: Dims) -> list[Collective]:
    """One decode step (analytic, not compiler-checked): the forward all-reduces on [B, 1, D]; under FSDP
    every weight is gathered once per step (decode reads every weight once). A single position cannot
    split along the sequence, so sequence parallelism changes nothing here (Layout.constrain)."""
    L, BD, act_b = cfg.L, d.batch_local * cfg.D, d.collective_itemsize
    out = []
    if d.tp_size > 1 and d.vocab_sharded:
        out.append(_tp(d, "all-reduce", 1, BD * d.param_itemsize, "embedding lookup"))
    if d.tp_size > 1 and d.heads_sharded:
        out.append(_tp(d, "all-reduce", L, L * BD * act_b, "attention out-projection", per_layer=True))
    if d.tp_size > 1 and d.mlp_sharded:
        out.append(_tp(d, "all-reduce", L, L * BD * act_b, "MLP down-projection", per_layer=True))
    return out + _zero_gathers(cfg, d, train=False)


# ------------------------------------------------------------------------------------------ ring times


def intra_node(mesh: MeshShape, hw: Hardware, axes: tuple[str, ...]) -> bool:
    """Whether a ring over `axes` stays inside one fast domain (node / slice). Devices sit on the mesh
    row-major (jaxtp.mesh.make_mesh), so an axis does when its size times the product of the later axes'
    sizes is at most `node_size`; otherwise its ring crosses domains and runs at the DCN rate."""
    names = list(mesh.shape)
    stride = lambda a: mesh.split(tuple(names[names.index(a) + 1 :])) if a in names else 1
    return all(mesh.shape.get(a, 1) * stride(a) <= hw.node_size for a in axes)


def ring_time(c: Collective, hw: Hardware, intra: bool) -> float:
    """Ring model (docs/planner.md section 2): an all-reduce sends 2*V*(g-1)/g per device, an all-gather or
    reduce-scatter half that; plus (g-1) hops of latency per all-gather, 2(g-1) per all-reduce, for each op
    (a buffer merged into another op, count 0, adds bandwidth only)."""
    g = c.group
    if g < 2 or c.bytes == 0:
        return 0.0
    w, lat = (hw.link_bytes_per_s, hw.latency_s) if intra else (hw.dcn_bytes_per_s, hw.dcn_latency_s)
    factor = 2 if c.kind == "all-reduce" else 1
    return factor * c.bytes * (g - 1) / g / w + factor * (g - 1) * lat * c.count


def priced(items: list[Collective], mesh: MeshShape, hw: Hardware) -> list[Collective]:
    """The collectives with their ring times."""
    return [dataclasses.replace(c, time_s=ring_time(c, hw, intra_node(mesh, hw, c.axes))) for c in items]


def summary(cfg: ModelConfig, items: list[Collective], mesh: MeshShape, hw: Hardware) -> dict:
    """Per step and per layer {"all-reduce@model": {"count", "bytes"}} (the keys of
    jaxtp.Collectives.summary()), totals by mesh axis with their link and time, and the itemised list."""
    per_step, per_layer, by_axis = {}, {}, {}
    for c in items:
        _add(per_step, c.key, c.count, c.bytes)
        row = by_axis.setdefault(
            c.axis,
            {
                "count": 0,
                "bytes": 0,
                "time_s": 0.0,
                "link": "intra" if intra_node(mesh, hw, c.axes) else "dcn",
            },
        )
        _add(by_axis, c.axis, c.count, c.bytes)
        row["time_s"] += c.time_s
        if c.per_layer:
            _add(per_layer, c.key, c.count // cfg.L, c.bytes // cfg.L)
    return {
        "per_step": dict(sorted(per_step.items())),
        "per_layer": dict(sorted(per_layer.items())),
        "by_axis": by_axis,
        "items": [c.as_dict() for c in items],
        "intra": {a: intra_node(mesh, hw, (a,)) for a in mesh.shape},
        "bytes_convention": "size of the unsharded buffer each collective produces (as jaxtp.hlo counts)",
    }


def _add(table: dict, key: str, count: int, nbytes: int) -> None:
    row = table.setdefault(key, {"count": 0, "bytes": 0})
    row["count"] += count
    row["bytes"] += nbytes
