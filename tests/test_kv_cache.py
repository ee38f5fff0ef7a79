"""The decode step's blockwise attention over the filled prefix, and the int8 KV cache: exactness against
full attention, blocks read growing with the position, a compiled step that never touches the whole cache
but to update it, placement and donation, bytes, meshes, scanned models, cast weights, no recompiles,
quality on a trained model, and generate.py's flag."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxtp
from jaxtp import kv_cache
from jaxtp.generation import (
    STACKED_CACHE_AXES,
    TRACES,
    cache_bytes_per_device,
    decode_step,
    decode_step_lowered,
    kv_cache_quality,
    prefill,
)
from jaxtp.layers import attend
from jaxtp.measure import compile_count

pytestmark = pytest.mark.timeout(300)

B, S, NEW = 4, 7, 10
LENGTHS = np.array([7, 3, 5, 1])  # right-padded prompts: rows start at different cache slots
GREEDY = (True, False, False)


@pytest.fixture(scope="module")
def models(tiny):
    cache = {}

    def get(spec, **changes):
        key = (spec, tuple(sorted(changes.items())))
        if key not in cache:
            cache[key] = jaxtp.Transformer.create(tiny.replace(**changes), jaxtp.make_mesh(spec), seed=0)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(0).integers(0, 256, size=(B, S), dtype=np.int32)


def run(model, prompt_BS, **kw):
    return jaxtp.generate(
        model, prompt_BS, NEW, temperature=0, prompt_lengths=LENGTHS, return_logits=True, **kw
    )


def assert_close_greedy(tokens, logits, ref_tokens, ref_logits, tol):
    """Logits within `tol` of ref's while the two greedy paths agree; and they agree until ref's top two logits
    come within 2 tol (a near-tie, where a flip is fair; after it the paths see other tokens)."""
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    for b in range(tokens.shape[0]):
        tie = np.flatnonzero(top2[b, :, 1] - top2[b, :, 0] < 2 * tol)
        split = np.flatnonzero(tokens[b] != ref_tokens[b])
        split = split[0] if len(split) else tokens.shape[1] - 1
        assert split >= (tie[0] if len(tie) else tokens.shape[1] - 1), (
            f"row {b}: diverged at {split}, no near-tie"
        )
        np.testing.assert_allclose(
            logits[b, : split + 1], ref_logits[b, : split + 1], atol=tol, err_msg=f"row {b}"
        )


# ---------------------------------------------------------------------------- decode attention alone


def _random_kv(T=10, K=2, G=2, H=8):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q_B1NH = jax.random.normal(kq, (2, 1, K * G, H))
    return q_B1NH, jax.random.normal(kk, (2, T, K, H)), jax.random.normal(kv, (2, T, K, H))


@pytest.mark.parametrize("slot", [0, 4, 9])
def test_decode_attention_equals_full_attention_over_the_prefix(slot):
    """Blocks of 3 over T=10 (the last block clamped, its seen keys masked), row 1 padded for 3 slots."""
    q_B1NH, k_BTKH, v_BTKH = _random_kv()
    offset_B = jnp.array([0, min(3, slot)])
    k_pos_BT = jnp.arange(10)[None] - offset_B[:, None]
    want = attend(q_B1NH, k_BTKH, v_BTKH, (slot - offset_B)[:, None], k_pos_BT, k_pos_BT >= 0)
    got, n_read = kv_cache.decode_attention(q_B1NH, k_BTKH, v_BTKH, slot, offset_B, block=3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert int(n_read) == slot // 3 + 1  # only the blocks up to the current slot

    k8, v8 = kv_cache.quantize(k_BTKH), kv_cache.quantize(v_BTKH)
    want8 = attend(
        q_B1NH,
        kv_cache.dequantize(k8),
        kv_cache.dequantize(v8),
        (slot - offset_B)[:, None],
        k_pos_BT,
        k_pos_BT >= 0,
    )
    stacked = lambda e: jax.tree.map(
        lambda x: jnp.stack([jnp.zeros_like(x), x]), e
    )  # layer 1 of 2, read in place
    got8, _ = kv_cache.decode_attention(q_B1NH, stacked(k8), stacked(v8), slot, offset_B, lead=(1,), block=3)
    np.testing.assert_allclose(got8, want8, atol=1e-5)


def test_int8_quantization_is_symmetric_absmax_per_token_and_head():
    _, k_BTKH, _ = _random_kv(H=64)
    k8 = kv_cache.quantize(k_BTKH)
    assert k8.q.dtype == jnp.int8 and k8.scale.shape == k_BTKH.shape[:-1]
    scale = kv_cache.unpack(k8.scale)
    assert scale.dtype == jnp.bfloat16  # stored as its uint16 bits
    scale = scale.astype(jnp.float32)
    rotated = kv_cache.rotate(k_BTKH)  # what is quantized: k in the Hadamard basis
    assert bool(jnp.all(scale >= jnp.abs(rotated).max(-1) / 127))  # rounded up to bf16: the absmax still fits
    assert int(jnp.abs(k8.q).max()) <= 127
    err = jnp.abs(k8.q * scale[..., None] - rotated)
    assert bool(jnp.all(err <= scale[..., None] / 2 + 1e-6))  # round to nearest on the stored scale
    # back in k's own basis the error's norm per (token, head) is the same (an orthonormal rotation)
    err_norm = jnp.linalg.norm(kv_cache.dequantize(k8) - k_BTKH, axis=-1)
    np.testing.assert_allclose(err_norm, jnp.linalg.norm(err, axis=-1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("H", [1, 8, 32, 64, 80, 96, 128])
def test_kv_rotation_is_orthonormal_and_its_own_inverse(H):
    """Block Hadamard over the largest power of two dividing H: R R = I, R = R^T, and entries +-1/sqrt(b)."""
    R = kv_cache.rotation(H)
    np.testing.assert_allclose(R @ R, np.eye(H), atol=1e-6)
    np.testing.assert_array_equal(R, R.T)
    b = H & -H
    assert np.allclose(np.abs(R[R != 0]), 1 / np.sqrt(b)) and (R != 0).sum() == H * b


def test_kv_rotation_shrinks_an_outlier_channels_absmax():
    """One channel at 20, the rest standard normal: the rotated absmax (what sets the int8 step) drops well below it."""
    x = jax.random.normal(jax.random.key(0), (64, 64)).at[:, 3].set(20.0)
    ratio = jnp.abs(kv_cache.rotate(x)).max(-1) / jnp.abs(x).max(-1)
    assert float(ratio.max()) < 0.5


# ------------------------------------------------------------------------ cost grows with position


def test_decode_reads_only_the_blocks_up_to_the_position(models, prompt):
    """kv_block=4 on a 64-slot cache: step at slot t reads t // 4 + 1 blocks per layer, not 16, and gives the
    default block's logits (one block of 64); the same holds for the int8 cache."""
    model = models("2x4")
    L, T = model.cfg.n_layers, 64
    for dtype in (None, "int8"):
        tokens, logits = run(model, prompt, cache_len=T, kv_cache_dtype=dtype)
        stats = {}
        small_tokens, small_logits = run(
            model, prompt, cache_len=T, kv_cache_dtype=dtype, kv_block=4, stats=stats
        )
        np.testing.assert_array_equal(small_tokens, tokens)
        np.testing.assert_allclose(small_logits, logits, atol=1e-5)
        slots = range(S, S + NEW - 1)  # decode step i writes slot S + i - 1
        assert stats["kv_blocks_read"] == L * sum(t // 4 + 1 for t in slots)
        assert stats["kv_blocks_read"] < L * len(slots) * T // 4 / 3  # whole-cache reads would be > 3x this


def whole_cache_ops(hlo: str, T: int) -> set:
    """Opcodes of the compiled instructions whose result is as long as the cache (a dimension T); a fusion is
    named by its root."""
    roots, computation = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.-]+) \(", line)
        computation = header.group(1) if header else computation
        root = re.match(r"\s*ROOT %\S+ = \S+ ([\w-]+)\(", line)
        if root:
            roots[computation] = root.group(1)
    ops = set()
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (\w+\[[\d,]*\])\S* ([\w-]+)\(", line)
        if m and re.search(rf"[\[,]{T}[,\]]", m.group(1)):
            op = m.group(2)
            ops.add(
                op if op != "fusion" else "fusion:" + roots[re.search(r"calls=%([\w.-]+)", line).group(1)]
            )
    return ops


@pytest.mark.parametrize(
    "changes, kv_cache_dtype",
    [
        ({}, None),
        ({}, "int8"),
        (dict(compute_dtype="bfloat16"), None),
        (dict(compute_dtype="bfloat16"), "int8"),
        (dict(scan_layers=True), "int8"),
    ],
    ids=["f32", "f32-int8kv", "bf16", "bf16-int8kv", "scanned-int8kv"],
)
def test_decode_step_touches_the_whole_cache_only_to_update_it(models, changes, kv_cache_dtype):
    """In the compiled step every array as long as the cache (T=61) is an argument or an in-place slice update:
    the cache is never read, copied or converted whole, so a step costs what its blocks cost. (XLA:CPU widens a
    bf16 array to f32 around any slice of it: bf16 caches and scales are stored as uint16 bits for that.)"""
    hlo = (
        decode_step_lowered(models("2x4", **changes), B, 61, kv_cache_dtype=kv_cache_dtype, kv_block=8)
        .compile()
        .as_text()
    )
    assert whole_cache_ops(hlo, 61) <= {
        "parameter",
        "get-tuple-element",
        "dynamic-update-slice",
        "fusion:dynamic-update-slice",
    }


# ------------------------------------------------------------------------------- the int8 cache


@pytest.mark.parametrize(
    "spec, values_spec", [("2x4", P("data", None, "model", None)), ("1x8", P(None, None, None, None))]
)  # 1x8: kv heads replicated
def test_int8_cache_is_placed_like_the_cache_counted_and_donated(models, prompt, spec, values_spec):
    model = models(spec)
    layout, T = model.layout, S + NEW
    graphdef, state = nnx.split(model)
    rows = lambda x, dtype=np.int32: jax.device_put(np.asarray(x, dtype), layout.sharding(("batch",)))
    tokens = jax.device_put(prompt, layout.sharding(("batch", "seq")))
    caches, _ = prefill(graphdef, state, tokens, rows(np.zeros(B)), T, cache_dtype=jnp.dtype(jnp.int8))
    values_sh = jax.sharding.NamedSharding(layout.mesh, values_spec)
    scale_sh = jax.sharding.NamedSharding(layout.mesh, P(*values_spec[:-1]))
    for entry in (e for kv in caches for e in kv):
        assert isinstance(entry, kv_cache.Int8KV)
        assert (
            entry.q.shape == (B, T, 4, 8)
            and entry.q.dtype == jnp.int8
            and entry.q.sharding.is_equivalent_to(values_sh, 4)
        )
        assert entry.scale.shape == (B, T, 4) and kv_cache.unpack(entry.scale).dtype == jnp.bfloat16
        assert entry.scale.sharding.is_equivalent_to(scale_sh, 3)
    device0 = sum(
        s.data.nbytes
        for x in jax.tree.leaves(caches)
        for s in x.addressable_shards
        if s.device == layout.mesh.devices.flat[0]
    )
    assert device0 == cache_bytes_per_device(model, B, T, "int8")
    out = decode_step(
        graphdef,
        GREEDY,
        state,
        caches,
        rows(np.zeros(B)),
        jnp.int32(S),
        rows(np.zeros(B)),
        rows(np.zeros(B), bool),
        jax.random.key(0),
        jnp.int32(1),
        jnp.float32(1),
        jnp.int32(0),
        jnp.float32(1),
        jnp.asarray([-1], jnp.int32),
    )
    assert all(x.is_deleted() for x in jax.tree.leaves(caches)), "the int8 cache was not donated"
    assert out[0][0][0].scale.sharding.is_equivalent_to(scale_sh, 3)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_int8_cache_bytes_at_most_053_of_bf16(models, head_dim):
    """Per token and kv head: int8 H + a 2-byte bf16 scale against bf16's 2H. Realistic head dims only: the
    tiny preset's H=8 gives 10/16 = 0.625 and the small preset's H=32 gives 34/64 = 0.531."""
    model = models("2x4", head_dim=head_dim)
    int8, bf16 = (cache_bytes_per_device(model, 8, 256, d) for d in ("int8", "bf16"))
    assert int8 / bf16 == (head_dim + 2) / (2 * head_dim) <= 0.53
    local = (8 // 2) * 256 * (4 // 4)  # rows per device x slots x kv heads per device
    assert int8 == 2 * model.cfg.n_layers * local * (head_dim + 2)
    assert cache_bytes_per_device(model, 8, 256) == 2 * bf16  # None: the f32 compute dtype


@pytest.fixture(scope="module")
def int8_runs(models, prompt):
    runs = {}

    def get(spec, **changes):
        key = (spec, tuple(sorted(changes.items())))
        if key not in runs:
            model = models(spec, **changes)
            runs[key] = run(model, prompt), run(model, prompt, kv_cache_dtype="int8")
        return runs[key]

    return get


def test_int8_cache_on_every_mesh_and_close_to_float(int8_runs):
    (f32_tokens, f32_logits), (ref, ref_logits) = int8_runs("1x1")
    assert_close_greedy(
        ref, ref_logits, f32_tokens, f32_logits, 0.01
    )  # measured 1.1e-3 on logits within +-0.6
    for spec in ("2x4", "1x8"):
        _, (tokens, logits) = int8_runs(spec)
        assert_close_greedy(
            tokens, logits, ref, ref_logits, 1e-4
        )  # the same int8 values up to a rounding tie


def test_scanned_model_with_int8_cache(int8_runs, models, prompt):
    (f32_tokens, f32_logits), (tokens, logits) = int8_runs("2x4", scan_layers=True)
    assert_close_greedy(tokens, logits, f32_tokens, f32_logits, 0.01)
    model = models("2x4", scan_layers=True)
    graphdef, state = nnx.split(model)
    layout = model.layout
    caches, _ = prefill(
        graphdef,
        state,
        jax.device_put(prompt, layout.sharding(("batch", "seq"))),
        jax.device_put(np.zeros(B, np.int32), layout.sharding(("batch",))),
        S + NEW,
        cache_dtype=jnp.dtype(jnp.int8),
    )
    for entry in caches:  # one stacked K and one V: [L, B, T, K, H] values, [L, B, T, K] scales
        assert entry.q.shape == (2, B, S + NEW, 4, 8) and entry.scale.shape == (2, B, S + NEW, 4)
        assert entry.q.sharding.is_equivalent_to(layout.sharding(STACKED_CACHE_AXES), 5)
        assert entry.scale.sharding.is_equivalent_to(layout.sharding(STACKED_CACHE_AXES[:-1]), 4)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_int8_cache_with_cast_weights(models, prompt, precision):
    model = jaxtp.cast(models("2x4"), precision)
    ref_tokens, ref_logits = run(model, prompt)
    tokens, logits = run(model, prompt, kv_cache_dtype="int8")
    assert np.isfinite(logits).all()
    assert_close_greedy(tokens, logits, ref_tokens, ref_logits, 0.02)


def test_int8_cache_compiles_once(models, prompt):
    """Two calls, other prompts of the same padded shape: nothing is traced or compiled again."""
    model = models("1x1")
    jaxtp.generate(model, prompt, NEW, temperature=0, kv_cache_dtype="int8")
    before, size = dict(TRACES), compile_count(decode_step)
    jaxtp.generate(model, prompt[::-1], NEW, temperature=0, kv_cache_dtype="int8")
    jaxtp.generate(
        model, (prompt + 1) % 256, NEW, temperature=0, kv_cache_dtype="int8", prompt_lengths=LENGTHS
    )
    assert dict(TRACES) == before and compile_count(decode_step) == size


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kv_cache_dtype="int4"), "kv_cache_dtype must be None"),
        (dict(kv_block=0), "kv_block must be an integer >= 1"),
    ],
)
def test_bad_cache_settings_raise(models, prompt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jaxtp.generate(models("1x1"), prompt, NEW, **kwargs)
    if "kv_cache_dtype" in kwargs:
        with pytest.raises(ValueError, match=match):
            cache_bytes_per_device(models("1x1"), B, 32, kwargs["kv_cache_dtype"])


# ------------------------------------------------------------------------------ a trained model

TRAIN_STEPS = 150  # the small preset (the main job's model), batch 16 x 64 bytes, lr 4e-3: ~2.2 nats/byte


@pytest.fixture(scope="module")
def trained():
    """The `small` preset trained on the standard-library corpus as the main job does, for TRAIN_STEPS steps
    (the job runs 500), on one device; and 32 held-out windows of 128 bytes."""
    corpus = jaxtp.data.load_corpus("pystdlib")
    mesh = jaxtp.make_mesh("1x1")
    tc = jaxtp.TrainConfig(steps=TRAIN_STEPS, batch_size=16, seq_len=64, lr=4e-3)
    trainer = jaxtp.Trainer.create(jaxtp.Transformer.create(jaxtp.ModelConfig.preset("small"), mesh), tc)
    for step in range(TRAIN_STEPS):
        trainer.train_step(
            jaxtp.data.train_batch(corpus.train, mesh, tc.batch_size, tc.seq_len, tc.seed, step)
        )
    starts = jaxtp.data.eval_starts(len(corpus.heldout), 32, 128, max_batches=1)
    return trainer.model, np.stack([corpus.heldout[s : s + 128] for s in starts]).astype(np.int32)


def test_int8_cache_quality_on_a_trained_model(trained):
    """64-byte prompts, 64 greedy bytes each; nll over the windows' last 64 bytes through prefill + decode."""
    model, windows = trained
    q = kv_cache_quality(
        model, windows, prompt_len=64, new_tokens=64, kv_cache_dtype="int8", reference="bf16"
    )
    assert abs(q["delta_nll"]) <= 2e-3, q
    assert q["step_agreement"] >= 0.98, q
    assert q["agreement"] >= 0.98, q  # free-running: one flipped near-tie changes the rest of its row
    assert q["greedy_tokens"] == q["nll_tokens"] == 32 * 64


# ---------------------------------------------------------------------------------------- the CLI


def test_generate_cli_takes_kv_cache_dtype(tmp_path, capsys):
    """experiments/generate.py --kv-cache-dtype (conftest puts experiments/ on the path)."""
    import generate as generate_cli
    from hf_tiny import make_checkpoint

    make_checkpoint("llama32", tmp_path, with_tokenizer=True)
    kv_bytes = {}
    for dtype in ("auto", "int8"):
        assert (
            generate_cli.main(
                [
                    "--hf",
                    str(tmp_path),
                    "--mesh",
                    "1x8",
                    "--prompt",
                    "The quick brown fox",
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "8",
                    "--kv-cache-dtype",
                    dtype,
                ]
            )
            == 0
        )
        line = re.search(
            r"^KV cache: ([\d.,]+) (B|KiB|MiB) per device .*, " + dtype + r"\);",
            capsys.readouterr().out,
            re.M,
        )
        assert line, dtype
        kv_bytes[dtype] = (
            float(line.group(1).replace(",", "")) * {"B": 1, "KiB": 1024, "MiB": 2**20}[line.group(2)]
        )
    assert kv_bytes["int8"] < kv_bytes["auto"] / 2  # int8 + a bf16 scale against f32: (H + 2) / 4H
