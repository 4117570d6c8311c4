"""Model sizing from the config alone: parameter counts, training FLOPs per token, and
per-rank memory (``memory_plan``: each part and the peak of each phase, with the ZeRO
reduce bucket moe_train derives). Pure arithmetic (no torch), so ``moe-train check`` can
print it for any world size before a launch.

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
    head = _head_bytes_per_token(cfg, b)
    if checkpointing:
        return cfg.num_layers * D * b + max(blocks) + head
    return sum(blocks) + head


def _head_bytes_per_token(cfg: ModelConfig, b: int) -> int:
    """The head's saved bytes per token: 2D elements, logits and fp32 log-softmax V (b + 4)
    bytes, + 2Ee elements with factorised embeddings (the projections' inputs)."""
    head = 2 * cfg.d_model * b + cfg.vocab_size * (b + 4)
    if factorised(cfg):
        head += 2 * embed_width(cfg) * b
    return head


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


# ------------------------------------------------------------- the training memory plan

DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)
PLAN_PHASES = ("build", "engine", "forward", "backward", "step")


@dataclass(frozen=True)
class MemoryPlan:
    """Peak training bytes per rank, by part and by phase (``memory_plan``).

    Attributes:
        parts: bytes of each part, in the order ``moe-train check`` prints them.
        phases: the estimated peak of each phase of ``PLAN_PHASES``.
        reduce_bucket: ZeRO's gradient reduce bucket in elements (0 at ZeRO 0).
        bucket_source: "derived" (from the model size), "deepspeed" (set in the
            ``deepspeed:`` passthrough) or "" (ZeRO 0, no bucket).
        worst_case_extra: bytes a dropless MoE could add beyond ``phases`` when the
            router sends every assignment of the EP group to one rank (0 with a capacity).
        bucket_bytes_per_element: the bucket's element size (the training dtype's).
    """

    parts: dict
    phases: dict
    reduce_bucket: int
    bucket_source: str
    worst_case_extra: int = 0
    bucket_bytes_per_element: int = 4

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


def held_params(model_cfg: ModelConfig, moe_cfg: MoEConfig, ep_size: int) -> int:
    """The parameters one rank holds: every dense one and its experts (N_d + N_x / ep)."""
    n = param_counts(model_cfg, moe_cfg)
    return n.dense + n.expert // ep_size


def reduce_bucket_default(model_cfg: ModelConfig, moe_cfg: MoEConfig, ep_size: int) -> int:
    """The ZeRO 1/2 reduce bucket moe_train gives DeepSpeed unless ``deepspeed:`` sets
    ``zero_optimization.reduce_bucket_size``: the gradient elements a rank reduces in a
    step (N_d + N_x / ep), capped at DeepSpeed's default of 5e8. DeepSpeed allocates the
    whole bucket (``torch.empty(reduce_bucket_size)``) at every backward; a bucket larger
    than every gradient a rank holds never fills, so anything above N_d + N_x / ep is memory
    and nothing else, while exactly that size keeps DeepSpeed's one reduction at the end
    of the backward (the same collectives, the same numbers)."""
    return min(DEEPSPEED_REDUCE_BUCKET, held_params(model_cfg, moe_cfg, ep_size))


def with_bucket_default(ds_config: dict, model_cfg: ModelConfig, moe_cfg: MoEConfig, ep_size: int) -> dict:
    """``ds_config`` with ``zero_optimization.reduce_bucket_size`` set to
    ``reduce_bucket_default`` at ZeRO 1 and 2, unless already set (the passthrough wins)."""
    zero = dict(ds_config.get("zero_optimization", {}))
    if zero.get("stage", 0) < 1 or "reduce_bucket_size" in zero:
        return ds_config
    zero["reduce_bucket_size"] = reduce_bucket_default(model_cfg, moe_cfg, ep_size)
    return {**ds_config, "zero_optimization": zero}


def _expert_rows_per_token(moe_cfg: MoEConfig, tokens: int) -> float:
    """Rows the experts of one rank compute per routed token: k (dropless, balanced),
    or E * C / T with a capacity (C = ceil(k T cf / E), at least ``min_capacity``, at
    most T: every slot is a row, empty ones zero)."""
    if moe_cfg.capacity_factor is None or tokens == 0:
        return float(moe_cfg.top_k)
    capacity = math.ceil(moe_cfg.top_k * tokens * moe_cfg.capacity_factor / moe_cfg.num_experts)
    capacity = min(max(capacity, moe_cfg.min_capacity), tokens)
    return moe_cfg.num_experts * capacity / tokens


def all_to_all_bytes(model_cfg: ModelConfig, moe_cfg: MoEConfig, *, ep_size: int, dtype: str,
                     tokens: int) -> int:
    """Bytes of one micro-batch's token exchange buffers kept for backward, all MoE
    blocks: at ep > 1 each block keeps the rows it received back from the experts' ranks
    ([rows, D]) and their gathered copy for the combine ([rows, D]); rows = E * C with a
    capacity, k * T dropless (balanced). 0 at ep 1 and without MoE blocks."""
    if ep_size == 1 or model_cfg.num_moe_blocks == 0:
        return 0
    rows = _expert_rows_per_token(moe_cfg, tokens) * tokens
    return int(model_cfg.num_moe_blocks * 2 * rows * model_cfg.d_model * DTYPE_BYTES[dtype])


