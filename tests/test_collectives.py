"""The TP contract read from compiled HLO: per layer (L=2 minus L=1) on 2x4."""

import jax
import pytest
from conftest import batch_tokens
from flax import nnx

import jaxtp

pytestmark = pytest.mark.timeout(300)


def forward_and_train_collectives(cfg, spec):
    mesh = jaxtp.make_mesh(spec)
    model = jaxtp.Transformer.create(cfg, mesh)
    tokens = batch_tokens(mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(params, tokens):
        return nnx.merge(graphdef, params, rest)(tokens[:, :-1])

    def grads(params, tokens):
        return jax.grad(lambda p: jaxtp.loss.lm_loss(nnx.merge(graphdef, p, rest), tokens))(params)

    return jaxtp.collectives(forward, params, tokens), jaxtp.collectives(grads, params, tokens)


@pytest.fixture(scope="module")
def per_layer(tiny):
    fwd1, bwd1 = forward_and_train_collectives(tiny.replace(n_layers=1), "2x4")
    fwd2, bwd2 = forward_and_train_collectives(tiny.replace(n_layers=2), "2x4")
    return fwd2 - fwd1, bwd2 - bwd1, fwd2


def test_forward_two_model_all_reduces_per_layer(per_layer):
    fwd, _, _ = per_layer
    assert fwd["all-reduce@model"]["count"] == 2
    assert all(v["count"] == 0 for k, v in fwd.items() if k != "all-reduce@model")


def test_forward_has_no_all_gather(per_layer):
    _, _, fwd2 = per_layer
    for kind in ("all-gather", "all-to-all", "reduce-scatter"):
        assert fwd2.count(kind) == 0, fwd2.summary()


def test_forward_backward_four_model_all_reduces_per_layer(per_layer):
    _, bwd, _ = per_layer
    assert bwd["all-reduce@model"]["count"] == 4, bwd
    assert all(v["count"] == 0 for k, v in bwd.items() if k not in ("all-reduce@model", "all-reduce@data")), (
        bwd
    )


def test_per_layer_bytes_are_activation_sized(tiny, per_layer):
    fwd, _, _ = per_layer
    B_local, S = 8 // 2, 16
    assert fwd["all-reduce@model"]["bytes"] == 2 * B_local * S * tiny.d_model * 4


def test_replicated_kv_heads_on_1x8(tiny):
    """K=4 < model axis 8: each rank projects k/v for its own query head from the replicated kv kernels
    (layers.Attention.stacked_qkv_kernel), so the step has Megatron's collectives and no others: per layer
    2 all-reduces forward and 4 forward+backward, no all-gather, and the kv weight gradients (2 per layer,
    [D, K, H] f32) summed over the model axis inside an op that exists anyway."""
    fwd1, bwd1 = forward_and_train_collectives(tiny.replace(n_layers=1), "1x8")
    fwd2, bwd2 = forward_and_train_collectives(tiny.replace(n_layers=2), "1x8")
    fwd, bwd = fwd2 - fwd1, bwd2 - bwd1
    assert {k: v["count"] for k, v in fwd.items() if v["count"]} == {"all-reduce@model": 2}
    assert {k: v["count"] for k, v in bwd.items() if v["count"]} == {"all-reduce@model": 4}
    assert bwd2.count("all-gather") == 0, bwd2.summary()
    B, S, L, D = 8, 16, 2, tiny.d_model
    BSD, BS = B * S * D * 4, B * S * 4
    # embedding, 2L forward, the head's input-gradient, 3L backward (MLP gate+up, fused q/k/v); loss max+sum
    activations = (1 + 2 * L + 1 + 3 * L) * BSD + 2 * BS
    assert bwd2.bytes("all-reduce", "model") == activations + L * 2 * D * tiny.K * tiny.H * 4
