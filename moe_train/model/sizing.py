"""Model sizing from the config alone: parameter counts, training FLOPs per token, and a
per-rank memory estimate. Pure arithmetic (no torch), so ``moe-train check`` can print it
for any world size before a launch.

Legend: V vocabulary, D d_model, L layers, H query heads, G key/value heads, K head dim
(D / H), Fd dense MLP width, E experts, k top_k, F expert width, S sequence length,
B micro-batch size, Ee ``model.embed_dim`` (factorised embeddings; Ee = D when off);
a = 3 for SwiGLU (gate, up, down), 2 for GELU/ReLU (up, down).

Cross-layer sharing (``model.share_layers``): ``layer_owners`` says which block's modules
each block uses; parameter counts count each shared module once (what is stored, what
the optimizer holds), FLOPs and activations count every use (what is computed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from moe_train.model.attention import AttentionPattern
from moe_train.model.config import ModelConfig
from moe_train.moe.config import MoEConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts (unique parameters: a tied head is the embedding, and a module
    shared by several blocks (``model.share_layers``) is counted once).

    Attributes:
        total: dense + expert; equals ``sum(p.numel() for p in model.parameters())``.
        dense: every non-expert parameter: embeddings, norms, attention, dense MLPs,
            routers, shared experts (replicated on every rank).
        expert: the routed experts of all MoE layers (E per layer; a layer shared by
            several blocks counted once).
        router: the routers' [D, E] weights (included in ``dense``).
        embedding: token table + learned position table + untied head, + the two
            projections of factorised embeddings (in ``dense``).
        active_per_token: the parameters in one token's forward path, counting a shared
            module once per use: dense (embedding table, head and shared experts
            included) + k experts per MoE block. The "N" of 6N; sharing leaves it
            unchanged (the same compute on fewer stored parameters).
        shared: the shared experts of all MoE layers, a*D*Fs each, + D per sigmoid gate
            (included in ``dense``).
        embed_proj: factorised embeddings' E -> D input and D -> E output projections,
            2 * Ee * D (included in ``embedding``); 0 when off.
    """

    total: int
    dense: int
    expert: int
    router: int
    embedding: int
    active_per_token: int
    shared: int = 0
    embed_proj: int = 0


def _mlp_mult(activation: str) -> int:
    return 3 if activation == "swiglu" else 2


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" else 1)


