"""Analytic cost model: memory, FLOPs, collectives and step time per device, before anything runs.

`plan(cfg, "16x8", batch_size=..., seq_len=...)` answers "will it fit, and is TP communication-bound?"
without devices. Parameter shapes and placements come from the model's own declarations
(`abstract_model` + the rules table), so parameter and optimizer bytes are exact; activations and
collectives follow what XLA compiles for this model, measured on XLA:CPU with fake devices and
checked in tests/test_plan.py (megatron) and tests/test_strategies.py (megatron-sp, fsdp, fsdp-sp: every
rules preset, `rules=`) against `compiled.memory_analysis()` and the HLO. The formulas and the reasoning
behind them: docs/planner.md. Notation: B batch, S seq, T tokens, D d_model, F d_ff, N heads,
K kv heads, H head dim, L layers, V (padded) vocab; a trailing `_l` means "per device" (local shard).

Bytes of a collective follow jaxtp.hlo: the size of the unsharded buffer it produces (an all-reduce's
per-device buffer, an all-gather's gathered output, a reduce-scatter's input).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .config import ModelConfig, to_dtype
from .hardware import HARDWARE, GiB, Hardware, get_hardware, measure_cpu  # noqa: F401  (jaxtp.plan.* API)
from .mesh import parse_mesh_spec
from .model import abstract_model
from .sharding import RULE_PRESETS, Layout, resolve_rules, spec_for

# ------------------------------------------------------------------------------------------- mesh shapes

class MeshShape:
    """What resolve_rules / Layout / abstract_model read from a Mesh (`.shape`, `.devices.size`), for
    meshes larger than this machine: planning never touches devices."""

    def __init__(self, axes: Mapping[str, int]):
        self.shape = dict(axes)
        self.axis_names = tuple(axes)
        self.devices = np.empty(tuple(axes.values()), np.int8)  # only .size / .shape are read

    def __repr__(self):
        return "MeshShape(" + ", ".join(f"{k}={v}" for k, v in self.shape.items()) + ")"


def _mesh_shape(mesh) -> MeshShape:
    if isinstance(mesh, str):
        return MeshShape(parse_mesh_spec(mesh))
    if isinstance(mesh, Mapping):
        return MeshShape(mesh)
    return MeshShape(dict(mesh.shape))  # a jax Mesh or a MeshShape


def _axes(target) -> tuple[str, ...]:
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _resolve(cfg: ModelConfig, mesh: MeshShape, rules) -> tuple[dict, list[str], bool]:
    """resolve_rules, but a divisibility error becomes a warning and that logical axis is replicated, so
    an impossible layout is still planned (marked invalid) instead of raising."""

    if rules is None or isinstance(rules, str):
        if (rules or "megatron") not in RULE_PRESETS:
            raise ValueError(f"unknown rules preset {rules!r}; choose one of {sorted(RULE_PRESETS)}")
        rules = RULE_PRESETS[rules or "megatron"]
    table = dict(rules)
    warnings = []
    for _ in range(len(table)):
        try:
            return resolve_rules(cfg, mesh, table), warnings, not warnings
        except ValueError as e:
            m = re.search(r"logical axis '(\w+)'", str(e))
            if not m:
                raise
            warnings.append(f"not divisible: {str(e).split('; pick')[0]} - planned with {m.group(1)!r} "
                            "replicated, but Transformer.create would refuse this mesh")
            table[m.group(1)] = None
    raise RuntimeError("unreachable")


# ---------------------------------------------------------------------------------------------- params

@dataclasses.dataclass(frozen=True)
class ParamInfo:
    path: str
    logical: tuple
    spec: tuple  # per dimension: tuple of mesh axes
    shape: tuple
    local_shape: tuple
    dtype: str

    @property
    def local_bytes(self) -> int:
        return math.prod(self.local_shape) * jnp.dtype(self.dtype).itemsize

    @property
    def sharded_over(self) -> set:
        return {a for axes in self.spec for a in axes}


@functools.lru_cache(maxsize=64)
def _block_and_rest(cfg: ModelConfig, mesh_items: tuple, rules_items: tuple):
    """Abstract parameters of a ONE-block model (every block has the same declarations; tracing all L of
    a 70b model through nnx.eval_shape takes minutes, one takes a second). Built unscanned: a scanned
    model stacks the same per-layer shards on an unsplit "layers" axis, so bytes and shapes per layer agree."""
    mesh, rules = MeshShape(dict(mesh_items)), dict(rules_items)
    model = abstract_model(cfg.replace(n_layers=1, scan_layers=False), Layout(mesh, rules))
    rows = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        names = tuple(var.get_metadata().get("out_sharding") or ())
        where = "/".join(map(str, path))
        spec = spec_for(names, rules, where) if names else jax.sharding.PartitionSpec()
        spec_axes = tuple(_axes(s) for s in tuple(spec) + (None,) * (len(value.shape) - len(spec)))
        local = []
        for dim, axes in zip(value.shape, spec_axes):
            split = math.prod(mesh.shape.get(a, 1) for a in axes)
            local.append(dim // split if dim % split == 0 else -(-dim // split))
        rows.append(ParamInfo(where, names, spec_axes, tuple(value.shape), tuple(local), str(value.dtype)))
    return tuple(rows)


def param_infos(cfg: ModelConfig, mesh, rules=None) -> list[ParamInfo]:
    """Every parameter of `cfg` on `mesh`: global and per-device shapes from the model's declarations."""
    mesh = _mesh_shape(mesh)
    resolved = resolve_rules(cfg, mesh, rules)
    return _expand(cfg, _block_and_rest(cfg, tuple(mesh.shape.items()), tuple(resolved.items())))


def _expand(cfg: ModelConfig, rows) -> list[ParamInfo]:
    out = []
    for r in rows:
        if r.path.startswith("blocks/0/"):
            out += [dataclasses.replace(r, path=f"blocks/{i}/" + r.path[len("blocks/0/"):]) for i in range(cfg.L)]
        else:
            out.append(r)
    return out


