"""Typed configuration: one dataclass per concern, YAML only as storage.

A run is described by a YAML file with the sections below. Every key is typed and
checked; an unknown key, a wrong type or a bad value raises ``ValueError`` naming the
dotted key and the value, e.g. ``moe.top_k = 9: must be <= moe.num_experts (8)``.

    cfg = load_config("configs/tiny_moe.yaml", overrides=["moe.top_k=2"])
    validate(cfg, world_size=4)          # cross-section checks needing the world size
    ds = deepspeed_config(cfg, world_size=4)

Components take their own section only (``MoELayer(cfg.moe, ...)``), never the whole
config object. The sections with a package of their own live there (``model/config.py``,
``moe/config.py``, ``data/config.py``); this file composes them with the run's own
sections (parallel, optim, train, checkpoint, logging) and imports nothing above them.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from moe_train.config_checks import choice, fail
from moe_train.data.config import DataConfig
from moe_train.model.config import ModelConfig
from moe_train.moe.config import MoEConfig
from moe_train.parallel.phase import Budgets

DTYPES = ("fp32", "bf16", "fp16")
BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ParallelConfig:
    """How ranks are arranged. Data parallelism spans the whole world; expert
    parallelism splits each data-parallel group's experts over ``expert_parallel_size``."""

    expert_parallel_size: int = 1
    zero_stage: int = 1
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    # Watchdog budgets per phase (moe_train.parallel.phase): longer than any healthy
    # phase of that kind, so a hang becomes an error naming the rank, step and phase.
    timeout_s: int = 600  # one training step (its collectives included)
    startup_timeout_s: int = 1800  # rendezvous, model build, op compilation, checkpoint load
    eval_timeout_s: int = 1800  # one evaluation (train.eval_steps batches, or the whole split)
    save_timeout_s: int = 1800  # one checkpoint save (engine + canonical)

    def budgets(self) -> Budgets:
        """The watchdog's ``Budgets``; the process group's timeout is their maximum."""
        return Budgets(startup=self.startup_timeout_s, step=self.timeout_s, eval=self.eval_timeout_s,
                       save=self.save_timeout_s)

    def validate(self) -> None:
        if self.expert_parallel_size < 1:
            fail("parallel.expert_parallel_size", self.expert_parallel_size, "must be >= 1")
        if self.zero_stage not in (0, 1, 2):
            fail("parallel.zero_stage", self.zero_stage,
                 "must be 0, 1 or 2: ZeRO-3 would shard expert weights over all ranks, which "
                 "DeepSpeed refuses for MoE layers (and would silently mix for ours); use "
                 "zero_stage 2 with parallel.expert_parallel_size up to the world size to spread "
                 "experts, gradients and optimizer state")
        choice("parallel.backend", self.backend, BACKENDS)
        choice("parallel.device", self.device, DEVICES)
        for name in ("timeout_s", "startup_timeout_s", "eval_timeout_s", "save_timeout_s"):
            if getattr(self, name) <= 0:
                fail(f"parallel.{name}", getattr(self, name), "must be > 0 seconds")


