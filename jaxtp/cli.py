"""The `jaxtp` command: `jaxtp run` (the main job), `jaxtp plan` (does it fit?), `jaxtp generate` (stream text
from a Hugging Face checkpoint).

    jaxtp run --mesh 2x4                                  # = python experiments/run.py --mesh 2x4
    jaxtp run --hf DIR --data notes.txt --mesh 2x4 --export-hf OUT
    jaxtp plan --hf DIR --mesh 16x8 --hardware h100      # = python experiments/run.py --plan ...
    jaxtp generate --hf DIR --mesh 1x8 --precision int8 --chat --prompt "Why is the sky blue?"

Bad input (a flag, a file, a mesh this machine cannot make) is a jaxtp.errors.UserError, or a library error
that always is one (jaxtp.hf.CheckpointError): printed as one line on stderr, exit status 2. Checks in the
library that raise plain ValueError/OSError count as bad input only where the CLI asked them about the user's
input (`user_input` blocks); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import pathlib
import sys
import time

import jax
import numpy as np

import jaxtp  # jax is imported, but its backends start only when first used: fake devices can still be set
from jaxtp.distributed import ENV, initialize, launch_local, supervise
from jaxtp.errors import UserError, user_input
from jaxtp.hf import CheckpointError
from jaxtp.mesh import parse_mesh_spec
from jaxtp.profiling import parse_steps
from jaxtp.quant import PRECISIONS

USER_ERRORS = (UserError, CheckpointError)  # printed as one line, exit status 2
CHILD = [
    "-m",
    "jaxtp",
    "run",
]  # how --processes and --coordinator start this job's workers: `python -m jaxtp run`
FAKE_CPU_DEVICES = 8

RUN_DOC = """The main job: train a small tensor-parallel LM on a CPU mesh and report what a TP engineer wants.

    jaxtp run --mesh 2x4                  (or: python experiments/run.py --mesh 2x4)
    jaxtp run --hf DIR --data notes.txt --mesh 2x4 --export-hf OUT   # fine-tune a checkpoint

Fakes CPU devices when the machine has fewer than the mesh needs, trains on the Python standard
library's own sources (no download), and prints: mesh and rules, parameter placement and memory per
device, the compiled step's collectives per layer, loss, speed, precision quality and a sample.
Writes DIR/report.json, DIR/loss.png, DIR/layout.png (where every shard lives) and TensorBoard scalars in
DIR/tensorboard (loss, lr, grad norm, step time, tokens/s and MFU every --log-every steps; each
precision's held-out loss at the end);
--profile-steps A:B adds a jax.profiler trace of steps A..B-1 in DIR/profile.
"""

PLAN_DOC = """The analytic plan of one training step (memory, FLOPs, collectives, time, MFU) for a preset or a Hugging
Face config.json on a mesh. Allocates nothing and reads no weights, so meshes larger than this machine are fine.

    jaxtp plan --model 7b --mesh 8x8 --hardware h100      (or: python experiments/run.py --plan ...)
    jaxtp plan --hf DIR --mesh 16x8
"""

GENERATE_DOC = """Generate from a Hugging Face checkpoint on a tensor-parallel mesh, printing the text as it is sampled.

    jaxtp generate --hf DIR --mesh 1x8 --precision int8 --prompt "Why is the sky blue?" --chat
    (or: python experiments/generate.py ...)

Loads the checkpoint straight into its shards (jaxtp.hf.load), tokenises the prompt with the checkpoint's
tokenizer (--chat: through its chat template, then encoded without adding special tokens again, as
transformers' apply_chat_template(tokenize=True) does), streams the decoded text token by token, stops at
the first eos token, and prints prefill and decode tokens/s and the KV cache's bytes per device
(--kv-cache-dtype int8: int8 K and V with a bf16 scale per token and kv head). The
compiled prefill and decode step are warmed up first (same shapes), so the speeds exclude compilation.
Fakes CPU devices as `jaxtp run` does. Bad input prints one line on stderr and exits with status 2.
"""

DEFAULTS = {  # per-preset (steps, lr, seq_len); chosen for the best held-out loss within ~3 minutes on 2 cores
    "tiny": (200, 3e-3, 64),
    "small": (500, 4e-3, 64),
}
HF_DEFAULTS = (200, 1e-4, 256)  # fine-tuning a pretrained checkpoint: (steps, lr, seq_len capped by its max)
HARDWARE_HELP = "hardware preset: cpu (measured), a100, h100, h200, tpu-v5e, tpu-v5p (default h100)"
RULE = "-" * 72  # generate: around the streamed text


# ------------------------------------------------------------------------------------------ the command


def main(argv=None) -> int:
    """`jaxtp COMMAND ...`: the console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"run": run_main, "plan": plan_main, "generate": generate_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:], prog=f"jaxtp {argv[0]}")
    p = argparse.ArgumentParser(
        prog="jaxtp",
        description=__doc__.split("\n\n")[0],
        epilog="`jaxtp COMMAND --help` lists a command's flags.",
    )
    p.add_argument(
        "command",
        choices=list(commands),
        help="run: the main job; plan: does it fit? (no devices "
        "needed); generate: stream text from a Hugging Face checkpoint",
    )
    p.parse_args(argv[:1])  # --help, or no/unknown command: usage and exit status 2
    return 2