def _optimizer(optimizer) -> optax.GradientTransformation:
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer == "adamw":
        from .train import TrainConfig, make_optimizer

        return make_optimizer(TrainConfig())  # exactly what Trainer uses (moments in the param dtype)
    makers = {"adam": lambda: optax.adam(1e-3), "sgd": lambda: optax.sgd(1e-3),
              "momentum": lambda: optax.sgd(1e-3, momentum=0.9), "lion": lambda: optax.lion(1e-4)}
    if optimizer not in makers:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {['adamw', *makers]} or an optax transform")
    return makers[optimizer]()


def optimizer_bytes(infos: list[ParamInfo], optimizer="adamw") -> int:
    """Per-device optimizer state: the optimizer's own init traced on per-device parameter shapes. Exact
    for element-wise optimizers (Adam, SGD, Lion), whose state shards like the parameters."""
    local = {i.path: jax.ShapeDtypeStruct(i.local_shape, i.dtype) for i in infos}
    state = jax.eval_shape(_optimizer(optimizer).init, local)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))


# ------------------------------------------------------------------------------------------ collectives

def _coll(kind, axis, group, count, nbytes, what, per_layer=False, critical=True) -> dict:
    return {"kind": kind, "axis": axis, "group": group, "count": count, "bytes": int(nbytes), "what": what,
            "per_layer": per_layer, "critical": critical}


