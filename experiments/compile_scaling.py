"""Train-step compile time against depth: unrolled blocks vs one scanned block (ModelConfig.scan_layers).

    python experiments/compile_scaling.py                       # L in 2 4 8 16, meshes 1x1 2x4 -> JSON on stdout
    python experiments/compile_scaling.py --layers 2 8 --meshes 2x4 --out /tmp/scaling.json

An unrolled model traces and compiles L copies of the block; a scanned one traces the block once into a
while loop, so its compile time should stay flat as L grows. Each step is compiled from abstract shapes
(nothing allocated) with a narrow config (d_model 64, d_ff 128) so XLA's per-op work, not the matmul
sizes, dominates. "trace_s" is jit tracing + lowering to StableHLO, "compile_s" is XLA's compile;
timings are wall clock on a shared machine: read the trend, not the third digit.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jaxtp

DEVICES = 8


def measure(cfg, spec: str) -> dict:
    """Trace + lower, then compile, the train step of `cfg` on mesh `spec`: seconds for each."""
    from jaxtp import data, train

    mesh = jaxtp.make_mesh(spec)
    tc = train.TrainConfig(batch_size=8, seq_len=32)
    t0 = time.perf_counter()
    lowered = train.lower_train_step(cfg, jaxtp.Layout.create(cfg, mesh), tc, data.batch_sharding(mesh))
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"trace_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8, 16], help="depths (default 2 4 8 16)")
    p.add_argument("--meshes", nargs="+", default=["1x1", "2x4"], help="mesh specs (default 1x1 2x4)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    jaxtp.use_cpu_devices(DEVICES)
    base = jaxtp.ModelConfig.preset("tiny", d_model=64, d_ff=128)
    rows = []
    for spec in args.meshes:
        for L in args.layers:
            for scan in (False, True):
                row = {
                    "mesh": spec,
                    "n_layers": L,
                    "scan_layers": scan,
                    **measure(base.replace(n_layers=L, scan_layers=scan), spec),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    width = {k: v for k, v in base.to_dict().items() if k not in ("n_layers", "scan_layers")}
    result = {"config": width, "batch": [8, 32], "rows": rows}
    text = json.dumps(result, indent=1)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
