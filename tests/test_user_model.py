"""A user's own NNX model built from jaxtp layers, sharded by the rules table both ways a Flax user builds:
`jaxtp.create` (inside jit, straight into shards) and Flax's convention (`jax.set_mesh` + `jaxtp.axis_rules`,
eager sharding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxtp

pytestmark = pytest.mark.timeout(300)

CFG = jaxtp.ModelConfig.preset("tiny")  # 8 heads, 4 kv heads (replicated on 1x8), d_ff 128
CLASSES = 3


class Classifier(nnx.Module):
    """Embed -> 2 Blocks -> RMSNorm -> mean over positions -> nnx.Linear head (no logical names: replicated)."""

    def __init__(self, rngs: nnx.Rngs, n_blocks: int = 2):
        self.embed = jaxtp.Embed(CFG, rngs=rngs)
        self.blocks = nnx.List([jaxtp.Block(CFG, None, rngs) for _ in range(n_blocks)])
        self.norm = jaxtp.RMSNorm(CFG)
        self.head = nnx.Linear(CFG.d_model, CLASSES, rngs=rngs)

    def __call__(self, tokens_BS):
        B, S = tokens_BS.shape
        positions_BS = jnp.broadcast_to(jnp.arange(S), (B, S))
        x_BSD = self.embed(tokens_BS)
        for block in self.blocks:
            x_BSD = block(x_BSD, positions_BS)
        return self.head(jnp.mean(self.norm(x_BSD), axis=1))


class UserMLP(nnx.Module):
    """A user's own layer, annotated with jaxtp's logical names through Flax's own initialiser wrapper."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.up = nnx.Param(nnx.with_partitioning(init, ("embed", "mlp"))(rngs.params(), (64, 128)))
        self.down = nnx.Param(nnx.with_partitioning(init, ("mlp", "embed"))(rngs.params(), (128, 64)))


def flat(model):
    return {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module", params=["2x4", "1x8"])
def both_paths(request):
    mesh = jaxtp.make_mesh(request.param)
    created = jaxtp.create(lambda rngs: Classifier(rngs), mesh, rules="megatron", seed=0)
    with jax.set_mesh(mesh), jaxtp.axis_rules(mesh, "megatron"):
        eager = Classifier(nnx.Rngs(0))
    return request.param, mesh, created, eager


def test_both_paths_give_identical_values_and_placements(both_paths):
    spec, _, created, eager = both_paths
    a, b = flat(created), flat(eager)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=path)
        assert a[path].sharding.is_equivalent_to(b[path].sharding, a[path].ndim), (
            path,
            a[path].sharding,
            b[path].sharding,
        )
    q = a["blocks/0/attn/q/kernel"]
    assert q.sharding.spec == P(None, "model", None) and q.sharding.shard_shape(q.shape)[1] == 8 // int(
        spec[-1]
    )
    k = a[
        "blocks/0/attn/k/kernel"
    ]  # 4 kv heads: split on 2x4, replicated on 1x8 (checked against the config)
    assert k.sharding.spec == (P(None, "model", None) if spec == "2x4" else P(None, None, None))
    assert a["head/kernel"].sharding.spec == P()  # no logical names: replicated


def test_created_init_never_holds_a_whole_weight(both_paths):
    """The compiled init's HLO holds per-shard shapes only: no [64, 8, 8] q kernel or [128, 64] down kernel."""
    _, mesh, _, _ = both_paths
    hlo = jaxtp.build.lower_init(lambda rngs: Classifier(rngs), mesh)[1].compile().as_text()
    model_axis = dict(mesh.shape)["model"]
    assert f"f32[64,{8 // model_axis},8]" in hlo and "f32[64,8,8]" not in hlo
    assert f"f32[{128 // model_axis},64]" in hlo and "f32[128,64]" not in hlo


