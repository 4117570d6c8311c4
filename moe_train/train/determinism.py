"""``train.deterministic``: bit-identical reruns with the same seed and layout.

What decides it:
- Seeds: every random draw (weights, data order, router jitter, dropout) already comes
  from (train.seed, rank, step) seeded generators; nothing reads the clock.
- CPU: matmuls and reductions are deterministic for a fixed thread count, and gloo's
  all-reduce / all-to-all combine in a fixed order for a fixed world size, so seeding is
  enough there; the intra-op thread count is pinned (``torch.get_num_threads`` is
  recorded) because a reduction split over another number of threads rounds
  differently.
- CUDA: cuBLAS needs a fixed workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, set before
  the first cuBLAS call), cuDNN's autotuner must be off, and some kernels (atomics in
  ``index_add_``, ``scatter_add_`` and their backward on CUDA) are non-deterministic.
  ``torch.use_deterministic_algorithms(True, warn_only=True)`` swaps in deterministic
  kernels where PyTorch has them and warns, once per op, where it has none; those
  warnings are collected and named in the run's log (``Determinism.report``) instead of
  failing the run, so a user learns which ops stand between them and bitwise
  reproducibility.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field

import torch

_NONDET = re.compile(r"^(.*?) does not have a deterministic implementation")


@dataclass
class Determinism:
    """Attributes:
        enabled: ``train.deterministic``.
        threads: the intra-op thread count the run is pinned to.
        ops: the ops PyTorch reported as having no deterministic implementation (CUDA).
    """

    enabled: bool
    threads: int = 0
    ops: set[str] = field(default_factory=set)
    _previous_showwarning: object = None

    def report(self) -> str:
        if not self.enabled:
            return "deterministic: off (train.deterministic)"
        if self.ops:
            return (f"deterministic: on, {self.threads} threads; NOT deterministic on this device: "
                    f"{', '.join(sorted(self.ops))} (no deterministic kernel in PyTorch)")
        return f"deterministic: on, {self.threads} threads; every op ran a deterministic kernel"


def configure(enabled: bool, device: torch.device) -> Determinism:
    """Applies the settings above (when ``enabled``) before any model or cuBLAS call."""
    det = Determinism(enabled, threads=torch.get_num_threads())
    if not enabled:
        return det
    torch.set_num_threads(det.threads)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cpu":
        # Deterministic mode also fills every torch.empty with NaN (a debugging aid
        # against reads of uninitialised memory). On CPU it made a training step about 9x
        # slower (page faults on DeepSpeed's large flat buffers: tests/test_determinism.py
        # took 137 s with it, 12 s without), and the CPU kernels we run are deterministic
        # without it; CUDA keeps PyTorch's default.
        torch.utils.deterministic.fill_uninitialized_memory = False
    previous = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        match = _NONDET.match(str(message))
        if match:
            det.ops.add(match.group(1))
            return
        previous(message, category, filename, lineno, file, line)

    det._previous_showwarning = previous
    warnings.showwarning = record
    return det


def restore(det: Determinism) -> None:
    """Undoes ``configure`` (tests run several trainings in one process)."""
    if det.enabled:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = True
        if det._previous_showwarning is not None:
            warnings.showwarning = det._previous_showwarning
