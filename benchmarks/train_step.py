"""One full training step through the real DeepSpeed engine: the MoE model side by side
with its dense twin, and optimizer-state bytes per rank side by side with the analytic
estimate.

Part 1, speed (one process, world 1 through ``init_distributed(always_group=True)``):
  contender  the MoE model of a config (``configs/tiny_moe.yaml`` with ep 1, or the
             larger CPU config "medium" below), routed DROPLESS by default
             (``moe.capacity_factor: null``, every top-k assignment computed, which is
             what ``sizing.flops_per_token`` counts); ``--capacity-factor 1.25`` to drop.
  peer       its dense twin: the same transformer with every MoE MLP replaced by one
             dense MLP of width k * F and the experts' activation, so a token passes
             through the same matmuls (equal FLOPs per token up to the router's 2 D E per
             MoE block, which only the MoE model has; both numbers are printed).
  A step is ``moe_train.train.train_step``: forward, backward, DeepSpeed's optimizer
  step, on synthetic batches of random token ids. After --warmup steps each, the MoE
  and dense steps alternate (so VM noise hits both alike) and the MINIMUM over --reps
  steps is reported (the median is printed too). On CUDA each step is timed with CUDA
  events between device synchronisations, and MFU = tokens/s * flops_per_token / peak
  (``metrics.measure_peak_flops``: datasheet peak on known GPUs, a measured matmul peak
  on CPU). Target: MoE step <= 1.3 x dense step.

Part 2, memory (always 2 gloo ranks on CPU, ep 2, whatever --device says: it counts bytes,
  and NCCL cannot put two ranks on one GPU): after one optimizer step under ZeRO 0, 1, 2,
  each rank sums the bytes of
    adam_state   every tensor in the torch optimizer's state (exp_avg, exp_avg_sq, step);
                 under ZeRO 1/2 that is DeepSpeed's inner optimizer over the flat partitions
    fp32_master  every tensor that torch optimizer updates whose storage is not a model
                 parameter: DeepSpeed's fp32 master copies (ZeRO 1/2's
                 ``single_partition_of_fp32_groups``, the fp16/bf16 optimizers' fp32 groups)
  and compares adam_state + fp32_master with
  ``sizing.memory_estimate(...).optimizer``. Target: within 10%.

Part 3, optimizer (one process, like part 1): the MoE model's step with each
  ``optim.impl`` (loop, foreach, fused; ``auto`` is fused on CUDA, foreach on CPU), and
  the optimizer's share of it: the time inside DeepSpeed's ``step()`` (ZeRO's gradient
  bookkeeping, clipping, the torch AdamW over the flat partitions, the copy back) and
  inside the torch AdamW ``step()`` alone, as medians over --reps steps.

  python -m benchmarks.train_step [--reps 5] [--warmup 2] [--configs tiny,medium]
      [--device cpu|cuda] [--dtype fp32|bf16] [--parts timing,memory,optimizer] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from moe_train.config import Config, load_config

TINY_YAML = Path(__file__).resolve().parent.parent / "configs" / "tiny_moe.yaml"
# Overrides on configs/tiny_moe.yaml. "medium": ~0.4 s a step on 2 CPU cores, where the
# matmuls dominate (tiny's 15 ms steps are mostly per-op overhead).
CONFIGS = {
    "tiny": [],
    "medium": ["model.vocab_size=2048", "model.d_model=256", "model.num_layers=4", "model.num_heads=4",
               "model.d_ff=512", "model.max_seq_len=256", "moe.num_experts=8", "moe.top_k=2",
               "moe.d_ff=256", "data.seq_len=256", "data.micro_batch_size=6"],
    # Switch-Base-8-like (Fedus et al. 2021: T5-Base widths, 8 experts, top-1, MoE in every
    # other block), for the GPU step's MFU (benchmarks/gpu_session.sh); minutes a step on CPU.
    "switch8": ["model.vocab_size=32128", "model.d_model=768", "model.num_layers=12", "model.num_heads=12",
                "model.d_ff=3072", "model.max_seq_len=512", "model.position=rope", "moe.num_experts=8",
                "moe.top_k=1", "moe.d_ff=3072", "moe.activation=gelu", "data.seq_len=512",
                "data.micro_batch_size=16"],
}
STEP_TARGET = 1.3  # max MoE step / dense step
MEMORY_TOLERANCE = 0.10  # measured optimizer bytes within 10% of the analytic estimate
MEMORY_WORLD, MEMORY_EP = 2, 2


def bench_config(name: str, *, ep: int = 1, zero_stage: Optional[int] = None, dtype: str = "fp32",
                 capacity_factor: Optional[float] = None) -> Config:
    """The named benchmark config (``CONFIGS``) with ep, dtype, capacity and ZeRO set."""
    if name not in CONFIGS:
        raise ValueError(f"--configs {name}: must be one of {', '.join(CONFIGS)}")
    extra = [f"parallel.expert_parallel_size={ep}", f"train.dtype={dtype}",
             f"moe.capacity_factor={'null' if capacity_factor is None else capacity_factor}",
             "train.max_steps=1000000", "logging.tensorboard=false"]
    if zero_stage is not None:
        extra.append(f"parallel.zero_stage={zero_stage}")
    return load_config(TINY_YAML, CONFIGS[name] + extra)


# ------------------------------------------------------------------------- dense twin


def build_dense_twin(cfg: Config, device) -> tuple[Config, torch.nn.Module]:
    """The MoE model's dense twin: block i's MLP is ``DenseMLP(D, k * F, moe.activation)``
    where the MoE model has an MoE MLP, and the MoE model's dense MLP elsewhere.

    Returns the config to train it with (``moe_every: 0``, so nothing MoE is built or
    logged) and the model on ``device``, initialised as ``MoETransformer`` initialises."""
    from moe_train.model.layers import DenseMLP
    from moe_train.model.transformer import MoETransformer

    if cfg.moe.activation not in ("gelu", "swiglu"):
        raise ValueError(f"moe.activation = {cfg.moe.activation!r}: the dense twin needs a DenseMLP "
                         f"activation (gelu or swiglu)")
    twin_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe_every=0))
    torch.manual_seed(cfg.train.seed)
    twin = MoETransformer(twin_cfg.model, cfg.moe)
    for i, block in enumerate(twin.blocks):
        if cfg.model.is_moe_block(i):
            block.mlp = DenseMLP(cfg.model.d_model, cfg.moe.top_k * cfg.moe.d_ff, cfg.moe.activation)
            for p in block.mlp.parameters():
                torch.nn.init.normal_(p, std=cfg.model.init_std)
    return twin_cfg, twin.to(device)


def flops_per_token_pair(cfg: Config, twin: torch.nn.Module) -> dict[str, float]:
    """Training FLOPs per token of the MoE model (``sizing.flops_per_token``) and of the
    twin, counted from the twin's own weights: 3 x (2 x every 2-D block weight + 2 D V for
    the head + sizing's causal attention-score term). Raises if they differ by anything
    but the router, so a wrong twin is never timed."""
    from moe_train.model.sizing import flops_per_token, forward_flops_per_token

    seq = cfg.data.seq_len
    moe = flops_per_token(cfg.model, cfg.moe, seq)
    terms = forward_flops_per_token(cfg.model, cfg.moe, seq)
    weights = sum(p.numel() for p in twin.blocks.parameters() if p.dim() == 2) + twin.head.weight.numel()
    dense = 3.0 * (2.0 * weights + terms["attn_scores"])
    router = 3.0 * terms["router"]
    if abs(moe - router - dense) > 1e-6 * moe:
        raise AssertionError(f"dense twin FLOPs {dense:.6g} != MoE {moe:.6g} - router {router:.6g}")
    return {"moe": moe, "dense": dense, "router": router}


# ----------------------------------------------------------------------------- timing


def synthetic_batches(cfg: Config, device, count: int = 4, seed: int = 0):
    """An endless cycle over ``count`` batches of random token ids (labels = inputs
    shifted by one), already on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.data.micro_batch_size, cfg.data.seq_len + 1)
    ids = [torch.randint(0, cfg.model.vocab_size, shape, generator=gen) for _ in range(count)]
    batches = [{"input_ids": t[:, :-1].contiguous().to(device), "labels": t[:, 1:].contiguous().to(device)}
               for t in ids]
    i = 0
    while True:
        yield batches[i % count]
        i += 1


