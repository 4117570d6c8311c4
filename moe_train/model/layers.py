"""Decoder building blocks: norms, rotary positions (and their scaling), attention, the dense MLP.

Shape legend: B batch, S sequence, D model width, H query heads, G key/value heads
(grouped-query attention, H % G == 0), K head dim (D / H), F dense MLP width.

No Linear has a bias; norm weights (and LayerNorm biases) are 1-D parameters, so
"decay only parameters with dim >= 2" is the whole weight-decay rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_train.model.attention import AttentionPattern, alibi_slopes, attend, resolve_impl
from moe_train.model.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2 over D) + eps) * w (Zhang & Sennrich 2019), computed in fp32
    and returned in the input dtype. w: [D], initialised to ones."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1.0)

    def forward(self, x_BSD: Tensor) -> Tensor:
        x32 = x_BSD.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x_BSD.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                  original_max_len: int | None = None, device=None) -> tuple[Tensor, float]:
    """Rotary inverse frequencies, fp32, and the attention factor that scales cos and sin.

    Base: inv_freq[i] = theta^(-2i / K), i < K/2 (wavelength 2 pi / inv_freq[i]). With s =
    ``factor`` (new context / pretraining context):

      linear  inv_freq / s: position interpolation (Chen et al. 2023), position p rotates
              as p / s did. Hugging Face rope_type "linear".
      ntk     theta' = theta * s^(K / (K - 2)) ("NTK-aware", bloc97 2023): the highest
              frequency is kept, the lowest is divided by exactly s. Static; equals Hugging
              Face's "dynamic" rope at sequence length s * original with its factor 1 (the
              dynamic variant recomputes theta' from the running length instead).
      yarn    Peng et al. 2023, as Hugging Face ``_compute_yarn_parameters`` (beta_fast 32,
              beta_slow 1, truncate): dimensions that turn more than 32 times over the
              pretraining length L (``original_max_len``) keep their frequency, those that
              turn less than once are interpolated (/ s), a linear ramp between; and the
              attention factor 0.1 ln(s) + 1 multiplies cos and sin, so q.k (both rotated)
              grows by its square: softmax temperature sqrt(1/t) = 0.1 ln(s) + 1 of the paper.
    Returns:
        inv_freq_K2 ([K/2], fp32), attention_factor (1.0 except yarn).
    """
    exponent_K2 = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    if scaling == "ntk":
        theta = theta * factor ** (head_dim / (head_dim - 2))
    inv_freq_K2 = theta ** (-exponent_K2)
    if scaling == "linear":
        return inv_freq_K2 / factor, 1.0
    if scaling != "yarn":
        return inv_freq_K2, 1.0
    assert original_max_len is not None, "yarn needs the pretraining length"

    def turns_dim(turns: float) -> float:  # the dimension index that turns `turns` times over L
        return head_dim * math.log(original_max_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(turns_dim(32.0)), 0)
    high = min(math.ceil(turns_dim(1.0)), head_dim - 1)
    if low == high:
        high += 0.001  # Hugging Face's guard against a zero-width ramp
    ramp_K2 = ((torch.arange(head_dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_K2 = 1 - ramp_K2  # 1: extrapolate (original frequency), 0: interpolate (/ s)
    inv_freq_K2 = inv_freq_K2 / factor * (1 - keep_K2) + inv_freq_K2 * keep_K2
    return inv_freq_K2, (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None, scaling: str = "none",
                 factor: float = 1.0, original_max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Rotary tables, fp32: angle[s, i] = s * inv_freq[i] (``rope_inv_freq``), cos and sin
    times the attention factor (1 except yarn).

    Returns:
        cos_SK2, sin_SK2: [S, K/2].
    """
    inv_freq_K2, attention_factor = rope_inv_freq(head_dim, theta, scaling, factor, original_max_len, device)
    angle_SK2 = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq_K2[None, :]
    if attention_factor == 1.0:
        return angle_SK2.cos(), angle_SK2.sin()
    return angle_SK2.cos() * attention_factor, angle_SK2.sin() * attention_factor


def rope_tables(cfg: ModelConfig, seq_len: int, device=None) -> tuple[Tensor, Tensor] | None:
    """The model's rotary tables for a sequence (``model.rope_*``), or None when
    ``model.position`` is not rope. yarn's pretraining length: ``model.rope_original_max_len``,
    or max_seq_len / factor when null."""
    if cfg.position != "rope":
        return None
    original = cfg.rope_original_max_len or max(1, round(cfg.max_seq_len / cfg.rope_scaling_factor))
    return rope_cos_sin(seq_len, cfg.head_dim, cfg.rope_theta, device, cfg.rope_scaling,
                        cfg.rope_scaling_factor, original)


def apply_rope(x_BHSK: Tensor, cos_SK2: Tensor, sin_SK2: Tensor) -> Tensor:
    """Rotates each pair (x[i], x[i + K/2]) by angle[s, i] (the GPT-NeoX / Llama "half"
    layout): [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]. A rotation R(s) per position,
    so <R(i) q, R(j) k> depends on q, k and i - j only. Computed in fp32."""
    x1, x2 = x_BHSK.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos_SK2 - x2 * sin_SK2, x2 * cos_SK2 + x1 * sin_SK2), dim=-1)
    return out.to(x_BHSK.dtype)


class Attention(nn.Module):
    """Causal self-attention with optional grouped-query heads, rotary positions or ALiBi,
    and an attention pattern (``moe_train.model.attention``).

    One fused projection ``qkv``: D -> (H + 2G) * K, columns [q | k | v] (for G = H this is
    the former [D, 3D] layout). Attention-probability dropout (SDPA's ``dropout_p``) in
    training only. ``model.qk_norm``: an RMSNorm over K (one weight [K] shared by the
    heads) on q and on k, before the rotary positions (Qwen3, OLMoE). ``model.position:
    alibi``: the per-head slopes are recomputed on the fly (no buffer: nothing in the
    checkpoint, and no cast to bf16 with the module).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.pattern = AttentionPattern.from_config(cfg)
        self.impl_requested = cfg.attention_impl
        self.alibi = alibi_slopes(cfg.num_heads) if cfg.position == "alibi" else None

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
        alibi_H = None if self.alibi is None else torch.tensor(self.alibi, device=x_BSD.device)
        impl = resolve_impl(self.impl_requested, x_BSD.device, self.dropout)
        out_BHSK = attend(q_BHSK, k_BGSK, v_BGSK, self.pattern, impl,
                          dropout_p=self.dropout if self.training else 0.0, alibi_H=alibi_H)
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
