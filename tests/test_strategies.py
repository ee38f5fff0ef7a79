"""Strategies as rules presets: megatron, megatron-sp (sequence parallel), fsdp (ZeRO-3) and fsdp-sp.

Switching strategy is a table change (Transformer.create(..., rules=NAME or dict)). Checked on 3-axis
meshes (data, fsdp, model): the same logits, loss and gradients as the 1x1 mesh; fsdp halving
per-device parameter and optimizer bytes; per-layer collectives read from the compiled train step and
equal to jaxtp.plan's prediction; a few training steps with each preset; clear errors for bad tables.

Every model is built once (module-scoped caches) and measured before a Trainer takes it over: a case
costs at most one sharded init and one value-and-grad compile; each preset's 2x2x2 training adds one
train-step compile (whose HLO is the one inspected) and a 1-layer compile for the per-layer counts.
"""

import math

import jax
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx

import jaxtp
from jaxtp import data
from jaxtp.loss import cross_entropy
from jaxtp.measure import bytes_per_device
from jaxtp.sharding import FSDP, MEGATRON, RULE_PRESETS, resolve_rules, spec_for
from jaxtp.train import TrainConfig, Trainer, compile_train_step

pytestmark = pytest.mark.timeout(300)

B, S = 8, 16
PRESETS = ("megatron", "megatron-sp", "fsdp", "fsdp-sp")
PURE_FSDP = "data=1,fsdp=8,model=1"
INVARIANCE = [
    ("fsdp", "2x2x2"),
    ("fsdp", "1x2x4"),
    ("fsdp", "2x1x4"),
    ("fsdp", PURE_FSDP),
    ("megatron-sp", "2x4"),
    ("megatron-sp", "1x2x4"),
    ("fsdp-sp", "2x2x2"),
]
# Cases whose parameters come from their own sharded init (and must be bit-identical to 1x1's). The
# others place the 1x1 parameters instead: their weight layouts are ones checked here or in
# tests/test_model.py (sequence parallelism moves activations only; fsdp=1 resolves to megatron).
INIT_CHECKED = [("fsdp", "2x2x2"), ("fsdp", "1x2x4"), ("fsdp", PURE_FSDP), ("fsdp-sp", "2x2x2")]
# Per layer (count with L=2 minus count with L=1) in the compiled train step on 2x2x2, XLA:CPU.
PER_LAYER = {
    "megatron": {"all-reduce@model": 4},
    "megatron-sp": {"all-reduce@model": 4, "all-gather@model": 4},  # RS runs as all-reduce + slice on CPU
    "fsdp": {"all-gather@fsdp": 16, "all-reduce@model": 4},  # 9 weights gathered fwd, 7 matmul weights bwd
    "fsdp-sp": {"all-gather@fsdp": 16, "all-gather@model": 4, "all-reduce@model": 4},
}


def tokens_for(mesh, seed=0):
    toks = np.random.default_rng(seed).integers(0, 256, size=(B, S + 1), dtype=np.int32)
    return jax.device_put(toks, data.batch_sharding(mesh))


def numbers(model, tokens) -> dict:
    """Logits, loss and parameter gradients from ONE compiled value-and-grad; params as numpy."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(params, tokens):
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:]), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params, tokens)
    flat = lambda tree: {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(tree)}
    return {"logits": np.asarray(logits), "loss": float(loss), "grads": flat(grads), "params": flat(params)}


def placed(model, mesh, rules):
    """`model`'s parameters on another mesh and table (what jaxtp.checkpoint.load does with a restore)."""
    layout = jaxtp.Layout.create(model.cfg, mesh, rules)
    graphdef, _ = nnx.split(jaxtp.abstract_model(model.cfg, layout))
    state = nnx.state(model)
    return nnx.merge(graphdef, jax.device_put(state, layout.state_shardings(state)))


