"""Trainer(loss_fn=...) on a user's own NNX model: a sequence classifier made of jaxtp layers and an
nnx.Linear head. Same guarantees as the LM: same losses on every mesh, Adam moments sharded like their
parameters, one compile, donated buffers - and the same numbers as plain nnx.Optimizer + nnx.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxtp
from jaxtp import train
from jaxtp.loss import cross_entropy
from jaxtp.measure import compile_count

pytestmark = pytest.mark.timeout(300)

STEPS, B, S, CLASSES = 5, 16, 16, 8
CFG = jaxtp.ModelConfig.preset("tiny").replace(n_layers=1)
TC = train.TrainConfig(steps=STEPS, lr=2e-2, warmup_steps=1, clip_norm=0.25)  # clips steps 3-5


class Classifier(nnx.Module):
    """tokens [B, S] -> class logits [B, C]: jaxtp Embed + Block, mean pool, an nnx.Linear head whose
    kernel names its axes for jaxtp's rules (classes split over `model`, like a vocab-parallel head).
    It has no `cfg` or `layout` attribute: the Trainer must not need one."""

    def __init__(self, layout, rngs):
        self.embed = jaxtp.Embed(CFG, CFG.vocab_size, layout, rngs=rngs)
        self.block = jaxtp.Block(CFG, layout, rngs=rngs)
        self.head = nnx.Linear(
            CFG.d_model,
            CLASSES,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("embed", "vocab")),
        )

    def __call__(self, tokens_BS):
        positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1], dtype=jnp.int32), tokens_BS.shape)
        return self.head(self.block(self.embed(tokens_BS), positions_BS).mean(axis=1))


def build(mesh):
    """The classifier built in its shards by jaxtp.create; mesh None: unsharded, on one device."""
    if mesh is None:
        with nnx.use_eager_sharding(False):
            return Classifier(None, nnx.Rngs(0))
    return jaxtp.create(lambda rngs: Classifier(None, rngs), mesh)


def batch(mesh, i):
    """{"tokens": [B, S], "label": [B]} for step i (same rows on every mesh), batch over `data`: class c
    draws its tokens from the c-th eighth of the vocabulary."""
    rng = np.random.default_rng(i)
    label = rng.integers(0, CLASSES, B, dtype=np.int32)
    tokens = label[:, None] * (CFG.vocab_size // CLASSES) + rng.integers(0, CFG.vocab_size // CLASSES, (B, S))
    b = {"tokens": tokens.astype(np.int32), "label": label}
    return b if mesh is None else jax.device_put(b, NamedSharding(mesh, P("data")))


def loss_with_accuracy(model, b):
    logits_BC = model(b["tokens"])
    return cross_entropy(logits_BC, b["label"]), {
        "accuracy": jnp.mean(jnp.argmax(logits_BC, -1) == b["label"])
    }


def loss_only(model, b):
    return cross_entropy(model(b["tokens"]), b["label"])


def run(spec, loss_fn=loss_with_accuracy):
    mesh = None if spec is None else jaxtp.make_mesh(spec)
    model = build(mesh)
    old = jax.tree.leaves(nnx.state(model, nnx.Param))
    tr = train.Trainer.create(model, TC, loss_fn=loss_fn)
    metrics = [tr.train_step(batch(mesh, i)) for i in range(STEPS)]
    return tr, [float(m["loss"]) for m in metrics], metrics, old


@pytest.fixture(scope="module")
def reference():
    return run("1x1")


@pytest.fixture(scope="module")
def on_2x4():
    return run("2x4")


def test_same_losses_on_every_mesh(reference, on_2x4):
    assert reference[1][-1] < reference[1][0] - 0.3  # it learns
    np.testing.assert_allclose(on_2x4[1], reference[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run("8x1")[1], reference[1], rtol=1e-5, atol=1e-5)


def test_scalar_loss_fn_on_an_unsharded_model(reference):
    """loss_fn may return a bare scalar; params on one device (no mesh) train the same."""
    tr, losses, metrics, _ = run(None, loss_only)
    np.testing.assert_allclose(losses, reference[1], rtol=1e-5, atol=1e-5)
    assert set(metrics[0]) == {"loss", "grad_norm"}
    assert compile_count(tr.step_fn) == 1


def test_aux_metrics_are_returned(on_2x4):
    m = on_2x4[2][-1]
    assert set(m) == {"loss", "grad_norm", "accuracy"}
    assert 0.0 <= float(m["accuracy"]) <= 1.0 and float(m["grad_norm"]) > 0


def test_adam_moments_sharded_like_params(on_2x4):
    tr = on_2x4[0]
    specs = {
        jax.tree_util.keystr(k): v.sharding.spec for k, v in jax.tree_util.tree_leaves_with_path(tr.params)
    }
    assert specs["['head']['kernel'].value"] == P(None, "model")  # the user's head is split, not replicated
    assert any("model" in str(s) for k, s in specs.items() if k.startswith("['block']"))
    adam = tr.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    for moments in (adam.mu, adam.nu):
        got = {
            jax.tree_util.keystr(k): v.sharding.spec for k, v in jax.tree_util.tree_leaves_with_path(moments)
        }
        assert got == specs


def test_step_compiles_once(on_2x4):
    tr = on_2x4[0]
    assert tr.step == STEPS and compile_count(tr.step_fn) == 1


def test_old_param_buffers_are_donated(on_2x4):
    tr, _, _, old = on_2x4
    assert old and all(x.is_deleted() for x in old)
    assert not any(x.is_deleted() for x in jax.tree.leaves(tr.params))


def test_same_losses_as_plain_nnx_optimizer(on_2x4):
    """nnx.Optimizer + nnx.jit with optax.adamw configured as TrainConfig does it: the same warmup+cosine
    schedule (train.schedule: warmup from lr 0, so step 1 moves nothing), global-norm clipping first (it
    clips here: asserted), weight decay on matrices only (ndim >= 2: train.decays). Leaving out the mask
    or the clipping changes these losses by 2e-3 and 1e-2, far above the tolerance."""
    mesh = jaxtp.make_mesh("2x4")
    model = build(mesh)
    tx = optax.chain(
        optax.clip_by_global_norm(TC.clip_norm),
        optax.adamw(
            train.schedule(TC),
            b1=TC.b1,
            b2=TC.b2,
            weight_decay=TC.weight_decay,
            mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
        ),
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, b):
        (loss, _), grads = nnx.value_and_grad(loss_with_accuracy, has_aux=True)(model, b)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, batch(mesh, i))) for i in range(STEPS)]
    assert max(float(m["grad_norm"]) for m in on_2x4[2]) > TC.clip_norm
    np.testing.assert_allclose(losses, on_2x4[1], rtol=1e-5, atol=1e-5)


def test_params_on_mixed_placements_are_an_error():
    mesh = jaxtp.make_mesh("2x4")
    model = build(mesh)
    model.head.bias = nnx.Param(jax.device_put(np.zeros(CLASSES, np.float32), jax.devices()[0]))
    with pytest.raises(ValueError, match=r"one mesh.*\['head'\]\['bias'\]"):
        train.Trainer.create(model, TC, loss_fn=loss_only)