def test_each_block_costs_megatrons_collectives():
    """Per block: 2 model-axis all-reduces forward, 4 forward+backward (count(L=2) - count(L=1)), on 2x4."""
    mesh = jaxtp.make_mesh("2x4")
    tokens = jax.device_put(np.ones((8, 16), np.int32), jax.sharding.NamedSharding(mesh, P("data")))
    counts = {}
    for n_blocks in (1, 2):
        model = jaxtp.create(lambda rngs: Classifier(rngs, n_blocks), mesh)
        fwd = jaxtp.collectives(lambda m, t: m(t), model, tokens).summary()
        grad = jaxtp.collectives(lambda m, t: nnx.grad(lambda m: jnp.sum(m(t)))(m), model, tokens).summary()
        counts[n_blocks] = (
            fwd.get("all-reduce@model", {}).get("count", 0),
            grad.get("all-reduce@model", {}).get("count", 0),
        )
    assert counts[2][0] - counts[1][0] == 2
    assert counts[2][1] - counts[1][1] == 4


@pytest.mark.parametrize("rules,spec", [("megatron", P(None, "model")), ("fsdp", P("fsdp", "model"))])
def test_users_own_layer_follows_the_table(rules, spec):
    mesh = jaxtp.make_mesh("data=2,fsdp=2,model=2")
    model = jaxtp.create(UserMLP, mesh, rules=rules)
    assert model.up[...].sharding.spec == spec


def test_bare_set_mesh_names_the_fix():
    mesh = jaxtp.make_mesh("2x4")
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"jaxtp.axis_rules\(mesh, rules\)") as e:
        Classifier(nnx.Rngs(0))
    assert "\n" not in str(e.value)


def test_unknown_name_and_indivisible_dimension_in_a_users_layer():
    mesh = jaxtp.make_mesh("2x4")

    class Odd(nnx.Module):
        def __init__(self, rngs, names, shape):
            self.w = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, names)(rngs.params(), shape))

    with pytest.raises(ValueError, match="unknown logical axis 'experts'"):
        jaxtp.create(lambda rngs: Odd(rngs, ("embed", "experts"), (64, 8)), mesh)
    with pytest.raises(
        ValueError,
        match=r"w: dimension 1 \(logical axis 'mlp', size 6\) is not divisible by mesh "
        r"axis 'model' of size 4",
    ):
        jaxtp.create(lambda rngs: Odd(rngs, ("embed", "mlp"), (64, 6)), mesh)


