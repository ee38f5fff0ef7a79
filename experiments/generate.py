"""Generate from a Hugging Face checkpoint on a tensor-parallel mesh, printing the text as it is sampled.

    python experiments/generate.py --hf DIR --mesh 1x8 --precision int8 --prompt "Why is the sky blue?" --chat

Loads the checkpoint straight into its shards (jaxtp.hf.load), tokenises the prompt with the checkpoint's
tokenizer (--chat: through its chat template, then encoded without adding special tokens again, as
transformers' apply_chat_template(tokenize=True) does), streams the decoded text token by token, stops at
the first eos token, and prints prefill and decode tokens/s and the KV cache's bytes per device
(--kv-cache-dtype int8: int8 K and V with a bf16 scale per token and kv head). The
compiled prefill and decode step are warmed up first (same shapes), so the speeds exclude compilation.
Fakes CPU devices as run.py does. Bad input prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import jaxtp  # noqa: E402
from jaxtp.generate import check_sampling, cache_bytes_per_device  # noqa: E402
from jaxtp.quant import PRECISIONS  # noqa: E402
from job import fmt_bytes  # noqa: E402
from run import UsageError, fail, setup_devices  # noqa: E402

RULE = "-" * 72


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face checkpoint directory (Llama, Mistral, "
                   "Qwen2, Qwen3) with config.json, *.safetensors and tokenizer.json")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message through the checkpoint's chat template")
    p.add_argument("--mesh", default="1x8", help="mesh spec: DATAxMODEL such as 1x8, or data=1,model=8 (default 1x8)")
    p.add_argument("--precision", default="f32", choices=PRECISIONS, help="weights as loaded (default f32)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens to generate at most; capped by the room the context leaves after the prompt "
                        "(default 128)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "f32", "bf16", "int8"],
                   help="KV cache storage: auto keeps the compute dtype; int8 stores int8 values plus a bf16 scale "
                        "per token and kv head (default auto)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context to load the model with (default config.json's max_position_embeddings)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=True)
    return tok.encode(prompt)


def kv_cache_dtype(args) -> str | None:
    """jaxtp.generate's kv_cache_dtype for the flag: None (the compute dtype) for auto."""
    return None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype


def run(args) -> int:
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, args.top_p)
    cfg = jaxtp.hf.config(args.hf, args.max_seq_len)  # config.json and the architecture, before any weight
    tok = jaxtp.hf.tokenizer(args.hf)
    ids = prompt_ids(tok, args.prompt, args.chat)
    if not ids:
        fail("the prompt encodes to no tokens; give some text")
    if len(ids) >= cfg.max_seq_len:
        fail(f"the prompt is {len(ids)} tokens, the context (max_seq_len) {cfg.max_seq_len}: no room to generate; "
             "shorten the prompt")
    new = min(args.max_new_tokens, cfg.max_seq_len - len(ids))
    mesh = setup_devices(args.mesh)
    t = time.perf_counter()
    model = jaxtp.hf.load(args.hf, mesh, precision=args.precision, max_seq_len=args.max_seq_len)
    load_s = time.perf_counter() - t
    cache_len = len(ids) + new
    t = time.perf_counter()
    sample(model, tok, ids, min(2, new), args, cache_len, lambda text: None)  # compiles what the real run uses
    warm_s = time.perf_counter() - t
    print(f"{args.hf}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, as {args.precision} on "
          + " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
          + f"; loaded in {load_s:.1f} s, compile + warm-up {warm_s:.1f} s")
    print(f"prompt {len(ids)} tokens{' (chat template)' if args.chat else ''}; up to {new} new tokens"
          f"{' (capped by the context)' if new < args.max_new_tokens else ''}; stops at eos {tok.eos_token_ids}"
          f"\n{RULE}", flush=True)

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    tokens, stats = sample(model, tok, ids, new, args, cache_len, write)
    batch = stats["batch"] + -stats["batch"] % mesh.shape.get("data", 1)  # generate pads rows to the data axis
    print(f"\n{RULE}\nprefill: {stats['prefill_tokens']} tokens in {stats['prefill_s']:.3f} s = "
          f"{stats['prefill_tokens'] / stats['prefill_s']:,.1f} tokens/s")
    if stats["decode_tokens"]:
        print(f"decode: {stats['decode_tokens']} tokens in {stats['decode_s']:.3f} s = "
              f"{stats['decode_tokens'] / stats['decode_s']:,.1f} tokens/s (streamed: each token waits for the host)")
    kv_bytes = cache_bytes_per_device(model, batch, cache_len, kv_cache_dtype(args))
    print(f"KV cache: {fmt_bytes(kv_bytes)} per device ({batch} x {cache_len} positions, {cfg.n_layers} layers, "
          f"K and V, {args.kv_cache_dtype}); {len(tokens)} tokens generated")
    return 0


def sample(model, tok, ids, max_new_tokens, args, cache_len, write) -> tuple[list[int], dict]:
    """Generate after `ids`, calling `write` with each new piece of decoded text; the text ends before the first
    eos token (jaxtp.generate stops on the first of tok.eos_token_ids; the text on any of them). Returns the
    tokens before eos and jaxtp.generate's stats."""
    eos = set(tok.eos_token_ids)
    tokens, shown, stopped = [], "", False

    def on_token(tok_B):
        nonlocal shown, stopped
        stopped = stopped or int(tok_B[0]) in eos
        if stopped:
            return
        tokens.append(int(tok_B[0]))
        text = tok.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
            write(text[len(shown):])
            shown = text

    stats = {}
    jaxtp.generate(model, np.asarray([ids], np.int32), max_new_tokens, args.temperature, args.top_k, args.top_p,
                   args.seed, eos_id=tok.eos_token_ids, cache_len=cache_len, kv_cache_dtype=kv_cache_dtype(args),
                   stats=stats, on_token=on_token)
    write(tok.decode(tokens, skip_special_tokens=True)[len(shown):])
    return tokens, stats


if __name__ == "__main__":
    sys.exit(main())
