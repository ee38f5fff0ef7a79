"""THE rules table: logical axis names -> mesh axes. The only module that knows about mesh axes.

Layers name logical axes ("heads", "mlp", "vocab", ...). A `Layout` pairs a mesh with a rules
table resolved for one model config: mesh axes the mesh lacks (or of size 1) drop out, and kv heads
that are fewer than the model axis are replicated (standard grouped-query practice: each kv head is
copied onto the ranks whose query heads read it). Every check runs in Python before XLA sees anything.

Parameters and activations use separate names for the model width and the sequence, so a strategy
can place them differently: weights carry "embed"; the residual stream between blocks is
("batch", "act_seq", "act_embed"); attention internals and KV caches keep "seq". A target is one
mesh axis, a tuple of mesh axes (the dimension splits over their product, e.g. batch over
("data", "fsdp")), or None. A scanned model (ModelConfig.scan_layers) stacks its block parameters on a
leading "layers" axis; every preset keeps it whole (None): lax.scan slices one layer per iteration, and a
layer axis split over devices would make each iteration gather its layer (pipeline stages are another tool).

Presets (every one is a table, no layer knows which is in force; an axis of size 1 or absent from
the mesh drops out, so each preset also runs on smaller meshes; `resolve_rules` also takes a dict):
  megatron     Megatron TP: heads, kv heads, MLP hidden and vocab over `model`; batch over data+fsdp
               (on a mesh with an fsdp axis and this preset, fsdp is plain data parallelism).
  megatron-sp  + sequence parallelism (Korthikanti et al. 2022): the residual stream between blocks is
               split along the sequence over `model`, so norms and residual adds run on S/n positions and
               each block-boundary all-reduce becomes a reduce-scatter, with an all-gather before the
               next block's matmuls. XLA:CPU (jax 0.10.2) forms no reduce-scatter: it all-reduces and
               keeps its slice (all-reduce + dynamic-slice), so on CPU SP moves more bytes, not fewer.
  fsdp         ZeRO-3 over `fsdp` composed with Megatron TP over `model`: every weight's embed axis
               (norm scales included) is split over `fsdp`, so params, grads and Adam moments are 1/fsdp
               per device; each weight is all-gathered where it is read (Layout.gathered) and the matmul
               weights again in the backward; batch over data+fsdp. With model=1 this is plain FSDP.
  fsdp-sp      fsdp + sequence parallelism.
A mesh axis that splits both the batch and a weight is a ZeRO axis: that is all `gathered` looks at, so
a user table such as {**FSDP, "embed": ("data", "fsdp")} (ZeRO-3 over every data-parallel device) needs
no other change.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Mapping, NamedTuple, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .config import ModelConfig
from .mesh import KNOWN_AXES, axis_size

__all__ = [
    "MEGATRON",
    "MEGATRON_SP",
    "FSDP",
    "FSDP_SP",
    "LOGICAL_AXES",
    "RULE_PRESETS",
    "mesh_axes",
    "split_size",
    "resolve_table",
    "resolve_rules",
    "Indivisible",
    "indivisible_axes",
    "spec_for",
    "Layout",
    "axis_rules",
    "layer_layout",
    "placing",
    "module_shardings",
    "check_divisible",
    "constrain",
    "gathered",
]

# Megatron tensor parallelism: heads, kv heads, MLP hidden and vocab over `model`; batch over data+fsdp.
MEGATRON: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,  # attention internals and KV caches
    "act_seq": None,  # the residual stream's sequence axis between blocks
    "embed": None,  # the model width of every weight (and norm scale)
    "act_embed": None,  # the model width of the residual stream
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "layers": None,  # the stacked leading axis of a scanned model's block params (ModelConfig.scan_layers)
}
MEGATRON_SP = {**MEGATRON, "act_seq": "model"}
FSDP = {**MEGATRON, "embed": "fsdp"}
FSDP_SP = {**FSDP, "act_seq": "model"}
LOGICAL_AXES = tuple(MEGATRON)
RULE_PRESETS = {"megatron": MEGATRON, "megatron-sp": MEGATRON_SP, "fsdp": FSDP, "fsdp-sp": FSDP_SP}

# Which config field each sharded logical axis splits, for divisibility messages.
_SIZED_AXES = {"heads": "n_heads", "kv_heads": "n_kv_heads", "mlp": "d_ff", "embed": "d_model"}


def mesh_axes(target) -> tuple[str, ...]:
    """A rules target (one mesh axis, a tuple of them, or None) as a tuple of mesh axis names."""
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def split_size(target, mesh) -> int:
    """How many ways `target` (a rules target or a tuple of mesh axes) splits a dimension on `mesh`: the
    product of its axes' sizes, an axis the mesh lacks counting 1. `mesh`: anything with a `.shape` dict."""
    return math.prod(axis_size(mesh, a) for a in mesh_axes(target))