def timed_s(fn: Callable[[], None], device) -> float:
    """Seconds ``fn`` takes; on CUDA between CUDA events, the device synchronised before
    and after (the step's own ``.item()``-like host reads do not cover queued work)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _Stepper:
    """Calls ``train_step`` on one engine; remembers the last output."""

    def __init__(self, engine, cfg: Config, groups, device):
        from moe_train.train.control import StopRequest

        self.engine, self.cfg, self.groups, self.device = engine, cfg, groups, device
        self.batches = synthetic_batches(cfg, device)
        self.stop, self.step, self.out, self.skipped = StopRequest(), 0, None, 0

    def __call__(self) -> None:
        from moe_train.train.step import train_step

        self.step += 1
        self.out = train_step(self.engine, self.batches, self.cfg, self.groups, self.device,
                              self.step, self.stop)
        self.skipped += int(self.out.skipped)


def time_interleaved(steppers: dict[str, _Stepper], reps: int, warmup: int, device) -> dict[str, list[float]]:
    """Per contender, the seconds of each of ``reps`` steps, after ``warmup`` steps each;
    the contenders alternate within every repetition."""
    for _ in range(warmup):
        for run in steppers.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(reps):
        for name, run in steppers.items():
            times[name].append(timed_s(run, device))
    return times


def _drop_frac(out) -> float:
    routed = sum(int(s.routed_per_expert_E.sum()) for s in out.moe_stats)
    return sum(int(s.num_dropped) for s in out.moe_stats) / max(routed, 1)


def time_config(name: str, args, device, groups) -> dict:
    """Part 1 for one config: builds both engines, times them, returns the row."""
    from moe_train.model.build import build_model
    from moe_train.train.engine import build_engine

    cfg = bench_config(name, dtype=args.dtype, capacity_factor=args.capacity_factor)
    torch.manual_seed(cfg.train.seed)
    moe_engine = build_engine(cfg, build_model(cfg, groups, device), groups)
    twin_cfg, twin = build_dense_twin(cfg, device)
    flops = flops_per_token_pair(cfg, twin)
    dense_engine = build_engine(twin_cfg, twin, groups)
    steppers = {"moe": _Stepper(moe_engine, cfg, groups, device),
                "dense": _Stepper(dense_engine, twin_cfg, groups, device)}
    times = time_interleaved(steppers, args.reps, args.warmup, device)
    tokens = cfg.data.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps
    row = {"config": name, "tokens_per_step": tokens, "flops_per_token": flops,
           "zero_stage": cfg.parallel.zero_stage,
           "drop_frac": _drop_frac(steppers["moe"].out),
           "final_loss": {k: s.out.mean_lm for k, s in steppers.items()},
           "skipped_steps": {k: s.skipped for k, s in steppers.items()}}
    for k, ts in times.items():
        row[f"{k}_step_s"] = min(ts)
        row[f"{k}_step_median_s"] = statistics.median(ts)
        row[f"{k}_tokens_per_s"] = tokens / min(ts)
    for k, s in steppers.items():
        if not math.isfinite(s.out.mean_lm) or s.skipped:
            print(f"WARNING: {name} {k}: loss {s.out.mean_lm}, {s.skipped} skipped steps")
    return row


def run_timing(args, names: list[str]) -> tuple[list[dict], Optional[float]]:
    """Part 1 for every config, in this process (world 1); returns the rows and the
    peak FLOP/s MFU divides by."""
    import torch.distributed as dist

    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.init import init_distributed
    from moe_train.parallel.topology import Topology
    from moe_train.train.engine import DTYPES
    from moe_train.train.metrics import measure_peak_flops

    env, device = init_distributed(args.device, "auto", 600, always_group=True)
    try:
        if env.world_size != 1:
            raise SystemExit(f"benchmarks.train_step runs as one process (found world size {env.world_size})")
        rows = []
        for name in names:
            cfg = bench_config(name)
            groups = build_groups(Topology(1, 1, cfg.moe.num_experts), 0)
            rows.append(time_config(name, args, device, groups))
        # Noise only slows a measurement down: the best of three is the achievable peak.
        peak = max(measure_peak_flops(device, DTYPES[args.dtype], seconds=0.3) for _ in range(3))
        print(f"timing: device {device}, backend {dist.get_backend()}, peak {peak:.3g} FLOP/s")
        return rows, peak
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -------------------------------------------------------------------------- optimizer

OPTIM_IMPLS = ("loop", "foreach", "fused")


class _Timed:
    """Wraps ``obj.method`` to add the seconds of each call to ``self.seconds``."""

    def __init__(self, obj, method: str, device):
        self.seconds, real = 0.0, getattr(obj, method)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds += time.perf_counter() - t0
            return out
        setattr(obj, method, timed)


def time_optimizer(name: str, args, device, groups) -> list[dict]:
    """Part 3 for one config: per optim.impl, the step's median seconds and the medians
    of DeepSpeed's step() and of the torch AdamW step() inside it."""
    from moe_train.model.build import build_model
    from moe_train.train.engine import build_engine

    rows = []
    for impl in OPTIM_IMPLS:
        cfg = bench_config(name, dtype=args.dtype, capacity_factor=args.capacity_factor)
        cfg.optim.impl = impl
        torch.manual_seed(cfg.train.seed)
        engine = build_engine(cfg, build_model(cfg, groups, device), groups)
        stepper = _Stepper(engine, cfg, groups, device)
        inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
        ds_step, adam_step = _Timed(engine.ds, "step", device), _Timed(inner, "step", device)
        for _ in range(args.warmup):
            stepper()
        steps, ds_s, adam_s = [], [], []
        for _ in range(args.reps):
            ds_step.seconds = adam_step.seconds = 0.0
            steps.append(timed_s(stepper, device))
            ds_s.append(ds_step.seconds)
            adam_s.append(adam_step.seconds)
        rows.append({"config": name, "impl": impl, "step_s": statistics.median(steps),
                     "ds_step_s": statistics.median(ds_s), "adam_step_s": statistics.median(adam_s),
                     "params": sum(p.numel() for p in engine.module.parameters())})
    return rows


