"""run.py (= `jaxtp run`, jaxtp.cli): a subprocess smoke test with `tiny`, the report schema, one-line errors on
bad input and tracebacks for everything else, `--processes` in every spelling, and `jaxtp plan`."""

import json
import pathlib
import subprocess
import sys

import pytest
import run  # experiments/run.py (pyproject's pytest pythonpath)
from conftest import subprocess_env
from matplotlib.image import imread

import jaxtp.cli
import jaxtp.job

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(420)


def run_cli(*args, timeout=400):
    env = subprocess_env()  # run.py must fake devices itself
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run_cli(
        "--model",
        "tiny",
        "--mesh",
        "2x4",
        "--steps",
        "12",
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--data",
        "synthetic",
        "--sample-len",
        "16",
        "--out",
        str(out),
    )
    return proc, out


def test_smoke_run_writes_report_and_plot(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    for heading in (
        "devices and mesh",
        "rules",
        "parameters",
        "memory per device",
        "collectives",
        "held-out",
        "sample",
        "speed",
    ):
        assert heading in proc.stdout, heading
    assert (out / "loss.png").stat().st_size > 1000
    assert f"{out / 'layout.png'}" in proc.stdout  # named in the output, drawn by jaxtp.plot_layout
    assert imread(out / "layout.png").shape[:2] == (920, 1400)  # tiny: 8 kinds of weight, 2 rows of 4


def test_report_schema(smoke):
    _, out = smoke
    r = json.loads((out / "report.json").read_text())
    assert r["mesh"] == {"data": 2, "model": 4}
    assert isinstance(r["params"], int) and r["params"] > 0
    assert r["bytes_per_device"]["f32"] > 0
    assert r["collectives_per_layer"]["all-reduce@model"]["count"] == 4
    assert len(r["loss"]) == 12 and all(isinstance(x, float) for x in r["loss"])
    assert {"loss", "bits_per_byte", "perplexity"} <= set(r["eval"]["f32"])
    for key in ("compile_s", "step_s_median", "tokens_per_s", "mfu"):
        assert r["timing"][key] > 0, key
    assert isinstance(r["sample"], str) and r["sample"]
    kv = r["kv_cache_int8"]  # the int8 KV cache against the bf16 one on held-out windows
    assert 0 <= kv["agreement"] <= 1 and 0 <= kv["step_agreement"] <= 1 and abs(kv["delta_nll"]) < 0.05
    for key in ("argument", "output", "temp"):
        assert key in r["memory_per_device"]


def test_existing_out_is_refused_without_force(smoke, capsys):
    _, out = smoke
    before = (out / "report.json").read_text()
    assert run.main(["--model", "tiny", "--steps", "1", "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (out / "report.json").read_text() == before  # nothing overwritten


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--mesh", "3x3"], "needs 9 devices"),
        (["--mesh", "0x8"], "size 0"),
        (["--mesh", "16x1"], "needs 16 devices"),
        (["--data", "/nonexistent/file.txt"], "does not exist"),
        (["--batch-size", "7"], "not divisible by the data axis size 2"),
        (
            ["--seq-len", "-3"],
            "outside 1..64",
        ),  # a longer one extends a preset's context (--hf: see test_hf_cli)
        (["--steps", "0"], "--steps must be a positive"),
        (["--steps", "-3"], "--steps must be a positive"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--model", "huge"], "unknown --model"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, args, fragment):
    assert run.main(["--model", "tiny", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "report.json").exists()


@pytest.mark.parametrize("content,fragment", [(b"", "is empty"), (b"\x00\x01\xff\xfe" * 100, "not UTF-8")])
def test_bad_data_files(tmp_path, capsys, content, fragment):
    f = tmp_path / "data.bin"
    f.write_bytes(content)
    assert run.main(["--model", "tiny", "--data", str(f), "--out", str(tmp_path / "o")]) == 2
    assert fragment in capsys.readouterr().err


def test_cli_error_exit_code_in_a_real_process(tmp_path):
    proc = run_cli("--mesh", "3x3", "--out", str(tmp_path / "o"), timeout=120)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().startswith("error: mesh '3x3' needs 9 devices") and "Traceback" not in proc.stderr
    )


@pytest.mark.parametrize(
    "flag", [["--processes", "2"], ["--processes=2"], ["--processe", "2"], ["--processe=2"]]
)
def test_processes_is_taken_out_of_the_workers_argv_in_every_spelling(monkeypatch, flag):
    launched = []
    monkeypatch.setattr(jaxtp.cli, "launch_local", lambda argv, n: launched.append((argv, n)) or 0)
    assert run.main(["--model", "tiny", *flag, "--seed", "2", "--out", "o"]) == 0
    assert launched == [(["-m", "jaxtp", "run", "--model", "tiny", "--seed", "2", "--out", "o"], 2)]


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Only user errors become one line and exit 2: a ValueError from inside the job is a bug and propagates."""

    def bug(self):
        raise ValueError("an internal error")

    monkeypatch.setattr(jaxtp.job.TrainingJob, "run", bug)
    with pytest.raises(ValueError, match="an internal error"):
        run.main(["--model", "tiny", "--data", "synthetic", "--out", str(tmp_path / "o")])
    assert "error:" not in capsys.readouterr().err


def test_an_internal_error_in_a_real_process_is_a_traceback_not_exit_2(tmp_path):
    code = (
        "import sys, jaxtp.cli, jaxtp.job\n"
        "def bug(self): raise RuntimeError('an internal error')\n"
        "jaxtp.job.TrainingJob.run = bug\n"
        f"sys.exit(jaxtp.cli.main(['run', '--model', 'tiny', '--data', 'synthetic', '--out', {str(tmp_path)!r}]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=subprocess_env()
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "RuntimeError: an internal error" in proc.stderr


def test_jaxtp_plan_prints_what_run_plan_prints(capsys):
    args = ["--model", "tiny", "--mesh", "2x4", "--batch-size", "8", "--hardware", "a100"]
    assert run.main(["--plan", *args]) == 0
    via_run = capsys.readouterr().out
    assert jaxtp.cli.main(["plan", *args]) == 0
    assert capsys.readouterr().out == via_run and "mesh data=2 x model=4 of" in via_run


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--mesh", "3y3"], "malformed"),
        (["--hardware", "tpu9"], "unknown --hardware"),
        (["--rules", "nope"], "unknown --rules"),
        (["--model", "huge"], "unknown --model"),
        (["--batch-size", "0"], "must be positive"),
    ],
)
def test_jaxtp_plan_bad_input_is_one_line(capsys, args, fragment):
    assert jaxtp.cli.main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_python_m_jaxtp_run_is_the_same_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxtp", "run", "--mesh", "3x3", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().startswith("error: mesh '3x3' needs 9 devices") and "Traceback" not in proc.stderr
    )


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert run.main(["--model", "tiny", "--data", "synthetic", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {tmp_path / 'f'}: ") and len(err.splitlines()) == 1
