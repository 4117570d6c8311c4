"""One optimizer step over ``train.grad_accum_steps`` micro-batches: forward, the total
loss (``moe_train.moe.losses.total_loss``), the ranks' agreement on a finite loss and a
stop request, backward, the learning rate, clipping and the optimizer step."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from moe_train.moe.losses import total_loss
from moe_train.parallel.grads import clip_grad_norm_
from moe_train.parallel.groups import ParallelGroups
from moe_train.parallel.phase import PHASE
from moe_train.train.control import StopRequest
from moe_train.train.engine import Engine, set_lr
from moe_train.train.faults import NO_FAULTS, Faults
from moe_train.train.schedule import lr_at


@dataclass
class StepOut:
    loss_parts: dict  # lm_loss, aux_loss, z_loss, loss: means over micro-batches (tensors)
    moe_stats: list
    grad_norm: Optional[float]
    skipped: bool
    stop: bool
    mean_lm: float  # lm loss averaged over micro-batches and ranks
    digest: int = 0  # a hash of this rank's input ids of the step (same data <=> same digest)


def train_step(engine: Engine, batches: Iterator[dict], cfg, groups: ParallelGroups,
               device, step: int, stop: StopRequest, faults: Faults = NO_FAULTS) -> StepOut:
    """One optimizer step over ``train.grad_accum_steps`` micro-batches.

    A non-finite loss on any rank turns the last backward into NaN gradients on purpose,
    so every rank's optimizer (DeepSpeed's ZeRO overflow check, or our own norm at ZeRO
    0) skips this step identically and discards the accumulated gradients. The ranks
    agree on that and on a stop request in one all-reduce per step. ``cfg`` is the run's
    ``moe_train.config.Config``; ``faults`` the test seam (``moe_train.train.faults``).
    """
    ds, gas = engine.ds, cfg.train.grad_accum_steps
    sums = {k: torch.zeros((), device=device) for k in ("loss", "lm_loss", "aux_loss", "z_loss")}
    bad = torch.zeros((), device=device)
    rank, digest = groups.rank, 0
    for micro in range(gas):
        batch = next(batches)
        digest = zlib.crc32(batch["input_ids"].numpy().tobytes(), digest)
        ds.set_gradient_accumulation_boundary(micro == gas - 1)
        PHASE.enter(f"forward of micro-batch {micro + 1}/{gas}")
        out = ds(batch["input_ids"].to(device), batch["labels"].to(device))
        loss = total_loss(out.lm_loss, out.moe_losses, cfg.moe, out.moe_seq_losses)  # [routing] + seq loss
        loss = faults.loss(loss, step, rank)
        bad = torch.maximum(bad, (~torch.isfinite(loss.detach())).float())
        sums["lm_loss"] += out.lm_loss.detach() / gas
        if micro == gas - 1:  # [any bad loss, any stop request, sum of lm losses]: one all-reduce
            packed = torch.stack([bad, torch.tensor(float(stop.requested), device=device),
                                  sums["lm_loss"].float()])
            if groups.dp is not None:
                PHASE.enter("the per-step agreement all-reduce (loss finite? stop requested?)")
                dist.all_reduce(packed, group=groups.dp)
            # On the device, not read by the host here: a host read between the last forward
            # and its backward would stall queuing the backward until the forward is done
            # (a GPU sync). The flags are read after the optimizer step, which syncs anyway.
            loss = loss * torch.where(packed[0] > 0, float("nan"), 1.0)
        PHASE.enter(f"backward of micro-batch {micro + 1}/{gas} (gradient reduction at the last)")
        ds.backward(loss)
        sums["loss"] += loss.detach() / gas
        sums["aux_loss"] += sum((a.detach() for a, _ in out.moe_losses), torch.zeros((), device=device)) / gas
        sums["z_loss"] += sum((z.detach() for _, z in out.moe_losses), torch.zeros((), device=device)) / gas
    set_lr(engine, lr_at(step, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, warmup_steps=cfg.optim.warmup_steps,
                         total_steps=cfg.train.max_steps, decay=cfg.optim.decay))
    grad_norm = None
    if engine.own_clipping:
        PHASE.enter("gradient-norm all-reduce (clipping)")
        grad_norm = float(clip_grad_norm_(ds.module, cfg.optim.grad_clip, groups))
        if not math.isfinite(grad_norm):
            ds.zero_grad()  # ZeRO 0: gradients live in .grad; drop them, take no step
            skip, want_stop, mean_lm = _flags(packed, groups)
            return StepOut(sums, out.moe_stats, grad_norm, True, want_stop, mean_lm, digest)
    skipped_before = ds.skipped_steps
    PHASE.enter("optimizer step (ZeRO gradient norm, update, parameter all-gather)")
    ds.step()
    skip, want_stop, mean_lm = _flags(packed, groups)
    skipped = skip or ds.skipped_steps > skipped_before
    if grad_norm is None:
        norm = ds.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
    return StepOut(sums, out.moe_stats, grad_norm, skipped, want_stop, mean_lm, digest)


def _flags(packed: torch.Tensor, groups: ParallelGroups) -> tuple[bool, bool, float]:
    """(any rank's loss non-finite, any rank asked to stop, lm loss averaged over ranks):
    the host's one read of the step's agreement, after the backward."""
    bad, stop, lm_sum = packed.tolist()
    return bad > 0, stop > 0, lm_sum / groups.topology.world_size
