"""A jaxtp Block inside a Linen model through `flax.nnx.bridge.ToLinen`, sharded by jaxtp's rules table.

The bridge boxes each NNX Param as `nnx.bridge.NNXMeta`, whose `get_partition_spec()` gives the Param's
`out_sharding` logical names, so Linen's own route applies unchanged: `nn.get_partition_spec` on the
abstract variables, `nn.logical_to_mesh_sharding(..., mesh, list(layout.rules.items()))`, then `jit(init,
out_shardings=...)`. Flax's convention (`jax.set_mesh` + `jaxtp.axis_rules`, eager sharding) places them too.

ToLinen builds the NNX module at init *and again at every apply* (then overwrites its params with the Linen
variables), so each Param is created inside Linen's init/apply. Flax's eager sharding (on by default) then
needs a mesh context for a Param with `out_sharding`: without `jax.set_mesh` the Linen route runs init/apply
under `nnx.use_eager_sharding(False)` (as `jaxtp.create` does); `test_needs_mesh_or_eager_sharding_off`
pins the error otherwise. The discarded re-init is traced but compiled away (no RNG op in the apply's HLO).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxtp
from jaxtp.sharding import Layout, module_shardings

pytestmark = pytest.mark.timeout(300)

CFG = jaxtp.ModelConfig.preset("tiny")  # D=64, 8 heads of 8, 4 kv heads, d_ff 128
RULES = "megatron"


class LinenModel(nn.Module):
    """A Linen model: a jaxtp Block (NNX, bridged) then a Linen Dense head named with jaxtp's logical axes."""

    layout: Layout | None = None  # None: the Block takes the `jaxtp.axis_rules` in force, else runs unsharded

    @nn.compact
    def __call__(self, x_BSD, positions_BS):
        h_BSD = bridge.ToLinen(jaxtp.Block, args=(CFG, self.layout), name="block")(x_BSD, positions_BS)
        logits_BSV = nn.Dense(
            CFG.vocab_size,
            use_bias=False,
            name="head",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(CFG.init_std), ("embed", "vocab")
            ),
        )(h_BSD)
        return h_BSD, logits_BSV


@pytest.fixture(scope="module")
def setup():
    mesh = jaxtp.make_mesh("2x4")
    layout = Layout.create(CFG, mesh, RULES)
    rng = np.random.default_rng(0)
    x_BSD = jnp.asarray(rng.standard_normal((8, 16, CFG.d_model)), jnp.float32)
    positions_BS = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (8, 16))
    model = LinenModel(layout)

    def init(key):
        with nnx.use_eager_sharding(False):  # no mesh context: Linen's out_shardings place the params
            return model.init(key, x_BSD, positions_BS)

    def apply(variables, x_BSD, positions_BS):
        with nnx.use_eager_sharding(False):
            return model.apply(variables, x_BSD, positions_BS)

    abstract = jax.eval_shape(init, jax.random.key(0))
    logical_specs = nn.get_partition_spec(abstract)
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, list(layout.rules.items()))
    variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    apply_jit = jax.jit(apply)
    h_BSD, logits_BSV = apply_jit(variables, x_BSD, positions_BS)
    return dict(
        mesh=mesh,
        layout=layout,
        x=x_BSD,
        pos=positions_BS,
        model=model,
        init=init,
        apply=apply,
        apply_jit=apply_jit,
        abstract=abstract,
        logical_specs=logical_specs,
        shardings=shardings,
        variables=variables,
        h=h_BSD,
        logits=logits_BSV,
    )


def _flat(tree, is_leaf=None):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


def _nnx_block(mesh, seed):
    """An NNX jaxtp Block built sharded by the same rules (its own random values until copied over)."""
    return jaxtp.create(lambda rngs: jaxtp.Block(CFG, None, rngs), mesh, RULES, seed=seed)


def _nnx_apply(block, x_BSD, positions_BS):
    graphdef, state = nnx.split(block)
    return jax.jit(lambda s, x, p: nnx.merge(graphdef, s)(x, p))(state, x_BSD, positions_BS)


