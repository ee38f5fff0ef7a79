"""Watching a run: `jaxtp run --log-every N --profile-steps A:B --quiet` writes TensorBoard scalars at the log
steps, a jax.profiler trace holding the train step's ops (its all-reduces included), the grad-norm series in
report.json, and prints only the output directory. One in-process run (8 fake CPU devices, conftest.py)."""

import contextlib
import io
import json
import re

import jax
import numpy as np
import pytest
import run  # experiments/run.py (pyproject's pytest pythonpath)

import jaxtp
from jaxtp import metrics, profiling, train

pytestmark = pytest.mark.timeout(180)

STEPS, LOG_EVERY, PROFILE = 7, 3, (2, 4)
LOG_STEPS = [3, 6, 7]  # every 3rd step and the last
TRAIN_TAGS = ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("observe") / "out"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = run.main(
            [
                *("--model", "tiny", "--mesh", "2x4", "--steps", str(STEPS), "--seq-len", "32"),
                *("--batch-size", "8", "--data", "synthetic", "--sample-len", "4", "--out", str(out)),
                *("--log-every", str(LOG_EVERY), "--profile-steps", f"{PROFILE[0]}:{PROFILE[1]}", "--quiet"),
            ]
        )
    assert rc == 0, stderr.getvalue()[-3000:]
    report = json.loads((out / "report.json").read_text())
    return rc, stdout.getvalue(), stderr.getvalue(), out, report


def test_quiet_prints_only_the_output_directory(job):
    rc, stdout, stderr, out, _ = job
    assert rc == 0
    assert stdout == f"{out}\n"
    assert "train:" not in stderr and "step/s" not in stderr  # no progress bar


def test_report_has_the_grad_norm_series_and_leaves_the_traced_steps_out(job):
    *_, r = job
    assert len(r["grad_norm"]) == STEPS and all(isinstance(g, float) and g > 0 for g in r["grad_norm"])
    assert r["timing"]["profiled_steps"] == list(PROFILE)
    assert r["timing"]["step_s_median"] > 0 and r["timing"]["mfu"] > 0


def test_event_files_hold_every_scalar_at_the_log_steps(job):
    *_, out, r = job
    scalars = metrics.read_scalars(out / "tensorboard")
    for tag in TRAIN_TAGS:
        assert [s for s, _ in scalars[f"train/{tag}"]] == LOG_STEPS, tag
        assert all(np.isfinite(v) and v > 0 for _, v in scalars[f"train/{tag}"] if tag != "lr"), tag
    at = {tag: dict(scalars[f"train/{tag}"]) for tag in TRAIN_TAGS}
    tc = train.TrainConfig(**r["train"])
    for s in LOG_STEPS:  # event files hold float32
        np.testing.assert_allclose(at["loss"][s], r["loss"][s - 1], rtol=1e-6)
        np.testing.assert_allclose(at["grad_norm"][s], r["grad_norm"][s - 1], rtol=1e-6)
        np.testing.assert_allclose(at["lr"][s], float(train.schedule(tc)(s - 1)), rtol=1e-6)
        np.testing.assert_allclose(at["tokens_per_s"][s], 8 * 32 / at["step_time_s"][s], rtol=1e-5)
    precisions = set(r["eval"])
    assert precisions == set(jaxtp.quant.PRECISIONS)  # not --lean: every precision was evaluated
    for p in precisions:
        assert scalars[f"eval/loss_{p}"] == [(STEPS, pytest.approx(r["eval"][p]["loss"], rel=1e-6))], p


ALL_REDUCE = re.compile(r"\s*(?:ROOT )?%?(all-reduce[\w.-]*) = .*? all-reduce\(%?([\w.-]+)")
OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_all_reduces(hlo: str, mesh) -> dict:
    """{name: (mesh axes, first operand, the jax op it reduces)} of each all-reduce in a compiled HLO text."""
    out = {}
    for line in hlo.splitlines():
        if m := ALL_REDUCE.match(line):
            op = OP_NAME.search(line)
            out[m[1]] = (jaxtp.hlo.parse_collectives(line, mesh).ops[0].axes, m[2], op[1] if op else "")
    return out


def test_profile_holds_the_train_steps_ops_and_its_all_reduces(job):
    *_, out, r = job
    files = profiling.trace_files(out / "profile")
    assert len(files["xplane"]) == 1 and len(files["perfetto"]) == 1, files
    ops = [e for e in profiling.device_ops(files["perfetto"][0]) if e["args"]["hlo_module"] == "jit_step"]
    device0 = sorted((e for e in ops if e["args"].get("device_ordinal") == "0"), key=lambda e: e["ts"])
    traced = [e["args"]["hlo_op"] for e in device0]
    all_reduces = hlo_all_reduces(
        (out / "profile" / "train_step.hlo.txt").read_text(), jaxtp.make_mesh("2x4")
    )
    n = sum(v["count"] for k, v in r["collectives_per_step"].items() if k.startswith("all-reduce@"))
    assert len(all_reduces) == n, all_reduces
    for name in all_reduces:  # each ran once per traced step on each device
        assert traced.count(name) == PROFILE[1] - PROFILE[0], name
    # Megatron's model-axis all-reduces sum the partial products of row-parallel matmuls: 2 per layer forward
    # (attention out, MLP down), more backward. In the trace each follows the matmul that produced it.
    step = traced[: len(traced) // (PROFILE[1] - PROFILE[0])]
    matmul_sums = {k: v for k, v in all_reduces.items() if v[0] == "model" and v[2].endswith("dot_general")}
    assert len(matmul_sums) >= 2 * jaxtp.ModelConfig.preset("tiny").n_layers, all_reduces
    for name, (_, operand, _) in matmul_sums.items():
        assert operand in step and step.index(operand) < step.index(name), (name, operand)


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--profile-steps", "3:3"], "need 0 <= A < B <= --steps"),
        (["--profile-steps", "0:99"], "need 0 <= A < B <= --steps"),
        (["--profile-steps", "x"], "--profile-steps wants A:B"),
        (["--log-every", "0"], "--log-every must be a positive"),
    ],
)
def test_bad_observe_flags_are_one_line(tmp_path, capsys, flags, fragment):
    assert run.main(["--model", "tiny", "--steps", "5", "--out", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_only_process_0_writes_event_files(tmp_path, monkeypatch):
    assert isinstance(
        metrics.open_writer(tmp_path / "off", enabled=False), metrics.NullWriter
    )  # --no-metrics
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = metrics.open_writer(tmp_path / "p1")
    writer.scalars(1, {"train/loss": 1.0})
    writer.close()
    assert isinstance(writer, metrics.NullWriter) and not any(tmp_path.iterdir())
