"""Attention implementations (jaxtp.attention): blockwise agrees with xla in values and gradients, on every
mesh and rules preset, with no new collective; it skips causally dead blocks; its memory grows with S, not
S^2; config choices and the cuDNN dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import batch_tokens, rel_err
from flax import nnx

import jaxtp
from jaxtp import attention
from jaxtp.hlo import parse_collectives
from jaxtp.loss import cross_entropy
from jaxtp.measure import memory_per_device

pytestmark = pytest.mark.timeout(300)

BLOCK = 16  # several blocks at tiny S
S = 40  # not a multiple of BLOCK: the last block is padded


@pytest.fixture(scope="module")
def cfg(tiny):
    """8 query heads over 2 kv heads (G = 4; replicated over the model axis on 1x8)."""
    return tiny.replace(n_kv_heads=2, attention_block=BLOCK)


def compiled_step(cfg, spec, rules=None):
    """(loss, logits, {path: grad}, collectives) of one compiled loss-and-gradient program."""
    mesh = jaxtp.make_mesh(spec)
    graphdef, params, rest = nnx.split(jaxtp.Transformer.create(cfg, mesh, rules=rules), nnx.Param, ...)
    tokens = batch_tokens(mesh, seq=S + 1)

    def loss(params, tokens):
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:]), logits

    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params, tokens).compile()
    (value, logits), grads = compiled(params, tokens)
    flat = {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(grads)}
    return float(value), np.asarray(logits), flat, parse_collectives(compiled.as_text(), mesh).summary()


@pytest.fixture(scope="module")
def steps(cfg):
    """Every program once: (implementation, mesh, rules, scan_layers) -> compiled_step."""
    cache = {}

    def get(impl, spec, rules=None, scan=False):
        key = (impl, spec, rules, scan)
        if key not in cache:
            cache[key] = compiled_step(cfg.replace(attention=impl, scan_layers=scan), spec, rules)
        return cache[key]

    return get


def assert_same_step(got, want, tol=1e-5):
    loss, logits, grads, _ = got
    ref_loss, ref_logits, ref_grads, _ = want
    assert abs(loss - ref_loss) <= tol * abs(ref_loss)
    assert rel_err(logits, ref_logits) <= tol
    assert grads.keys() == ref_grads.keys()
    errs = {k: rel_err(grads[k], ref_grads[k]) for k in grads}
    assert max(errs.values()) <= tol, errs


# ------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("spec", ["1x1", "2x4", "1x8"])
def test_blockwise_matches_xla(steps, spec):
    assert_same_step(steps("blockwise", spec), steps("xla", spec))


@pytest.mark.parametrize("spec", ["2x4", "1x8"])
def test_blockwise_adds_no_collective(steps, spec):
    """Heads stay split through every block (the [B, S, K, G, H] view), and the dead-block table of the
    default positions needs no cross-device reduction: the compiled step's collectives are xla's."""
    assert steps("blockwise", spec)[3] == steps("xla", spec)[3]


@pytest.mark.parametrize("rules, spec", [("megatron-sp", "2x4"), ("fsdp", "1x2x4")])
def test_blockwise_under_other_rules(steps, rules, spec):
    """Same parameters on every mesh and table (1x2x4: kv heads replicated and unfused under ZeRO)."""
    assert_same_step(steps("blockwise", spec, rules), steps("xla", "1x1"))


def test_blockwise_with_scan_layers(steps):
    assert_same_step(steps("blockwise", "2x4", scan=True), steps("xla", "1x1", scan=True))


@pytest.mark.parametrize("spec", ["1x1", "2x4"])
def test_cached_greedy_generation_is_identical(cfg, spec):
    """Prefill through blockwise attention (several blocks, padded prompts of different lengths, so rows
    start at different offsets) and decode give the same greedy tokens as xla."""
    mesh = jaxtp.make_mesh(spec)
    prompt_BS = np.random.default_rng(3).integers(0, 256, size=(4, S), dtype=np.int32)
    lengths = [S, S - 7, 23, S - 1]
    out = {}
    for impl in ("xla", "blockwise"):
        model = jaxtp.Transformer.create(cfg.replace(attention=impl), mesh, seed=1)
        out[impl] = jaxtp.generate(model, prompt_BS, 16, temperature=0, prompt_lengths=lengths)
    np.testing.assert_array_equal(out["blockwise"], out["xla"])


def test_config_choices(tiny):
    assert tiny.attention == "auto"
    with pytest.raises(ValueError, match="attention must be one of auto, xla, blockwise, cudnn"):
        tiny.replace(attention="flash")
    with pytest.raises(ValueError, match="attention_block must be a positive integer"):
        tiny.replace(attention_block=0)


def test_cudnn_without_gpu_fails_at_first_call(tiny):
    """Built fine (the planner builds models for GPUs it does not have); the first call says what to do."""
    model = jaxtp.Transformer.create(tiny.replace(attention="cudnn"), jaxtp.make_mesh("1x1"))
    with pytest.raises(ValueError, match="use attention='auto' or 'blockwise'"):
        model(jnp.zeros((1, 8), jnp.int32))


def test_auto_is_xla_at_short_context():
    """Today's models keep today's numbers: auto runs xla below the measured crossover."""
    n = attention.AUTO_BLOCKWISE_MIN_ST
    assert attention.resolve("auto", 128, 128, cudnn_ok=True) == "xla"
    assert attention.resolve("auto", 1, n - 1, cudnn_ok=True) == "xla"
    assert attention.resolve("auto", 1, n, cudnn_ok=True) == "blockwise"
    assert attention.resolve("xla", 4096, 4096, cudnn_ok=True) == "xla"


def test_attention_layer_kv_path(cfg):
    """The kv= path (generate's prefill: fresh keys, left-padded prompts) dispatches like self-attention."""
    rows, offset = 3, jnp.array([0, 5, 11])
    x_BSD = jax.random.normal(jax.random.key(1), (rows, S, cfg.d_model))
    pos_BS = jnp.arange(S)[None] - offset[:, None]
    outs = {}
    for impl in ("xla", "blockwise"):
        attn = jaxtp.Attention(cfg.replace(attention=impl), rngs=nnx.Rngs(0))
        kv = attn.project_kv(x_BSD, pos_BS)
        outs[impl] = jax.jit(lambda x, kv: attn(x, pos_BS, kv=kv, k_pos_BT=pos_BS, k_valid_BT=pos_BS >= 0))(
            x_BSD, kv
        )
    assert rel_err(outs["blockwise"], outs["xla"]) <= 1e-5


# ------------------------------------------------------------------------------------- attend()


def qkv(B=2, S=S, T=S, N=8, K=2, H=16, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(ks[0], (B, S, N, H)).astype(dtype),
        jax.random.normal(ks[1], (B, T, K, H)).astype(dtype),
        jax.random.normal(ks[2], (B, T, K, H)).astype(dtype),
    )


def attend_and_grads(impl, q, k, v, *args, **kwargs):
    """attend's output and d(sum(out * cos(out)))/d(q, k, v), jitted."""

    def loss(q, k, v):
        out = attention.attend(q, k, v, *args, implementation=impl, block=BLOCK, **kwargs)
        return jnp.sum(out * jnp.cos(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def padded_prompts(B=2, T=S):
    """Left-padded rows as generate lays them out: slot t holds position t - offset_b, slots < offset invalid."""
    pos_BT = jnp.arange(T)[None] - jnp.array([0, 7])[:B, None]
    return pos_BT, pos_BT >= 0


def mask_cases():
    rng = np.random.default_rng(0)
    pos_BT, valid_BT = padded_prompts()
    shifted = pos_BT + 1000  # positions far from 0
    return {
        "causal": dict(q_pos_BS=pos_BT, k_pos_BT=pos_BT),
        "padded prompts": dict(q_pos_BS=pos_BT, k_pos_BT=pos_BT, k_valid_BT=valid_BT),
        "offset positions": dict(q_pos_BS=shifted, k_pos_BT=shifted, k_valid_BT=valid_BT),
        "queries after a cache": dict(q_pos_BS=pos_BT[:, -9:], k_pos_BT=pos_BT, k_valid_BT=valid_BT),
        "mask [B, S, T]": dict(
            q_pos_BS=pos_BT, k_pos_BT=pos_BT, mask_BST=jnp.asarray(rng.random((2, S, S)) > 0.3)
        ),
        "mask [S, T]": dict(q_pos_BS=pos_BT, k_pos_BT=pos_BT, mask_BST=jnp.asarray(rng.random((S, S)) > 0.3)),
        "encoder": dict(q_pos_BS=pos_BT, k_pos_BT=pos_BT, k_valid_BT=valid_BT, causal=False),
        # Padded queries (negative positions) see no valid key: xla averages every value; so must blockwise.
        "rows that see nothing": dict(q_pos_BS=pos_BT - 3, k_pos_BT=pos_BT, k_valid_BT=valid_BT),
    }


@pytest.mark.parametrize("case", list(mask_cases()))
def test_attend_blockwise_matches_xla(case):
    kw = mask_cases()[case]
    q, k, v = qkv(S=kw["q_pos_BS"].shape[1])
    args = (kw.pop("q_pos_BS"), kw.pop("k_pos_BT"))
    out, grads = attend_and_grads("blockwise", q, k, v, *args, **kw)
    ref_out, ref_grads = attend_and_grads("xla", q, k, v, *args, **kw)
    assert rel_err(out, ref_out) <= 1e-5
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert rel_err(g, ref) <= 1e-5, name


def test_attend_bf16():
    """bf16 inputs, f32 softmax and accumulation: blockwise within bf16 rounding of the f32 answer."""
    pos_BT, valid_BT = padded_prompts()
    q, k, v = qkv()
    ref_out, ref_grads = attend_and_grads("xla", q, k, v, pos_BT, pos_BT, valid_BT)
    out, grads = attend_and_grads(
        "blockwise", *(x.astype(jnp.bfloat16) for x in (q, k, v)), pos_BT, pos_BT, valid_BT
    )
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert rel_err(out, ref_out) <= 2e-2
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) <= 3e-2


@pytest.mark.parametrize("order", ["increasing", "decreasing"])
def test_dead_blocks_are_skipped(order):
    """NaN keys and values in one key block: a query block for which the positions make that block dead
    stays finite in the output and in dQ (the block was never computed: masking it would give 0 * NaN);
    query blocks that can see it turn NaN (live blocks are computed). Decreasing positions reverse which
    blocks are dead: the decision reads the positions, not the indices."""
    n, poisoned = 4 * BLOCK, 2
    pos = jnp.arange(n) if order == "increasing" else n - 1 - jnp.arange(n)
    pos_BT = jnp.broadcast_to(pos, (2, n))
    q, k, v = qkv(S=n, T=n)
    nan_keys = (jnp.arange(n) // BLOCK == poisoned)[None, :, None, None]
    k_bad, v_bad = jnp.where(nan_keys, jnp.nan, k), jnp.where(nan_keys, jnp.nan, v)
    out, (dq, _, _) = attend_and_grads("blockwise", q, k_bad, v_bad, pos_BT, pos_BT)
    dead_rows = (
        jnp.arange(n) // BLOCK < poisoned if order == "increasing" else jnp.arange(n) // BLOCK > poisoned
    )
    finite_rows = np.asarray(
        jnp.all(jnp.isfinite(out), axis=(0, 2, 3)) & jnp.all(jnp.isfinite(dq), axis=(0, 2, 3))
    )
    np.testing.assert_array_equal(finite_rows, np.asarray(dead_rows))
    ref_out, (ref_dq, _, _) = attend_and_grads("xla", q, k, v, pos_BT, pos_BT)
    assert rel_err(out[:, dead_rows], ref_out[:, dead_rows]) <= 1e-5
    assert rel_err(dq[:, dead_rows], ref_dq[:, dead_rows]) <= 1e-5


def test_cudnn_dispatch(monkeypatch):
    """The cuDNN path's glue, on CPU: a stand-in for jax.nn.dot_product_attention (its xla implementation,
    GQA native) runs where cuDNN would; positions that do not increase along the sequence (two packed
    documents) take the fallback, decided at run time."""
    calls = []

    def stand_in(q, k, v, *, is_causal, implementation):
        calls.append(implementation)
        return (
            jnp.zeros_like(q) if stand_in.zeros else real(q, k, v, is_causal=is_causal, implementation="xla")
        )

    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
    monkeypatch.setattr(attention, "on_gpu", lambda: True)
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv())
    increasing = jnp.broadcast_to(jnp.arange(S), (2, S))
    packed = jnp.broadcast_to(jnp.arange(S) % (S // 2), (2, S))
    for stand_in.zeros, pos_BS, runs_cudnn in (
        (False, increasing, True),
        (True, increasing, True),
        (True, packed, False),
    ):
        out = jax.jit(lambda q, k, v, p: attention.attend(q, k, v, p, p, implementation="cudnn"))(
            q, k, v, pos_BS
        )
        ref = attention.attend_xla(q, k, v, pos_BS, pos_BS)
        if runs_cudnn and stand_in.zeros:
            assert not jnp.any(out)
        else:
            assert rel_err(out.astype(jnp.float32), ref.astype(jnp.float32)) <= 1e-2
    assert calls and set(calls) == {"cudnn"}
    # What cuDNN cannot express goes elsewhere at trace time: padding, f32, an extra mask.
    valid_BS = increasing >= 3
    assert attention.resolve("cudnn", S, S, attention.cudnn_expressible(q, k, valid_BS, None, True)) == "xla"
    assert (
        attention.resolve(
            "auto", S, S, attention.cudnn_expressible(q.astype(jnp.float32), k, None, None, True)
        )
        == "xla"
    )


def test_cudnn_without_gpu_fails_in_attend():
    q, k, v = qkv()
    pos_BS = jnp.broadcast_to(jnp.arange(S), (2, S))
    with pytest.raises(ValueError, match="needs a GPU .* use attention='auto' or 'blockwise'"):
        attention.attend(q, k, v, pos_BS, pos_BS, implementation="cudnn")


# ------------------------------------------------------------------------------------- memory


@pytest.fixture(scope="module")
def temp_bytes():
    """Train-step temp bytes on one device of a small model (batch 1), compiled only, by (impl, S)."""
    cfg = jaxtp.ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=2048)
    mesh = jaxtp.make_mesh("1x1")

    def temp(impl, seq):
        graphdef, params, rest = nnx.split(
            jaxtp.Transformer.create(cfg.replace(attention=impl), mesh), nnx.Param, ...
        )
        tokens = jax.ShapeDtypeStruct((1, seq + 1), jnp.int32)
        step = jax.jit(jax.grad(lambda p, t: jaxtp.loss.lm_loss(nnx.merge(graphdef, p, rest), t)))
        return memory_per_device(step.lower(params, tokens).compile())["temp"]

    return {
        (impl, seq): temp(impl, seq)
        for impl, seq in [("blockwise", 512), ("blockwise", 1024), ("blockwise", 2048), ("xla", 2048)]
    }


def test_blockwise_memory_is_linear_in_s(temp_bytes):
    assert temp_bytes[("blockwise", 2048)] <= 2.3 * temp_bytes[("blockwise", 1024)], temp_bytes
    assert temp_bytes[("blockwise", 1024)] <= 2.3 * temp_bytes[("blockwise", 512)], temp_bytes


def test_blockwise_memory_beats_xla_at_long_context(temp_bytes):
    assert temp_bytes[("blockwise", 2048)] <= temp_bytes[("xla", 2048)] / 4, temp_bytes
