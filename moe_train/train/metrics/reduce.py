"""The metric reductions: collectives (every rank of the group calls them on the same
steps), one packed all-reduce each, read to the host once per log step.

Shape legend: E experts (global), L MoE layers.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.distributed as dist
from torch import Tensor

from moe_train.moe.stats import MoEStats


def packing_device(tensors: list[Tensor], group) -> torch.device:
    """Where to build a packed buffer: with the inputs, or on the GPU for NCCL."""
    if tensors:
        return tensors[0].device
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def moe_metrics(stats: list[MoEStats], layer_ids: list[int],
                group=None) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Per-layer MoE monitoring, reduced over ``group``.

    Each rank routes its own tokens, so the global picture is the sum of the ranks'
    counts: pass the group whose ranks together route the batch (the whole world for
    data + expert parallelism). All layers go in one packed float64 buffer (counts stay
    exact below 2**53) and one all-reduce SUM, whatever the number of layers.
    ``group=None`` means a single process: no collective.

    Args:
        stats: one ``MoEStats`` per MoE layer, in block order (same on every rank).
        layer_ids: the transformer block index of each entry of ``stats``.
        group: process group to reduce over, or None.

    Returns:
        (scalars, histograms). Scalars, per MoE layer i (block index):
          moe/layer_{i}/load_cv         population std / mean of the global routed
                                        counts per expert (0 = perfectly balanced)
          moe/layer_{i}/max_load        max expert load / mean load (1 = balanced)
          moe/layer_{i}/dead_experts    experts with no token routed to them globally
          moe/layer_{i}/drop_frac       global dropped / global assignments (K * T)
          moe/layer_{i}/router_entropy  router entropy, mean over ranks (nats)
          moe/layer_{i}/seq_loss        sequence-wise balance loss, mean over ranks
                                        (only when moe.seq_balance_coef > 0)
          moe/mean/load_cv, moe/mean/drop_frac   means over the MoE layers
        Histograms: moe/layer_{i}/expert_load -> global routed counts, float [E]
        (give it to ``MetricsWriter.histogram``). Both empty when ``stats`` is.
    """
    assert len(stats) == len(layer_ids), (len(stats), layer_ids)
    if not stats:
        return {}, {}
    device = packing_device([s.routed_per_expert_E for s in stats], group)
    # Per layer: [routed_E..., kept total, num_assignments, router_entropy]; then 1 per
    # rank so the sum counts the ranks (for the mean entropy).
    parts = []
    for s in stats:
        parts.append(s.routed_per_expert_E.detach().to(device, torch.float64).reshape(-1))
        seq_loss = s.seq_loss if s.seq_loss is not None else torch.zeros(())
        parts.append(torch.stack([
            s.kept_per_expert_E.detach().sum().to(device, torch.float64),
            torch.tensor(float(s.num_assignments), dtype=torch.float64, device=device),
            s.router_entropy.detach().to(device, torch.float64).reshape(()),
            seq_loss.detach().to(device, torch.float64).reshape(()),
        ]))
    parts.append(torch.ones(1, dtype=torch.float64, device=device))
    packed = torch.cat(parts)
    if group is not None:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)

    num_ranks = packed[-1]
    names, values, hists = [], [], {}
    offset = 0
    for s, i in zip(stats, layer_ids):
        num_experts = s.routed_per_expert_E.numel()
        routed_E = packed[offset:offset + num_experts]
        kept, assignments, entropy_sum, seq_sum = packed[offset + num_experts:offset + num_experts + 4]
        offset += num_experts + 4
        mean = routed_E.mean().clamp_min(1e-9)
        layer_values = {
            "load_cv": routed_E.std(unbiased=False) / mean,
            "drop_frac": (routed_E.sum() - kept) / assignments.clamp_min(1.0),
            "router_entropy": entropy_sum / num_ranks,
            "max_load": routed_E.max() / mean,
            "dead_experts": (routed_E == 0).sum().to(torch.float64),
        }
        if s.seq_loss is not None and bool(s.seq_loss.ne(0)):  # only when the loss is on
            layer_values["seq_loss"] = seq_sum / num_ranks
        for key, value in layer_values.items():
            names.append(f"moe/layer_{i}/{key}")
            values.append(value)
        hists[f"moe/layer_{i}/expert_load"] = routed_E.float()
    for key in ("load_cv", "drop_frac"):
        per_layer = [v for n, v in zip(names, values) if n.endswith("/" + key)]
        names.append(f"moe/mean/{key}")
        values.append(torch.stack(per_layer).mean())
    host = torch.stack(values).tolist()  # the one device-to-host sync
    return dict(zip(names, host)), hists


def reduce_mean(values: dict[str, Union[Tensor, float]], group=None) -> dict[str, float]:
    """Means of scalar metrics (losses, grad norm) over ``group`` in one all-reduce.

    Every rank of ``group`` must call it with the same keys in the same order.
    ``group=None``: a single process, the values as floats.
    """
    if not values:
        return {}
    tensors = [v for v in values.values() if isinstance(v, Tensor)]
    device = packing_device(tensors, group)
    packed = torch.stack([torch.as_tensor(v).detach().to(device, torch.float64).reshape(())
                          for v in values.values()])
    if group is not None:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        packed = packed / dist.get_world_size(group)
    return dict(zip(values.keys(), packed.tolist()))
