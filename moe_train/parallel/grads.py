"""Gradient reduction and clipping that know which parameters are experts.

  dense parameters:  gradients averaged over the data-parallel group (all ranks);
  expert parameters: gradients averaged over the expert-data-parallel group only (the
                     ranks holding the same experts); other ranks' experts are different
                     parameters, never mixed in.
  global norm:       sqrt(||g_dense||^2 + sum over EP ranks of ||g_local_experts||^2),
                     dense counted once (averaging norms across ranks that own different
                     experts is the DeepSpeed #8475 / Megatron #5916 bug).

Expert parameters are recognised the way DeepSpeed does (``allreduce = False``).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from moe_train.parallel.groups import ParallelGroups


def is_expert_param(param: torch.Tensor) -> bool:
    return getattr(param, "allreduce", True) is False


def split_params(params: Iterable[nn.Parameter]) -> tuple[list, list]:
    """(dense, expert) parameters that have gradients."""
    dense, expert = [], []
    for p in params:
        if p.grad is not None:
            (expert if is_expert_param(p) else dense).append(p)
    return dense, expert


def _mean_over(params: list, group, size: int) -> None:
    if group is None or size == 1 or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def allreduce_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Averages dense gradients over all ranks and expert gradients over the EDP group
    (one flat all-reduce each)."""
    dense, expert = split_params(model.parameters())
    topo = groups.topology
    _mean_over(dense, groups.dp, topo.world_size)
    _mean_over(expert, groups.edp, topo.edp_size)


def global_grad_norm(model: nn.Module, groups: ParallelGroups) -> torch.Tensor:
    """The global L2 norm of the full model's gradient (after ``allreduce_gradients``)."""
    dense, expert = split_params(model.parameters())
    ref = next(model.parameters())
    dense_sq = sum((p.grad.float().pow(2).sum() for p in dense), ref.new_zeros((), dtype=torch.float32))
    expert_sq = sum((p.grad.float().pow(2).sum() for p in expert), ref.new_zeros((), dtype=torch.float32))
    if groups.ep is not None:  # each EP rank holds different experts: add them up
        dist.all_reduce(expert_sq, group=groups.ep)
    return (dense_sq + expert_sq).sqrt()


def clip_grad_norm_(model: nn.Module, max_norm: float, groups: ParallelGroups) -> torch.Tensor:
    """Scales all gradients so the global norm is at most ``max_norm``; returns the
    norm before clipping. ``max_norm <= 0`` only measures."""
    norm = global_grad_norm(model, groups)
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm
