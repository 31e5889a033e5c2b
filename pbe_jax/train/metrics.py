"""Training metrics to a JSONL file and, when the tensorboard package is installed, a TensorBoard event file
(records written with tensorboard's own record format: no TensorFlow needed). Both go through
`storage.AppendLog`, so the work dir may be a bucket: there they are rewritten whole, at most every
`flush_every_s` seconds, at each checkpoint (`flush`) and at the end."""
from __future__ import annotations

import json
import os
import socket
import time

from pbe_jax import storage
from pbe_jax.storage import PathLike


class MetricsWriter:
    def __init__(self, workdir: PathLike, enabled: bool = True, flush_every_s: float = 30.0):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if not enabled:
            return
        workdir = storage.path(workdir)
        self._jsonl = storage.AppendLog(workdir / "metrics.jsonl", min_interval_s=flush_every_s)
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError:
            print("tensorboard is not installed: metrics go to metrics.jsonl only")
            return
        folder = workdir / "tensorboard"
        folder.mkdir(parents=True, exist_ok=True)
        # One new event file per session, named as TensorBoard's own writer names them.
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.pbe"
        self._pb = (event_pb2, summary_pb2)
        self._tb = RecordWriter(storage.AppendLog(folder / name, min_interval_s=flush_every_s))
        self._tb.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        if self._tb is not None:
            event_pb2, summary_pb2 = self._pb
            values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
            self._tb.write(event_pb2.Event(wall_time=time.time(), step=step,
                                           summary=summary_pb2.Summary(value=values)).SerializeToString())

    def flush(self) -> None:
        """Make what was written so far durable (on an object store: upload it now)."""
        for log in (self._jsonl, self._tb):
            if log is not None:
                log.flush()

    def close(self) -> None:
        for log in (self._jsonl, self._tb):
            if log is not None:
                log.close()
