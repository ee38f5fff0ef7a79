"""One training job, printed section by section: layout, memory, collectives, training, quality, speed.

`jaxtp run` (jaxtp.cli: argument parsing and input checks) builds one and runs it; kept apart so each
module has one job. Errors that are the user's to fix are jaxtp.errors.UserError.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import numpy as np
from tqdm import tqdm

import jaxtp
from jaxtp import checkpoint, data, measure, metrics, train
from jaxtp.errors import UserError, user_input
from jaxtp.generation import kv_cache_quality
from jaxtp.hf.config import architecture
from jaxtp.hf.files import read_json, resolve
from jaxtp.mesh import describe_mesh
from jaxtp.profiling import StepProfiler
from jaxtp.quant import PRECISIONS

SAMPLE_PROMPT = "def "
SAMPLE_PROMPT_TOKENS = 8  # --hf: the sample continues the held-out text's first tokens
KV_WINDOWS, KV_PROMPT_TOKENS, KV_NEW_TOKENS = 16, 64, 64  # the int8 KV cache check's held-out windows


def section(title: str):
    print(f"\n== {title} " + "=" * max(0, 72 - len(title)))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024


class TrainingJob:
    """`hf`: fine-tune that Hugging Face checkpoint (its config is `cfg`) on `corpus` tokenised with `tokenizer`,
    and write the result to `export_hf` if given; otherwise train `cfg` from scratch on bytes.

    Every `log_every` steps (and at the last) process 0 writes TensorBoard scalars to DIR/tensorboard unless
    `tensorboard` is False (jaxtp.metrics). `profile_steps` (A, B): a jax.profiler trace of steps A..B-1 in
    DIR/profile (jaxtp.profiling), whose step times the timing section leaves out. `progress`: the tqdm bar."""

    def __init__(
        self,
        out: pathlib.Path,
        cfg,
        tc,
        mesh,
        corpus,
        sample_len: int = 200,
        checkpoint_every: int = 0,
        keep: int = 3,
        resume: bool = False,
        rules: str = "megatron",
        lean: bool = False,
        hf=None,
        tokenizer=None,
        export_hf=None,
        tensorboard: bool = True,
        log_every: int = 10,
        profile_steps: tuple[int, int] | None = None,
        progress: bool = True,
    ):
        self.out, self.cfg, self.tc, self.mesh, self.corpus, self.sample_len = (
            out,
            cfg,
            tc,
            mesh,
            corpus,
            sample_len,
        )
        self.checkpoint_every, self.resume, self.rules, self.lean = checkpoint_every, resume, rules, lean
        self.hf, self.tokenizer, self.export_hf = hf, tokenizer, export_hf
        self.unit = "byte" if tokenizer is None else "token"
        self.tensorboard, self.log_every, self.progress = tensorboard, log_every, progress
        # one trace, of process 0's devices
        tracing = profile_steps and jax.process_index() == 0
        self.profiler = StepProfiler(out / "profile", *profile_steps) if tracing else None
        self.events = metrics.NullWriter()
        self.ckpts = (
            checkpoint.TrainCheckpoints(out / "checkpoints", keep) if checkpoint_every or resume else None
        )
        self.report: dict = {
            "mesh": dict(mesh.shape),
            "rules": rules,
            "model": cfg.to_dict(),
            "train": tc.__dict__,
            "data": corpus.describe(),
        }
        if hf:
            self.report["hf"] = str(hf)

    def run(self):
        self.show_layout()
        self.eval_batches = data.eval_batches(
            self.corpus.heldout, self.mesh, self.tc.batch_size, self.tc.seq_len
        )
        if self.hf:  # the checkpoint as loaded: what fine-tuning starts from
            self.report["eval_before"] = self.per_byte(train.evaluate(self.model, self.eval_batches))
        self.trainer = train.Trainer.create(self.model, self.tc)
        self.grad_norms = []  # per step; device scalars until read (at log steps, checkpoints and the end)
        self.losses = self.restore() if self.resume else []
        if self.profiler and self.profiler.start < self.trainer.step:
            raise UserError(
                f"--profile-steps {self.profiler.start}:{self.profiler.stop} starts before step "
                f"{self.trainer.step}, where --resume continues; pick A >= {self.trainer.step}"
            )
        self.compile_and_inspect()
        self.events = metrics.open_writer(self.out / "tensorboard", self.tensorboard)
        try:
            self.train()
            self.evaluate()
            self.timing()
            if self.export_hf:
                self.export()
            self.write()
        finally:
            self.events.close()
            if self.profiler:
                self.profiler.close()

    def show_layout(self):
        section("devices and mesh")
        print(describe_mesh(self.mesh))
        section(f"rules {self.rules!r} (logical axis -> mesh axis)")
        t = time.perf_counter()
        if self.hf:
            c = self.cfg
            self.model = jaxtp.hf.load(
                self.hf,
                self.mesh,
                rules=self.rules,
                scan_layers=c.scan_layers,
                remat=c.remat,
                compute_dtype=c.compute_dtype,
            )
        else:
            self.model = jaxtp.Transformer.create(self.cfg, self.mesh, seed=self.tc.seed, rules=self.rules)
        self.report["init_s"] = time.perf_counter() - t
        for name, target in self.model.layout.table():
            print(f"  {name:9s} -> {target}")
        section("parameters")
        table = jaxtp.param_table(self.model)
        self.report["params"] = table.total_params
        if self.hf:
            print(f"loaded {self.hf} in {self.report['init_s']:.1f} s")
        print(
            f"{self.cfg.n_layers} layers, d_model {self.cfg.d_model}, {self.cfg.n_heads} heads "
            f"({self.cfg.n_kv_heads} kv), d_ff {self.cfg.d_ff}, vocab {self.cfg.vocab_size} -> "
            f"{table.total_params:,} parameters"
        )
        per_block = [
            r
            for r in table.rows  # a scanned model's one block holds every layer's params, stacked
            if r.path.startswith("blocks/" if self.cfg.scan_layers else "blocks/0/")
        ]
        others = [r for r in table.rows if not r.path.startswith("blocks/")]
        for r in per_block + others:
            print(
                f"  {r.path:28s} {str(r.spec):26s} {'x'.join(map(str, r.shape)):>10s} -> "
                f"{'x'.join(map(str, r.local_shape)):>10s} per device"
            )
        self.report["bytes_per_device"] = self.bytes_by_precision(table)
        print(
            "parameter bytes per device: "
            + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.report["bytes_per_device"].items())
        )
        if jax.process_index() == 0:  # the same placement as a picture (jaxtp.plot_layout)
            jaxtp.plot_layout(self.model, self.out / "layout.png")
            print(
                f"layout picture (which slice of each weight every device holds): {self.out / 'layout.png'}"
            )

    def bytes_by_precision(self, table) -> dict:
        """Per-device bytes of the actual arrays after casting (int8 includes its scales)."""
        out = {"f32": table.bytes_per_device}
        for p in () if self.lean else ("bf16", "int8"):
            out[p] = jaxtp.param_table(jaxtp.cast(self.model, p)).bytes_per_device
        return out

    def identity(self) -> dict:
        """What must match for a resume to continue the same run (the mesh may change)."""
        return {"config": self.cfg.to_dict(), "train": dict(self.tc.__dict__), "data": self.corpus.describe()}

    def restore(self) -> list:
        tr = self.trainer
        with user_input(ValueError, OSError):  # none complete, truncated, or not this model's: one line each
            step, tr.params, tr.opt_state, meta = self.ckpts.restore(tr.params, tr.opt_state)
        mine = json.loads(json.dumps(self.identity()))
        for key in ("config", "train", "data"):
            if meta.get(key) != mine[key]:
                raise UserError(
                    f"--resume: the checkpoint in {self.ckpts.directory} was written with a different "
                    f"{key} ({meta.get(key)} vs now {mine[key]}); use the original arguments"
                )
        tr.step = step
        print(f"resumed from step {step} of {self.tc.steps} ({self.ckpts.directory})")
        self.grad_norms = list(meta.get("grad_norm", [None] * len(meta["loss"])))  # older checkpoints: none
        return list(meta["loss"])

    def grad_norm_series(self) -> list:
        """The global grad norm of every step so far as floats (None where a resumed checkpoint had none),
        read from the device in one transfer."""
        self.grad_norms = [None if g is None else float(g) for g in jax.device_get(self.grad_norms)]
        return self.grad_norms

    def save_checkpoint(self):
        tr = self.trainer
        meta = {**self.identity(), "loss": self.losses, "grad_norm": self.grad_norm_series()}
        self.ckpts.save(tr.step, tr.params, tr.opt_state, meta)
        self.ckpts.wait()  # a checkpoint counts only once complete; --resume picks the newest complete one
        print(f"checkpoint saved at step {tr.step}", flush=True)

    def compile_and_inspect(self):
        tr, tc = self.trainer, self.tc
        batch0 = data.train_batch(self.corpus.train, self.mesh, tc.batch_size, tc.seq_len, tc.seed, tr.step)
        t = time.perf_counter()
        compiled = tr.step_fn.lower(tr.params, tr.opt_state, batch0).compile()
        self.report["timing"] = {"compile_s": time.perf_counter() - t}
        tr.step_fn = compiled  # run the very executable we inspect: one compile, no surprises
        if self.profiler:  # the trace names ops (all-reduce.3); the compiled step says what each one is
            self.profiler.directory.mkdir(parents=True, exist_ok=True)
            (self.profiler.directory / "train_step.hlo.txt").write_text(compiled.as_text())
        section("train step memory per device (XLA memory analysis)")
        mem = measure.memory_per_device(compiled)
        self.report["memory_per_device"] = mem
        print(
            f"  arguments {fmt_bytes(mem['argument'])} (params + optimizer state + batch), outputs "
            f"{fmt_bytes(mem['output'])} ({fmt_bytes(mem['alias'])} aliased to donated inputs), "
            f"temporaries {fmt_bytes(mem['temp'])} -> {fmt_bytes(mem['total'])} per device"
        )
        section("collectives in the compiled train step")
        total = measure.collectives_of(compiled, self.mesh)
        self.report["collectives_per_step"] = total
        print("  whole step:")
        for k, v in total.items():
            print(f"    {k:26s} x{v['count']}  {fmt_bytes(v['bytes'])}")
        if self.cfg.scan_layers:  # the scanned block's loop bodies (forward, backward) appear once: per layer
            bodies = "\n".join(jaxtp.hlo.loop_bodies(compiled.as_text()))
            per = jaxtp.hlo.parse_collectives(bodies, self.mesh).summary()
            how = "in the scanned layers' loop bodies"
        elif self.lean:
            return
        else:
            compiled_one_layer = train.compile_train_step(
                self.cfg.replace(n_layers=1), self.model.layout, tc, data.batch_sharding(self.mesh)
            )
            per = measure.per_layer(
                total, measure.collectives_of(compiled_one_layer, self.mesh), self.cfg.n_layers
            )
            how = "count with L layers minus count with 1 layer, / (L-1)"
        self.report["collectives_per_layer"] = per
        print(f"  per layer ({how}):")
        for k, v in per.items():
            print(f"    {k:26s} x{v['count']}  {fmt_bytes(v['bytes'])}")

    def train(self):
        section(f"training: {self.corpus.describe()}")
        if "eval_before" in self.report:
            print(f"  held-out before fine-tuning: {self.format_loss(self.report['eval_before'])}")
        tr, tc = self.trainer, self.tc
        losses, norms, times, window = self.losses, self.grad_norms, [], []
        tokens = tc.batch_size * tc.seq_len
        # MFU at each log step, and in the timing section
        self.flops_per_step = train.train_flops_per_step(self.cfg, tc.batch_size, tc.seq_len)
        self.peak_flops = measure.matmul_peak_flops()
        lrs = np.asarray(train.schedule(tc)(np.arange(tc.steps)))  # step i's lr (optax counts from 0)
        prof = self.profiler or StepProfiler(self.out / "profile", 0, 0)  # traces no step
        shown = {}  # grad norm and lr of the last log step, beside each step's loss and tokens/s
        bar = tqdm(
            range(tr.step, tc.steps),
            desc="train",
            unit="step",
            mininterval=1.0,
            initial=tr.step,
            total=tc.steps,
            disable=not self.progress or jax.process_index() != 0,
        )
        batch = data.train_batch(self.corpus.train, self.mesh, tc.batch_size, tc.seq_len, tc.seed, tr.step)
        for step in bar:
            with prof.step(step):  # starts the trace before step A, outside the timed region
                t = time.perf_counter()
                out = tr.train_step(batch)
                if step + 1 < tc.steps:  # build the next batch while the step runs
                    batch = data.train_batch(
                        self.corpus.train, self.mesh, tc.batch_size, tc.seq_len, tc.seed, step + 1
                    )
                loss = float(out["loss"])
                dt = time.perf_counter() - t
            prof.end(step, (tr.params, tr.opt_state))  # after step B-1: waits, then writes the trace
            if not prof.traced(step):  # the timing section leaves the traced steps out
                times.append(dt)
            window.append(dt)
            losses.append(loss)
            norms.append(out["grad_norm"])  # a device scalar: read at log steps, not every step
            if not math.isfinite(loss):
                raise UserError(f"loss became {loss} at step {step + 1}; lower --lr")
            if tr.step % self.log_every == 0 or tr.step == tc.steps:
                gnorm, lr = float(out["grad_norm"]), float(lrs[step])
                self.log_scalars(tr.step, loss, gnorm, lr, sum(window) / len(window))
                window = []
                shown = {"gnorm": f"{gnorm:.3g}", "lr": f"{lr:.2e}"}
            bar.set_postfix({"loss": f"{loss:.3f}", "tok_s": f"{tokens / dt:,.0f}", **shown}, refresh=False)
            if self.checkpoint_every and tr.step % self.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.ckpts is not None:
            self.ckpts.close()
        self.report["loss"] = losses
        self.report["grad_norm"] = self.grad_norm_series()
        self.step_times = times

    def log_scalars(self, step: int, loss: float, grad_norm: float, lr: float, step_s: float):
        """One log step's TensorBoard scalars; `step_s`: the mean step time since the previous log step."""
        tokens = self.tc.batch_size * self.tc.seq_len
        self.events.scalars(
            step,
            {
                "train/loss": loss,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/step_time_s": step_s,
                "train/tokens_per_s": tokens / step_s,
                "train/mfu": self.flops_per_step / step_s / self.peak_flops,
            },
        )

    def per_byte(self, r: dict) -> dict:
        """Token runs: bits/byte = total nats over the held-out targets / ln 2 / the UTF-8 bytes they cover
        (byte runs: train.evaluate's loss / ln 2 already is)."""
        if self.tokenizer is not None:
            tokens = len(self.eval_batches) * self.tc.batch_size * self.tc.seq_len
            n_bytes = data.eval_bytes(self.corpus, self.tc.batch_size, self.tc.seq_len)
            r["bits_per_byte"] = r["loss"] * tokens / math.log(2) / n_bytes
        return r

    def format_loss(self, r: dict) -> str:
        return f"{r['loss']:.4f} nats/{self.unit} = {r['bits_per_byte']:.3f} bits/byte, perplexity {r['perplexity']:.2f}"

    def evaluate(self):
        section("held-out evaluation")
        batches = self.eval_batches
        model = self.trainer.model
        ev = {} if self.lean else jaxtp.precision_report(model, batches, PRECISIONS)
        ev["f32"] = {**ev.get("f32", {}), **train.evaluate(model, batches)}
        for r in ev.values():
            self.per_byte(r)
        f32 = ev["f32"]
        self.report["eval"] = ev
        self.events.scalars(self.trainer.step, {f"eval/loss_{p}": r["loss"] for p, r in ev.items()})
        uniform = math.log(256) if self.tokenizer is None else math.log(self.cfg.vocab_size)
        print(f"  f32: {self.format_loss(f32)}   (uniform {self.unit}s: {uniform:.2f} nats)")
        if len(ev) > 1:
            tokens = (
                self.tokenizer is not None
            )  # bits/byte differs from nats per token / ln 2: a column of its own
            print(
                f"  {'precision':9s} {'bytes/device':>14s} {'nats/' + self.unit:>10s} {'delta vs f32':>13s} "
                f"{'top-1 agree':>11s} {'KL':>9s}" + (f" {'bits/byte':>9s}" if tokens else "")
            )
            for p, r in ev.items():
                print(
                    f"  {p:9s} {fmt_bytes(r.get('bytes_per_device', 0)):>14s} {r['loss']:10.4f} "
                    f"{r.get('delta_vs_f32', 0.0):+13.5f} {r.get('top1_agreement', 1.0):11.4f} "
                    f"{r.get('kl_vs_f32', 0.0):9.2e}" + (f" {r['bits_per_byte']:9.3f}" if tokens else "")
                )
        if self.lean:
            return
        self.kv_cache_check(model)
        section("sample")
        self.report["sample"] = self.sample(model)
        print(self.report["sample"])

    def kv_cache_check(self, model):
        """The int8 KV cache against the bf16 one on held-out windows (jaxtp.generation.kv_cache_quality): greedy
        agreement over KV_NEW_TOKENS new tokens, free-running and step by step, and the nll change."""
        prompt = min(KV_PROMPT_TOKENS, self.cfg.max_seq_len // 2)
        new = min(KV_NEW_TOKENS, self.cfg.max_seq_len - prompt)
        held = self.corpus.heldout
        if len(held) <= prompt + new:  # a small --data file: its held-out split holds no window
            print(
                f"  int8 KV cache check skipped: the held-out split has {len(held)} {self.unit}s, fewer than "
                f"{prompt + new + 1}"
            )
            return
        starts = np.linspace(0, len(held) - prompt - new - 1, KV_WINDOWS).astype(int)
        windows = np.stack([held[s : s + prompt + new] for s in starts]).astype(np.int32)
        q = kv_cache_quality(model, windows, prompt, new)
        self.report["kv_cache_int8"] = q
        print(
            f"  int8 KV cache vs bf16 ({KV_WINDOWS} windows, {prompt} + {new} {self.unit}s): greedy agreement "
            f"{q['agreement']:.3f} (step by step {q['step_agreement']:.4f}), delta nll {q['delta_nll']:+.2e} "
            f"nats/{self.unit}"
        )

    def sample(self, model) -> str:
        """Bytes: continue "def ". --hf: continue the held-out text's first tokens, until an eos token."""
        tok = self.tokenizer
        prompt = (
            data.encode(SAMPLE_PROMPT)
            if tok is None
            else self.corpus.heldout[: min(SAMPLE_PROMPT_TOKENS, self.tc.seq_len // 2)]
        )
        n = min(self.sample_len, self.tc.seq_len - len(prompt))  # stay within the trained context
        eos = None if tok is None else tok.eos_token_id
        out = np.asarray(
            jaxtp.generate(
                model, prompt[None, :], n, temperature=0.7, top_k=40, seed=self.tc.seed, eos_id=eos
            )
        )[0]
        if tok is None:
            return SAMPLE_PROMPT + data.decode(out)
        ends = [i for i, t in enumerate(out) if t in tok.eos_token_ids]
        return tok.decode(np.concatenate([prompt, out[: ends[0] if ends else n]]))

    def export(self):

        section("Hugging Face export")
        arch = architecture(read_json(resolve(self.hf) / "config.json", "the source checkpoint"))
        path = jaxtp.hf.save(self.trainer.model, self.export_hf, tokenizer=self.tokenizer, architecture=arch)
        self.report["export_hf"] = str(path)
        print(f"  {path} ({arch}, loads with transformers.AutoModelForCausalLM.from_pretrained)")

    def timing(self):
        section("speed")
        tc, t = self.tc, self.report["timing"]
        warm = self.step_times[min(5, len(self.step_times) - 1) :] or [float("nan")]
        t["step_s_median"] = float(np.median(warm))
        t["tokens_per_s"] = tc.batch_size * tc.seq_len / t["step_s_median"]
        t["flops_per_step"] = self.flops_per_step
        t["flops_per_s"] = t["flops_per_step"] / t["step_s_median"]
        t["peak_flops_per_s"] = self.peak_flops
        t["mfu"] = t["flops_per_s"] / t["peak_flops_per_s"]
        t["total_train_s"] = float(np.sum(self.step_times))
        prof = self.profiler
        if prof:
            t["profiled_steps"] = [prof.start, prof.stop]
        print(
            f"  compile {t['compile_s']:.1f} s, median step {t['step_s_median'] * 1e3:.1f} ms, "
            f"{t['tokens_per_s']:,.0f} tokens/s"
            + (f" (steps {prof.start}..{prof.stop - 1} ran under the profiler: left out)" if prof else "")
        )
        print(
            f"  {t['flops_per_s'] / 1e9:.2f} GFLOP/s achieved (6*P*T + non-causal attention per step); "
            f"peak {t['peak_flops_per_s'] / 1e9:.1f} GFLOP/s (median 1024^3 f32 matmul on one device, this run) "
            f"-> MFU {100 * t['mfu']:.1f}%"
        )

    def write(self):
        if jax.process_index() != 0:  # reports and plots are written once
            return
        (self.out / "report.json").write_text(json.dumps(self.report, indent=1, default=str))
        import matplotlib  # here, not at the top: a heavy import, and the backend must be chosen before pyplot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(range(1, len(self.report["loss"]) + 1), self.report["loss"], lw=1, label="train")
        ax.axhline(self.report["eval"]["f32"]["loss"], color="C1", ls="--", label="held-out (end)")
        ax.set(
            xlabel="step",
            ylabel=f"nats/{self.unit}",
            title=f"{self.cfg.n_layers}L d{self.cfg.d_model} on "
            + "x".join(f"{k}={v}" for k, v in self.mesh.shape.items()),
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=100)
        plt.close(fig)
        section("written")
        print(f"  {self.out / 'report.json'}\n  {self.out / 'loss.png'}\n  {self.out / 'layout.png'}")
        if self.events.directory:
            print(f"  {self.events.directory}  (tensorboard --logdir {self.out})")
        if self.profiler:
            print(
                f"  {self.out / 'profile'}  (trace of steps {self.profiler.start}..{self.profiler.stop - 1})"
            )
