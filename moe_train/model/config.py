"""``model:`` section of the training config: the transformer around the MoE layers and
its options (norms, positions, attention patterns, ALBERT's factorised embeddings and
layer sharing). Composed into the root ``moe_train.config.Config``; plain types only, so YAML stores it
and ``--set model.x=y`` works."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from moe_train.config_checks import choice, fail

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope", "alibi")
ATTENTIONS = ("full", "sliding_window", "local_block", "longformer")
ATTENTION_IMPLS = ("auto", "flex", "sdpa")
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")
SHARE_LAYERS = ("none", "attention", "mlp", "all")
MLP_ACTIVATIONS = ("gelu", "swiglu")


@dataclass
class ModelConfig:
    """The transformer around the MoE layers. The defaults are a GPT-2-like decoder
    (LayerNorm, learned positions, GELU dense MLP, multi-head attention, no dropout)."""

    vocab_size: int = 32000
    d_model: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: Optional[int] = None  # grouped-query attention; None = num_heads (MHA)
    d_ff: int = 2048  # dense MLP hidden width (non-MoE blocks)
    mlp_activation: str = "gelu"  # dense MLP: gelu, or swiglu = down(silu(gate(x)) * up(x))
    norm: str = "layernorm"  # or rmsnorm
    norm_eps: float = 1e-5
    position: str = "learned"  # learned absolute embeddings, rope (rotary, on q and k) or alibi (score bias)
    rope_theta: float = 10000.0
    max_seq_len: int = 1024
    moe_every: int = 2  # block i has an MoE MLP when (i + 1) % moe_every == 0; 0 = no MoE
    first_dense_layers: int = 0  # the first n blocks are dense whatever moe_every says
    dropout: float = 0.0  # embedding, attention-probability and residual-branch dropout
    tie_embeddings: bool = True
    init_std: float = 0.02
    # ALBERT (Lan et al. 2019). Factorised embeddings: a V x E table and an E -> D
    # projection (tied with the head through the same factorisation); null: E = d_model.
    embed_dim: Optional[int] = None
    # Cross-layer parameter sharing: none, attention, mlp (with MoE blocks: the experts
    # and router) or all; in groups of share_group_size consecutive blocks (0: one group).
    share_layers: str = "none"
    share_group_size: int = 0
    # Attention pattern, causal in every case: full; sliding_window (each query sees the
    # last `window` keys, itself included); local_block (blocks of `window` tokens, each
    # sees its own block); longformer (sliding window plus the first `global_tokens`
    # tokens of the sequence, which attend causally to everything before them).
    attention: str = "full"
    window: int = 256
    global_tokens: int = 0
    # auto: SDPA is_causal (no mask) for full attention without ALiBi on every device;
    # flex_attention for the other patterns and ALiBi on CUDA without dropout; else SDPA
    # with a (chunked) mask. flex (CPU: evaluation only) or sdpa force one.
    attention_impl: str = "auto"
    # Per-head RMSNorm on q and k before the rotary positions (Qwen3, OLMoE).
    qk_norm: bool = False
    # Rotary scaling to extend the context after pretraining: none, linear (position
    # interpolation), ntk (NTK-aware base change) or yarn; factor = new / original length.
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_original_max_len: Optional[int] = None  # yarn: the pretraining length (null: max_seq_len / factor)

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                fail(f"model.{name}", getattr(self, name), "must be > 0")
        if self.d_model % self.num_heads:
            fail("model.d_model", self.d_model, f"must be divisible by model.num_heads ({self.num_heads})")
        if self.num_kv_heads is not None and not (
                self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0):
            fail("model.num_kv_heads", self.num_kv_heads,
                 f"must be >= 1 and divide model.num_heads ({self.num_heads}), or null")
        choice("model.mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
        choice("model.norm", self.norm, NORMS)
        choice("model.position", self.position, POSITIONS)
        if self.position == "rope" and self.head_dim % 2:
            fail("model.position", self.position,
                 f"rope needs an even head dim, got d_model / num_heads = {self.head_dim}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                fail(f"model.{name}", value, "must be > 0")
        if self.moe_every < 0:
            fail("model.moe_every", self.moe_every, "must be >= 0 (0 disables MoE)")
        if not 0 <= self.first_dense_layers <= self.num_layers:
            fail("model.first_dense_layers", self.first_dense_layers,
                 f"must be in [0, model.num_layers = {self.num_layers}]")
        if not 0.0 <= self.dropout < 1.0:
            fail("model.dropout", self.dropout, "must be in [0, 1)")
        self._validate_options()

    def _validate_options(self) -> None:
        if self.embed_dim is not None and not 0 < self.embed_dim <= self.d_model:
            fail("model.embed_dim", self.embed_dim, f"must be in (0, model.d_model = {self.d_model}], or null")
        choice("model.share_layers", self.share_layers, SHARE_LAYERS)
        if self.share_group_size < 0 or (self.share_group_size and self.num_layers % self.share_group_size):
            fail("model.share_group_size", self.share_group_size,
                 f"must be 0 (one group) or divide model.num_layers ({self.num_layers})")
        choice("model.attention", self.attention, ATTENTIONS)
        choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
        if self.attention_impl == "flex" and self.dropout > 0:
            fail("model.attention_impl", self.attention_impl, f"flex_attention has no attention dropout: "
                 f"set model.dropout = 0 (got {self.dropout}), or use sdpa or auto")
        if self.attention != "full" and self.window < 1:
            fail("model.window", self.window, f"must be >= 1 for model.attention = {self.attention}")
        if self.global_tokens < 0 or (self.global_tokens and self.attention != "longformer"):
            fail("model.global_tokens", self.global_tokens, "must be >= 0, and is used by "
                 "model.attention = longformer only")
        choice("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_scaling != "none":
            if self.position != "rope":
                fail("model.rope_scaling", self.rope_scaling, f"needs model.position = rope, got {self.position!r}")
            if not self.rope_scaling_factor >= 1.0:
                fail("model.rope_scaling_factor", self.rope_scaling_factor, "must be >= 1")
        if self.rope_original_max_len is not None and self.rope_original_max_len <= 0:
            fail("model.rope_original_max_len", self.rope_original_max_len, "must be > 0 or null")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``num_kv_heads``, or ``num_heads`` when that is None."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def is_moe_block(self, i: int) -> bool:
        """Block i (0-based) has an MoE MLP iff moe_every > 0, i >= first_dense_layers and
        (i + 1) % moe_every == 0 (Switch: every other block; DeepSeek: dense first blocks)."""
        return self.moe_every > 0 and i >= self.first_dense_layers and (i + 1) % self.moe_every == 0

    @property
    def num_moe_blocks(self) -> int:
        return sum(self.is_moe_block(i) for i in range(self.num_layers))