def run_optimizer(args, names: list[str]) -> list[dict]:
    import torch.distributed as dist

    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.init import init_distributed
    from moe_train.parallel.topology import Topology

    env, device = init_distributed(args.device, "auto", 600, always_group=True)
    try:
        rows = []
        for name in names:
            groups = build_groups(Topology(1, 1, bench_config(name).moe.num_experts), 0)
            rows += time_optimizer(name, args, device, groups)
        return rows
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def print_optimizer(rows: list[dict], args) -> None:
    print(f"\noptimizer share of the MoE step, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
          f"medians over {args.reps} steps; DeepSpeed step = ZeRO bookkeeping + clipping + AdamW + copy back")
    print(f"{'config':>7} {'impl':>8} | {'step ms':>8} | {'DS step ms':>10} {'share':>6} | "
          f"{'AdamW ms':>8} {'share':>6} | {'AdamW vs loop':>13}")
    loop = {r["config"]: r["adam_step_s"] for r in rows if r["impl"] == "loop"}
    for r in rows:
        print(f"{r['config']:>7} {r['impl']:>8} | {r['step_s'] * 1e3:8.2f} | {r['ds_step_s'] * 1e3:10.2f} "
              f"{r['ds_step_s'] / r['step_s']:6.1%} | {r['adam_step_s'] * 1e3:8.2f} "
              f"{r['adam_step_s'] / r['step_s']:6.1%} | {r['adam_step_s'] / loop[r['config']]:12.2f}x")


