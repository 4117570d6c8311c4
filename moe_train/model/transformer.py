"""A decoder-only transformer whose MLPs are dense or MoE by config.

Shape legend: B batch, S sequence, D model width, V vocabulary, H heads.

Block i uses an MoE MLP when ``model.moe_every > 0`` and ``(i + 1) % moe_every == 0``
(Switch: every other block). The model knows no global process group: the expert-
parallel group is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_train.config import ModelConfig, MoEConfig
from moe_train.moe.layer import MoELayer
from moe_train.moe.stats import MoEStats


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.num_heads, D // self.num_heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(B, S, D))


class DenseMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x_BSD)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig | None, ep_group=None, balance_group=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.is_moe = moe_cfg is not None
        self.mlp = (MoELayer(moe_cfg, cfg.d_model, ep_group=ep_group, balance_group=balance_group)
                    if self.is_moe else DenseMLP(cfg.d_model, cfg.d_ff))

    def forward(self, x_BSD: Tensor, moe_out: list) -> Tensor:
        x_BSD = x_BSD + self.attn(self.norm1(x_BSD))
        h_BSD = self.norm2(x_BSD)
        if self.is_moe:
            out = self.mlp(h_BSD)
            moe_out.append(out)
            return x_BSD + out.y  # dropped tokens: zero MoE output, the residual carries them
        return x_BSD + self.mlp(h_BSD)


@dataclass
class ModelOutput:
    """Attributes:
        logits_BSV: next-token logits.
        lm_loss: mean cross-entropy over the labels (when labels were given).
        moe_losses: per MoE layer (aux_loss, z_loss), coefficients not applied.
        moe_stats: per MoE layer statistics.
    """

    logits_BSV: Tensor
    lm_loss: Tensor | None
    moe_losses: list[tuple[Tensor, Tensor]]
    moe_stats: list[MoEStats]


class MoETransformer(nn.Module):
    """Args:
        cfg: ``model`` section; moe_cfg: ``moe`` section.
        ep_group, balance_group: passed to every MoE layer (None: single process).
    """

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, ep_group=None, balance_group=None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        is_moe = [cfg.moe_every > 0 and (i + 1) % cfg.moe_every == 0 for i in range(cfg.num_layers)]
        # Dense weights are initialised from the global RNG, which the caller seeds the same
        # on every rank; expert weights are seeded by global expert id inside MoELayer.
        self.blocks = nn.ModuleList(Block(cfg, moe_cfg if m else None, ep_group, balance_group)
                                    for m in is_moe)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2 and ".experts." not in name and ".router." not in name:
                nn.init.normal_(p, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, input_ids_BS: Tensor, labels_BS: Tensor | None = None) -> ModelOutput:
        S = input_ids_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        positions_S = torch.arange(S, device=input_ids_BS.device)
        x_BSD = self.embed(input_ids_BS) + self.pos(positions_S)
        moe_out: list = []
        for block in self.blocks:
            x_BSD = block(x_BSD, moe_out)
        logits_BSV = self.head(self.norm(x_BSD))
        lm_loss = None
        if labels_BS is not None:
            lm_loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=-100)
        return ModelOutput(logits_BSV, lm_loss, [(o.aux_loss, o.z_loss) for o in moe_out],
                           [o.stats for o in moe_out])