def _suggest_meshes(cfg: ModelConfig, mesh) -> str:
    """Meshes of the same devices (fsdp kept) whose model axis divides heads, d_ff and kv heads."""
    n_dev, f = mesh.devices.size, axis_size(mesh, "fsdp")
    three = "fsdp" in mesh.shape
    ok = [
        (f"{n_dev // (f * m)}x{f}x{m}" if three else f"{n_dev // m}x{m}")
        for m in range(1, n_dev // f + 1)
        if (n_dev // f) % m == 0
        and cfg.n_heads % m == 0
        and cfg.d_ff % m == 0
        and (cfg.n_kv_heads % m == 0 or m % cfg.n_kv_heads == 0)
    ]
    return ", ".join(ok) if ok else "none"


def _hint(cfg: ModelConfig, mesh, axes: tuple[str, ...], size: int) -> str:
    n_dev = mesh.devices.size
    if axes == ("model",):
        return (
            f"pick a mesh whose model axis divides it (meshes that work with {n_dev} devices: "
            f"{_suggest_meshes(cfg, mesh)})"
        )
    ok = [str(m) for m in range(1, n_dev + 1) if n_dev % m == 0 and size % m == 0]
    return f"pick a mesh whose {'+'.join(axes)} size divides it (sizes that do, on {n_dev} devices: {', '.join(ok)})"


def resolve_table(mesh, rules: Mapping | str | None = None) -> dict:
    """The rules table for `mesh` with no model config: names and mesh axes checked, mesh axes the mesh lacks
    (or has at size 1) dropped. Divisibility is then checked per parameter, against its own shape."""
    if rules is None:
        rules = "megatron"
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(
                f"unknown rules preset {rules!r}; choose one of {sorted(RULE_PRESETS)} or pass a dict table"
            )
        rules = RULE_PRESETS[rules]
    unknown = set(rules) - set(LOGICAL_AXES)
    if unknown:
        raise ValueError(f"rules table names unknown logical axes {sorted(unknown)}; known: {LOGICAL_AXES}")
    missing = set(LOGICAL_AXES) - set(rules)
    if missing:
        raise ValueError(f"rules table lacks logical axes {sorted(missing)}; map each to a mesh axis or None")
    present = set(mesh.shape)
    resolved: dict = {}
    for name, target in rules.items():
        axes = mesh_axes(target)
        for a in axes:
            if not isinstance(a, str):
                raise ValueError(
                    f"rules table: logical axis {name!r} maps to {target!r}; a target is a mesh "
                    "axis name, a tuple of names, or None"
                )
            if a not in present and a not in KNOWN_AXES:
                raise ValueError(
                    f"rules table: logical axis {name!r} maps to mesh axis {a!r}, which neither "
                    f"this mesh {tuple(mesh.shape)} nor jaxtp's mesh specs {KNOWN_AXES} have"
                )
        if len(set(axes)) != len(axes):
            raise ValueError(f"rules table: logical axis {name!r} names a mesh axis twice in {target!r}")
        axes = tuple(a for a in axes if a in present and axis_size(mesh, a) > 1)
        resolved[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return resolved


def resolve_rules(cfg: ModelConfig, mesh, rules: Mapping | str | None = None) -> dict:
    """Resolve a rules table for `cfg` on `mesh`, checking it and divisibility up front.

    `rules`: a preset name (RULE_PRESETS), a dict {logical name: mesh axis | tuple of axes | None}
    naming every logical axis, or None (megatron). Returns the same kind of dict with the mesh axes
    the mesh lacks or has at size 1 removed (a tuple left with one axis becomes that axis). Raises
    ValueError for unknown or missing logical names, unknown mesh axes, an axis repeated in one
    target, and - naming the parameter, logical axis, mesh axis and both sizes - a split that cannot
    be even (the first of `indivisible_axes`).
    """
    resolved = resolve_table(mesh, rules)
    bad = indivisible_axes(cfg, mesh, resolved)
    if bad:
        first = bad[0]
        raise ValueError(
            f"{first.describe()}; {_hint(cfg, mesh, first.mesh_axes, first.size)} or change {first.field}"
        )
    if cfg.n_kv_heads % split_size(resolved["kv_heads"], mesh):
        resolved["kv_heads"] = None  # GQA: replicate each kv head over the ranks of its query group
    return resolved


class Indivisible(NamedTuple):
    """A logical axis whose config size its mesh axes do not split evenly (see `indivisible_axes`)."""

    axis: str  # the logical axis, e.g. "heads"
    field: str  # the ModelConfig field that sizes it, e.g. "n_heads"
    size: int  # that field's value
    mesh_axes: tuple[str, ...]  # the mesh axes the rules table maps it to
    split: int  # the product of their sizes

    def describe(self) -> str:
        return (
            f"{self.field}={self.size} (logical axis {self.axis!r}) is not divisible by mesh axis "
            f"{'+'.join(self.mesh_axes)!r} of size {self.split}"
        )


def indivisible_axes(cfg: ModelConfig, mesh, rules: Mapping | str | None = None) -> tuple[Indivisible, ...]:
    """Every sized logical axis (heads, kv_heads, mlp, embed) that `rules` splits unevenly on `mesh`, in
    that order, as data: what resolve_rules refuses. Kv heads fewer than their split but dividing it are
    not among them (resolve_rules replicates those). The table itself is checked as resolve_table does."""
    resolved = resolve_table(mesh, rules)
    out = []
    for name, field in _SIZED_AXES.items():
        axes, size = mesh_axes(resolved[name]), getattr(cfg, field)
        split = split_size(axes, mesh)
        if size % split and not (name == "kv_heads" and split % size == 0):
            out.append(Indivisible(name, field, size, axes, split))
    return tuple(out)


def spec_for(names: Sequence[str | None], rules: Mapping, what: str = "array") -> P:
    """PartitionSpec for an array whose dimensions carry `names`. Unknown names and collisions raise."""
    out, used = [], {}
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(f"{what}: unknown logical axis {name!r}; the rules table knows {tuple(rules)}")
        target = rules[name]
        for a in mesh_axes(target):
            if a in used:
                raise ValueError(
                    f"{what}: logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r}; "
                    "one array dimension per mesh axis — change the rules table"
                )
            used[a] = name
        out.append(target)
    return P(*out)


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """A mesh plus the rules resolved for one config. Layers hold one and ask it to pin activations
    (`constrain`) and to read weights (`gathered`)."""

    mesh: jax.sharding.Mesh
    rules: dict

    @classmethod
    def create(cls, cfg: ModelConfig, mesh, rules=None) -> "Layout":
        return cls(mesh, resolve_rules(cfg, mesh, rules))

    def spec(self, names, what="array") -> P:
        return spec_for(names, self.rules, what)

    def sharding(self, names, what="array") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, what))

    def constrain(self, x, names):
        """Pin an activation's layout (layers do so only where a block's layout changes hands).

        A dimension its mesh axes do not divide (a decode step's single position under sequence
        parallelism, a batch of 1) keeps the longest leading run of its axes that does divide it, and
        stays whole when none does: activations are laid out for speed, never at the cost of an error
        or padding. Weights are never relaxed (check_divisible raises)."""
        spec = self.spec(names, f"activation {tuple(names)}")
        fitted = []
        for dim, target in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
            axes = mesh_axes(target)
            while axes and dim % split_size(axes, self.mesh):
                axes = axes[:-1]
            fitted.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*fitted)))

    def needs_gather(self, names) -> bool:
        """Whether a weight with these names is stored split over a batch axis (so reads gather it)."""
        batch_axes = set(mesh_axes(self.rules.get("batch")))
        return any(a in batch_axes for n in names if n is not None for a in mesh_axes(self.rules.get(n)))

    def gathered(self, w, names):
        """A weight as the computation reads it: dimensions split over a mesh axis that also splits the
        batch (ZeRO-3 / FSDP storage sharding) are all-gathered; tensor-parallel splits stay. A no-op
        (w itself) when no weight dimension uses a batch axis, as under megatron."""
        batch_axes = set(mesh_axes(self.rules.get("batch")))
        spec = self.spec(names, f"weight {tuple(names)}")
        kept = [tuple(a for a in mesh_axes(t) if a not in batch_axes) for t in spec]
        if all(len(k) == len(mesh_axes(t)) for k, t in zip(kept, spec)):
            return w
        kept = [None if not k else k[0] if len(k) == 1 else k for k in kept]
        return jax.lax.with_sharding_constraint(w, NamedSharding(self.mesh, P(*kept)))

    def state_shardings(self, state):
        """NamedShardings for an nnx.State whose Variables carry `out_sharding` logical names."""

        def one(path, v):
            sharding = self.variable_sharding("/".join(str(p) for p in path), v)
            return v.replace(sharding) if isinstance(v, nnx.Variable) else sharding

        return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def variable_sharding(self, where: str, v) -> NamedSharding:
        """Where a Variable goes: its logical names through this table (divisibility checked against its
        shape, naming `where`); a Variable without names is replicated."""
        names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
        spec = self.spec(names, where) if names else P()
        if names:
            check_divisible(where, names, v.shape, self.mesh, spec)
        return NamedSharding(self.mesh, spec)

    def table(self) -> list[tuple[str, str]]:
        return [(k, "replicated" if v is None else "+".join(mesh_axes(v))) for k, v in self.rules.items()]

    def split_of(self, name: str) -> int:
        """How many ways the logical axis `name` is split."""
        return split_size(self.rules.get(name), self.mesh)

    def for_config(self, cfg: ModelConfig) -> "Layout":
        """This table checked against `cfg`'s sizes (kv heads fewer than the model axis get replicated);
        one Layout per (table, config), so the layers of one model share it."""
        return _for_config(self, cfg)

    def placing(self):
        """Flax's logical-axis rules set to this table, so that parameters created under `jax.set_mesh`
        (Flax's eager sharding) land where this layout says."""
        return nnx.logical_axis_rules(list(self.rules.items()))