class Encoder(nnx.Module):
    """Embed -> 2 bidirectional Blocks (no positions passed: 0..S-1 by default)."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = jaxtp.Embed(CFG, rngs=rngs)
        self.blocks = nnx.List([jaxtp.Block(CFG, rngs=rngs, causal=False) for _ in range(2)])

    def __call__(self, tokens_BS, mask_BST=None):
        x_BSD = self.embed(tokens_BS)
        for block in self.blocks:
            x_BSD = block(x_BSD, mask_BST=mask_BST)
        return x_BSD


def test_non_causal_encoder_is_mesh_invariant_and_bidirectional():
    tokens = np.random.default_rng(0).integers(0, 256, (8, 12)).astype(np.int32)
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % 256
    one = jaxtp.create(Encoder, jaxtp.make_mesh("1x1"))
    out_1x1, out_changed = np.asarray(one(tokens)), np.asarray(one(changed))
    np.testing.assert_allclose(
        np.asarray(jaxtp.create(Encoder, jaxtp.make_mesh("2x4"))(tokens)), out_1x1, rtol=1e-5, atol=1e-5
    )
    assert np.abs(out_changed[:, 0] - out_1x1[:, 0]).max() > 1e-4  # the first position sees the last token
    # A mask that hides the last key from every query makes the other positions blind to it again.
    mask_BST = np.ones((1, 12, 12), bool)
    mask_BST[..., -1] = False
    np.testing.assert_allclose(
        np.asarray(one(changed, mask_BST))[:, :-1],
        np.asarray(one(tokens, mask_BST))[:, :-1],
        rtol=1e-6,
        atol=1e-6,
    )


def test_table_cast_and_checkpoint_take_a_users_model(tmp_path):
    mesh = jaxtp.make_mesh("2x4")
    created = jaxtp.create(Classifier, mesh)
    table = jaxtp.param_table(created)
    assert table.total_params == sum(int(np.prod(v.shape)) for v in flat(created).values())
    tokens = jax.device_put(np.ones((8, 16), np.int32), jax.sharding.NamedSharding(mesh, P("data")))
    ref = np.asarray(created(tokens))
    int8 = jaxtp.cast(created, "int8")
    q = int8.blocks[0].attn.o.kernel[...]
    assert q.dtype == jnp.int8 and q.sharding.spec == P("model", None, None)
    np.testing.assert_allclose(np.asarray(int8(tokens)), ref, rtol=0.05, atol=0.05)
    jaxtp.save(tmp_path / "ckpt", created)
    with pytest.raises(ValueError, match="pass build=lambda rngs"):
        jaxtp.load(tmp_path / "ckpt", jaxtp.make_mesh("1x8"))
    restored = jaxtp.load(tmp_path / "ckpt", jaxtp.make_mesh("1x8"), build=Classifier)
    assert restored.blocks[0].attn.k.kernel[...].sharding.spec == P(None, None, None)  # 1x8: kv replicated
    np.testing.assert_allclose(np.asarray(restored(np.ones((8, 16), np.int32))), ref, rtol=1e-5, atol=1e-6)


def test_layers_from_their_own_dimensions():
    """A Block needs only the sizes it uses, as keywords; the same as a ModelConfig with those sizes."""
    dims = dict(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)
    block = jaxtp.Block(rngs=nnx.Rngs(0), **dims)
    same = jaxtp.Block(jaxtp.ModelConfig(**dims), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(block(x)), np.asarray(same(x)))
    assert block.attn.q.kernel[...].shape == (32, 4, 8) and block.mlp.up.kernel[...].shape == (32, 64)
    assert jaxtp.Attention(rngs=nnx.Rngs(0), causal=False, **dims).causal is False
    with pytest.raises(TypeError, match=r"MLP needs rngs"):
        jaxtp.MLP(**dims)


def test_classifier_trains_alike_on_every_mesh_with_trainer_and_nnx_optimizer():
    """The classifier, on 1x1, 2x4 and 8x1: Trainer(loss_fn=...) and nnx.Optimizer + nnx.jit (the same optax
    transformation) give the same losses within 1e-5."""
    from jaxtp import train
    from jaxtp.loss import cross_entropy

    tc = train.TrainConfig(steps=4, lr=2e-3, warmup_steps=1)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, (4, 8)).astype(np.int32)  # class c draws its tokens from the c-th third
    tokens = (labels[..., None] * (256 // CLASSES) + rng.integers(0, 256 // CLASSES, (4, 8, 16))).astype(
        np.int32
    )
    loss_fn = lambda model, b: cross_entropy(model(b["tokens"]), b["label"])

    @nnx.jit
    def step(model, opt, b):
        loss, grads = nnx.value_and_grad(loss_fn)(model, b)
        opt.update(model, grads)
        return loss

    runs = {}
    for spec in ("1x1", "2x4", "8x1"):
        mesh = jaxtp.make_mesh(spec)
        batches = [
            jax.device_put({"tokens": t, "label": y}, jax.sharding.NamedSharding(mesh, P("data")))
            for t, y in zip(tokens, labels)
        ]
        trainer = train.Trainer.create(jaxtp.create(Classifier, mesh), tc, loss_fn=loss_fn)
        model = jaxtp.create(Classifier, mesh)
        opt = nnx.Optimizer(model, train.make_optimizer(tc), wrt=nnx.Param)
        runs[spec] = (
            [float(trainer.train_step(b)["loss"]) for b in batches],
            [float(step(model, opt, b)) for b in batches],
        )
    for spec, (with_trainer, with_nnx) in runs.items():
        np.testing.assert_allclose(with_trainer, runs["1x1"][0], rtol=1e-5, atol=1e-5, err_msg=spec)
        np.testing.assert_allclose(with_nnx, runs["1x1"][0], rtol=1e-5, atol=1e-5, err_msg=spec)
    assert runs["1x1"][0][-1] < runs["1x1"][0][0]
