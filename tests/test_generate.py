"""Generation with a sharded KV cache: cached == naive on every mesh, one compiled decode step,
2 model-axis all-reduces per layer per step, sampling definitions, variable-length prompts, errors."""

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxtp
from jaxtp.generation import TRACES, cache_bytes_per_device, decode_step, decode_step_lowered, prefill

pytestmark = pytest.mark.timeout(300)

B, S, NEW = 4, 7, 10  # one prompt shape for the mesh tests, so each mesh compiles prefill/step once
SPECS = ["1x1", "2x4", "1x8"]


@contextlib.contextmanager
def xla_compiles():
    """Names of the functions XLA compiles inside the block (from jax's compile log)."""
    names = []

    class Handler(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("Finished XLA compilation of"):
                names.append(msg.split()[4])

    handler, logger = Handler(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def models(tiny):
    cache = {}

    def get(spec):
        if spec not in cache:
            cache[spec] = jaxtp.Transformer.create(tiny, jaxtp.make_mesh(spec), seed=0)
        return cache[spec]

    return get


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(0).integers(0, 256, size=(B, S), dtype=np.int32)


_forward = nnx.jit(lambda m, t: m(t))


def naive_greedy(model, prompt_BS, lengths_B, n):
    """Re-run the full forward every token (no cache) over a fixed-width buffer: causal attention makes the
    columns after the current position irrelevant, and one buffer width means one compile per model."""
    buf = np.zeros((prompt_BS.shape[0], prompt_BS.shape[1] + n), np.int32)
    buf[:, : prompt_BS.shape[1]] = prompt_BS
    rows = np.arange(len(lengths_B))
    tokens, logits = [], []
    for i in range(n):
        step_logits = np.asarray(_forward(model, buf))[rows, lengths_B - 1 + i, : model.cfg.vocab_size]
        tok = step_logits.argmax(-1).astype(np.int32)
        buf[rows, lengths_B + i] = tok
        tokens.append(tok)
        logits.append(step_logits)
    return np.stack(tokens, 1), np.stack(logits, 1)


@pytest.fixture(scope="module")
def greedy_runs(models, prompt):
    runs = {}

    def get(spec):
        if spec not in runs:
            model = models(spec)
            lengths = np.full((B,), S)
            with xla_compiles() as compiled:
                cached = jaxtp.generate(model, prompt, NEW, temperature=0, return_logits=True)
            runs[spec] = cached, naive_greedy(model, prompt, lengths, NEW), compiled
        return runs[spec]

    return get


# ------------------------------------------------------------------------------- cached == naive


@pytest.mark.parametrize("spec", SPECS)
def test_cached_greedy_equals_naive(greedy_runs, spec):
    (tokens, logits), (naive_tokens, naive_logits), compiled = greedy_runs(spec)
    assert tokens.shape == (B, NEW) and tokens.dtype == np.int32
    assert logits.shape == (B, NEW, 256)
    np.testing.assert_array_equal(tokens, naive_tokens)
    np.testing.assert_allclose(logits, naive_logits, atol=1e-5, rtol=0)
    assert compiled.count("jit(prefill)") == 1 and compiled.count("jit(decode_step)") == 1, compiled


def test_meshes_agree(greedy_runs):
    (ref, ref_logits), *_ = greedy_runs("1x1")
    for spec in SPECS[1:]:
        (tokens, logits), *_ = greedy_runs(spec)
        np.testing.assert_array_equal(tokens, ref)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)


def test_variable_lengths_match_naive_per_row_on_2x4(models, prompt, greedy_runs):
    """Right padding + per-row positions on a sharded mesh; max length S keeps the compiled shapes."""
    greedy_runs("2x4")  # compiled prefill/step for these shapes
    model, lengths = models("2x4"), np.array([S, 3, 5, 1])
    before = dict(TRACES)
    garbage = np.where(np.arange(S)[None] < lengths[:, None], prompt, 255)  # padding ids must not matter
    tokens, logits = jaxtp.generate(
        model, garbage, NEW, temperature=0, prompt_lengths=lengths, return_logits=True
    )
    naive_tokens, naive_logits = naive_greedy(
        model, prompt * (np.arange(S)[None] < lengths[:, None]), lengths, NEW
    )
    np.testing.assert_array_equal(tokens, naive_tokens)
    np.testing.assert_allclose(logits, naive_logits, atol=1e-5, rtol=0)
    assert TRACES["prefill"] == before.get("prefill", 0) and TRACES["decode_step"] == before["decode_step"]


def test_decode_step_compiles_once(models, prompt):
    """B=2, cache 19 is used by no earlier test; later tests reuse these shapes (variable lengths, sampling)."""
    model = models("1x1")
    before = dict(TRACES)
    with xla_compiles() as compiled:
        jaxtp.generate(model, prompt[:2, :5], 14, temperature=0)  # 13 decode steps
        assert compiled.count("jit(decode_step)") == 1 and compiled.count("jit(prefill)") == 1, compiled
        jaxtp.generate(model, prompt[2:, :5], 14, temperature=0)  # new values, same shapes: nothing compiles
        jaxtp.generate(
            model, prompt[:2, :3], 14, temperature=0, cache_len=19
        )  # new prompt length, same cache
    assert compiled.count("jit(decode_step)") == 1, compiled
    assert compiled.count("jit(prefill)") == 2, compiled  # only the new prompt length
    assert TRACES["decode_step"] - before.get("decode_step", 0) == 1
    assert TRACES["prefill"] - before.get("prefill", 0) == 2


def test_variable_lengths_equal_each_row_alone(models, prompt):
    """Shapes shared with test_decode_step_compiles_once (B=2, S=5, cache 19) to save compiles."""
    model, lengths = models("1x1"), np.array([5, 3])
    batch = jaxtp.generate(model, prompt[:2, :5], 14, temperature=0, prompt_lengths=lengths)
    for b, length in enumerate(lengths):
        alone = jaxtp.generate(model, prompt[b : b + 1, :length], 14, temperature=0, cache_len=19)
        np.testing.assert_array_equal(batch[b], alone[0], err_msg=f"row {b} (length {length})")


def test_eos_pads_with_eos_and_stops_early(models):
    model = models("1x1")
    same = np.tile(np.arange(1, S + 1, dtype=np.int32), (B, 1))  # identical rows finish together
    free = jaxtp.generate(model, same, NEW, temperature=0)
    eos = int(free[0, 1])
    first = int(np.argmax(free[0] == eos))
    stats = {}
    got = jaxtp.generate(model, same, NEW, temperature=0, eos_id=eos, stats=stats)
    np.testing.assert_array_equal(got[:, : first + 1], free[:, : first + 1])
    assert (got[:, first:] == eos).all()
    assert stats["decode_steps"] < NEW - 1  # stopped before max_new_tokens once every row was done
    # Several eos ids (a chat model's end-of-turn and end-of-text): the first one hit stops the row, which is
    # then padded with the first id of the list.
    other = int(free[0, 2]) if int(free[0, 2]) != eos else 255
    several = jaxtp.generate(model, same, NEW, temperature=0, eos_id=[other, eos])
    np.testing.assert_array_equal(several[:, : first + 1], free[:, : first + 1])
    assert (several[:, first + 1 :] == other).all()


# ------------------------------------------------------------------------------------ the cache


def test_cache_is_sharded_by_the_rules_and_donated(models, greedy_runs, prompt):
    greedy_runs("2x4"), greedy_runs("1x8")  # reuse compiled shapes
    expect = {
        "2x4": P("data", None, "model", None),
        "1x8": P(None, None, None, None),
    }  # 1x8: 4 kv heads replicated
    for spec, spec_want in expect.items():
        model = models(spec)
        layout = model.layout
        want = jax.sharding.NamedSharding(layout.mesh, spec_want)
        graphdef, state = nnx.split(model)
        tokens = jax.device_put(prompt, layout.sharding(("batch", "seq")))
        offsets = jax.device_put(np.zeros((B,), np.int32), layout.sharding(("batch",)))
        caches, logits = prefill(graphdef, state, tokens, offsets, S + NEW)
        assert len(caches) == model.cfg.n_layers
        for k, v in caches:
            assert k.shape == v.shape == (B, S + NEW, 4, model.cfg.head_dim)
            assert k.sharding.is_equivalent_to(want, 4) and v.sharding.is_equivalent_to(want, 4), (
                spec,
                k.sharding,
            )
        i32 = lambda x: jax.device_put(np.asarray(x, np.int32), layout.sharding(("batch",)))
        done = jax.device_put(np.zeros(B, bool), layout.sharding(("batch",)))
        out = decode_step(
            graphdef,
            (True, False, False),
            state,
            caches,
            i32(np.zeros(B)),
            jnp.int32(S),
            offsets,
            done,
            jax.random.key(0),
            jnp.int32(1),
            jnp.float32(1),
            jnp.int32(0),
            jnp.float32(1),
            jnp.asarray([-1], jnp.int32),
        )
        assert caches[0][0].is_deleted(), "the cache was not donated to the decode step"
        assert out[0][0][0].sharding.is_equivalent_to(want, 4)


def test_two_model_all_reduces_per_layer_per_decode_step(tiny, models):
    mesh = jaxtp.make_mesh("2x4")
    one = jaxtp.Transformer.create(tiny.replace(n_layers=1), mesh)
    c1, c2 = (
        jaxtp.hlo.parse_collectives(decode_step_lowered(m, B, S + NEW).compile().as_text(), mesh)
        for m in (one, models("2x4"))
    )
    per_layer = c2 - c1
    assert {k: v["count"] for k, v in per_layer.items() if v["count"]} == {"all-reduce@model": 2}, per_layer
    assert (
        per_layer["all-reduce@model"]["bytes"] == 2 * (B // 2) * tiny.d_model * 4
    )  # [B/data, 1, D] f32 each
    assert c2.count("all-reduce", "data") == 0


@pytest.mark.parametrize(
    "spec, kv_cache_dtype, kv_block",
    [("2x4", "int8", 256), ("2x4", None, 4), ("2x4", "int8", 4), ("1x8", "int8", 4)],
)
def test_two_model_all_reduces_per_layer_with_int8_kv_and_the_block_loop(
    tiny, models, spec, kv_cache_dtype, kv_block
):
    """int8 K/V (quantized at write, dequantized per block) and the decode attention's loop over key blocks
    (kv_block=4 on 17 slots: a trip count set by the slot) add no collective; 1x8 replicates the kv heads."""
    mesh = jaxtp.make_mesh(spec)
    one = jaxtp.Transformer.create(tiny.replace(n_layers=1), mesh)
    c1, c2 = (
        jaxtp.hlo.parse_collectives(
            decode_step_lowered(m, B, S + NEW, kv_cache_dtype=kv_cache_dtype, kv_block=kv_block)
            .compile()
            .as_text(),
            mesh,
        )
        for m in (one, models(spec))
    )
    per_layer = c2 - c1
    assert {k: v["count"] for k, v in per_layer.items() if v["count"]} == {"all-reduce@model": 2}, per_layer
    rows = B // dict(mesh.shape)["data"]
    assert per_layer["all-reduce@model"]["bytes"] == 2 * rows * tiny.d_model * 4  # [B/data, 1, D] f32 each
    assert c2.count("all-reduce", "data") == 0


# --------------------------------------------------------------------------------------- sampling


def test_top_k_keeps_exactly_the_k_best():
    logits = jnp.array([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 0.0, 0.0, -1.0, 9.0]])
    kept = np.isfinite(np.asarray(jaxtp.filter_logits(logits, top_k=3)))
    np.testing.assert_array_equal(kept, [[0, 1, 1, 1, 0], [1, 1, 0, 0, 1]])  # ties: lower id first
    np.testing.assert_array_equal(
        np.asarray(jaxtp.filter_logits(logits, top_k=3))[kept], np.asarray(logits)[kept]
    )
    assert np.isfinite(np.asarray(jaxtp.filter_logits(logits, top_k=99))).all()


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = np.array([[0.15, 0.5, 0.05, 0.3]])
    logits = jnp.log(jnp.asarray(probs))
    kept = lambda **kw: set(np.flatnonzero(np.isfinite(np.asarray(jaxtp.filter_logits(logits, **kw))[0])))
    assert kept(top_p=0.45) == {1}  # the top token is always kept
    assert kept(top_p=0.7) == {1, 3}
    assert kept(top_p=0.9) == {0, 1, 3}
    assert kept(top_p=1.0) == {0, 1, 2, 3}
    # top-k first, then top-p on the renormalised survivors: {1, 3} -> [0.625, 0.375]
    assert kept(top_k=2, top_p=0.6) == {1}
    assert kept(top_k=2, top_p=0.7) == {1, 3}


def test_sampling_frequencies_follow_the_filtered_distribution():
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    logits = jnp.tile(jnp.log(jnp.asarray(probs)), (20000, 1))
    key = jax.random.key(7)
    for kw, allowed in [(dict(top_k=2), [0, 1]), (dict(top_p=0.8), [0, 1, 2]), (dict(), [0, 1, 2, 3, 4])]:
        drawn = np.asarray(jaxtp.sample_logits(logits, key, temperature=1.0, **kw))
        freq = np.bincount(drawn, minlength=5) / len(drawn)
        want = np.zeros(5)
        want[allowed] = probs[allowed] / probs[allowed].sum()
        np.testing.assert_allclose(freq, want, atol=0.015, err_msg=str(kw))
    hot = np.asarray(jaxtp.sample_logits(logits, key, temperature=0.25))  # same compiled program as dict()
    assert abs(np.mean(hot == 0) - probs[0] ** 4 / np.sum(probs**4)) < 0.015  # temperature 1/4: p^4
    np.testing.assert_array_equal(jaxtp.sample_logits(logits[:4], key, temperature=0), [0] * 4)  # greedy


def test_seeded_sampling_is_reproducible(models, prompt):
    model = models("1x1")
    kw = dict(temperature=1.0, top_k=50, top_p=0.95)
    a = jaxtp.generate(model, prompt[:2, :5], 14, seed=1, **kw)
    b = jaxtp.generate(model, prompt[:2, :5], 14, seed=1, **kw)
    c = jaxtp.generate(model, prompt[:2, :5], 14, seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert ((a >= 0) & (a < 256)).all()


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(max_new_tokens=60),
            r"prompt length 7 \+ max_new_tokens 60 = 67 exceeds the model's max_seq_len=64",
        ),
        (dict(prompt_tokens_BS=np.zeros((2, 0), np.int32)), "empty prompt"),
        (dict(prompt_lengths=[7, 0, 3, 3]), "empty prompt: row 1"),
        (dict(temperature=-0.5), "temperature must be"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be"),
        (dict(prompt_tokens_BS=np.full((4, 7), 300)), r"prompt token ids must lie in \[0, 256\)"),
        (dict(prompt_tokens_BS=np.zeros(7, np.int32)), r"\[batch, seq\]"),
        (dict(eos_id=256), "eos_id must be an id or a list of ids in"),
        (dict(cache_len=65), "cache_len=65 must lie"),
    ],
)
def test_bad_input_raises_value_error(models, prompt, kwargs, match):
    args = dict(prompt_tokens_BS=prompt, max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        jaxtp.generate(models("1x1"), args.pop("prompt_tokens_BS"), args.pop("max_new_tokens"), **args)


@pytest.mark.parametrize("kwargs", [dict(top_k=0), dict(top_p=0), dict(temperature=-1)])
def test_sampling_function_validates(kwargs):
    with pytest.raises(ValueError):
        jaxtp.sample_logits(jnp.zeros((1, 4)), jax.random.key(0), **kwargs)


# ------------------------------------------------------------------------------------ precisions


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_generates_from_cast_models(models, greedy_runs, prompt, precision):
    if not hasattr(jaxtp, "cast"):
        pytest.skip("jaxtp.cast (jaxtp/quant.py) is not available yet")
    (ref, ref_logits), *_ = greedy_runs("2x4")
    f32 = models("2x4")
    model = jaxtp.cast(f32, precision)
    tokens, logits = jaxtp.generate(model, prompt, NEW, temperature=0, return_logits=True)
    assert tokens.shape == (B, NEW) and np.isfinite(logits).all()
    tol = 0.02  # measured: bf16 0.003, int8 0.006 on logits spanning about [-0.6, 0.6]
    np.testing.assert_allclose(logits[:, 0], ref_logits[:, 0], atol=tol, rtol=0)
    # The same greedy path as f32 until f32's top two logits come within the tolerance (a near-tie).
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    for b in range(B):
        tie = np.flatnonzero(top2[b, :, 1] - top2[b, :, 0] < 2 * tol)
        upto = tie[0] if len(tie) else NEW
        np.testing.assert_array_equal(tokens[b, :upto], ref[b, :upto], err_msg=f"{precision} row {b}")
    if precision == "bf16":  # the cache follows the compute dtype
        assert cache_bytes_per_device(model, B, 32) * 2 == cache_bytes_per_device(f32, B, 32)
