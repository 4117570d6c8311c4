"""Stopping a run cleanly: on a signal, or ahead of a Slurm time limit.

Any rank (or the batch shell, which forwards the signal to the tasks) may receive
SIGUSR1 or SIGTERM. The handler only sets ``StopRequest``; the loop's one small
all-reduce per step tells every rank, all ranks finish the step, write one complete
checkpoint together, and the process exits with ``EXIT_REQUEUE`` so a batch script can
requeue the job (``slurm/*.sbatch``); the requeued job resumes with ``--resume auto``.
A second signal while stopping is logged and ignored: it cannot interrupt the save, and
a save that cannot finish leaves the previous checkpoint as ``latest``.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from typing import Mapping, Optional

EXIT_REQUEUE = 85  # stopped on request, checkpoint written: requeue me
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Set from anywhere (a signal handler); honoured by all ranks at the next step boundary."""

    def __init__(self):
        self.reason: Optional[str] = None

    def request(self, reason: str = "requested") -> None:
        self.reason = self.reason or reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


EARLY_STOP = StopRequest()  # the run's request, caught from the very start of the process


def install_early(argv: list[str]) -> None:
    """Installs the stop handlers before the heavy imports of ``train`` (seconds), so a
    signal in that window is a stop request, not the default action (terminate)."""
    if "train" in argv:
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "?"
        install_stop_signals(EARLY_STOP, rank)


def install_stop_signals(stop: StopRequest, rank) -> None:
    """SIGUSR1 / SIGTERM -> ``stop.request``. Main thread only (Python's rule)."""

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stop.requested:
            sys.stderr.write(f"moe_train: rank {rank}: {name} again; already stopping "
                             f"({stop.reason}), the checkpoint in progress goes on\n")
            return
        stop.request(f"{name} on rank {rank}")
        sys.stderr.write(f"moe_train: rank {rank}: {name} received; stopping after this step "
                         f"and writing a checkpoint\n")

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def slurm_job_end(environ: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """The running Slurm job's end time (epoch seconds), or None outside Slurm.

    Read from SLURM_JOB_END_TIME when Slurm sets it, else from ``scontrol show job``
    (EndTime=2026-11-29T23:00:00, the controller's local time)."""
    e = os.environ if environ is None else environ
    if e.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(e["SLURM_JOB_END_TIME"])
    job = e.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for field in out.split():
        if field.startswith("EndTime="):
            value = field.split("=", 1)[1]
            try:
                return datetime.datetime.fromisoformat(value).timestamp()
            except ValueError:
                return None  # "Unknown": no time limit
    return None


class TimeLimit:
    """Asks for a stop ``minutes`` before ``end`` (epoch seconds)."""

    def __init__(self, end: Optional[float], minutes: float):
        self.deadline = None if (end is None or minutes <= 0) else end - 60.0 * minutes
        self.minutes = minutes

    def due(self, now: Optional[float] = None) -> bool:
        return self.deadline is not None and (now or time.time()) >= self.deadline


def ignore_stop_signals() -> None:
    """Once the run is over: a stop signal still pending (some libraries block signals in
    the threads that would take it) must not kill the process during interpreter shutdown,
    where Python resets its own handlers to the default action (terminate)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
