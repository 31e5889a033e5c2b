"""Training metrics to a JSONL file and, when the tensorboard package is installed, TensorBoard event files
(written with tensorboard's own event writer: no TensorFlow needed)."""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsWriter:
    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = open(Path(workdir) / "metrics.jsonl", "a") if enabled else None
        self._tb = None
        if enabled:
            try:
                from tensorboard.compat.proto import event_pb2, summary_pb2
                from tensorboard.summary.writer.event_file_writer import EventFileWriter
            except ImportError:
                print("tensorboard is not installed: metrics go to metrics.jsonl only")
            else:
                self._tb = EventFileWriter(str(Path(workdir) / "tensorboard"))
                self._pb = (event_pb2, summary_pb2)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            event_pb2, summary_pb2 = self._pb
            values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
            self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                               summary=summary_pb2.Summary(value=values)))
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
