"""The only place that calls ``deepspeed.initialize``.

DeepSpeed turns on expert-aware gradient reduction only for modules that are instances
of ``deepspeed.moe.layer.MoE`` (``has_moe_layers`` in its engine). Our ``MoELayer`` is a
layer of its own, so without help DeepSpeed would average different experts' gradients
over all ranks, silently (MOE_REFERENCE.md, "DeepSpeed facts"). ``make_visible_to_deepspeed``
re-classes each MoE layer in place as a subclass of both (no wrapper: parameter names and
our forward stay as they are), and ``register_deepspeed_groups`` puts OUR expert groups
(``parallel/groups.py``) in DeepSpeed's group registry, so DeepSpeed reduces over the very
groups our all-to-all runs over and creates no second copy of them (a copy is a second
set of communicators on every rank); ``check_deepspeed_groups`` verifies it rank by rank.

Then, per ZeRO stage (tested in tests/test_engine.py):
  dense gradients   averaged over all ranks;
  expert gradients  summed over the expert-data-parallel group, divided by the world
                    size (DeepSpeed's ``_reduce_expert_gradients``, our ``parallel/grads``);
  clipping          ZeRO 1/2: DeepSpeed's norm (its expert partitions are summed over the
                    whole world, which counts every expert once: tested equal to the
                    single-process norm). ZeRO 0: DeepSpeed's ``clip_grad_norm_`` averages
                    each rank's local norm over the world, which mixes different experts
                    (DeepSpeed #8475), so at stage 0 DeepSpeed's clipping is switched off
                    and ``moe_train.parallel.grads.clip_grad_norm_`` clips instead.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_train.config import Config, OptimConfig, deepspeed_config
from moe_train.model.sizing import with_bucket_default
from moe_train.moe.layer import MoELayer
from moe_train.parallel.groups import ParallelGroups

log = logging.getLogger("moe_train.engine")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.dtype


# ----------------------------------------------------------- DeepSpeed sees our layers


def _deepspeed_moe_class():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class DeepSpeedVisibleMoELayer(MoELayer, DeepSpeedMoE):
        """Our MoE layer, recognised by DeepSpeed as MoE. The forward is ours
        (MoELayer comes first in the MRO); DeepSpeed's constructor never runs."""

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """Called by ``deepspeed.initialize``; where DeepSpeed's own layer creates its
            expert groups. Ours are registered already (``register_deepspeed_groups``)."""
            import torch.distributed as dist
            from deepspeed.utils import groups as ds_groups

            if use_data_before_expert_parallel_:
                raise ValueError("deepspeed.use_data_before_expert_parallel_ changes DeepSpeed's "
                                 "expert layout away from moe_train's topology; remove it")
            if self.expert_group_name in ds_groups._get_expert_parallel_group_dict():
                return
            if dist.get_world_size() > 1:
                raise RuntimeError(f"DeepSpeed's group registry holds no {self.expert_group_name} groups: "
                                   "register_deepspeed_groups must run before deepspeed.initialize, "
                                   "or DeepSpeed would create a second copy of moe_train's groups")
            ds_groups._create_expert_and_data_parallel(self.ep_size)  # one process: groups of one

    return DeepSpeedVisibleMoELayer


def make_visible_to_deepspeed(model: nn.Module, ep_size: int) -> list[str]:
    """Re-classes every ``MoELayer`` of ``model`` so DeepSpeed treats it as MoE; sets the
    attributes DeepSpeed reads (``num_experts``, ``ep_size``, ``expert_group_name``,
    ``num_local_experts``). Returns the names of the layers."""
    cls = _deepspeed_moe_class()
    names = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer) and not isinstance(module, cls):
            module.__class__ = cls
            module.num_experts = module.cfg.num_experts
            module.ep_size = ep_size
            module.expert_group_name = expert_group_name(ep_size)
            module.num_local_experts = module.num_local
            module.use_residual = False
            module.enable_expert_tensor_parallelism = False
            names.append(name)
    return names


def expert_group_name(ep_size: int) -> str:
    """The key DeepSpeed files expert groups under (``deepspeed.utils.groups``)."""
    return f"ep_size_{ep_size}"


