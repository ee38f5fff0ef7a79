"""Scan over layers and remat: the same numbers as the unrolled model, stacked params that shard like theirs,
one loop body with the per-layer collectives, recomputation visible in the compiled backward."""

import functools
import re

import jax
import numpy as np
import pytest
from conftest import batch_tokens, rel_err
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxtp
from jaxtp import checkpoint, train
from jaxtp.generation import STACKED_CACHE_AXES, cache_bytes_per_device, prefill
from jaxtp.hlo import loop_bodies, parse_collectives

pytestmark = pytest.mark.timeout(300)


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, params, rest, tokens):
    """One jitted function for every model of one structure (graphdef static): equal shapes and shardings
    compile once."""
    return jax.value_and_grad(lambda p: jaxtp.loss.lm_loss(nnx.merge(graphdef, p, rest), tokens))(params)


def compiled_loss_and_grads(model, tokens):
    """(loss, {path: grad}, compiled) from one compile: the numbers come from the executable we inspect."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    compiled = _loss_and_grads.lower(graphdef, params, rest, tokens).compile()
    loss, grads = compiled(params, rest, tokens)
    return float(loss), flat(grads), compiled


def flat(tree):
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(tree)}


def as_stacked(flat_unrolled: dict, L: int) -> dict:
    """An unrolled model's {path: array} in a scanned model's layout: blocks/i/x -> row i of blocks/x."""
    out = {k: v for k, v in flat_unrolled.items() if not k.startswith("blocks/")}
    for k in (k for k in flat_unrolled if k.startswith("blocks/0/")):
        rest = k[len("blocks/0/") :]
        out["blocks/" + rest] = np.stack([flat_unrolled[f"blocks/{i}/{rest}"] for i in range(L)])
    return out


def with_values(model, values: dict):
    """`model` (a new object) holding `values` {path: array}, each placed as the model's own array is."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)  # new Variables: the model's own stay untouched
    for path, var in nnx.to_flat_state(state):
        var[...] = jax.device_put(values["/".join(map(str, path))], var[...].sharding)
    return nnx.merge(graphdef, state)


def reconfigured(model, **changes):
    """The same arrays under a config that changes only how the blocks run (remat): no new init."""
    graphdef = nnx.graphdef(jaxtp.abstract_model(model.cfg.replace(**changes), model.layout))
    return nnx.merge(graphdef, nnx.state(model))


@pytest.fixture(scope="module")
def scan_cfg(tiny):
    return tiny.replace(scan_layers=True)


@pytest.fixture(scope="module")
def mesh24():
    return jaxtp.make_mesh("2x4")


@pytest.fixture(scope="module")
def unrolled24(tiny, mesh24):
    return jaxtp.Transformer.create(tiny, mesh24)


@pytest.fixture(scope="module")
def scanned(scan_cfg):
    """A fresh scanned model per mesh, built once."""
    cache = {}

    def get(spec):
        if spec not in cache:
            cache[spec] = jaxtp.Transformer.create(scan_cfg, jaxtp.make_mesh(spec))
        return cache[spec]

    return get


@pytest.fixture(scope="module")
def copied24(tiny, unrolled24, scanned):
    """The scanned model on 2x4 holding exactly the unrolled model's parameter values."""
    return with_values(scanned("2x4"), as_stacked(flat(nnx.state(unrolled24)), tiny.n_layers))


@pytest.fixture(scope="module")
def grads(mesh24, unrolled24, copied24):
    tokens = batch_tokens(mesh24)
    return {
        "unrolled": compiled_loss_and_grads(unrolled24, tokens),
        "scanned": compiled_loss_and_grads(copied24, tokens),
    }


# ------------------------------------------------------------------------------------------- numbers


def test_config_validates_remat(tiny):
    with pytest.raises(ValueError, match=r"remat must be one of none, full, dots; got 'some'"):
        tiny.replace(remat="some")
    with pytest.raises(ValueError, match="scan_layers must be True or False"):
        tiny.replace(scan_layers="yes")


def test_scanned_equals_unrolled_with_the_same_params(tiny, grads):
    loss_u, grads_u, _ = grads["unrolled"]
    loss_s, grads_s, _ = grads["scanned"]
    assert abs(loss_s - loss_u) <= 1e-5 * abs(loss_u)
    want = as_stacked(grads_u, tiny.n_layers)
    assert set(grads_s) == set(want)
    for path, g in want.items():
        assert rel_err(grads_s[path], g) < 1e-5, path


