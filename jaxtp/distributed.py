"""Multi-process runs on JAX's own distributed runtime, and a local launcher for N processes.

Each process fakes its share of CPU devices, then `jax.distributed.initialize` joins them into one
global device list, so a 2x4 mesh can span 2 processes x 4 devices (gloo carries CPU collectives).
Timeouts are lowered so a missing peer fails in seconds, not after JAX's 5-minute default.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax

from .mesh import use_cpu_devices

INIT_TIMEOUT_S = 60
HEARTBEAT_TIMEOUT_S = 15
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def initialize(coordinator: str, num_processes: int, process_id: int, local_devices: int | None = None,
               timeout_s: int = INIT_TIMEOUT_S) -> None:
    """Join a multi-process run (before any JAX operation). Raises RuntimeError in one line on failure."""
    if not (0 <= process_id < num_processes):
        raise ValueError(f"process id {process_id} is outside 0..{num_processes - 1} (--num-processes {num_processes})")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address {coordinator!r} must look like HOST:PORT, e.g. 10.0.0.1:1234")
    if local_devices:
        use_cpu_devices(local_devices)
    bind = f"{host}:{port}" if host in ("127.0.0.1", "localhost") else None
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S, coordinator_bind_address=bind)
    except Exception as e:  # the runtime raises XlaRuntimeError with a long multi-line status
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"process {process_id}/{num_processes} could not join the run at {coordinator} within "
                           f"{timeout_s} s (are all {num_processes} processes started?): {first}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(argv: list[str], n: int, poll_s: float = 0.2) -> int:
    """Run `python argv...` as n processes on loopback; prefix their output; if one fails, stop the rest.

    Returns 0 when all succeed, else the first non-zero exit code (or 1 for a signal).
    """
    port = free_port()
    procs = []
    for i in range(n):
        env = {**os.environ, ENV["coordinator"]: f"127.0.0.1:{port}", ENV["num_processes"]: str(n),
               ENV["process_id"]: str(i), "PYTHONUNBUFFERED": "1"}
        env.pop("XLA_FLAGS", None)
        p = subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
        threading.Thread(target=_pump, args=(p, f"[p{i}] "), daemon=True).start()
        procs.append(p)
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        failed = (-1, 130)
    if failed is None:
        bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
        failed = bad[0] if bad else None
    if failed is not None:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        i, code = failed
        who = "interrupted" if i < 0 else f"process {i} exited with code {code}"
        print(f"error: {who}; stopped the other processes", file=sys.stderr)
        return code if isinstance(code, int) and code > 0 else 1
    return 0


def _pump(proc, prefix: str):
    for line in proc.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()