@pytest.fixture(scope="module")
def cases(tiny):
    """(preset, spec) -> {"mesh", "model", "numbers"}: the model is built once and, for the INVARIANCE
    cases, measured at once (a Trainer made from it later donates its parameters)."""
    cache = {}

    def get(preset, spec):
        if (preset, spec) not in cache:
            mesh = jaxtp.make_mesh(spec)
            if (preset, spec) in INIT_CHECKED or spec == "1x1":
                model = jaxtp.Transformer.create(tiny, mesh, seed=0, rules=preset)
            else:  # the reference parameters, placed for this preset and mesh (saves a sharded init)
                model = placed(get("megatron", "1x1")["model"], mesh, preset)
            measured = (preset, spec) in INVARIANCE or spec == "1x1"
            cache[preset, spec] = {
                "mesh": mesh,
                "model": model,
                "numbers": numbers(model, tokens_for(mesh)) if measured else None,
            }
        return cache[preset, spec]

    return get


@pytest.fixture(scope="module")
def reference(cases):
    return cases("megatron", "1x1")["numbers"]


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus("synthetic")


@pytest.fixture(scope="module")
def trained(tiny, cases, corpus):
    """preset -> the 2x2x2 Trainer after 3 steps, its losses, and the compiled L=2 / L=1 train steps."""
    cache = {}

    def get(preset):
        if preset not in cache:
            case = cases(preset, "2x2x2")  # numbers first: the Trainer donates the model's params
            mesh, model = case["mesh"], case["model"]
            tc = TrainConfig(steps=3, batch_size=B, seq_len=S, warmup_steps=1)
            tr = Trainer.create(model, tc)
            batches = [
                data.train_batch(corpus.train, mesh, B, S, 0, 0)
            ] * tc.steps  # one batch: loss must fall
            compiled = tr.step_fn.lower(tr.params, tr.opt_state, batches[0]).compile()
            tr.step_fn = compiled  # run exactly the executable whose HLO is inspected
            losses = [float(tr.train_step(b)["loss"]) for b in batches]
            one = compile_train_step(tiny.replace(n_layers=1), model.layout, tc, data.batch_sharding(mesh))
            cache[preset] = {
                "trainer": tr,
                "losses": losses,
                "mesh": mesh,
                "hlo2": compiled.as_text(),
                "hlo1": one.as_text(),
            }
        return cache[preset]

    return get


def summary(text, mesh) -> jaxtp.Collectives:
    return jaxtp.hlo.parse_collectives(text, mesh)


# ------------------------------------------------------------------------------------------ the tables


def test_presets_resolve_on_2x2x2(tiny):
    mesh = jaxtp.make_mesh("2x2x2")
    got = {name: resolve_rules(tiny, mesh, name) for name in PRESETS}
    tp = {
        "vocab": "model",
        "heads": "model",
        "kv_heads": "model",
        "mlp": "model",
        "head_dim": None,
        "seq": None,
        "act_embed": None,
        "batch": ("data", "fsdp"),
        "layers": None,
    }
    assert got["megatron"] == {**tp, "act_seq": None, "embed": None}
    assert got["megatron-sp"] == {**tp, "act_seq": "model", "embed": None}
    assert got["fsdp"] == {**tp, "act_seq": None, "embed": "fsdp"}
    assert got["fsdp-sp"] == {**tp, "act_seq": "model", "embed": "fsdp"}
    rules = got["fsdp"]
    P = jax.sharding.PartitionSpec
    assert spec_for(("embed", "heads", "head_dim"), rules) == P("fsdp", "model", None)
    assert spec_for(("batch", "act_seq", "act_embed"), rules) == P(("data", "fsdp"), None, None)
    assert spec_for(("batch", "act_seq", "act_embed"), got["fsdp-sp"]) == P(("data", "fsdp"), "model", None)
    # Axes the mesh lacks or holds at size 1 drop out: on 2x4 every preset is what it was on 2 axes.
    assert resolve_rules(tiny, jaxtp.make_mesh("2x4"), "fsdp") == resolve_rules(tiny, jaxtp.make_mesh("2x4"))
    assert resolve_rules(tiny, jaxtp.make_mesh(PURE_FSDP), "fsdp")["heads"] is None


def test_user_table_and_layout_table(tiny):
    """A dict is a table too: here ZeRO-3 over every data-parallel device (embed over data+fsdp)."""
    mesh = jaxtp.make_mesh("2x2x2")
    layout = jaxtp.Layout.create(tiny, mesh, {**FSDP, "embed": ("data", "fsdp")})
    assert layout.spec(("embed", "mlp")) == jax.sharding.PartitionSpec(("data", "fsdp"), "model")
    assert dict(layout.table())["embed"] == "data+fsdp"
    assert layout.needs_gather(("embed", "mlp")) and not layout.needs_gather(("heads", "head_dim"))


