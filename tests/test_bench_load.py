"""bench_load.py end to end on its tiny checkpoint: every row measured, and jaxtp loads exactly the model's bytes.

Structure and byte counts only: seconds and RSS on a shared CPU say nothing about the targets.
"""

import json
import math
import subprocess
import sys

import bench_load  # experiments/ (pyproject's pytest pythonpath)
import pytest
from conftest import subprocess_env

pytestmark = pytest.mark.timeout(300)
POSITIVE = (
    "seconds",
    "ready_s",
    "gb_per_s",
    "final_gb",
    "peak_growth_gb",
    "ratio",
    "cpu_s",
)  # sys_s, resident can be ~0


def expected_bytes(shapes) -> dict:
    """Parameter bytes of the checkpoint's model at each precision (one copy of each parameter): int8 keeps a
    byte per matrix element plus an f32 scale per output channel (HF row), and norms stay f32."""
    n = sum(math.prod(s) for s in shapes.values())
    int8 = sum(math.prod(s) + 4 * s[0] if len(s) == 2 else 4 * s[0] for s in shapes.values())
    return {"f32": 4 * n, "bf16": 2 * n, "int8": int8}


def test_bench_load_small_end_to_end(tmp_path):
    out = tmp_path / "load.json"
    subprocess.run(
        [
            sys.executable,
            bench_load.__file__,
            "--small",
            "--repeats",
            "1",
            "--workdir",
            str(tmp_path),
            "--out",
            str(out),
        ],
        check=True,
        env=subprocess_env(),
        timeout=120,
    )
    res = json.loads(out.read_text())
    rows = {(r["impl"], r["precision"]): r for r in res["rows"]}
    assert list(rows) == bench_load.ROWS
    for r in rows.values():
        assert all(r[k] > 0 and math.isfinite(r[k]) for k in POSITIVE), r
        assert len(r["runs"]) == 1 and r["final_bytes"] >= r["model_bytes"]
    expected = expected_bytes(bench_load.tensor_shapes(bench_load.SMALL))
    for p, n in expected.items():
        assert rows["jaxtp", p]["model_bytes"] == n, p
    for p in ("f32", "bf16"):  # transformers also holds the RoPE inv_freq buffers
        assert 0 <= rows["transformers", p]["model_bytes"] - expected[p] < 1024
    assert (
        res["checkpoint"]["files"] >= 2 and res["checkpoint"]["params"] * 2 < res["checkpoint"]["file_bytes"]
    )
    assert {c["status"] for c in res["targets"]} <= {"PASS", "MISS"} and len(res["targets"]) == 11