@functools.lru_cache(maxsize=64)
def _for_config(layout: Layout, cfg: ModelConfig) -> Layout:
    return Layout(layout.mesh, resolve_rules(cfg, layout.mesh, layout.rules))


_CURRENT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("jaxtp_layout", default=None)


@contextlib.contextmanager
def axis_rules(mesh, rules: Mapping | str | Layout | None = None):
    """The rules table in force for jaxtp layers built inside (those given no `layout`), and, through
    Flax's logical-axis rules, for any parameter named with jaxtp's logical axes. With `jax.set_mesh(mesh)`
    around it, building a model places every parameter (Flax's eager sharding); `jaxtp.create` uses it
    inside jit. Yields the Layout."""
    layout = rules if isinstance(rules, Layout) else Layout(mesh, resolve_table(mesh, rules))
    token = _CURRENT.set(layout)
    try:
        with layout.placing():
            yield layout
    finally:
        _CURRENT.reset(token)


def layer_layout(layout: Layout | None, cfg: ModelConfig) -> Layout | None:
    """The layout a layer uses: the one it was given, else the `axis_rules` in force checked against its
    config, else None (unsharded). Building under a bare `jax.set_mesh` with eager sharding on is refused
    here with the fix, where Flax would read jaxtp's logical names as mesh axes."""
    if layout is not None:
        return layout
    current = _CURRENT.get()
    if current is not None:
        return current.for_config(cfg)
    if nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty:
        raise ValueError(
            "jaxtp layers built under jax.set_mesh need the rules table too: add "
            "jaxtp.axis_rules(mesh, rules) to the with-statement, or build with jaxtp.create(...)"
        )
    return None


def placing(layout: Layout | None):
    """Layout.placing; without a layout (a layer built unsharded, with no mesh in context) Flax's eager
    sharding is off, which would otherwise ask for a mesh to place the named parameters on."""
    return nnx.use_eager_sharding(False) if layout is None else layout.placing()


def module_shardings(module, default: Layout):
    """NamedShardings for every Variable of `module`: a Variable of a module that holds a `layout` (jaxtp's
    layers) follows that layout's rules; others follow `default`. Unnamed Variables are replicated."""
    layouts = {
        path: m.layout
        for path, m in nnx.iter_modules(module)
        if isinstance(getattr(m, "layout", None), Layout)
    }

    def one(path, v):
        layout = layouts.get(tuple(path[:-1]), default)
        return v.replace(layout.variable_sharding("/".join(str(p) for p in path), v))

    return nnx.from_flat_state([(path, one(path, v)) for path, v in nnx.to_flat_state(nnx.state(module))])


def check_divisible(where: str, names, shape, mesh, spec: P) -> None:
    """A one-line ValueError, naming `where`, for a weight dimension its mesh axes do not split evenly."""
    for dim, (name, target) in enumerate(zip(names, spec)):
        axes = mesh_axes(target)
        split = split_size(axes, mesh)
        if shape[dim] % split:
            raise ValueError(
                f"{where}: dimension {dim} (logical axis {name!r}, size {shape[dim]}) is not divisible by "
                f"mesh axis {'+'.join(axes)!r} of size {split}; change the config or the mesh"
            )


def constrain(x, names, layout: Layout | None):
    """Identity without a layout, so modules also run unsharded on one device."""
    return x if layout is None else layout.constrain(x, names)


def gathered(w, names, layout: Layout | None):
    """A weight as computations read it (Layout.gathered); identity without a layout."""
    return w if layout is None else layout.gathered(w, names)
