"""Model sizing from the config alone: parameter counts, training FLOPs per token, and a
per-rank memory estimate. Pure arithmetic (no torch), so ``moe-train check`` can print it
for any world size before a launch.

Legend: V vocabulary, D d_model, L layers, H query heads, G key/value heads, K head dim
(D / H), Fd dense MLP width, E experts, k top_k, F expert width, S sequence length,
B micro-batch size; a = 3 for SwiGLU (gate, up, down), 2 for GELU/ReLU (up, down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_train.config import DTYPES, ModelConfig, MoEConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (unique parameters: a tied head is the embedding, counted once).

    Attributes:
        total: dense + expert; equals ``sum(p.numel() for p in model.parameters())``.
        dense: every non-expert parameter: embeddings, norms, attention, dense MLPs,
            routers, shared experts (replicated on every rank).
        expert: the routed experts of all MoE blocks (E per block).
        router: the routers' [D, E] weights (included in ``dense``).
        embedding: token table + learned position table + untied head (in ``dense``).
        active_per_token: the parameters in one token's forward path: dense (embedding
            table, head and shared experts included) + k experts per MoE block. The "N"
            of 6N.
        shared: the shared experts of all MoE blocks, a*D*Fs each, + D per sigmoid gate
            (included in ``dense``).
    """

    total: int
    dense: int
    expert: int
    router: int
    embedding: int
    active_per_token: int
    shared: int = 0


def _mlp_mult(activation: str) -> int:
    return 3 if activation == "swiglu" else 2