def test_init_and_apply_unsharded():
    """1. The Linen model (ToLinen(jaxtp.Block) + nn.Dense) initialises and applies, eagerly, with no mesh."""
    x_BSD = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, CFG.d_model)), jnp.float32)
    positions_BS = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    model = LinenModel(None)
    with nnx.use_eager_sharding(False):
        variables = model.init(jax.random.key(0), x_BSD, positions_BS)
        h_BSD, logits_BSV = model.apply(variables, x_BSD, positions_BS)
    assert set(variables) == {"params"}
    assert set(variables["params"]["block"]) == {"attn_norm", "attn", "mlp_norm", "mlp"}
    q = variables["params"]["block"]["attn"]["q"]["kernel"]
    assert isinstance(q, bridge.NNXMeta) and q.var_type is nnx.Param and q.value.shape == (64, 8, 8)
    assert h_BSD.shape == (2, 16, 64) and logits_BSV.shape == (2, 16, CFG.vocab_size)
    assert np.all(np.isfinite(h_BSD)) and not np.allclose(h_BSD, x_BSD)


def test_params_carry_jaxtp_logical_names(setup):
    """2a. The bridge's boxes carry each NNX Param's logical names, and jaxtp's table resolves them (through
    Linen's logical_to_mesh_sharding) to exactly the shardings jaxtp gives the NNX Block."""
    specs = setup["logical_specs"]["params"]
    assert specs["block"]["attn"]["q"]["kernel"] == P("embed", "heads", "head_dim")
    assert specs["block"]["attn"]["o"]["kernel"] == P("heads", "head_dim", "embed")
    assert specs["block"]["mlp"]["down"]["kernel"] == P("mlp", "embed")
    assert specs["block"]["attn_norm"]["scale"] == P("embed")
    assert specs["head"]["kernel"] == P("embed", "vocab")  # Linen's own LogicallyPartitioned, same names

    with nnx.use_eager_sharding(False):
        abstract_block = nnx.eval_shape(lambda: jaxtp.Block(CFG, setup["layout"], nnx.Rngs(0)))
    want = _flat(nnx.to_pure_dict(module_shardings(abstract_block, setup["layout"])))
    got = _flat(setup["shardings"]["params"]["block"])
    assert set(got) == set(want) and len(want) == 9
    for path, sharding in want.items():
        assert got[path] == sharding, (path, got[path], sharding)


def test_jitted_init_places_params_and_apply_runs_sharded(setup):
    """2b. jit(init, out_shardings) puts each param where the table says; apply runs jitted on them, with the
    NNX Block's collectives (Megatron: 2 model-axis all-reduces forward)."""
    params = setup["variables"]["params"]
    q = params["block"]["attn"]["q"]["kernel"]
    assert isinstance(q, bridge.NNXMeta)
    assert q.value.sharding.spec == P(None, "model", None)
    assert {s.data.shape for s in q.value.addressable_shards} == {(64, 2, 8)}
    assert params["block"]["mlp"]["down"]["kernel"].value.sharding.spec == P("model", None)
    head = params["head"]["kernel"]
    assert isinstance(head, nn.LogicallyPartitioned) and head.value.sharding.spec == P(None, "model")
    for path, sharding in _flat(setup["shardings"], is_leaf=lambda s: isinstance(s, NamedSharding)).items():
        leaf = _flat(nn.unbox(setup["variables"]))[path]
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), path

    h_BSD = setup["h"]
    assert h_BSD.shape == (8, 16, 64) and h_BSD.sharding.spec == P("data")
    assert setup["logits"].shape == (8, 16, CFG.vocab_size)
    mesh, x, pos = setup["mesh"], setup["x"], setup["pos"]
    linen = jaxtp.collectives(setup["apply_jit"], setup["variables"], x, pos, mesh=mesh)
    nnx_block = _nnx_block(mesh, seed=0)
    graphdef, state = nnx.split(nnx_block)
    native = jaxtp.collectives(
        jax.jit(lambda s, x, p: nnx.merge(graphdef, s)(x, p)), state, x, pos, mesh=mesh
    )
    assert native.summary() == {"all-reduce@model": {"count": 2, "bytes": 32768}}
    # The Linen model adds only its head (vocab-parallel logits, no collective).
    assert linen.summary() == native.summary()
    hlo = jaxtp.hlo.compiled_text(setup["apply_jit"], setup["variables"], x, pos).lower()
    assert "threefry" not in hlo and "rng" not in hlo  # ToLinen's per-apply re-init is compiled away


