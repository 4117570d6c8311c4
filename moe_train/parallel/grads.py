"""Gradient reduction and clipping that know which parameters are experts.

  dense parameters:  gradients averaged over the data-parallel group (all W ranks);
  expert parameters: gradients reduced over the expert-data-parallel group only (the
                     ranks holding the same experts); other ranks' experts are different
                     parameters, never mixed in. The sum is divided by W, not by the EDP
                     size: through the all-to-all backward an expert already received the
                     gradient of every token its EP group sent it, so summing over EDP
                     covers all W ranks' losses once, and dividing by W gives the mean
                     loss's gradient whatever ep is (DeepSpeed's _reduce_expert_gradients
                     and Megatron's expert_gradient_scaling_factor do the same).
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


def _sum_then_divide(params: list, group, divisor: int) -> None:
    if not params or (group is None and divisor == 1):
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if group is not None:
        dist.all_reduce(flat, group=group)
    flat /= divisor
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def allreduce_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Averages dense gradients over all ranks; sums expert gradients over the EDP group
    and divides by the world size (see the module docstring). One flat all-reduce each."""
    dense, expert = split_params(model.parameters())
    world = groups.topology.world_size
    _sum_then_divide(dense, groups.dp, world)
    _sum_then_divide(expert, groups.edp if groups.topology.edp_size > 1 else None, world)


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