def _block_params(cfg: ModelConfig) -> int:
    """Norms, attention ([D, (H + 2G) K] qkv and [D, D] proj, per-head q/k norms [K]
    each with ``qk_norm``); no MLP."""
    norms = 2 * cfg.d_model * (2 if cfg.norm == "layernorm" else 1) + (2 * cfg.head_dim if cfg.qk_norm else 0)
    attn = cfg.d_model * (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.d_model ** 2
    return norms + attn


def param_counts(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> ParamCounts:
    """Counts the parameters ``MoETransformer(model_cfg, moe_cfg)`` holds with ep = 1.

    Per block: norms (2D LayerNorm weight+bias, D RMSNorm, twice), attention
    D(H + 2G)K + D^2, and either a dense MLP a*D*Fd or a router D*E plus E experts of
    a*D*F (plus a shared expert a*D*Fs and its gate D). Plus V*D embeddings, S_max*D
    learned positions, a final norm, V*D untied head.
    """
    D, V = model_cfg.d_model, model_cfg.vocab_size
    num_moe = model_cfg.num_moe_blocks
    num_dense_blocks = model_cfg.num_layers - num_moe
    per_expert = _mlp_mult(moe_cfg.activation) * D * moe_cfg.d_ff
    embedding = V * D * (1 if model_cfg.tie_embeddings else 2)
    if model_cfg.position == "learned":
        embedding += model_cfg.max_seq_len * D
    router = num_moe * D * moe_cfg.num_experts
    shared = num_moe * _shared_params(D, moe_cfg)
    final_norm = D * (2 if model_cfg.norm == "layernorm" else 1)
    dense = (embedding + final_norm + router + shared + model_cfg.num_layers * _block_params(model_cfg)
             + num_dense_blocks * _mlp_mult(model_cfg.mlp_activation) * D * model_cfg.d_ff)
    expert = num_moe * moe_cfg.num_experts * per_expert
    return ParamCounts(total=dense + expert, dense=dense, expert=expert, router=router,
                       embedding=embedding,
                       active_per_token=dense + num_moe * moe_cfg.top_k * per_expert, shared=shared)


def _shared_params(d_model: int, moe_cfg: MoEConfig) -> int:
    """One MoE block's shared expert: a*D*Fs, plus D for a sigmoid gate; 0 without."""
    if moe_cfg.shared_d_ff == 0:
        return 0
    gate = d_model if moe_cfg.shared_gate == "sigmoid" else 0
    return _mlp_mult(moe_cfg.activation) * d_model * moe_cfg.shared_d_ff + gate


def forward_flops_per_token(model_cfg: ModelConfig, moe_cfg: MoEConfig, seq_len: int) -> dict[str, float]:
    """Forward matmul FLOPs per token by component (2 FLOPs per multiply-accumulate).

    attn_proj    L * 2 * (D (H + 2G) K + D^2)
    attn_scores  L * 2 * S * D: QK^T and AV are 2 * 2 * S * D for a full S x S score
                 matrix; causal attention computes half of it on average (the convention
                 of FlashAttention's causal benchmarks; PaLM's 12*L*D*S counts it whole).
    dense_mlp    (dense blocks) 2 * a * D * Fd
    router       (MoE blocks) 2 * D * E
    experts      (MoE blocks) k * 2 * a * D * F: every top-k assignment computed (dropless;
                 with a capacity, dropped assignments do less and padding does more)
    shared       (MoE blocks) 2 * a * D * Fs, + 2 * D for a sigmoid gate
    lm_head      2 * D * V
    Embedding lookups, norms, softmax and activations are not matmuls and are left out.
    """
    D, L = model_cfg.d_model, model_cfg.num_layers
    num_moe = model_cfg.num_moe_blocks
    qkv = D * (model_cfg.num_heads + 2 * model_cfg.kv_heads) * model_cfg.head_dim
    return {
        "attn_proj": 2.0 * L * (qkv + D * D),
        "attn_scores": 2.0 * L * seq_len * D,
        "dense_mlp": 2.0 * (L - num_moe) * _mlp_mult(model_cfg.mlp_activation) * D * model_cfg.d_ff,
        "router": 2.0 * num_moe * D * moe_cfg.num_experts,
        "experts": 2.0 * num_moe * moe_cfg.top_k * _mlp_mult(moe_cfg.activation) * D * moe_cfg.d_ff,
        "shared": 2.0 * num_moe * _shared_params(D, moe_cfg),
        "lm_head": 2.0 * D * model_cfg.vocab_size,
    }


def flops_per_token(model_cfg: ModelConfig, moe_cfg: MoEConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x forward (backward = 2 x forward: grads of the inputs
    and of the weights), from ``forward_flops_per_token``. For MFU:
    ``flops_per_token * tokens_per_s / (num_gpus * peak_flops)``. Up to the norms, this is
    6 * (active_per_token - embedding) + 6 * D * V + 6 * L * S * D."""
    return 3.0 * sum(forward_flops_per_token(model_cfg, moe_cfg, seq_len).values())


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank. ``activations`` is per micro-batch and an estimate (see
    ``memory_estimate``); the rest is exact up to allocator padding and buffers."""

    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def _activation_bytes_per_token(cfg: ModelConfig, moe: MoEConfig, dtype_bytes: int,
                                checkpointing: bool) -> int:
    """Saved-for-backward bytes per token (see ``memory_estimate``)."""
    D, K, b = cfg.d_model, cfg.head_dim, dtype_bytes
    attn = 3 * D + (cfg.num_heads + 2 * cfg.kv_heads) * K
    dense = (attn + 2 * D + _mlp_mult(cfg.mlp_activation) * cfg.d_ff) * b
    shared = (D + _mlp_mult(moe.activation) * moe.shared_d_ff) if moe.shared_d_ff else 0
    moe_block = ((attn + 2 * D + moe.top_k * (2 * D + _mlp_mult(moe.activation) * moe.d_ff) + shared) * b
                 + 2 * 4 * moe.num_experts)
    blocks = [moe_block if cfg.is_moe_block(i) else dense for i in range(cfg.num_layers)]
    head = 2 * D * b + cfg.vocab_size * (b + 4)
    if checkpointing:
        return cfg.num_layers * D * b + max(blocks) + head
    return sum(blocks) + head


def memory_estimate(model_cfg: ModelConfig, moe_cfg: MoEConfig, *, world_size: int, ep_size: int,
                    zero_stage: int, dtype: str, micro_batch_size: int, seq_len: int,
                    activation_checkpointing: bool = False) -> MemoryEstimate:
    """Per-rank training memory in bytes, for Adam under DeepSpeed ZeRO 0/1/2.

    Parameters held: all dense ones (N_d) and this rank's experts, N_x = expert / ep.
    With b bytes per element of ``dtype`` (4 fp32, 2 bf16/fp16):
      params     (N_d + N_x) * b
      grads      (N_d + N_x) * b;  ZeRO-2: (N_d / world + N_x / edp) * b
      optimizer  (N_d + N_x) * o;  ZeRO-1/2: (N_d / world + N_x / edp) * o, where
                 o = 8 (Adam m, v in fp32) at ZeRO 0 in fp32, whose params are the master,
                 and o = 12 (fp32 master + m + v) otherwise: ZeRO 1/2 keep their own fp32
                 master partition even in fp32 (measured by benchmarks/train_step.py)
    Dense state partitions over all ``world`` ranks, expert state over the
    edp = world / ep ranks that hold the same experts; partitions round up.
    Activations, per micro-batch of T = B * S tokens, from the tensors each layer saves
    for backward (an estimate: dropout masks, RoPE copies, SDPA's log-sum-exp and
    capacity padding are left out), elements of b bytes per token:
      attention  3D + (H + 2G)K   (norm input, qkv input, q/k/v, attention output)
      dense MLP  2D + a*Fd        (norm input, up input, hidden)
      MoE MLP    2D + k(2D + a*F) (+ 8E bytes of fp32 router logits and probs)
                 + D + a*Fs with a shared expert (its output, its hidden)
      head       2D, and V * (b + 4) bytes: logits plus fp32 log-softmax
    With activation checkpointing: L * D * b (each block's input) + the largest block
    (recomputed one at a time in backward) + the head.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype = {dtype!r}: must be one of {', '.join(DTYPES)}")
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage = {zero_stage}: must be 0, 1 or 2")
    if ep_size < 1 or world_size % ep_size or moe_cfg.num_experts % ep_size:
        raise ValueError(f"ep_size = {ep_size}: must divide world_size ({world_size}) and "
                         f"moe.num_experts ({moe_cfg.num_experts})")
    counts = param_counts(model_cfg, moe_cfg)
    b = DTYPE_BYTES[dtype]
    opt_bytes = 8 if (dtype == "fp32" and zero_stage == 0) else 12
    n_dense, n_expert = counts.dense, counts.expert // ep_size
    edp = world_size // ep_size
    held = n_dense + n_expert
    shard = math.ceil(n_dense / world_size) + math.ceil(n_expert / edp)
    tokens = micro_batch_size * seq_len
    return MemoryEstimate(
        params=held * b,
        grads=(shard if zero_stage >= 2 else held) * b,
        optimizer=(shard if zero_stage >= 1 else held) * opt_bytes,
        activations=tokens * _activation_bytes_per_token(model_cfg, moe_cfg, b, activation_checkpointing),
    )


def human_count(n: float) -> str:
    """1234567 -> '1.23M'; 4.5e10 -> '45B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}" if n / scale < 100 else f"{n / scale:.0f}{unit}"
    return f"{n:g}"


def gib(num_bytes: float) -> str:
    """Bytes in GiB: 3 significant digits below 10 GiB ('0.00137 GiB'), one decimal above."""
    value = num_bytes / 2 ** 30
    return f"{value:.1f} GiB" if value >= 10 else f"{value:.3g} GiB"