def _attn_params(cfg: ModelConfig) -> int:
    """The pre-attention norm and attention ([D, (H + 2G) K] qkv and [D, D] proj,
    per-head q/k norms [K] each with ``qk_norm``): what ``share_layers: attention``
    shares."""
    qk_norms = 2 * cfg.head_dim if cfg.qk_norm else 0
    return _norm_params(cfg) + cfg.d_model * (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim \
        + cfg.d_model ** 2 + qk_norms


def factorised(cfg: ModelConfig) -> bool:
    """Whether the embeddings are factorised: ``embed_dim`` set and below ``d_model``
    (``embed_dim == d_model`` is the plain V x D table, no projections)."""
    return cfg.embed_dim is not None and cfg.embed_dim < cfg.d_model


def embed_width(cfg: ModelConfig) -> int:
    """Ee: the width of the token table (``embed_dim``, or ``d_model``)."""
    return cfg.embed_dim if factorised(cfg) else cfg.d_model


def layer_owners(cfg: ModelConfig) -> tuple[list[int], list[int]]:
    """Which block's modules each block uses under ``model.share_layers``.

    Blocks are split into groups of ``share_group_size`` consecutive blocks (0: one group
    of all). ``attention`` shares the pre-attention norm and the attention of a group's
    first block with the whole group; ``mlp`` shares the pre-MLP norm and the MLP, but
    only between blocks of the same kind (MoE with MoE, dense with dense), so with
    ``moe_every: 2`` a group's MoE blocks use one MoE layer (experts, router, shared
    expert) and its dense blocks one dense MLP; ``all`` does both. Pure (no torch).

    Returns:
        (attn_owner, mlp_owner): per block i, the index of the block whose modules it
        uses (i itself when not shared).
    """
    L = cfg.num_layers
    size = cfg.share_group_size or L
    share_attn = cfg.share_layers in ("attention", "all")
    share_mlp = cfg.share_layers in ("mlp", "all")
    attn_owner, mlp_owner = [], []
    for i in range(L):
        start = i - i % size
        attn_owner.append(start if share_attn else i)
        same_kind = [j for j in range(start, i + 1) if cfg.is_moe_block(j) == cfg.is_moe_block(i)]
        mlp_owner.append(same_kind[0] if share_mlp else i)
    return attn_owner, mlp_owner


def param_counts(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> ParamCounts:
    """Counts the parameters ``MoETransformer(model_cfg, moe_cfg)`` holds with ep = 1.

    Per attention (one per block, or per group when shared): a norm (2D LayerNorm
    weight+bias, D RMSNorm) and D(H + 2G)K + D^2. Per MLP (likewise): a norm and either a
    dense MLP a*D*Fd or a router D*E plus E experts of a*D*F (plus a shared expert a*D*Fs
    and its gate D). Plus V*Ee embeddings (twice untied), with factorised embeddings the
    Ee -> D and D -> Ee projections, S_max*D learned positions, a final norm.
    ``active_per_token`` counts every block's use of its modules (compute).
    """
    D, V, Ee = model_cfg.d_model, model_cfg.vocab_size, embed_width(model_cfg)
    attn_owner, mlp_owner = layer_owners(model_cfg)
    moe_owners = {o for o in mlp_owner if model_cfg.is_moe_block(o)}
    dense_owners = set(mlp_owner) - moe_owners
    per_expert = _mlp_mult(moe_cfg.activation) * D * moe_cfg.d_ff
    embed_proj = 2 * Ee * D if factorised(model_cfg) else 0
    embedding = V * Ee * (1 if model_cfg.tie_embeddings else 2) + embed_proj
    if model_cfg.position == "learned":
        embedding += model_cfg.max_seq_len * D
    dense_mlp = _norm_params(model_cfg) + _mlp_mult(model_cfg.mlp_activation) * D * model_cfg.d_ff
    moe_dense = _norm_params(model_cfg) + D * moe_cfg.num_experts + _shared_params(D, moe_cfg)

    def dense_params(num_attn: int, num_dense: int, num_moe: int) -> int:
        return (embedding + _norm_params(model_cfg) + num_attn * _attn_params(model_cfg)
                + num_dense * dense_mlp + num_moe * moe_dense)

    num_moe = len(moe_owners)
    dense = dense_params(len(set(attn_owner)), len(dense_owners), num_moe)
    expert = num_moe * moe_cfg.num_experts * per_expert
    uses_moe = model_cfg.num_moe_blocks
    active = (dense_params(model_cfg.num_layers, model_cfg.num_layers - uses_moe, uses_moe)
              + uses_moe * moe_cfg.top_k * per_expert)
    return ParamCounts(total=dense + expert, dense=dense, expert=expert,
                       router=num_moe * D * moe_cfg.num_experts, embedding=embedding,
                       active_per_token=active, shared=num_moe * _shared_params(D, moe_cfg),
                       embed_proj=embed_proj)


def saving_lines(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> list[str]:
    """``moe-train check``'s lines on the ALBERT options: the parameters that factorised
    embeddings save against ``embed_dim = d_model`` and that layer sharing saves against
    ``share_layers: none`` (each with the other option as configured); none when off."""
    total = param_counts(model_cfg, moe_cfg).total
    lines = []
    if factorised(model_cfg):
        full = param_counts(dataclasses.replace(model_cfg, embed_dim=None), moe_cfg).total
        lines.append(f"factorised embeddings (embed_dim {model_cfg.embed_dim}, d_model {model_cfg.d_model}): "
                     f"{human_count(total)} parameters instead of {human_count(full)} with embed_dim = "
                     f"d_model, saves {human_count(full - total)} ({(full - total) / full:.1%})")
    if model_cfg.share_layers != "none":
        unshared = param_counts(dataclasses.replace(model_cfg, share_layers="none"), moe_cfg).total
        groups = (f"groups of {model_cfg.share_group_size} blocks" if model_cfg.share_group_size
                  else "one group of all blocks")
        lines.append(f"layer sharing ({model_cfg.share_layers}, {groups}): {human_count(total)} parameters "
                     f"instead of {human_count(unshared)} unshared, saves {human_count(unshared - total)} "
                     f"({(unshared - total) / unshared:.1%}); compute per token unchanged")
    return lines


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
                 A local pattern (``model.attention``): L * 4 * D * the mean number of keys
                 a query reads (about W for a window of W; W + g for Longformer).
    dense_mlp    (dense blocks) 2 * a * D * Fd
    router       (MoE blocks) 2 * D * E
    experts      (MoE blocks) k * 2 * a * D * F: every top-k assignment computed (dropless;
                 with a capacity, dropped assignments do less and padding does more)
    shared       (MoE blocks) 2 * a * D * Fs, + 2 * D for a sigmoid gate
    lm_head      2 * D * V; factorised embeddings: 2 * (D * Ee + Ee * V)
    embed_proj   factorised embeddings' input projection 2 * Ee * D (else 0)
    Every block counts, shared modules once per use. Embedding lookups, norms, softmax
    and activations are not matmuls and are left out.
    """
    D, L = model_cfg.d_model, model_cfg.num_layers
    num_moe = model_cfg.num_moe_blocks
    qkv = D * (model_cfg.num_heads + 2 * model_cfg.kv_heads) * model_cfg.head_dim
    Ee, V = embed_width(model_cfg), model_cfg.vocab_size
    lm_head = 2.0 * (D * Ee + Ee * V) if factorised(model_cfg) else 2.0 * D * V
    return {
        "attn_proj": 2.0 * L * (qkv + D * D),
        "attn_scores": (2.0 * L * seq_len * D if model_cfg.attention == "full" else
                        4.0 * L * D * AttentionPattern.from_config(model_cfg).mean_keys_per_query(seq_len)),
        "dense_mlp": 2.0 * (L - num_moe) * _mlp_mult(model_cfg.mlp_activation) * D * model_cfg.d_ff,
        "router": 2.0 * num_moe * D * moe_cfg.num_experts,
        "experts": 2.0 * num_moe * moe_cfg.top_k * _mlp_mult(moe_cfg.activation) * D * moe_cfg.d_ff,
        "shared": 2.0 * num_moe * _shared_params(D, moe_cfg),
        "lm_head": lm_head,
        "embed_proj": 2.0 * Ee * D if factorised(model_cfg) else 0.0,
    }


def flops_per_token(model_cfg: ModelConfig, moe_cfg: MoEConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3 x forward (backward = 2 x forward: grads of the inputs
    and of the weights), from ``forward_flops_per_token``. For MFU:
    ``flops_per_token * tokens_per_s / (num_gpus * peak_flops)``. Up to the norms, this is
    6 * (active_per_token - embedding) + 6 * D * V + 6 * L * S * D (without factorised
    embeddings)."""
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
    if factorised(cfg):  # the projections' inputs: Ee-wide table rows and head_proj output
        head += 2 * embed_width(cfg) * b
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
      head       2D, and V * (b + 4) bytes: logits plus fp32 log-softmax; + 2Ee with
                 factorised embeddings (the two projections' inputs)
    Shared blocks (``model.share_layers``) store their parameters once (the counts above
    are unique) but save activations per use.
    With activation checkpointing: L * D * b (each block's input) + the largest block
    (recomputed one at a time in backward) + the head.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype = {dtype!r}: must be one of {', '.join(DTYPE_BYTES)}")
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
