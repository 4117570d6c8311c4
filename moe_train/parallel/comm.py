"""Autograd-aware collectives over an explicitly passed process group.

Every function takes ``group=``; none falls back to the global world, so model code
never talks to a group it was not given (HOUSE_STYLE principle 3).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from moe_train.parallel.phase import PHASE


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with per-rank split sizes. The backward is the
    same exchange with the send and receive splits swapped."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group, label: str) -> Tensor:
        ctx.group, ctx.send_splits, ctx.recv_splits, ctx.label = group, send_splits, recv_splits, label
        out = x_ND.new_empty((sum(recv_splits),) + tuple(x_ND.shape[1:]))
        with PHASE(f"forward all-to-all of {label}"):
            dist.all_to_all_single(out, x_ND.contiguous(), output_split_sizes=recv_splits,
                                   input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_in = _AllToAll.apply(grad_out, ctx.recv_splits, ctx.send_splits, ctx.group,
                                  ctx.label.replace("(", "(backward of ", 1) if "(" in ctx.label
                                  else f"{ctx.label} (backward)")
        return grad_in, None, None, None, None


def all_to_all(x_ND: Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group,
               label: str = "tokens") -> Tensor:
    """Sends ``send_splits[r]`` consecutive rows of ``x_ND`` to rank r of ``group`` and
    returns the rows received, ``recv_splits[r]`` from rank r, concatenated in rank order.

    Zero-length splits, and a zero-row input, are legal: the rank still joins the
    collective, so no peer waits for it.

    Args:
        x_ND: [sum(send_splits), ...] rows to send.
        send_splits, recv_splits: per-rank row counts (host ints).
        group: the process group (expert-parallel group).
        label: what the exchange is, for the hang report ("MoE layer 3 (tokens)").
    Returns:
        [sum(recv_splits), ...] received rows; differentiable w.r.t. ``x_ND``.
    """
    return _AllToAll.apply(x_ND, list(map(int, send_splits)), list(map(int, recv_splits)), group, label)


def exchange_counts(send_counts_RE: Tensor, group, label: str = "token counts") -> Tensor:
    """Tells every rank how many rows it will receive, per local expert.

    Args:
        send_counts_RE: int64 [R, E_local]: rows this rank sends to rank r for its local
            expert e (R = group size).
    Returns:
        int64 [R, E_local]: rows this rank receives from rank r for its local expert e.
    """
    recv_RE = torch.empty_like(send_counts_RE)
    with PHASE(f"forward all-to-all of {label}"):
        dist.all_to_all_single(recv_RE, send_counts_RE.contiguous(), group=group)
    return recv_RE


class _AllReduceMean(torch.autograd.Function):
    """Mean over the group; the gradient of a mean is the mean of the gradients seen by
    every rank (each rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out / dist.get_world_size(group=group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad / dist.get_world_size(group=ctx.group), None


def all_reduce_mean(x: Tensor, group) -> Tensor:
    """Differentiable mean of ``x`` over ``group``."""
    return _AllReduceMean.apply(x, group)
