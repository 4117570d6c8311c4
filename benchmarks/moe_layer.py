"""Forward + backward of one MoE layer on CPU, side by side with DeepSpeed and a dense FFN.

Shape legend:
  T  tokens    D  model width    F  expert hidden width    E  experts

Contenders, on the same x_TD (requires_grad, so backward includes dX), k = 1, cf = 1.25:
  ours          moe_train.moe.layer.MoELayer (router + permute + experts + combine)
  deepspeed     deepspeed.moe.layer.MoE, GELU experts Linear(D,F) GELU Linear(F,D) without
                bias, drop_tokens=True, use_rts=False, ep_size=1, 1-process gloo group
  dense         Linear(D,F) GELU Linear(F,D) on all T tokens: the same per-token FLOPs in one
                large GEMM each, the roof
  experts_only  GroupedExperts.forward on T rows already grouped in equal shares: no
                routing, permutation or combine
Each timing is the minimum over --reps repetitions after a warm-up; the contenders are
interleaved within each repetition so a noisy neighbour hurts them alike.

On CUDA (--device cuda) every contender and x_TD live on the GPU, the warm-up is
CUDA_WARMUP calls each (kernel selection, allocator), and each call is timed with CUDA
events between device synchronisations. --dtype bf16 runs every contender with bf16
WEIGHTS and a bf16 x_TD (module.to(bfloat16), as DeepSpeed's bf16 training holds them;
not autocast, so no contender keeps a matmul in fp32 that another runs in bf16); the
routers still compute their logits in fp32 (ours and DeepSpeed's upcast). The default,
--device cpu --dtype fp32, is the CPU benchmark as it always was.

  PYTHONPATH=. python -m benchmarks.moe_layer [--reps 5] [--cases 0,1,2] [--threads N]
      [--json out.json] [--malloc default|keep] [--device cpu|cuda] [--dtype fp32|bf16]
      [--parts layer,dispatch,shared]

--parts dispatch: expert-parallel dispatch at ep 2 on two gloo processes (one thread
each), per-assignment vs once-per-rank (``moe.dispatch``) side by side on the same
tokens: rows each rank puts into the token all-to-all per token it routes (all rows, and
those for the other rank) and fwd + bwd ms (the slower rank, minimum over --reps),
for top-2 and top-8, dropless, and top-8 with group-limited routing (2 groups = the 2
ranks, 1 group per token). --parts shared: the cost of a shared expert (moe.shared_d_ff)
on top of the routed layer, against the dense roof: a plain FFN of the shared width.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from moe_train.moe.experts import GroupedExperts
from moe_train.parallel.init import keep_freed_memory

# (T per rank, D, F, E, k, num_groups, groups_per_token): tiny CPU cases, then medium.
DISPATCH_CASES = [
    (256, 64, 128, 8, 2, 1, 1),
    (256, 64, 64, 16, 8, 1, 1),
    (256, 64, 64, 16, 8, 2, 1),
    (4096, 256, 512, 8, 2, 1, 1),
    (4096, 256, 128, 16, 8, 1, 1),
    (4096, 256, 128, 16, 8, 2, 1),
]
DISPATCH_MODES = ("per_assignment", "once_per_rank")
SHARED_CASE = (4096, 256, 512, 8, 2, 1024)  # T, D, F, E, k, shared_d_ff

CASES = [  # (T, D, F, E)
    (8192, 512, 2048, 8),
    (8192, 512, 512, 64),
    (16384, 512, 256, 128),
]
# Targets from the issue, per E: min DeepSpeed/ours speedup, max ours/dense.
SPEEDUP_TARGET = {8: 1.1, 64: 1.2, 128: 1.5}
DENSE_TARGET = {8: 1.2, 64: 1.6, 128: 1.8}
EXPERTS_TARGET = 1.25  # ours / experts_only, every E
CAPACITY_FACTOR = 1.25
CUDA_WARMUP = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _cuda_ms(step: Callable[[], None]) -> float:
    """One call's GPU time in ms: CUDA events, the device idle before and after."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_min_ms(steps: dict[str, Callable[[], None]], reps: int,
                device: Optional[torch.device] = None) -> dict[str, float]:
    """Minimum wall time in ms of each step, after one warm-up call each; interleaved.
    On a CUDA ``device``: CUDA_WARMUP warm-up calls each and CUDA-event timing."""
    if device is not None and device.type == "cuda":
        for _ in range(CUDA_WARMUP):
            for step in steps.values():
                step()
        times = {name: math.inf for name in steps}
        for _ in range(reps):
            for name, step in steps.items():
                times[name] = min(times[name], _cuda_ms(step))
        return times
    for step in steps.values():
        step()
    times = {name: math.inf for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name] = min(times[name], (time.perf_counter() - start) * 1e3)
    return times