def fail(msg: str):
    raise UserError(msg)


def one_line_errors(fn, args) -> int:
    """fn(args), with a user error printed as one line (exit status 2); anything else keeps its traceback."""
    try:
        return fn(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (
        BrokenPipeError
    ):  # stdout closed early (`jaxtp plan ... | head`): stop quietly (Python's docs' recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def without_option(argv: list[str], name: str) -> list[str]:
    """argv less option `name` and its value, in every spelling argparse accepts: `--name V`, `--name=V` and
    their unambiguous prefixes (`--processe=2`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        flag, eq, _ = a.partition("=")
        if len(flag) > 2 and flag.startswith("--") and name.startswith(flag):
            skip = not eq
            continue
        out.append(a)
    return out


def _env_int(name):
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


# ---------------------------------------------------------------------------------------- jaxtp run


def parse_run_args(argv=None, prog=None):
    p = argparse.ArgumentParser(
        prog=prog, description=RUN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _model_flags(p.add_argument_group("model and data"))
    _training_flags(p.add_argument_group("training and sharding"))
    _output_flags(p.add_argument_group("output, checkpoints and export"))
    _watch_flags(p.add_argument_group("watching a run"))
    _process_flags(p.add_argument_group("several processes"))
    _plan_flags(p.add_argument_group("planning instead of running"))
    return p.parse_args(argv)


def _model_flags(p):
    p.add_argument(
        "--model", default="small", help=f"model preset, one of {sorted(jaxtp.PRESETS)} (default small)"
    )
    p.add_argument(
        "--hf",
        default=None,
        metavar="DIR",
        help="fine-tune this Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3) instead of training "
        "--model from scratch; --data is tokenised with its tokenizer",
    )
    p.add_argument(
        "--data",
        default="pystdlib",
        help="corpus: pystdlib (this Python's stdlib sources), synthetic (Markov chain with a known "
        "entropy floor), or a path to a UTF-8 text file (default pystdlib); with --hf, tokenised",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for parameters and batches (default 0)")
    p.add_argument(
        "--compute-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="matmul/activation dtype; parameters stay float32 masters (default float32 on CPU)",
    )
    p.add_argument(
        "--scan-layers",
        action="store_true",
        help="stack the blocks' parameters on a 'layers' axis and run them with one lax.scan "
        "(compile time independent of depth)",
    )
    p.add_argument(
        "--remat",
        default="none",
        choices=list(jaxtp.config.REMAT_CHOICES),
        help="per-block rematerialisation: none, full (recompute the block in the backward), dots "
        "(keep projection outputs, recompute attention) (default none)",
    )


def _training_flags(p):
    p.add_argument(
        "--mesh", default="2x4", help="mesh spec: DATAxMODEL such as 2x4, or data=2,model=4 (default 2x4)"
    )
    p.add_argument(
        "--rules",
        default="megatron",
        help=f"sharding rules preset, one of {sorted(jaxtp.RULE_PRESETS)} (default megatron)",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default: tuned per preset)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch size in sequences (default 16)")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens (bytes) per sequence (default: tuned per preset, else its max; --hf: 256 or its max); "
        "longer than a preset's max_seq_len extends its context",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate of AdamW (default: tuned per preset)"
    )


def _output_flags(p):
    p.add_argument("--out", default=None, help="output directory (default runs/<timestamp>)")
    p.add_argument("--force", action="store_true", help="reuse an --out directory that holds another run")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="save the full train state to DIR/checkpoints every N steps (default 0: never)",
    )
    p.add_argument("--keep", type=int, default=3, metavar="K", help="checkpoints to keep (default 3)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out DIR from its latest complete checkpoint (same arguments; the mesh may differ)",
    )
    p.add_argument(
        "--export-hf",
        default=None,
        metavar="OUT",
        help="with --hf: write the fine-tuned model and tokenizer to OUT as a Hugging Face checkpoint "
        "(OUT must not hold files)",
    )
    p.add_argument(
        "--lean",
        action="store_true",
        help="skip the report's extra compiles (1-layer collective comparison, precision table, sample): "
        "for scripted runs that only need training, checkpoints and losses",
    )
    p.add_argument(
        "--sample-len",
        type=int,
        default=200,
        help="bytes (--hf: tokens) to generate for the sample, capped by --seq-len (default 200)",
    )


def _watch_flags(p):
    p.add_argument(
        "--log-every",
        type=int,
        default=10,
        metavar="N",
        help="write the TensorBoard scalars (DIR/tensorboard) every N steps and at the last (default 10)",
    )
    p.add_argument(
        "--no-metrics",
        action="store_true",
        help="write no TensorBoard event files (report.json still holds the loss and grad-norm series)",
    )
    p.add_argument(
        "--profile-steps",
        default=None,
        metavar="A:B",
        help="trace steps A..B-1 (0-based) with jax.profiler into DIR/profile (TensorBoard's profile plugin, "
        "or perfetto_trace.json.gz in the Perfetto UI); those steps are left out of the timing section",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="print nothing but the output directory (no sections, no progress bar); errors still go to "
        "stderr and DIR/report.json is still written",
    )


def _process_flags(p):
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        metavar="N",
        help="launch N local processes on loopback that share one mesh (each fakes its devices)",
    )
    p.add_argument(
        "--coordinator",
        default=os.environ.get(ENV["coordinator"]),
        metavar="HOST:PORT",
        help=f"join a multi-process run coordinated at HOST:PORT (env {ENV['coordinator']})",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        default=_env_int(ENV["num_processes"]),
        help=f"processes in the run (env {ENV['num_processes']})",
    )
    p.add_argument(
        "--process-id",
        type=int,
        default=_env_int(ENV["process_id"]),
        help=f"this process's index, 0..N-1; process 0 writes reports (env {ENV['process_id']})",
    )


def _plan_flags(p):
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the analytic plan (memory, FLOPs, collectives, time, MFU) for --model (or --hf's "
        "config.json) on --mesh and exit, as `jaxtp plan` does; allocates nothing, so meshes "
        "larger than this machine are fine",
    )
    p.add_argument("--hardware", default="h100", help=f"for --plan: {HARDWARE_HELP}")


def run_main(argv=None, prog=None) -> int:
    """`jaxtp run` (argv: its flags; default sys.argv[1:], as `python experiments/run.py` passes them)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_run_args(argv, prog)
    if args.processes:
        if args.processes < 1 or args.coordinator:
            print("error: --processes N needs N >= 1 and no --coordinator", file=sys.stderr)
            return 2
        return launch_local([*CHILD, *without_option(argv, "--processes")], args.processes)
    if args.coordinator and not os.environ.get("JAXTP_WORKER"):
        if args.num_processes is None or args.process_id is None:
            print(
                "error: --coordinator needs --num-processes and --process-id (or their environment variables)",
                file=sys.stderr,
            )
            return 2
        return supervise([*CHILD, *argv], args.coordinator, args.num_processes, args.process_id)
    return one_line_errors(run, args)


def setup_devices(mesh_spec: str, coordinator=None, num_processes=None, process_id=None):
    """Use the accelerators if there are enough; otherwise fake CPU devices (8, or mesh/processes each
    in a multi-process run). More fake devices: XLA_FLAGS=--xla_force_host_platform_device_count=N."""
    with user_input(ValueError):
        axes = parse_mesh_spec(mesh_spec)
    need = math.prod(axes.values())
    if coordinator:
        if not num_processes or process_id is None:
            fail("--coordinator needs --num-processes and --process-id (or their environment variables)")
        if need % num_processes:
            fail(f"mesh {mesh_spec!r} has {need} devices, not divisible by {num_processes} processes")
        with user_input(ValueError, RuntimeError):  # a bad address or id, or peers that never came
            initialize(coordinator, num_processes, process_id, local_devices=need // num_processes)
    elif "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        with user_input(
            RuntimeError
        ):  # JAX already started with other devices (in-process callers): says the fix
            jaxtp.use_cpu_devices(FAKE_CPU_DEVICES)  # affects only the CPU backend

    devices = jax.devices()
    if len(devices) < need and not coordinator:
        devices = jax.devices("cpu")
    with user_input(ValueError):  # more devices than there are
        return jaxtp.make_mesh(mesh_spec, devices)


def check_out_dir(out: pathlib.Path, force: bool, resume: bool):
    if resume:
        if not (out / "checkpoints").is_dir():
            fail(f"--resume: {out} holds no checkpoints directory; run with --checkpoint-every N first")
        return
    with user_input(OSError, what=f"--out {out}"):  # a file, or a place this user cannot write
        if out.exists() and any(out.iterdir()) and not force:
            fail(
                f"--out {out} already holds files (another run?); pick a new --out, pass --resume to continue "
                "it, or --force to reuse it"
            )
        out.mkdir(parents=True, exist_ok=True)


def model_config(args):
    """The config of --hf's config.json (no weights read) or of the --model preset, and its default
    (steps, lr, seq_len)."""
    if args.hf:
        cfg = jaxtp.hf.config(
            args.hf, scan_layers=args.scan_layers, remat=args.remat, compute_dtype=args.compute_dtype
        )
        return cfg, HF_DEFAULTS[:2] + (min(HF_DEFAULTS[2], cfg.max_seq_len),)
    if args.model not in jaxtp.PRESETS:
        fail(f"unknown --model {args.model!r}; choose one of {sorted(jaxtp.PRESETS)}")
    return (
        jaxtp.ModelConfig.preset(args.model, scan_layers=args.scan_layers, remat=args.remat),
        DEFAULTS.get(args.model, (500, 1e-3, None)),
    )


def check_export_dir(args):
    if not args.export_hf:
        return
    if not args.hf:
        fail("--export-hf needs --hf DIR (the checkpoint whose architecture and tokenizer the export keeps)")
    out = pathlib.Path(args.export_hf)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--export-hf {out} already exists and is not empty; pick a new directory")


def check_rules(args):
    if args.rules not in jaxtp.RULE_PRESETS:
        fail(f"unknown --rules {args.rules!r}; choose one of {sorted(jaxtp.RULE_PRESETS)}")


def load_corpus(args, cfg, seq_len: int):
    """--data, tokenised with --hf's tokenizer if given, checked to hold a training window and a held-out batch.
    Returns (corpus, tokenizer or None)."""
    with user_input(ValueError, OSError):  # missing, empty, binary or not UTF-8
        corpus = jaxtp.data.load_corpus(args.data, seed=args.seed)
    tokenizer = None
    if args.hf:
        with user_input(ValueError, OSError):  # no tokenizer.json, or not valid JSON
            tokenizer = jaxtp.hf.tokenizer(args.hf)
        corpus = jaxtp.data.tokenize(corpus, tokenizer)
        if max(corpus.train.max(initial=0), corpus.heldout.max(initial=0)) >= cfg.vocab_size:
            fail(f"{args.hf}'s tokenizer gives ids beyond the model's vocab_size {cfg.vocab_size}")
    unit = "tokens" if args.hf else "bytes"
    if len(corpus.train) < seq_len + 2:
        fail(
            f"--data {args.data}: the training split has {len(corpus.train)} {unit}, fewer than one window of "
            f"--seq-len + 1 = {seq_len + 1}; use a larger data file or a smaller --seq-len"
        )
    with user_input(ValueError):  # held-out split too small for one batch: names the flags to change
        jaxtp.data.eval_starts(len(corpus.heldout), args.batch_size, seq_len)
    return corpus, tokenizer


def run(args) -> int:
    cfg, (steps, lr, default_seq) = model_config(args)
    steps = args.steps if args.steps is not None else steps
    lr = args.lr if args.lr is not None else lr
    if steps <= 0:
        fail(f"--steps must be a positive integer, got {steps}")
    if not lr > 0:
        fail(f"--lr must be > 0, got {lr}")
    if args.plan:
        return plan(args, cfg, default_seq)
    cfg = cfg.replace(compute_dtype=args.compute_dtype)
    seq_len = args.seq_len or default_seq or cfg.max_seq_len
    if (
        not args.hf and seq_len > cfg.max_seq_len
    ):  # a preset's context grows with --seq-len: RoPE learns no length
        cfg = cfg.replace(max_seq_len=seq_len)
    if seq_len < 1 or seq_len > cfg.max_seq_len:
        fail(
            f"--seq-len {seq_len} is outside 1..{cfg.max_seq_len} (the {args.hf or args.model} "
            f"{'checkpoint' if args.hf else 'preset'}'s max_seq_len)"
        )
    check_export_dir(args)
    if args.checkpoint_every < 0 or args.keep < 1:
        fail("--checkpoint-every must be >= 0 and --keep >= 1")
    if args.resume and not args.out:
        fail("--resume needs --out DIR (the run to continue)")
    if args.batch_size < 1:
        fail(f"--batch-size must be a positive integer, got {args.batch_size}")
    if args.log_every < 1:
        fail(f"--log-every must be a positive integer, got {args.log_every}")
    profile_steps = parse_steps(args.profile_steps, steps) if args.profile_steps else None
    out = pathlib.Path(args.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}")
    check_rules(args)
    mesh = setup_devices(args.mesh, args.coordinator, args.num_processes, args.process_id)

    if jax.process_index() != 0:  # one report: process 0 prints and writes, the others only compute
        sys.stdout = open(os.devnull, "w")
    with user_input(
        ValueError
    ):  # a batch the data axis does not divide; heads, d_ff, ... the model axis does not
        jaxtp.data.check_batch(args.batch_size, mesh)
        jaxtp.resolve_rules(cfg, mesh, args.rules)
    corpus, tokenizer = load_corpus(args, cfg, seq_len)
    if jax.process_index() == 0:
        check_out_dir(out, args.force, args.resume)

    from jaxtp.job import TrainingJob

    tc = jaxtp.TrainConfig(steps=steps, batch_size=args.batch_size, seq_len=seq_len, lr=lr, seed=args.seed)
    job = TrainingJob(
        out,
        cfg,
        tc,
        mesh,
        corpus,
        sample_len=args.sample_len,
        checkpoint_every=args.checkpoint_every,
        keep=args.keep,
        resume=args.resume,
        rules=args.rules,
        lean=args.lean,
        hf=args.hf,
        tokenizer=tokenizer,
        export_hf=args.export_hf,
        tensorboard=not args.no_metrics,
        log_every=args.log_every,
        profile_steps=profile_steps,
        progress=not args.quiet,
    )
    if not args.quiet:
        job.run()
        return 0
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        job.run()
    print(out)  # --quiet: the one line, for scripts (the default --out is a new timestamped directory)
    return 0


# ---------------------------------------------------------------------------------------- jaxtp plan


def parse_plan_args(argv=None, prog=None):
    p = argparse.ArgumentParser(
        prog=prog, description=PLAN_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--mesh",
        default="2x4",
        help="mesh spec: DATAxMODEL such as 8x8, or data=8,model=8; no devices are needed (default 2x4)",
    )
    p.add_argument(
        "--model", default="small", help=f"model preset, one of {sorted(jaxtp.PRESETS)} (default small)"
    )
    p.add_argument(
        "--hf",
        default=None,
        metavar="DIR",
        help="plan this Hugging Face checkpoint's config.json instead of --model (no weights read)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="global batch size in sequences (default 16)")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default: the preset's max_seq_len; --hf: 256 or its max)",
    )
    p.add_argument(
        "--rules",
        default="megatron",
        help=f"sharding rules preset, one of {sorted(jaxtp.RULE_PRESETS)} (default megatron)",
    )
    p.add_argument(
        "--compute-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="matmul/activation dtype; parameters stay float32 masters (default float32)",
    )
    p.add_argument("--scan-layers", action="store_true", help="the blocks stacked and run by one lax.scan")
    p.add_argument(
        "--remat",
        default="none",
        choices=list(jaxtp.config.REMAT_CHOICES),
        help="per-block rematerialisation: none, full, dots (default none)",
    )
    p.add_argument("--hardware", default="h100", help=HARDWARE_HELP)
    return p.parse_args(argv)


def plan_main(argv=None, prog=None) -> int:
    """`jaxtp plan`: what `jaxtp run --plan` prints, with only the flags a plan reads."""
    args = parse_plan_args(sys.argv[1:] if argv is None else list(argv), prog)

    def go(args):
        cfg, (_, _, default_seq) = model_config(args)
        return plan(args, cfg, default_seq)

    return one_line_errors(go, args)


def plan(args, cfg, default_seq) -> int:
    from jaxtp.hardware import HARDWARE
    from jaxtp.planner import format_plan

    if args.hardware not in HARDWARE and args.hardware != "cpu":
        fail(f"unknown --hardware {args.hardware!r}; choose one of {sorted(HARDWARE) + ['cpu']}")
    check_rules(args)
    with user_input(ValueError):  # the planner takes the spec itself; a bad one fails here in one line
        parse_mesh_spec(args.mesh)
    seq_len = args.seq_len or (default_seq if args.hf else cfg.max_seq_len)
    if args.batch_size < 1 or seq_len < 1:
        fail(f"--batch-size and --seq-len must be positive integers, got {args.batch_size} and {seq_len}")
    print(
        format_plan(
            jaxtp.plan(
                cfg,
                args.mesh,
                batch_size=args.batch_size,
                seq_len=seq_len,
                hardware=args.hardware,
                rules=args.rules,
            )
        )
    )
    return 0


# ------------------------------------------------------------------------------------ jaxtp generate


def parse_generate_args(argv=None, prog=None):

    p = argparse.ArgumentParser(
        prog=prog, description=GENERATE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--hf",
        required=True,
        metavar="DIR",
        help="Hugging Face checkpoint directory (Llama, Mistral, "
        "Qwen2, Qwen3) with config.json, *.safetensors and tokenizer.json",
    )
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as one user message through the checkpoint's chat template",
    )
    p.add_argument(
        "--mesh", default="1x8", help="mesh spec: DATAxMODEL such as 1x8, or data=1,model=8 (default 1x8)"
    )
    p.add_argument("--precision", default="f32", choices=PRECISIONS, help="weights as loaded (default f32)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help="tokens to generate at most; capped by the room the context leaves after the prompt (default 128)",
    )
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    p.add_argument(
        "--top-k", type=int, default=None, help="sample among the k most likely tokens (default off)"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "f32", "bf16", "int8"],
        help="KV cache storage: auto keeps the compute dtype; int8 stores int8 values plus a bf16 scale "
        "per token and kv head (default auto)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="context to load the model with (default config.json's max_position_embeddings)",
    )
    return p.parse_args(argv)


