"""Training: same loss curve on every mesh, one compile, sharded optimizer state, synthetic floor."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

import jaxtp
from jaxtp import data, train
from jaxtp.measure import compile_count

pytestmark = pytest.mark.timeout(300)

STEPS, B, S = 4, 8, 32


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus("synthetic")


def curve(cfg, spec, corpus):
    mesh = jaxtp.make_mesh(spec)
    tr = train.Trainer.create(
        jaxtp.Transformer.create(cfg, mesh), train.TrainConfig(steps=STEPS, batch_size=B, seq_len=S)
    )
    losses = [
        float(tr.train_step(data.train_batch(corpus.train, mesh, B, S, 0, i))["loss"]) for i in range(STEPS)
    ]
    return tr, losses


@pytest.fixture(scope="module")
def reference(tiny, corpus):
    return curve(tiny, "1x1", corpus)


@pytest.fixture(scope="module")
def on_2x4(tiny, corpus):
    return curve(tiny, "2x4", corpus)


def test_same_loss_curve_on_2x4(reference, on_2x4):
    np.testing.assert_allclose(on_2x4[1], reference[1], rtol=1e-5, atol=1e-5)
    assert reference[1][-1] < reference[1][0]  # it learns


def test_same_loss_curve_on_8x1(tiny, corpus, reference):
    np.testing.assert_allclose(curve(tiny, "8x1", corpus)[1], reference[1], rtol=1e-5, atol=1e-5)


def test_train_step_compiles_once(on_2x4):
    tr, _ = on_2x4
    assert compile_count(tr.step_fn) == 1
    assert tr.step == STEPS


def test_optimizer_state_sharded_like_params(on_2x4):
    tr, _ = on_2x4
    specs = {
        jax.tree_util.keystr(k): v.sharding.spec for k, v in jax.tree_util.tree_leaves_with_path(tr.params)
    }
    adam = tr.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    for moments in (adam.mu, adam.nu):
        for k, v in jax.tree_util.tree_leaves_with_path(moments):
            assert v.sharding.spec == specs[jax.tree_util.keystr(k)], k


def test_batches_are_the_same_rows_on_every_mesh(corpus):
    a = data.train_batch(corpus.train, jaxtp.make_mesh("1x1"), B, S, 3, 7)
    b = data.train_batch(corpus.train, jaxtp.make_mesh("4x2"), B, S, 3, 7)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert b.sharding.spec == jax.sharding.PartitionSpec(("data",))
    assert a.shape == (B, S + 1) and len(b.addressable_shards) == 8
    assert b.addressable_shards[0].data.shape == (B // 4, S + 1)


def test_synthetic_corpus_reaches_its_entropy_floor(tiny, corpus):
    """An order-1 Markov source: the model must get within 0.1 nats/byte of the true entropy rate."""
    mesh = jaxtp.make_mesh("1x1")
    tc = train.TrainConfig(steps=300, batch_size=16, seq_len=32, lr=1e-2, warmup_steps=20)
    tr = train.Trainer.create(jaxtp.Transformer.create(tiny, mesh), tc)
    for i in range(tc.steps):
        tr.train_step(data.train_batch(corpus.train, mesh, tc.batch_size, tc.seq_len, 0, i))
    ev = train.evaluate(tr.model, data.eval_batches(corpus.heldout, mesh, 16, 32, max_batches=8))
    assert ev["loss"] - corpus.entropy_floor < 0.1, (ev, corpus.entropy_floor)
    # Evaluating again (as a run does every N steps) reuses the compiled program: no recompile.
    fn = train.eval_loss_fn(nnx.split(tr.model)[0])
    assert (
        train.evaluate(tr.model, data.eval_batches(corpus.heldout, mesh, 16, 32, max_batches=2))["loss"] > 0
    )
    assert compile_count(fn) == 1
    assert math.isclose(ev["bits_per_byte"], ev["loss"] / math.log(2))
    assert math.isclose(ev["perplexity"], math.exp(ev["loss"]))


def test_flops_formula_counts_matmul_params(tiny):
    f = train.train_flops_per_step(tiny, 2, 8)
    matmul = tiny.param_count() - tiny.V * tiny.D - (2 * tiny.L + 1) * tiny.D
    assert f == 6 * matmul * 16 + 12 * tiny.L * 2 * 64 * tiny.N * tiny.H
