"""The TensorBoard writer: one per run, on the logging rank only (one event file, not one
per rank). Every rank calls it; elsewhere it does nothing.

A run writes into ``<logging.dir>/<run name>``: TensorBoard, pointed at ``logging.dir``,
names each run after its folder and draws them side by side (``tensorboard --logdir
<logging.dir>``); a resumed run reopens its folder, so its curves join up."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch


def event_dir(log_dir) -> str:
    """The folder holding one run's event files under ``log_dir`` (a ``logging.dir``):
    ``log_dir`` itself when it holds event files, else its one run folder that does.
    For readers of a single run (tests, experiments) that do not know the run's name.

    Raises:
        ValueError: no run, or several (name them: pass ``log_dir/<run name>``).
    """
    def has_events(path: str) -> bool:
        return os.path.isdir(path) and any(n.startswith("events.out.tfevents") for n in os.listdir(path))

    log_dir = str(log_dir)
    if has_events(log_dir):
        return log_dir
    runs = sorted(n for n in os.listdir(log_dir) if has_events(os.path.join(log_dir, n))) \
        if os.path.isdir(log_dir) else []
    if len(runs) != 1:
        raise ValueError(f"{log_dir}: {'no TensorBoard run' if not runs else f'{len(runs)} runs ({runs})'} "
                         f"found; pass the run's folder, {log_dir}/<run name>")
    return os.path.join(log_dir, runs[0])


class MetricsWriter:
    """TensorBoard writer that exists on the logging rank only.

    ``MetricsWriter(log_dir, enabled=(rank == 0), run_name=...)``: the ``SummaryWriter``
    (and its event file, in ``log_dir/run_name``) is created only when ``enabled`` and
    ``log_dir`` is set; otherwise every method is a no-op, so the loop calls them
    unconditionally on every rank.
    """

    def __init__(self, log_dir: Optional[str], enabled: bool, run_name: str = ""):
        self._writer = None
        self.run_dir = os.path.join(log_dir, run_name) if log_dir and run_name else log_dir
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter  # import only where used

            self._writer = SummaryWriter(log_dir=self.run_dir)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One scalar per tag (e.g. ``train/loss``, ``moe/layer_3/drop_frac``)."""
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), step)

    def histogram(self, tag: str, values, step: int) -> None:
        """Per-expert load histogram from per-expert token counts ``values`` [E].

        The data are the E relative loads ``count_e / mean(count)``, so the x-axis is
        "load in units of the balanced share": perfectly balanced routing is a spike of
        E experts at 1.0; dead experts sit at 0; an expert at 3.0 gets three times its
        share. Relative (not raw) loads keep the axis comparable across batch sizes,
        layers and expert counts; the y-axis counts experts. Bins are fixed edges from 0
        to max(2, max load) so successive steps are drawn on the same grid.
        """
        if self._writer is None:
            return
        counts_E = torch.as_tensor(values).detach().double().cpu().reshape(-1)
        rel_E = (counts_E / counts_E.mean().clamp_min(1e-9)).numpy()
        upper = max(2.0, float(rel_E.max()) * (1 + 1e-6))
        edges = np.linspace(0.0, upper, 41)  # 40 bins of width upper / 40
        self._writer.add_histogram(tag, rel_E, step, bins=edges)

    def text(self, tag: str, text: str, step: int) -> None:
        """Free text (resolved config, topology); stored as TensorBoard's text plugin."""
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes; safe to call twice (the loop calls it in ``finally``)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