def _deepspeed_expert_registries() -> tuple[dict, dict, dict, dict]:
    """DeepSpeed 0.19's expert group registry: this rank's EP group and its ranks, this
    rank's EDP group and its ranks, each a dict keyed by ``expert_group_name``. Every
    DeepSpeed reader (``_get_expert_parallel_group``, ``_get_expert_data_parallel_group``,
    their ``_ranks``/``_rank``/``_world_size`` variants, ``_get_max_expert_size_name``,
    the engine's ``expert_parallel_group`` dicts) reads these four."""
    from deepspeed.utils import groups as ds_groups

    return (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
            ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS)


def register_deepspeed_groups(groups: ParallelGroups) -> None:
    """Files this rank's EP and EDP groups (made once, by ``build_groups``) in DeepSpeed's
    registry under ``expert_group_name(ep)``, so ``deepspeed.initialize`` finds them and
    creates none of its own (``set_deepspeed_parallelism``). Call it on every rank before
    ``deepspeed.initialize``.

    The registry is emptied first: DeepSpeed names checkpoint files by the largest ep
    registered (``_get_max_expert_size_name``), and a process that built an engine before
    (``ckpt convert`` then training, a test) would otherwise keep groups of a process group
    destroyed since. A single process holds no groups of ours; DeepSpeed then makes its
    groups of one rank itself."""
    ep_groups, ep_ranks, edp_groups, edp_ranks = registries = _deepspeed_expert_registries()
    for registry in registries:
        registry.clear()  # in place: DeepSpeed's readers hold these very dicts
    topo = groups.topology
    if topo.world_size == 1:
        return
    assert groups.ep_block is not None and groups.edp is not None, "groups not made by build_groups"
    name = expert_group_name(topo.ep_size)
    ep_groups[name], ep_ranks[name] = groups.ep_block, topo.ep_group_of(groups.rank)
    edp_groups[name], edp_ranks[name] = groups.edp, topo.edp_group_of(groups.rank)


def check_deepspeed_groups(groups: ParallelGroups) -> None:
    """DeepSpeed's expert-parallel and expert-data-parallel groups must be exactly ours:
    the same rank lists (this rank's view) and the same process group objects (not a
    copy), and no other expert groups registered beside them. Raises RuntimeError naming
    the difference."""
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    topo = groups.topology
    if topo.world_size == 1:
        return
    name = expert_group_name(topo.ep_size)
    views = {"expert-parallel": (ds_groups._get_expert_parallel_group(name), groups.ep_block,
                                 topo.ep_group_of(groups.rank)),
             "expert-data-parallel": (ds_groups._get_expert_data_parallel_group(name), groups.edp,
                                      topo.edp_group_of(groups.rank))}
    for kind, (theirs, ours, ranks) in views.items():
        got = sorted(dist.get_process_group_ranks(theirs))
        if got != ranks:
            raise RuntimeError(f"rank {groups.rank}: DeepSpeed's {kind} group {got} differs from "
                               f"moe_train's {ranks}")
        if theirs is not ours:
            raise RuntimeError(f"rank {groups.rank}: DeepSpeed's {kind} group {got} is a copy of "
                               "moe_train's, a second set of communicators; it should be moe_train's own")
    registered = sorted(ds_groups._get_expert_parallel_group_dict())
    if registered != [name]:
        raise RuntimeError(f"rank {groups.rank}: DeepSpeed holds expert groups {registered}; "
                           f"moe_train registered {name} only")


# ------------------------------------------------------------------ optimizer groups


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """No weight decay on norms, biases (1-D tensors) and the router."""
    return param.dim() < 2 or ".router." in name


def optimizer_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight-decay groups, then each split into dense and expert groups the way
    DeepSpeed's ZeRO recognises (``split_params_into_different_moe_groups_for_optimizer``:
    expert groups carry ``moe: True`` and the expert group name)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if is_no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def resolve_optim_impl(impl: str, device: torch.device) -> str:
    """The one place ``optim.impl: auto`` is resolved: ``fused`` on CUDA, ``foreach``
    elsewhere (CPU: torch has a fused CPU AdamW, but the issue asks for foreach there).
    Explicit values are returned as given."""
    if impl != "auto":
        return impl
    return "fused" if device.type == "cuda" else "foreach"


