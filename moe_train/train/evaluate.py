"""The one evaluation: the token-weighted mean cross-entropy of a model over a loader.

Training calls it every ``train.eval_every`` steps (on every rank, reduced over the
data-parallel group), ``moe-train eval`` and the before/after tables of ``prune`` and
``quantize`` call it in one process (``moe_train.inference.heldout_loss``). Each
batch's summed loss is computed in fp32 and accumulated in float64 with the token count,
so a mean over many batches does not drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per target token (nats)
    tokens: int  # target tokens scored (labels != -100), over every rank

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def scalars(self) -> dict[str, float]:
        """The TensorBoard scalars of an evaluation: ``eval/loss``, ``eval/ppl``, ``eval/tokens``."""
        return {"eval/loss": self.loss, "eval/ppl": self.ppl, "eval/tokens": float(self.tokens)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, max_batches: int = 0, group=None,
             device: Optional[torch.device] = None) -> EvalResult:
    """Mean loss of ``model`` (returning ``.logits_BSV``) over the batches of ``loader``.

    Args:
        max_batches: stop after this many batches (0: the whole loader). Under expert
            parallelism every rank must run the same number of batches (the MoE layers'
            all-to-alls are collectives).
        group: the data-parallel group to sum the loss and the tokens over (None: this
            process only).
        device: where the batches go (default: the model's).
    The model is evaluated in eval mode (no dropout, no router jitter, eval capacity) and
    left in the mode it was in.
    """
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    try:
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            labels = batch["labels"].to(device)
            out = model(batch["input_ids"].to(device))
            total[0] += F.cross_entropy(out.logits_BSV.float().flatten(0, 1), labels.flatten(),
                                        ignore_index=-100, reduction="sum").double()
            total[1] += (labels != -100).sum()
    finally:
        model.train(was_training)
    if group is not None:
        dist.all_reduce(total, group=group)
    return EvalResult(float(total[0] / total[1].clamp_min(1)), int(total[1]))
