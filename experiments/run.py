"""The main job: train a small tensor-parallel LM on a CPU mesh and report what a TP engineer wants.

    python experiments/run.py --mesh 2x4
    python experiments/run.py --hf DIR --data notes.txt --mesh 2x4 --export-hf OUT   # fine-tune a checkpoint

Fakes CPU devices when the machine has fewer than the mesh needs, trains on the Python standard
library's own sources (no download), and prints: mesh and rules, parameter placement and memory per
device, the compiled step's collectives per layer, loss, speed, precision quality and a sample.
Writes DIR/report.json and DIR/loss.png.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jaxtp  # noqa: E402  (jax is imported, but its backends start only when first used)
from jaxtp.mesh import parse_mesh_spec  # noqa: E402
from job import TrainingJob  # noqa: E402
from jaxtp.distributed import ENV, initialize, launch_local, supervise  # noqa: E402


def _env_int(name):
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", default="2x4", help="mesh spec: DATAxMODEL such as 2x4, or data=2,model=4 (default 2x4)")
    p.add_argument("--model", default="small", help=f"model preset, one of {sorted(jaxtp.PRESETS)} (default small)")
    p.add_argument("--hf", default=None, metavar="DIR",
                   help="fine-tune this Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3) instead of training "
                        "--model from scratch; --data is tokenised with its tokenizer")
    p.add_argument("--export-hf", default=None, metavar="OUT",
                   help="with --hf: write the fine-tuned model and tokenizer to OUT as a Hugging Face checkpoint "
                        "(OUT must not hold files)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: tuned per preset)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch size in sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens (bytes) per sequence (default: tuned per preset, else its max; --hf: 256 or its max)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (default: tuned per preset)")
    p.add_argument("--rules", default="megatron",
                   help=f"sharding rules preset, one of {sorted(jaxtp.RULE_PRESETS)} (default megatron)")
    p.add_argument("--data", default="pystdlib",
                   help="corpus: pystdlib (this Python's stdlib sources), synthetic (Markov chain with a known "
                        "entropy floor), or a path to a UTF-8 text file (default pystdlib); with --hf, tokenised")
    p.add_argument("--seed", type=int, default=0, help="seed for parameters and batches (default 0)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="matmul/activation dtype; parameters stay float32 masters (default float32 on CPU)")
    p.add_argument("--scan-layers", action="store_true",
                   help="stack the blocks' parameters on a 'layers' axis and run them with one lax.scan "
                        "(compile time independent of depth)")
    p.add_argument("--remat", default="none", choices=list(jaxtp.config.REMAT_CHOICES),
                   help="per-block rematerialisation: none, full (recompute the block in the backward), dots "
                        "(keep projection outputs, recompute attention) (default none)")
    p.add_argument("--out", default=None, help="output directory (default runs/<timestamp>)")
    p.add_argument("--force", action="store_true", help="reuse an --out directory that holds another run")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save the full train state to DIR/checkpoints every N steps (default 0: never)")
    p.add_argument("--keep", type=int, default=3, metavar="K", help="checkpoints to keep (default 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out DIR from its latest complete checkpoint (same arguments; "
                        "the mesh may differ)")
    p.add_argument("--plan", action="store_true",
                   help="print the analytic plan (memory, FLOPs, collectives, time, MFU) for --model (or --hf's "
                        "config.json) on --mesh and exit; allocates nothing, so meshes larger than this machine "
                        "are fine")
    p.add_argument("--hardware", default="h100",
                   help="hardware preset for --plan: cpu (measured), a100, h100, h200, tpu-v5e, tpu-v5p (default h100)")
    p.add_argument("--processes", type=int, default=0, metavar="N",
                   help="launch N local processes on loopback that share one mesh (each fakes its devices)")
    p.add_argument("--coordinator", default=os.environ.get(ENV["coordinator"]), metavar="HOST:PORT",
                   help=f"join a multi-process run coordinated at HOST:PORT (env {ENV['coordinator']})")
    p.add_argument("--num-processes", type=int, default=_env_int(ENV["num_processes"]),
                   help=f"processes in the run (env {ENV['num_processes']})")
    p.add_argument("--process-id", type=int, default=_env_int(ENV["process_id"]),
                   help=f"this process's index, 0..N-1; process 0 writes reports (env {ENV['process_id']})")
    p.add_argument("--lean", action="store_true",
                   help="skip the report's extra compiles (1-layer collective comparison, precision table, sample): "
                        "for scripted runs that only need training, checkpoints and losses")
    p.add_argument("--sample-len", type=int, default=200,
                   help="bytes (--hf: tokens) to generate for the sample, capped by --seq-len (default 200)")
    return p.parse_args(argv)


DEFAULTS = {  # per-preset (steps, lr, seq_len); chosen for the best held-out loss within ~3 minutes on 2 cores
    "tiny": (200, 3e-3, 64),
    "small": (500, 4e-3, 64),
}
HF_DEFAULTS = (200, 1e-4, 256)  # fine-tuning a pretrained checkpoint: (steps, lr, seq_len capped by its max)


FAKE_CPU_DEVICES = 8


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2, no traceback."""


