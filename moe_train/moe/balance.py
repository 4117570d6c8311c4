"""Auxiliary-loss-free balancing: the per-step selection-bias update, and the per-step
tally of routed tokens it (and the routing-health monitor) reads.

Shape legend: E experts (global), L MoE layers.

MOE_REFERENCE.md, "Selection bias" (Wang et al. 2024, DeepSeek-V3). Each router holds
``expert_bias`` b_E (fp32, persistent buffer). Once per APPLIED optimizer step, after the
last backward and before the next forward, identically on every rank:

    c_E     = top-k assignments per expert BEFORE capacity dropping, int64, summed over
              every training micro-batch of the step and over all data-parallel ranks
    delta_i = u * sign(mean(c) - c_i)            (u = moe.bias_update_rate)
    delta  -= mean(delta)                        (centred: changes no routing)
    b      += delta

Why it is right under the loop's features:
  * micro-batches: the model's OUTER forward adds each training micro-batch's counts to
    the layer's ``RoutingTally`` (``MoETransformer.forward``), so gradient accumulation
    sums them, and a recomputation under activation checkpointing (which re-runs the
    block, not the outer forward) adds nothing; it also routes exactly as the first
    forward, because b changes only here, between steps;
  * eval: ``model.eval()`` / ``no_grad`` forwards are not counted;
  * ranks: one int64 all-reduce SUM over the data-parallel group for all layers (int64:
    fp32 counts are exact only to 2^24); every rank then computes the same delta from
    the same integers, so b stays bitwise equal everywhere;
  * skipped steps (non-finite loss or gradient): counts discarded, b unchanged;
  * ``moe.bias_freeze_step`` N: steps 1..N update, later steps do not;
  * dtype: b is fp32 whatever dtype the engine casts the model to (``Router._apply``);
    an update finding it otherwise raises instead of rounding the update away.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


def bias_delta(counts_E: Tensor, rate: float) -> Tensor:
    """The centred sign update of one layer: ``u * sign(mean(c) - c)``, minus its mean.

    The sign is taken on integers, ``sign(sum(c) - E * c_i)``, so it is exact whatever
    the counts. Example: c = [10, 0, 5, 5] (mean 5) gives [-u, +u, 0, 0], whose mean is 0.

    Args:
        counts_E: int64 [E] global counts of one step.
        rate: u.
    Returns:
        fp32 [E] delta, summing to 0 up to rounding.
    """
    counts_E = counts_E.to(torch.int64)
    sign_E = torch.sign(counts_E.sum() - counts_E.numel() * counts_E).to(torch.float32)
    delta_E = sign_E * rate
    return delta_E - delta_E.mean()


def maxvio(counts_E: Tensor) -> Tensor:
    """(max c - mean c) / mean c of per-expert counts (0: perfectly balanced; 0 when
    nothing was routed)."""
    counts_E = counts_E.to(torch.float64)
    mean = counts_E.mean()
    return (counts_E.max() - mean) / mean if mean > 0 else mean * 0


class RoutingTally:
    """What one MoE layer routed on THIS rank: the current step's training micro-batches,
    the last finished step, and the streaks and window the routing-health monitor reads.
    Plain tensors on the counts' device, no collective: reductions happen in
    ``update_selection_biases`` (bias on) and on log steps (``moe_train.train.metrics``).

    Attributes:
        routed_E: int64 [E] assignments per expert before dropping, this step so far.
        kept, assignments: int64 scalars: kept and all assignments, this step so far.
        last_routed_E: ``routed_E`` of the last finished step.
        idle_steps_E: int64 [E], finished steps in a row in which this rank routed no
            token to expert e (an expert is dead globally when every rank's streak is).
        window_dropped, window_assignments: int64 sums since the last ``take_window``.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.routed_E = self.last_routed_E = self.idle_steps_E = None
        self.kept = self.assignments = self.window_dropped = self.window_assignments = None

    def _zeros(self, device) -> None:
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.int64, device=device)  # noqa: E731
        if self.idle_steps_E is None or self.idle_steps_E.device != torch.device(device):
            self.last_routed_E, self.idle_steps_E = zeros(self.num_experts), zeros(self.num_experts)
            self.window_dropped, self.window_assignments = zeros(), zeros()
        self.routed_E, self.kept, self.assignments = zeros(self.num_experts), zeros(), zeros()

    def add(self, stats) -> None:
        """Adds one training micro-batch's ``MoEStats`` (no host sync)."""
        routed_E = stats.routed_per_expert_E.detach()
        if self.routed_E is None or self.routed_E.device != routed_E.device:
            self._zeros(routed_E.device)
        self.routed_E += routed_E
        self.kept += stats.kept_per_expert_E.detach().sum()
        self.assignments += stats.num_assignments

    def step_counts(self, device=None) -> Tensor:
        """int64 [E] this step's local counts (zeros if nothing was routed)."""
        if self.routed_E is None:
            self._zeros(device or "cpu")
        return self.routed_E

    def end_step(self) -> None:
        """Closes the step: the counts become ``last_routed_E``, streaks and the drop
        window advance, the step counts restart at zero."""
        routed_E = self.step_counts()
        self.last_routed_E = routed_E
        self.idle_steps_E = torch.where(routed_E > 0, torch.zeros_like(self.idle_steps_E), self.idle_steps_E + 1)
        self.window_dropped = self.window_dropped + (routed_E.sum() - self.kept)
        self.window_assignments = self.window_assignments + self.assignments
        self._zeros(routed_E.device)

    def take_window(self) -> tuple[Tensor, Tensor]:
        """(dropped, assignments) since the last call, then restarts the window."""
        if self.window_dropped is None:
            self._zeros("cpu")
        out = (self.window_dropped, self.window_assignments)
        self.window_dropped = torch.zeros_like(out[0])
        self.window_assignments = torch.zeros_like(out[1])
        return out


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The MoE layers of ``model`` in module order (block order for the transformer)."""
    return [m for m in model.modules() if isinstance(getattr(m, "tally", None), RoutingTally)]


def bias_frozen(cfg, step: int) -> bool:
    """True when optimizer step ``step`` (1-based) must not update the bias."""
    return cfg.bias_freeze_step is not None and step > cfg.bias_freeze_step


@torch.no_grad()
def update_selection_biases(model: nn.Module, dp_group, applied: bool, step: int) -> Optional[Tensor]:
    """Ends optimizer step ``step`` for every MoE layer of ``model``: the selection-bias
    update (module docstring) when the step was applied and not frozen, then the
    tallies' bookkeeping. Every rank of ``dp_group`` must call it after every step with
    the same ``applied`` (the loop's agreed skip decision) and ``step``.

    Args:
        model: the model (``engine.module``).
        dp_group: the data-parallel group (all ranks route the global batch); None in a
            single process.
        applied: False for a skipped step: its counts are discarded.
        step: the optimizer step just taken, 1-based.
    Returns:
        int64 [L_biased, E] the global counts used for the update, or None if none.
    """
    layers = moe_layers(model)
    biased = [m for m in layers if m.router.expert_bias is not None
              and applied and not bias_frozen(m.router.cfg, step)]
    counts_LE = None
    if biased:
        device = biased[0].router.expert_bias.device
        counts_LE = torch.stack([m.tally.step_counts(device).to(device) for m in biased])
        if dp_group is not None:
            dist.all_reduce(counts_LE, op=dist.ReduceOp.SUM, group=dp_group)
        for layer, counts_E in zip(biased, counts_LE):
            bias_E = layer.router.expert_bias
            if bias_E.dtype != torch.float32:
                raise RuntimeError(f"expert_bias of {type(layer).__name__} is {bias_E.dtype}, not "
                                   f"float32 (was the model's buffers cast, e.g. by "
                                   f"deepspeed.buffer_dtype?); a low-precision bias loses the update")
            bias_E += bias_delta(counts_E, layer.router.cfg.bias_update_rate).to(bias_E.device)
    for layer in layers:
        layer.tally.end_step()
    return counts_LE
