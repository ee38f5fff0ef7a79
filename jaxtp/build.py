"""Build any NNX module sharded on a mesh, straight into its shards.

`create(fn, mesh, rules, seed)` runs `fn(nnx.Rngs(seed))` inside `jax.jit` with output shardings taken
from the parameters' logical names, so each device only ever computes and holds its own shards (the
compiled init's HLO holds per-shard shapes only). It works for jaxtp's layers and for a user's own
`nnx.Param(..., out_sharding=names)` / `nnx.with_partitioning(init, names)` parameters alike; parameters
without names are replicated. Inside `fn`, jaxtp layers given no `layout` take the rules in force
(`jaxtp.axis_rules`), checked against their own config.
"""

from __future__ import annotations

import jax
from flax import nnx

from .sharding import axis_rules, module_shardings

__all__ = ["INIT_COMPILER_OPTIONS", "create", "lower_init", "abstract_sharded", "shardings_of"]

# Threefry compiles slowly on XLA:CPU and init runs once: skip backend optimisation (~35% faster).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def create(fn, mesh, rules=None, seed: int = 0) -> nnx.Module:
    """`fn(rngs)` built sharded on `mesh` by the rules table `rules` (a preset name, a dict, a Layout, or
    None for megatron). Unknown logical names and indivisible splits raise before anything is compiled."""
    graphdef, lowered = lower_init(fn, mesh, rules, seed)
    return nnx.merge(graphdef, lowered.compile(INIT_COMPILER_OPTIONS)())


def lower_init(fn, mesh, rules=None, seed: int = 0):
    """(graphdef, the lowered init) of `create`: its HLO shows what each device computes."""
    graphdef, state = nnx.split(abstract_sharded(fn, mesh, rules, seed))
    with axis_rules(mesh, rules):
        init = jax.jit(lambda: nnx.state(_built(fn, seed)()), out_shardings=shardings_of(state))
        return graphdef, init.lower()


def abstract_sharded(fn, mesh, rules=None, seed: int = 0) -> nnx.Module:
    """`fn(rngs)` with no allocation: every array a ShapeDtypeStruct carrying the sharding `create` gives
    it. The target of `create`, of checkpoint restores and of jaxtp.hf.load (which pass an `fn` that also
    casts: jaxtp.quant.converting)."""
    with axis_rules(mesh, rules) as layout:
        abstract = nnx.eval_shape(_built(fn, seed))
        shardings = module_shardings(abstract, layout)
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return nnx.merge(graphdef, state)


def shardings_of(abstract_state):
    """The shardings an abstract state's ShapeDtypeStructs carry, in the same tree."""
    return jax.tree.map(lambda a: a.sharding, abstract_state)


def _built(fn, seed: int):
    """`fn` as a thunk building from `seed` with Flax's eager sharding off (jit's out_shardings place it)."""

    def build():
        with nnx.use_eager_sharding(False):
            return fn(nnx.Rngs(seed))

    return build
