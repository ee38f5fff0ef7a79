"""Scalars for TensorBoard: the main job's loss, learning rate, grad norm, speed and held-out losses.

`open_writer(directory)` returns an `EventWriter` (tensorboardX event files in `directory`; no TensorFlow) on
process 0 and a `NullWriter` (writes nothing) on the other processes of a multi-process run, or when disabled,
so the job calls the same methods either way. `read_scalars(directory)` reads the event files back, for tests
and for scripts that want the numbers without TensorBoard.

    tensorboard --logdir DIR/tensorboard
"""

from __future__ import annotations

import pathlib
import struct
import sys

import jax

__all__ = ["NullWriter", "EventWriter", "open_writer", "read_scalars"]

FLUSH_SECS = 10  # a TensorBoard watching a live run sees new points within this


class NullWriter:
    """Writes nothing: other processes of a multi-process run, and `jaxtp run --no-metrics`."""

    directory = None

    def scalars(self, step: int, values: dict):
        pass

    def close(self):
        pass


def _tensorboardx():
    """The tensorboardX package, imported without torch: tensorboardX imports torch (when it is installed, as
    in jaxtp's dev extra) only to accept torch tensors, which costs a second and some hundred MB at start-up.
    The job logs Python floats. A torch already imported is left alone."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
    try:
        import tensorboardX
    finally:
        if blocked:
            del sys.modules["torch"]
    return tensorboardX


class EventWriter(NullWriter):
    """TensorBoard event files in `directory`, one scalar per tag and step (tensorboardX.SummaryWriter, which
    writes on a background thread: adding a scalar costs microseconds)."""

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.writer = _tensorboardx().SummaryWriter(str(self.directory), flush_secs=FLUSH_SECS)

    def scalars(self, step: int, values: dict):
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), int(step))

    def close(self):
        self.writer.close()


def open_writer(directory, enabled: bool = True) -> NullWriter:
    """An EventWriter on `directory` on process 0 when `enabled`, else a NullWriter."""
    return EventWriter(directory) if enabled and jax.process_index() == 0 else NullWriter()


def _records(path: pathlib.Path):
    """The records of a TFRecord file (an event file): u64 length, u32 crc, data, u32 crc; a truncated last
    record (a writer still running) is skipped."""
    buf = path.read_bytes()
    at = 0
    while at + 12 <= len(buf):
        (n,) = struct.unpack_from("<Q", buf, at)
        if at + 12 + n + 4 > len(buf):
            return
        yield buf[at + 12 : at + 12 + n]
        at += 12 + n + 4


def read_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the event files under `directory`, files in name order
    (tensorboardX names them by creation time), points in the order written."""
    _tensorboardx()
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(pathlib.Path(directory).rglob("events.out.tfevents.*")):
        for record in _records(path):
            event = Event.FromString(record)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out
