"""Slow, obviously correct MoE forward: a Python loop over tokens, in fp32.

Written straight from ../shared/MOE_REFERENCE.md without sharing any code with the fast
path (no sorting tricks, no shared helpers), so the parity tests compare two independent
readings of the same semantics. Use it on small inputs only.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from moe_train.config import MoEConfig


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
    num_tokens, num_experts, k = x_TD.shape[0], cfg.num_experts, cfg.top_k
    logits = x_TD.float() @ w_DE.float()
    probs = torch.softmax(logits, dim=-1)

    # choices[t] = the k experts of token t, best first, ties to the lower expert id.
    choices = []
    for t in range(num_tokens):
        row = probs[t].tolist()
        choices.append(sorted(range(num_experts), key=lambda e: (-row[e], e))[:k])

    # Assignments in priority order: every token's first choice, then second choices...
    assignments = [(j, t, choices[t][j]) for j in range(k) for t in range(num_tokens)]
    cf = cfg.capacity_factor if training else cfg.eval_capacity_factor
    kept = _apply_capacity(assignments, probs, cf, cfg, num_tokens)

    y = [torch.zeros_like(x_TD[0], dtype=torch.float32) for _ in range(num_tokens)]
    for index, (j, t, e) in enumerate(assignments):
        if index not in kept:
            continue
        chosen = probs[t, choices[t]]
        gate = chosen[j] / chosen.sum() if cfg.renormalize else probs[t, e]
        y[t] = y[t] + gate * expert_fn(e, x_TD[t:t + 1].float())[0]
    y_TD = torch.stack(y) if num_tokens else x_TD.float() * 0

    # Switch eq. 4 with f counted from the top-k choices before dropping.
    f = [sum(1 for (_, _, e) in assignments if e == i) / max(k * num_tokens, 1) for i in range(num_experts)]
    P = [probs[:, i].sum() / max(num_tokens, 1) for i in range(num_experts)]
    aux_loss = num_experts * sum(f[i] * P[i] for i in range(num_experts))
    z_loss = sum(torch.logsumexp(logits[t], dim=0) ** 2 for t in range(num_tokens)) / max(num_tokens, 1)
    return y_TD, aux_loss, z_loss, len(assignments) - len(kept)


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
