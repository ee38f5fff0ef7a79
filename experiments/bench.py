"""Benchmarks -> a markdown table on stdout and JSON (--out).

    python experiments/bench.py --quick --out bench.json
    python experiments/bench.py --presets tiny,small --meshes 1x1,2x4 --precisions f32,bf16,int8

Each section is one function `bench_<name>(args) -> list[dict]` registered in SECTIONS; add a section
(e.g. a train step) by writing its function and adding it there. Rows that cannot run (a mesh that does
not divide the preset's heads, too few devices, a precision without jaxtp.cast) are reported as skipped.

On a machine without an accelerator, N fake CPU devices (default 8) are created before JAX starts so
that sharded meshes run; with a GPU/TPU, the fake CPU devices are harmless and meshes use the real ones.
Timings are medians over --repeats runs after one warm-up run (which compiles). On CPU, bf16/int8 are
about numerics and bytes, not speed (see DESIGN.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxtp  # noqa: E402  (jax is imported but not initialised: fake devices can still be set)
from jaxtp.generate import cache_bytes_per_device  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset, small shapes: about a minute on 2 CPU cores")
    p.add_argument("--out", help="write results as JSON to this file")
    p.add_argument("--sections", default="generation", help=f"comma list of: {', '.join(SECTIONS)}")
    p.add_argument("--presets", help="comma list of model presets (default: tiny,small; --quick: tiny)")
    p.add_argument("--meshes", default="1x1,2x4,1x8", help="comma list of mesh specs (data x model)")
    p.add_argument("--precisions", default="f32,bf16,int8", help="comma list; bf16/int8 need jaxtp.cast")
    p.add_argument("--batch", type=int, help="prompts per batch (default 8)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per row (default 32; --quick 16)")
    p.add_argument("--new-tokens", type=int, help="generated tokens per row (default 64; --quick 16)")
    p.add_argument("--repeats", type=int, help="timed runs per row after warm-up (default 5; --quick 3)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--cpu-devices", type=int, default=int(os.environ.get("JAXTP_CPU_DEVICES", 8)),
                   help="fake CPU devices to create before JAX starts (0: leave JAX's default)")
    args = p.parse_args(argv)
    quick = args.quick
    args.presets = (args.presets or ("tiny" if quick else "tiny,small")).split(",")
    args.meshes = args.meshes.split(",")
    args.precisions = args.precisions.split(",")
    args.sections = args.sections.split(",")
    args.batch = args.batch or 8
    args.prompt_len = args.prompt_len or (16 if quick else 32)
    args.new_tokens = args.new_tokens or (16 if quick else 64)
    args.repeats = args.repeats or (3 if quick else 5)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    return args


# --------------------------------------------------------------------------------------- helpers

def build(preset: str, spec: str):
    """An f32 model of `preset` on mesh `spec`, or a string saying why it cannot run there."""
    try:
        return jaxtp.Transformer.create(jaxtp.ModelConfig.preset(preset), jaxtp.make_mesh(spec), seed=0)
    except ValueError as e:  # too few devices, or the mesh does not divide heads / d_ff
        return str(e).split(";")[0]


def cast(model, precision: str):
    """`model` in `precision`, or a string saying why not."""
    if precision == "f32":
        return model
    if not hasattr(jaxtp, "cast"):
        return "jaxtp.cast is not available"
    try:
        return jaxtp.cast(model, precision)
    except ValueError as e:
        return str(e)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); missing values print as '-'."""
    fmt = lambda r, k, f: "-" if r.get(k) is None else format(r[k], f) if f else str(r[k])
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---:" if f else "---" for _, _, f in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- sections

def bench_generation(args) -> list[dict]:
    """Prefill and decode tokens/s of jaxtp.generate per preset x mesh x precision."""
    import jax
    import numpy as np

    rows = []
    for preset in args.presets:
        cfg = jaxtp.ModelConfig.preset(preset)
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt_len), dtype=np.int32)
        for spec in args.meshes:
            t0 = time.perf_counter()
            f32 = build(preset, spec)  # built once per mesh; each precision is cast from it
            build_s = time.perf_counter() - t0
            for precision in args.precisions:
                row = dict(preset=preset, mesh=spec, precision=precision, batch=args.batch,
                           prompt_len=args.prompt_len, new_tokens=args.new_tokens)
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
                run = lambda stats: jaxtp.generate(model, prompt, args.new_tokens, temperature=args.temperature,
                                                   seed=0, stats=stats)
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
                row.update(build_s=build_s + t1 - t0, first_call_s=t2 - t1, prefill_tok_s=prefill,
                           decode_tok_s=decode, decode_step_ms=step_ms, params=cfg.param_count(),
                           cache_bytes_per_device=cache_bytes_per_device(model, args.batch,
                                                                         args.prompt_len + args.new_tokens))
                print(f"  {preset} {spec} {precision}: prefill {prefill:,.0f} tok/s, decode {decode:,.0f} tok/s "
                      f"({step_ms:.2f} ms/step), first call {t2 - t1:.1f}s", file=sys.stderr)
    return rows


GENERATION_COLUMNS = [("preset", "preset", ""), ("mesh", "mesh", ""), ("precision", "precision", ""),
                      ("batch", "B", ""), ("prompt_len", "prompt", ""), ("new_tokens", "new", ""),
                      ("prefill_tok_s", "prefill tok/s", ",.0f"), ("decode_tok_s", "decode tok/s", ",.0f"),
                      ("decode_step_ms", "ms/step", ".2f"), ("first_call_s", "compile+1st run s", ".1f"),
                      ("cache_bytes_per_device", "KV bytes/dev", ","), ("skipped", "note", "")]

SECTIONS = {"generation": (bench_generation, GENERATION_COLUMNS)}


# ------------------------------------------------------------------------------------------ main

def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cpu_devices:
        jaxtp.use_cpu_devices(args.cpu_devices)
    import jax

    devices = jax.devices()
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), jax=jax.__version__,
                backend=jax.default_backend(), devices=len(devices), device_kind=devices[0].device_kind,
                python=platform.python_version(), cpu_count=os.cpu_count(), argv=sys.argv[1:],
                args={k: v for k, v in vars(args).items()})
    print(f"jax {jax.__version__} on {len(devices)} {jax.default_backend()} device(s) ({devices[0].device_kind})",
          file=sys.stderr)
    results = {"meta": meta}
    for name in args.sections:
        fn, columns = SECTIONS[name]
        t = time.perf_counter()
        results[name] = fn(args)
        print(f"\n## {name} ({time.perf_counter() - t:.0f}s)\n")
        print(markdown_table(results[name], columns))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
