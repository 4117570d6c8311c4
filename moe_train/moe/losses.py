"""The one home of the MoE auxiliary-loss coefficients.

Every MoE layer returns its load-balancing loss ``aux_loss`` and router z-loss
``z_loss`` WITHOUT coefficients; this module is the only place they are applied:

    loss = lm_loss + sum over MoE layers l of (alpha * aux_loss_l + c_z * z_loss_l
                                              + c_seq * seq_loss_l)

with ``alpha = moe.aux_loss_coef`` (Switch: 1e-2), ``c_z = moe.z_loss_coef``
(ST-MoE: 1e-3) and ``c_seq = moe.seq_balance_coef`` (DeepSeek-V3's sequence-wise
balance loss: 1e-4; 0 = off). The selection bias (``moe_train.moe.balance``) is no
loss: it changes which experts are chosen, never this sum.

Scaling under micro-batches and gradient accumulation: each micro-batch is one routing
group per rank, so each layer's aux_loss and z_loss are per-micro-batch means (f and P
are fractions, z is a mean over tokens) exactly like ``lm_loss`` (a mean over the
micro-batch's tokens). The engine divides the whole sum by the number of accumulation
steps before backward, and the data-parallel all-reduce averages over ranks, so the
effective objective is the mean over all routing groups of the global batch of
``lm_loss + sum_l(alpha * aux_l + c_z * z_l + c_seq * seq_l)`` (seq_l is itself a mean
over the micro-batch's sequences): the aux terms are never scaled twice
and never summed over micro-batches. Under activation recomputation the layer's forward
runs twice, but this sum is built once from the outputs of the outer forward, so the
losses are counted once.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from moe_train.moe.config import MoEConfig


def moe_aux_total(layer_losses: Iterable[tuple[Tensor, Tensor]], cfg: MoEConfig,
                  seq_losses: Iterable[Tensor] = ()) -> Tensor:
    """sum_l (aux_loss_coef * aux_l + z_loss_coef * z_l) over (aux_l, z_l) pairs, plus
    seq_balance_coef * seq_l over ``seq_losses`` when that coefficient is not 0."""
    total = torch.zeros((), dtype=torch.float32)
    for aux_loss, z_loss in layer_losses:
        total = total.to(aux_loss.device) + cfg.aux_loss_coef * aux_loss + cfg.z_loss_coef * z_loss
    if cfg.seq_balance_coef:
        for seq_loss in seq_losses:
            total = total.to(seq_loss.device) + cfg.seq_balance_coef * seq_loss
    return total


def total_loss(lm_loss: Tensor, layer_losses: Iterable[tuple[Tensor, Tensor]], cfg: MoEConfig,
               seq_losses: Iterable[Tensor] = ()) -> Tensor:
    """The training objective of one micro-batch (see the module docstring).

    Args:
        lm_loss: mean cross-entropy of the micro-batch.
        layer_losses: per MoE layer (aux_loss, z_loss), ``ModelOutput.moe_losses``.
        seq_losses: per MoE layer sequence-wise loss, ``ModelOutput.moe_seq_losses``.
    """
    return lm_loss + moe_aux_total(layer_losses, cfg, seq_losses).to(lm_loss.dtype)
