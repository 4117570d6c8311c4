"""Checkpoint size and speed: the engine checkpoint and the canonical one side by side,
against the analytic size.

For each config, on 2 spawned gloo ranks on this CPU at (world 2, ep 2, ZeRO 2, fp32),
after one real optimizer step (so every AdamW moment exists):
  engine     ``moe_train.checkpoint.save_checkpoint`` (model_dense.pt, experts_ep*.pt,
             rank*.pt with each rank's ZeRO partition and RNG) and the load a same-layout
             resume does (weights by global expert id, then each rank's optimizer file);
  canonical  ``moe_train.checkpoint.canonical.save`` (DCP: masters, moments and steps by name, experts
             [E, ...] written by their own ranks) and the load a resume on any layout does
             (DCP read at this layout, checked against the manifest, set through the
             accessors, weights refreshed from the masters).
Times are the slowest rank's, between barriers, MIN over --repeats; both include the
manifest's CRC-32 of every byte written; loads read files the save just wrote (the OS
page cache: the cost of deserialising and placing, not of a cold disk). Bytes are every
file of the checkpoint on disk (meta.json included).

What a save costs besides time, per rank: its peak RSS above its RSS when the save
began (``VmHWM`` reset through ``/proc/self/clear_refs``, MAX over --repeats; glibc's
free memory is handed back first, ``malloc_trim``, so the save cannot reuse pages an
earlier step left resident unseen), and the collectives it called through
``torch.distributed`` (DeepSpeed's accessors, DCP and moe_train all call them there). Set against the dense state (12 bytes a
dense parameter: what gathering it whole on every rank would hold) and the number of
master/moment tensors (one collective each is what gathering per tensor costs).

Analytic size: each parameter once (every expert once), as an fp32 master plus AdamW's two
fp32 moments, 12 bytes a parameter (``sizing.param_counts``), plus the persistent buffers
(the router's selection bias). Target: within 5% of it (DeepSpeed users have met
checkpoints several times too large, DeepSpeed #2389).

  python -m benchmarks.checkpoint [--configs tiny,medium,large] [--repeats 2] [--json PATH]
                                  [--baseline OLD.json]

"tiny" is configs/tiny_moe.yaml; "medium" (~19M parameters, 13M of them in experts) and
"large" (~71M, 50M in experts) run on a 2-core 24 GiB machine in a few minutes.
``--baseline``: a --json this benchmark wrote from other code (e.g. a checkout before a
change); the canonical save's time, peak RSS and collectives are printed beside it and
kept under "baseline" in the new --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

TINY_YAML = Path(__file__).resolve().parent.parent / "configs" / "tiny_moe.yaml"
WORLD, EP, ZERO = 2, 2, 2
TARGET = 0.05  # within 5% of the analytic size
CONFIGS = {
    "tiny": [],
    "medium": ["model.vocab_size=8192", "model.d_model=256", "model.num_layers=8", "model.num_heads=4",
               "model.d_ff=1024", "model.max_seq_len=64", "moe.num_experts=8", "moe.d_ff=512",
               "data.seq_len=64", "data.micro_batch_size=1"],
    "large": ["model.vocab_size=8192", "model.d_model=512", "model.num_layers=8", "model.num_heads=8",
              "model.d_ff=2048", "model.max_seq_len=64", "moe.num_experts=8", "moe.d_ff=1024",
              "data.seq_len=64", "data.micro_batch_size=1"],
}


def bench_config(name: str):
    from moe_train.config import load_config

    if name not in CONFIGS:
        raise ValueError(f"--configs {name}: must be one of {', '.join(CONFIGS)}")
    return load_config(TINY_YAML, CONFIGS[name] + [
        f"parallel.expert_parallel_size={EP}", f"parallel.zero_stage={ZERO}", "train.dtype=fp32",
        "logging.tensorboard=false", "parallel.device=cpu", "parallel.backend=gloo"])


def analytic_bytes(cfg, model) -> int:
    """12 bytes a parameter (fp32 master + 2 AdamW moments), each expert once, plus the
    persistent buffers."""
    from moe_train.model.sizing import param_counts

    keys = set(model.state_dict(keep_vars=True))
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n in keys)
    return 12 * param_counts(cfg.model, cfg.moe).total + buffers


def _dir_bytes(path: Path, recursive: bool = False) -> int:
    files = path.rglob("*") if recursive else path.iterdir()
    return sum(p.stat().st_size for p in files if p.is_file())


def _canonical_parts(path: Path) -> dict:
    """Where a canonical checkpoint's bytes go besides tensor data: DCP's index, meta.json
    (manifest, config), and the container torch.save wraps around each stored tensor."""
    import json as json_

    tensors = json_.loads((path / "meta.json").read_text())["manifest"]["tensors"]
    data = sum(torch.empty((), dtype=getattr(torch, rec["dtype"])).element_size() * _prod(rec["shape"])
               for rec in tensors.values())
    files = sum(p.stat().st_size for p in path.glob("*.distcp"))
    return {"tensors": len(tensors), "index_bytes": (path / ".metadata").stat().st_size,
            "meta_bytes": (path / "meta.json").stat().st_size, "tensor_header_bytes": files - data}


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _timed(fn, world: int) -> float:
    """Seconds ``fn`` took on the slowest rank (a barrier before, a MAX after)."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


