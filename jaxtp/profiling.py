"""`jaxtp run --profile-steps A:B`: a jax.profiler trace of training steps A..B-1 (0-based, as report.json's
`loss` list counts them), written to DIR/profile.

jax.profiler.start_trace(DIR/profile, create_perfetto_trace=True) writes, under
DIR/profile/plugins/profile/<timestamp>/, `<host>.xplane.pb` (what TensorBoard's profile plugin reads),
`<host>.trace.json.gz` and `perfetto_trace.json.gz` (Chrome trace JSON for https://ui.perfetto.dev). Every
device op of the compiled step is one event whose args name its HLO module and op ("jit_step", "all-reduce.3").
"""

from __future__ import annotations

import contextlib
import gzip
import json
import pathlib

import jax

from jaxtp.errors import UserError

__all__ = ["parse_steps", "StepProfiler", "trace_files", "device_ops"]


def parse_steps(spec: str, steps: int) -> tuple[int, int]:
    """`A:B` -> (A, B) with 0 <= A < B <= steps; a UserError (one line) otherwise."""
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise UserError(f"--profile-steps wants A:B (two integers, such as 10:13), got {spec!r}") from None
    if not 0 <= a < b <= steps:
        raise UserError(
            f"--profile-steps {spec}: need 0 <= A < B <= --steps ({steps}); steps A..B-1 are traced"
        )
    return a, b


class StepProfiler:
    """Traces steps [start, stop) into `directory`. The job calls `step(i)` around step i's work (a context: the
    trace starts before step `start` and each traced step is a StepTraceAnnotation, which TensorBoard's profile
    plugin uses for its step-time view) and `end(i, outputs)` after it: after step stop-1 it waits for `outputs`
    and stops the trace. `traced(i)` says whether step i ran under the profiler (its time is not a clean one)."""

    def __init__(self, directory, start: int, stop: int):
        self.directory, self.start, self.stop = pathlib.Path(directory), start, stop
        self.running = False

    def traced(self, i: int) -> bool:
        return self.start <= i < self.stop

    def step(self, i: int):
        if not self.traced(i):
            return contextlib.nullcontext()
        if i == self.start:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.running = True
        return jax.profiler.StepTraceAnnotation("train", step_num=i)

    def end(self, i: int, outputs=None):
        if self.running and i == self.stop - 1:
            jax.block_until_ready(outputs)
            self.close()

    def close(self):
        """Stop a trace still running (the job failed inside the traced steps): it is written as far as it got."""
        if self.running:
            self.running = False
            jax.profiler.stop_trace()


def trace_files(directory) -> dict[str, list[pathlib.Path]]:
    """{"xplane": [...], "perfetto": [...]}: the trace files under `directory` (DIR/profile)."""
    d = pathlib.Path(directory)
    return {"xplane": sorted(d.rglob("*.xplane.pb")), "perfetto": sorted(d.rglob("perfetto_trace.json.gz"))}


def device_ops(perfetto_trace) -> list[dict]:
    """The device-op events of a perfetto_trace.json.gz: those whose args name an HLO op ({"name", "ts",
    "dur" (microseconds), "args": {"hlo_module", "hlo_op", ...}}), in the file's order."""
    with gzip.open(perfetto_trace, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return [e for e in events if "hlo_op" in e.get("args", {})]
