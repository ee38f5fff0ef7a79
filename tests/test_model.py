"""Sharded model: identical numbers on every mesh, per-device shard shapes, causality, sharded init."""

import re

import jax
import numpy as np
import pytest
from conftest import MESHES, batch_tokens, loss_and_grads, rel_err
from flax import nnx

import jaxtp

pytestmark = pytest.mark.timeout(300)


def run_on(cfg, spec):
    mesh = jaxtp.make_mesh(spec)
    model = jaxtp.Transformer.create(cfg, mesh, seed=0)
    tokens = batch_tokens(mesh)
    logits = nnx.jit(lambda m, t: m(t))(model, tokens[:, :-1])
    loss, grads = loss_and_grads(model, tokens)
    params = nnx.state(model, nnx.Param)
    to_np = lambda tree: {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(tree)}
    return {"logits": np.asarray(logits), "loss": float(loss), "grads": to_np(grads), "params": to_np(params)}


@pytest.fixture(scope="module")
def reference(tiny):
    return run_on(tiny, "1x1")


@pytest.mark.parametrize("spec", [m for m in MESHES if m != "1x1"])
def test_mesh_invariance(tiny, reference, spec):
    got = run_on(tiny, spec)
    for path, p in reference["params"].items():
        np.testing.assert_array_equal(got["params"][path], p, err_msg=f"{spec}: {path} not bit-identical")
    assert rel_err(got["logits"], reference["logits"]) < 1e-5
    assert abs(got["loss"] - reference["loss"]) / abs(reference["loss"]) < 1e-5
    for path, g in reference["grads"].items():
        assert rel_err(got["grads"][path], g) < 1e-5, (spec, path)


@pytest.fixture(scope="module")
def model_1x8(tiny):
    return jaxtp.Transformer.create(tiny, jaxtp.make_mesh("1x8"))


def test_shard_shapes_1x8(tiny, model_1x8):
    """Every TP-sharded weight holds global/8 on its model axis; the 4 kv heads are replicated (GQA)."""
    table = {r.path: r for r in jaxtp.param_table(model_1x8).rows}
    D, N, K, H, F, V = tiny.D, tiny.N, tiny.K, tiny.H, tiny.F, tiny.V
    expect = {
        "embed/table": (V // 8, D),
        "head/kernel": (D, V // 8),
        "blocks/0/attn/q/kernel": (D, N // 8, H),
        "blocks/0/attn/o/kernel": (N // 8, H, D),
        "blocks/0/attn/k/kernel": (D, K, H),
        "blocks/0/attn/v/kernel": (D, K, H),
        "blocks/0/mlp/gate/kernel": (D, F // 8),
        "blocks/0/mlp/up/kernel": (D, F // 8),
        "blocks/0/mlp/down/kernel": (F // 8, D),
        "blocks/0/attn_norm/scale": (D,),
    }
    for path, local in expect.items():
        assert table[path].local_shape == local, path
    for arr in jax.tree.leaves(nnx.state(model_1x8)):
        for shard in arr.addressable_shards:
            assert shard.data.shape == arr.sharding.shard_shape(arr.shape)


def test_kv_replication_on_1x8_matches_unsharded(tiny, model_1x8, reference):
    """Each of the 4 kv heads serves 2 query heads on 2 ranks; numbers equal the 1x1 model's."""
    tokens = batch_tokens(jaxtp.make_mesh("1x8"))
    logits = nnx.jit(lambda m, t: m(t))(model_1x8, tokens[:, :-1])
    assert rel_err(logits, reference["logits"]) < 1e-5
    k = model_1x8.blocks[0].attn.k.kernel[...]
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, None, None)


def test_param_table_totals(tiny, model_1x8):
    table = jaxtp.param_table(model_1x8)
    assert table.total_params == tiny.param_count()
    assert table.bytes_per_device == sum(r.local_bytes for r in table.rows)
    assert "blocks/0/attn/q/kernel" in str(table) and "total:" in str(table)


def test_compiled_init_never_builds_a_full_sharded_weight(tiny):
    mesh = jaxtp.make_mesh("2x4")
    layout = jaxtp.Layout.create(tiny, mesh)
    graphdef, abstract = nnx.split(jaxtp.abstract_model(tiny, layout))
    shardings = layout.state_shardings(abstract)

    def init():
        with nnx.use_eager_sharding(False):
            return nnx.state(jaxtp.Transformer(tiny, layout=layout, rngs=nnx.Rngs(0)))

    text = (
        jax.jit(init, out_shardings=shardings)
        .lower()
        .compile({"xla_backend_optimization_level": 0})
        .as_text()
    )
    full = {
        "q": f"[{tiny.D},{tiny.N},{tiny.H}]",
        "gate": f"[{tiny.D},{tiny.F}]",
        "down": f"[{tiny.F},{tiny.D}]",
        "embed": f"[{tiny.V},{tiny.D}]",
        "head": f"[{tiny.D},{tiny.V}]",
    }
    local = f"[{tiny.D},{tiny.F // 4}]"
    assert local in text  # the per-shard shapes are there...
    for name, shape in full.items():
        assert re.search(r"[a-z0-9]+" + re.escape(shape), text) is None, (
            f"full {name} weight {shape} in init HLO"
        )


def test_causality(tiny, model_1x8):
    tokens = np.random.default_rng(1).integers(0, 256, size=(8, 16)).astype(np.int32)
    changed = tokens.copy()
    t = 9
    changed[:, t] = (changed[:, t] + 1) % 256
    f = nnx.jit(lambda m, x: m(x))
    a, b = np.asarray(f(model_1x8, tokens)), np.asarray(f(model_1x8, changed))
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-4
