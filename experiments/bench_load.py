"""Checkpoint loading: jaxtp.hf.load against transformers' from_pretrained, on the same random bf16 Llama files.

    python experiments/bench_load.py                          # ~1 GB checkpoint, 3 repeats -> bench_load.json
    python experiments/bench_load.py --small --repeats 1      # a tiny checkpoint in seconds (the test's run)
    python experiments/bench_load.py --size-gb 2 --mesh 2x4 --workdir ckpts --out load.json

The checkpoint is a LlamaForCausalLM (D=2048, N=16, K=8, F=5632, V=32000; layers chosen to reach --size-gb)
written straight from numpy (random bf16, like most HF uploads) in 3-4 shards with an index, so it is
built in seconds rather than through transformers' random init. It is cached in --workdir and reused.

Every measurement runs in a fresh child process, so its peak RSS is the load's alone: the child imports its
library (and for jaxtp fakes the CPU devices and builds the mesh), records RSS, resets the kernel's RSS
high-water mark (/proc/self/clear_refs), loads, waits for every array, and reports
  * seconds: wall time of the load call (jaxtp: until every leaf is ready);
  * ready_s: wall time until every weight has been read into memory (jaxtp: the same; transformers: the load
    plus one pass over every weight, which pages in what its bf16 load left on the file's memory map);
  * GB/s: checkpoint bytes on disk (all .safetensors files) / seconds. The files are read once beforehand,
    so every run reads from the page cache, not the disk;
  * final GB/host: bytes of the loaded model held by this process (jaxtp: every addressable shard, so
    replicated norms count once per device; transformers: parameters + buffers);
  * peak growth: peak RSS during the load minus RSS before it (mapped file pages count: they are resident),
    and ratio = peak growth / final bytes (1.0 = nothing but the result was ever resident; target <= 1.15);
  * transient GB: peak growth - final bytes, the memory the loader needed beyond its result. With real
    accelerators the result lives in device memory, so this is the host memory a load costs;
  * cpu_s, sys_s: CPU seconds of the load, all threads (sys: the kernel's share, mostly page faults). On a
    shared machine wall seconds include waiting for other users; CPU seconds do not;
  * resident GB: RSS growth once every weight has been read (transformers' bf16 weights are zero-copy views of
    the file's memory map, so its load reads nothing and they page in on first use; jaxtp's are copies).
Rows are measured round-robin (one run of each row per round, --repeats rounds) so that noise from other
users of a shared machine hits every row alike; medians are quoted. Targets, each PASS or MISS: jaxtp's
seconds <= transformers' at the same precision, jaxtp's peak growth <= 0.5 x transformers', the same two
like for like (ready_s; transient GB), and jaxtp's ratio <= 1.15. (int8 reads the file twice: a pass for the per-channel scales, then one to quantize.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPE = dict(
    hidden_size=2048, num_attention_heads=16, num_key_value_heads=8, intermediate_size=5632, vocab_size=32000
)
SMALL = dict(
    hidden_size=64,
    num_attention_heads=8,
    num_key_value_heads=8,
    intermediate_size=128,
    vocab_size=512,
    num_hidden_layers=2,
)
SHARD_FILES = 3  # a sharded checkpoint with an index, as real uploads of this size come
ROWS = [
    ("jaxtp", "f32"),
    ("jaxtp", "bf16"),
    ("jaxtp", "int8"),
    ("transformers", "f32"),
    ("transformers", "bf16"),
]
RATIO_TARGET = 1.15
COLUMNS = (
    "impl",
    "precision",
    "seconds",
    "ready_s",
    "gb_per_s",
    "final_gb",
    "peak_growth_gb",
    "transient_gb",
    "ratio",
    "cpu_s",
    "sys_s",
    "resident_gb",
)


def tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    """{HF name: shape} of an untied LlamaForCausalLM, in the order save_pretrained writes them."""
    D, F, V = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    H = D // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * H, shape["num_key_value_heads"] * H
    out = {"model.embed_tokens.weight": (V, D)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q, D),
            p + "self_attn.k_proj.weight": (kv, D),
            p + "self_attn.v_proj.weight": (kv, D),
            p + "self_attn.o_proj.weight": (D, q),
            p + "mlp.gate_proj.weight": (F, D),
            p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F),
        }
    return out | {"model.norm.weight": (D,), "lm_head.weight": (V, D)}


def shape_for(size_gb: float) -> dict:
    """SHAPE with the fewest layers (at least 1) whose bf16 weights reach size_gb (10^9 bytes)."""
    one = sum(math.prod(s) for s in tensor_shapes({**SHAPE, "num_hidden_layers": 1}).values())
    two = sum(math.prod(s) for s in tensor_shapes({**SHAPE, "num_hidden_layers": 2}).values())
    layers = max(1, math.ceil((size_gb * 1e9 / 2 - (2 * one - two)) / (two - one)))
    return {**SHAPE, "num_hidden_layers": layers}


def write_checkpoint(directory: pathlib.Path, shape: dict, seed: int = 0) -> pathlib.Path:
    """A random bf16 checkpoint at `directory` (config.json, shards, index), unless a complete one is there.
    Norm weights are ~1 and matrices ~N(0, 0.02), so the weights look like a trained model's to the loaders."""
    import ml_dtypes
    from safetensors.numpy import save_file

    if (directory / "complete").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        **shape,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        dtype="bfloat16",
        torch_dtype="bfloat16",
    )
    (directory / "config.json").write_text(
        json.dumps(config, indent=1)
    )  # by hand: importing transformers is slow
    shapes = tensor_shapes(shape)
    groups, size, limit = [[]], 0, sum(2 * math.prod(s) for s in shapes.values()) / SHARD_FILES
    for name, s in shapes.items():  # consecutive tensors up to `limit` bytes per file, like save_pretrained
        if size and size + 2 * math.prod(s) > limit:
            groups, size = groups + [[]], 0
        groups[-1].append(name)
        size += 2 * math.prod(s)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, names in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            x = rng.standard_normal(shapes[name], dtype=np.float32)
            tensors[name] = (1 + 0.1 * x if len(shapes[name]) == 1 else 0.02 * x).astype(ml_dtypes.bfloat16)
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
        del tensors
    total = sum(2 * math.prod(s) for s in shapes.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (directory / "complete").write_text("")
    return directory


def weight_bytes(directory: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def warm_page_cache(directory: pathlib.Path):
    """Read every file once so that all runs (the first included) read from memory, not the disk."""
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as h:
            while h.read(64 << 20):
                pass


# ---- child: one load in a fresh process -------------------------------------------------------------------


def _rss() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) in bytes."""
    try:
        status = pathlib.Path("/proc/self/status").read_text()
        kb = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", status, re.M).group(1)) * 1024
        return kb("VmRSS"), kb("VmHWM")
    except OSError:  # no procfs: whole-process peak (the child does nothing heavier before the load)
        import psutil

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return psutil.Process().memory_info().rss, peak * (1 if sys.platform == "darwin" else 1024)


def _cpu() -> dict:
    """CPU seconds of this process (all threads) and its minor page faults: on a shared machine, wall time
    includes waiting for other users' processes; CPU time does not."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return dict(cpu_s=r.ru_utime + r.ru_stime, sys_s=r.ru_stime, minor_faults=r.ru_minflt)


def _reset_peak():
    """Set the kernel's RSS high-water mark to the current RSS, so the peak is the load's alone."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(impl: str, precision: str, ckpt: str, mesh_spec: str) -> dict:
    if impl == "jaxtp":
        import jax
        from flax import nnx

        import jaxtp

        jaxtp.use_cpu_devices(math.prod(jaxtp.mesh.parse_mesh_spec(mesh_spec).values()))
        mesh = jaxtp.make_mesh(mesh_spec)
        load = lambda: jax.block_until_ready(jaxtp.hf.load(ckpt, mesh, precision=precision))
        leaves = lambda m: jax.tree.leaves(nnx.state(m))
        host = lambda x: sum(s.data.nbytes for s in x.addressable_shards)
        touch = lambda arrays: None  # device buffers: resident once ready
    else:
        import torch
        import transformers

        _ = transformers.LlamaForCausalLM  # resolve the lazy import now, not inside the timed call
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[precision]
        load = lambda: transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
        leaves = lambda m: [*m.parameters(), *m.buffers()]
        host = lambda x: x.nbytes
        touch = lambda arrays: [x.detach().sum() for x in arrays]  # weights still on the file's mmap page in
    before, _ = _rss()
    cpu = _cpu()
    _reset_peak()
    t = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t
    cpu = {k: v - cpu[k] for k, v in _cpu().items()}
    after, peak = _rss()
    arrays = leaves(model)
    touch(arrays)
    ready = time.perf_counter() - t
    return dict(
        seconds=seconds,
        ready_s=ready,
        **cpu,
        rss_before=before,
        rss_after=after,
        peak_rss=peak,
        peak_growth=peak - before,
        resident=_rss()[0] - before,
        final_bytes=sum(host(x) for x in arrays),
        model_bytes=sum(int(x.nbytes) for x in arrays),
    )


def measure(impl: str, precision: str, ckpt: pathlib.Path, mesh: str) -> dict:
    """One load in a fresh interpreter; its result is the JSON on the last line of its stdout."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    spec = json.dumps(dict(impl=impl, precision=precision, ckpt=str(ckpt), mesh_spec=mesh))
    p = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"{impl} {precision} load failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- parent -------------------------------------------------------------------------------------------------


def summarise(impl, precision, runs, file_bytes) -> dict:
    med = lambda k: statistics.median(r[k] for r in runs)
    seconds, growth, final = med("seconds"), med("peak_growth"), med("final_bytes")
    return dict(
        impl=impl,
        precision=precision,
        seconds=seconds,
        ready_s=med("ready_s"),
        gb_per_s=file_bytes / seconds / 1e9,
        final_gb=final / 1e9,
        peak_growth_gb=growth / 1e9,
        transient_gb=(growth - final) / 1e9,
        ratio=growth / final,
        cpu_s=med("cpu_s"),
        sys_s=med("sys_s"),
        resident_gb=med("resident") / 1e9,
        model_bytes=runs[0]["model_bytes"],
        final_bytes=final,
        runs=runs,
    )


def _at_most(check: str, value: float, limit: float) -> dict:
    return dict(check=check, value=value, limit=limit, status="PASS" if value <= limit else "MISS")


def targets(rows: list[dict]) -> list[dict]:
    by = {(r["impl"], r["precision"]): r for r in rows}
    out = []
    for p in ("f32", "bf16"):
        j, t = by.get(("jaxtp", p)), by.get(("transformers", p))
        if j and t:
            out += [
                _at_most(f"{p}: jaxtp seconds <= transformers seconds", j["seconds"], t["seconds"]),
                _at_most(
                    f"{p}: jaxtp peak growth <= 0.5 x transformers'",
                    j["peak_growth_gb"],
                    0.5 * t["peak_growth_gb"],
                ),
                # Like for like: every weight resident (transformers' bf16 load maps the file and reads
                # nothing), and the memory beyond the result (all a loader needs on a host whose devices
                # are accelerators; on fake CPU devices the result itself is host memory).
                _at_most(
                    f"{p}: jaxtp seconds <= transformers' with every weight read", j["ready_s"], t["ready_s"]
                ),
                _at_most(
                    f"{p}: jaxtp memory beyond the result <= 0.5 x transformers'",
                    j["transient_gb"],
                    0.5 * t["transient_gb"],
                ),
            ]
    for r in rows:
        if r["impl"] == "jaxtp":
            out.append(
                _at_most(
                    f"{r['precision']}: jaxtp peak growth / final bytes <= {RATIO_TARGET}",
                    r["ratio"],
                    RATIO_TARGET,
                )
            )
    return out


def table(rows, checks) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "| target | value | limit | status |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']:.3g} | {c['limit']:.3g} | {c['status']} |" for c in checks]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--size-gb", type=float, default=1.0, help="checkpoint size in bf16, 10^9 bytes (default 1)"
    )
    p.add_argument(
        "--small", action="store_true", help="a tiny 2-layer checkpoint instead (seconds; for tests)"
    )
    p.add_argument(
        "--workdir",
        default=os.path.join(tempfile.gettempdir(), "jaxtp-bench-load"),
        help="where checkpoints are written and reused (default: a folder in the temp dir)",
    )
    p.add_argument("--mesh", default="1x8", help="jaxtp mesh spec (data x model); that many fake CPU devices")
    p.add_argument("--repeats", type=int, default=3, help="runs per row, in round-robin rounds (default 3)")
    p.add_argument(
        "--rows", default=",".join(f"{i}:{p}" for i, p in ROWS), help="comma list of impl:precision"
    )
    p.add_argument("--out", default="bench_load.json", help="JSON results (default bench_load.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(**json.loads(args.child))))
        return {}
    shape = SMALL if args.small else shape_for(args.size_gb)
    name = "llama-" + "-".join(str(shape[k]) for k in sorted(shape))
    t = time.perf_counter()
    ckpt = write_checkpoint(pathlib.Path(args.workdir) / name, shape)
    file_bytes = weight_bytes(ckpt)
    params = sum(math.prod(s) for s in tensor_shapes(shape).values())
    print(
        f"checkpoint {name}: {params / 1e6:.1f}M params, {file_bytes / 1e9:.3f} GB bf16 "
        f"({time.perf_counter() - t:.0f}s to write or find)",
        file=sys.stderr,
    )
    warm_page_cache(ckpt)
    rows = [tuple(r.split(":")) for r in args.rows.split(",")]
    runs = {r: [] for r in rows}
    for i in range(args.repeats):
        for impl, precision in rows:
            runs[impl, precision].append(m := measure(impl, precision, ckpt, args.mesh))
            print(
                f"round {i + 1}/{args.repeats} {impl} {precision}: {m['seconds']:.2f}s, "
                f"peak +{m['peak_growth'] / 1e9:.3f} GB",
                file=sys.stderr,
            )
    results = [summarise(*r, runs[r], file_bytes) for r in rows]
    checks = targets(results)
    print(table(results, checks))
    out = dict(
        checkpoint=dict(
            name=name,
            shape=shape,
            params=params,
            file_bytes=file_bytes,
            files=len(list(ckpt.glob("*.safetensors"))),
        ),
        mesh=args.mesh,
        repeats=args.repeats,
        cpu_count=os.cpu_count(),
        rows=results,
        targets=checks,
        bytes_note="gb_per_s = checkpoint bytes on disk (bf16 .safetensors) / seconds, read from page cache",
    )
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
