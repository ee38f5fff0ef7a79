"""Benchmarks -> markdown tables on stdout; with --out, JSON there plus a markdown copy and a plot beside it.

    python experiments/bench.py --quick --out bench.json    # about 5 minutes on 2 CPU cores
    python experiments/bench.py --out bench.json            # adds `small` and bf16 compute: longer
    python experiments/bench.py --sections generation --presets tiny,small --meshes 1x1,2x4 --precisions f32,bf16,int8

Each section is a `Section` in SECTIONS: a function `bench_<name>(args) -> list[dict]`, its table columns,
and optionally a summary of its rows and a plot. Rows that cannot run (a mesh that does not divide the
model's heads, too few devices, a precision without jaxtp.cast) are reported as skipped. Models are jaxtp
presets or BENCH_CONFIGS (`mid`), optionally with switches: `mid+scan`, `mid+remat=dots`.

train: per model x mesh x precision (f32 master weights; compute in f32 or bf16: rows `f32`,
`bf16-compute`), one AdamW step at the model's TRAIN_SHAPES (seq_len, global batch):
  * compile_s: trace + lower + XLA compile of the step, timed with `step_fn.lower(...).compile()` before
    the step ever runs (trace_lower_s and xla_compile_s separately). The jit call reuses that executable
    (its cache holds 1 entry afterwards), so first_step_s is the first execution, not a compile.
  * step_s: median of --repeats timed steps after WARMUP_STEPS warm-up steps (the first execution is the
    first warm-up); a step's time ends when its params, optimizer state and metrics are ready. All
    meshes of one model x precision are timed round-robin - one step on every mesh per round, --repeats
    rounds - so that machine noise (other users of a shared machine) hits every mesh alike and the
    mesh/1x1 ratios stay fair.
  * tokens/s, FLOP/s (train.train_flops_per_step) and MFU against a matmul peak measured in this run
    (measure.matmul_peak_flops, at the start and at the end of the section; both reported, the larger
    used). Fake CPU devices share the host's cores, so on CPU the peak is the machine's, not x devices.
  * state_bytes_per_device (params + optimizer state: the shard shapes of the actual arrays),
    temp_bytes_per_device (compiled.memory_analysis()), model-axis collectives of the compiled step, and
    jit_cache_size of the step after all timed steps (1: it never recompiled).
  A mesh whose model axis does not divide the heads runs the same model with more heads (mid: N=8 on
  1x8; parameter count and FLOPs unchanged, head_dim halved) and that variant is also timed on 1x1.
  The `overhead` summary (f32 rows): step(2x4)/step(1x1) and step(1x8)/step(1x1) per model (the median of
  the per-round ratios: each round times both meshes back to back) against
  RATIO_TARGETS, mid on 2x4 against MID_TARGETS, and the recompile check, each PASS or MISS.
  Reference (rows impl=plain; --no-reference skips them): every f32 model also runs as a plain pure-JAX
  Megatron step (experiments/plain_reference.py) on the same meshes, timed in the same rounds, and the
  summary quotes its ratios beside jaxtp's: what tensor parallelism itself costs on this machine.

generation: prefill and decode tokens/s of jaxtp.generate; medians over --repeats runs after one warm-up
run (which compiles).

attention, kv_cache (not run by default: --sections attention,kv_cache): long-context rows, documented in
experiments/bench_attention.py - train step xla vs blockwise attention at S = 128 ... 4096, and decode with
a bf16 vs an int8 KV cache at cache lengths 512 and 4096.

On a machine without an accelerator, N fake CPU devices (default 8) are created before JAX starts so
that sharded meshes run; with a GPU/TPU, the fake CPU devices are harmless and meshes use the real ones.
On XLA:CPU an int8 x int8 dot runs at about f32 speed, bf16 matmuls run slower than f32, and weight-only
int8 is slower still at decode shapes (the dequantized weight is written out first): CPU rows for bf16/int8
measure numerics and bytes; their speed needs a GPU or TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import operator
import os
import platform
import statistics
import sys
import time
from typing import Callable, NamedTuple

import jax  # imported, not initialised: fake devices can still be set
import numpy as np
from bench_attention import (
    ATTENTION_COLUMNS,
    KV_CACHE_COLUMNS,
    bench_attention,
    bench_kv_cache,
    summarise_attention,
    summarise_kv_cache,
)

# this directory is on sys.path when bench.py runs as a script (and in the tests, via pytest's pythonpath)
from plain_reference import PlainTrainer

import jaxtp
from jaxtp import data, train
from jaxtp.generation import cache_bytes_per_device
from jaxtp.hlo import parse_collectives
from jaxtp.measure import (
    bytes_per_device,
    compile_count,
    compile_timed,
    matmul_peak_flops,
    memory_per_device,
    timed_train_step,
)

# Benchmark-only shapes. `mid` lives here rather than in jaxtp.PRESETS because it exists to size this
# benchmark (wide enough that matmuls, not per-op overhead, dominate a CPU step); a global preset would
# show up in run.py --model, the planner tables and every test that loops over PRESETS.
BENCH_CONFIGS = {
    "mid": jaxtp.ModelConfig(
        vocab_size=256, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=1024, max_seq_len=128
    ),
}
TRAIN_SHAPES = {"tiny": (64, 16), "mid": (128, 16), "small": (64, 16)}  # (seq_len, global batch)
TRAIN_PRECISIONS = {"f32": "float32", "bf16-compute": "bfloat16"}  # row label -> compute dtype
WARMUP_STEPS = 2
RATIO_TARGETS = {"2x4": 1.1, "1x8": 1.5}  # step(mesh) / step(1x1) of the same model, at most
MID_TARGETS = (("compile_s", "<=", 5.0), ("step_s", "<=", 0.25), ("mfu", ">=", 0.40))  # mid on 2x4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="train: tiny+mid in f32; generation: tiny, short prompts (about 5 minutes on 2 CPU cores)",
    )
    p.add_argument(
        "--out",
        help="write results as JSON to this file, with a markdown copy (.md) and the train "
        "step plot (<name>_steps.png) beside it",
    )
    p.add_argument("--sections", default="train,generation", help=f"comma list of: {', '.join(SECTIONS)}")
    p.add_argument(
        "--presets",
        help="comma list of models for every section (jaxtp presets or "
        f"{', '.join(BENCH_CONFIGS)}; default train: tiny,mid,small, generation: "
        "tiny,small; --quick: tiny,mid and tiny)",
    )
    p.add_argument("--meshes", default="1x1,2x4,1x8", help="comma list of mesh specs (data x model)")
    p.add_argument(
        "--precisions", default="f32,bf16,int8", help="generation: comma list; bf16/int8 need jaxtp.cast"
    )
    p.add_argument(
        "--train-precisions",
        help=f"train: comma list of {', '.join(TRAIN_PRECISIONS)} (default both; --quick: f32)",
    )
    p.add_argument("--batch", type=int, help="generation: prompts per batch (default 8)")
    p.add_argument(
        "--prompt-len", type=int, help="generation: prompt tokens per row (default 32; --quick 16)"
    )
    p.add_argument(
        "--new-tokens", type=int, help="generation: generated tokens per row (default 64; --quick 16)"
    )
    p.add_argument(
        "--attention-model",
        default="small",
        help="attention and kv_cache sections: the preset run at long context (default small)",
    )
    p.add_argument(
        "--attention-seq-lens",
        type=lambda v: [int(x) for x in v.split(",")],
        help="attention section: comma list of S (default 128,...,4096; --quick up to 1024)",
    )
    p.add_argument(
        "--attention-tokens",
        type=int,
        default=None,
        help="attention section: global tokens per train step at every S (default 8192)",
    )
    p.add_argument(
        "--kv-cache-lens",
        type=lambda v: [int(x) for x in v.split(",")],
        help="kv_cache section: comma list of cache lengths (default 512,4096)",
    )
    p.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="train: skip the plain pure-JAX reference step (experiments/plain_reference.py) that is "
        "otherwise timed beside every f32 model, on the same meshes and in the same rounds",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row after warm-up (default 5)")
    p.add_argument("--temperature", type=float, default=0.0, help="generation: 0 = greedy (default)")
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=int(os.environ.get("JAXTP_CPU_DEVICES", 8)),
        help="fake CPU devices to create before JAX starts (0: leave JAX's default)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    given = args.presets.split(",") if args.presets else None
    args.train_presets = given or (["tiny", "mid"] if quick else ["tiny", "mid", "small"])
    args.presets = given or (["tiny"] if quick else ["tiny", "small"])
    args.train_precisions = (args.train_precisions or ("f32" if quick else ",".join(TRAIN_PRECISIONS))).split(
        ","
    )
    args.meshes = args.meshes.split(",")
    args.precisions = args.precisions.split(",")
    args.sections = args.sections.split(",")
    args.batch = args.batch or 8
    args.prompt_len = args.prompt_len or (16 if quick else 32)
    args.new_tokens = args.new_tokens or (16 if quick else 64)
    problems = input_problems(args)
    if problems:
        p.error("; ".join(problems))
    return args


def input_problems(args) -> list[str]:
    """Unknown sections, models, train precisions and malformed meshes, found before anything runs."""
    problems = (
        [f"unknown sections {[s for s in args.sections if s not in SECTIONS]}; choose from {list(SECTIONS)}"]
        if set(args.sections) - set(SECTIONS)
        else []
    )
    known = set(jaxtp.PRESETS) | set(BENCH_CONFIGS)
    for m in dict.fromkeys(args.train_presets + args.presets):
        if m.split("+")[0] not in known:
            problems.append(f"unknown model {m!r}; choose from {sorted(known)} (+scan, +remat=POLICY)")
            continue
        try:
            model_config(m)
        except ValueError as e:
            problems.append(str(e))
    problems += [
        f"unknown train precision {t!r}; choose from {list(TRAIN_PRECISIONS)}"
        for t in args.train_precisions
        if t not in TRAIN_PRECISIONS
    ]
    for spec in args.meshes:
        try:
            jaxtp.parse_mesh_spec(spec)
        except ValueError as e:
            problems.append(str(e))
    if args.repeats < 1:
        problems.append(f"--repeats must be >= 1, got {args.repeats}")
    return problems


# --------------------------------------------------------------------------------------- helpers


def model_config(name: str):
    """A jaxtp preset or BENCH_CONFIGS entry, with optional switches after '+': 'scan' (scan_layers) and
    'remat=POLICY', e.g. mid+scan+remat=dots - before/after rows of the same model in one run."""
    base, *switches = name.split("+")
    cfg = BENCH_CONFIGS[base] if base in BENCH_CONFIGS else jaxtp.ModelConfig.preset(base)
    for switch in switches:
        if switch == "scan":
            cfg = cfg.replace(scan_layers=True)
        elif switch.startswith("remat="):
            cfg = cfg.replace(remat=switch[len("remat=") :])
        else:
            raise ValueError(
                f"unknown model switch {switch!r} in {name!r}; use +scan or +remat=none|full|dots"
            )
    return cfg


def build(cfg, spec: str):
    """An f32 model of `cfg` on mesh `spec`, or a string saying why it cannot run there."""
    try:
        return jaxtp.Transformer.create(cfg, jaxtp.make_mesh(spec), seed=0)
    except ValueError as e:  # too few devices, or the mesh does not divide heads / d_ff
        return str(e).split(";")[0]


def cast(model, precision: str):
    """`model` in `precision`, or a string saying why not."""
    if precision == "f32":
        return model
    try:
        return jaxtp.cast(model, precision)
    except ValueError as e:
        return str(e)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str | Callable]]) -> str:
    """columns: (key, header, format spec or function of the value); missing values print as '-'."""

    def fmt(r, k, f):
        if r.get(k) is None:
            return "-"
        return f(r[k]) if callable(f) else format(r[k], f) if f else str(r[k])

    lines = [
        "| " + " | ".join(h for _, h, _ in columns) + " |",
        "|" + "|".join("---:" if f else "---" for _, _, f in columns) + "|",
    ]
    lines += ["| " + " | ".join(fmt(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ train section


def variant_for(cfg, spec: str):
    """`cfg`, or, when the mesh's model axis does not divide its heads, the same model with
    lcm(heads, model axis) heads (kv heads too when they equal the heads): mid runs N=8 on 1x8. The
    parameter count and FLOPs do not change (head_dim shrinks). A config the new heads cannot split
    stays as it is, and building it on that mesh reports why."""
    model_axis = jaxtp.parse_mesh_spec(spec).get("model", 1)
    if cfg.n_heads % model_axis == 0:
        return cfg
    n = math.lcm(cfg.n_heads, model_axis)
    try:
        return cfg.replace(n_heads=n, n_kv_heads=n if cfg.n_kv_heads == cfg.n_heads else cfg.n_kv_heads)
    except ValueError:
        return cfg


def train_cells(cfg, meshes: list[str]) -> list[tuple[str, object]]:
    """(mesh, config) pairs to time: each mesh with its variant of `cfg`, plus a 1x1 run of every variant
    that lacks one (the reference its ratios are taken against) when 1x1 is among the meshes."""
    cells = [(spec, variant_for(cfg, spec)) for spec in meshes]
    if "1x1" in meshes:
        cells += [("1x1", v) for v in dict.fromkeys(c for _, c in cells) if ("1x1", v) not in cells]
    return cells


@dataclasses.dataclass
class TrainCell:
    """One model on one mesh being timed: its row, trainer and step times so far."""

    row: dict
    corpus: data.Corpus
    mesh: object = None
    trainer: train.Trainer | None = None
    times: list = dataclasses.field(default_factory=list)

    def batch(self):
        """The batch of the trainer's next step (built before a timer starts)."""
        r = self.row
        return data.train_batch(self.corpus.train, self.mesh, r["batch"], r["seq_len"], 0, self.trainer.step)

    def step(self) -> float:
        """Seconds of one train step, until params, optimizer state and metrics are all ready."""
        elapsed, metrics = timed_train_step(self.trainer, self.batch())
        self.row["final_loss"] = float(metrics["loss"])
        return elapsed


