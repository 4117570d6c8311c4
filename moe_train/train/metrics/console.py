"""Throughput over the log window and the console line the loop prints."""

from __future__ import annotations

import math
import time
from typing import Optional


class StepTimer:
    """Tokens/s, seconds per step and ETA over the current log window.

    Call ``tick(num_tokens)`` after every step and ``window(steps_left)`` on log steps.
    Wall time is measured between ticks; on CUDA a single step's wall time means little
    (kernels run asynchronously), but the log step's ``.item()`` synchronises, so a
    whole window's time is right. Call ``restart()`` after work that is not training
    (eval, checkpoint) so it is not counted as step time.
    """

    def __init__(self):
        self.restart()
        self._reset_window()

    def restart(self) -> None:
        self._last = time.perf_counter()

    def _reset_window(self) -> None:
        self._seconds, self._steps, self._tokens = 0.0, 0, 0

    def tick(self, num_tokens: int) -> float:
        """Ends a step of ``num_tokens`` (global) tokens; returns its wall seconds."""
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self._seconds += dt
        self._steps += 1
        self._tokens += num_tokens
        return dt

    def window(self, steps_left: int) -> dict[str, float]:
        """``tokens_per_s``, ``step_time_s`` (mean) and ``eta_s`` of the window since
        the last call, then starts a new window. Empty if no step was ticked."""
        if self._steps == 0:
            return {}
        step_time = self._seconds / self._steps
        out = {"tokens_per_s": self._tokens / max(self._seconds, 1e-9),
               "step_time_s": step_time,
               "eta_s": step_time * max(steps_left, 0)}
        self._reset_window()
        return out


def format_eta(seconds: Optional[float]) -> str:
    """``1h02m`` from an hour on, ``4m05s`` below it; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_console_line(step: int, max_steps: int, values: dict) -> str:
    """One console line per log step, fields separated by `` | ``:

    ``step   30/100 | loss 4.1234 (lm 4.1000 aux 1.0123 z 0.2345) | lr 3.00e-04 |
    gnorm 0.812 | 12,345 tok/s | 0.210 s/step | drop 0.012 | load_cv 0.231 | eta 0m15s``

    Always starts with ``step <n>/<total>`` (n right-aligned to the width of total); the
    other fields come from ``values`` keys loss, lm_loss, aux_loss, z_loss, lr,
    grad_norm, tokens_per_s, step_time_s, drop_frac, load_cv, eta_s, and a missing key
    leaves its field out. Parse with e.g. ``r"^step\\s+(\\d+)/(\\d+) .*\\blm (\\S+)"``.
    """
    width = len(str(max_steps))
    fields = [f"step {step:>{width}}/{max_steps}"]
    parts = [f"{label} {values[key]:.4f}" for key, label in
             (("lm_loss", "lm"), ("aux_loss", "aux"), ("z_loss", "z")) if key in values]
    if "loss" in values:
        fields.append(f"loss {values['loss']:.4f}" + (f" ({' '.join(parts)})" if parts else ""))
    elif parts:
        fields.append(" ".join(parts))
    formats = [("lr", "lr {:.2e}"), ("grad_norm", "gnorm {:.3f}"),
               ("tokens_per_s", "{:,.0f} tok/s"), ("step_time_s", "{:.3f} s/step"),
               ("drop_frac", "drop {:.3f}"), ("load_cv", "load_cv {:.3f}")]
    fields += [fmt.format(values[key]) for key, fmt in formats if key in values]
    if "eta_s" in values:
        fields.append(f"eta {format_eta(values['eta_s'])}")
    return " | ".join(fields)