def _fwd_bwd(module: nn.Module, x_TD: Tensor, run: Callable[[Tensor], Tensor]) -> Callable[[], None]:
    """A step: zero grads, loss = run(x) (a scalar), backward."""
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x_TD.grad = None
        run(x_TD).backward()
    return step


def ours_step(tokens: int, d_model: int, d_ff: int, num_experts: int,
              x_TD: Optional[Tensor] = None) -> Optional[Callable[[], None]]:
    """fwd + bwd of our MoELayer (k = 1, cf = 1.25, GELU) on x_TD's device and dtype (CPU
    fp32 when x_TD is None); None if the layer is missing."""
    try:
        from moe_train.moe.config import MoEConfig
        from moe_train.moe.layer import MoELayer
    except ImportError as err:
        print(f"ours: layer not available ({err})")
        return None
    cfg = MoEConfig(num_experts=num_experts, top_k=1, d_ff=d_ff, activation="gelu",
                    capacity_factor=CAPACITY_FACTOR, drop_policy="position")
    layer = MoELayer(cfg, d_model=d_model)
    if x_TD is None:
        x_TD = torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(0),
                           requires_grad=True)
    layer.to(x_TD.device, x_TD.dtype)

    def run(x: Tensor) -> Tensor:
        out = layer(x)
        return out.y.float().pow(2).mean() + out.aux_loss
    return _fwd_bwd(layer, x_TD, run)


def time_ours_ms(tokens: int, d_model: int, d_ff: int, num_experts: int, reps: int = 5) -> float:
    """Minimum fwd + bwd time in ms of our MoE layer (k = 1, cf = 1.25, GELU)."""
    step = ours_step(tokens, d_model, d_ff, num_experts)
    if step is None:
        raise RuntimeError("moe_train.moe.layer.MoELayer is not available")
    return time_min_ms({"ours": step}, reps)["ours"]


def experts_only_step(x_TD: Tensor, d_ff: int, num_experts: int, impl: str = "auto") -> Callable[[], None]:
    tokens, d_model = x_TD.shape
    experts = GroupedExperts(num_experts, d_model, d_ff, "gelu", impl=impl).to(x_TD.device, x_TD.dtype)
    counts_E = torch.full((num_experts,), tokens // num_experts, dtype=torch.int64)
    counts_E[: tokens % num_experts] += 1
    counts_E = counts_E.to(x_TD.device)
    return _fwd_bwd(experts, x_TD, lambda x: experts(x, counts_E).float().pow(2).mean())


def dense_step(x_TD: Tensor, d_ff: int) -> Callable[[], None]:
    d_model = x_TD.shape[1]
    ffn = nn.Sequential(nn.Linear(d_model, d_ff, bias=False), nn.GELU(),
                        nn.Linear(d_ff, d_model, bias=False)).to(x_TD.device, x_TD.dtype)
    return _fwd_bwd(ffn, x_TD, lambda x: ffn(x).float().pow(2).mean())


def init_single_process_gloo() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)