def generate_main(argv=None, prog=None) -> int:
    """`jaxtp generate` (argv: its flags; default sys.argv[1:], as `python experiments/generate.py` passes them)."""
    return one_line_errors(generate, parse_generate_args(sys.argv[1:] if argv is None else list(argv), prog))


def prompt_ids(tok, prompt: str, chat: bool) -> list[int]:
    if chat:
        return tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
    return tok.encode(prompt)


def kv_cache_dtype(args) -> str | None:
    """jaxtp.generate's kv_cache_dtype for the flag: None (the compute dtype) for auto."""
    return None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype


def generate(args) -> int:
    import jinja2.exceptions

    from jaxtp.generation import cache_bytes_per_device, check_sampling
    from jaxtp.job import fmt_bytes

    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    with user_input(ValueError):
        check_sampling(args.temperature, args.top_k, args.top_p)
    cfg = jaxtp.hf.config(args.hf, args.max_seq_len)  # config.json and the architecture, before any weight
    with user_input(ValueError, OSError):  # no tokenizer.json, or not valid JSON
        tok = jaxtp.hf.tokenizer(args.hf)
    with user_input(ValueError, jinja2.exceptions.TemplateError):  # --chat: no chat template, or it refuses
        ids = prompt_ids(tok, args.prompt, args.chat)
    if not ids:
        fail("the prompt encodes to no tokens; give some text")
    if len(ids) >= cfg.max_seq_len:
        fail(
            f"the prompt is {len(ids)} tokens, the context (max_seq_len) {cfg.max_seq_len}: no room to generate; "
            "shorten the prompt"
        )
    new = min(args.max_new_tokens, cfg.max_seq_len - len(ids))
    mesh = setup_devices(args.mesh)
    with user_input(
        ValueError
    ):  # heads, kv heads, d_ff or vocab that the mesh cannot split: names meshes that work
        jaxtp.resolve_rules(cfg, mesh)
    t = time.perf_counter()
    model = jaxtp.hf.load(args.hf, mesh, precision=args.precision, max_seq_len=args.max_seq_len)
    load_s = time.perf_counter() - t
    cache_len = len(ids) + new
    t = time.perf_counter()
    sample(
        model, tok, ids, min(2, new), args, cache_len, lambda text: None
    )  # compiles what the real run uses
    warm_s = time.perf_counter() - t
    print(
        f"{args.hf}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, as {args.precision} on "
        + " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
        + f"; loaded in {load_s:.1f} s, compile + warm-up {warm_s:.1f} s"
    )
    print(
        f"prompt {len(ids)} tokens{' (chat template)' if args.chat else ''}; up to {new} new tokens"
        f"{' (capped by the context)' if new < args.max_new_tokens else ''}; stops at eos {tok.eos_token_ids}"
        f"\n{RULE}",
        flush=True,
    )

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    tokens, stats = sample(model, tok, ids, new, args, cache_len, write)
    batch = stats["batch"] + -stats["batch"] % mesh.shape.get(
        "data", 1
    )  # generate pads rows to the data axis
    print(
        f"\n{RULE}\nprefill: {stats['prefill_tokens']} tokens in {stats['prefill_s']:.3f} s = "
        f"{stats['prefill_tokens'] / stats['prefill_s']:,.1f} tokens/s"
    )
    if stats["decode_tokens"]:
        print(
            f"decode: {stats['decode_tokens']} tokens in {stats['decode_s']:.3f} s = "
            f"{stats['decode_tokens'] / stats['decode_s']:,.1f} tokens/s (streamed: each token waits for the host)"
        )
    kv_bytes = cache_bytes_per_device(model, batch, cache_len, kv_cache_dtype(args))
    print(
        f"KV cache: {fmt_bytes(kv_bytes)} per device ({batch} x {cache_len} positions, {cfg.n_layers} layers, "
        f"K and V, {args.kv_cache_dtype}); {len(tokens)} tokens generated"
    )
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
            write(text[len(shown) :])
            shown = text

    stats = {}
    jaxtp.generate(
        model,
        np.asarray([ids], np.int32),
        max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        eos_id=tok.eos_token_ids,
        cache_len=cache_len,
        kv_cache_dtype=kv_cache_dtype(args),
        stats=stats,
        on_token=on_token,
    )
    write(tok.decode(tokens, skip_special_tokens=True)[len(shown) :])
    return tokens, stats