# --------------------------------------------------------------------------------------- invariance


@pytest.mark.parametrize("preset,spec", INVARIANCE)
def test_mesh_invariance(cases, reference, preset, spec):
    got = cases(preset, spec)["numbers"]
    for path, p in reference["params"].items():
        np.testing.assert_array_equal(
            got["params"][path], p, err_msg=f"{preset} {spec}: {path} not bit-identical"
        )
    assert rel_err(got["logits"], reference["logits"]) < 1e-5
    assert abs(got["loss"] - reference["loss"]) / abs(reference["loss"]) < 1e-5
    for path, g in reference["grads"].items():
        assert rel_err(got["grads"][path], g) < 1e-5, (preset, spec, path)


def test_fsdp_shards_every_weight(tiny, cases):
    """Pure FSDP: every parameter holds 1/8 of its embed axis; nothing is replicated."""
    table = jaxtp.param_table(cases("fsdp", PURE_FSDP)["model"])
    for r in table.rows:
        dim = r.logical.index("embed")
        assert r.local_shape[dim] == r.shape[dim] // 8, r.path
    assert table.bytes_per_device * 8 == sum(4 * math.prod(r.shape) for r in table.rows)


# ------------------------------------------------------------------------------------------- memory


def test_fsdp2_halves_param_and_optimizer_bytes(tiny, cases):
    """1x2x4 (fsdp=2) against 1x1x4 (the same model axis, no fsdp), both under the fsdp preset."""
    got = {}
    for spec in ("1x2x4", "1x1x4"):
        model = cases("fsdp", spec)["model"]
        tr = Trainer.create(model, TrainConfig(batch_size=B, seq_len=S))
        counters = sum(x.nbytes for x in jax.tree.leaves(tr.opt_state) if x.ndim == 0)  # step counts
        got[spec] = (
            bytes_per_device(tr.params),
            bytes_per_device(tr.opt_state) - counters,
            bytes_per_device(tr.opt_state),
        )
        plan = jaxtp.plan(tiny, spec, batch_size=B, seq_len=S, rules="fsdp", hardware="cpu")
        assert plan.memory["params"] == got[spec][0] and plan.memory["optimizer"] == got[spec][2]
    (p2, m2, _), (p1, m1, _) = got["1x2x4"], got["1x1x4"]
    assert 2 * p2 == p1 and 2 * m2 == m1, got


# ------------------------------------------------------------------------------- collectives vs plan


@pytest.mark.parametrize("preset", PRESETS)
def test_per_layer_collectives_match_hlo_and_plan(tiny, trained, preset):
    t = trained(preset)
    two, one = summary(t["hlo2"], t["mesh"]), summary(t["hlo1"], t["mesh"])
    per_layer = {k: v["count"] for k, v in (two - one).items() if v["count"]}
    assert per_layer == PER_LAYER[preset], per_layer
    plan = jaxtp.plan(tiny, "2x2x2", batch_size=B, seq_len=S, rules=preset, hardware="cpu")
    assert {k: v["count"] for k, v in plan.collectives["per_layer"].items() if v["count"]} == per_layer
    # The whole step too: counts per kind and axis equal, bytes within 5% (they agree exactly here).
    step, predicted = two.summary(), plan.collectives["per_step"]
    assert {k: v["count"] for k, v in predicted.items() if v["count"]} == {
        k: v["count"] for k, v in step.items()
    }
    for key, v in step.items():
        assert abs(predicted[key]["bytes"] / v["bytes"] - 1) < 0.05, (key, predicted[key], v)
    # XLA:CPU forms no reduce-scatter: sequence parallelism's and ZeRO's run as all-reduce + dynamic-slice.
    assert two.count("reduce-scatter") == 0


