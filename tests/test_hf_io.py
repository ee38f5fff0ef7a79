"""jaxtp.hf: export that transformers loads, precision on the way in, and one-line errors for bad checkpoints."""

import json
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hf_tiny import VARIANTS, VOCAB, make_all, make_checkpoint
from safetensors import safe_open
from safetensors.numpy import save_file

import jaxtp
from jaxtp.hf import CheckpointError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(300)

PROMPT_BS = np.random.default_rng(1).integers(3, VOCAB, size=(2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{variant: directory}, each built once."""
    return {kind: directory for kind, (directory, _) in make_all(tmp_path_factory.mktemp("hf")).items()}


@pytest.fixture(scope="module")
def mesh():
    return jaxtp.make_mesh("2x4")


def torch_logits(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(PROMPT_BS, dtype=torch.long)).logits.numpy(), model


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_save_then_transformers_loads_it(checkpoints, mesh, kind, tmp_path):
    """Small shards force the index path. The export is lossless: transformers computes bit-identical logits
    from it and from the source checkpoint; and those are within 1e-6 of the jaxtp model's (relative, in
    the Frobenius norm: the max-element error of two f32 implementations sits at ~1e-6 by itself)."""
    model = jaxtp.hf.load(checkpoints[kind], mesh)
    ours = np.asarray(model(jax.numpy.asarray(PROMPT_BS)))[..., :VOCAB]
    out = jaxtp.hf.save(model, tmp_path / "export", max_shard_bytes=64_000)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    theirs, loaded = torch_logits(out)
    np.testing.assert_array_equal(theirs, torch_logits(checkpoints[kind])[0])
    assert type(loaded).__name__ == VARIANTS[kind][1].replace("Mistral", "Llama")
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-6
    if model.cfg.tie_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_save_refuses_a_non_empty_directory(checkpoints, mesh, tmp_path):
    model = jaxtp.hf.load(checkpoints["llama"], mesh)
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        jaxtp.hf.save(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_bf16_checkpoint_loads_bit_identical(tmp_path, mesh):
    make_checkpoint("qwen3", tmp_path, dtype=torch.bfloat16)
    model = jaxtp.hf.load(tmp_path, mesh, precision="bf16")
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
        for name, ours in [
            ("model.layers.1.self_attn.o_proj.weight", model.blocks[1].attn.o.kernel),
            ("model.layers.0.self_attn.q_norm.weight", model.blocks[0].attn.q_norm.scale),
            ("model.embed_tokens.weight", model.embed.table),
        ]:
            ref = f.get_tensor(name)
            ours = np.asarray(ours[...])
            assert ours.dtype == ml_dtypes.bfloat16
            if ours.ndim == 3:  # o kernel [N, H, D] <- o_proj [D, N*H]
                ours = ours.reshape(-1, ours.shape[-1]).T
            np.testing.assert_array_equal(ours[: ref.shape[0]].view(np.uint16), ref.view(np.uint16))


@pytest.mark.parametrize("kind,mesh_spec", [("llama", "2x4"), ("qwen2", "1x8")])
def test_int8_streaming_equals_cast_after_load(checkpoints, kind, mesh_spec):
    """Row-parallel kernels (o, down) have their contracted axis split over devices: their scales still
    come from the whole channel, so every array (and its placement) equals cast(load(f32), "int8")."""
    mesh = jaxtp.make_mesh(mesh_spec)
    streamed = nnx.to_flat_state(nnx.state(jaxtp.hf.load(checkpoints[kind], mesh, precision="int8")))
    cast = dict(nnx.to_flat_state(nnx.state(jaxtp.cast(jaxtp.hf.load(checkpoints[kind], mesh), "int8"))))
    assert len(streamed) == len(cast)
    for path, var in streamed:
        ours, ref = var[...], cast[path][...]
        assert type(var) is type(cast[path]) and ours.dtype == ref.dtype, path
        assert ours.sharding.spec == ref.sharding.spec, path
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref), err_msg=str(path))


def test_config_alone_plans_without_weights(checkpoints, tmp_path):
    shutil.copy(checkpoints["llama32"] / "config.json", tmp_path / "config.json")
    cfg = jaxtp.hf.config(tmp_path)
    assert cfg.tie_embeddings and dict(cfg.rope_scaling)["rope_type"] == "llama3"
    plan = jaxtp.plan(cfg, "2x4", batch_size=8, seq_len=64)
    assert plan.model["param_count"] == cfg.param_count()


# ------------------------------------------------------------------------------------------ bad input


def broken_copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(directory, edit):
    """Load model.safetensors as numpy, apply `edit` to the dict, write it back."""
    file = directory / "model.safetensors"
    with safe_open(str(file), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def set_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


BAD = {
    "missing config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "missing weights": (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
    "architecture": (
        lambda d: set_config(d, architectures=["GPT2LMHeadModel"]),
        "not supported; jaxtp.hf loads LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
    ),
    "shape": (lambda d: set_config(d, intermediate_size=96), "has shape .* but config.json implies"),
    "dtype": (
        lambda d: rewrite_weights(
            d, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int32)})
        ),
        "dtype I32",
    ),
    "missing tensor": (
        lambda d: rewrite_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "lacks tensor 'model.layers.1.mlp.up_proj.weight'",
    ),
    "extra tensor": (
        lambda d: rewrite_weights(
            d, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((2, 2), np.float32)})
        ),
        "does not imply, e.g. 'model.layers.2.mlp.up_proj.weight'",
    ),
    "truncated": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
        "truncated",
    ),
    "corrupt header": (
        lambda d: (d / "model.safetensors").write_bytes(
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!" + b"\x00" * 64
        ),
        "truncated or corrupt",
    ),
    "sliding window": (
        lambda d: set_config(d, sliding_window=64, use_sliding_window=True),
        "sliding_window=64",
    ),
    "rope type": (
        lambda d: set_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
        "rope_type 'yarn' is not supported",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_one_line_error(checkpoints, mesh, tmp_path, case):
    edit, message = BAD[case]
    directory = broken_copy(checkpoints["llama"], tmp_path / "ckpt")
    edit(directory)
    with pytest.raises(CheckpointError, match=message) as e:
        jaxtp.hf.load(directory, mesh)
    assert "\n" not in str(e.value)


def test_pickle_checkpoint_is_refused_unopened(tmp_path, mesh, checkpoints):
    """A .bin is a pickle: loading it could run code. It is refused by name, never opened."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    shutil.copy(checkpoints["llama"] / "config.json", directory)
    canary = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (canary,))

    torch.save({"x": Payload()}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*safetensors"):
        jaxtp.hf.load(directory, mesh)
    assert not canary.exists()


def test_heads_the_model_axis_cannot_split_name_working_meshes(checkpoints):
    with pytest.raises(ValueError, match=r"n_heads=8 .*meshes that work with 3 devices: 3x1"):
        jaxtp.hf.load(checkpoints["llama"], jaxtp.make_mesh("1x3"))


def test_prompt_longer_than_context(checkpoints, mesh):
    model = jaxtp.hf.load(checkpoints["llama"], mesh, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=16"):
        jaxtp.generate(model, np.ones((2, 14), np.int32), max_new_tokens=4)


@pytest.mark.parametrize("kind", ["llama32", "qwen2", "qwen3"])
def test_new_weights_cast_and_checkpoint(checkpoints, mesh, kind, tmp_path):
    """Tied tables, biases, qk-norm scales and rope scaling go through cast and Orbax checkpoints like any weight."""
    model = jaxtp.hf.load(checkpoints[kind], mesh)
    tokens = jax.numpy.asarray(PROMPT_BS)
    ref = np.asarray(model(tokens))
    for precision in ("bf16", "int8", "w8a8"):
        out = np.asarray(jaxtp.cast(model, precision)(tokens), np.float32)
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 5e-2, precision
    jaxtp.save(tmp_path / "ckpt", model)
    restored = jaxtp.load(tmp_path / "ckpt", jaxtp.make_mesh("1x8"))
    assert restored.cfg == model.cfg
    np.testing.assert_allclose(np.asarray(restored(tokens)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh_spec", ["2x4", "1x8"])
def test_each_element_is_read_once(checkpoints, mesh_spec, monkeypatch):
    """Shards are read by rows, a column-split tensor's rows once for all its devices, and replicas (the data
    axis) share a read: the bytes read from the files equal the file's tensor bytes whatever the mesh. (Only
    addressable devices are read for, so each process of a multi-process run reads its own devices' slices.)"""
    from jaxtp.hf.files import RowReader

    read, read_into = [], RowReader.read_into
    monkeypatch.setattr(
        RowReader,
        "read_into",
        lambda self, info, offset, view: read.append(len(view)) or read_into(self, info, offset, view),
    )
    jaxtp.hf.load(checkpoints["llama"], jaxtp.make_mesh(mesh_spec))
    with safe_open(str(checkpoints["llama"] / "model.safetensors"), framework="numpy") as f:
        file_bytes = sum(
            f.get_slice(k).get_shape()[0] * int(np.prod(f.get_slice(k).get_shape()[1:])) * 4 for k in f.keys()
        )
    assert sum(read) == file_bytes


def test_replicas_never_share_memory(checkpoints, mesh):
    """On CPU a device adopts its shard's host buffer without a copy; replicas (the data axis of 2x4) must
    still get buffers of their own, since a donated buffer is written in place."""
    model = jaxtp.hf.load(checkpoints["llama"], mesh)
    for leaf in jax.tree.leaves(nnx.state(model)):
        pointers = [s.data.unsafe_buffer_pointer() for s in leaf.addressable_shards]
        assert len(set(pointers)) == len(pointers)


def test_tensor_bytes_that_do_not_fit_its_shape_are_refused(checkpoints, mesh, tmp_path):
    directory = broken_copy(checkpoints["llama"], tmp_path / "ckpt")
    file = directory / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = "model.norm.weight"
    header[name]["shape"] = [header[name]["shape"][0] - 1]  # one element short of its bytes
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    file.write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(CheckpointError, match="is corrupt: tensor 'model.norm.weight'") as e:
        jaxtp.hf.load(directory, mesh)
    assert "\n" not in str(e.value)
