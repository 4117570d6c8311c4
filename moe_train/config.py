"""Typed configuration: one dataclass per concern, YAML only as storage.

A run is described by a YAML file with the sections below. Every key is typed and
checked; an unknown key, a wrong type or a bad value raises ``ValueError`` naming the
dotted key and the value, e.g. ``moe.top_k = 9: must be <= moe.num_experts (8)``.

    cfg = load_config("configs/tiny.yaml", overrides=["moe.top_k=2"])
    validate(cfg, world_size=4)          # cross-section checks needing the world size
    ds = deepspeed_config(cfg, world_size=4)

Components take their own section only (``MoELayer(cfg.moe, ...)``), never the whole
config object.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from moe_train.data.config import DataConfig

ACTIVATIONS = ("gelu", "relu", "swiglu")
DROP_POLICIES = ("position", "probs")
BALANCE_SCOPES = ("local", "global")
DTYPES = ("fp32", "bf16", "fp16")
EXPERT_IMPLS = ("auto", "grouped_mm", "bmm")  # moe_train.moe.experts.IMPLS
SCORE_FUNCS = ("softmax", "sigmoid")
SHARED_GATES = ("none", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")
DISPATCH_MODES = ("per_assignment", "once_per_rank")
BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cpu", "cuda")


def _fail(key: str, value: Any, why: str) -> None:
    raise ValueError(f"{key} = {value!r}: {why}")


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
    attention_impl: str = "auto"  # auto: flex_attention where it runs, else SDPA + a mask
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
                _fail(f"model.{name}", getattr(self, name), "must be > 0")
        if self.d_model % self.num_heads:
            _fail("model.d_model", self.d_model, f"must be divisible by model.num_heads ({self.num_heads})")
        if self.num_kv_heads is not None and not (
                self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0):
            _fail("model.num_kv_heads", self.num_kv_heads,
                  f"must be >= 1 and divide model.num_heads ({self.num_heads}), or null")
        _choice("model.mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
        _choice("model.norm", self.norm, NORMS)
        _choice("model.position", self.position, POSITIONS)
        if self.position == "rope" and self.head_dim % 2:
            _fail("model.position", self.position,
                  f"rope needs an even head dim, got d_model / num_heads = {self.head_dim}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                _fail(f"model.{name}", value, "must be > 0")
        if self.moe_every < 0:
            _fail("model.moe_every", self.moe_every, "must be >= 0 (0 disables MoE)")
        if not 0 <= self.first_dense_layers <= self.num_layers:
            _fail("model.first_dense_layers", self.first_dense_layers,
                  f"must be in [0, model.num_layers = {self.num_layers}]")
        if not 0.0 <= self.dropout < 1.0:
            _fail("model.dropout", self.dropout, "must be in [0, 1)")
        self._validate_options()

    def _validate_options(self) -> None:
        if self.embed_dim is not None and not 0 < self.embed_dim <= self.d_model:
            _fail("model.embed_dim", self.embed_dim, f"must be in (0, model.d_model = {self.d_model}], or null")
        _choice("model.share_layers", self.share_layers, SHARE_LAYERS)
        if self.share_group_size < 0 or (self.share_group_size and self.num_layers % self.share_group_size):
            _fail("model.share_group_size", self.share_group_size,
                  f"must be 0 (one group) or divide model.num_layers ({self.num_layers})")
        _choice("model.attention", self.attention, ATTENTIONS)
        _choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
        if self.attention_impl == "flex" and self.dropout > 0:
            _fail("model.attention_impl", self.attention_impl, f"flex_attention has no attention dropout: "
                  f"set model.dropout = 0 (got {self.dropout}), or use sdpa or auto")
        if self.attention != "full" and self.window < 1:
            _fail("model.window", self.window, f"must be >= 1 for model.attention = {self.attention}")
        if self.global_tokens < 0 or (self.global_tokens and self.attention != "longformer"):
            _fail("model.global_tokens", self.global_tokens, "must be >= 0, and is used by "
                  "model.attention = longformer only")
        _choice("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_scaling != "none":
            if self.position != "rope":
                _fail("model.rope_scaling", self.rope_scaling, f"needs model.position = rope, got {self.position!r}")
            if not self.rope_scaling_factor >= 1.0:
                _fail("model.rope_scaling_factor", self.rope_scaling_factor, "must be >= 1")
        if self.rope_original_max_len is not None and self.rope_original_max_len <= 0:
            _fail("model.rope_original_max_len", self.rope_original_max_len, "must be > 0 or null")

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


@dataclass
class MoEConfig:
    """One MoE layer: routing, capacity, losses, experts. Semantics: MOE_REFERENCE.md."""

    num_experts: int = 8
    top_k: int = 1
    d_ff: int = 2048  # expert hidden width F
    activation: str = "gelu"
    capacity_factor: Optional[float] = 1.25  # training; null = dropless
    eval_capacity_factor: Optional[float] = 2.0  # evaluation; null = dropless
    min_capacity: int = 4
    drop_policy: str = "position"
    normalize_topk: Optional[bool] = None  # None: on for top_k > 1, off for top_k = 1
    jitter_eps: float = 0.0  # multiplicative router-input jitter in training (Switch: 1e-2)
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    balance_scope: str = "local"
    expert_impl: str = "auto"
    seed: int = 1234  # expert weights are seeded by (seed, global expert id)
    # Scores, gates and scale (MOE_REFERENCE.md "Score functions, gates and scale").
    score_func: str = "softmax"  # or sigmoid (DeepSeek-V3)
    route_scale: float = 1.0  # multiplies the gates after normalize_topk (DeepSeek-V3: 2.5)
    # Shared experts: one dense FFN of this width beside the routed ones (0 = none).
    shared_d_ff: int = 0
    shared_gate: str = "none"  # none (DeepSeek) or sigmoid: one fp32 scalar per token (Qwen)
    # Selection bias (auxiliary-loss-free balancing): rate u of the per-step sign update.
    bias_update_rate: float = 0.0  # 0 = off; DeepSeek-V3 1e-3
    bias_freeze_step: Optional[int] = None  # no bias update after this optimizer step
    seq_balance_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss (1e-4)
    # Group-limited routing: each token picks among the experts of its best groups.
    num_groups: int = 1  # 1 = off
    groups_per_token: int = 1
    group_score: str = "top2_sum"  # or max (DeepSeek-V2)
    # per_assignment: one row per kept assignment in the all-to-all; once_per_rank: one
    # row per (token, destination rank), expanded there (k > 1 with ep > 1 only).
    dispatch: str = "per_assignment"

    def validate(self) -> None:
        if self.num_experts < 1:
            _fail("moe.num_experts", self.num_experts, "must be >= 1")
        if not 1 <= self.top_k <= min(8, self.num_experts):
            _fail("moe.top_k", self.top_k,
                  f"must be between 1 and min(8, moe.num_experts = {self.num_experts})")
        if self.d_ff <= 0:
            _fail("moe.d_ff", self.d_ff, "must be > 0")
        _choice("moe.activation", self.activation, ACTIVATIONS)
        _choice("moe.drop_policy", self.drop_policy, DROP_POLICIES)
        _choice("moe.balance_scope", self.balance_scope, BALANCE_SCOPES)
        _choice("moe.expert_impl", self.expert_impl, EXPERT_IMPLS)
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                _fail(f"moe.{name}", value, "must be > 0, or null for dropless routing")
        if self.min_capacity < 0:
            _fail("moe.min_capacity", self.min_capacity, "must be >= 0")
        if not 0.0 <= self.jitter_eps < 1.0:
            _fail("moe.jitter_eps", self.jitter_eps, "must be in [0, 1)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                _fail(f"moe.{name}", getattr(self, name), "must be >= 0")
        self._validate_routing_options()

    def _validate_routing_options(self) -> None:
        """Score function, shared experts, selection bias, groups, dispatch."""
        _choice("moe.score_func", self.score_func, SCORE_FUNCS)
        _choice("moe.shared_gate", self.shared_gate, SHARED_GATES)
        _choice("moe.group_score", self.group_score, GROUP_SCORES)
        _choice("moe.dispatch", self.dispatch, DISPATCH_MODES)
        if not (self.route_scale > 0 and math.isfinite(self.route_scale)):
            _fail("moe.route_scale", self.route_scale, "must be > 0")
        if self.shared_d_ff < 0:
            _fail("moe.shared_d_ff", self.shared_d_ff, "must be >= 0 (0 = no shared expert)")
        if self.shared_gate != "none" and self.shared_d_ff == 0:
            _fail("moe.shared_gate", self.shared_gate, "needs a shared expert (moe.shared_d_ff > 0)")
        for name in ("bias_update_rate", "seq_balance_coef"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                _fail(f"moe.{name}", value, "must be >= 0")
        if self.bias_freeze_step is not None and self.bias_freeze_step < 0:
            _fail("moe.bias_freeze_step", self.bias_freeze_step, "must be >= 0, or null (never frozen)")
        E, G, M = self.num_experts, self.num_groups, self.groups_per_token
        if G < 1 or E % G:
            _fail("moe.num_groups", G, f"must be >= 1 and divide moe.num_experts ({E})")
        if M < 1:
            _fail("moe.groups_per_token", M, "must be >= 1")
        if M > G:
            _fail("moe.groups_per_token", M, f"must be <= moe.num_groups ({G})")
        if M * (E // G) < self.top_k:
            _fail("moe.groups_per_token", M,
                  f"keeps {M} x {E // G} = {M * (E // G)} experts per token (moe.num_experts / "
                  f"moe.num_groups = {E // G} per group), fewer than moe.top_k ({self.top_k})")
        if G > 1 and self.group_score == "top2_sum" and E // G < 2:
            _fail("moe.group_score", self.group_score,
                  f"needs at least 2 experts per group (moe.num_experts / moe.num_groups = {E // G}); "
                  f"use max")

    @property
    def has_bias(self) -> bool:
        """Whether the routers hold a selection bias (``expert_bias``)."""
        return self.bias_update_rate > 0

    @property
    def renormalize(self) -> bool:
        """Whether the k gate weights are renormalised to sum to one."""
        return self.top_k > 1 if self.normalize_topk is None else self.normalize_topk


@dataclass
class ParallelConfig:
    """How ranks are arranged. Data parallelism spans the whole world; expert
    parallelism splits each data-parallel group's experts over ``expert_parallel_size``."""

    expert_parallel_size: int = 1
    zero_stage: int = 1
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    timeout_s: int = 600  # collective timeout; a hang becomes an error naming the rank

    def validate(self) -> None:
        if self.expert_parallel_size < 1:
            _fail("parallel.expert_parallel_size", self.expert_parallel_size, "must be >= 1")
        if self.zero_stage not in (0, 1, 2):
            _fail("parallel.zero_stage", self.zero_stage,
                  "must be 0, 1 or 2: ZeRO-3 would shard expert weights over all ranks, which "
                  "DeepSpeed refuses for MoE layers (and would silently mix for ours); use "
                  "zero_stage 2 with parallel.expert_parallel_size up to the world size to spread "
                  "experts, gradients and optimizer state")
        _choice("parallel.backend", self.backend, BACKENDS)
        _choice("parallel.device", self.device, DEVICES)
        if self.timeout_s <= 0:
            _fail("parallel.timeout_s", self.timeout_s, "must be > 0 seconds")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables
    warmup_steps: int = 100
    decay: str = "cosine"  # after warm-up, to min_lr at train.max_steps: cosine, linear, constant

    def validate(self) -> None:
        if not self.lr > 0:
            _fail("optim.lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            _fail("optim.min_lr", self.min_lr, f"must be in [0, optim.lr = {self.lr}]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(f"optim.{name}", getattr(self, name), "must be in [0, 1)")
        for name in ("weight_decay", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                _fail(f"optim.{name}", getattr(self, name), "must be >= 0")
        if not self.eps > 0:
            _fail("optim.eps", self.eps, "must be > 0")
        _choice("optim.decay", self.decay, ("cosine", "linear", "constant"))  # schedule.SCHEDULES


@dataclass
class TrainConfig:
    # Sequence length and micro-batch size live in the data section (data.seq_len,
    # data.micro_batch_size): the loader and the batch arithmetic read the same values.
    grad_accum_steps: int = 1
    max_steps: int = 1000
    eval_every: int = 0  # 0: no evaluation
    eval_steps: int = 10
    seed: int = 1234
    dtype: str = "fp32"
    # Optional cross-check: when set, must equal micro_batch_size x grad_accum_steps x world.
    global_batch_size: Optional[int] = None
    activation_checkpointing: bool = False  # recompute each block in backward
    max_skipped_in_a_row: int = 5  # non-finite steps skipped in a row before the run stops
    # Under Slurm: stop and checkpoint this many minutes before the job's time limit (0: off).
    exit_before_time_limit_min: float = 0.0
    # A routing alarm (logging.dead_expert_steps, logging.max_drop_frac) stops the run
    # with a checkpoint and an error naming the layer and experts.
    stop_on_routing_alarm: bool = False
    # Bit-identical reruns with the same seed and layout (CPU); on CUDA it also turns on
    # PyTorch's deterministic algorithms and names the ops that could not comply.
    deterministic: bool = False

    def validate(self) -> None:
        for name in ("grad_accum_steps", "max_steps", "max_skipped_in_a_row"):
            if getattr(self, name) <= 0:
                _fail(f"train.{name}", getattr(self, name), "must be > 0")
        for name in ("eval_every", "eval_steps"):
            if getattr(self, name) < 0:
                _fail(f"train.{name}", getattr(self, name), "must be >= 0")
        if self.exit_before_time_limit_min < 0:
            _fail("train.exit_before_time_limit_min", self.exit_before_time_limit_min, "must be >= 0 minutes")
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            _fail("train.global_batch_size", self.global_batch_size, "must be > 0 (or null)")
        _choice("train.dtype", self.dtype, DTYPES)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    every_steps: int = 0  # 0: only at the end and on preemption
    keep_last: int = 2
    # Also write the layout-free canonical checkpoint (any world size / ep) every n
    # steps and at the end; 0: off (convert later with `moe-train ckpt canonical`).
    canonical_every_steps: int = 0
    # A resume on another layout from an engine checkpoint that has no canonical one:
    # false (default) refuses, naming `moe-train ckpt canonical`; true loads the weights
    # and starts AdamW's moments and step from zero (warned).
    fresh_optimizer_on_new_layout: bool = False

    def validate(self) -> None:
        if self.canonical_every_steps < 0:
            _fail("checkpoint.canonical_every_steps", self.canonical_every_steps, "must be >= 0")
        if not self.dir:
            _fail("checkpoint.dir", self.dir, "must be a non-empty path")
        if self.every_steps < 0:
            _fail("checkpoint.every_steps", self.every_steps, "must be >= 0")
        if self.keep_last < 1:
            _fail("checkpoint.keep_last", self.keep_last, "must be >= 1")


@dataclass
class LoggingConfig:
    dir: str = "runs"
    every_steps: int = 10
    tensorboard: bool = True
    # FLOP/s per rank that perf/mfu divides by; null: a datasheet value on known GPUs,
    # else measured once at start-up (a matmul benchmark, the CPU's achievable peak).
    peak_flops: Optional[float] = None
    # Routing alarms, checked on log steps: an expert that received no token (any rank,
    # any micro-batch) for this many steps (0: off) ...
    dead_expert_steps: int = 100
    # ... or a drop fraction over the last log window above this (null: off).
    max_drop_frac: Optional[float] = 0.5

    def validate(self) -> None:
        if self.every_steps <= 0:
            _fail("logging.every_steps", self.every_steps, "must be > 0")
        if self.dead_expert_steps < 0:
            _fail("logging.dead_expert_steps", self.dead_expert_steps, "must be >= 0 (0: no alarm)")
        if self.max_drop_frac is not None and not 0 <= self.max_drop_frac < 1:
            _fail("logging.max_drop_frac", self.max_drop_frac, "must be in [0, 1), or null (no alarm)")
        if self.peak_flops is not None and not self.peak_flops > 0:
            _fail("logging.peak_flops", self.peak_flops, "must be > 0 FLOP/s (or null)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Extra DeepSpeed config keys, merged into the derived config (derived keys win; a
    # passthrough value that contradicts one is an error). Not typed: DeepSpeed's own.
    deepspeed: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Checks each section on its own, then the ones that span sections."""
        for f in dataclasses.fields(self):
            if f.name != "deepspeed":
                getattr(self, f.name).validate()
        if self.data.seq_len > self.model.max_seq_len:
            _fail("data.seq_len", self.data.seq_len,
                  f"must be <= model.max_seq_len ({self.model.max_seq_len})")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(key, value, f"must be one of {', '.join(map(str, allowed))}")


# --------------------------------------------------------------------------- loading


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Checks ``value`` against a field's type annotation, with the YAML-friendly
    widenings int -> float; returns the value to store."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        if not isinstance(value, list):
            _fail(key, value, "must be a list")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(key, value, "must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                _fail(key, value, "must be a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, value, "must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            _fail(key, value, "must be a string")
        return value
    raise AssertionError(f"unsupported config annotation {annotation!r} for {key}")


def _build_section(cls: type, name: str, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(name, raw, "must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        _fail(f"{name}.{unknown[0]}", raw[unknown[0]],
              f"unknown key; known keys of '{name}': {', '.join(sorted(known))}")
    kwargs = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in raw.items()}
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    """Builds and validates a ``Config`` from nested plain data (parsed YAML)."""
    if not isinstance(raw, dict):
        raise ValueError(f"config must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown config section; known sections: "
                         f"{', '.join(sections)}")
    passthrough = raw.get("deepspeed") or {}
    if not isinstance(passthrough, dict):
        _fail("deepspeed", passthrough, "must be a mapping of DeepSpeed config keys")
    cfg = Config(**{name: _build_section(hints[name], name, raw.get(name))
                    for name in sections if name != "deepspeed"}, deepspeed=passthrough)
    cfg.validate()
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"moe.top_k=2"`` -> (["moe", "top_k"], 2); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected section.key=value, e.g. moe.top_k=2")
    key, _, value = text.partition("=")
    path = key.strip().split(".")
    nested_ok = path[0] == "deepspeed" and len(path) >= 2  # deepspeed.zero_optimization.overlap_comm
    if not all(path) or (len(path) != 2 and not nested_ok):
        raise ValueError(f"--set {text!r}: key must be section.key, e.g. moe.top_k "
                         f"(or deepspeed.a.b.c for a DeepSpeed passthrough key)")
    return path, yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A deep copy of the config dict ``raw`` with ``--set section.key=value`` applied
    (``parse_override``; missing sections are created)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for part in keys[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[keys[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Loads a YAML config (or the defaults when ``path`` is None) and applies
    ``--set section.key=value`` overrides. Raises ValueError naming file and key."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path}: top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides)
    try:
        return config_from_dict(raw)
    except ValueError as err:
        where = f"config file {path}: " if path is not None else ""
        raise ValueError(f"{where}{err}") from None


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# ------------------------------------------------------------- world-size checks


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic for one world size. Every rank is a data-parallel rank (expert
    parallelism splits experts, not the batch)."""

    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def tokens_per_routing_group(self) -> int:
        """T of MOE_REFERENCE.md: one rank's micro-batch, flattened."""
        return self.micro_batch_size * self.seq_len


def validate(cfg: Config, world_size: int) -> BatchPlan:
    """Validates ``cfg`` for ``world_size`` ranks; returns the batch arithmetic.

    Raises ValueError naming the field when the world size and the config disagree.
    """
    cfg.validate()
    from moe_train.parallel.topology import Topology  # pure arithmetic, no torch.distributed

    Topology(world_size, cfg.parallel.expert_parallel_size, cfg.moe.num_experts)
    plan = BatchPlan(world_size, cfg.data.micro_batch_size, cfg.train.grad_accum_steps,
                     cfg.data.seq_len)
    want = cfg.train.global_batch_size
    if want is not None and want != plan.global_batch_size:
        _fail("train.global_batch_size", want,
              f"does not add up: data.micro_batch_size {plan.micro_batch_size} x "
              f"train.grad_accum_steps {plan.grad_accum_steps} x world size {world_size} = "
              f"{plan.global_batch_size}; change one of them (or set it to null)")
    _derived_deepspeed_config(cfg, plan)  # a passthrough key contradicting ours fails here
    return plan


def check_vocab_fits(cfg: Config, tokenizer_vocab: int) -> None:
    """The data's tokenizer must fit the model's embedding table."""
    if tokenizer_vocab > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size = {cfg.model.vocab_size}: the tokenizer of "
                         f"{cfg.data.manifest} has {tokenizer_vocab} tokens; raise it")


# DeepSpeed keys that moe_train owns outright: the client optimizer and the LR schedule
# (a pure function of the step, moe_train.schedule) are built from the optim section.
_OWNED_DEEPSPEED_KEYS = {"optimizer": "optim", "scheduler": "optim (lr, min_lr, warmup_steps, decay)"}


def _merge_passthrough(derived: dict, extra: dict, path: str = "deepspeed") -> dict:
    """``derived`` with ``extra`` merged in; a key both set to different values fails."""
    out = dict(derived)
    for key, value in extra.items():
        where = f"{path}.{key}"
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge_passthrough(out[key], value, where)
        elif out[key] != value:
            raise ValueError(f"{where} = {value!r}: conflicts with the value moe_train derives "
                             f"from its own config ({out[key]!r}); set it through moe_train's "
                             f"section instead (e.g. parallel.zero_stage, optim.grad_clip, "
                             f"train.dtype, data.micro_batch_size) or drop it")
    return out


def _derived_deepspeed_config(cfg: Config, plan: BatchPlan) -> dict:
    for key, section in _OWNED_DEEPSPEED_KEYS.items():
        if key in cfg.deepspeed:
            raise ValueError(f"deepspeed.{key}: moe_train builds the {key} from its {section} "
                             f"section; remove deepspeed.{key}")
    derived = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.train.dtype == "bf16"},
        "fp16": ({"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                  "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
                 if cfg.train.dtype == "fp16" else {"enabled": False}),
        "steps_per_print": 10 ** 9,  # moe_train logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    return _merge_passthrough(derived, cfg.deepspeed)


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config dict, derived from the typed config (never written by hand),
    with the ``deepspeed:`` passthrough section merged in (derived keys win; a conflict
    is a ValueError naming the key and both values). fp16 uses dynamic loss scaling
    (``loss_scale: 0``) starting at 2^16."""
    return _derived_deepspeed_config(cfg, validate(cfg, world_size))