COLLECTIVES = ("all_reduce", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "gather",
               "gather_object", "broadcast", "broadcast_object_list", "scatter", "scatter_object_list",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "send",
               "recv", "isend", "irecv", "batch_isend_irecv")


class _Counted:
    """Counts, while active, the collectives called through ``torch.distributed``."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def __enter__(self):
        import torch.distributed as dist

        self._saved = {name: getattr(dist, name) for name in COLLECTIVES}
        for name, fn in self._saved.items():
            setattr(dist, name, self._counting(name, fn))
        return self

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _costed(fn, world: int) -> tuple[float, list[int], dict[str, int]]:
    """(seconds on the slowest rank, every rank's peak RSS above its RSS before, the
    collectives this rank called) of ``fn``; a collective."""
    import torch.distributed as dist

    _release_free_memory()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
        f.write("5")
    before, counted = _status_bytes("VmRSS"), _Counted()

    def counting():
        with counted:
            fn()

    took = _timed(counting, world)
    peaks = [torch.zeros((), dtype=torch.int64) for _ in range(world)]
    dist.all_gather(peaks, torch.tensor(_status_bytes("VmHWM") - before))
    return took, [int(p) for p in peaks], counted.calls


def _one_step(engine, cfg) -> None:
    """One optimizer step on random tokens, so every AdamW moment exists."""
    from moe_train.moe.losses import total_loss

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch_size, cfg.data.seq_len + 1), generator=g)
    engine.ds.set_gradient_accumulation_boundary(True)
    out = engine.ds(tokens[:, :-1], tokens[:, 1:])
    engine.ds.backward(total_loss(out.lm_loss, out.moe_losses, cfg.moe, out.moe_seq_losses))
    engine.ds.step()


def measure(name: str, rank: int, root: Path, repeats: int) -> dict:
    """Both checkpoints of config ``name`` saved and loaded ``repeats`` times (collective)."""
    import moe_train.checkpoint as ckpt
    import moe_train.checkpoint.canonical as canonical
    from moe_train.checkpoint.engine_format import load_rank_state
    from moe_train.checkpoint.optimizer_state import load_optimizer_state
    from moe_train.config import config_to_dict
    from moe_train.model.build import build_model
    from moe_train.model.sizing import param_counts
    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.topology import Topology
    from moe_train.train.engine import build_engine

    cfg = bench_config(name)
    topo = Topology(WORLD, EP, cfg.moe.num_experts)
    groups = build_groups(topo, rank)
    model = build_model(cfg, groups, torch.device("cpu"))
    engine = build_engine(cfg, model, groups)
    _one_step(engine, cfg)
    raw, state = config_to_dict(cfg), ckpt.TrainState(step=1, loader_states=[{}] * WORLD)
    kwargs = dict(model=engine.module, optimizer=engine.optimizer, state=state)
    times: dict[str, list[float]] = {k: [] for k in ("engine_save", "engine_load", "canonical_save",
                                                     "canonical_load")}
    peaks: dict[str, list[list[int]]] = {"engine": [], "canonical": []}
    path = root / ckpt.step_dir_name(1)

    def costed(kind: str, fn) -> dict:
        took, peak, calls = _costed(fn, WORLD)
        times[f"{kind}_save"].append(took)
        peaks[kind].append(peak)
        return calls

    for _ in range(repeats):
        engine_calls = costed("engine", lambda: ckpt.save_checkpoint(
            root, topo=topo, rank=rank, config=raw, keep_last=1, **kwargs))

        def engine_load():
            ckpt.load_model_weights(path, engine.module, topo, rank)
            load_optimizer_state(engine.optimizer, load_rank_state(path, rank)["optimizer"], WORLD)

        times["engine_load"].append(_timed(engine_load, WORLD))
        canonical_calls = costed("canonical", lambda: canonical.save(path, groups=groups, config=raw, **kwargs))

        def canonical_load():
            loaded = canonical.load(path / canonical.DIRNAME, engine.module, groups)
            canonical.apply_to_model(engine.module, loaded)
            canonical.restore_optimizer(engine.optimizer, engine.module, loaded)

        times["canonical_load"].append(_timed(canonical_load, WORLD))
    files = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
    counts = param_counts(cfg.model, cfg.moe)
    peak = {kind: [max(p[r] for p in peaks[kind]) for r in range(WORLD)] for kind in peaks}
    return {"engine": {"save_s": min(times["engine_save"]), "load_s": min(times["engine_load"]),
                       "bytes": sum(files.values()),
                       "weights_bytes": sum(v for k, v in files.items() if k.startswith(("model_", "experts_"))),
                       "rank_files_bytes": sum(v for k, v in files.items() if k.startswith("rank")),
                       "save_peak_rss_bytes": peak["engine"], "save_collectives": engine_calls},
            "canonical": {"save_s": min(times["canonical_save"]), "load_s": min(times["canonical_load"]),
                          "bytes": _dir_bytes(path / canonical.DIRNAME), **_canonical_parts(path / canonical.DIRNAME),
                          "save_peak_rss_bytes": peak["canonical"], "save_collectives": canonical_calls},
            "analytic_bytes": analytic_bytes(cfg, engine.module),
            "dense_state_bytes": 12 * counts.dense, "expert_state_bytes_per_rank": 12 * counts.expert // EP,
            "state_tensors": 3 * len(list(engine.module.parameters())),
            "parameters": counts.total}


def _release_free_memory() -> None:
    """glibc's ``malloc_trim(0)``: the memory freed before a save, which malloc keeps
    resident to reuse, handed back to the OS, so that what the save allocates shows in
    its RSS instead of hiding in pages an earlier step left behind."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rank_main(rank: int, port: int, names: list[str], root: str, repeats: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    import torch.distributed as dist

    from moe_train.parallel.init import init_distributed

    try:
        init_distributed("cpu", "gloo", 1800, always_group=True)
        result = {}
        for name in names:
            result[name] = measure(name, rank, Path(root) / name, repeats)
        Path(out).write_text(json.dumps({"ok": True, "result": result}))
    except BaseException:
        Path(out).write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(names: list[str], repeats: int, root: Optional[str] = None, timeout_s: float = 1800) -> dict:
    """Spawns the ranks; returns {"configs": {name: {...}}} as rank 0 measured it."""
    from moe_train.parallel.spawn import free_local_port, run_local_processes

    port = free_local_port()
    work = Path(root or tempfile.mkdtemp(prefix="ckpt_bench_"))
    try:
        outs = [str(work / f"rank{r}.json") for r in range(WORLD)]
        codes = run_local_processes(_rank_main, [(r, port, names, str(work), repeats, outs[r])
                                                 for r in range(WORLD)], timeout_s)
        if None in codes:
            raise RuntimeError(f"rank {codes.index(None)} still running after {timeout_s:.0f} s; killed")
        got = [json.loads(Path(o).read_text()) if Path(o).exists() else None for o in outs]
        for r, g in enumerate(got):
            if g is None or not g["ok"]:
                raise RuntimeError(f"rank {r} failed: {g['error'] if g else f'exit code {codes[r]}'}")
        return {"configs": got[0]["result"]}
    finally:
        if root is None:
            shutil.rmtree(work, ignore_errors=True)