# optim.impl -> torch.optim.AdamW flags. The batched kernels need not round like the
# loop, nor alike on every layout (a ZeRO partition changes the tensors one launch sees):
# fused on CPU moved the tiny run's losses by ~1e-7 relative; foreach on CPU matched the
# loop bitwise, CUDA's multi-tensor kernels need not. The loop is the same per-tensor
# arithmetic on every layout, which the bitwise parity tests pin (tests/engine_harness.py).
_ADAMW_FLAGS = {"fused": {"fused": True, "foreach": False},
                "foreach": {"foreach": True},
                "loop": {"foreach": False}}


def build_optimizer(param_groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` with the kernel ``optim.impl`` resolves to on ``device``:
    the client optimizer that DeepSpeed's ZeRO 1/2 wraps (it steps the flat fp32
    partitions with it; fused, foreach and loop all train there, tests/test_optim_impl.py).
    torch 2.13 has a fused AdamW on CPU too, so an explicit ``fused`` is honoured there."""
    impl = resolve_optim_impl(cfg.impl, device)
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, **_ADAMW_FLAGS[impl])
    optimizer.register_load_state_dict_pre_hook(_keep_kernel_flags)
    return optimizer


def _keep_kernel_flags(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """torch's ``load_state_dict`` takes each group's hyper-parameters from the checkpoint,
    ``fused`` and ``foreach`` included, so a resume would run the kernel the checkpoint
    was written with, not ``optim.impl``. The configured flags win; set before torch reads
    them, so a fused optimizer also gets its ``step`` tensors on the parameters' device."""
    flags = {key: optimizer.defaults[key] for key in ("fused", "foreach")}
    state_dict["param_groups"] = [{**group, **flags} for group in state_dict["param_groups"]]
    return state_dict


# -------------------------------------------------------------------- DeepSpeed config


def merged_deepspeed_config(cfg: Config, world_size: int) -> dict:
    """Our derived DeepSpeed config with the ``deepspeed:`` passthrough section merged in.
    Derived keys win; a passthrough key that sets one of them to another value is an
    error naming both (checked again in ``config.validate``).

    At ZeRO 1 and 2 ``zero_optimization.reduce_bucket_size`` defaults to the gradient
    elements one rank reduces (``sizing.reduce_bucket_default``) instead of DeepSpeed's
    5e8, which it allocates in full at every backward (2 GB in fp32 for any model); the
    passthrough's value, when set, is used as given."""
    ds = with_bucket_default(deepspeed_config(cfg, world_size), cfg.model, cfg.moe,
                             cfg.parallel.expert_parallel_size)
    if cfg.parallel.zero_stage == 0:
        ds["gradient_clipping"] = 0.0  # ZeRO-0: moe_train clips (module docstring)
    return ds


@dataclass
class Engine:
    """What the loop needs of DeepSpeed.

    Attributes:
        ds: the DeepSpeed engine (``ds.module`` is the model).
        own_clipping: True at ZeRO 0, where moe_train clips and measures the norm.
        ds_config: the config DeepSpeed was given.
    """

    ds: Any
    own_clipping: bool
    ds_config: dict

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def optimizer(self):
        return self.ds.optimizer


def build_engine(cfg: Config, model: nn.Module, groups: ParallelGroups) -> Engine:
    """Wraps ``model`` (already on its device, weights initialised) in a DeepSpeed engine
    with AdamW, ZeRO ``parallel.zero_stage`` and our expert groups."""
    import deepspeed

    topo = groups.topology
    moe_layers = make_visible_to_deepspeed(model, topo.ep_size)
    param_groups = optimizer_param_groups(model, cfg.optim)
    device = next(model.parameters()).device
    optimizer = build_optimizer(param_groups, cfg.optim, device)
    ds_config = merged_deepspeed_config(cfg, topo.world_size)
    if moe_layers:  # DeepSpeed wants expert groups only for a model with MoE layers
        register_deepspeed_groups(groups)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=copy.deepcopy(ds_config), dist_init_required=False)
    if moe_layers:
        check_deepspeed_groups(groups)
    return Engine(engine, own_clipping=cfg.parallel.zero_stage == 0, ds_config=ds_config)


def set_lr(engine: Engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr

