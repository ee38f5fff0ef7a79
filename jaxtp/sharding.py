"""THE rules table: logical axis names -> mesh axes. The only module that knows about mesh axes.

Layers name logical axes ("heads", "mlp", "vocab", ...). A `Layout` pairs a mesh with a rules
table resolved for one model config: mesh axes the mesh lacks become None, and kv heads that are
fewer than the model axis are replicated (standard grouped-query practice: each kv head is copied
onto the ranks whose query heads read it). Every check runs in Python before XLA sees anything.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import ModelConfig
from .mesh import axis_size

# Megatron tensor parallelism: heads, kv heads, MLP hidden and vocab over `model`; batch over `data`.
MEGATRON: dict[str, str | tuple[str, ...] | None] = {
    "batch": "data",
    "seq": None,
    "embed": None,
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
}
LOGICAL_AXES = tuple(MEGATRON)
RULE_PRESETS = {"megatron": MEGATRON}

# Which config field each sharded logical axis splits, for divisibility messages.
_SIZED_AXES = {"heads": "n_heads", "kv_heads": "n_kv_heads", "mlp": "d_ff", "embed": "d_model"}


def _axes_of(target) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def _suggest_meshes(cfg: ModelConfig, n_devices: int) -> str:
    ok = [f"{n_devices // m}x{m}" for m in range(1, n_devices + 1)
          if n_devices % m == 0 and cfg.n_heads % m == 0 and cfg.d_ff % m == 0
          and (cfg.n_kv_heads % m == 0 or m % cfg.n_kv_heads == 0)]
    return ", ".join(ok) if ok else "none"


def resolve_rules(cfg: ModelConfig, mesh, rules: Mapping | str | None = None) -> dict:
    """Resolve a rules table for `cfg` on `mesh`, checking divisibility up front.

    Returns {logical name: mesh axis | tuple of axes | None}. Raises ValueError naming the
    parameter, logical axis, mesh axis and both sizes when a split cannot be even.
    """
    if rules is None:
        rules = "megatron"
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(f"unknown rules preset {rules!r}; choose one of {sorted(RULE_PRESETS)}")
        rules = RULE_PRESETS[rules]
    unknown = set(rules) - set(LOGICAL_AXES)
    if unknown:
        raise ValueError(f"rules table names unknown logical axes {sorted(unknown)}; known: {LOGICAL_AXES}")
    missing = set(LOGICAL_AXES) - set(rules)
    if missing:
        raise ValueError(f"rules table lacks logical axes {sorted(missing)}; map each to a mesh axis or None")
    mesh_axes = set(mesh.shape)
    resolved: dict = {}
    for name, target in rules.items():
        axes = tuple(a for a in _axes_of(target) if a in mesh_axes and axis_size(mesh, a) > 1)
        resolved[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    n_dev = mesh.devices.size
    for name, field in _SIZED_AXES.items():
        axes = _axes_of(resolved[name])
        if not axes:
            continue
        size = getattr(cfg, field)
        split = 1
        for a in axes:
            split *= axis_size(mesh, a)
        if size % split == 0:
            continue
        if name == "kv_heads" and split % size == 0:
            resolved[name] = None  # GQA: replicate each kv head over the ranks of its query group
            continue
        raise ValueError(
            f"{field}={size} (logical axis {name!r}) is not divisible by mesh axis "
            f"{'+'.join(axes)!r} of size {split}; pick a mesh whose model axis divides it "
            f"(meshes that work with {n_dev} devices: {_suggest_meshes(cfg, n_dev)}) or change {field}")
    return resolved


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
        for a in _axes_of(target):
            if a in used:
                raise ValueError(
                    f"{what}: logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r}; "
                    "one array dimension per mesh axis — change the rules table")
            used[a] = name
        out.append(target)
    return P(*out)


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """A mesh plus the rules resolved for one config. Layers hold one and ask it to constrain."""

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
        """Pin an activation's layout (used only at block boundaries, where Megatron's all-reduces sit)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(names))

    def state_shardings(self, state):
        """NamedShardings for an nnx.State whose Variables carry `out_sharding` logical names."""

        def one(path, v):
            names = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Variable) else None
            where = "/".join(str(p) for p in path)
            spec = self.spec(names, where) if names else P()
            if names:
                check_divisible(where, names, v.shape, self.mesh, spec)
            return v.replace(NamedSharding(self.mesh, spec)) if isinstance(v, nnx.Variable) else \
                NamedSharding(self.mesh, spec)

        return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def table(self) -> list[tuple[str, str]]:
        return [(k, "replicated" if v is None else "+".join(_axes_of(v))) for k, v in self.rules.items()]


def check_divisible(where: str, names, shape, mesh, spec: P) -> None:
    for dim, (name, target) in enumerate(zip(names, spec)):
        split = 1
        for a in _axes_of(target):
            split *= axis_size(mesh, a)
        if shape[dim] % split:
            raise ValueError(
                f"{where}: dimension {dim} (logical axis {name!r}, size {shape[dim]}) is not divisible by "
                f"mesh axis {target!r} of size {split}; change the config or the mesh")


def constrain(x, names, layout: Layout | None):
    """Identity without a layout, so modules also run unsharded on one device."""
    return x if layout is None else layout.constrain(x, names)