OPTIM_IMPLS = ("auto", "fused", "foreach", "loop")  # optim.impl


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
    # AdamW kernel: fused (one kernel for all tensors), foreach (batched over tensors) or
    # loop (one tensor at a time: the same arithmetic on every layout, for parity tests).
    # auto: fused on CUDA, foreach elsewhere; resolved from the engine's device
    # (train.engine.resolve_optim_impl).
    impl: str = "auto"

    def validate(self) -> None:
        if not self.lr > 0:
            fail("optim.lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            fail("optim.min_lr", self.min_lr, f"must be in [0, optim.lr = {self.lr}]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                fail(f"optim.{name}", getattr(self, name), "must be in [0, 1)")
        for name in ("weight_decay", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                fail(f"optim.{name}", getattr(self, name), "must be >= 0")
        if not self.eps > 0:
            fail("optim.eps", self.eps, "must be > 0")
        choice("optim.decay", self.decay, ("cosine", "linear", "constant"))  # schedule.SCHEDULES
        choice("optim.impl", self.impl, OPTIM_IMPLS)


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
                fail(f"train.{name}", getattr(self, name), "must be > 0")
        for name in ("eval_every", "eval_steps"):
            if getattr(self, name) < 0:
                fail(f"train.{name}", getattr(self, name), "must be >= 0")
        if self.exit_before_time_limit_min < 0:
            fail("train.exit_before_time_limit_min", self.exit_before_time_limit_min, "must be >= 0 minutes")
        if self.global_batch_size is not None and self.global_batch_size <= 0:
            fail("train.global_batch_size", self.global_batch_size, "must be > 0 (or null)")
        choice("train.dtype", self.dtype, DTYPES)


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
    # A failed save (full disk, read-only mount) is reported and training goes on; this
    # many failures in a row stop the run, naming the last good checkpoint. A failed
    # final save always ends the run non-zero.
    max_failed_saves: int = 3

    def validate(self) -> None:
        if self.canonical_every_steps < 0:
            fail("checkpoint.canonical_every_steps", self.canonical_every_steps, "must be >= 0")
        if not self.dir:
            fail("checkpoint.dir", self.dir, "must be a non-empty path")
        if self.every_steps < 0:
            fail("checkpoint.every_steps", self.every_steps, "must be >= 0")
        if self.keep_last < 1:
            fail("checkpoint.keep_last", self.keep_last, "must be >= 1")
        if self.max_failed_saves < 1:
            fail("checkpoint.max_failed_saves", self.max_failed_saves, "must be >= 1")


def default_run_name(stem: str = "run") -> str:
    """``<stem>-<start time>``: the TensorBoard run folder of a run that names none."""
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class LoggingConfig:
    # TensorBoard: every run writes into <dir>/<run_name>, so `tensorboard --logdir <dir>`
    # shows the runs side by side. run_name "" (the default): the config file's stem plus
    # the start time (load_config fills it in). A resumed run continues the folder its
    # checkpoint recorded, whatever this says.
    dir: str = "runs"
    run_name: str = ""
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
            fail("logging.every_steps", self.every_steps, "must be > 0")
        if "/" in self.run_name or "\\" in self.run_name or self.run_name in (".", ".."):
            fail("logging.run_name", self.run_name, "must be a folder name (no path), or empty")
        if self.dead_expert_steps < 0:
            fail("logging.dead_expert_steps", self.dead_expert_steps, "must be >= 0 (0: no alarm)")
        if self.max_drop_frac is not None and not 0 <= self.max_drop_frac < 1:
            fail("logging.max_drop_frac", self.max_drop_frac, "must be in [0, 1), or null (no alarm)")
        if self.peak_flops is not None and not self.peak_flops > 0:
            fail("logging.peak_flops", self.peak_flops, "must be > 0 FLOP/s (or null)")


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
            fail("data.seq_len", self.data.seq_len,
                 f"must be <= model.max_seq_len ({self.model.max_seq_len})")


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
            fail(key, value, "must be a list")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            fail(key, value, "must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, value, "must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail(key, value, "must be a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, value, "must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            fail(key, value, "must be a string")
        return value
    raise AssertionError(f"unsupported config annotation {annotation!r} for {key}")


def _build_section(cls: type, name: str, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        fail(name, raw, "must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        fail(f"{name}.{unknown[0]}", raw[unknown[0]],
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
        fail("deepspeed", passthrough, "must be a mapping of DeepSpeed config keys")
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
        cfg = config_from_dict(raw)
    except ValueError as err:
        where = f"config file {path}: " if path is not None else ""
        raise ValueError(f"{where}{err}") from None
    if not cfg.logging.run_name:
        cfg.logging.run_name = default_run_name(path.stem if path is not None else "run")
    return cfg


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
        fail("train.global_batch_size", want,
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
# (a pure function of the step, moe_train.train.schedule) are built from the optim section.
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
