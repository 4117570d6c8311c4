"""Building the model a run trains: the same dense weights on every rank, each rank's
experts drawn from their global expert ids (so the model is the same whatever ``ep``)."""

from __future__ import annotations

import torch

from moe_train.model.transformer import MoETransformer
from moe_train.parallel.groups import ParallelGroups


def build_model(cfg, groups: ParallelGroups, device: torch.device) -> MoETransformer:
    """The transformer of ``cfg`` (the root ``moe_train.config.Config``) on ``device``.

    Args:
        cfg: the run's config; reads ``model``, ``moe``, ``train.seed`` and
            ``train.activation_checkpointing``.
        groups: this rank's process groups; the MoE layers exchange tokens over
            ``groups.ep``, and with ``moe.balance_scope: global`` average the balance
            statistics over ``groups.dp``.
        device: where the parameters are allocated and drawn.
    """
    torch.manual_seed(cfg.train.seed)  # identical dense init on every rank
    balance_group = groups.dp if cfg.moe.balance_scope == "global" else None
    # Built on the meta device and allocated once, on ``device`` (MoETransformer's docstring).
    return MoETransformer(cfg.model, cfg.moe, ep_group=groups.ep, balance_group=balance_group,
                          activation_checkpointing=cfg.train.activation_checkpointing, device=device)