def compile_step(cell: TrainCell) -> dict:
    """Trace+lower and XLA-compile the step (timed apart), then read its memory and model-axis collectives."""
    tr = cell.trainer
    compiled, times = compile_timed(tr.step_fn, tr.params, tr.opt_state, cell.batch())
    summary = parse_collectives(compiled.as_text(), cell.mesh).summary()
    model_axis = {k.split("@")[0]: v["count"] for k, v in summary.items() if k.endswith("@model")}
    return dict(
        times, temp_bytes_per_device=memory_per_device(compiled)["temp"], collectives_model=model_axis
    )


def prepare_cell(name: str, precision: str, spec: str, cfg, corpus, impl: str = "jaxtp") -> TrainCell:
    """Build the trainer (jaxtp's, or with impl="plain" the pure-JAX reference on an Auto-axes mesh of the
    same devices), compile its step and run the warm-up steps; a cell that cannot run gets row['skipped']
    and no trainer."""
    seq_len, batch = TRAIN_SHAPES.get(name.split("+")[0], (min(cfg.max_seq_len, 128), 16))
    cfg = cfg.replace(compute_dtype=TRAIN_PRECISIONS[precision])
    cell = TrainCell(
        dict(
            preset=name,
            impl=impl,
            heads=cfg.n_heads,
            mesh=spec,
            precision=precision,
            batch=batch,
            seq_len=seq_len,
            params=cfg.param_count(),
        ),
        corpus,
    )
    tc = train.TrainConfig(batch_size=batch, seq_len=seq_len)
    try:
        cell.mesh = jaxtp.make_mesh(spec)
        data.check_batch(batch, cell.mesh)
        if impl == "plain":
            cell.mesh = jax.sharding.Mesh(
                cell.mesh.devices, cell.mesh.axis_names
            )  # Auto axes: plain jit code
            cell.trainer = PlainTrainer(cfg, cell.mesh, tc.lr, tc.weight_decay, tc.clip_norm, tc.b1, tc.b2)
        else:
            cell.trainer = train.Trainer.create(jaxtp.Transformer.create(cfg, cell.mesh, seed=0), tc)
    except ValueError as e:  # too few devices, a mesh that does not divide heads / d_ff / the batch
        cell.row["skipped"] = str(e).split(";")[0]
        print(
            f"  {name} N={cfg.n_heads} {spec} {precision} {impl}: skipped ({cell.row['skipped']})",
            file=sys.stderr,
        )
        return cell
    cell.row.update(
        compile_step(cell),
        state_bytes_per_device=bytes_per_device((cell.trainer.params, cell.trainer.opt_state)),
        flops_per_step=train.train_flops_per_step(cfg, batch, seq_len),
    )
    cell.row["first_step_s"] = cell.step()
    for _ in range(WARMUP_STEPS - 1):
        cell.step()
    return cell


