"""run.py: a subprocess smoke test with `tiny`, the report schema, and one-line errors on bad input."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import run  # noqa: E402
from conftest import subprocess_env  # noqa: E402

pytestmark = pytest.mark.timeout(420)


def run_cli(*args, timeout=400):
    env = subprocess_env()  # run.py must fake devices itself
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run_cli("--model", "tiny", "--mesh", "2x4", "--steps", "12", "--seq-len", "32", "--batch-size", "8",
                   "--data", "synthetic", "--sample-len", "16", "--out", str(out))
    return proc, out


def test_smoke_run_writes_report_and_plot(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    for heading in ("devices and mesh", "rules", "parameters", "memory per device", "collectives",
                    "held-out", "sample", "speed"):
        assert heading in proc.stdout, heading
    assert (out / "loss.png").stat().st_size > 1000


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
    for key in ("argument", "output", "temp"):
        assert key in r["memory_per_device"]


def test_existing_out_is_refused_without_force(smoke, capsys):
    _, out = smoke
    before = (out / "report.json").read_text()
    assert run.main(["--model", "tiny", "--steps", "1", "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (out / "report.json").read_text() == before  # nothing overwritten


@pytest.mark.parametrize("args,fragment", [
    (["--mesh", "3x3"], "needs 9 devices"),
    (["--mesh", "0x8"], "size 0"),
    (["--mesh", "16x1"], "needs 16 devices"),
    (["--data", "/nonexistent/file.txt"], "does not exist"),
    (["--batch-size", "7"], "not divisible by the data axis size 2"),
    (["--seq-len", "4096"], "outside 1..64"),
    (["--steps", "0"], "--steps must be a positive"),
    (["--steps", "-3"], "--steps must be a positive"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--model", "huge"], "unknown --model"),
])
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
    assert proc.stderr.strip().startswith("error: mesh '3x3' needs 9 devices") and "Traceback" not in proc.stderr
