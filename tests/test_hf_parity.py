"""jaxtp.hf.load against transformers, an implementation we did not write: logits and greedy generation.

One tiny checkpoint per supported variant (tests/hf_checkpoints.py): Llama with GQA and an untied head,
Llama 3.2-style tied embeddings with llama3 RoPE scaling, Mistral, Qwen2 (q/k/v biases, tied), Qwen3
(qk-norm, explicit head_dim). Error is max|jaxtp - transformers| / max|transformers| over the real vocab.
"""

import jax
import numpy as np
import pytest
from hf_tiny import VARIANTS, VOCAB, make_all

import jaxtp

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(300)

PROMPT_BS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{variant: (directory, torch model, its logits on PROMPT_BS)}, each built once."""
    with torch.no_grad():
        return {
            kind: (directory, model, model(torch.tensor(PROMPT_BS, dtype=torch.long)).logits.numpy())
            for kind, (directory, model) in make_all(tmp_path_factory.mktemp("hf")).items()
        }


def rel_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours)[..., :VOCAB] - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("mesh_spec", ["1x1", "2x4", "1x8"])
@pytest.mark.parametrize("kind", list(VARIANTS))
def test_logits_match_transformers(checkpoints, kind, mesh_spec):
    directory, _, ref = checkpoints[kind]
    model = jaxtp.hf.load(directory, jaxtp.make_mesh(mesh_spec))
    assert rel_error(model(jax.numpy.asarray(PROMPT_BS)), ref) < 1e-5


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_greedy_generation_matches_transformers(checkpoints, kind):
    directory, torch_model, _ = checkpoints[kind]
    model = jaxtp.hf.load(directory, jaxtp.make_mesh("2x4"))
    ours = jaxtp.generate(model, PROMPT_BS, max_new_tokens=32, temperature=0.0)
    with torch.no_grad():
        theirs = torch_model.generate(
            torch.tensor(PROMPT_BS, dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()[:, PROMPT_BS.shape[1] :]
    assert theirs.shape == (2, 32)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    "rules,mesh_spec,overrides",
    [
        ("megatron", "2x4", {"scan_layers": True}),
        ("megatron-sp", "2x4", {}),
        ("fsdp", "data=2,fsdp=2,model=2", {}),
    ],
)
def test_other_strategies_match_transformers(checkpoints, rules, mesh_spec, overrides):
    """Every new weight (tied table, biases, qk-norm scales) carries logical names, so every preset places it."""
    for kind in ("qwen2", "qwen3"):
        directory, _, ref = checkpoints[kind]
        model = jaxtp.hf.load(directory, jaxtp.make_mesh(mesh_spec), rules=rules, **overrides)
        assert rel_error(model(jax.numpy.asarray(PROMPT_BS)), ref) < 1e-5, kind


def test_tied_table_stays_vocab_parallel(checkpoints):
    """One [V, D] table split over `model`, read by the lookup and the head: no separate head kernel."""
    model = jaxtp.hf.load(checkpoints["qwen2"][0], jaxtp.make_mesh("2x4"))
    assert model.head is None
    table = model.embed.table[...]
    assert table.sharding.spec[0] == "model" and table.sharding.shard_shape(table.shape) == (VOCAB // 4, 64)
    row = jaxtp.param_table(model)
    assert row.total_params == model.cfg.param_count()