def time_round_robin(cells: list[TrainCell], repeats: int) -> None:
    """`repeats` rounds of one timed step on every cell, so noise lands on all meshes alike."""
    for _ in range(repeats):
        for cell in cells:
            cell.times.append(cell.step())


def finish_row(cell: TrainCell) -> dict:
    """Median step time, throughput and the jit cache size after every timed step."""
    r = cell.row
    r.update(
        step_s=statistics.median(cell.times),
        step_times_s=cell.times,
        jit_cache_size=compile_count(cell.trainer.step_fn),
    )
    r.update(
        tokens_per_s=r["batch"] * r["seq_len"] / r["step_s"], flops_per_s=r["flops_per_step"] / r["step_s"]
    )
    print(
        f"  {r['preset']} N={r['heads']} {r['mesh']} {r['precision']} {r['impl']}: compile {r['compile_s']:.1f}s, "
        f"step {r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} tok/s, cache {r['jit_cache_size']}",
        file=sys.stderr,
    )
    return r


def parallel_devices(spec: str) -> int:
    """Devices whose peaks add up on this mesh: fake CPU devices share one host's cores, so 1 there."""
    return 1 if jax.default_backend() == "cpu" else math.prod(jaxtp.parse_mesh_spec(spec).values())


def add_mfu(rows: list[dict], peaks: list[float]) -> None:
    """MFU of every timed row against the larger of the matmul peaks measured at start and end."""
    for r in rows:
        if "step_s" in r:
            r.update(
                peak_flops_per_s=max(peaks), peak_start_flops_per_s=peaks[0], peak_end_flops_per_s=peaks[1]
            )
            r["mfu"] = r["flops_per_s"] / (max(peaks) * parallel_devices(r["mesh"]))


