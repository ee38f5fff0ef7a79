"""Multi-process runs on jax.distributed (CPU, gloo): one 2x4 mesh over 2 processes x 4 devices."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import reference_losses, subprocess_env

import jaxtp
from jaxtp import checkpoint, data, train
from jaxtp.distributed import free_port

pytestmark = pytest.mark.timeout(420)
ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = str(ROOT / "experiments" / "run.py")
ARGS = [
    "--model",
    "tiny",
    "--mesh",
    "2x4",
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--data",
    "synthetic",
    "--sample-len",
    "4",
    "--lean",
]
ENV = subprocess_env()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny):
    """Steps 0-3 in this (single) process, checkpointed; `run.py --processes 2 --resume` finishes the
    12-step run, checkpointing every 4 steps: one launch covers both directions of resuming. `--processes=2`
    here, `--processes 2` in test_launcher_stops_the_others_when_one_dies: both spellings launch."""
    out = tmp_path_factory.mktemp("mp") / "out"
    mesh = jaxtp.make_mesh("2x4")
    corpus = data.load_corpus("synthetic")
    tc = train.TrainConfig(steps=12, batch_size=8, seq_len=32, lr=3e-3)
    tr = train.Trainer.create(jaxtp.Transformer.create(tiny, mesh), tc)
    losses = [
        float(tr.train_step(data.train_batch(corpus.train, mesh, 8, 32, 0, i))["loss"]) for i in range(4)
    ]
    ckpts = checkpoint.TrainCheckpoints(out / "checkpoints")
    identity = {
        "config": tiny.to_dict(),
        "train": dict(tc.__dict__),
        "data": corpus.describe(),
    }  # as run.py writes
    ckpts.save(4, tr.params, tr.opt_state, {**identity, "loss": losses})
    ckpts.wait()
    ckpts.close()
    proc = subprocess.run(
        [
            sys.executable,
            RUN,
            "--processes=2",
            *ARGS,
            "--steps",
            "12",
            "--checkpoint-every",
            "4",
            "--out",
            str(out),
            "--resume",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=400,
    )
    return proc, out


def test_two_processes_match_one(tiny, two_process_run):
    """The 2-process run resumed this process's step-4 checkpoint and continued exactly as one process."""
    proc, out = two_process_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "[p0] " in proc.stdout and "[p1] " in proc.stdout and "resumed from step 4" in proc.stdout
    losses = json.loads((out / "report.json").read_text())["loss"]
    np.testing.assert_allclose(losses, reference_losses(tiny, "2x4", steps=12), rtol=0, atol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        "layout.png",
        "loss.png",
        "report.json",
        "tensorboard",
    ]
    assert len(list((out / "tensorboard").iterdir())) == 1  # process 0 alone writes event files


def test_checkpoint_of_two_processes_resumes_in_one(tiny, two_process_run):
    _, out = two_process_run
    ref = reference_losses(tiny, "2x4", steps=12)
    mesh = jaxtp.make_mesh("2x4")
    tr = train.Trainer.create(
        jaxtp.Transformer.create(tiny, mesh, seed=1),
        train.TrainConfig(steps=12, batch_size=8, seq_len=32, lr=3e-3),
    )
    ckpts = checkpoint.TrainCheckpoints(out / "checkpoints")
    step, tr.params, tr.opt_state, meta = ckpts.restore(tr.params, tr.opt_state, step=8)
    ckpts.close()
    corpus = data.load_corpus("synthetic")
    got = [
        float(tr.train_step(data.train_batch(corpus.train, mesh, 8, 32, 0, i))["loss"]) for i in range(8, 12)
    ]
    np.testing.assert_allclose(got, ref[8:], rtol=0, atol=1e-5)


def test_missing_peer_fails_fast_in_one_line(tmp_path):
    env = {**ENV, "JAXTP_INIT_TIMEOUT": "5"}
    t = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            RUN,
            *ARGS,
            "--steps",
            "2",
            "--out",
            str(tmp_path / "o"),
            "--coordinator",
            f"127.0.0.1:{free_port()}",
            "--num-processes",
            "2",
            "--process-id",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0 and time.time() - t < 120
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not join the run" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_killed_peer_makes_the_survivor_exit_nonzero(tmp_path):
    env = {**ENV, "JAXTP_HEARTBEAT_TIMEOUT": "5"}  # the survivor notices in ~5 s instead of 15
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                RUN,
                *ARGS,
                "--steps",
                "2000",
                "--out",
                str(tmp_path / f"o{i}"),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for line in procs[0].stdout:
        if "== training" in line:
            break
    time.sleep(2)
    procs[1].send_signal(signal.SIGKILL)
    t = time.time()
    try:
        code = procs[0].wait(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert code != 0 and time.time() - t < 60


def test_launcher_stops_the_others_when_one_dies(tmp_path):
    """Kill one child of `run.py --processes 2`: the launcher kills the other and exits non-zero."""
    launcher = subprocess.Popen(
        [sys.executable, RUN, "--processes", "2", *ARGS, "--steps", "2000", "--out", str(tmp_path / "o")],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in launcher.stdout:
        if "[p0] == training" in line:
            break
    children = subprocess.run(
        ["pgrep", "-f", "--", f"--out {tmp_path / 'o'}"], capture_output=True, text=True
    ).stdout.split()
    victims = [int(c) for c in children if int(c) != launcher.pid]
    assert len(victims) >= 2  # each launched process is a supervisor plus its worker
    os.kill(victims[-1], signal.SIGKILL)
    t = time.time()
    code = launcher.wait(timeout=60)
    assert code != 0 and time.time() - t < 60
    assert "stopped the other processes" in launcher.stderr.read()
    time.sleep(0.5)
    assert all(subprocess.run(["kill", "-0", str(v)], capture_output=True).returncode != 0 for v in victims)