# ----------------------------------------------------------------------------- memory


def optimizer_bytes(engine) -> dict[str, int]:
    """Bytes this rank's optimizer holds beyond the model parameters (module docstring):
    ``adam_state`` (the torch optimizer's state tensors) and ``fp32_master`` (tensors it
    updates that are not model parameters: DeepSpeed's fp32 copies)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):  # DeepSpeed wrappers hold the torch one
        opt = opt.optimizer
    model_storages = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    seen: set = set()

    def count(t: torch.Tensor) -> int:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    state = sum(count(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    master = sum(count(p) for g in opt.param_groups for p in g["params"]
                 if p.untyped_storage().data_ptr() not in model_storages)
    return {"adam_state": state, "fp32_master": master, "total": state + master}


def _memory_rank(rank: int, world: int, port: int, names: list[str], dtype: str, out_dir: str) -> None:
    """One gloo rank of part 2 (a spawned process): ZeRO 0, 1, 2 for every config."""
    # CPU only, even on a GPU host: DeepSpeed must not pick CUDA for two gloo ranks.
    os.environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    path = os.path.join(out_dir, f"rank{rank}.json")
    try:
        torch.set_num_threads(1)
        _quiet_deepspeed()
        result = _memory_stages(rank, world, names, dtype)
        Path(path).write_text(json.dumps({"ok": True, "result": result}))
    except BaseException:  # the parent reports it, with this traceback
        Path(path).write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))


def _memory_stages(rank: int, world: int, names: list[str], dtype: str) -> dict:
    import gc

    import torch.distributed as dist

    from moe_train.model.build import build_model
    from moe_train.model.sizing import memory_estimate
    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.init import init_distributed
    from moe_train.parallel.topology import Topology
    from moe_train.train.control import StopRequest
    from moe_train.train.engine import build_engine
    from moe_train.train.step import train_step

    env, device = init_distributed("cpu", "gloo", 300, always_group=True)
    assert (env.rank, env.world_size) == (rank, world), env
    out: dict = {}
    try:
        for name in names:
            for stage in (0, 1, 2):
                cfg = bench_config(name, ep=MEMORY_EP, zero_stage=stage, dtype=dtype)
                groups = build_groups(Topology(world, MEMORY_EP, cfg.moe.num_experts), rank)
                engine = build_engine(cfg, build_model(cfg, groups, device), groups)
                step = train_step(engine, synthetic_batches(cfg, device, seed=rank), cfg, groups, device,
                                  1, StopRequest())  # Adam state exists after the first step
                measured = optimizer_bytes(engine)
                measured["skipped"] = int(step.skipped)
                measured["analytic"] = memory_estimate(
                    cfg.model, cfg.moe, world_size=world, ep_size=MEMORY_EP, zero_stage=stage, dtype=dtype,
                    micro_batch_size=cfg.data.micro_batch_size, seq_len=cfg.data.seq_len).optimizer
                out.setdefault(name, {})[str(stage)] = measured
                del engine
                gc.collect()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return out


def run_memory(names: list[str], dtype: str, timeout_s: float = 600) -> dict:
    """Part 2 on ``MEMORY_WORLD`` spawned gloo ranks; returns
    {config: {stage: {adam_state, fp32_master, total, analytic, per_rank_total}}}, the
    byte counts of the rank that holds the most."""
    from moe_train.parallel.spawn import free_local_port, run_local_processes

    port = free_local_port()
    with tempfile.TemporaryDirectory() as out_dir:
        codes = run_local_processes(_memory_rank, [(r, MEMORY_WORLD, port, names, dtype, out_dir)
                                                   for r in range(MEMORY_WORLD)], timeout_s)
        if None in codes:
            raise RuntimeError(f"memory rank {codes.index(None)} still running after {timeout_s} s; killed")
        results = []
        for r in range(MEMORY_WORLD):
            path = Path(out_dir, f"rank{r}.json")
            if not path.exists():
                raise RuntimeError(f"memory rank {r} exited with code {codes[r]} and no result")
            got = json.loads(path.read_text())
            if not got["ok"]:
                raise RuntimeError(f"memory rank {r} failed:\n{got['error']}")
            results.append(got["result"])
    merged: dict = {}
    for name in names:
        for stage in ("0", "1", "2"):
            per_rank = [res[name][stage] for res in results]
            top = max(per_rank, key=lambda m: m["total"])
            merged.setdefault(name, {})[stage] = {**top, "per_rank_total": [m["total"] for m in per_rank]}
    return merged


# ---------------------------------------------------------------------------- report


def print_timing(rows: list[dict], peak: Optional[float], args) -> None:
    cf = "dropless" if args.capacity_factor is None else f"capacity factor {args.capacity_factor}"
    print(f"\ntrain step (forward + backward + optimizer step), {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, ZeRO {rows[0]['zero_stage']} on one rank, MoE {cf}; MIN over {args.reps} reps after "
          f"{args.warmup} warm-up steps, MoE and dense interleaved (median in brackets)")
    print(f"{'config':>7} {'tok/step':>8} | {'GFLOP/tok MoE':>13} {'dense':>7} {'d/m':>6} | "
          f"{'MoE ms':>15} {'dense ms':>15} | {'MoE tok/s':>9} {'dense tok/s':>11} | "
          f"{'MoE/dense':>9} {'(<=)':>5} | {'MFU MoE':>7} {'dense':>6} | drop")
    for r in rows:
        f = r["flops_per_token"]
        mfu = {k: r[f"{k}_tokens_per_s"] * f[k] / peak if peak else math.nan for k in ("moe", "dense")}
        ratio = r["moe_step_s"] / r["dense_step_s"]
        print(f"{r['config']:>7} {r['tokens_per_step']:>8} | {f['moe'] / 1e9:13.5f} {f['dense'] / 1e9:7.5f} "
              f"{f['dense'] / f['moe']:6.4f} | "
              f"{r['moe_step_s'] * 1e3:7.1f} [{r['moe_step_median_s'] * 1e3:5.1f}] "
              f"{r['dense_step_s'] * 1e3:7.1f} [{r['dense_step_median_s'] * 1e3:5.1f}] | "
              f"{r['moe_tokens_per_s']:9.0f} {r['dense_tokens_per_s']:11.0f} | "
              f"{ratio:9.3f} {STEP_TARGET:5.2f} | {mfu['moe']:7.1%} {mfu['dense']:6.1%} | "
              f"{r['drop_frac']:.3f}  {'ok' if ratio <= STEP_TARGET else 'MISS'}")
    print("FLOPs: MoE from sizing.flops_per_token; dense twin counted from its weights; they differ "
          "only by the MoE router (3 x 2 D E per MoE block). MFU against "
          f"{'the datasheet or measured' if args.device == 'cuda' else 'a measured matmul'} peak "
          f"({peak:.3g} FLOP/s).")


def print_memory(mem: dict, dtype: str) -> None:
    print(f"\noptimizer state bytes per rank (the larger rank), {dtype}, {MEMORY_WORLD} gloo ranks, "
          f"ep {MEMORY_EP}, after one step; analytic = sizing.memory_estimate(...).optimizer")
    print(f"{'config':>7} {'ZeRO':>4} | {'Adam m,v,step':>13} {'fp32 master':>11} {'measured':>10} | "
          f"{'analytic':>10} | {'meas/analytic':>13} {'(target)':>11}")
    for name, stages in mem.items():
        for stage, m in stages.items():
            ratio = m["total"] / m["analytic"]
            ok = abs(ratio - 1) <= MEMORY_TOLERANCE
            print(f"{name:>7} {stage:>4} | {m['adam_state']:13d} {m['fp32_master']:11d} {m['total']:10d} | "
                  f"{m['analytic']:10d} | {ratio:13.4f} {'1 +- 0.10':>11}  {'ok' if ok else 'MISS'}")


def json_report(rows: list[dict], mem: dict, args, names: list[str]) -> dict:
    """The --json document: top-level numbers for the first config (tiny by default),
    every config's under "configs"."""
    per_config: dict = {name: {} for name in names}
    for r in rows:
        per_config[r["config"]].update({k: r[k] for k in ("moe_step_s", "dense_step_s", "moe_tokens_per_s",
                                                          "dense_tokens_per_s")})
        per_config[r["config"]]["flops_per_token"] = r["flops_per_token"]
    for name, stages in mem.items():
        per_config[name]["optimizer_bytes_per_rank"] = {s: m["total"] for s, m in stages.items()}
        per_config[name]["analytic_optimizer_bytes_per_rank"] = {s: m["analytic"] for s, m in stages.items()}
        per_config[name]["optimizer_bytes_parts_per_rank"] = {
            s: {"adam_state": m["adam_state"], "fp32_master": m["fp32_master"]} for s, m in stages.items()}
    top = {k: v for k, v in per_config[names[0]].items()
           if k in ("moe_step_s", "dense_step_s", "moe_tokens_per_s", "dense_tokens_per_s",
                    "optimizer_bytes_per_rank", "analytic_optimizer_bytes_per_rank")}
    settings = {"top_level_config": names[0], "device": args.device, "dtype": args.dtype, "reps": args.reps,
                "warmup": args.warmup, "statistic": "min", "capacity_factor": args.capacity_factor,
                "memory_world_size": MEMORY_WORLD, "memory_ep": MEMORY_EP}
    return {**top, "configs": per_config, "settings": settings}


