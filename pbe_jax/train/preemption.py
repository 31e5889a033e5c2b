"""Preemption: SIGTERM, what Compute Engine and GKE send before taking a host back, ends training at a step
that every process agrees on, after a checkpoint at that step."""
from __future__ import annotations

import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
    """Training stopped on a preemption notice after checkpointing `step` in `checkpoints`."""

    def __init__(self, step: int, checkpoints: str):
        super().__init__(f"preempted: checkpoint at step {step} saved in {checkpoints}")
        self.step, self.checkpoints = step, checkpoints


class PreemptionWatch:
    """`reached(step)` is True at the step at which the run should save and stop, the same on every process.

    One process: a SIGTERM handler notes the signal, and the step during which it came is the one saved.
    Several (after `jax.distributed.initialize()`): JAX's preemption sync point
    (`multihost_utils.reached_preemption_sync_point`, to be asked at every step). The coordination service's own
    handler receives the signal on whichever hosts get it, and all processes agree on one step, the next after
    the largest any of them has reached; no Python handler is installed, since it would replace that one.
    Either way a second signal while the checkpoint is written changes nothing: the save finishes (the last good
    checkpoint is never touched by it, orbax writes a new step folder and commits it last)."""

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self.signalled = False
        self._previous = None
        self._warned = False

    def __enter__(self) -> "PreemptionWatch":
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        if self.signalled:
            print("SIGTERM again: the checkpoint is still being written; stopping once it is complete",
                  file=sys.stderr, flush=True)
        self.signalled = True

    def reached(self, step: int) -> bool:
        if not self.multi_process:
            return self.signalled
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError as e:  # the preemption service is switched off (jax_enable_preemption_service)
            if not self._warned:
                print(f"warning: no preemption checkpoints across processes: {e}", file=sys.stderr, flush=True)
                self._warned = True
            return False