def bench_train(args) -> list[dict]:
    """Train step compile time, step time, throughput, MFU, bytes and collectives per model x mesh x precision."""
    corpus = data.load_corpus("synthetic")
    peaks = [matmul_peak_flops()]
    rows = []
    for name in args.train_presets:
        for precision in args.train_precisions:
            impls = (
                ["jaxtp", "plain"] if args.reference and precision == "f32" and "+" not in name else ["jaxtp"]
            )
            cells = [
                prepare_cell(name, precision, spec, cfg, corpus, impl)
                for impl in impls
                for spec, cfg in train_cells(model_config(name), args.meshes)
            ]
            live = [c for c in cells if c.trainer is not None]
            time_round_robin(live, args.repeats)
            rows += [finish_row(c) if c.trainer is not None else c.row for c in cells]
            del cells, live  # free this group's trainers before the next one is built
    peaks.append(matmul_peak_flops())
    add_mfu(rows, peaks)
    return rows


OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


def check(preset: str, name: str, value, op: str, limit: float) -> dict:
    """One PASS / MISS line of the summary (n/a when the rows it needs were not run)."""
    met = value is not None and OPS[op](value, limit)
    return dict(
        preset=preset,
        check=name,
        value=value,
        op=op,
        limit=limit,
        target=f"{op} {limit:g}",
        status="n/a" if value is None else "PASS" if met else "MISS",
    )


