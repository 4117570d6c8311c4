"""Surgery on DeepSpeed's optimizer state: what the engine format stores of it, and the
fp32 master, moments and step of each parameter whatever DeepSpeed wrapped the AdamW in
(``OptimizerView``, read by the canonical format), with the fp16 loss scaler.

Every DeepSpeed import is inside a function, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from moe_train.checkpoint.state import CheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state besides the step


# ------------------------------------------------------------- the engine format's part


MASTERS_FROM_WEIGHTS = "moe_train_masters_from_weights"


def optimizer_state(optimizer) -> dict:
    """The optimizer's state dict for the rank file. Under ZeRO 1/2 with fp32 weights,
    DeepSpeed's "fp32 master" partitions are bit-for-bit copies of the weights the model
    files already hold (the optimizer step writes the master into the weight); saving
    them again made engine checkpoints a third larger than 12 bytes a parameter
    (benchmarks/checkpoint.py). They are left out and rebuilt from the weights on load,
    exactly. Under bf16/fp16 the masters carry more bits than the weights and are kept."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    state = optimizer.state_dict()
    if isinstance(optimizer, DeepSpeedZeroOptimizer) and all(
            p.dtype == torch.float32 for group in optimizer.bit16_groups for p in group):
        from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS

        state = dict(state)
        del state[SINGLE_PARTITION_OF_FP32_GROUPS]
        state[MASTERS_FROM_WEIGHTS] = True
    return state