def _quiet_deepspeed() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed steps per contender (minimum reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    parser.add_argument("--configs", default="tiny,medium", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="train.dtype (DeepSpeed's bf16 config for bf16)")
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="MoE training capacity factor for the timing (default: dropless)")
    parser.add_argument("--parts", default="timing,memory",
                        help="comma-separated: timing, memory, optimizer")
    parser.add_argument("--json", default=None, help="write the results to this path")
    args = parser.parse_args(argv)
    args.names = [n.strip() for n in args.configs.split(",") if n.strip()]
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.reps < 1 or args.warmup < 0:
        parser.error(f"--reps {args.reps} must be >= 1 and --warmup {args.warmup} >= 0")
    if not args.names or any(n not in CONFIGS for n in args.names):
        parser.error(f"--configs {args.configs}: names must be among {', '.join(CONFIGS)}")
    if not args.parts or not args.parts <= {"timing", "memory", "optimizer"}:
        parser.error(f"--parts {','.join(sorted(args.parts))}: must be among timing, memory, optimizer")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIPPED: --device cuda, but no CUDA device is visible (torch.cuda.is_available() is False); "
              "nothing was measured")
        return 0
    # DeepSpeed picks its accelerator once, at import: on a GPU host --device cpu must say so.
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    _quiet_deepspeed()
    print(f"torch {torch.__version__}, configs {', '.join(args.names)}, parts {', '.join(sorted(args.parts))}")
    rows, peak, mem = [], None, {}
    if "timing" in args.parts:
        rows, peak = run_timing(args, args.names)
        print_timing(rows, peak, args)
    if "memory" in args.parts:
        mem = run_memory(args.names, args.dtype)
        print_memory(mem, args.dtype)
    optim_rows = []
    if "optimizer" in args.parts:
        optim_rows = run_optimizer(args, args.names)
        print_optimizer(optim_rows, args)
    if args.json:
        report = json_report(rows, mem, args, args.names)
        if optim_rows:
            report["optimizer"] = optim_rows
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