def plan_from_config(cfg, world_size: int) -> "MemoryPlan":
    """``memory_plan`` of a root ``moe_train.config.Config`` (duck-typed: no import of it
    here), reading the ZeRO keys its ``deepspeed:`` passthrough sets."""
    return memory_plan(cfg.model, cfg.moe, world_size=world_size, ep_size=cfg.parallel.expert_parallel_size,
                       zero_stage=cfg.parallel.zero_stage, dtype=cfg.train.dtype,
                       micro_batch_size=cfg.data.micro_batch_size, seq_len=cfg.data.seq_len,
                       activation_checkpointing=cfg.train.activation_checkpointing,
                       zero_optimization=dict(cfg.deepspeed.get("zero_optimization", {})))


def memory_plan(model_cfg: ModelConfig, moe_cfg: MoEConfig, *, world_size: int, ep_size: int, zero_stage: int,
                dtype: str, micro_batch_size: int, seq_len: int, activation_checkpointing: bool = False,
                zero_optimization: dict | None = None) -> MemoryPlan:
    """Peak training bytes per rank by part and by phase, for AdamW under DeepSpeed ZeRO
    0/1/2: what the allocator hands out (``torch.cuda.max_memory_allocated``; on CPU the
    profiler's count), measured against by ``benchmarks/memory.py``.

    N = N_d + N_x / ep parameters held, Z = ceil(N_d / world) + ceil(N_x / ep / edp) their
    ZeRO partition, b bytes per element of ``dtype``; parts (``memory_estimate`` for the
    first four and the activations):
      parameters     N b                 gradients   (ZeRO-2: Z, else N) b
      optimizer      Adam m, v and the fp32 master (8N at ZeRO 0 fp32, else 12 Z or 12 N)
      reduce bucket  ZeRO 1/2: ``reduce_bucket_size`` elements of b bytes (twice with
                     ``overlap_comm``), allocated whole at every backward; by default
                     ``reduce_bucket_default`` (N), DeepSpeed's own default is 5e8
      all-to-all     ``all_to_all_bytes``: the MoE layers' exchanged rows kept for backward
      activations    ``memory_estimate``'s, per micro-batch, + one D per expert row (the
                     gathered outputs of the combine) and, at ep > 1 with a capacity, the
                     E * C - k * T padding rows (``_expert_row_extra_bytes``)
      model build    4 N + 4 V Ee: the model is built in fp32 on its device (from the meta
                     device) before DeepSpeed casts it to bf16 and flattens it; drawing
                     the token table takes one more table's worth for a moment
    Phases (a part appears where it is live; O = optimizer, A = activations + all-to-all,
    F = the largest parameter group's flat copy, max(N_d, N_x / ep) elements):
      build     the model build part
      engine    bf16 first casts: 4 N + N b. ZeRO 1/2: N b + max(F b, 8 Z): the flat
                copy beside the parameters, or the fp32 master partition and the zero
                gradient partitions DeepSpeed creates with it. ZeRO 0 bf16 (DeepSpeed's
                FP16_Optimizer): N b + 20 N: fp32 master, its zero gradient, Adam m and
                v made by a first step at init, foreach's temporary. ZeRO 0 fp32: build
      forward   N b + O + A
      backward  N b + O + the largest of: A + T V (4 + b) (at the start: the loss's
                [T, V] fp32 gradient and the logits' gradient), bucket + A + T V b (from
                the first parameter gradient on DeepSpeed's bucket is allocated, the
                logits' gradient still live), bucket + gradients (at the end: Z b at
                ZeRO 2, N b at ZeRO 1, N b + F b at ZeRO 0, which flattens each group
                for its all-reduce)
      step      N b + O + gradients + 4 Z (the fp32 gradient partition; ZeRO 1 still
                holds the bucket); ZeRO 0: + 4 N foreach temporaries (fp32), + 8 N (bf16:
                the fp32 gradients and their flat copy)
    The phases are fitted to, and checked against, the allocator's peaks
    (``benchmarks/memory.py``, README "check"): within 15% for every benchmark config.
    """
    zero = zero_optimization or {}
    base = memory_estimate(model_cfg, moe_cfg, world_size=world_size, ep_size=ep_size, zero_stage=zero_stage,
                           dtype=dtype, micro_batch_size=micro_batch_size, seq_len=seq_len,
                           activation_checkpointing=activation_checkpointing)
    b, n = DTYPE_BYTES[dtype], param_counts(model_cfg, moe_cfg)
    n_expert = n.expert // ep_size
    held = n.dense + n_expert
    shard = math.ceil(n.dense / world_size) + math.ceil(n_expert / (world_size // ep_size))
    flat = max(n.dense, n_expert)
    tokens = micro_batch_size * seq_len
    bucket, source, bucket_bytes = 0, "", 0
    if zero_stage >= 1:
        if "reduce_bucket_size" in zero:
            bucket, source = int(zero["reduce_bucket_size"]), "deepspeed"
        else:
            bucket, source = reduce_bucket_default(model_cfg, moe_cfg, ep_size), "derived"
        if zero.get("contiguous_gradients", True):
            bucket_bytes = bucket * b * (2 if zero.get("overlap_comm") else 1)
    a2a = all_to_all_bytes(model_cfg, moe_cfg, ep_size=ep_size, dtype=dtype, tokens=tokens)
    extra = _expert_row_extra_bytes(model_cfg, moe_cfg, ep_size, b, tokens)
    if activation_checkpointing and model_cfg.num_moe_blocks:  # one block's, recomputed in backward
        extra, a2a = extra // model_cfg.num_moe_blocks, a2a // model_cfg.num_moe_blocks
    acts = base.activations + extra
    V = model_cfg.vocab_size
    upcast = 4 * tokens * V if b < 4 else 0  # the loss upcasts bf16 logits: an fp32 [T, V] copy
    if activation_checkpointing:  # the forward keeps block inputs; a block's tensors or the head's
        inputs, head = tokens * model_cfg.num_layers * model_cfg.d_model * b, tokens * _head_bytes_per_token(
            model_cfg, b)
        forward_acts = inputs + max(acts - inputs - head + a2a, head + upcast)
    else:
        forward_acts = acts + a2a + upcast
    live = base.params + base.optimizer
    build = 4 * held + 4 * model_cfg.vocab_size * embed_width(model_cfg)
    cast = 4 * held + held * b if b < 4 else 0
    if zero_stage >= 1:
        engine = max(cast, held * b + max(flat * b, 8 * shard))
        grads = (shard if zero_stage == 2 else held) * b
        step_extra = 4 * shard + (bucket_bytes if zero_stage == 1 else 0)
    elif dtype != "fp32":
        engine = max(cast, held * b + 20 * held)
        grads = held * b + flat * b
        step_extra = 8 * held
    else:
        engine = build
        grads = held * b + flat * b
        step_extra = 4 * held
    logits_grad = tokens * V * b
    phases = {"build": build, "engine": engine, "forward": live + forward_acts,
              "backward": live + max(acts + a2a + upcast + 4 * tokens * V + logits_grad,
                                     bucket_bytes + acts + a2a + logits_grad, bucket_bytes + grads),
              "step": live + grads + step_extra}
    parts = {"parameters": base.params, "gradients": base.grads, "optimizer state": base.optimizer,
             "reduce bucket": bucket_bytes, "all-to-all buffers": a2a,
             f"activations per micro-batch ({micro_batch_size} x {seq_len} tokens)": acts,
             "model build (fp32, before DeepSpeed casts and flattens it)": build}
    worst = _dropless_worst_case_bytes(model_cfg, moe_cfg, ep_size, b, tokens)
    return MemoryPlan(parts=parts, phases=phases, reduce_bucket=bucket, bucket_source=source,
                      worst_case_extra=worst, bucket_bytes_per_element=b)


def _expert_row_extra_bytes(model_cfg: ModelConfig, moe_cfg: MoEConfig, ep_size: int, b: int,
                            tokens: int) -> int:
    """What ``memory_estimate``'s k(2D + a*F) per token leaves out of the MoE blocks'
    saved tensors: one more D per expert row (the experts' output rows, gathered for the
    gated combine), and at ep > 1 the rows a capacity adds beyond k * T, where the
    [E, C, D] slots are exchanged and computed, empty ones too ((E * C - k * T) rows of
    3D + a*F). At ep 1 the kept rows are packed into k * T (``moe/dispatcher.py``).
    Per MoE block; measured against the tensors autograd saves in tests/test_memory_plan.py."""
    if model_cfg.num_moe_blocks == 0:
        return 0
    rows = (_expert_rows_per_token(moe_cfg, tokens) if ep_size > 1 else moe_cfg.top_k) * tokens
    padding = rows - moe_cfg.top_k * tokens
    per_row = 3 * model_cfg.d_model + _mlp_mult(moe_cfg.activation) * moe_cfg.d_ff
    return int(model_cfg.num_moe_blocks * (rows * model_cfg.d_model + padding * (per_row - model_cfg.d_model)) * b)


def _dropless_worst_case_bytes(model_cfg: ModelConfig, moe_cfg: MoEConfig, ep_size: int, b: int,
                               tokens: int) -> int:
    """Dropless, the experts of one rank may receive every assignment of the EP group
    (ep * k * T rows instead of k * T): the extra rows' activations and exchange buffers."""
    if moe_cfg.capacity_factor is not None or model_cfg.num_moe_blocks == 0 or ep_size == 1:
        return 0
    extra_rows = (ep_size - 1) * moe_cfg.top_k * tokens
    per_row = 4 * model_cfg.d_model + _mlp_mult(moe_cfg.activation) * moe_cfg.d_ff
    return int(model_cfg.num_moe_blocks * extra_rows * per_row * b)
