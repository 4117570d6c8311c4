"""The one seam through which tests inject faults into a real training run.

The loop is given a ``Faults`` object and asks it at three points: before a step
(``before_step``: a stop request as if a signal arrived, or a rank that hangs), on each
micro-batch's loss (``loss``: a non-finite loss) and when a checkpoint is written
(``save_hook``: the writer dies with its files half written). ``NO_FAULTS``, the default,
answers every question with "nothing happens".

Runs started through a launcher take their faults from the environment (``moe-train
train`` calls ``Faults.from_env``), since a test cannot hand an object to another
process:

    MOE_TRAIN_FAULT="kind@step[:rank][,kind@step[:rank]...]"

    stop@12        every rank is asked to stop at step 12 (as SIGUSR1 would)
    hang@12:1      rank 1 sleeps forever at step 12 (its peers' collectives time out)
    nan_loss@5     every rank's loss of step 5 is NaN (the step is skipped)
    kill_in_save@10:0   rank 0 dies (exit 137) inside the save of step 10
    slow_save=40@10:0   rank 0 takes 40 s longer inside the save of step 10 (a healthy,
                        slow writer: its peers wait in the save's agreement)

Faults a real OS can produce (a full disk, a killed process, a read-only mount) are
produced for real by the tests, not through this seam.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

ENV = "MOE_TRAIN_FAULT"
KINDS = ("stop", "hang", "nan_loss", "kill_in_save", "slow_save")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: Optional[int] = None  # None: every rank
    seconds: float = 0.0  # slow_save's delay


class Faults:
    """The faults of one run (module docstring); empty in production."""

    def __init__(self, spec: str = ""):
        self.faults = [_parse(item.strip()) for item in spec.split(",") if item.strip()]

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Faults":
        return cls((os.environ if environ is None else environ).get(ENV, ""))

    def __bool__(self) -> bool:
        return bool(self.faults)

    def at(self, kind: str, step: int, rank: int) -> bool:
        return any(f.kind == kind and f.step == step and f.rank in (None, rank) for f in self.faults)

    def before_step(self, step: int, rank: int, stop) -> None:
        """A stop request as if a signal reached this rank now; or a hang, as if this
        rank's peer never answered."""
        if self.at("stop", step, rank):
            stop.request("fault injection")
        if self.at("hang", step, rank):
            time.sleep(10 ** 6)

    def loss(self, loss, step: int, rank: int):
        """``loss``, or NaN in its place."""
        return loss * float("nan") if self.at("nan_loss", step, rank) else loss

    def save_hook(self, step: int, rank: int) -> Optional[Callable]:
        """A hook for ``save_checkpoint`` that kills the writer mid-save or slows it
        down, or None."""
        if self.at("kill_in_save", step, rank):
            def die(phase, tmp):  # the writer dies with its files half published
                os._exit(137)

            return die
        slow = [f.seconds for f in self.faults if f.kind == "slow_save" and f.step == step
                and f.rank in (None, rank)]
        if slow:
            def dawdle(phase, tmp):
                time.sleep(slow[0])

            return dawdle
        return None


def _parse(item: str) -> Fault:
    kind, _, where = item.partition("@")
    kind, _, seconds = kind.partition("=")
    step, _, rank = where.partition(":")
    if (kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit())
            or (kind == "slow_save") != bool(seconds) or (seconds and not seconds.replace(".", "", 1).isdigit())):
        raise ValueError(f"{ENV}: {item!r}: expected kind@step[:rank] with kind one of {', '.join(KINDS)} "
                         f"(slow_save=SECONDS@step[:rank])")
    return Fault(kind, int(step), int(rank) if rank else None, float(seconds or 0))


NO_FAULTS = Faults()