def _train_collectives(cfg, d: dict) -> list[dict]:
    """The train step's collectives, itemised as XLA emits them (jax 0.10.2, measured on XLA:CPU).

    Model axis (Megatron TP): forward, one all-reduce per row-parallel output - embedding lookup
    (vocab-parallel gather, in the table's dtype), attention output projection and MLP down projection
    per layer; the vocab-parallel loss adds two [B, S] f32 all-reduces (max and sum of logsumexp). The
    backward adds one [B, S, D] all-reduce for the head, and per layer one for the MLP and one for
    attention. XLA:CPU does NOT sum partial input-gradients of separate matmuls before reducing them:
    the MLP op carries 2 [B, S, D] buffers (gate, up), merged into one tuple all-reduce by XLA's combiner.
    q/k/v run as one matmul over stacked kernels (layers.py), so attention reduces one [B, S, D] sum -
    or 3 buffers where they cannot stack (a ZeRO gather of the weights). Megatron's 4 per layer, 5
    activations of bytes. The target-logit [B, S] sum (needed only for the loss value) and
    the clip-by-global-norm partial sums (two f32 scalars per model-sharded parameter: clipping and the
    grad_norm metric) ride in combined ops, the latter in an op of their own.
    Replicated kv heads (K < model axis), stacked: each rank projects k/v for its own query heads from
    the replicated kernels (expanded by a one-hot matmul), so attention's input-gradients are one
    [B, S, D] sum as above and the expansion's transpose sums the kv weight gradients (2 [D, K, H] f32
    per layer) over the model axis inside the global-norm op. Unstacked (a ZeRO gather of the weights),
    k/v input-gradients are whole on every rank, but dK, dV are summed over the n/K ranks sharing a kv
    head ([B,S,1,H] each, one op) and all-gathered back to [B,S,K,H] (two ops).
    tests/test_collectives.py measures both.
    Sequence parallelism (act_seq over the model axis): every [B, S, D] reduction above (embedding,
    out-projection, down-projection, head and block input-gradients) becomes a reduce-scatter along the
    sequence - on XLA:CPU an all-reduce of the same buffer followed by a dynamic-slice - and each
    block's matmul input is all-gathered (2 per layer forward; their transposes, the output-gradient
    gathers, 2 per layer backward), plus the head's input (forward) and the embedding's output-gradient
    (backward). Norms now see S/n positions, so their scale gradients are partial sums: per layer they
    ride in the input-gradient ops; the final norm's takes an op of its own (the target logit rides in it).
    FSDP (weights' embed axis over axes that also split the batch - ZeRO-3): every weight is
    all-gathered where it is read (9 per layer), the matmul weights again in the backward (7 per layer,
    Linear re-gathers under jax.checkpoint rather than keep them), plus the embedding table, final norm
    and head (fwd + bwd) outside the blocks. The gradients leave the backward with the gathered shapes
    and are reduced over all batch axes in one combined op (XLA:CPU: an all-reduce of the gathered
    gradients, then each rank keeps its slice; a reduce-scatter where the backend forms one).
    Data axis: one all-reduce of every local gradient (plus the f32 loss), combined into one op; it can
    overlap the backward pass, the model-axis ones sit on the critical path."""
    L, D, H, act_b = cfg.L, cfg.D, cfg.H, d["act_b"]
    tp, n, dp, nd = d["tp_axis"], d["n"], d["dp_axis"], d["d"]
    BS = d["B_l"] * d["S"]
    sp = d["sp"]
    rs = "reduce-scatter" if sp and d["forms_rs"] else "all-reduce"  # a [B,S,D] reduction under SP
    out = []
    if n > 1:
        if d["vocab_sharded"]:
            out.append(_coll(rs, tp, n, 1, BS * D * d["param_b"], "embedding lookup (vocab-parallel)"))
        if d["heads_sharded"]:
            out.append(_coll(rs, tp, n, L, L * BS * D * act_b, "attention out-projection (fwd)", True))
        if d["mlp_sharded"]:
            out.append(_coll(rs, tp, n, L, L * BS * D * act_b, "MLP down-projection (fwd)", True))
        if sp:
            n_in = int(d["heads_sharded"]) + int(d["mlp_sharded"])
            out.append(_coll("all-gather", tp, n, n_in * L, n_in * L * BS * D * act_b,
                             "attention and MLP inputs gathered along the sequence (fwd)", True))
            out.append(_coll("all-gather", tp, n, n_in * L, n_in * L * BS * D * act_b,
                             "output-gradients gathered along the sequence (bwd)", True))
        if d["vocab_sharded"]:
            out.append(_coll("all-reduce", tp, n, 2, 2 * BS * 4, "loss: logsumexp max and sum over vocab"))
            out.append(_coll("all-reduce", tp, n, 0, BS * 4, "loss: target logit (combined into another op)"))
            out.append(_coll(rs, tp, n, 1, BS * D * act_b, "head input-gradient (bwd)"))
            if sp:
                again = d["zero_head"] > 1  # the head re-runs under jax.checkpoint to re-gather its weight
                out.append(_coll("all-gather", tp, n, 1 + again, (1 + again) * BS * D * act_b,
                                 "head input gathered (fwd" + (", and again in the bwd)" if again else ")")))
                out.append(_coll("all-gather", tp, n, 1, BS * D * act_b, "embedding output-gradient gathered (bwd)"))
        if d["mlp_sharded"]:
            out.append(_coll(rs, tp, n, L, L * 2 * BS * D * act_b, "MLP gate+up input-gradients (bwd)", True))
        if d["heads_sharded"]:
            n_in = 1 if d["qkv_stacked"] or not d["kv_sharded"] else 3
            out.append(_coll(rs, tp, n, L, L * n_in * BS * D * act_b, "attention "
                             f"{'q+k+v' if d['kv_sharded'] or d['qkv_stacked'] else 'q'} input-gradients (bwd)", True))
            if not d["kv_sharded"] and d["qkv_stacked"]:
                out.append(_coll("all-reduce", tp, n, 0, L * 2 * D * cfg.K * H * d["param_b"],
                                 "kv weight-gradients summed over query heads (combined into the global-norm op)",
                                 True, critical=False))  # like the data-axis gradients: it can overlap the backward
            elif not d["kv_sharded"]:
                share = max(n // cfg.K, 1)
                out.append(_coll("all-reduce", tp, share, L, L * 2 * BS * H * act_b,
                                 "dK, dV summed over ranks sharing a kv head (bwd)", True))
                out.append(_coll("all-gather", tp, min(n, cfg.K), 2 * L, L * 2 * BS * cfg.K * H * act_b,
                                 "dK, dV gathered to replicated kv heads (bwd)", True))
        if sp:
            out.append(_coll("all-reduce", tp, n, 0, L * 2 * D * 4,
                             "norm-scale gradient partial sums (combined into the input-gradient ops)", True))
            out.append(_coll("all-reduce", tp, n, 1, D * 4, "final-norm scale gradient partial sum"))
        if d["n_tp_leaves"]:
            out.append(_coll("all-reduce", tp, n, 1, 2 * 4 * d["n_tp_leaves"], "global-norm partial sums"))
    if d["nf"] > 1:
        zf, nf = d["zero_axis"], d["nf"]
        blk = [i for i in d["infos"] if i.path.startswith("blocks/0/") and d["zero"](i) > 1]
        mat = [i for i in blk if len(i.shape) >= 2]
        rest = {i.path: i for i in d["infos"] if not i.path.startswith("blocks/") and d["zero"](i) > 1}
        g = lambda i: i.local_bytes * d["zero"](i)  # the gathered weight: its zero axes undone
        out.append(_coll("all-gather", zf, nf, L * len(blk), L * sum(map(g, blk)),
                         "block weights gathered where read (fwd)", True))
        out.append(_coll("all-gather", zf, nf, L * len(mat), L * sum(map(g, mat)),
                         "block matmul weights gathered again (bwd)", True))
        head = head_path(cfg)  # a tied table is gathered as the head is (the lookup shares its forward gather)
        fwd_only = [i for p, i in rest.items() if p != head]
        out.append(_coll("all-gather", zf, nf, len(fwd_only), sum(map(g, fwd_only)),
                         "embedding table and final norm gathered (fwd)"))
        if head in rest:
            out.append(_coll("all-gather", zf, nf, 2, 2 * g(rest[head]), "head gathered (fwd and bwd)"))
    if nd > 1:
        full = d["grad_bytes"] + 4
        if d["nf"] > 1 and d["forms_rs"]:  # ZeRO: reduce-scatter over the fsdp axes, then the data axes
            out.append(_coll("reduce-scatter", d["zero_axis"], d["nf"], 1, full, "gradients (+ loss) over fsdp",
                             critical=False))
            if nd > d["nf"]:
                out.append(_coll("all-reduce", d["data_only_axis"], nd // d["nf"], 1, d["param_bytes"] + 4,
                                 "gradient shards (+ loss) over data", critical=False))
        else:
            out.append(_coll("all-reduce", dp, nd, 1, full, "gradients (+ loss) over data"
                             + ("+fsdp, in their gathered shapes" if d["nf"] > 1 else ""), critical=False))
    return out


def _decode_collectives(cfg, d: dict) -> list[dict]:
    """One decode step (analytic, not compiler-checked): the forward all-reduces on [B, 1, D]; under FSDP
    every weight is gathered once per step (decode reads every weight once). A single position cannot
    split along the sequence, so sequence parallelism changes nothing here (Layout.constrain)."""
    L, D, n, act_b = cfg.L, cfg.D, d["n"], d["act_b"]
    B = d["B_l"]
    out = []
    if n > 1:
        if d["vocab_sharded"]:
            out.append(_coll("all-reduce", d["tp_axis"], n, 1, B * D * d["param_b"], "embedding lookup"))
        if d["heads_sharded"]:
            out.append(_coll("all-reduce", d["tp_axis"], n, L, L * B * D * act_b, "attention out-projection", True))
        if d["mlp_sharded"]:
            out.append(_coll("all-reduce", d["tp_axis"], n, L, L * B * D * act_b, "MLP down-projection", True))
    if d["nf"] > 1:
        blk = [i for i in d["infos"] if i.path.startswith("blocks/0/") and d["zero"](i) > 1]
        rest = [i for i in d["infos"] if not i.path.startswith("blocks/") and d["zero"](i) > 1]
        g = lambda i: i.local_bytes * d["zero"](i)
        out.append(_coll("all-gather", d["zero_axis"], d["nf"], L * len(blk), L * sum(map(g, blk)),
                         "block weights gathered", True))
        out.append(_coll("all-gather", d["zero_axis"], d["nf"], len(rest), sum(map(g, rest)),
                         "embedding table, final norm and head gathered", True))
    return out


def _summary(items: list[dict]) -> dict:
    """{"all-reduce@model": {"count": .., "bytes": ..}} - the keys of jaxtp.Collectives.summary()."""
    out: dict = {}
    for it in items:
        key = f"{it['kind']}@{it['axis']}"
        row = out.setdefault(key, {"count": 0, "bytes": 0})
        row["count"] += it["count"]
        row["bytes"] += it["bytes"]
    return dict(sorted(out.items()))


def _coll_time(it: dict, hw: Hardware, intra: bool) -> float:
    """Ring model (docs/planner.md section 2): all-reduce sends 2*V*(g-1)/g per device, all-gather/reduce-scatter half."""
    g = it["group"]
    if g < 2 or it["bytes"] == 0:
        return 0.0
    w = hw.link_bytes_per_s if intra else hw.dcn_bytes_per_s
    lat = hw.latency_s if intra else hw.dcn_latency_s
    factor = 2 if it["kind"] == "all-reduce" else 1
    # Latency: (g-1) ring hops per all-gather, 2(g-1) per all-reduce, for each op (a buffer merged into
    # another op, count 0, adds bandwidth only).
    return factor * it["bytes"] * (g - 1) / g / w + factor * (g - 1) * lat * it["count"]


# ----------------------------------------------------------------------------------------------- memory

def _activation_bytes_per_token_layer(cfg, d, c: int) -> int:
    """Bytes per token per layer that the backward keeps from the forward, as XLA:CPU keeps them for this
    model (read off the buffer assignment of the compiled train step; docs/planner.md section 5 asks for the tensors
    actually saved rather than Korthikanti's 34 s*b*h):
      2 RMSNorms: normalised x in f32 and its scaled output      2*D*(4 + c)
      residual stream after attention and after the MLP          2*D*c
      q after RoPE, k and v (repeated to N heads for GQA),
      attention output                                           4*N_l*H*c
      scores/sqrt(H) and softmax probabilities, f32              2*N_l*S*4   (no flash attention)
      SwiGLU: gate, up, sigmoid(gate), silu(gate), silu*up       5*F_l*c
    With sequence parallelism the norms' f32 inputs and the residual stream hold S/n positions; the
    scaled norm outputs are kept as gathered (the matmuls' saved inputs).
    """
    sp = d["n"] if d["sp"] else 1
    return (2 * cfg.D * 4 // sp + 2 * cfg.D * c + 2 * cfg.D * c // sp + 4 * d["N_l"] * cfg.H * c
            + 2 * d["N_l"] * d["S"] * 4 + 5 * d["F_l"] * c)


def head_path(cfg) -> str:
    """The parameter the head reads: its own kernel, or the embedding table when tied."""
    return "embed/table" if cfg.tie_embeddings else "head/kernel"


def _memory(cfg, d, remat, decode: bool, opt_bytes: int, head_grad: int) -> dict:
    """Per-device bytes. Training total = params + optimizer state + token batch (the step's arguments;
    the new params and state are written in place, donated) + the temporary heap at its peak, which is
    the larger of the backward pass (saved activations + logits + the working set of the layer being
    differentiated) and the optimizer update (all gradients + one parameter-sized temporary). That is
    what XLA's memory_analysis() reports as arguments + outputs - aliased + temp."""
    T_l, c = d["B_l"] * d["S"], d["c"]
    P = d["param_bytes"]
    if decode:
        K_l = d["K_l"]
        kv = 2 * cfg.L * d["B_l"] * d["S"] * K_l * cfg.H * c
        act = d["B_l"] * (4 * cfg.D * 4 + 2 * d["N_l"] * d["S"] * 4 + 3 * d["F_l"] * c)  # one layer's working set
        logits = d["B_l"] * d["V_l"] * 4
        return {"params": P, "grads": 0, "optimizer": 0, "activations": act, "logits": logits,
                "kv_cache": kv, "inputs": d["B_l"] * 4, "total": P + kv + act + logits + d["B_l"] * 4,
                "peak_phase": "decode"}
    per_layer = _activation_bytes_per_token_layer(cfg, d, c)
    if remat in ("full", True):  # keep block inputs; recompute one block at a time in the backward
        layers = cfg.L * cfg.D * c + per_layer
    else:
        layers = cfg.L * per_layer
    # Outside the blocks: embedding output (gathered rows and the masked partial), final RMSNorm (f32 and
    # scaled), the f32 logits kept for the loss's backward. SP: the stream and the norm's f32 input / n.
    sp = d["n"] if d["sp"] else 1
    act = T_l * (layers + cfg.D * d["param_b"] * (1 + 1 / sp) + cfg.D * (4 / sp + c))
    logits = T_l * d["V_l"] * 4
    # Backward working set of the layer being differentiated: dgate/dup [T, F_l] and the attention's
    # score-sized gradients (dprobs, dscores, ...), or the logits gradient at the very start; plus the
    # head's gradient, the first parameter gradient to appear.
    transient = max(T_l * (2 * d["F_l"] * c + 4 * d["N_l"] * d["S"] * 4), logits)
    # FSDP: the gradients accumulate in their gathered shapes (head first) and each layer's weights are
    # gathered while it is differentiated.
    backward_peak = act + logits + transient + head_grad * d["zero_head"] + d["zero_layer_bytes"]
    # The stacked q/k/v kernels each layer's backward reads (one layer's under remat).
    backward_peak += (1 if remat in ("full", True) else cfg.L) * d["stacked_kernel_bytes"]
    # Optimizer update: all gradients live plus one parameter-sized temporary (XLA:CPU writes the
    # clipped gradient before the fused Adam update; params and moments update in place, donated).
    # FSDP: the backward leaves gradients in their gathered shapes; without a reduce-scatter (XLA:CPU)
    # they are all-reduced whole, so the update holds that reduction's input and output.
    grads = d["grad_bytes"] if not d["forms_rs"] else P
    update_peak = 2 * grads
    inputs = d["B_l"] * (d["S"] + 1) * 4
    temp = max(int(backward_peak), update_peak)
    total = P + opt_bytes + inputs + temp
    return {"params": P, "grads": grads, "optimizer": opt_bytes, "activations": act, "logits": logits,
            "backward_transient": transient, "inputs": inputs, "temp": temp, "total": total,
            "peak_phase": "backward" if backward_peak >= update_peak else "optimizer update"}


# ----------------------------------------------------------------------------------------------- plan

@dataclasses.dataclass
class Plan:
    """The answer of `plan()`. Bytes are per device; `collectives` holds per_step / per_layer summaries
    keyed like jaxtp.Collectives.summary() ("all-reduce@model"), by_axis totals with ring times and the
    itemised list; `time` holds compute/memory/communication and serial/overlapped/predicted seconds;
    `valid` is False when the mesh cannot run the config as asked (see `warnings`)."""

    model: dict
    mesh: dict
    setting: dict
    hardware: Hardware
    params: list[ParamInfo]
    memory: dict
    flops: dict
    collectives: dict
    time: dict
    mfu: float
    comm_bound_ratio: float | None
    warnings: list[str]
    valid: bool = True

    @property
    def fits(self) -> bool:
        return self.memory["total"] <= self.hardware.hbm_bytes

    @property
    def comm_bound(self) -> bool:
        return self.comm_bound_ratio is not None and self.comm_bound_ratio < 1

    @property
    def flops_per_step(self) -> float:
        return self.flops["model"]

    def to_dict(self) -> dict:
        hw = dataclasses.asdict(self.hardware)
        return {"model": self.model, "mesh": self.mesh, "setting": self.setting, "hardware": hw,
                "parameters": {"count": sum(math.prod(i.shape) for i in self.params),
                               "bytes_per_device": sum(i.local_bytes for i in self.params),
                               "replicated_bytes": sum(i.local_bytes for i in self.params if not i.sharded_over)},
                "memory": dict(self.memory), "fits": self.fits, "flops_per_step": self.flops["model"],
                "flops": dict(self.flops), "collectives": self.collectives, "time": dict(self.time),
                "mfu": self.mfu, "comm_bound_ratio": self.comm_bound_ratio, "comm_bound": self.comm_bound,
                "warnings": list(self.warnings), "valid": self.valid}

    def __str__(self) -> str:
        return format_plan(self)


def plan(cfg: ModelConfig | str, mesh, *, batch_size: int, seq_len: int, param_dtype=None,
         compute_dtype=None, optimizer="adamw", hardware: str | Hardware = "h100", remat=None,
         decode: bool = False, rules=None) -> Plan:
    """Plan one training step (or, with decode=True, one decode step over a `seq_len` KV cache).

    cfg: a ModelConfig or preset name. mesh: a jax Mesh, a spec ("8x8", "2x2x2", "data=2,model=4") or a
    {axis: size} dict; no devices are needed. param_dtype / compute_dtype default to the config's (the
    presets keep f32 master weights). batch_size is global, split over the data axis. remat: None or
    "full" (what to plan, apart from cfg.remat; the model's "dots" policy is not modelled). optimizer:
    "adamw" (the Trainer's), "adam", "sgd", "momentum", "lion" or an optax transformation. rules: a preset name (megatron, megatron-sp,
    fsdp, fsdp-sp) or a dict table, as Transformer.create takes; batch_size splits over every batch axis
    (data+fsdp). hardware: its `forms_reduce_scatter` decides whether SP / ZeRO reductions are planned as
    reduce-scatters (GPU/TPU presets) or as the all-reduces XLA:CPU emits.
    """
    cfg = ModelConfig.preset(cfg) if isinstance(cfg, str) else cfg
    changes = {k: str(jnp.dtype(to_dtype(v))) for k, v in
               (("param_dtype", param_dtype), ("compute_dtype", compute_dtype)) if v is not None}
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    if remat not in (None, False, "none", "full", True):
        raise ValueError(f"remat must be None/'none' or 'full', got {remat!r}")
    hw = get_hardware(hardware)
    ms = _mesh_shape(mesh)
    d, infos, rules_resolved, warnings, valid = _dims(cfg, ms, rules, batch_size, seq_len, hw)
    if remat in ("full", True) and not cfg.scan_layers:
        warnings.append("remat planned for an unrolled model: XLA:CPU schedules its recomputation early and "
                        "frees little (L=8: 597 -> 540 MiB, scanned 727 -> 134 MiB); set scan_layers=True")

    opt_bytes = 0 if decode else optimizer_bytes(infos, optimizer)
    head_grad = next(i.local_bytes for i in infos if i.path == head_path(cfg))
    memory = _memory(cfg, d, remat, decode, opt_bytes, head_grad)
    flops = _flops(cfg, d, batch_size, seq_len, remat, decode)
    items = (_decode_collectives if decode else _train_collectives)(cfg, d)
    collectives = _collectives(cfg, d, items, ms, hw)
    times, mfu = _times(d, memory, flops, items, hw, decode)
    R = _ratio(cfg, d, memory, items, hw, decode, times, collectives, warnings)
    if memory["total"] > hw.hbm_bytes:
        warnings.append(f"does not fit: {memory['total'] / GiB:.1f} GiB per device > {hw.hbm_bytes / GiB:.1f} GiB "
                        f"HBM ({hw.name})")
    elif memory["total"] > 0.9 * hw.hbm_bytes:
        warnings.append(f"tight: {memory['total'] / GiB:.1f} GiB of {hw.hbm_bytes / GiB:.1f} GiB HBM; allocator "
                        "fragmentation and framework buffers may not fit")
    setting = {"batch_size": batch_size, "seq_len": seq_len, "tokens_per_step": d["tok"], "decode": decode,
               "param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype,
               "optimizer": optimizer if isinstance(optimizer, str) else "custom", "remat": remat,
               "rules": {k: "+".join(_axes(v)) or None for k, v in rules_resolved.items()},
               "local": {k: d[k] for k in ("B_l", "N_l", "K_l", "F_l", "V_l")}}
    model = {"param_count": cfg.param_count(), "padded_vocab": d["Vp"], **cfg.to_dict()}
    return Plan(model, dict(ms.shape), setting, hw, infos, memory, flops, collectives, times, mfu, R,
                warnings, valid)


def _dims(cfg, ms: MeshShape, rules, batch_size, seq_len, hw):
    """Resolved rules, per-device parameter rows and the local sizes every formula below reads."""
    rules_resolved, warnings, valid = _resolve(cfg, ms, rules)
    infos = _expand(cfg, _block_and_rest(cfg, tuple(ms.shape.items()), tuple(rules_resolved.items())))
    split = lambda name: math.prod(ms.shape.get(a, 1) for a in _axes(rules_resolved[name]))
    tp_axes = _axes(rules_resolved["mlp"]) or _axes(rules_resolved["heads"]) or _axes(rules_resolved["vocab"])
    dp_axes = _axes(rules_resolved["batch"])
    nd = split("batch")
    n = math.prod(ms.shape.get(a, 1) for a in tp_axes)
    Vp = next(i.shape[0] for i in infos if i.path == "embed/table")
    c = jnp.dtype(to_dtype(cfg.compute_dtype)).itemsize
    used = set(tp_axes) | set(dp_axes)
    d = {
        "n": n, "d": nd, "tp_axis": "+".join(tp_axes) or "model", "dp_axis": "+".join(dp_axes) or "data",
        "n_dev": math.prod(ms.shape.values()),
        # devices that merely repeat others' work: mesh axes the rules table does not use
        "dup": math.prod(s for a, s in ms.shape.items() if a not in used),
        "B_l": -(-batch_size // nd), "S": seq_len, "tok": batch_size * seq_len, "Vp": Vp,
        "N_l": cfg.N // split("heads"), "K_l": cfg.K // split("kv_heads"), "F_l": cfg.F // split("mlp"),
        "V_l": Vp // split("vocab"), "kv_split": split("kv_heads"), "vocab_split": split("vocab"),
        "c": c, "param_b": jnp.dtype(to_dtype(cfg.param_dtype)).itemsize,
        # XLA:CPU has no bf16 matmul: it computes in f32 and the partial sums it all-reduces are f32.
        "act_b": c if hw.native_bf16 else 4,
        "vocab_sharded": split("vocab") > 1, "heads_sharded": split("heads") > 1, "mlp_sharded": split("mlp") > 1,
        "kv_sharded": split("kv_heads") > 1, "param_bytes": sum(i.local_bytes for i in infos),
        "n_tp_leaves": sum(1 for i in infos if set(tp_axes) & i.sharded_over),
        "forms_rs": hw.forms_reduce_scatter, "infos": infos,
    }
    # Sequence parallelism: the residual stream's sequence split over the TP axis between blocks.
    sp_axes = _axes(rules_resolved["act_seq"])
    d["sp"] = bool(sp_axes) and n > 1 and set(sp_axes) <= set(tp_axes)
    if sp_axes and not d["sp"]:
        warnings.append(f"act_seq maps to {'+'.join(sp_axes)!r}, not the tensor-parallel axis: its collectives "
                        "are not modelled")
    if d["sp"] and seq_len % split("act_seq"):
        warnings.append(f"seq_len={seq_len} is not divisible by the {'+'.join(sp_axes)} axis "
                        f"({split('act_seq')}): the residual stream stays whole (no sequence parallelism)")
        d["sp"] = False
    # ZeRO-3 / FSDP: mesh axes that split both the batch and some weight (jaxtp.Layout.gathered).
    zero_axes = [a for a in dp_axes if any(a in i.sharded_over for i in infos)]
    d["zero"] = lambda i: math.prod(ms.shape.get(a, 1) for a in zero_axes if a in i.sharded_over)
    d["nf"] = math.prod(ms.shape.get(a, 1) for a in zero_axes)
    d["zero_axis"] = "+".join(zero_axes) or "fsdp"
    d["data_only_axis"] = "+".join(a for a in dp_axes if a not in zero_axes) or "data"
    d["grad_bytes"] = sum(i.local_bytes * d["zero"](i) for i in infos)  # gradients as the backward leaves them
    d["zero_head"] = next(d["zero"](i) for i in infos if i.path == head_path(cfg))
    d["zero_layer_bytes"] = sum(i.local_bytes * d["zero"](i) for i in infos if i.path.startswith("blocks/0/")) \
        if d["nf"] > 1 else 0
    # q/k/v run as one matmul over kernels stacked in the compute dtype (layers.Attention.fused) when they
    # need no ZeRO gather and the kv heads split like the query heads or are replicated beside them; XLA
    # keeps each layer's stacked copy for the backward: [D, K_l, G+2, H], or [D, N_l, 3, H] replicated.
    qkv = [i for i in infos if i.path in {f"blocks/0/attn/{n}/kernel" for n in "qkv"}]
    kv_replicated = d["heads_sharded"] and rules_resolved["kv_heads"] is None
    d["qkv_stacked"] = all(d["zero"](i) == 1 for i in qkv) and (
        rules_resolved["heads"] == rules_resolved["kv_heads"] or kv_replicated)
    q_bytes = next(i.local_bytes for i in qkv if i.path.endswith("q/kernel")) * c // d["param_b"]
    d["stacked_kernel_bytes"] = 0 if not d["qkv_stacked"] else 3 * q_bytes if kv_replicated else \
        sum(i.local_bytes * c // d["param_b"] for i in qkv)
    if batch_size % nd:
        warnings.append(f"batch_size={batch_size} is not divisible by the data axis ({nd}); planned with "
                        f"{d['B_l']} rows per device")
        valid = False
    if seq_len > cfg.max_seq_len:
        warnings.append(f"seq_len={seq_len} exceeds the config's max_seq_len={cfg.max_seq_len}")
    for axis, size in ms.shape.items():
        if size > 1 and axis not in used:
            warnings.append(f"mesh axis {axis!r} (size {size}) is unused by the rules table: its devices "
                            "duplicate the work of the others")
    if d["heads_sharded"] and not d["kv_sharded"] and cfg.K > 1:
        warnings.append(f"kv heads replicated: n_kv_heads={cfg.K} < model axis {n}; k/v weights are replicated "
                        + ("and every query head projects its own k/v (N/K times the kv projection FLOPs)"
                           if d["qkv_stacked"] else "and the backward adds a dK/dV all-reduce and 2 all-gathers"))
    if Vp != cfg.V:
        warnings.append(f"vocab padded {cfg.V} -> {Vp} to split over the model axis")
    return d, infos, rules_resolved, warnings, valid


def _flops(cfg, d, batch_size, seq_len, remat, decode) -> dict:
    """Model FLOPs follow jaxtp.train.train_flops_per_step (PaLM): 6*P*T over matmul params plus attention
    12*L*B*S^2*N*H counted NON-causally - the model computes the full S x S scores and masks them, so that
    is also the work done. Hardware FLOPs add padded vocab columns, replicated kv projections (stacked:
    each query head projects its kv head's k/v, N/K times; unstacked: every rank projects all K heads)
    and remat's recomputed forward. Decode: 2*P*B + 4*L*B*S*N*H."""
    from .train import train_flops_per_step

    matmul_params = cfg.matmul_param_count()
    if decode:
        tok, per_param, attention = batch_size, 2.0, 4.0 * cfg.L * batch_size * seq_len * cfg.N * cfg.H
        model = per_param * matmul_params * tok + attention
    else:
        tok, per_param = batch_size * seq_len, 6.0
        model = float(train_flops_per_step(cfg, batch_size, seq_len))
        attention = 12.0 * cfg.L * batch_size * seq_len ** 2 * cfg.N * cfg.H
    stacked_replicated = d["qkv_stacked"] and not d["kv_sharded"] and not decode
    kv_heads = cfg.N if stacked_replicated else d["n"] / d["kv_split"] * cfg.K
    kv_extra = per_param * 2 * cfg.D * cfg.H * cfg.L * tok * (kv_heads - cfg.K) if d["heads_sharded"] else 0.0
    hardware = model + per_param * (d["Vp"] - cfg.V) * cfg.D * tok + kv_extra
    if remat in ("full", True) and not decode:
        hardware += model / 3  # one more forward pass
    return {"model": model, "hardware": hardware, "per_device": hardware / d["n_dev"] * d["dup"],
            "matmul": per_param * matmul_params * tok, "attention": attention,
            "convention": "2*P*B + 4*L*B*S*N*H per decode step (S cached positions)" if decode else
                          "6*P*T + 12*L*B*S^2*N*H, attention counted non-causally (PaLM; equals "
                          "jaxtp.train.train_flops_per_step)"}


def _collectives(cfg, d, items, ms: MeshShape, hw: Hardware) -> dict:
    """Summaries per step, per layer and per mesh axis; each item gets its ring time. Devices sit on the
    mesh row-major (jaxtp.mesh.make_mesh), so an axis stays inside one fast domain (node / slice) when
    its size times the product of the later axes' sizes is at most `node_size`; otherwise its ring
    crosses domains and runs at the DCN rate."""
    stride, acc = {}, 1
    for axis in reversed(list(ms.shape)):
        stride[axis] = acc
        acc *= ms.shape[axis]
    intra = lambda axes: all(ms.shape.get(a, 1) * stride.get(a, 1) <= hw.node_size for a in axes.split("+"))
    by_axis: dict = {}
    per_layer: dict = {}
    for it in items:
        it["time_s"] = _coll_time(it, hw, intra(it["axis"]))
        row = by_axis.setdefault(it["axis"], {"count": 0, "bytes": 0, "time_s": 0.0,
                                              "link": "intra" if intra(it["axis"]) else "dcn"})
        row["count"] += it["count"]
        row["bytes"] += it["bytes"]
        row["time_s"] += it["time_s"]
        if it["per_layer"]:
            row = per_layer.setdefault(f"{it['kind']}@{it['axis']}", {"count": 0, "bytes": 0})
            row["count"] += it["count"] // cfg.L
            row["bytes"] += it["bytes"] // cfg.L
    return {"per_step": _summary(items), "per_layer": dict(sorted(per_layer.items())), "by_axis": by_axis,
            "items": items, "intra": {a: intra(a) for a in ms.shape},
            "bytes_convention": "size of the unsharded buffer each collective produces (as jaxtp.hlo counts)"}


def _times(d, memory, flops, items, hw: Hardware, decode: bool):
    """Roofline pieces and three step times.
    compute: hardware FLOPs at the matmul peak. memory: HBM traffic - training reads the weights in the
    forward and backward, writes gradients, reads and writes params + optimizer state in the update, and
    writes then reads every saved activation; decode reads weights and the KV cache once.
    serial = all three in sequence; overlapped = the largest alone (perfect overlap).
    predicted (training) = matmuls at peak with their weight reads hidden inside them, plus the
    memory-bound element-wise and optimizer kernels, plus the model-axis collectives (Megatron's
    all-reduces sit on the critical path; docs/planner.md section 3 plans for little overlap), plus whatever of the
    data-axis gradient all-reduce does not hide behind the backward pass (2/3 of the compute).
    predicted (decode) = max(compute, memory) + collectives."""
    t_compute = flops["per_device"] / hw.flops_per_s
    if decode:
        hbm = memory["params"] + memory["kv_cache"] + memory["activations"]
        elementwise = 0.0
    else:
        elementwise = 2 * (memory["params"] + memory["optimizer"]) + memory["grads"] \
            + 2 * (memory["activations"] + memory["logits"])
        hbm = 3 * memory["params"] + elementwise
    t_memory = hbm / hw.hbm_bytes_per_s
    t_crit = sum(it["time_s"] for it in items if it["critical"])
    t_bg = sum(it["time_s"] for it in items if not it["critical"])
    t_comm = t_crit + t_bg
    if decode:
        predicted = max(t_compute, t_memory) + t_comm
    else:
        predicted = t_compute + elementwise / hw.hbm_bytes_per_s + t_crit + max(0.0, t_bg - 2 / 3 * t_compute)
    serial, overlapped = t_compute + t_memory + t_comm, max(t_compute, t_memory, t_comm)
    peak = d["n_dev"] * hw.flops_per_s
    times = {"compute_s": t_compute, "memory_s": t_memory, "communication_s": t_comm,
             "communication_critical_s": t_crit, "hbm_bytes": hbm, "serial_s": serial,
             "overlapped_s": overlapped, "predicted_s": predicted,
             "bound": max((t_compute, "compute"), (t_memory, "memory"), (t_comm, "communication"))[1],
             "mfu_serial": flops["model"] / (serial * peak), "mfu_overlapped": flops["model"] / (overlapped * peak)}
    if decode:
        times["mbu"] = hbm / (predicted * hw.hbm_bytes_per_s)
    return times, flops["model"] / (predicted * peak)


def _ratio(cfg, d, memory, items, hw: Hardware, decode, times, collectives, warnings):
    """R = T_math / T_comm of one layer: its TP-sharded matmuls against its model-axis collectives.
    Training uses docs/planner.md section 3's ratio with this step's own collectives (7 activation buffers per layer as
    XLA emits them, where Megatron's formula assumes 4; that formula is reported alongside). Decode: a
    layer's work is loading its weights and KV cache from HBM (docs/planner.md section 6), so R compares that time."""
    times["comm_bound_ratio_megatron"] = None
    if d["n"] < 2:
        return None
    p_layer = 2 * cfg.D * cfg.N * cfg.H + 2 * cfg.D * cfg.K * cfg.H + 3 * cfg.D * cfg.F
    tok = d["B_l"] * (1 if decode else d["S"])
    t_math = (2 if decode else 6) * p_layer * tok / d["n"] / hw.flops_per_s
    if decode:
        layer_bytes = (memory["params"] - 2 * d["V_l"] * cfg.D * d["param_b"] + memory["kv_cache"]) / cfg.L
        t_math = max(t_math, layer_bytes / hw.hbm_bytes_per_s)
    layer = [it for it in items if it["per_layer"] and it["axis"] == d["tp_axis"]]
    t_comm = sum(it["time_s"] for it in layer) / cfg.L
    intra = collectives["intra"].get(d["tp_axis"].split("+")[0], True)
    w, lat = (hw.link_bytes_per_s, hw.latency_s) if intra else (hw.dcn_bytes_per_s, hw.dcn_latency_s)
    if not decode:
        times["comm_bound_ratio_megatron"] = p_layer * w / (2 * d["act_b"] * hw.flops_per_s * cfg.D * (d["n"] - 1))
    R = t_math / t_comm if t_comm > 0 else None
    if R is not None and R < 1:
        warnings.append(f"TP is communication-bound: R = T_math/T_comm = {R:.2f} < 1 per layer on the "
                        f"{d['n']}-way {d['tp_axis']!r} axis ({'NVLink/ICI' if intra else 'between nodes'}); "
                        "use a smaller model axis or more data parallelism")
    slow = [it["what"] for it in layer if it["count"] and it["bytes"] / it["count"] / it["group"] / w < lat]
    if slow:
        warnings.append("latency-bound collectives (per-device message moves in < 1 hop latency): " + ", ".join(slow))
    return R



# ------------------------------------------------------------------------------------------- formatting

def _b(x: float) -> str:
    for unit, f in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(x) >= f:
            return f"{x / f:,.2f} {unit}"
    return f"{int(x)} B"


def _t(s: float) -> str:
    return f"{s * 1e3:,.2f} ms" if s >= 1e-3 else f"{s * 1e6:,.1f} us"


def _table(head, rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]


def format_plan(p: Plan) -> str:
    """A readable, fixed-width report of a plan (what `run.py --plan` prints)."""
    s, m, hw = p.setting, p.memory, p.hardware
    mesh = " x ".join(f"{k}={v}" for k, v in p.mesh.items())
    lines = [f"plan: {p.model['param_count'] / 1e9:.3g}B params (D={p.model['d_model']}, L={p.model['n_layers']}, "
             f"N={p.model['n_heads']}, K={p.model['n_kv_heads']}, F={p.model['d_ff']}, V={p.model['padded_vocab']}) "
             f"on mesh {mesh} of {hw.name}",
             f"      {'decode' if s['decode'] else 'train'} step: batch {s['batch_size']} x seq {s['seq_len']}, params "
             f"{s['param_dtype']}, compute {s['compute_dtype']}, optimizer {s['optimizer']}, remat {s['remat']}",
             f"      per device: batch {s['local']['B_l']}, heads {s['local']['N_l']}, kv heads {s['local']['K_l']}, "
             f"d_ff {s['local']['F_l']}, vocab {s['local']['V_l']}", ""]
    keys = ["params", "grads", "optimizer", "activations", "logits", "kv_cache", "inputs", "total"]
    rows = [(k, _b(m[k])) for k in keys if k in m]
    lines += ["memory per device"] + _table(("", "bytes"), rows)
    lines.append(f"  peak during the {m['peak_phase']}; HBM {_b(hw.hbm_bytes)} -> "
                 f"{'fits' if p.fits else 'DOES NOT FIT'} ({m['total'] / hw.hbm_bytes:.0%})")
    f = p.flops
    lines += ["", f"FLOPs per step: model {f['model']:.3e} (matmul {f['matmul']:.3e}, attention {f['attention']:.3e}), "
                  f"hardware {f['hardware']:.3e}, per device {f['per_device']:.3e}",
              f"  convention: {f['convention']}", ""]
    c = p.collectives
    rows = []
    for key, v in c["per_step"].items():
        pl = c["per_layer"].get(key, {"count": 0, "bytes": 0})
        ax = key.split("@")[1]
        rows.append((key, pl["count"], _b(pl["bytes"]), v["count"], _b(v["bytes"]),
                     c["by_axis"].get(ax, {}).get("link", "")))
    lines += ["collectives (bytes = unsharded buffer produced)"] + (
        _table(("kind@axis", "per layer", "bytes", "per step", "bytes", "link"), rows) if rows else ["  none"])
    t = p.time
    lines += ["", "time per step"] + _table(("", "seconds"), [
        ("compute", _t(t["compute_s"])), ("memory (HBM)", _t(t["memory_s"])),
        ("communication", _t(t["communication_s"])), ("  on the critical path", _t(t["communication_critical_s"])),
        ("serial", _t(t["serial_s"])), ("overlapped", _t(t["overlapped_s"])), ("predicted", _t(t["predicted_s"]))])
    lines.append(f"  MFU predicted {p.mfu:.1%} (serial {t['mfu_serial']:.1%}, overlapped {t['mfu_overlapped']:.1%}); "
                 f"bound by {t['bound']}" + (f"; MBU {t['mbu']:.1%}" if "mbu" in t else ""))
    if p.comm_bound_ratio is not None:
        mega = t["comm_bound_ratio_megatron"]
        lines.append(f"  TP ratio R = T_{'work' if p.setting['decode'] else 'math'}/T_comm = {p.comm_bound_ratio:.2f} "
                     f"({'COMMUNICATION-BOUND' if p.comm_bound else 'not communication-bound'})"
                     + (f"; Megatron forward formula (docs/planner.md section 3) {mega:.2f}" if mega is not None else ""))
    if p.warnings:
        lines += ["", "warnings"] + [f"  - {w}" for w in p.warnings]
    return "\n".join(lines)


# `jaxtp.plan` is the function (re-exported by the package, like jaxtp.generate); hang the module's
# helpers on it so `jaxtp.plan.format_plan(p)` works too. `from jaxtp.plan import ...` reads the module.
for _f in (format_plan, get_hardware, measure_cpu, param_infos, optimizer_bytes):
    setattr(plan, _f.__name__, _f)
plan.Plan, plan.Hardware, plan.HARDWARE, plan.MeshShape = Plan, Hardware, HARDWARE, MeshShape