def load_optimizer_state(optimizer, saved: dict, world: int) -> None:
    """Restores a DeepSpeed optimizer's state saved on the same layout. ZeRO 1/2 take a
    list indexed by data-parallel rank (only this rank's entry is read) and restore
    their fp32 master partitions from it, or, when ``optimizer_state`` left them out
    (fp32 weights), from the weights loaded before the engine was built; a plain
    optimizer takes the dict."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        from_weights = bool(saved.get(MASTERS_FROM_WEIGHTS))
        saved = {k: v for k, v in saved.items() if k != MASTERS_FROM_WEIGHTS}
        optimizer.load_state_dict([saved] * world, load_optimizer_states=True,
                                  load_from_fp32_weights=not from_weights)
    else:
        optimizer.load_state_dict(saved)


# ------------------------------------------------------------------- per-parameter access


class OptimizerView:
    """The fp32 master, moments and step of each model parameter, whatever DeepSpeed
    wrapped the AdamW in.

    ``flat`` (ZeRO 1/2, DeepSpeed's BF16 optimizer): the parameter has an ``_hp_mapping``
    into a flat fp32 partition; read and written through DeepSpeed's public accessors.
    ``per_param`` (ZeRO 0): a plain optimizer on the parameters themselves (fp32), or
    DeepSpeed's unfused fp16/bf16 wrapper with one fp32 master per parameter.
    """

    def __init__(self, optimizer, model: nn.Module):
        self.opt = optimizer
        if hasattr(optimizer, "bit16_groups") and hasattr(optimizer, "single_partition_of_fp32_groups"):
            self.kind, self.groups = "flat", list(zip(optimizer.bit16_groups,
                                                      optimizer.single_partition_of_fp32_groups))
        elif hasattr(optimizer, "bf16_groups") and hasattr(optimizer, "fp32_groups_flat_partition"):
            self.kind, self.groups = "flat", list(zip(optimizer.bf16_groups, optimizer.fp32_groups_flat_partition))
        elif hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups") \
                and not hasattr(optimizer, "fp32_groups_flat"):
            self.kind = "per_param"
            self.master_of = {id(lp): hp for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                              for lp, hp in zip(lps, hps)}
        elif isinstance(optimizer, torch.optim.Optimizer):
            self.kind = "per_param"
            self.master_of = {id(p): p for g in optimizer.param_groups for p in g["params"]}
        else:
            raise CheckpointError(f"canonical checkpoint: the optimizer {type(optimizer).__name__} is not "
                                  f"one moe_train knows (ZeRO 0/1/2 around torch AdamW)")
        self.base = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        if not isinstance(self.base, (torch.optim.AdamW, torch.optim.Adam)):
            raise CheckpointError(f"canonical checkpoint: the base optimizer is {type(self.base).__name__}; "
                                  f"only Adam/AdamW state (exp_avg, exp_avg_sq, step) is stored")
        if any(g.get("amsgrad") for g in self.base.param_groups):
            raise CheckpointError("canonical checkpoint: amsgrad keeps a third moment, which is not stored")
        if self.kind == "flat":
            self.group_of = {id(p): i for i, (lps, _) in enumerate(self.groups) for p in lps}

    def _slot(self, param) -> Tensor:
        """The tensor the base optimizer keys its state by for ``param``."""
        if self.kind == "flat":
            return self.groups[self.group_of[id(param)]][1]
        return self.master_of[id(param)]

    def has(self, param) -> bool:
        return id(param) in (self.group_of if self.kind == "flat" else self.master_of)

    def ensure_state(self) -> None:
        """AdamW creates its state at the first step; a save before it, or a restore into
        a fresh engine, needs it now: zero moments and step 0 (what AdamW would create),
        then DeepSpeed's fragments linked to it (``lazy_init_hp_params_optimizer_state``:
        always re-linked, since a ``load_state_dict`` replaces the state tensors)."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        slots = [hp for _, hp in self.groups] if self.kind == "flat" else list(self.master_of.values())
        for hp in slots:
            state = self.base.state[hp]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=scalar)
                for key in MOMENTS:
                    state[key] = torch.zeros_like(hp, memory_format=torch.preserve_format)
        if self.kind == "flat":
            for lps, hp in self.groups:
                lazy_init_hp_params_optimizer_state(lps, hp, self.base.state)

    def get(self, param, key: str) -> Tensor:
        """``key`` "master" or a moment: the full tensor this rank holds (a collective over
        the parameter's data-parallel group in the flat case)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if self.kind == "flat":
            return safe_get_full_fp32_param(param) if key == "master" \
                else safe_get_full_optimizer_state(param, key)
        if not self.has(param):  # frozen: not in the optimizer, the weight is its own master
            return param.detach()
        hp = self.master_of[id(param)]
        return hp.detach() if key == "master" else self.base.state[hp][key].detach()

    def set(self, param, key: str, value: Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if self.kind == "flat":
            if key == "master":
                safe_set_full_fp32_param(param, value)
            else:
                safe_set_full_optimizer_state(param, value, key)
            return
        hp = self.master_of[id(param)]
        (hp.data if key == "master" else self.base.state[hp][key]).copy_(value)

    def get_step(self, param) -> float:
        step = self.base.state[self._slot(param)].get("step", 0.0)
        return float(step)

    def set_steps(self, steps: dict[int, float]) -> None:
        """``steps``: id(param) -> step. All parameters of one flat partition share one
        step count; different values for them cannot be represented (CheckpointError)."""
        by_slot: dict[int, tuple[Tensor, set]] = {}
        for pid, step in steps.items():
            slot = self.groups[self.group_of[pid]][1] if self.kind == "flat" else self.master_of[pid]
            by_slot.setdefault(id(slot), (slot, set()))[1].add(step)
        for slot, values in by_slot.values():
            if len(values) > 1:
                raise CheckpointError(f"canonical checkpoint: parameters sharing one ZeRO partition have "
                                      f"different AdamW step counts {sorted(values)}")
            old = self.base.state[slot]["step"]
            self.base.state[slot]["step"] = torch.full_like(old, values.pop()) if torch.is_tensor(old) \
                else values.pop()


SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _scaler(optimizer) -> tuple[Optional[Any], bool]:
    """(DeepSpeed's loss scaler or its config object, whether it scales dynamically)."""
    obj = getattr(optimizer, "loss_scaler", None) or getattr(optimizer, "loss_scale_config", None)
    return obj, obj is not None and bool(getattr(obj, "dynamic", getattr(obj, "dynamic_loss_scale", False)))


def scaler_state(optimizer) -> dict:
    """The loss scaler's position (fp16 dynamic scaling; static 1.0 otherwise)."""
    obj, dynamic = _scaler(optimizer)
    if obj is None:
        return {}
    state = {k: getattr(obj, k) for k in SCALER_FIELDS if isinstance(getattr(obj, k, None), (int, float))}
    return {**state, "dynamic": dynamic}


def restore_scaler(optimizer, saved: dict) -> str:
    obj, dynamic = _scaler(optimizer)
    if not saved.get("dynamic"):
        return ""
    if not dynamic:
        return f"; the saved fp16 loss scale {saved.get('cur_scale')} is not used (this run scales no loss)"
    for key in SCALER_FIELDS:
        if key in saved and hasattr(obj, key):
            setattr(obj, key, saved[key])
    return f"; loss scale {saved.get('cur_scale')}"
