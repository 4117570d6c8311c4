"""Where each rank is (step and phase), so a hang or a dead peer becomes an error that
says where, not a silent stall until the launcher kills everything.

``PHASE`` is process-wide: the loop marks its phases (forward, backward, optimizer step,
checkpoint save ...) and every collective of ``parallel/comm.py`` marks itself
("forward all-to-all (tokens) of MoE layer 3"). Two things read it:

- ``failure_report``: when a collective raises (gloo reports a dead peer, or its
  ``parallel.timeout_s`` expires), the loop's caller prints the rank, the step, the phase
  and the Python stack, and exits non-zero.
- ``Watchdog``: a daemon thread for the hangs that raise nothing (a collective that never
  times out, a stuck data loader): when one phase has lasted longer than
  ``parallel.timeout_s`` plus a margin, it prints the same report with every thread's
  stack and ends the process with ``EXIT_HANG``.

A phase must therefore never legitimately last longer than ``parallel.timeout_s``: a step,
a collective, a checkpoint write.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
import traceback
from typing import Optional

EXIT_HANG = 86  # the watchdog ended a hung rank


class Phase:
    """The current step and phase label of this process (thread-safe enough: plain
    attribute writes)."""

    def __init__(self):
        self.rank: Optional[int] = None
        self.step = 0
        self.label = "start-up"
        self.since = time.monotonic()
        # The watchdog judges phases only once the loop has started (the first phase entered
        # with a step number): start-up may legitimately take long (DeepSpeed compiles an op
        # on first use) and its rendezvous has its own timeout.
        self.watched = False

    def enter(self, label: str, step: Optional[int] = None) -> None:
        self.label, self.since = label, time.monotonic()
        if step is not None:
            self.step = step
            self.watched = True

    @contextlib.contextmanager
    def __call__(self, label: str):
        """Marks ``label`` for the duration of the block, then restores the outer one."""
        outer = self.label
        self.enter(label)
        try:
            yield
        finally:
            self.enter(outer)

    def where(self) -> str:
        rank = "?" if self.rank is None else self.rank
        return f"rank {rank}, step {self.step}, in {self.label}"


PHASE = Phase()


def failure_report(err: BaseException) -> str:
    """One block naming rank, step and phase, then the exception's Python stack."""
    stack = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return (f"moe_train: FAILED at {PHASE.where()} ({time.monotonic() - PHASE.since:.0f} s in it): "
            f"{type(err).__name__}: {err}\n{stack}")


class Watchdog:
    """Ends this process when one phase lasts longer than ``timeout_s + margin_s``.

    Args:
        timeout_s: ``parallel.timeout_s``, the limit every collective already has.
        margin_s: extra time for the collective's own timeout error to arrive first.
    """

    def __init__(self, timeout_s: float, margin_s: float = 15.0, poll_s: float = 1.0):
        self.limit = timeout_s + margin_s
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe_train-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        PHASE.watched = False
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            stuck = time.monotonic() - PHASE.since
            if PHASE.watched and stuck > self.limit:
                sys.stderr.write(f"moe_train: HUNG at {PHASE.where()} for {stuck:.0f} s (parallel.timeout_s "
                                 f"+ margin = {self.limit:.0f} s): a peer is dead or stuck. Python stacks of "
                                 f"this rank follow; the last complete checkpoint is untouched.\n")
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_HANG)