def test_scanned_init_and_numbers_are_mesh_invariant(scanned):
    """Same seed, same parameters bit for bit on 1x1, 2x4 and 1x8; loss and gradients agree to 1e-5."""
    runs = {
        spec: compiled_loss_and_grads(scanned(spec), batch_tokens(jaxtp.make_mesh(spec)))
        for spec in ("1x1", "2x4", "1x8")
    }
    ref = flat(nnx.state(scanned("1x1")))
    loss_1, grads_1, _ = runs["1x1"]
    for spec in ("2x4", "1x8"):
        for path, p in flat(nnx.state(scanned(spec))).items():
            np.testing.assert_array_equal(p, ref[path], err_msg=f"{spec}: {path}")
        loss, grads, _ = runs[spec]
        assert abs(loss - loss_1) <= 1e-5 * abs(loss_1), spec
        for path, g in grads_1.items():
            assert rel_err(grads[path], g) < 1e-5, (spec, path)


def test_stacked_params_shard_like_the_unrolled_ones(tiny, unrolled24, copied24):
    """Every stacked block param: the "layers" axis first and whole, the rest split as in the unrolled block."""
    L, D, N, H = tiny.n_layers, tiny.d_model, tiny.n_heads, tiny.head_dim
    q_LDNH = copied24.blocks.attn.q.kernel[...]
    assert q_LDNH.sharding.shard_shape(q_LDNH.shape) == (L, D, N // 4, H)
    assert q_LDNH.sharding.spec == P(None, None, "model", None)
    stacked = dict(nnx.to_flat_state(nnx.state(copied24.blocks)))
    one = dict(nnx.to_flat_state(nnx.state(unrolled24.blocks[0])))
    assert set(stacked) == set(one) and len(one) == 9
    for path, var in stacked.items():
        w, w0 = var[...], one[path][...]
        assert var.get_metadata()["out_sharding"] == ("layers",) + one[path].get_metadata()["out_sharding"]
        assert w.sharding.spec == P(None, *w0.sharding.spec), path
        assert w.sharding.shard_shape(w.shape) == (L,) + w0.sharding.shard_shape(w0.shape), path
    assert jaxtp.param_table(copied24).bytes_per_device == jaxtp.param_table(unrolled24).bytes_per_device


# --------------------------------------------------------------------------------------- compiled HLO


def test_loop_body_holds_the_per_layer_collectives(scan_cfg, mesh24, copied24):
    """The scanned forward is one while loop whose body (in the HLO once, run L times) has exactly the
    layer's 2 model-axis all-reduces; the train step's backward loop has 2 more."""
    graphdef, state = nnx.split(copied24)
    tokens = batch_tokens(mesh24)
    text = (
        jax.jit(lambda s, t: jaxtp.loss.lm_loss(nnx.merge(graphdef, s), t))
        .lower(state, tokens)
        .compile()
        .as_text()
    )
    bodies = loop_bodies(text)
    assert len(bodies) == 1
    assert parse_collectives(bodies[0], mesh24).summary() == {
        "all-reduce@model": {"count": 2, "bytes": 2 * (8 // 2) * 16 * scan_cfg.d_model * 4}
    }  # [B/2, S, D] f32


def test_train_step_loops_forward_and_backward(mesh24, grads):
    bodies = loop_bodies(grads["scanned"][2].as_text())
    assert len(bodies) == 2  # the forward scan and its transpose
    counts = sorted(parse_collectives(b, mesh24).count("all-reduce", "model") for b in bodies)
    assert counts == [2, 2]
    assert sum(parse_collectives(b, mesh24).count("all-gather") for b in bodies) == 0


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_remat_same_numbers_and_recomputes(tiny, mesh24, unrolled24, copied24, grads, scan):
    """dots: exactly attention's two einsums (batched over heads) are recomputed in the backward; full:
    more. Loss and gradients equal remat='none' to 1e-6; full keeps less in temporaries. Same parameters
    throughout (reconfigured, not re-initialised)."""
    base = copied24 if scan else unrolled24
    tokens = batch_tokens(mesh24)
    runs = {r: compiled_loss_and_grads(reconfigured(base, remat=r), tokens) for r in ("full", "dots")}
    runs["none"] = grads["scanned" if scan else "unrolled"]
    loss0, grads0, _ = runs["none"]
    for r in ("full", "dots"):
        loss, g, _ = runs[r]
        assert abs(loss - loss0) <= 1e-6 * abs(loss0), r
        for path, g0 in grads0.items():
            assert rel_err(g[path], g0) < 1e-6, (r, path)
    dots = {r: len(re.findall(r"\bdot\(", c.as_text())) for r, (_, _, c) in runs.items()}
    bodies = 1 if scan else tiny.n_layers  # a scanned block's backward is in the HLO once
    assert dots["dots"] - dots["none"] == 2 * bodies and dots["full"] > dots["dots"], dots
    temp = {r: c.memory_analysis().temp_size_in_bytes for r, (_, _, c) in runs.items()}
    assert temp["full"] < temp["none"], temp


# ---------------------------------------------------------------------------- what walks the blocks


def test_cached_greedy_equals_unrolled(unrolled24, copied24):
    prompt = np.random.default_rng(1).integers(0, 256, size=(4, 5), dtype=np.int32)
    want, want_logits = jaxtp.generate(
        unrolled24, prompt, 6, temperature=0, prompt_lengths=[5, 3, 4, 1], return_logits=True
    )
    got, got_logits = jaxtp.generate(
        copied24, prompt, 6, temperature=0, prompt_lengths=[5, 3, 4, 1], return_logits=True
    )
    np.testing.assert_array_equal(got, want)
    assert rel_err(got_logits, want_logits) < 1e-5
    layout = copied24.layout
    tokens = jax.device_put(prompt, layout.sharding(("batch", "seq")))
    offsets = jax.device_put(np.zeros((4,), np.int32), layout.sharding(("batch",)))
    caches, _ = prefill(*nnx.split(copied24), tokens, offsets, 11)
    for c in caches:  # one stacked K and one V, "layers" whole, batch over data, kv heads over model
        assert c.shape == (2, 4, 11, 4, 8)
        assert c.sharding.is_equivalent_to(layout.sharding(STACKED_CACHE_AXES), 5)
    assert cache_bytes_per_device(copied24, 4, 11) == cache_bytes_per_device(unrolled24, 4, 11)


def test_int8_cast_keeps_a_scale_per_layer(tiny, mesh24, unrolled24, copied24):
    """Scales reduce over the contracted axes only, never the stacked one: the int8 scanned model equals
    the int8 unrolled model layer for layer."""
    q_scanned, q_unrolled = jaxtp.cast(copied24, "int8"), jaxtp.cast(unrolled24, "int8")
    L, N, H = tiny.n_layers, tiny.n_heads, tiny.head_dim
    scale = q_scanned.blocks.attn.q.scale[...]
    assert scale.shape == (L, 1, N, H) and scale.sharding.spec == P(None, None, "model", None)
    assert q_scanned.blocks.mlp.down.scale[...].shape == (L, 1, tiny.d_model)
    want = as_stacked(flat(nnx.state(q_unrolled)), L)
    for path, v in flat(nnx.state(q_scanned)).items():
        np.testing.assert_array_equal(v, want[path], err_msg=path)
    tokens = batch_tokens(mesh24)[:, :-1]
    logits = [nnx.jit(lambda m, t: m(t))(m, tokens) for m in (q_scanned, q_unrolled)]
    assert rel_err(logits[0], logits[1]) < 1e-5


def test_checkpoint_round_trip(copied24, tmp_path):
    path = checkpoint.save(tmp_path / "scanned", copied24)
    loaded = checkpoint.load(path, jaxtp.make_mesh("2x4"))
    assert loaded.cfg == copied24.cfg and loaded.cfg.scan_layers
    want = flat(nnx.state(copied24))
    got = flat(nnx.state(loaded))
    assert set(got) == set(want)
    for k, v in got.items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    assert loaded.blocks.attn.q.kernel[...].sharding.spec == P(None, None, "model", None)


def test_plan_is_the_same_for_scanned_and_unrolled(tiny, scan_cfg):
    """Memory does not depend on how the layers run: the planner reads the same per-layer shards."""
    kw = dict(batch_size=8, seq_len=64, hardware="h100")
    a, b = jaxtp.plan(tiny, "2x4", **kw), jaxtp.plan(scan_cfg, "2x4", **kw)
    assert a.memory == b.memory and [i.path for i in a.params] == [i.path for i in b.params]


def test_weight_decay_skips_stacked_norm_scales(copied24):
    """[L, D] norm scales are L vectors: no weight decay, as for the unrolled model's [D] scales."""
    params = nnx.state(copied24, nnx.Param)
    decays = {"/".join(map(str, k)): train.decays(v) for k, v in nnx.to_flat_state(params)}
    assert not decays["blocks/attn_norm/scale"] and not decays["blocks/mlp_norm/scale"]
    assert decays["blocks/attn/q/kernel"] and decays["head/kernel"] and not decays["final_norm/scale"]
