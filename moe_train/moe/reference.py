"""Slow, obviously correct MoE forward: a Python loop over tokens, in fp32.

Written straight from ../shared/MOE_REFERENCE.md without sharing any code with the fast
path (no sorting tricks, no shared helpers), so the parity tests compare two independent
readings of the same semantics. Use it on small inputs only.

``reference_moe`` is the Switch/GShard layer; ``reference_moe_full`` adds the options of
"Score functions, gates and scale", "Shared experts", "Selection bias" and "Group-limited
routing" (sigmoid scores, route_scale, the bias b_E in the selection key only, groups,
the shared FFN and its gate, the sequence-wise balance loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from moe_train.moe.config import MoEConfig


def reference_moe(x_TD: Tensor, w_DE: Tensor, expert_fn: Callable[[int, Tensor], Tensor],
                  cfg: MoEConfig, training: bool) -> tuple[Tensor, Tensor, Tensor, int]:
    """One routing group through an MoE layer, token by token.

    Args:
        x_TD: [T, D] tokens.
        w_DE: [D, E] router weights.
        expert_fn: ``expert_fn(e, x_nD) -> y_nD`` for global expert e.
        cfg: the ``moe`` section (jitter is not applied here: compare with jitter off).
        training: selects the training or the evaluation capacity factor.
    Returns:
        (y_TD, aux_loss, z_loss, num_dropped); losses without coefficients.
    """
    out = reference_moe_full(x_TD, w_DE, expert_fn, cfg, training)
    return out.y, out.aux_loss, out.z_loss, out.num_dropped


@dataclass
class ReferenceOut:
    """y [T, D]; losses without coefficients; dropped assignments; routed counts per
    expert before dropping (what the selection bias counts)."""

    y: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    seq_loss: torch.Tensor
    num_dropped: int
    routed: list


def reference_moe_full(x_TD: Tensor, w_DE: Tensor, expert_fn: Callable[[int, Tensor], Tensor],
                       cfg: MoEConfig, training: bool, bias_E: Optional[Tensor] = None,
                       shared_fn: Optional[Callable[[Tensor], Tensor]] = None,
                       shared_gate_D: Optional[Tensor] = None, seq_len: Optional[int] = None) -> ReferenceOut:
    """One routing group through an MoE layer with every routing option, token by token.

    Args:
        x_TD, w_DE, expert_fn, cfg, training: as ``reference_moe``.
        bias_E: the selection bias (None: none); it enters the key only.
        shared_fn: ``shared_fn(x_1D) -> y_1D``, the shared FFN (None: no shared expert).
        shared_gate_D: the shared gate's weight (None: ungated).
        seq_len: sequence length S for the sequence-wise loss (None: one sequence).
    """
    num_tokens, num_experts, k = x_TD.shape[0], cfg.num_experts, cfg.top_k
    logits = x_TD.float() @ w_DE.float()
    if cfg.score_func == "softmax":
        scores = [torch.softmax(logits[t], dim=0) for t in range(num_tokens)]
    else:
        scores = [torch.sigmoid(logits[t]) for t in range(num_tokens)]
    # the distribution over experts the balance losses use: s / sum(s)
    probs = torch.stack([s / s.sum() for s in scores]) if num_tokens else logits * 0

    # choices[t] = the k experts of token t, best first, ties to the lower expert id.
    choices = [_choose(logits[t].tolist(), scores[t].tolist(), bias_E, cfg) for t in range(num_tokens)]

    # Assignments in priority order: every token's first choice, then second choices...
    assignments = [(j, t, choices[t][j]) for j in range(k) for t in range(num_tokens)]
    cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
    score_table = torch.stack(scores) if num_tokens else logits * 0
    kept = _apply_capacity(assignments, score_table, cf, cfg, num_tokens)

    y = [torch.zeros_like(x_TD[0], dtype=torch.float32) for _ in range(num_tokens)]
    for index, (j, t, e) in enumerate(assignments):
        if index not in kept:
            continue
        chosen = [scores[t][c] for c in choices[t]]
        gate = chosen[j] / sum(chosen) if cfg.renormalize else scores[t][e]
        y[t] = y[t] + cfg.route_scale * gate * expert_fn(e, x_TD[t:t + 1].float())[0]
    if shared_fn is not None:  # every token, dropped or not
        for t in range(num_tokens):
            g = 1.0 if shared_gate_D is None else torch.sigmoid(x_TD[t].float() @ shared_gate_D.float())
            y[t] = y[t] + g * shared_fn(x_TD[t:t + 1])[0].float()
    y_TD = torch.stack(y) if num_tokens else x_TD.float() * 0

    # Switch eq. 4 with f counted from the top-k choices before dropping.
    routed = [sum(1 for (_, _, e) in assignments if e == i) for i in range(num_experts)]
    f = [routed[i] / max(k * num_tokens, 1) for i in range(num_experts)]
    P = [probs[:, i].sum() / max(num_tokens, 1) for i in range(num_experts)]
    aux_loss = num_experts * sum(f[i] * P[i] for i in range(num_experts))
    z_loss = sum(torch.logsumexp(logits[t], dim=0) ** 2 for t in range(num_tokens)) / max(num_tokens, 1)
    seq_loss = _sequence_loss(scores, probs, cfg, seq_len or max(num_tokens, 1))
    return ReferenceOut(y_TD, torch.as_tensor(aux_loss), torch.as_tensor(z_loss), seq_loss,
                        len(assignments) - len(kept), routed)


def _choose(logits: list, scores: list, bias_E: Optional[Tensor], cfg: MoEConfig) -> list:
    """The k experts of one token: keep the best groups, then the top-k by key."""
    num_experts = cfg.num_experts
    if bias_E is None:
        key = list(scores)
    else:
        base = logits if cfg.score_func == "softmax" else scores
        key = [base[e] + float(bias_E[e]) for e in range(num_experts)]
    allowed = list(range(num_experts))
    if cfg.num_groups > 1:
        size = num_experts // cfg.num_groups
        group_scores = []
        for g in range(cfg.num_groups):
            members = sorted((key[e] for e in range(g * size, (g + 1) * size)), reverse=True)
            group_scores.append(members[0] if cfg.group_score == "max" else members[0] + members[1])
        best = sorted(range(cfg.num_groups), key=lambda g: (-group_scores[g], g))[:cfg.groups_per_token]
        allowed = [e for e in range(num_experts) if e // size in best]
    return sorted(allowed, key=lambda e: (-key[e], e))[:cfg.top_k]


def _sequence_loss(scores: list, probs: Tensor, cfg: MoEConfig, seq_len: int) -> Tensor:
    """DeepSeek-V3: per sequence sum_i f_i P_i, f from the unbiased top-k of s."""
    num_tokens, num_experts, k = len(scores), cfg.num_experts, cfg.top_k
    if cfg.seq_balance_coef == 0 or num_tokens == 0:
        return torch.zeros(())
    losses = []
    for start in range(0, num_tokens, seq_len):
        tokens = range(start, start + seq_len)
        count = [0] * num_experts
        for t in tokens:
            row = scores[t].tolist()
            for e in sorted(range(num_experts), key=lambda e: (-row[e], e))[:k]:
                count[e] += 1
        losses.append(sum(num_experts / (k * seq_len) * count[i] * probs[start:start + seq_len, i].mean()
                          for i in range(num_experts)))
    return sum(losses) / len(losses)


def _apply_capacity(assignments: list, probs: Tensor, cf: Optional[float], cfg: MoEConfig,
                    num_tokens: int) -> set[int]:
    """Indices of the assignments that keep their expert slot."""
    if cf is None:
        return set(range(len(assignments)))
    capacity = math.ceil(cfg.top_k * num_tokens * cf / cfg.num_experts)
    capacity = min(max(capacity, cfg.min_capacity), num_tokens)
    kept = set()
    for e in range(cfg.num_experts):
        mine = [i for i, (_, _, ee) in enumerate(assignments) if ee == e]
        if cfg.drop_policy == "probs":
            # highest router prob first; equal probs: earlier assignment first
            mine.sort(key=lambda i: (-float(probs[assignments[i][1], e].detach()), i))
        kept.update(mine[:capacity])
    return kept