def fail(msg: str):
    raise UsageError(msg)


def setup_devices(mesh_spec: str, coordinator=None, num_processes=None, process_id=None):
    """Use the accelerators if there are enough; otherwise fake CPU devices (8, or mesh/processes each
    in a multi-process run). More fake devices: XLA_FLAGS=--xla_force_host_platform_device_count=N."""
    axes = parse_mesh_spec(mesh_spec)
    need = math.prod(axes.values())
    if coordinator:
        if not num_processes or process_id is None:
            fail("--coordinator needs --num-processes and --process-id (or their environment variables)")
        if need % num_processes:
            fail(f"mesh {mesh_spec!r} has {need} devices, not divisible by {num_processes} processes")
        initialize(coordinator, num_processes, process_id, local_devices=need // num_processes)
    elif "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jaxtp.use_cpu_devices(FAKE_CPU_DEVICES)  # affects only the CPU backend
    import jax

    devices = jax.devices()
    if len(devices) < need and not coordinator:
        devices = jax.devices("cpu")
    return jaxtp.make_mesh(mesh_spec, devices)


def check_out_dir(out: pathlib.Path, force: bool, resume: bool):
    if resume:
        if not (out / "checkpoints").is_dir():
            fail(f"--resume: {out} holds no checkpoints directory; run with --checkpoint-every N first")
        return
    if out.exists() and any(out.iterdir()) and not force:
        fail(f"--out {out} already holds files (another run?); pick a new --out, pass --resume to continue "
             "it, or --force to reuse it")
    out.mkdir(parents=True, exist_ok=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.processes:
        if args.processes < 1 or args.coordinator:
            print("error: --processes N needs N >= 1 and no --coordinator", file=sys.stderr)
            return 2
        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        i = rest.index("--processes")
        return launch_local([str(pathlib.Path(__file__).resolve()), *rest[:i], *rest[i + 2:]], args.processes)
    if args.coordinator and not os.environ.get("JAXTP_WORKER"):
        if args.num_processes is None or args.process_id is None:
            print("error: --coordinator needs --num-processes and --process-id (or their environment variables)",
                  file=sys.stderr)
            return 2
        argv = list(argv if argv is not None else sys.argv[1:])
        return supervise([str(pathlib.Path(__file__).resolve()), *argv], args.coordinator, args.num_processes,
                         args.process_id)
    try:
        return run(args)
    except (UsageError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def model_config(args):
    """The config of --hf's config.json (no weights read) or of the --model preset, and its default
    (steps, lr, seq_len)."""
    if args.hf:
        cfg = jaxtp.hf.config(args.hf, scan_layers=args.scan_layers, remat=args.remat, compute_dtype=args.compute_dtype)
        return cfg, HF_DEFAULTS[:2] + (min(HF_DEFAULTS[2], cfg.max_seq_len),)
    if args.model not in jaxtp.PRESETS:
        fail(f"unknown --model {args.model!r}; choose one of {sorted(jaxtp.PRESETS)}")
    return (jaxtp.ModelConfig.preset(args.model, scan_layers=args.scan_layers, remat=args.remat),
            DEFAULTS.get(args.model, (500, 1e-3, None)))


def check_export_dir(args):
    if not args.export_hf:
        return
    if not args.hf:
        fail("--export-hf needs --hf DIR (the checkpoint whose architecture and tokenizer the export keeps)")
    out = pathlib.Path(args.export_hf)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--export-hf {out} already exists and is not empty; pick a new directory")


def run(args) -> int:
    cfg, (steps, lr, default_seq) = model_config(args)
    steps = args.steps if args.steps is not None else steps
    lr = args.lr if args.lr is not None else lr
    if steps <= 0:
        fail(f"--steps must be a positive integer, got {steps}")
    if not lr > 0:
        fail(f"--lr must be > 0, got {lr}")
    if args.plan:
        from jaxtp.plan import HARDWARE, format_plan

        if args.hardware not in HARDWARE and args.hardware != "cpu":
            fail(f"unknown --hardware {args.hardware!r}; choose one of {sorted(HARDWARE) + ['cpu']}")
        seq_len = args.seq_len or (default_seq if args.hf else cfg.max_seq_len)
        print(format_plan(jaxtp.plan(cfg, args.mesh, batch_size=args.batch_size, seq_len=seq_len,
                                     hardware=args.hardware, rules=args.rules)))
        return 0
    cfg = cfg.replace(compute_dtype=args.compute_dtype)
    seq_len = args.seq_len or default_seq or cfg.max_seq_len
    if seq_len < 1 or seq_len > cfg.max_seq_len:
        fail(f"--seq-len {seq_len} is outside 1..{cfg.max_seq_len} (the {args.hf or args.model} "
             f"{'checkpoint' if args.hf else 'preset'}'s max_seq_len)")
    check_export_dir(args)
    if args.checkpoint_every < 0 or args.keep < 1:
        fail("--checkpoint-every must be >= 0 and --keep >= 1")
    if args.resume and not args.out:
        fail("--resume needs --out DIR (the run to continue)")
    if args.batch_size < 1:
        fail(f"--batch-size must be a positive integer, got {args.batch_size}")
    out = pathlib.Path(args.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}")
    if args.rules not in jaxtp.RULE_PRESETS:
        fail(f"unknown --rules {args.rules!r}; choose one of {sorted(jaxtp.RULE_PRESETS)}")
    mesh = setup_devices(args.mesh, args.coordinator, args.num_processes, args.process_id)
    import jax

    if jax.process_index() != 0:  # one report: process 0 prints and writes, the others only compute
        sys.stdout = open(os.devnull, "w")
    jaxtp.data.check_batch(args.batch_size, mesh)
    corpus = jaxtp.data.load_corpus(args.data, seed=args.seed)
    tokenizer = None
    if args.hf:
        tokenizer = jaxtp.hf.tokenizer(args.hf)
        corpus = jaxtp.data.tokenize(corpus, tokenizer)
        if max(corpus.train.max(initial=0), corpus.heldout.max(initial=0)) >= cfg.vocab_size:
            fail(f"{args.hf}'s tokenizer gives ids beyond the model's vocab_size {cfg.vocab_size}")
    if jax.process_index() == 0:
        check_out_dir(out, args.force, args.resume)

    tc = jaxtp.TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=seq_len, lr=lr, seed=args.seed)
    TrainingJob(out, cfg, tc, mesh, corpus, sample_len=args.sample_len, checkpoint_every=args.checkpoint_every,
                keep=args.keep, resume=args.resume, rules=args.rules, lean=args.lean, hf=args.hf,
                tokenizer=tokenizer, export_hf=args.export_hf).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
