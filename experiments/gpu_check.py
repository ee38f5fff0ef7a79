"""One prepared GPU check, sized for a single H200 in under 8 minutes including compiles.

    python experiments/gpu_check.py            # the 1b preset; JSON to --out, else $OUT/gpu_check.json
    python experiments/gpu_check.py --tiny     # the same code path with the tiny preset: a CPU smoke test

(a) train: the `1b` preset (Llama-3.2-1B shapes: V=128256, D=2048, L=16, N=32, K=8, F=8192) with f32
    master weights and Adam state, bf16 compute, on a 1x1 mesh at --batch x --seq-len (default 2 x 2048:
    jaxtp.plan predicts 64 GiB per device, 4 x 2048 110 GiB of the H200's 141 GB, since the attention
    scores are materialised). Trace+lower and XLA compile are timed apart, before the first execution;
    then the median of --steps steps after --warmup warm-up steps, tokens/s, and MFU against the
    datasheet dense bf16 peak of --hardware (jaxtp.HARDWARE) and, for reference, against a bf16
    matmul peak measured here (--peak-n cubed). XLA's memory analysis is reported beside the plan's.
(b) decode: greedy generation at batch 1 (--prompt-len prompt + --new-tokens new) with bf16 weights
    (jaxtp.cast of the model from (a)) and int8 weight-only weights (jaxtp.cast of that bf16 model, so
    norms and compute dtype are the same and only the matmul weights differ). One warm-up call each
    (compiles), then --decode-repeats timed calls alternating between the two; median decode tokens/s
    and the int8/bf16 ratio (target >= 1.6).
(c) long context: the same train step at batch 1 x --long-seq-len (default 8192; --tiny 256) with attention
    "cudnn", "blockwise" and "xla" (ModelConfig.attention): compile time, XLA's memory analysis and the
    median of --long-steps steps each. xla materialises every layer's S x S scores and may not fit: that
    variant then records its error and the others still run.
(d) KV cache: batch-1 greedy decode of the bf16 model after a --kv-prompt-len prompt (default 4096; --tiny
    32), with a bf16 and an int8 KV cache (jaxtp.generate(kv_cache_dtype=...)): decode tokens/s (medians of
    --decode-repeats alternating calls) and KV bytes per device.

A part that fails (out of memory, say) is recorded as its `error` and the other part still runs; the
JSON is rewritten after each part, and the exit status is 1 if a part failed. Uses only jaxtp's own
dependencies (jax, flax, optax, numpy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax  # imported, not initialised: the memory fraction below can still be set
import jax.numpy as jnp
import numpy as np

import jaxtp
from jaxtp import data, measure, train
from jaxtp.generation import cache_bytes_per_device
from jaxtp.measure import matmul_peak_flops, timed_train_step

DECODE_TARGET = 1.6  # int8 / bf16 decode tokens/s, at least
GiB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tiny",
        "--dry-run",
        action="store_true",
        help="tiny preset and small shapes: runs the same code path on CPU in seconds",
    )
    p.add_argument("--batch", type=int, help="train: global batch (default 2; --tiny 4)")
    p.add_argument("--seq-len", type=int, help="train: tokens per sequence (default 2048; --tiny 64)")
    p.add_argument(
        "--warmup", type=int, default=3, help="train: warm-up steps, the first included (default 3)"
    )
    p.add_argument("--steps", type=int, default=10, help="train: timed steps (default 10)")
    p.add_argument("--prompt-len", type=int, help="decode: prompt tokens (default 128; --tiny 16)")
    p.add_argument("--new-tokens", type=int, help="decode: generated tokens (default 256; --tiny 16)")
    p.add_argument(
        "--decode-repeats", type=int, default=3, help="decode: timed calls per precision (default 3)"
    )
    p.add_argument(
        "--hardware", default="h200", help="datasheet peak for MFU, from jaxtp.HARDWARE (default h200)"
    )
    p.add_argument(
        "--peak-n", type=int, help="measured bf16 matmul peak: n x n x n (default 8192; --tiny 256)"
    )
    p.add_argument(
        "--long-seq-len", type=int, help="long context: tokens per sequence (default 8192; --tiny 256)"
    )
    p.add_argument(
        "--long-steps", type=int, default=3, help="long context: timed steps per attention (default 3)"
    )
    p.add_argument("--kv-prompt-len", type=int, help="KV cache: prompt tokens (default 4096; --tiny 64)")
    p.add_argument("--out", help="JSON path (default: $OUT/gpu_check.json when $OUT is set, else none)")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or (4 if tiny else 2)
    args.seq_len = args.seq_len or (64 if tiny else 2048)
    args.prompt_len = args.prompt_len or (16 if tiny else 128)
    args.new_tokens = args.new_tokens or (16 if tiny else 256)
    args.peak_n = args.peak_n or (256 if tiny else 8192)
    args.long_seq_len = args.long_seq_len or (256 if tiny else 8192)
    args.kv_prompt_len = args.kv_prompt_len or (32 if tiny else 4096)
    if jaxtp.HARDWARE.get(args.hardware) is None:
        p.error(
            f"--hardware must be a datasheet preset: one of {sorted(k for k, v in jaxtp.HARDWARE.items() if v)}"
        )
    if args.warmup < 1 or args.steps < 1 or args.decode_repeats < 1:
        p.error("--warmup, --steps and --decode-repeats must be >= 1")
    if args.out is None and os.environ.get("OUT"):
        args.out = os.path.join(os.environ["OUT"], "gpu_check.json")
    return args


def model_config(args):
    """The 1b preset (f32 masters, bf16 compute), or tiny with bf16 compute for --tiny."""
    if args.tiny:
        return jaxtp.ModelConfig.preset("tiny", compute_dtype="bfloat16")
    return jaxtp.ModelConfig.preset("1b")


# ------------------------------------------------------------------------------------------- train


def timed_step(trainer, batch) -> tuple[float, float]:
    """(seconds, loss) of one step, until params, optimizer state and metrics are ready."""
    seconds, metrics = timed_train_step(trainer, batch)
    return seconds, float(metrics["loss"])


def compile_timed(trainer, batch) -> dict:
    """Trace+lower and XLA compile of the step, timed apart; the jit call later reuses this executable."""
    compiled, times = measure.compile_timed(trainer.step_fn, trainer.params, trainer.opt_state, batch)
    return dict(times, memory_per_device=measure.memory_per_device(compiled))


def train_check(cfg, mesh, args) -> tuple[dict, object]:
    """Part (a); returns its results and the model (for part (b))."""
    hw = jaxtp.HARDWARE[args.hardware]
    B, S = args.batch, args.seq_len
    out = dict(
        batch=B,
        seq_len=S,
        tokens_per_step=B * S,
        params=cfg.param_count(),
        predicted_memory_per_device=jaxtp.plan(cfg, mesh, batch_size=B, seq_len=S, hardware=hw).memory[
            "total"
        ],
    )
    measured_peak = matmul_peak_flops(args.peak_n, repeats=10, dtype=jnp.bfloat16)
    t = time.perf_counter()
    model = jaxtp.Transformer.create(cfg, mesh, seed=0)
    trainer = train.Trainer.create(model, train.TrainConfig(batch_size=B, seq_len=S))
    jax.block_until_ready((trainer.params, trainer.opt_state))
    out["init_s"] = time.perf_counter() - t
    corpus = data.load_corpus("synthetic")
    batch = lambda: data.train_batch(corpus.train, mesh, B, S, 0, trainer.step)
    out.update(compile_timed(trainer, batch()))
    progress(f"train step compiled in {out['compile_s']:.1f} s")
    out["first_step_s"], _ = timed_step(trainer, batch())
    for _ in range(args.warmup - 1):
        timed_step(trainer, batch())
    runs = [timed_step(trainer, batch()) for _ in range(args.steps)]
    step_s = statistics.median(s for s, _ in runs)
    flops = train.train_flops_per_step(cfg, B, S)
    out.update(
        step_s_median=step_s,
        step_times_s=[s for s, _ in runs],
        final_loss=runs[-1][1],
        tokens_per_s=B * S / step_s,
        flops_per_step=flops,
        flops_per_s=flops / step_s,
        peak_flops_per_s=hw.flops_per_s,
        peak_source=f"{hw.name} dense bf16, {hw.source}",
        mfu=flops / step_s / hw.flops_per_s,
        measured_peak_flops_per_s=measured_peak,
        measured_peak_what=f"bf16 {args.peak_n}^3 matmul, median of 10",
        mfu_vs_measured=flops / step_s / measured_peak,
    )
    return out, trainer.model


# ------------------------------------------------------------------------------------------ decode


def generate_timed(model, prompt, new_tokens: int) -> dict:
    stats = {}
    jaxtp.generate(model, prompt, new_tokens, temperature=0.0, stats=stats)
    return stats


def decode_check(model, args) -> dict:
    """Part (b): batch-1 greedy decode, bf16 vs int8 weight-only, timed calls alternating."""
    prompt = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, args.prompt_len), dtype=np.int32)
    bf16 = jaxtp.cast(model, "bf16")
    models = {"bf16": bf16, "int8": jaxtp.cast(bf16, "int8")}
    out = {}
    for name, m in models.items():
        t = time.perf_counter()
        generate_timed(m, prompt, args.new_tokens)  # compiles prefill and the decode step
        out[name] = dict(
            first_call_s=time.perf_counter() - t, param_bytes_per_device=jaxtp.param_table(m).bytes_per_device
        )
    runs = {name: [] for name in models}
    for _ in range(args.decode_repeats):
        for name, m in models.items():
            runs[name].append(generate_timed(m, prompt, args.new_tokens))
    for name, stats in runs.items():
        out[name].update(
            decode_tok_s=statistics.median(s["decode_tokens"] / s["decode_s"] for s in stats),
            decode_step_ms=statistics.median(1e3 * s["decode_s"] / max(s["decode_steps"], 1) for s in stats),
            prefill_tok_s=statistics.median(s["prefill_tokens"] / s["prefill_s"] for s in stats),
        )
    ratio = out["int8"]["decode_tok_s"] / out["bf16"]["decode_tok_s"]
    out.update(
        batch=1,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        int8_over_bf16=ratio,
        target=f">= {DECODE_TARGET}",
        status="PASS" if ratio >= DECODE_TARGET else "MISS",
    )
    return out


# -------------------------------------------------------------------------------------- long context

LONG_ATTENTION = ("cudnn", "blockwise", "xla")
KV_CACHE_DTYPES = ("bf16", "int8")


def long_context_step(cfg, mesh, args, attention: str) -> dict:
    """One attention implementation's train step at batch 1 x --long-seq-len."""
    S = args.long_seq_len
    cfg = cfg.replace(attention=attention, max_seq_len=max(cfg.max_seq_len, S))
    trainer = train.Trainer.create(
        jaxtp.Transformer.create(cfg, mesh, seed=0), train.TrainConfig(batch_size=1, seq_len=S)
    )
    corpus = data.load_corpus("synthetic")
    batch = lambda: data.train_batch(corpus.train, mesh, 1, S, 0, trainer.step)
    out = compile_timed(trainer, batch())
    out["first_step_s"], _ = timed_step(trainer, batch())
    runs = [timed_step(trainer, batch()) for _ in range(args.long_steps)]
    out.update(
        step_s_median=statistics.median(s for s, _ in runs),
        final_loss=runs[-1][1],
        tokens_per_s=S / statistics.median(s for s, _ in runs),
    )
    progress(
        f"long context {attention}: {out['step_s_median'] * 1e3:.1f} ms/step, "
        f"temp {out['memory_per_device']['temp'] / GiB:.3g} GiB"
    )
    return out