def overhead_checks(rows: list[dict]) -> list[dict]:
    """Mesh/1x1 step-time ratios per model (f32, the same heads on both), mid on 2x4, and recompiles; each
    jaxtp value with the plain reference's in the same run beside it (`plain`) where that was timed."""
    f32 = [r for r in rows if r["precision"] == "f32" and "step_s" in r]
    find = lambda preset, mesh, heads=None, impl="jaxtp": next(
        (
            r
            for r in f32
            if r["preset"] == preset
            and r["mesh"] == mesh
            and heads in (None, r["heads"])
            and r["impl"] == impl
        ),
        None,
    )

    def ratio(preset, mesh, impl="jaxtp"):
        r = find(preset, mesh, impl=impl)
        ref = r and find(preset, "1x1", r["heads"], impl)
        if not (r and ref):
            return None, None
        # Paired: the median over rounds of this round's step(mesh) / step(1x1), timed back to back, so a
        # slow spell of a shared host cancels out instead of landing on one side of a ratio of medians.
        return statistics.median(a / b for a, b in zip(r["step_times_s"], ref["step_times_s"])), r["heads"]

    checks = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for mesh, limit in RATIO_TARGETS.items():
            value, heads = ratio(preset, mesh)
            checks.append(
                dict(
                    check(
                        preset,
                        f"step({mesh})/step(1x1)" + (f" N={heads}" if heads else ""),
                        value,
                        "<=",
                        limit,
                    ),
                    plain=ratio(preset, mesh, "plain")[0],
                )
            )
    mid, plain_mid = find("mid", "2x4"), find("mid", "2x4", impl="plain")
    checks += [
        dict(
            check("mid", f"2x4 {key}", mid and mid.get(key), op, limit),
            plain=plain_mid and plain_mid.get(key),
        )
        for key, op, limit in MID_TARGETS
    ]
    timed = [r for r in rows if "jit_cache_size" in r and r["impl"] == "jaxtp"]
    checks.append(
        check(
            "all",
            "jit cache size after timed steps (max)",
            max(r["jit_cache_size"] for r in timed) if timed else None,
            "==",
            1,
        )
    )
    return checks


