"""Precision casts: bytes per device, placements kept leaf by leaf, int8 numerics and the TP contract."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import batch_tokens, loss_and_grads, rel_err
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxtp
from jaxtp import quant

pytestmark = pytest.mark.timeout(300)


def flat(model):
    return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model))}


def forward(model, tokens):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t[:, :-1]))(state, tokens)


def quantized_modules(model):
    return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, (jaxtp.Linear, jaxtp.Embed))]


@pytest.fixture(scope="module")
def mesh24():
    return jaxtp.make_mesh("2x4")


@pytest.fixture(scope="module")
def model24(tiny, mesh24):
    return jaxtp.Transformer.create(tiny, mesh24)


@pytest.fixture(scope="module")
def unsharded(tiny, model24):
    """The same parameters in a model built without a layout (layout=None), on one device."""
    graphdef, _ = nnx.split(jaxtp.abstract_model(tiny, None))
    state = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), nnx.state(model24))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def casts24(model24):
    return {p: jaxtp.cast(model24, p) for p in ("bf16", "int8", "w8a8")}


@pytest.fixture(scope="module")
def tokens24(mesh24):
    return batch_tokens(mesh24)


@pytest.fixture(scope="module")
def logits24(model24, casts24, tokens24):
    return {
        "f32": np.asarray(forward(model24, tokens24)),
        **{p: np.asarray(forward(m, tokens24)) for p, m in casts24.items()},
    }


# --------------------------------------------------------------------------------------------- API


def test_invalid_precision_raises(model24):
    for bad in ("fp8", "int4", "float32", None):
        with pytest.raises(ValueError, match="f32, bf16, int8, w8a8"):
            jaxtp.cast(model24, bad)


def test_input_model_untouched(model24, casts24):
    q = model24.blocks[0].attn.q
    assert isinstance(q.kernel, nnx.Param) and q.kernel[...].dtype == jnp.float32
    assert q.quant_mode is None and q.scale is None
    assert model24.cfg.param_dtype == "float32"
    assert quant.precision_of(model24) == "f32"
    assert {p: quant.precision_of(m) for p, m in casts24.items()} == {
        "bf16": "bf16",
        "int8": "int8",
        "w8a8": "w8a8",
    }


def test_cast_of_int8_model(casts24):
    """int8 <-> w8a8 switches the compute mode and keeps the same int8 arrays; back to float raises."""
    int8 = casts24["int8"]
    for p in ("f32", "bf16"):
        with pytest.raises(ValueError, match="already quantized"):
            jaxtp.cast(int8, p)
    w8a8 = jaxtp.cast(int8, "w8a8")
    assert all(m.quant_mode == "w8a8" for _, m in quantized_modules(w8a8))
    assert all(m.quant_mode == "int8" for _, m in quantized_modules(int8))
    a, b = flat(int8), flat(w8a8)
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path][...]), np.asarray(b[path][...]))
        assert a[path][...].sharding.spec == b[path][...].sharding.spec


def test_bf16_storage_and_compute(casts24):
    m = casts24["bf16"]
    assert m.cfg.param_dtype == "bfloat16" and m.cfg.compute_dtype == "bfloat16"
    assert all(v[...].dtype == jnp.bfloat16 for v in flat(m).values())
    assert all(mod.compute_dtype == jnp.bfloat16 for _, mod in quantized_modules(m))


# ------------------------------------------------------------------------------- placement & memory


def test_specs_preserved_leaf_by_leaf(model24, casts24):
    base = flat(model24)
    for precision, model in casts24.items():
        got = flat(model)
        modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
        seen = set()
        for path, var in base.items():
            spec = var[...].sharding.spec
            assert got[path][...].sharding.spec == spec, (precision, path)
            assert got[path][...].sharding.mesh == var[...].sharding.mesh
            seen.add(path)
            if precision == "bf16" or path.endswith("norm/scale"):
                continue
            module = path.rsplit("/", 1)[0]
            scale_path = module + "/scale"
            mod = modules[module]
            contracted = {1} if isinstance(mod, jaxtp.Embed) else set(range(mod.contract))
            expect = P(*(None if i in contracted else a for i, a in enumerate(spec)))
            assert got[scale_path][...].sharding.spec == expect, (precision, scale_path)
            assert got[path][...].dtype == jnp.int8 and got[scale_path][...].dtype == jnp.float32
            seen.add(scale_path)
        assert seen == set(got), (precision, set(got) - seen)


def test_column_parallel_scales_shard_row_parallel_replicate(casts24):
    blk = casts24["int8"].blocks[0]
    assert blk.attn.q.scale[...].sharding.spec == P(None, "model", None)
    assert blk.mlp.gate.scale[...].sharding.spec == P(None, "model")
    assert blk.attn.o.scale[...].sharding.spec == P(None, None, None)
    assert blk.mlp.down.scale[...].sharding.spec == P(None, None)
    assert casts24["int8"].embed.scale[...].sharding.spec == P("model", None)
    assert casts24["int8"].head.scale[...].sharding.spec == P(None, "model")


def test_bytes_per_device_small(mesh24):
    """From the cast arrays themselves, scales included. Per device on 2x4 the row-parallel scales (o, down:
    D floats each) and the norms are replicated while the int8 kernels are split 4 ways, so int8 lands at
    0.264x f32 there; over the whole model (one device) it is below 0.26x."""
    cfg = jaxtp.ModelConfig.preset("small")
    model = jaxtp.Transformer.create(cfg, mesh24)
    per_device, whole = {}, {}
    for precision in ("f32", "bf16", "int8"):
        m = model if precision == "f32" else jaxtp.cast(model, precision)
        per_device[precision] = jaxtp.param_table(m).bytes_per_device
        whole[precision] = sum(v[...].nbytes for v in flat(m).values())
        assert per_device[precision] == sum(
            s.data.nbytes
            for v in flat(m).values()
            for s in v[...].addressable_shards
            if s.device == jax.devices()[0]
        )
    assert per_device["bf16"] <= 0.51 * per_device["f32"]
    assert whole["bf16"] <= 0.51 * whole["f32"]
    assert whole["int8"] <= 0.26 * whole["f32"], whole
    assert per_device["int8"] <= 0.265 * per_device["f32"], per_device
    # Exact accounting per device: kernels at 1 byte, norms and scales at 4.
    n = 4
    D, F, L, N, K, H, V = cfg.D, cfg.F, cfg.L, cfg.N, cfg.K, cfg.H, cfg.V
    kernels = (L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + 2 * V * D) // n
    scales = L * ((N * H + 2 * K * H + 2 * F) // n + 2 * D) + 2 * V // n
    norms = (2 * L + 1) * D
    assert per_device["int8"] == kernels + 4 * (scales + norms)


# ------------------------------------------------------------------------------ int8 numerics


def test_quantization_error_within_half_a_step(model24, casts24):
    base, got = flat(model24), flat(casts24["int8"])
    for path, var in base.items():
        if path.endswith("norm/scale"):
            np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(var[...]))
            continue
        w = np.asarray(var[...], np.float64)
        q = np.asarray(got[path][...])
        s = np.asarray(got[path.rsplit("/", 1)[0] + "/scale"][...], np.float64)
        assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
        assert np.all(np.abs(w - q * s) <= s / 2 * (1 + 1e-6)), path
        # absmax maps to +-127 in every channel
        axes = tuple(i for i in range(q.ndim) if s.shape[i] == 1)
        assert np.all(np.abs(q.astype(int)).max(axis=axes) == 127), path


def test_zero_channel_gives_no_nan_unsharded(unsharded):
    """A model built without a layout casts too; an all-zero channel quantizes to zeros, never NaN."""
    q, s = quant.quantize(jnp.zeros((4, 3)).at[:, 1].set(jnp.arange(4.0)), axes=(0,))
    assert np.all(np.isfinite(np.asarray(s))) and np.all(np.asarray(s) > 0)
    np.testing.assert_array_equal(np.asarray(q)[:, 0], 0)
    model = nnx.clone(unsharded)
    assert model.layout is None
    model.blocks[0].mlp.gate.kernel[...] = model.blocks[0].mlp.gate.kernel[...].at[:, 3].set(0.0)
    model.embed.table[...] = model.embed.table[...].at[7].set(0.0)
    tokens = jnp.full((2, 9), 7, jnp.int32)  # the zeroed embedding row: all-zero activations too
    for precision in ("int8", "w8a8"):
        m = jaxtp.cast(model, precision)
        assert np.asarray(m.blocks[0].mlp.gate.scale[...])[0, 3] == np.float32(quant.SCALE_FLOOR)
        np.testing.assert_array_equal(np.asarray(m.blocks[0].mlp.gate.kernel[...])[:, 3], 0)
        assert np.all(np.isfinite(np.asarray(forward(m, tokens))))


def test_sharded_int8_equals_unsharded(unsharded, logits24, tokens24):
    model = jaxtp.cast(unsharded, "int8")
    assert len(model.blocks[0].attn.q.kernel[...].sharding.device_set) == 1
    assert rel_err(logits24["int8"], forward(model, np.asarray(tokens24))) < 1e-5


def test_int8_and_bf16_close_to_f32(logits24):
    assert rel_err(logits24["int8"], logits24["f32"]) < 3e-2
    assert rel_err(logits24["bf16"], logits24["f32"]) < 3e-2


def test_w8a8_close_to_f32(logits24):
    assert rel_err(logits24["w8a8"], logits24["f32"]) < 3e-2
    assert rel_err(logits24["w8a8"], logits24["int8"]) < 3e-2
    agree = np.mean(np.argmax(logits24["w8a8"], -1) == np.argmax(logits24["f32"], -1))
    assert agree >= 0.9


def test_int8_weights_are_not_params(unsharded, tokens24):
    """Gradients and optimizers see only the float norm scales of an int8 model."""
    m = jaxtp.cast(unsharded, "int8")
    params = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    assert params and all(p.endswith("norm/scale") for p in params), params
    quantized = nnx.state(m, quant.Quantized)
    assert len(jax.tree.leaves(quantized)) == 2 * len(quantized_modules(m))
    loss, grads = loss_and_grads(m, np.asarray(tokens24))
    assert np.isfinite(float(loss))
    assert {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(grads)} == params


# ------------------------------------------------------------------------------- TP contract


def forward_collectives(model, mesh):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t[:, :-1]))
    text = jaxtp.hlo.compiled_text(f, state, batch_tokens(mesh))
    return jaxtp.hlo.parse_collectives(text, mesh), text


@pytest.fixture(scope="module")
def int8_per_layer(tiny, mesh24, casts24):
    one, _ = forward_collectives(
        jaxtp.cast(jaxtp.Transformer.create(tiny.replace(n_layers=1), mesh24), "int8"), mesh24
    )
    two, text = forward_collectives(casts24["int8"], mesh24)
    return two - one, two, text


def test_int8_forward_two_model_all_reduces_per_layer(int8_per_layer):
    per_layer, _, _ = int8_per_layer
    assert per_layer["all-reduce@model"]["count"] == 2, per_layer
    assert all(v["count"] == 0 for k, v in per_layer.items() if k != "all-reduce@model"), per_layer


def test_int8_forward_no_all_gather_and_s8_in_hlo(int8_per_layer):
    _, two, text = int8_per_layer
    for kind in ("all-gather", "all-to-all", "reduce-scatter"):
        assert two.count(kind) == 0, two.summary()
    assert "s8[" in text


# ---------------------------------------------------------------------------- training guard, report


def test_warns_once_when_training_bf16_params(model24, casts24):
    quant.WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quant.warn_if_low_precision_training(model24) is None
    with pytest.warns(UserWarning, match="bf16"):
        assert quant.warn_if_low_precision_training(casts24["bf16"]) == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quant.warn_if_low_precision_training(casts24["bf16"]) == "bf16"  # once
    with pytest.warns(UserWarning, match="frozen"):
        assert quant.warn_if_low_precision_training(casts24["int8"]) == "int8"


def test_precision_report(model24, mesh24):
    batches = [batch_tokens(mesh24, seed=s) for s in (1, 2)]
    report = jaxtp.precision_report(model24, batches)
    assert list(report) == ["f32", "bf16", "int8", "w8a8"]
    f32 = report["f32"]
    assert f32["delta_vs_f32"] == 0.0 and f32["top1_agreement"] == 1.0 and f32["kl_vs_f32"] == 0.0
    assert f32["bytes_per_device"] == jaxtp.param_table(model24).bytes_per_device
    assert report["bf16"]["bytes_ratio_vs_f32"] <= 0.51
    assert report["int8"]["bytes_ratio_vs_f32"] < 0.3
    for p in ("bf16", "int8", "w8a8"):
        r = report[p]
        assert abs(r["delta_vs_f32"]) < 1e-2 and r["top1_agreement"] > 0.9 and 0 <= r["kl_vs_f32"] < 1e-2, (
            p,
            r,
        )
    table = quant.format_precision_report(report)
    assert "w8a8" in table and "nats/byte" in table
    with pytest.raises(ValueError, match="valid precisions"):
        jaxtp.precision_report(model24, batches, precisions=("f32", "fp8"))