def deepspeed_step(x_TD: Tensor, d_ff: int, num_experts: int) -> Optional[Callable[[], None]]:
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.moe.layer import MoE
    except ImportError as err:
        print(f"deepspeed: not available ({err})")
        return None
    if get_accelerator().device_name() != x_TD.device.type:
        raise RuntimeError(f"DeepSpeed accelerator is {get_accelerator().device_name()!r}, "
                           f"not {x_TD.device.type}")
    if x_TD.device.type == "cuda":  # NCCL, through moe_train's one device/backend choice
        from moe_train.parallel.init import init_distributed
        init_distributed("cuda", "auto", always_group=True)
    else:
        init_single_process_gloo()
    d_model = x_TD.shape[1]
    expert = nn.Sequential(nn.Linear(d_model, d_ff, bias=False), nn.GELU(),
                           nn.Linear(d_ff, d_model, bias=False))
    moe = MoE(hidden_size=d_model, expert=expert, num_experts=num_experts, ep_size=1, k=1,
              capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR,
              drop_tokens=True, use_rts=False).to(x_TD.device, x_TD.dtype)

    def run(x: Tensor) -> Tensor:
        y, aux_loss, _ = moe(x)
        return y.float().pow(2).mean() + aux_loss
    return _fwd_bwd(moe, x_TD, run)


def _deepspeed_version() -> str:
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return "deepspeed not installed"
    return f"deepspeed {deepspeed.__version__} on accelerator {get_accelerator().device_name()!r}"


def run_case(tokens: int, d_model: int, d_ff: int, num_experts: int, reps: int,
             device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> dict:
    x_TD = torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(0))
    x_TD = x_TD.to(device, dtype).requires_grad_()
    steps = {"ours": ours_step(tokens, d_model, d_ff, num_experts, x_TD),
             "deepspeed": deepspeed_step(x_TD, d_ff, num_experts),
             "dense": dense_step(x_TD, d_ff),
             "experts_only": experts_only_step(x_TD, d_ff, num_experts)}
    times = time_min_ms({k: v for k, v in steps.items() if v is not None}, reps, device)
    row = {"num_experts": num_experts, "tokens": tokens, "d_model": d_model, "d_ff": d_ff}
    row.update({f"{name}_ms": times.get(name) for name in steps})
    return row


def _dispatch_worker(rank: int, world: int, port: int, reps: int, queue) -> None:
    """One of the two gloo ranks of --parts dispatch; rank 0 puts the rows on ``queue``."""
    import torch.distributed as dist

    from moe_train.moe.config import MoEConfig
    from moe_train.moe.layer import MoELayer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    rows = []
    for T, D, F, E, k, G, M in DISPATCH_CASES:
        x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        steps, sent = {}, {}
        for mode in DISPATCH_MODES:
            cfg = MoEConfig(num_experts=E, top_k=k, d_ff=F, capacity_factor=None, dispatch=mode,
                            num_groups=G, groups_per_token=M, activation="gelu")
            torch.manual_seed(0)
            layer = MoELayer(cfg, D, ep_group=group)
            dispatch = layer.dispatcher.dispatch

            def counted(x, routing, _dispatch=dispatch, _mode=mode):
                d = _dispatch(x, routing)
                sent[_mode] = (d.rows_sent, d.rows_sent_remote)
                return d
            layer.dispatcher.dispatch = counted
            steps[mode] = _fwd_bwd(layer, x_TD, lambda x, _l=layer: _l(x).y.pow(2).mean())
        times = {m: math.inf for m in steps}
        for round_ in range(reps + 1):  # round 0 is the warm-up
            for mode, step in steps.items():
                dist.barrier(group=group)
                start = time.perf_counter()
                step()
                elapsed = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # the slower rank
                if round_ > 0:
                    times[mode] = min(times[mode], float(elapsed) * 1e3)
        counts = torch.tensor([[sent[m][0], sent[m][1]] for m in DISPATCH_MODES], dtype=torch.float64)
        dist.all_reduce(counts, group=group)  # over both ranks
        row = {"tokens_per_rank": T, "d_model": D, "d_ff": F, "num_experts": E, "top_k": k,
               "num_groups": G, "groups_per_token": M}
        for i, mode in enumerate(DISPATCH_MODES):
            row[f"{mode}_rows_per_token"] = float(counts[i, 0]) / (world * T)
            row[f"{mode}_remote_rows_per_token"] = float(counts[i, 1]) / (world * T)
            row[f"{mode}_ms"] = times[mode]
        rows.append(row)
    if rank == 0:
        queue.put(rows)
    dist.barrier(group=group)
    dist.destroy_process_group()


