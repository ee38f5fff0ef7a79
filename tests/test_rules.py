"""The rules table: resolution, validation messages, kv replication, vocab padding."""

import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import jaxtp
from jaxtp.sharding import MEGATRON, resolve_rules, spec_for


def test_megatron_specs_on_2x4(tiny):
    rules = resolve_rules(tiny, jaxtp.make_mesh("2x4"))
    assert spec_for(("embed", "heads", "head_dim"), rules) == P(None, "model", None)
    assert spec_for(("mlp", "embed"), rules) == P("model", None)
    assert spec_for(("batch", "seq", "vocab"), rules) == P("data", None, "model")
    assert rules["kv_heads"] == "model"  # 4 kv heads split over model axis 4


def test_kv_heads_replicate_when_fewer_than_model_axis(tiny):
    assert resolve_rules(tiny, jaxtp.make_mesh("1x8"))["kv_heads"] is None  # 4 < 8: each kv head on 2 ranks
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        resolve_rules(tiny.replace(n_heads=6, n_kv_heads=3, d_model=48, d_ff=96), jaxtp.make_mesh("1x2"))


def test_unknown_logical_name_and_collision_raise(tiny):
    rules = resolve_rules(tiny, jaxtp.make_mesh("2x4"))
    with pytest.raises(ValueError, match="unknown logical axis 'experts'"):
        spec_for(("embed", "experts"), rules)
    with pytest.raises(ValueError, match="both map to mesh axis 'model'"):
        spec_for(("heads", "mlp"), rules)
    with pytest.raises(ValueError, match="unknown logical axes"):
        resolve_rules(tiny, jaxtp.make_mesh("2x4"), {**MEGATRON, "experts": "model"})
    with pytest.raises(ValueError, match="unknown rules preset"):
        resolve_rules(tiny, jaxtp.make_mesh("2x4"), "zero-9")


def test_indivisible_heads_message_names_everything(tiny):
    cfg = tiny.replace(n_heads=6, n_kv_heads=6, d_model=48)
    with pytest.raises(ValueError) as e:
        jaxtp.Transformer.create(cfg, jaxtp.make_mesh("2x4"))
    msg = str(e.value)
    for part in ("n_heads=6", "'heads'", "'model'", "size 4", "meshes that work with 8 devices: 8x1, 4x2"):
        assert part in msg, (part, msg)


def test_indivisible_d_ff(tiny):
    with pytest.raises(
        ValueError, match=r"d_ff=100 \(logical axis 'mlp'\) is not divisible by mesh axis 'model' of size 8"
    ):
        resolve_rules(tiny.replace(d_ff=100), jaxtp.make_mesh("1x8"))


def test_vocab_padding_never_wins(tiny):
    cfg = tiny.replace(vocab_size=250)
    mesh = jaxtp.make_mesh("2x4")
    model = jaxtp.Transformer.create(cfg, mesh)
    assert model.padded_vocab == 252
    assert model.embed.table.shape == (252, cfg.d_model)
    model.head.kernel[...] = model.head.kernel[...].at[:, 250:].set(100.0)  # make padding tempting
    logits = model(jnp.zeros((2, 8), jnp.int32))
    assert logits.shape[-1] == 252
    assert int(jnp.max(jnp.argmax(logits, -1))) < 250