def long_context_check(cfg, mesh, args) -> dict:
    """Part (c): each attention implementation in turn; one that fails records its error."""
    out = dict(batch=1, seq_len=args.long_seq_len)
    for attention in LONG_ATTENTION:
        result = attempt(out, attention, long_context_step, cfg, mesh, args, attention)
        if result:
            out[attention] = result
        jax.clear_caches()
    return out


def kv_cache_check(model, args) -> dict:
    """Part (d): bf16 weights, bf16 against int8 KV cache, timed calls alternating."""
    bf16 = jaxtp.cast(model, "bf16")
    T = args.kv_prompt_len + args.new_tokens
    if T > bf16.cfg.max_seq_len:
        raise ValueError(
            f"--kv-prompt-len + --new-tokens = {T} exceeds the model's max_seq_len {bf16.cfg.max_seq_len}"
        )
    prompt = np.random.default_rng(0).integers(
        0, bf16.cfg.vocab_size, (1, args.kv_prompt_len), dtype=np.int32
    )

    def call(kv_cache_dtype) -> dict:
        stats = {}
        jaxtp.generate(
            bf16, prompt, args.new_tokens, temperature=0.0, kv_cache_dtype=kv_cache_dtype, stats=stats
        )
        return stats

    out = {
        d: dict(kv_bytes_per_device=cache_bytes_per_device(bf16, 1, T, kv_cache_dtype=d))
        for d in KV_CACHE_DTYPES
    }
    for d in KV_CACHE_DTYPES:
        call(d)  # compiles prefill and the decode step
    runs = {d: [] for d in KV_CACHE_DTYPES}
    for _ in range(args.decode_repeats):
        for d in KV_CACHE_DTYPES:
            runs[d].append(call(d))
    for d, stats in runs.items():
        out[d]["decode_tok_s"] = statistics.median(s["decode_tokens"] / s["decode_s"] for s in stats)
    out.update(
        prompt_len=args.kv_prompt_len,
        new_tokens=args.new_tokens,
        int8_over_bf16_tok_s=out["int8"]["decode_tok_s"] / out["bf16"]["decode_tok_s"],
        int8_over_bf16_bytes=out["int8"]["kv_bytes_per_device"] / out["bf16"]["kv_bytes_per_device"],
    )
    return out


