"""Where each rank is (step and phase), so a hang or a dead peer becomes an error that
says where, not a silent stall until the launcher kills everything.

``PHASE`` is process-wide: the loop marks its phases (forward, backward, optimizer step,
checkpoint save ...) and every collective of ``parallel/comm.py`` marks itself
("forward all-to-all (tokens) of MoE layer 3"). Two things read it:

- ``failure_report``: when a collective raises (gloo reports a dead peer, or its
  ``parallel.timeout_s`` expires), the loop's caller prints the rank, the step, the phase
  and the Python stack, and exits non-zero.
- ``Watchdog``: a daemon thread for the hangs that raise nothing (a collective that never
  times out, a stuck data loader): when one phase has lasted longer than its kind's
  budget plus a margin, it prints the same report with every thread's stack and ends the
  process with ``EXIT_HANG``.

Each phase has a kind with its own budget (``Budgets``, from the config): "startup"
(rendezvous, model build, a DeepSpeed op compiled on first use, loading a checkpoint),
"step" (``parallel.timeout_s``: everything inside a training step), "eval" (a whole-split
evaluation) and "save" (a checkpoint write). A healthy rank in a long save is not killed
like a hung one, and a hung peer inside a step is still reported after the step budget.
The process group's own timeout is the largest budget (``Budgets.collective_s``), so a
collective of a long phase never times out before the watchdog judges it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Optional

EXIT_HANG = 86  # the watchdog ended a hung rank


KINDS = ("startup", "step", "eval", "save")


@dataclass(frozen=True)
class Budgets:
    """Seconds each kind of phase may last before the watchdog calls it hung."""

    startup: float = 1800.0
    step: float = 600.0
    eval: float = 1800.0
    save: float = 1800.0

    def of(self, kind: str) -> float:
        return getattr(self, kind)

    @property
    def collective_s(self) -> float:
        """The process group's timeout: no healthy phase's collective may time out."""
        return max(self.startup, self.step, self.eval, self.save)


class Phase:
    """The current step, phase label and phase kind of this process (thread-safe enough:
    plain attribute writes)."""

    def __init__(self):
        self.rank: Optional[int] = None
        self.step = 0
        self.label = "start-up"
        self.kind = "startup"
        self.since = time.monotonic()
        self.watched = False  # set while a Watchdog runs

    def enter(self, label: str, step: Optional[int] = None, kind: Optional[str] = None) -> None:
        """Marks a new phase; ``kind`` (one of ``KINDS``) changes the budget, otherwise
        the phase keeps its enclosing kind (a collective inside a save is a save)."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"phase kind {kind!r}: must be one of {', '.join(KINDS)}")
        self.label, self.since = label, time.monotonic()
        if kind is not None:
            self.kind = kind
        if step is not None:
            self.step = step

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
        return f"rank {rank}, step {self.step}, in {self.label} ({self.kind} phase)"


PHASE = Phase()


def failure_report(err: BaseException) -> str:
    """One block naming rank, step and phase, then the exception's Python stack."""
    stack = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return (f"moe_train: FAILED at {PHASE.where()} ({time.monotonic() - PHASE.since:.0f} s in it): "
            f"{type(err).__name__}: {err}\n{stack}")


class Watchdog:
    """Ends this process when one phase lasts longer than its kind's budget + ``margin_s``.

    Args:
        budgets: seconds per phase kind (``Budgets``; from the config's parallel section).
        margin_s: extra time for a collective's own error to arrive first.
    """

    def __init__(self, budgets: Budgets, margin_s: float = 15.0, poll_s: float = 1.0):
        self.budgets, self.margin_s = budgets, margin_s
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe_train-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        PHASE.watched = True
        self._thread.start()
        return self

    def stop(self) -> None:
        PHASE.watched = False
        self._stop.set()

    def limit(self, kind: str) -> float:
        return self.budgets.of(kind) + self.margin_s

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            stuck, kind = time.monotonic() - PHASE.since, PHASE.kind
            if PHASE.watched and stuck > self.limit(kind):
                sys.stderr.write(f"moe_train: HUNG at {PHASE.where()} for {stuck:.0f} s (the {kind} budget "
                                 f"{self.budgets.of(kind):.0f} s + margin {self.margin_s:.0f} s): a peer is "
                                 f"dead or stuck. Python stacks of this rank follow; the last complete "
                                 f"checkpoint is untouched.\n")
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_HANG)
