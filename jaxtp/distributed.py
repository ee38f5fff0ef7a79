"""Multi-process runs on JAX's own distributed runtime, and a local launcher for N processes.

Each process fakes its share of CPU devices, then `jax.distributed.initialize` joins them into one
global device list, so a 2x4 mesh can span 2 processes x 4 devices (gloo carries CPU collectives).
Timeouts are lowered so a missing peer fails in seconds, not after JAX's 5-minute default.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from .mesh import use_cpu_devices

__all__ = [
    "INIT_TIMEOUT_S",
    "HEARTBEAT_TIMEOUT_S",
    "ENV",
    "initialize",
    "to_host",
    "free_port",
    "launch_local",
    "supervise",
]

INIT_TIMEOUT_S = int(os.environ.get("JAXTP_INIT_TIMEOUT", "60"))  # seconds to wait for every peer
HEARTBEAT_TIMEOUT_S = int(
    os.environ.get("JAXTP_HEARTBEAT_TIMEOUT", "15")
)  # seconds before a silent peer counts as dead
ENV = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def initialize(
    coordinator: str,
    num_processes: int,
    process_id: int,
    local_devices: int | None = None,
    timeout_s: int = INIT_TIMEOUT_S,
) -> None:
    """Join a multi-process run (before any JAX operation). Raises RuntimeError in one line on failure."""
    if not (0 <= process_id < num_processes):
        raise ValueError(
            f"process id {process_id} is outside 0..{num_processes - 1} (--num-processes {num_processes})"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address {coordinator!r} must look like HOST:PORT, e.g. 10.0.0.1:1234")
    if local_devices:
        use_cpu_devices(local_devices)
    bind = f"{host}:{port}" if host in ("127.0.0.1", "localhost") else None
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
            coordinator_bind_address=bind,
        )
    except Exception as e:  # the runtime raises XlaRuntimeError with a long multi-line status
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"process {process_id}/{num_processes} could not join the run at {coordinator} within "
            f"{timeout_s} s (are all {num_processes} processes started?): {first}"
        ) from None


def to_host(x) -> np.ndarray:
    """A global array as numpy; across processes, gathered (every process gets the whole array)."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


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
        env = {
            **os.environ,
            ENV["coordinator"]: f"127.0.0.1:{port}",
            ENV["num_processes"]: str(n),
            ENV["process_id"]: str(i),
            "PYTHONUNBUFFERED": "1",
        }
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]  # each fakes its own
        env["XLA_FLAGS"] = " ".join(flags)
        p = subprocess.Popen(
            [sys.executable, *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
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


def _die_with_parent():
    """Linux: the worker gets SIGKILL when its supervisor dies, so killing one process kills its work."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


_NATIVE_LOG = re.compile(r"^([FEWI]\d{4} |\s+@\s|\*\*\* |RPC: |\[type\.googleapis|absl::|$)")


def supervise(argv: list[str], coordinator: str, num_processes: int, process_id: int) -> int:
    """Run this process's work in a child and turn a native abort of JAX's distributed runtime into one line.

    The runtime terminates the process (LOG(FATAL), SIGABRT) when peers never arrive or one dies, which
    Python cannot catch. The child's native log goes to a file named in the message; Python-level output
    passes through unchanged.
    """
    log_path = pathlib.Path(tempfile.gettempdir()) / f"jaxtp-process{process_id}-{os.getpid()}.log"
    env = {**os.environ, "JAXTP_WORKER": "1", "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(
        [sys.executable, *argv], env=env, stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent
    )
    fatal = ""
    with open(log_path, "w") as log:
        for line in child.stderr:
            log.write(line)
            if line.startswith("F") and "] " in line and not fatal:
                fatal = line.split("] ", 1)[1].strip()
            if not _NATIVE_LOG.match(line):
                sys.stderr.write(line)
                sys.stderr.flush()
    code = child.wait()
    if code >= 0 and code != 134:
        return code
    text = log_path.read_text()
    if "RegisterTask" in text:
        reason = (
            f"could not join the run at {coordinator} within {INIT_TIMEOUT_S} s (are all {num_processes} "
            "processes started with the same --coordinator?)"
        )
    else:
        status = re.search(r"absl::Status: ([^\n]*)", fatal or text)
        reason = "lost its peers: another process died or became unreachable" + (
            f" ({status.group(1)[:120]})" if status else ""
        )
    print(f"error: process {process_id}/{num_processes} {reason}; native log: {log_path}", file=sys.stderr)
    return 1