def run_dispatch(reps: int) -> list[dict]:
    """--parts dispatch: two spawned gloo ranks (ep 2), every DISPATCH_CASES row."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dispatch_worker, args=(r, 2, port, reps, queue)) for r in range(2)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=3600)
    for p in procs:
        p.join()
    return rows


def print_dispatch(rows: list[dict]) -> None:
    print(f"{'T/rank':>6} {'E':>3} {'k':>2} {'G/M':>4} | rows/token sent (remote) "
          f"{'per-assignment':>16} {'once-per-rank':>15} | {'per-asg ms':>10} {'once ms':>8} {'once/per':>8}")
    for r in rows:
        pa, op = (f"{r[m + '_rows_per_token']:.2f} ({r[m + '_remote_rows_per_token']:.2f})" for m in DISPATCH_MODES)
        groups = f"{r['num_groups']}/{r['groups_per_token']}" if r["num_groups"] > 1 else "-"
        print(f"{r['tokens_per_rank']:>6} {r['num_experts']:>3} {r['top_k']:>2} {groups:>4} | "
              f"{'':>24} {pa:>16} {op:>15} | {r['per_assignment_ms']:10.1f} {r['once_per_rank_ms']:8.1f} "
              f"{_ratio(r['once_per_rank_ms'], r['per_assignment_ms']):>8}")


def run_shared(reps: int) -> dict:
    """--parts shared: the routed layer with and without a shared expert, and the plain
    FFN of the shared width (the dense roof of the shared part), one process."""
    from moe_train.moe.config import MoEConfig
    from moe_train.moe.layer import MoELayer

    T, D, F, E, k, Fs = SHARED_CASE
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(0)).requires_grad_()
    steps = {}
    for name, shared in (("routed", 0), ("routed_plus_shared", Fs)):
        cfg = MoEConfig(num_experts=E, top_k=k, d_ff=F, capacity_factor=1.25, shared_d_ff=shared,
                        activation="gelu")
        layer = MoELayer(cfg, D)
        steps[name] = _fwd_bwd(layer, x_TD, lambda x, _l=layer: _l(x).y.pow(2).mean())
    from moe_train.moe.shared import SharedExpert

    shared = SharedExpert(D, Fs, "gelu", gated=False)
    steps["shared_only"] = _fwd_bwd(shared, x_TD, lambda x: shared(x).pow(2).mean())
    steps["dense_shared_width"] = dense_step(x_TD, Fs)
    times = time_min_ms(steps, reps)
    extra = times["routed_plus_shared"] - times["routed"]
    return {"tokens": T, "d_model": D, "d_ff": F, "num_experts": E, "top_k": k, "shared_d_ff": Fs,
            **{f"{n}_ms": t for n, t in times.items()}, "shared_extra_ms": extra,
            "shared_only_over_dense": times["shared_only"] / times["dense_shared_width"],
            "shared_extra_over_dense": extra / times["dense_shared_width"]}


def print_shared(row: dict) -> None:
    print(f"T {row['tokens']}, D {row['d_model']}, {row['num_experts']} experts top-{row['top_k']} "
          f"(F {row['d_ff']}), shared_d_ff {row['shared_d_ff']}: routed {row['routed_ms']:.1f} ms, "
          f"routed + shared {row['routed_plus_shared_ms']:.1f} ms (+{row['shared_extra_ms']:.1f} ms, "
          f"{row['shared_extra_over_dense']:.2f}x the dense roof); the shared expert alone "
          f"{row['shared_only_ms']:.1f} ms against {row['dense_shared_width_ms']:.1f} ms for a plain "
          f"nn.Linear FFN of its width ({row['shared_only_over_dense']:.2f}x)")


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:6.2f}" if a and b else "     -"


def print_table(rows: list[dict]) -> None:
    print(f"{'E':>4} {'T':>6} {'F':>5} | {'ours':>7} {'dspeed':>7} {'dense':>7} {'exp.only':>8} | "
          f"{'DS/ours':>7} {'(>=)':>5} | {'ours/exp':>8} {'(<=)':>5} | {'ours/dense':>10} {'(<=)':>5}")
    for r in rows:
        E = r["num_experts"]
        ms = [r.get(k) for k in ("ours_ms", "deepspeed_ms", "dense_ms", "experts_only_ms")]
        cells = " ".join(f"{m:7.1f}" if m else "      -" for m in ms[:3]) + f" {ms[3]:8.1f}"
        print(f"{E:>4} {r['tokens']:>6} {r['d_ff']:>5} | {cells} | "
              f"{_ratio(ms[1], ms[0]):>7} {SPEEDUP_TARGET.get(E, math.nan):5.2f} | "
              f"{_ratio(ms[0], ms[3]):>8} {EXPERTS_TARGET:5.2f} | "
              f"{_ratio(ms[0], ms[2]):>10} {DENSE_TARGET.get(E, math.nan):5.2f}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (minimum reported)")
    parser.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))),
                        help="comma-separated indices into " + str(CASES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results to this path")
    parser.add_argument("--malloc", choices=("default", "keep"), default="keep",
                        help="'keep' (default, what moe_train's CPU training does): keep freed "
                             "memory in glibc's heap (moe_train.parallel.init.keep_freed_memory); "
                             "applies to every contender alike, they share the process")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: CUDA-event timing after a warm-up (see the module docstring)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="bf16: every contender with bf16 weights and inputs")
    parser.add_argument("--parts", default="layer",
                        help="comma-separated: layer (the table above), dispatch (ep 2 on gloo: "
                             "per-assignment vs once-per-rank), shared (shared expert vs dense roof)")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"layer", "dispatch", "shared"}:
        parser.error(f"--parts {args.parts}: choose from layer, dispatch, shared")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIPPED: --device cuda, but no CUDA device is visible (torch.cuda.is_available() is "
              "False); nothing was measured")
        return
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    os.environ.setdefault("DS_ACCELERATOR", args.device)  # DeepSpeed reads it once, at import
    dtype = DTYPES[args.dtype]
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.malloc == "keep":
        keep_freed_memory()
    indices = [int(i) for i in args.cases.split(",") if i.strip()]
    bad = [i for i in indices if not 0 <= i < len(CASES)]
    if bad:
        parser.error(f"--cases {args.cases}: indices must be in 0..{len(CASES) - 1}")
    where = "" if (args.device, args.dtype) == ("cpu", "fp32") else (
        f", device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"{args.dtype} weights and inputs")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps}, "
          f"malloc {args.malloc}, {_deepspeed_version()}{where}")
    rows = []
    if "layer" in parts:
        for i in indices:
            rows.append(run_case(*CASES[i], reps=args.reps, device=device, dtype=dtype))
            print_table(rows[-1:])
        print("\nall cases (ms; ratios with targets in parentheses):")
        print_table(rows)
    report = {"cases": rows, "threads": torch.get_num_threads(), "reps": args.reps, "malloc": args.malloc}
    if "dispatch" in parts:
        print("\nexpert-parallel dispatch, ep 2 on gloo (2 processes x 1 thread), dropless, GELU:")
        report["dispatch"] = run_dispatch(args.reps)
        print_dispatch(report["dispatch"])
    if "shared" in parts:
        print("\nshared expert against the dense roof (one process):")
        report["shared"] = run_shared(args.reps)
        print_shared(report["shared"])
    if args.json:
        if where:
            report.update(device=args.device, dtype=args.dtype)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