def test_planner_forms_reduce_scatter_where_the_backend_does(tiny):
    """On a GPU preset the same layouts plan reduce-scatters where XLA:CPU shows all-reduces."""
    sp = jaxtp.plan(tiny, "2x2x2", batch_size=B, seq_len=S, rules="fsdp-sp", hardware="h100")
    assert sp.collectives["per_layer"]["reduce-scatter@model"]["count"] == 4
    assert sp.collectives["per_step"]["reduce-scatter@fsdp"]["count"] == 1
    odd = jaxtp.plan(tiny, "2x4", batch_size=B, seq_len=15, rules="megatron-sp", hardware="cpu")
    assert any("no sequence parallelism" in w for w in odd.warnings)
    assert "all-gather@model" not in odd.collectives["per_layer"]


# --------------------------------------------------------------------------------------------- training


def test_training_with_each_preset_gives_one_loss_curve(trained):
    """3 AdamW steps on one batch, 2x2x2: every preset trains (the first step's learning rate is 0, the
    second's is not, so the third loss is lower), and all four give the same losses - sharded Adam state
    included - within float reordering."""
    curves = {p: trained(p)["losses"] for p in PRESETS}
    ref = np.array(curves["megatron"])
    assert np.all(np.isfinite(ref)) and ref[2] < ref[0] - 1e-3, ref
    for preset, losses in curves.items():
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=preset)


def test_adam_state_shards_like_params_under_fsdp(trained):
    tr = trained("fsdp")["trainer"]
    q = tr.params["blocks"][0]["attn"]["q"]["kernel"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model", None)
    mu = [x for x in jax.tree.leaves(tr.opt_state) if getattr(x, "shape", None) == q.shape]
    assert mu and all(x.sharding.spec == q.sharding.spec for x in mu)


def test_generation_under_fsdp_sp(trained):
    """The decode step's single position cannot split over `model`: the residual stream stays whole there
    (Layout.constrain relaxes activations, never weights) and sampling works as on any preset."""
    model = trained("fsdp-sp")["trainer"].model
    prompt = np.full((8, 5), ord("a"), np.int32)  # 5 positions: not divisible by the model axis either
    out = jaxtp.generate(model, prompt, 3, temperature=0.0)
    assert out.shape == (8, 3)


# ------------------------------------------------------------------------------------------- errors


def test_fsdp_axis_must_divide_d_model(tiny):
    cfg = tiny.replace(d_model=36, n_heads=4, n_kv_heads=4)
    with pytest.raises(ValueError) as e:
        jaxtp.Transformer.create(cfg, jaxtp.make_mesh(PURE_FSDP), rules="fsdp")
    msg = str(e.value)
    for part in ("d_model=36", "'embed'", "'fsdp'", "size 8", "sizes that do, on 8 devices: 1, 2, 4"):
        assert part in msg, (part, msg)
    resolve_rules(cfg, jaxtp.make_mesh("1x2x4"), "megatron")  # without fsdp the embed axis stays whole


def test_heads_message_suggests_three_axis_meshes(tiny):
    cfg = tiny.replace(n_heads=6, n_kv_heads=6, d_model=48)
    with pytest.raises(
        ValueError,
        match=r"n_heads=6 .*'model' of size 4.*meshes that work with 8 devices: "
        r"4x2x1, 2x2x2",
    ):
        resolve_rules(cfg, jaxtp.make_mesh("1x2x4"), "fsdp")


def test_bad_tables(tiny):
    mesh = jaxtp.make_mesh("2x2x2")
    with pytest.raises(ValueError, match=r"'embed' maps to mesh axis 'fdsp'"):
        resolve_rules(tiny, mesh, {**FSDP, "embed": "fdsp"})
    with pytest.raises(ValueError, match=r"'batch' names a mesh axis twice"):
        resolve_rules(tiny, mesh, {**MEGATRON, "batch": ("data", "data")})
    with pytest.raises(ValueError, match=r"lacks logical axes \['act_seq'\]"):
        resolve_rules(tiny, mesh, {k: v for k, v in MEGATRON.items() if k != "act_seq"})
    with pytest.raises(ValueError, match="unknown rules preset 'zero-3'.*fsdp-sp"):
        resolve_rules(tiny, mesh, "zero-3")
    rules = resolve_rules(tiny, mesh, {**RULE_PRESETS["megatron-sp"], "act_seq": "data"})
    with pytest.raises(ValueError, match="'batch' and 'act_seq' both map to mesh axis 'data'"):
        spec_for(("batch", "act_seq", "act_embed"), rules, "activation")
