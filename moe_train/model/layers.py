"""Decoder building blocks: norms, rotary positions, attention, the dense MLP.

Shape legend: B batch, S sequence, D model width, H query heads, G key/value heads
(grouped-query attention, H % G == 0), K head dim (D / H), F dense MLP width.

No Linear has a bias; norm weights (and LayerNorm biases) are 1-D parameters, so
"decay only parameters with dim >= 2" is the whole weight-decay rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_train.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2 over D) + eps) * w (Zhang & Sennrich 2019), computed in fp32
    and returned in the input dtype. w: [D], initialised to ones."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x_BSD: Tensor) -> Tensor:
        x32 = x_BSD.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x_BSD.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """Rotary tables, fp32: angle[s, i] = s * theta^(-2i / K) for i < K/2.

    Returns:
        cos_SK2, sin_SK2: [S, K/2].
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angle_SK2 = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angle_SK2.cos(), angle_SK2.sin()


def apply_rope(x_BHSK: Tensor, cos_SK2: Tensor, sin_SK2: Tensor) -> Tensor:
    """Rotates each pair (x[i], x[i + K/2]) by angle[s, i] (the GPT-NeoX / Llama "half"
    layout): [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]. A rotation R(s) per position,
    so <R(i) q, R(j) k> depends on q, k and i - j only. Computed in fp32."""
    x1, x2 = x_BHSK.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos_SK2 - x2 * sin_SK2, x2 * cos_SK2 + x1 * sin_SK2), dim=-1)
    return out.to(x_BHSK.dtype)


class Attention(nn.Module):
    """Causal self-attention with optional grouped-query heads and rotary positions.

    One fused projection ``qkv``: D -> (H + 2G) * K, columns [q | k | v] (for G = H this is
    the former [D, 3D] layout). Attention-probability dropout through SDPA's
    ``dropout_p`` in training only. ``model.qk_norm``: an RMSNorm over K (one weight [K]
    shared by the heads) on q and on k, before the rotary positions (Qwen3, OLMoE).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, S, D = x_BSD.shape
        H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x_BSD).split([H * K, G * K, G * K], dim=-1)
        q_BHSK = q.view(B, S, H, K).transpose(1, 2)
        k_BGSK = k.view(B, S, G, K).transpose(1, 2)
        v_BGSK = v.view(B, S, G, K).transpose(1, 2)
        if self.q_norm is not None:
            q_BHSK, k_BGSK = self.q_norm(q_BHSK), self.k_norm(k_BGSK)
        if rope is not None:
            q_BHSK, k_BGSK = apply_rope(q_BHSK, *rope), apply_rope(k_BGSK, *rope)
        # enable_gqa: query head h reads key/value head h // (H / G), as repeat_interleave.
        out_BHSK = F.scaled_dot_product_attention(
            q_BHSK, k_BGSK, v_BGSK, is_causal=True, enable_gqa=G != H,
            dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out_BHSK.transpose(1, 2).reshape(B, S, D))


class DenseMLP(nn.Module):
    """gelu: down(gelu(up(x))) (exact erf GELU); swiglu: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu"):
        super().__init__()
        self.activation = activation
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.gate = nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu" else None
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x_BSD)) * self.up(x_BSD))
        return self.down(F.gelu(self.up(x_BSD)))
