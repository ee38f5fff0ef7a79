"""Benchmarks: bench.py's train section and the GPU check's --tiny mode run on CPU and write what they claim.

Structure and finiteness only: timings on a shared CPU say nothing about the targets.
"""

import json
import math

import bench  # experiments/ (pyproject's pytest pythonpath)
import gpu_check
import pytest

pytestmark = pytest.mark.timeout(300)

TRAIN_FIELDS = (
    "compile_s",
    "trace_lower_s",
    "xla_compile_s",
    "first_step_s",
    "step_s",
    "tokens_per_s",
    "flops_per_s",
    "mfu",
    "peak_flops_per_s",
    "peak_start_flops_per_s",
    "peak_end_flops_per_s",
    "state_bytes_per_device",
    "temp_bytes_per_device",
    "final_loss",
)


def numbers(tree):
    """Every number in a JSON tree (bools excluded)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_bench_train_section_rows_and_overhead_summary(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(
        [
            "--sections",
            "train",
            "--presets",
            "tiny",
            "--meshes",
            "1x1,2x4",
            "--repeats",
            "2",
            "--train-precisions",
            "f32",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["overhead"] == json.loads(json.dumps(res["overhead"]))
    rows = res["train"]
    assert [(r["mesh"], r["impl"]) for r in rows] == [
        ("1x1", "jaxtp"),
        ("2x4", "jaxtp"),
        ("1x1", "plain"),
        ("2x4", "plain"),
    ]
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in TRAIN_FIELDS), r
        assert r["jit_cache_size"] == 1 and len(r["step_times_s"]) == 2
        assert r["mfu"] == pytest.approx(
            r["flops_per_s"] / max(r["peak_start_flops_per_s"], r["peak_end_flops_per_s"])
        )
    for one, two in (rows[:2], rows[2:]):
        assert one["collectives_model"] == {} and two["collectives_model"]["all-reduce"] > 0
        assert two["state_bytes_per_device"] < one["state_bytes_per_device"]  # params + Adam split over model
    checks = {(c["preset"], c["check"]): c for c in res["overhead"]["checks"]}
    ratio = checks[("tiny", "step(2x4)/step(1x1) N=8")]
    paired = lambda a, b: sorted(x / y for x, y in zip(a["step_times_s"], b["step_times_s"]))
    assert ratio["value"] == pytest.approx(sum(paired(rows[1], rows[0])) / 2) and ratio["status"] in (
        "PASS",
        "MISS",
    )
    assert ratio["plain"] == pytest.approx(sum(paired(rows[3], rows[2])) / 2)
    assert (
        checks[("tiny", "step(1x8)/step(1x1)")]["status"] == "n/a"
        and checks[("tiny", "step(1x8)/step(1x1)")]["plain"] is None
    )
    assert checks[("mid", "2x4 compile_s")]["status"] == "n/a"
    assert checks[("all", "jit cache size after timed steps (max)")]["status"] == "PASS"
    assert set(res["overhead"]["peak_flops_per_s"]) == {"start", "end", "used"}
    assert (tmp_path / "bench_steps.png").stat().st_size > 1000
    assert "### overhead" in (tmp_path / "bench.md").read_text()


def test_mid_runs_eight_heads_on_1x8_with_its_own_1x1_reference():
    mid = bench.model_config("mid")
    cells = [(spec, cfg.n_heads) for spec, cfg in bench.train_cells(mid, ["1x1", "2x4", "1x8"])]
    assert cells == [("1x1", 4), ("2x4", 4), ("1x8", 8), ("1x1", 8)]
    assert bench.variant_for(mid, "1x8").param_count() == mid.param_count()


def test_model_switches_scan_and_remat(capsys):
    cfg = bench.model_config("mid+scan+remat=dots")
    assert (
        cfg.scan_layers
        and cfg.remat == "dots"
        and cfg.replace(scan_layers=False, remat="none") == bench.model_config("mid")
    )
    with pytest.raises(SystemExit):
        bench.parse_args(["--presets", "mid+remat=sometimes,tiny+fast", "--sections", "train"])
    err = capsys.readouterr().err
    assert "remat must be one of none, full, dots" in err and "unknown model switch 'fast'" in err


def test_gpu_check_tiny_writes_finite_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(
        [
            "--tiny",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--decode-repeats",
            "1",
            "--new-tokens",
            "8",
            "--long-seq-len",
            "128",
            "--long-steps",
            "1",
            "--out",
            str(out),
        ]
    )
    res = json.loads(out.read_text())
    assert {"meta", "config", "train", "decode", "total_s"} <= set(res)
    assert {
        "compile_s",
        "trace_lower_s",
        "xla_compile_s",
        "first_step_s",
        "step_s_median",
        "tokens_per_s",
        "mfu",
        "peak_flops_per_s",
        "measured_peak_flops_per_s",
        "mfu_vs_measured",
        "memory_per_device",
        "predicted_memory_per_device",
    } <= set(res["train"])
    assert {"bf16", "int8", "int8_over_bf16", "status"} <= set(res["decode"])
    assert {"decode_tok_s", "decode_step_ms", "prefill_tok_s", "first_call_s"} <= set(res["decode"]["int8"])
    assert res["decode"]["int8"]["param_bytes_per_device"] < res["decode"]["bf16"]["param_bytes_per_device"]
    assert all(math.isfinite(x) for x in numbers(res))
    assert res["train"]["peak_flops_per_s"] == gpu_check.jaxtp.HARDWARE["h200"].flops_per_s
    long = res["long_context"]
    assert "needs a GPU" in long["cudnn"]["error"]  # CPU: cuDNN refuses in one line, the others still run
    for attention in ("blockwise", "xla"):
        assert {"step_s_median", "tokens_per_s", "memory_per_device", "compile_s"} <= set(long[attention])
    assert long["blockwise"]["memory_per_device"]["temp"] < long["xla"]["memory_per_device"]["temp"]
    kv = res["kv_cache"]
    assert kv["int8"]["kv_bytes_per_device"] < kv["bf16"]["kv_bytes_per_device"]
    assert kv["int8"]["decode_tok_s"] > 0 and kv["bf16"]["decode_tok_s"] > 0


def test_long_context_sections_report_ratios_and_targets(capsys):
    """bench.py --sections attention,kv_cache on tiny at short lengths: every row, the summaries and targets."""
    res = bench.main(
        [
            "--sections",
            "attention,kv_cache",
            "--attention-model",
            "tiny",
            "--attention-seq-lens",
            "128,256",
            "--attention-tokens",
            "512",
            "--kv-cache-lens",
            "64",
            "--batch",
            "2",
            "--repeats",
            "1",
        ]
    )
    assert {(r["attention"], r["seq_len"]) for r in res["attention"]} == {
        (a, S) for a in ("xla", "blockwise") for S in (128, 256)
    }
    assert all(r["step_s"] > 0 and r["temp_bytes_per_device"] > 0 for r in res["attention"])
    summary = res["attention_summary"]
    assert set(summary["ratios"]) == {128, 256}
    assert [c["status"] in ("PASS", "MISS") for c in summary["targets"]] == [
        True
    ]  # S=128 only: no S >= 1024 here
    assert {r["kv_cache_dtype"] for r in res["kv_cache"]} == {"bf16", "int8"}
    assert 0 < res["kv_cache_summary"][64]["bytes"] < 1
