"""What watching a run costs: the main job's wall time with TensorBoard metrics on (the default) and off.

    python experiments/bench_observe.py                          # run.py --mesh 2x4, 4 repeats -> bench_observe.json
    python experiments/bench_observe.py --repeats 6 --out o.json -- --model tiny --steps 50   # other run.py flags

Each run is `python experiments/run.py --mesh 2x4 [RUN FLAGS] --out TMP` in a fresh child process, metrics on,
or off with --no-metrics, alternating on/off and off/on from one repeat to the next so that load from other
users of a shared machine hits both alike; the first run of a back-to-back pair tends to be the slower one, so
an even number of repeats balances that order. Reported: each run's wall time (process start to exit) and its
report.json timing (total_train_s: the training loop's step times; step_s_median), then the medians per mode
and on/off ratios: of the medians, and per repeat (paired, so slow drifts of the machine cancel). The
issue's budget: median wall time with metrics on <= 1.03 x off.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / "experiments" / "run.py"


def one_run(metrics: bool, run_flags: list[str], workdir: pathlib.Path, index: int) -> dict:
    out = workdir / f"run{index}-{'on' if metrics else 'off'}"
    cmd = [sys.executable, str(RUN), "--mesh", "2x4", *run_flags, "--out", str(out)]
    if not metrics:
        cmd.append("--no-metrics")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    timing = json.loads((out / "report.json").read_text())["timing"]
    row = {
        "metrics": metrics,
        "wall_s": wall,
        "total_train_s": timing["total_train_s"],
        "step_s_median": timing["step_s_median"],
        "event_files": len(list((out / "tensorboard").glob("events.out.tfevents.*"))) if metrics else 0,
    }
    print(json.dumps(row), flush=True)
    return row


def summarize(rows: list[dict]) -> dict:
    med = {
        mode: {
            k: statistics.median(r[k] for r in rows if r["metrics"] == on)
            for k in ("wall_s", "total_train_s")
        }
        for mode, on in (("on", True), ("off", False))
    }
    pairs = [rows[i : i + 2] for i in range(0, len(rows) - 1, 2)]  # one repeat: on and off back to back
    paired = [
        next(r for r in pair if r["metrics"])["wall_s"] / next(r for r in pair if not r["metrics"])["wall_s"]
        for pair in pairs
    ]
    return {
        "median": med,
        "paired_wall_ratios": paired,
        "paired_wall_ratio_median": statistics.median(paired),
        "wall_ratio_on_off": med["on"]["wall_s"] / med["off"]["wall_s"],
        "train_ratio_on_off": med["on"]["total_train_s"] / med["off"]["total_train_s"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--repeats",
        type=int,
        default=4,
        help="runs per mode (default 4: even, so on-first and off-first pairs come equally often)",
    )
    p.add_argument("--out", default="bench_observe.json", help="JSON results (default bench_observe.json)")
    p.add_argument(
        "run_flags", nargs="*", help="after --: more run.py flags (default: none, the default job)"
    )
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_observe") as tmp:
        for i in range(args.repeats):
            for metrics in (True, False) if i % 2 == 0 else (False, True):
                rows.append(one_run(metrics, args.run_flags, pathlib.Path(tmp), i))
    result = {"command": ["run.py", "--mesh", "2x4", *args.run_flags], "runs": rows, **summarize(rows)}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    keys = ("median", "wall_ratio_on_off", "paired_wall_ratio_median", "train_ratio_on_off")
    print(json.dumps({k: result[k] for k in keys}, indent=1))


if __name__ == "__main__":
    main()
