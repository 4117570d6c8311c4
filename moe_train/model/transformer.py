"""A decoder-only transformer whose MLPs are dense or MoE by config.

Shape legend: B batch, S sequence, D model width, V vocabulary, H heads.

Block i uses an MoE MLP when ``model.moe_every > 0``, ``i >= model.first_dense_layers``
and ``(i + 1) % moe_every == 0`` (Switch: every other block; DeepSeek: the first blocks
dense). Options (``ModelConfig``): LayerNorm or RMSNorm, learned or rotary positions,
GELU or SwiGLU dense MLP, multi-head or grouped-query attention, dropout, tied or untied
head; the defaults are the GPT-2-like model. The model knows no global process group:
the expert-parallel group is passed in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch.utils.checkpoint import checkpoint

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.layers import Attention, DenseMLP, make_norm, rope_tables
from moe_train.moe.layer import MoELayer, MoEOutput
from moe_train.moe.stats import MoEStats


class Block(nn.Module):
    """Pre-norm block: x + drop(attn(norm1(x))), then x + drop(mlp(norm2(x))).

    Pure: it returns its MoE output instead of recording it, so a recomputation under
    activation checkpointing (which runs forward again during backward) adds nothing to
    the model's list of MoE losses and statistics.
    """

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig | None, ep_group=None, balance_group=None):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.is_moe = moe_cfg is not None
        self.mlp = (MoELayer(moe_cfg, cfg.d_model, ep_group=ep_group, balance_group=balance_group)
                    if self.is_moe else DenseMLP(cfg.d_model, cfg.d_ff, cfg.mlp_activation))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, MoEOutput | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.norm1(x_BSD), rope))
        h_BSD = self.norm2(x_BSD)
        if self.is_moe:
            out = self.mlp(h_BSD)
            # Dropped tokens: zero MoE output, the residual carries them.
            return x_BSD + self.drop(out.y), out
        return x_BSD + self.drop(self.mlp(h_BSD)), None


@dataclass
class ModelOutput:
    """Attributes:
        logits_BSV: next-token logits.
        lm_loss: mean cross-entropy over the labels (when labels were given).
        moe_losses: per MoE layer (aux_loss, z_loss), coefficients not applied.
        moe_stats: per MoE layer statistics.
        moe_seq_losses: per MoE layer sequence-wise balance loss (``moe.seq_balance_coef``;
            a constant 0 when off), coefficient not applied.
    """

    logits_BSV: Tensor
    lm_loss: Tensor | None
    moe_losses: list[tuple[Tensor, Tensor]]
    moe_stats: list[MoEStats]
    moe_seq_losses: list[Tensor] = dataclasses.field(default_factory=list)


class MoETransformer(nn.Module):
    """Decoder-only transformer; block i's MLP is MoE iff ``cfg.is_moe_block(i)``.

    Args:
        cfg: ``model`` section; moe_cfg: ``moe`` section.
        ep_group, balance_group: passed to every MoE layer (None: single process).
        activation_checkpointing: recompute each block in backward
            (``torch.utils.checkpoint``, non-reentrant) instead of keeping its
            activations; only when gradients are enabled. The RNG state is restored for
            the recomputation, so router jitter and dropout repeat exactly, and the MoE
            losses and statistics are recorded once per layer (Megatron #1330). Under
            expert parallelism the recomputation repeats the all-to-alls; every rank
            recomputes the same blocks in the same order.
    """

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, ep_group=None, balance_group=None,
                 activation_checkpointing: bool = False):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        # Dense weights are initialised from the global RNG, which the caller seeds the same
        # on every rank; expert weights are seeded by global expert id inside MoELayer.
        self.blocks = nn.ModuleList(
            Block(cfg, moe_cfg if cfg.is_moe_block(i) else None, ep_group, balance_group)
            for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2 and ".experts." not in name and ".router." not in name:
                nn.init.normal_(p, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        for i, block in enumerate(self.blocks):  # names the layer's all-to-alls in hang reports
            if block.is_moe:
                block.mlp.dispatcher.label = f"MoE layer {i}"

    def forward(self, input_ids_BS: Tensor, labels_BS: Tensor | None = None) -> ModelOutput:
        S = input_ids_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        x_BSD = self.embed(input_ids_BS)
        rope = rope_tables(self.cfg, S, input_ids_BS.device)  # None unless model.position is rope
        if self.pos is not None:
            x_BSD = x_BSD + self.pos(torch.arange(S, device=input_ids_BS.device))
        x_BSD = self.drop(x_BSD)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        moe_out: list[MoEOutput] = []
        for block in self.blocks:
            if recompute:
                x_BSD, out = checkpoint(block, x_BSD, rope, use_reentrant=False)
            else:
                x_BSD, out = block(x_BSD, rope)
            if out is not None:  # appended here, once: never inside the recomputed function
                moe_out.append(out)
                if self.training and torch.is_grad_enabled():  # selection-bias counts, once
                    block.mlp.tally.add(out.stats)
        logits_BSV = self.head(self.norm(x_BSD))
        lm_loss = None
        if labels_BS is not None:
            lm_loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=-100)
        return ModelOutput(logits_BSV, lm_loss, [(o.aux_loss, o.z_loss) for o in moe_out],
                           [o.stats for o in moe_out], [o.seq_loss for o in moe_out])