def summarise_train(rows: list[dict]) -> tuple[str, dict, str]:
    """The `overhead` summary: its JSON and a markdown table of PASS/MISS checks."""
    r = next((r for r in rows if "mfu" in r), None)
    peak = r and dict(
        start=r["peak_start_flops_per_s"], end=r["peak_end_flops_per_s"], used=r["peak_flops_per_s"]
    )
    summary = dict(precision="f32", peak_flops_per_s=peak, checks=overhead_checks(rows))
    used = "-" if peak is None else f"{peak['start'] / 1e9:.1f} at start, {peak['end'] / 1e9:.1f} at end"
    text = f"### overhead (f32 rows; matmul peak {used} GFLOP/s, the larger used)\n\n" + markdown_table(
        summary["checks"],
        [
            ("preset", "model", ""),
            ("check", "check", ""),
            ("value", "measured", ".3g"),
            ("target", "target", ""),
            ("status", "", ""),
            ("plain", "plain JAX, same run", ".3g"),
        ],
    )
    return "overhead", summary, text


def plot_train(rows: list[dict], out: str) -> None:
    """Median step time by mesh, one panel per model, bars per precision, dashed lines at the 1x1 levels;
    written beside the --out JSON as <name>_steps.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "step_s" in r]
    models = list(dict.fromkeys(r["preset"] for r in timed))
    if not models:
        return
    series = lambda r: r["precision"] + ("" if r["impl"] == "jaxtp" else " plain JAX")
    precisions = list(dict.fromkeys(series(r) for r in timed))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in timed if r["preset"] == name]
        variants = list(
            dict.fromkeys(r["heads"] for r in mine)
        )  # each variant's 1x1 bar first, then its meshes
        cells = sorted(
            dict.fromkeys((r["heads"], r["mesh"]) for r in mine),
            key=lambda c: (variants.index(c[0]), c[1] != "1x1"),
        )
        width = 0.8 / len(precisions)
        for i, precision in enumerate(precisions):
            ms = {(r["heads"], r["mesh"]): 1e3 * r["step_s"] for r in mine if series(r) == precision}
            ax.bar(
                [j + i * width for j in range(len(cells))],
                [ms.get(c, 0) for c in cells],
                width,
                color=f"C{i}",
                label=precision,
            )
            for k, heads in enumerate(variants):
                if (heads, "1x1") in ms:
                    ax.axhline(
                        ms[(heads, "1x1")],
                        color=f"C{i}",
                        ls=("--", ":")[k % 2],
                        lw=1,
                        label=f"1x1 N={heads} {precision}",
                    )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))], [f"{m}\nN={h}" for h, m in cells])
        ax.set(title=f"{name}: B={mine[0]['batch']}, S={mine[0]['seq_len']}", ylabel="median step (ms)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(beside(out, "_steps.png"), dpi=100)
    plt.close(fig)


MiB = lambda v: f"{v / 2**20:,.2f}"
TRAIN_COLUMNS = [
    ("preset", "model", ""),
    ("impl", "impl", ""),
    ("heads", "N", ""),
    ("mesh", "mesh", ""),
    ("precision", "precision", ""),
    ("batch", "B", ""),
    ("seq_len", "S", ""),
    ("compile_s", "compile s", ".2f"),
    ("first_step_s", "1st step s", ".3f"),
    ("step_s", "step ms", lambda v: f"{v * 1e3:.1f}"),
    ("tokens_per_s", "tok/s", ",.0f"),
    ("flops_per_s", "GFLOP/s", lambda v: f"{v / 1e9:.2f}"),
    ("mfu", "MFU", ".1%"),
    ("state_bytes_per_device", "state MiB/dev", MiB),
    ("temp_bytes_per_device", "temp MiB/dev", MiB),
    ("collectives_model", "collectives@model", lambda d: ", ".join(f"{k} {n}" for k, n in d.items())),
    ("jit_cache_size", "jit cache", ""),
    ("skipped", "note", ""),
]


# ------------------------------------------------------------------------------- generation section


def bench_generation(args) -> list[dict]:
    """Prefill and decode tokens/s of jaxtp.generate per preset x mesh x precision."""
    rows = []
    for preset in args.presets:
        cfg = model_config(preset)
        prompt = np.random.default_rng(0).integers(
            0, cfg.vocab_size, (args.batch, args.prompt_len), dtype=np.int32
        )
        for spec in args.meshes:
            t0 = time.perf_counter()
            f32 = build(cfg, spec)  # built once per mesh; each precision is cast from it
            build_s = time.perf_counter() - t0
            for precision in args.precisions:
                row = dict(
                    preset=preset,
                    mesh=spec,
                    precision=precision,
                    batch=args.batch,
                    prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens,
                )
                rows.append(row)
                t0 = time.perf_counter()
                model = f32 if isinstance(f32, str) else cast(f32, precision)
                if args.prompt_len + args.new_tokens > cfg.max_seq_len:
                    model = f"prompt + new tokens > max_seq_len={cfg.max_seq_len}"
                if isinstance(model, str):
                    row["skipped"] = model
                    print(f"  {preset} {spec} {precision}: skipped ({model})", file=sys.stderr)
                    continue
                jax.block_until_ready(jax.tree.leaves(model))
                run = lambda stats: jaxtp.generate(
                    model, prompt, args.new_tokens, temperature=args.temperature, seed=0, stats=stats
                )
                t1 = time.perf_counter()
                warm = {}
                run(warm)  # compiles prefill and the decode step
                t2 = time.perf_counter()
                timed = []
                for _ in range(args.repeats):
                    stats = {}
                    run(stats)
                    timed.append(stats)
                prefill = statistics.median(s["prefill_tokens"] / s["prefill_s"] for s in timed)
                decode = statistics.median(s["decode_tokens"] / s["decode_s"] for s in timed)
                step_ms = statistics.median(1e3 * s["decode_s"] / max(s["decode_steps"], 1) for s in timed)
                row.update(
                    build_s=build_s + t1 - t0,
                    first_call_s=t2 - t1,
                    prefill_tok_s=prefill,
                    decode_tok_s=decode,
                    decode_step_ms=step_ms,
                    params=cfg.param_count(),
                    cache_bytes_per_device=cache_bytes_per_device(
                        model, args.batch, args.prompt_len + args.new_tokens
                    ),
                )
                print(
                    f"  {preset} {spec} {precision}: prefill {prefill:,.0f} tok/s, decode {decode:,.0f} tok/s "
                    f"({step_ms:.2f} ms/step), first call {t2 - t1:.1f}s",
                    file=sys.stderr,
                )
    return rows


GENERATION_COLUMNS = [
    ("preset", "preset", ""),
    ("mesh", "mesh", ""),
    ("precision", "precision", ""),
    ("batch", "B", ""),
    ("prompt_len", "prompt", ""),
    ("new_tokens", "new", ""),
    ("prefill_tok_s", "prefill tok/s", ",.0f"),
    ("decode_tok_s", "decode tok/s", ",.0f"),
    ("decode_step_ms", "ms/step", ".2f"),
    ("first_call_s", "compile+1st run s", ".1f"),
    ("cache_bytes_per_device", "KV bytes/dev", ","),
    ("skipped", "note", ""),
]


class Section(NamedTuple):
    run: Callable  # args -> rows
    columns: list
    summarise: Callable | None = None  # rows -> (JSON key, summary, markdown)
    plot: Callable | None = None  # (rows, --out path) -> None: writes its image beside the JSON


SECTIONS = {
    "train": Section(bench_train, TRAIN_COLUMNS, summarise_train, plot_train),
    "generation": Section(bench_generation, GENERATION_COLUMNS),
    "attention": Section(bench_attention, ATTENTION_COLUMNS, summarise_attention),
    "kv_cache": Section(bench_kv_cache, KV_CACHE_COLUMNS, summarise_kv_cache),
}


# ------------------------------------------------------------------------------------------ main


def beside(out: str, suffix: str) -> str:
    """A path next to the --out JSON: bench.json -> bench.md, bench_steps.png."""
    return os.path.splitext(out)[0] + suffix


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cpu_devices:
        jaxtp.use_cpu_devices(args.cpu_devices)

    devices = jax.devices()
    meta = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=len(devices),
        device_kind=devices[0].device_kind,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        argv=sys.argv[1:] if argv is None else argv,
        args={k: v for k, v in vars(args).items()},
    )
    print(
        f"jax {jax.__version__} on {len(devices)} {jax.default_backend()} device(s) ({devices[0].device_kind})",
        file=sys.stderr,
    )
    results, markdown = {"meta": meta}, []
    for name in args.sections:
        section = SECTIONS[name]
        t = time.perf_counter()
        results[name] = section.run(args)
        parts = [
            f"## {name} ({time.perf_counter() - t:.0f}s)\n\n" + markdown_table(results[name], section.columns)
        ]
        if section.summarise:
            key, results[key], text = section.summarise(results[name])
            parts.append(text)
        if section.plot and args.out:
            section.plot(results[name], args.out)
        print("\n" + "\n\n".join(parts))
        markdown += parts
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        with open(beside(args.out, ".md"), "w") as f:
            f.write("\n\n".join(markdown) + "\n")
        print(f"\nwrote {args.out}, {beside(args.out, '.md')}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
