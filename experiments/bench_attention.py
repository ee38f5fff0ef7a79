"""bench.py sections for long context: attention implementations in training, and the int8 KV cache in decode.

attention: one AdamW train step of `--attention-model` (default `small`) on a 1x1 mesh at S = 128 ... 4096
  with the same global tokens per step (--attention-tokens, default ATTENTION_TOKENS: batch = tokens / S), for attention="xla" and
  "blockwise". Per row: XLA's temp bytes (compiled.memory_analysis), and the median step time of --repeats
  steps, the two implementations of one S timed alternately (round-robin) so machine noise hits both.
  The summary names the crossover (the first S from which blockwise is faster) and checks the targets:
  blockwise within 1.3x of xla at S = 128, and faster from S >= 1024.
kv_cache: decode tokens/s and KV bytes per device of jaxtp.generate with a bf16 and an int8 KV cache, at
  cache lengths 512 and 4096 (prompt = length - new tokens, so decode attends over nearly the whole cache),
  batch --batch, greedy; medians of --repeats calls after one that compiles, bf16 and int8 alternating.
"""

from __future__ import annotations

import statistics
import sys

import jax
import numpy as np

import jaxtp
from jaxtp import data, train
from jaxtp.generation import cache_bytes_per_device
from jaxtp.measure import compile_timed, memory_per_device, timed_train_step

ATTENTION_TOKENS = 8192  # global tokens per train step at every S
ATTENTION_SEQ_LENS = (128, 256, 512, 1024, 2048, 4096)
ATTENTION_IMPLS = ("xla", "blockwise")
SHORT_RATIO_TARGET = 1.3  # blockwise step / xla step at S = 128, at most
FASTER_FROM = 1024  # blockwise faster than xla at every S from here on
KV_CACHE_LENS = (512, 4096)
KV_CACHE_DTYPES = ("bf16", "int8")
KV_NEW_TOKENS = 32


def _corpus():
    return data.load_corpus("pystdlib")