# -------------------------------------------------------------------------------------------- main

START = time.perf_counter()  # reset by main()


def progress(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def attempt(results: dict, key: str, fn, *args):
    """fn(*args), or None after recording results[key] = {'error': ...}: one part failing (out of memory,
    say) must not lose the other part's numbers."""
    progress(f"{key} ...")
    try:
        value = fn(*args)
    except Exception as e:  # noqa: BLE001
        results[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        progress(f"{key} failed: {results[key]['error'][:300]}")
        return None
    progress(f"{key} done")
    return value


def write(results: dict, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def summary(results: dict) -> str:
    cfg, tr, dec = results["config"], results.get("train", {}), results.get("decode", {})
    lines = [
        f"gpu_check: {results['meta']['devices']} x {results['meta']['device_kind']}, jax {results['meta']['jax']}"
    ]
    if "error" in tr:
        lines.append(f"train: ERROR {tr['error'][:300]}")
    elif tr:
        lines += [
            f"train {results['meta']['preset']} ({tr['params']:,} params), f32 Adam masters, "
            f"{cfg['compute_dtype']} compute, B={tr['batch']} S={tr['seq_len']} on 1x1:",
            f"  compile {tr['compile_s']:.1f} s (trace+lower {tr['trace_lower_s']:.1f} + XLA "
            f"{tr['xla_compile_s']:.1f}), first step {tr['first_step_s']:.2f} s",
            f"  step {tr['step_s_median'] * 1e3:.1f} ms (median of {len(tr['step_times_s'])}), "
            f"{tr['tokens_per_s']:,.0f} tok/s, {tr['flops_per_s'] / 1e12:.3g} TFLOP/s",
            f"  MFU {tr['mfu']:.1%} of {tr['peak_flops_per_s'] / 1e12:.0f} TFLOP/s ({tr['peak_source']}); "
            f"{tr['mfu_vs_measured']:.1%} of measured {tr['measured_peak_flops_per_s'] / 1e12:.3g} TFLOP/s "
            f"({tr['measured_peak_what']})",
            f"  memory/device: XLA {tr['memory_per_device']['total'] / GiB:.3g} GiB "
            f"(temp {tr['memory_per_device']['temp'] / GiB:.3g}), plan predicted "
            f"{tr['predicted_memory_per_device'] / GiB:.3g} GiB",
        ]
    if "error" in dec:
        lines.append(f"decode: ERROR {dec['error'][:300]}")
    elif dec:
        lines += [f"decode batch 1, prompt {dec['prompt_len']} + {dec['new_tokens']} new, greedy:"] + [
            f"  {p}: {dec[p]['decode_tok_s']:,.0f} tok/s ({dec[p]['decode_step_ms']:.2f} ms/token), "
            f"weights {dec[p]['param_bytes_per_device'] / GiB:.3g} GiB, first call {dec[p]['first_call_s']:.1f} s"
            for p in ("bf16", "int8")
        ]
        lines.append(f"  int8/bf16 {dec['int8_over_bf16']:.2f} (target {dec['target']}): {dec['status']}")
    long = results.get("long_context", {})
    if long:
        lines.append(f"long context, batch 1 x {long['seq_len']}:")
        lines += [
            f"  {a}: ERROR {long[a]['error'][:200]}"
            if "error" in long.get(a, {})
            else f"  {a}: {long[a]['step_s_median'] * 1e3:.1f} ms/step, {long[a]['tokens_per_s']:,.0f} tok/s, "
            f"temp {long[a]['memory_per_device']['temp'] / GiB:.3g} GiB"
            for a in LONG_ATTENTION
            if a in long
        ]
    kv = results.get("kv_cache", {})
    if "error" in kv:
        lines.append(f"kv cache: ERROR {kv['error'][:300]}")
    elif kv:
        lines += [f"kv cache, prompt {kv['prompt_len']} + {kv['new_tokens']} new, bf16 weights:"] + [
            f"  {d}: {kv[d]['decode_tok_s']:,.0f} tok/s, KV {kv[d]['kv_bytes_per_device'] / GiB:.3g} GiB/device"
            for d in KV_CACHE_DTYPES
        ]
        lines.append(
            f"  int8/bf16: {kv['int8_over_bf16_tok_s']:.2f}x tok/s, {kv['int8_over_bf16_bytes']:.3f}x bytes"
        )
    lines.append(f"total {results['total_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> dict:
    global START
    START = time.perf_counter()
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # before the GPU backend starts
    cfg = model_config(args)
    mesh = jaxtp.make_mesh("1x1")
    device = jax.devices()[0]
    results = {
        "meta": dict(
            jax=jax.__version__,
            python=platform.python_version(),
            backend=jax.default_backend(),
            devices=len(jax.devices()),
            device_kind=device.device_kind,
            preset="tiny" if args.tiny else "1b",
            args=vars(args),
        ),
        "config": cfg.to_dict(),
    }
    progress(f"{results['meta']['device_kind']}, jax {jax.__version__}")
    trained = attempt(results, "train", train_check, cfg, mesh, args)
    if trained:
        results["train"], model = trained
    else:
        model = jaxtp.Transformer.create(cfg, mesh, seed=0)
    write(results, args.out)
    decoded = attempt(results, "decode", decode_check, model, args)
    if decoded:
        results["decode"] = decoded
    write(results, args.out)
    results["long_context"] = long_context_check(cfg, mesh, args)
    write(results, args.out)
    kv = attempt(results, "kv_cache", kv_cache_check, model, args)
    if kv:
        results["kv_cache"] = kv
    results["total_s"] = time.perf_counter() - START
    write(results, args.out)
    print(summary(results))
    return results


if __name__ == "__main__":
    res = main()
    sys.exit(1 if any("error" in res.get(k, {}) for k in ("train", "decode", "kv_cache")) else 0)