def test_outputs_equal_nnx_block_with_copied_params(setup):
    """3. An NNX jaxtp.Block given the wrapped Block's parameter values computes the same output, bitwise."""
    nnx_block = _nnx_block(setup["mesh"], seed=1)
    x, pos, h_linen = setup["x"], setup["pos"], setup["h"]
    before = _nnx_apply(nnx_block, x, pos)
    assert not np.allclose(before, h_linen)  # different random params: the copy below is what matters

    linen_block = nn.unbox(setup["variables"])["params"]["block"]
    nnx.update(nnx_block, linen_block)
    for path, v in _flat(nnx.to_pure_dict(nnx.state(nnx_block))).items():
        src = _flat(linen_block)[path]
        assert v.sharding == src.sharding, path  # same placement as the Linen params
        np.testing.assert_array_equal(v, src)
    h_nnx = _nnx_apply(nnx_block, x, pos)
    assert h_nnx.sharding == h_linen.sharding
    np.testing.assert_array_equal(np.asarray(h_nnx), np.asarray(h_linen))

    # And eagerly, unsharded: a plain NNX Block with the same values agrees within 1e-6.
    with nnx.use_eager_sharding(False):
        plain = nnx.eval_shape(lambda: jaxtp.Block(CFG, None, nnx.Rngs(0)))
    plain = nnx.merge(nnx.graphdef(plain), jax.tree.map(np.asarray, nnx.state(nnx_block)))
    np.testing.assert_allclose(
        np.asarray(plain(np.asarray(x), np.asarray(pos))), np.asarray(h_linen), rtol=0, atol=1e-6
    )


def test_flax_convention_set_mesh_and_axis_rules(setup):
    """Flax's eager-sharding route: under jax.set_mesh + jaxtp.axis_rules, a Block given no layout takes the
    table in force; plain jit(init) then places the Block's params (no out_shardings), with the same values."""
    mesh, x, pos = setup["mesh"], setup["x"], setup["pos"]
    model = LinenModel(None)
    with jax.set_mesh(mesh), jaxtp.axis_rules(mesh, RULES):
        variables = jax.jit(model.init)(jax.random.key(0), x, pos)
        h_BSD, _ = jax.jit(model.apply)(variables, x, pos)
    block = variables["params"]["block"]
    q = block["attn"]["q"]["kernel"].value
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model", None)), 3)
    assert {s.data.shape for s in q.addressable_shards} == {(64, 2, 8)}
    for path, leaf in _flat(nn.unbox(block)).items():
        want = _flat(setup["shardings"]["params"]["block"], is_leaf=lambda s: isinstance(s, NamedSharding))[
            path
        ]
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), path
    for path, leaf in _flat(nn.unbox(block)).items():
        np.testing.assert_array_equal(leaf, _flat(nn.unbox(setup["variables"]["params"]["block"]))[path])
    np.testing.assert_array_equal(np.asarray(h_BSD), np.asarray(setup["h"]))


def test_needs_mesh_or_eager_sharding_off(setup):
    """The limitation: ToLinen constructs the NNX Block inside Linen's init (and apply); with Flax's eager
    sharding on (the default) and no mesh context, a Param with `out_sharding` cannot be created."""
    with pytest.raises(ValueError, match="An auto mesh context or metadata is required"):
        setup["model"].init(jax.random.key(0), setup["x"], setup["pos"])
    with pytest.raises(ValueError, match="An auto mesh context or metadata is required"):
        setup["model"].apply(setup["variables"], setup["x"], setup["pos"])
