"""Orbax checkpoints: reshard on load, exact resume after SIGKILL, half-written and corrupted checkpoints."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import batch_tokens, reference_losses, subprocess_env
from flax import nnx

import jaxtp
from jaxtp import checkpoint, data, train

pytestmark = pytest.mark.timeout(420)
ROOT = pathlib.Path(__file__).resolve().parent.parent


def flat(model):
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    model = jaxtp.Transformer.create(tiny, jaxtp.make_mesh("2x4"), seed=5)
    path = checkpoint.save(tmp_path_factory.mktemp("ck") / "model", model)
    tokens = np.asarray(batch_tokens(jaxtp.make_mesh("1x1"))[:, :-1])
    return model, path, tokens, np.asarray(model(tokens))


@pytest.mark.parametrize("spec", ["2x4", "4x2", "1x8", "1x1", "8x1"])
def test_save_on_2x4_load_anywhere(saved, spec):
    """Parameters come back bit-identical on any mesh; logits are identical on the saving mesh and equal
    up to float reduction order (1e-6 relative) on others."""
    model, path, tokens, logits = saved
    loaded = checkpoint.load(path, jaxtp.make_mesh(spec))
    want = flat(model)
    for k, v in flat(loaded).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    assert dict(loaded.blocks[0].mlp.up.kernel[...].sharding.mesh.shape) == dict(jaxtp.make_mesh(spec).shape)
    got = np.asarray(loaded(tokens))
    if spec == "2x4":
        np.testing.assert_array_equal(got, logits)
    assert np.max(np.abs(got - logits)) <= 1e-6 * np.max(np.abs(logits))


def test_save_refuses_to_overwrite(saved):
    model, path, _, _ = saved
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save(path, model)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_cast_models_export_and_generate_the_same(saved, tmp_path, precision):
    model, _, tokens, _ = saved
    cast = jaxtp.cast(model, precision)
    path = checkpoint.save(tmp_path / precision, cast)
    on_disk = ocp.StandardCheckpointer().metadata(path / "state")
    tree = getattr(on_disk, "item_metadata", on_disk)
    dtypes = {str(m.dtype) for m in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "dtype"))}
    assert ("int8" in dtypes) == (precision == "int8") and ("bfloat16" in dtypes) == (precision == "bf16")
    loaded = checkpoint.load(path, jaxtp.make_mesh("1x8"))
    assert jaxtp.quant.precision_of(loaded) == precision
    prompt = tokens[:, :4]
    a = jaxtp.generate(cast, prompt, 6, temperature=0)
    b = jaxtp.generate(loaded, prompt, 6, temperature=0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_and_corrupted_checkpoints_fail_in_one_line(saved, tmp_path):
    model, path, _, _ = saved
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "nope", jaxtp.make_mesh("1x1"))
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    for f in (broken / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])  # truncate the array data
    with pytest.raises(ValueError, match="truncated, corrupted or incompatible") as e:
        checkpoint.load(broken, jaxtp.make_mesh("1x1"))
    assert "\n" not in str(e.value)
    (broken / "meta" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match="not a complete jaxtp checkpoint"):
        checkpoint.load(broken, jaxtp.make_mesh("1x1"))


def test_checkpoint_files_hold_no_pickle(saved):
    _, path, _, _ = saved
    for f in path.rglob("*"):
        if f.is_file():
            assert not f.read_bytes().startswith(b"\x80"), f"{f} looks like a pickle"


# --- train-state checkpoints through run.py ------------------------------------------------------

ARGS = [
    "--model",
    "tiny",
    "--steps",
    "12",
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--data",
    "synthetic",
    "--sample-len",
    "4",
    "--checkpoint-every",
    "4",
    "--keep",
    "2",
    "--lean",
]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "out"
    env = subprocess_env()
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "run.py"), *ARGS, "--mesh", "2x4", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    for line in p.stdout:
        if "checkpoint saved at step 8" in line:
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert not (out / "report.json").exists()
    return out, env


def resume(out, env, *extra):
    """`run.py ... --mesh 2x4 --out OUT --resume [extra]` in a fresh process, its output captured."""
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "run.py"),
            *ARGS,
            "--mesh",
            "2x4",
            "--out",
            str(out),
            "--resume",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )


def test_resume_after_sigkill_is_exact(tiny, killed_run):
    out, env = killed_run
    # A half-written checkpoint (what a kill during a save leaves) must be ignored by --resume.
    (out / "checkpoints" / "12.orbax-checkpoint-tmp-1234").mkdir()
    (out / "checkpoints" / "12.orbax-checkpoint-tmp-1234" / "junk").write_text("partial")
    proc = resume(out, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from step 8" in proc.stdout
    losses = json.loads((out / "report.json").read_text())["loss"]
    assert len(losses) == 12
    assert losses == reference_losses(tiny, "2x4")  # bit-identical on the same mesh


def test_resume_on_another_mesh_within_1e6(tiny, killed_run):
    out, _ = killed_run
    ref = reference_losses(tiny, "2x4")
    mesh = jaxtp.make_mesh("4x2")
    corpus = data.load_corpus("synthetic")
    tc = train.TrainConfig(steps=12, batch_size=8, seq_len=32, lr=3e-3)
    tr = train.Trainer.create(
        jaxtp.Transformer.create(tiny, mesh, seed=1), tc
    )  # other seed: restore must win
    ckpts = checkpoint.TrainCheckpoints(out / "checkpoints")
    step, tr.params, tr.opt_state, meta = ckpts.restore(tr.params, tr.opt_state, step=8)
    ckpts.close()
    assert meta["loss"] == ref[:8]
    got = [
        float(tr.train_step(data.train_batch(corpus.train, mesh, 8, 32, 0, i))["loss"]) for i in range(8, 12)
    ]
    np.testing.assert_allclose(got, ref[8:], rtol=0, atol=1e-6)


def test_resume_with_another_config_is_refused(killed_run):
    out, env = killed_run
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = resume(out, env, "--lr", "0.01")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "different train" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
