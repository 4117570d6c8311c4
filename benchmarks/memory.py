"""Training memory per rank: ``sizing.memory_plan`` (what ``moe-train check`` prints)
against the allocator's real peak, by phase, for a few configs on 2 gloo ranks.

Each config is ``configs/tiny_moe.yaml`` with the overrides of ``CONFIGS``: dense and
MoE, ZeRO 0/1/2, fp32 and bf16, activation checkpointing on and off, capacity and
dropless, and the 67M-parameter configuration of issue 21 (d_model 512, 8 blocks, 8
experts of width 1024, ep 2, ZeRO-2, fp32, 8 x 64 tokens) twice: with the reduce bucket
this repository derives from the model size, and with DeepSpeed's default of 5e8
elements (``deepspeed.zero_optimization.reduce_bucket_size``).

How the peak is measured (``moe_train/train/memory_probe.py``, shared with ``moe-train
check --measure``): every rank builds the model and the engine and takes --steps training
steps on random token ids; on CPU the PyTorch profiler's memory events
(``profile_memory=True``: every allocation and free of torch's allocator, summed in time
order) give the live bytes at every instant, counted from just before the model is built;
the phases (build, engine, forward, backward, step) are marked on the same clock. Not RSS:
an untouched ``torch.empty`` counts in full, as it would on a GPU. On CUDA the same phases
come from ``torch.cuda.max_memory_allocated`` (one rank, world 1: NCCL cannot put two
ranks on one GPU). The table shows the larger rank.

Target: estimate within 15% of the measured peak for every config.

  python -m benchmarks.memory [--steps 3] [--configs all|name,...] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

TINY_YAML = Path(__file__).resolve().parent.parent / "configs" / "tiny_moe.yaml"
_BASE = ["model.vocab_size=2048", "model.d_model=256", "model.num_layers=4", "model.num_heads=4",
         "model.d_ff=1024", "model.max_seq_len=128", "moe.num_experts=8", "moe.top_k=2", "moe.d_ff=512",
         "data.seq_len=128", "data.micro_batch_size=8", "train.max_steps=1000", "logging.tensorboard=false"]
_ISSUE = ["model.vocab_size=512", "model.d_model=512", "model.num_layers=8", "model.num_heads=8",
          "model.d_ff=2048", "model.max_seq_len=128", "moe.num_experts=8", "moe.top_k=2", "moe.d_ff=1024",
          "data.seq_len=64", "data.micro_batch_size=8", "parallel.expert_parallel_size=2",
          "parallel.zero_stage=2", "train.dtype=fp32", "train.max_steps=1000", "logging.tensorboard=false"]
CONFIGS = {
    "dense-z0-fp32": _BASE + ["model.moe_every=0", "parallel.expert_parallel_size=1", "parallel.zero_stage=0",
                              "train.dtype=fp32"],
    "moe-z1-bf16-ckpt": _BASE + ["parallel.expert_parallel_size=2", "parallel.zero_stage=1", "train.dtype=bf16",
                                 "train.activation_checkpointing=true"],
    "moe-z2-fp32": _BASE + ["parallel.expert_parallel_size=2", "parallel.zero_stage=2", "train.dtype=fp32"],
    "moe-z0-bf16-dropless": _BASE + ["parallel.expert_parallel_size=2", "parallel.zero_stage=0",
                                     "train.dtype=bf16", "moe.capacity_factor=null"],
    "issue67m": _ISSUE,
    "issue67m-ds-bucket": _ISSUE + ["deepspeed.zero_optimization.reduce_bucket_size=500000000"],
}
WORLD = 2
TOLERANCE = 0.15


def plan_for(cfg, world_size: int):
    """``sizing.memory_plan`` of a loaded config (what ``moe-train check`` prints)."""
    from moe_train.model.sizing import plan_from_config

    return plan_from_config(cfg, world_size)


def run(names: list[str], steps: int, device: str) -> list[dict]:
    from moe_train.config import load_config
    from moe_train.model.sizing import memory_estimate
    from moe_train.train.memory_probe import measure

    rows = []
    for name in names:
        overrides = list(CONFIGS[name])
        world = WORLD
        if device == "cuda":
            overrides += ["parallel.expert_parallel_size=1"]
            world = 1
        cfg = load_config(TINY_YAML, overrides)
        plan = plan_for(cfg, world)
        old = memory_estimate(cfg.model, cfg.moe, world_size=world, ep_size=cfg.parallel.expert_parallel_size,
                              zero_stage=cfg.parallel.zero_stage, dtype=cfg.train.dtype,
                              micro_batch_size=cfg.data.micro_batch_size, seq_len=cfg.data.seq_len,
                              activation_checkpointing=cfg.train.activation_checkpointing).total
        if device == "cuda":
            per_rank = [_measure_cuda(cfg, steps)]
        else:
            per_rank = measure(TINY_YAML, overrides, world, steps)
        top = max(per_rank, key=lambda r: r["peak"])
        rows.append({"config": name, "world_size": world, "estimate": plan.peak, "estimate_phase": plan.peak_phase,
                     "parts": plan.parts, "estimate_phases": plan.phases, "old_estimate": old,
                     "measured": top["peak"], "measured_phases": {k: v["peak"] for k, v in top["phases"].items()},
                     "measured_param_bytes": top["param_bytes"],
                     "measured_optimizer_bytes": top["optimizer_bytes"],
                     "per_rank_peak": [r["peak"] for r in per_rank], "reduce_bucket": plan.reduce_bucket})
    return rows


def _measure_cuda(cfg, steps: int) -> dict:
    import torch

    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.init import init_distributed
    from moe_train.parallel.topology import Topology
    from moe_train.train.memory_probe import measure_rank

    _, device = init_distributed("cuda", "nccl", 300, always_group=True)
    torch.cuda.empty_cache()
    groups = build_groups(Topology(1, 1, cfg.moe.num_experts), 0)
    return measure_rank(cfg, groups, device, steps)


def print_rows(rows: list[dict], steps: int, device: str) -> None:
    from moe_train.model.sizing import PLAN_PHASES

    mib = 2 ** 20
    print(f"\npeak training memory per rank (MiB; the larger rank), {device}, {rows[0]['world_size']} rank(s), "
          f"{steps} steps; estimate = sizing.memory_plan (moe-train check); measured = allocator peak")
    print(f"{'config':>20} | {'estimate':>8} {'measured':>8} {'ratio':>6} | {'old est':>7} {'ratio':>6} | "
          + " ".join(f"{p:>8}" for p in PLAN_PHASES) + " | by part (estimate)")
    for r in rows:
        ratio, old = r["estimate"] / r["measured"], r["old_estimate"] / r["measured"]
        ok = "ok" if abs(ratio - 1) <= TOLERANCE else "MISS"
        phases = " ".join(f"{r['estimate_phases'][p] / mib:4.0f}/{r['measured_phases'].get(p, 0) / mib:<4.0f}"
                          for p in PLAN_PHASES)
        parts = ", ".join(f"{k} {v / mib:.1f}" for k, v in r["parts"].items() if v)
        print(f"{r['config']:>20} | {r['estimate'] / mib:8.1f} {r['measured'] / mib:8.1f} {ratio:6.3f} | "
              f"{r['old_estimate'] / mib:7.1f} {old:6.3f} | {phases} | {parts}  {ok}")
    print("phase columns: estimate/measured peak in that phase (MiB). old est = sizing.memory_estimate(...).total "
          f"(before issue 21). Target: estimate/measured within 1 +- {TOLERANCE}.")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="training steps per config (Adam state from step 1)")
    parser.add_argument("--configs", default="all", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None, help="write the rows to this path")
    args = parser.parse_args(argv)
    names = list(CONFIGS) if args.configs == "all" else [n.strip() for n in args.configs.split(",") if n.strip()]
    if not names or any(n not in CONFIGS for n in names):
        parser.error(f"--configs {args.configs}: names must be among {', '.join(CONFIGS)}")
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: must be >= 2 (the optimizer state exists from the second step)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("SKIPPED: --device cuda, but no CUDA device is visible; nothing was measured")
            return 0
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    rows = run(names, args.steps, args.device)
    print_rows(rows, args.steps, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(abs(r["estimate"] / r["measured"] - 1) <= TOLERANCE for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