def bench_attention(args) -> list[dict]:
    """Train-step time and temp memory, xla against blockwise, S up to 4096 (1024 with --quick)."""
    base = jaxtp.ModelConfig.preset(args.attention_model)
    corpus = _corpus()
    mesh = jaxtp.make_mesh("1x1")
    rows = []
    for S in args.attention_seq_lens or [s for s in ATTENTION_SEQ_LENS if not args.quick or s <= 1024]:
        batch = max(1, (args.attention_tokens or ATTENTION_TOKENS) // S)
        cells = []
        for impl in ATTENTION_IMPLS:
            cfg = base.replace(attention=impl, max_seq_len=max(base.max_seq_len, S))
            tc = train.TrainConfig(batch_size=batch, seq_len=S)
            trainer = train.Trainer.create(jaxtp.Transformer.create(cfg, mesh, seed=0), tc)
            next_batch = lambda tr=trainer: data.train_batch(corpus.train, mesh, batch, S, 0, tr.step)
            compiled, times = compile_timed(trainer.step_fn, trainer.params, trainer.opt_state, next_batch())
            row = dict(
                model=args.attention_model,
                attention=impl,
                seq_len=S,
                batch=batch,
                tokens=batch * S,
                temp_bytes_per_device=memory_per_device(compiled)["temp"],
                compile_s=times["compile_s"],
            )
            timed_train_step(trainer, next_batch())  # first run
            cells.append((row, trainer, next_batch, []))
        for _ in range(args.repeats):
            for _, trainer, next_batch, times in cells:
                times.append(timed_train_step(trainer, next_batch())[0])
        for row, _, _, times in cells:
            row.update(step_s=statistics.median(times), tokens_per_s=row["tokens"] / statistics.median(times))
            rows.append(row)
            print(
                f"  attention {row['attention']} S={S} B={batch}: {row['step_s']:.3f} s/step, "
                f"temp {row['temp_bytes_per_device'] / 2**20:.0f} MiB",
                file=sys.stderr,
            )
    return rows


def summarise_attention(rows: list[dict]) -> tuple[str, dict, str]:
    """Per S the blockwise/xla step-time and memory ratios; the crossover; the two speed targets."""
    by = {(r["attention"], r["seq_len"]): r for r in rows}
    ratios = {
        S: dict(
            step=by["blockwise", S]["step_s"] / by["xla", S]["step_s"],
            temp=by["blockwise", S]["temp_bytes_per_device"] / max(by["xla", S]["temp_bytes_per_device"], 1),
        )
        for (impl, S) in by
        if impl == "xla" and ("blockwise", S) in by
    }
    faster = [S for S in sorted(ratios) if all(ratios[s]["step"] < 1 for s in ratios if s >= S)]
    crossover = faster[0] if faster else None
    checks = []
    if 128 in ratios:
        checks.append(
            dict(
                check=f"blockwise/xla step at S=128 <= {SHORT_RATIO_TARGET}",
                value=ratios[128]["step"],
                status="PASS" if ratios[128]["step"] <= SHORT_RATIO_TARGET else "MISS",
            )
        )
    long = [S for S in ratios if S >= FASTER_FROM]
    if long:
        worst = max(ratios[S]["step"] for S in long)
        checks.append(
            dict(
                check=f"blockwise faster than xla at every S >= {FASTER_FROM}",
                value=worst,
                status="PASS" if worst < 1 else "MISS",
            )
        )
    lines = ["| S | blockwise/xla step | blockwise/xla temp |", "|---|---|---|"]
    lines += [f"| {S} | {r['step']:.2f} | {r['temp']:.3f} |" for S, r in sorted(ratios.items())]
    lines += [
        "",
        f"crossover: blockwise is faster from S = {crossover}",
        "",
        "| target | value | status |",
        "|---|---|---|",
    ] + [f"| {c['check']} | {c['value']:.2f} | {c['status']} |" for c in checks]
    return "attention_summary", dict(ratios=ratios, crossover=crossover, targets=checks), "\n".join(lines)


def bench_kv_cache(args) -> list[dict]:
    """Decode tokens/s and KV bytes/device, bf16 against int8 cache, at each KV_CACHE_LENS cache length."""
    rows = []
    mesh = jaxtp.make_mesh("1x1")
    for T in args.kv_cache_lens or KV_CACHE_LENS:
        cfg = jaxtp.ModelConfig.preset(args.attention_model)
        model = jaxtp.Transformer.create(cfg.replace(max_seq_len=max(cfg.max_seq_len, T)), mesh, seed=0)
        prompt = np.random.default_rng(0).integers(
            0, cfg.vocab_size, (args.batch, T - KV_NEW_TOKENS), dtype=np.int32
        )
        run = {
            d: (
                lambda stats, d=d: jaxtp.generate(
                    model, prompt, KV_NEW_TOKENS, temperature=0, kv_cache_dtype=d, stats=stats
                )
            )
            for d in KV_CACHE_DTYPES
        }
        timed = {d: [] for d in KV_CACHE_DTYPES}
        for d in KV_CACHE_DTYPES:
            run[d]({})  # compiles prefill and the decode step
        for _ in range(args.repeats):
            for d in KV_CACHE_DTYPES:
                stats = {}
                run[d](stats)
                timed[d].append(stats["decode_tokens"] / stats["decode_s"])
        for d in KV_CACHE_DTYPES:
            rows.append(
                dict(
                    model=args.attention_model,
                    cache_len=T,
                    kv_cache_dtype=d,
                    batch=args.batch,
                    decode_tok_s=statistics.median(timed[d]),
                    kv_bytes_per_device=cache_bytes_per_device(model, args.batch, T, kv_cache_dtype=d),
                )
            )
            print(
                f"  kv_cache {d} T={T}: decode {rows[-1]['decode_tok_s']:,.0f} tok/s, "
                f"KV {rows[-1]['kv_bytes_per_device'] / 2**20:.1f} MiB/dev",
                file=sys.stderr,
            )
        jax.clear_caches()
    return rows


def summarise_kv_cache(rows: list[dict]) -> tuple[str, dict, str]:
    by = {(r["kv_cache_dtype"], r["cache_len"]): r for r in rows}
    out = {
        T: dict(
            bytes=by["int8", T]["kv_bytes_per_device"] / by["bf16", T]["kv_bytes_per_device"],
            decode=by["int8", T]["decode_tok_s"] / by["bf16", T]["decode_tok_s"],
        )
        for (d, T) in by
        if d == "bf16" and ("int8", T) in by
    }
    lines = ["| cache length | int8/bf16 KV bytes | int8/bf16 decode tok/s |", "|---|---|---|"]
    lines += [f"| {T} | {r['bytes']:.3f} | {r['decode']:.2f} |" for T, r in sorted(out.items())]
    return "kv_cache_summary", out, "\n".join(lines)


ATTENTION_COLUMNS = [
    ("attention", "attention", ""),
    ("seq_len", "S", ""),
    ("batch", "B", ""),
    ("step_s", "s/step", ".3f"),
    ("tokens_per_s", "tokens/s", ",.0f"),
    ("temp_bytes_per_device", "temp MiB/dev", lambda v: f"{v / 2**20:.1f}"),
    ("compile_s", "compile s", ".1f"),
]
KV_CACHE_COLUMNS = [
    ("cache_len", "cache length", ""),
    ("kv_cache_dtype", "KV cache", ""),
    ("batch", "B", ""),
    ("decode_tok_s", "decode tok/s", ",.0f"),
    ("kv_bytes_per_device", "KV MiB/dev", lambda v: f"{v / 2**20:.2f}"),
]
