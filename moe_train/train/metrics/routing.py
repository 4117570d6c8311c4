"""Routing health over whole optimizer steps, and the alarms: dead experts, drop
fractions, the selection bias (MOE_REFERENCE.md, "Selection bias").

Shape legend: E experts (global), L MoE layers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moe_train.moe.balance import maxvio, moe_layers


class RoutingMonitor:
    """Routing health over whole optimizer steps, and the alarms (MOE_REFERENCE.md,
    "Selection bias"; issue "Routing beyond the peers").

    Reads the layers' ``RoutingTally`` (every training micro-batch of a step, this
    rank), which ``moe_train.moe.balance.update_selection_biases`` closes after every
    step. ``check`` is a collective on log steps only: one float64 all-reduce SUM
    (counts, drops) and one MIN (idle streaks), whatever the number of layers.

    Args:
        model: the model (``engine.module``).
        layer_ids: block index of each MoE layer, in order.
        dead_expert_steps: ``logging.dead_expert_steps`` (0: no dead-expert alarm).
        max_drop_frac: ``logging.max_drop_frac`` (None: no drop alarm).
    Attributes:
        num_alarms: alarms raised so far (``train/routing_alarms``).
        alarms: the alarm lines of the last ``check``.
    """

    def __init__(self, model, layer_ids: list[int], dead_expert_steps: int, max_drop_frac: Optional[float]):
        self.layers = moe_layers(model)
        # A layer shared by several blocks (model.share_layers) has one tally for all its
        # uses; it is named by the first block that uses it (``block_ids``, set by the model).
        uses = [getattr(m, "block_ids", None) for m in self.layers]
        if all(uses) and sorted(i for u in uses for i in u) == sorted(layer_ids):
            layer_ids = [u[0] for u in uses]
        assert len(self.layers) == len(layer_ids), (len(self.layers), layer_ids)
        self.layer_ids, self.dead_expert_steps, self.max_drop_frac = layer_ids, dead_expert_steps, max_drop_frac
        self.num_alarms, self.alarms = 0, []

    def check(self, group=None) -> dict[str, float]:
        """Scalars per MoE layer i, reduced over ``group`` (all ranks must call it):

          moe/layer_{i}/maxvio              (max c - mean c) / mean c of the last step's
                                            counts c (all micro-batches, all ranks)
          moe/layer_{i}/dead_experts_window experts no rank routed a token to in the last
                                            ``dead_expert_steps`` steps (with that > 0)
          moe/layer_{i}/max_idle_steps      the longest such streak so far (steps)
          moe/layer_{i}/window_drop_frac    dropped / assignments since the last check
          moe/layer_{i}/bias_min, bias_max  the selection bias (when on)
          moe/mean/maxvio                   mean over the layers
          train/routing_alarms              alarms so far
        Sets ``alarms`` (one line per layer and reason) and counts them.
        """
        if not self.layers:
            return {}
        device = self.layers[0].router.w_DE.device
        sums, idles = [], []
        for layer in self.layers:
            tally = layer.tally
            tally.step_counts(device)  # allocates the tally's tensors if no step has run yet
            last_E = tally.last_routed_E
            dropped, assignments = tally.take_window()
            sums += [last_E.to(device, torch.float64), torch.stack([dropped, assignments]).to(device, torch.float64)]
            idles.append(tally.idle_steps_E.to(device, torch.float64))
        packed, idle_min = torch.cat(sums), torch.cat(idles)
        if group is not None:  # counts add up over ranks; an expert idles globally as
            # long as its shortest per-rank streak
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(idle_min, op=dist.ReduceOp.MIN, group=group)
        return self._summarise(packed, idle_min)

    def _summarise(self, packed: Tensor, idle_min: Tensor) -> dict[str, float]:
        values, self.alarms = {}, []
        offset = idle_offset = 0
        for layer, i in zip(self.layers, self.layer_ids):
            E = layer.tally.num_experts
            counts_E = packed[offset:offset + E]
            dropped, assignments = packed[offset + E:offset + E + 2].tolist()
            idle_E = idle_min[idle_offset:idle_offset + E]
            offset, idle_offset = offset + E + 2, idle_offset + E
            values[f"moe/layer_{i}/maxvio"] = float(maxvio(counts_E))
            values[f"moe/layer_{i}/max_idle_steps"] = float(idle_E.max())
            values[f"moe/layer_{i}/window_drop_frac"] = dropped / max(assignments, 1.0)
            if self.dead_expert_steps:
                dead = (idle_E >= self.dead_expert_steps).nonzero().flatten().tolist()
                values[f"moe/layer_{i}/dead_experts_window"] = float(len(dead))
                if dead:
                    self.alarms.append(f"MoE layer {i}: experts {dead} received no token for "
                                       f">= {self.dead_expert_steps} steps (logging.dead_expert_steps)")
            frac = values[f"moe/layer_{i}/window_drop_frac"]
            if self.max_drop_frac is not None and assignments > 0 and frac > self.max_drop_frac:
                self.alarms.append(f"MoE layer {i}: drop fraction {frac:.3f} over the last log window "
                                   f"is above logging.max_drop_frac = {self.max_drop_frac}")
            bias = layer.router.expert_bias
            if bias is not None:
                values[f"moe/layer_{i}/bias_min"] = float(bias.min())
                values[f"moe/layer_{i}/bias_max"] = float(bias.max())
        values["moe/mean/maxvio"] = sum(values[f"moe/layer_{i}/maxvio"] for i in self.layer_ids) / len(self.layer_ids)
        self.num_alarms += len(self.alarms)
        values["train/routing_alarms"] = float(self.num_alarms)
        return values
