"""Runs ``moe_train.train.train`` on N real gloo ranks in-process (no launcher), with
either the real streaming loader or ``GlobalBatchLoader``, which serves the SAME global
batch to any (world size, grad accumulation) layout.

Why a test loader: the streaming loader gives rank r a contiguous 1/W of each epoch's
shard permutation, so world 1 and world 2 see different global batches; comparing their
losses needs the same sequences in each step's global batch, which this loader provides:
micro-batch m of rank r in step s holds rows [(m*W + r)*B, (m*W + r + 1)*B) of global
batch s, a seeded function of s.
"""

from __future__ import annotations

import os

import torch

from dist_utils import free_port, run_ranks
from moe_train.config import config_from_dict, config_to_dict

TINY = {
    "model": {"vocab_size": 128, "d_model": 32, "num_layers": 2, "num_heads": 4, "d_ff": 64,
              "max_seq_len": 32, "moe_every": 2},
    "moe": {"num_experts": 4, "top_k": 2, "d_ff": 32, "activation": "swiglu", "capacity_factor": 1.25,
            "jitter_eps": 0.0, "min_capacity": 2},
    "parallel": {"expert_parallel_size": 1, "zero_stage": 1, "timeout_s": 120},
    "data": {"seq_len": 16, "micro_batch_size": 4, "num_workers": 0},
    "train": {"grad_accum_steps": 1, "max_steps": 10, "seed": 7},
    # loop: the same AdamW arithmetic on every layout, so parity tests can compare layouts
    # bitwise (fused/foreach round differently per ZeRO partition; tests/test_optim_impl.py).
    "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "impl": "loop"},
    "logging": {"every_steps": 5, "tensorboard": False},
}


def make_cfg(tmp, **sections):
    """TINY with ``sections`` ({"train": {...}, ...}) merged over it; dirs under ``tmp``."""
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["checkpoint"] = {"dir": os.path.join(str(tmp), "ckpt"), "keep_last": 3}
    raw["logging"]["dir"] = os.path.join(str(tmp), "tb")
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


class GlobalBatchLoader:
    """See the module docstring. Tokens follow a learnable pattern (each row an
    run of consecutive ids mod V) so the loss falls fast."""

    def __init__(self, rank: int, world: int, micro_batch: int, grad_accum: int, seq_len: int,
                 vocab: int, seed: int = 0):
        self.rank, self.world, self.B, self.gas, self.S, self.V, self.seed = (
            rank, world, micro_batch, grad_accum, seq_len, vocab, seed)
        self.pos = 0  # micro-batches served to this rank
        self.manifest = {"vocab_size": vocab}

    def _global_batch(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + step)
        rows = self.world * self.gas * self.B
        start = torch.randint(1, self.V, (rows, 1), generator=g)
        return (start + torch.arange(self.S + 1)) % self.V

    def __iter__(self):
        while True:
            step, micro = divmod(self.pos, self.gas)
            first = (micro * self.world + self.rank) * self.B
            tokens = self._global_batch(step)[first:first + self.B]
            self.pos += 1
            yield {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def _worker(rank, world, raw_cfg, resume, synthetic, fault, keep_state):
    from moe_train.train import train
    from moe_train.train.faults import Faults

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = config_from_dict(raw_cfg)
    loaders = None
    if synthetic:
        def loaders(r, w):
            return (GlobalBatchLoader(r, w, cfg.data.micro_batch_size, cfg.train.grad_accum_steps,
                                      cfg.data.seq_len, cfg.model.vocab_size), None)
    result = train(cfg, resume=resume, loaders=loaders, keep_state=keep_state, faults=Faults(fault))
    result.state = result.state if keep_state else None
    return result


def run_train(cfg, world: int, resume: str = "none", synthetic: bool = True, fault: str = "",
              keep_state: bool = False, timeout_s: float = 300):
    """``train(cfg)`` on ``world`` gloo ranks; returns every rank's TrainResult."""
    return run_ranks(_worker, world, timeout_s=timeout_s, raw_cfg=config_to_dict(cfg), resume=resume,
                     synthetic=synthetic, fault=fault, keep_state=keep_state)


__all__ = ["GlobalBatchLoader", "make_cfg", "run_train", "free_port", "TINY"]
