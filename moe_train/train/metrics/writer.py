"""The TensorBoard writer: one per run, on the logging rank only (one event file, not one
per rank). Every rank calls it; elsewhere it does nothing."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class MetricsWriter:
    """TensorBoard writer that exists on the logging rank only.

    ``MetricsWriter(log_dir, enabled=(rank == 0))``: the ``SummaryWriter`` (and its
    event file) is created only when ``enabled`` and ``log_dir`` is set; otherwise
    every method is a no-op, so the loop calls them unconditionally on every rank.
    """

    def __init__(self, log_dir: Optional[str], enabled: bool):
        self._writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter  # import only where used

            self._writer = SummaryWriter(log_dir=log_dir)

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