def print_table(report: dict) -> None:
    threads = max(1, (os.cpu_count() or 1) // WORLD)
    print(f"\ncheckpoint save/load at world {WORLD}, ep {EP}, ZeRO {ZERO}, fp32, gloo on CPU "
          f"({threads} thread(s) a rank); slowest rank, min over repeats; loads from the page cache")
    print(f"{'config':>6} {'params':>8} {'analytic MiB':>12} | {'engine save s':>13} {'load s':>7} "
          f"{'MiB':>8} {'x analytic':>10} | {'canonical save s':>16} {'load s':>7} {'MiB':>8} "
          f"{'x analytic':>10} | canonical/engine: save load bytes")
    for name, r in report["configs"].items():
        a, e, c = r["analytic_bytes"], r["engine"], r["canonical"]
        print(f"{name:>6} {r['parameters'] / 1e6:7.2f}M {a / 2 ** 20:12.2f} | {e['save_s']:13.3f} "
              f"{e['load_s']:7.3f} {e['bytes'] / 2 ** 20:8.2f} {e['bytes'] / a:10.3f} | {c['save_s']:16.3f} "
              f"{c['load_s']:7.3f} {c['bytes'] / 2 ** 20:8.2f} {c['bytes'] / a:10.3f} | "
              f"{c['save_s'] / e['save_s']:.2f} {c['load_s'] / e['load_s']:.2f} {c['bytes'] / e['bytes']:.2f}")
    for name, r in report["configs"].items():
        a, e, c = r["analytic_bytes"], r["engine"], r["canonical"]
        verdict = lambda b: "ok" if abs(b / a - 1) <= TARGET else "MISS"  # noqa: E731
        print(f"{name}: canonical {c['bytes'] / a - 1:+.1%} of analytic ({verdict(c['bytes'])}): fixed costs "
              f"DCP index {c['index_bytes'] / 2 ** 10:.0f} KiB + meta.json (manifest, config) "
              f"{c['meta_bytes'] / 2 ** 10:.0f} KiB + torch.save headers of {c['tensors']} tensors "
              f"{c['tensor_header_bytes'] / 2 ** 10:.0f} KiB")
        print(f"{name}: engine "
              f"{e['bytes'] / a - 1:+.1%} of analytic ({verdict(e['bytes'])}): model weights {e['weights_bytes'] / 2 ** 20:.2f} "
              f"MiB (fp32, = 4 B a parameter) + ZeRO rank files {e['rank_files_bytes'] / 2 ** 20:.2f} MiB "
              f"(Adam's 2 moments, 8 B a parameter; at fp32 ZeRO's master partition is not stored "
              f"again but rebuilt from the weights: moe_train.checkpoint.optimizer_state)")


def _calls(calls: Optional[dict]) -> str:
    """"total (of them on tensors: by name)"; the rest move pickled objects or wait."""
    if calls is None:
        return "-"
    data = {k: n for k, n in sorted(calls.items()) if "object" not in k and k != "barrier"}
    return f"{sum(calls.values())} ({sum(data.values())} on tensors{': ' if data else ''}" \
           f"{', '.join(f'{n} {k}' for k, n in data.items())})"


def _mib(values: Optional[list]) -> str:
    return "-" if not values else "/".join(f"{v / 2 ** 20:.0f}" for v in values)


def print_costs(report: dict) -> None:
    """The saves' peak RSS and collectives against the state they move."""
    print(f"\nwhat a save costs per rank: peak RSS above the RSS it began with (MiB, rank "
          f"{'/'.join(str(r) for r in range(WORLD))}, max over repeats) and the collectives rank 0 called")
    print(f"{'config':>6} {'params':>8} {'dense state MiB':>15} {'experts MiB/rank':>16} {'tensors':>7} | "
          f"{'engine RSS':>10} {'collectives':<28} | {'canonical RSS':>13} collectives")
    for name, r in report["configs"].items():
        e, c = r["engine"], r["canonical"]
        print(f"{name:>6} {r['parameters'] / 1e6:7.2f}M {r.get('dense_state_bytes', 0) / 2 ** 20:15.1f} "
              f"{r.get('expert_state_bytes_per_rank', 0) / 2 ** 20:16.1f} {r.get('state_tensors', 0):7d} | "
              f"{_mib(e.get('save_peak_rss_bytes')):>10} {_calls(e.get('save_collectives')):<28} | "
              f"{_mib(c.get('save_peak_rss_bytes')):>13} {_calls(c.get('save_collectives'))}")


def print_baseline(report: dict, baseline: dict) -> None:
    """The canonical save here beside ``baseline`` (the same benchmark, other code)."""
    print("\ncanonical save, baseline -> this code (time: slowest rank, min over repeats; RSS: per rank; "
          "collectives: rank 0)")
    print(f"{'config':>6} {'params':>8} | {'save s':>15} | {'peak RSS MiB':>21} | collectives")
    for name, r in report["configs"].items():
        old = baseline.get("configs", {}).get(name)
        if old is None:
            continue
        o, c = old["canonical"], r["canonical"]
        o_calls, c_calls = o.get("save_collectives"), c.get("save_collectives")
        print(f"{name:>6} {r['parameters'] / 1e6:7.2f}M | {o['save_s']:6.3f} -> {c['save_s']:6.3f} | "
              f"{_mib(o.get('save_peak_rss_bytes')):>9} -> {_mib(c.get('save_peak_rss_bytes')):<9} | "
              f"{_calls(o_calls)} -> {_calls(c_calls)}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,medium,large", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="write {\"configs\": {NAME: {engine, canonical, "
                                                     "analytic_bytes}}} here")
    parser.add_argument("--dir", default=None, help="keep the checkpoints here (default: a temporary dir)")
    parser.add_argument("--baseline", default=None, help="a --json of this benchmark from other code: its "
                                                         "canonical save printed beside this one's")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    for name in names:
        bench_config(name)  # a bad name fails before any process starts
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    report = run(names, args.repeats, args.dir)
    print_table(report)
    print_costs(report)
    if baseline is not None:
        print_baseline(report, baseline)
        report["baseline"] = {"from": args.baseline, "configs": {
            name: {"canonical": {k: v for k, v in r["canonical"].items()
                                 if k in ("save_s", "save_peak_rss_bytes", "save_collectives")}}
            for name, r in baseline.get("configs", {}).items() if name in report["configs"]}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
