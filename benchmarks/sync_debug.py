"""Host synchronisations per training step, counted the way the device sees them.

    python -m benchmarks.sync_debug [--device cpu|cuda] [--config tiny|switch8] [--steps 5]

Runs ``moe_train.train.step.train_step`` (forward, backward, DeepSpeed's optimizer step)
on one process for the MoE model of the config, once in capacity mode (the config's
capacity factor) and once dropless, and counts per step:
  cuda  the warnings of ``torch.cuda.set_sync_debug_mode("warn")``: every operation that
        synchronised the host with the GPU (``.item()``, ``nonzero``, a blocking copy...);
  cpu   the host reads ``benchmarks.host_reads.HostReads`` counts (what would be such a
        synchronisation on a GPU; a CPU has nothing to synchronise).
Both split the count into the forward + backward (where a read stalls the queue of
kernels; 0 expected in capacity mode, 1 per MoE layer per micro-batch dropless) and the
rest of the step (the optimizer step and the agreement flags read after it, which
synchronise anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections import Counter

import torch

from benchmarks.host_reads import HostReads
from benchmarks.train_step import CONFIGS, _quiet_deepspeed, bench_config, synthetic_batches


class SyncCounter:
    """Counts synchronisations by region ("model" = forward + backward, "step" = the rest)."""

    def __init__(self, device: torch.device):
        self.device, self.counts, self.region = device, Counter(), "step"
        self.what: Counter = Counter()

    @contextlib.contextmanager
    def counting(self):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self._caught = caught
                try:
                    yield self
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                    self._flush()
        else:
            with HostReads() as reads:
                self._reads = reads
                yield self
                self._flush()

    def _flush(self) -> None:
        if not hasattr(self, "_caught" if self.device.type == "cuda" else "_reads"):
            return  # not counting yet (the warm-up steps)
        if self.device.type == "cuda":
            found = [str(w.message).splitlines()[0][:80] for w in self._caught
                     if "synchroniz" in str(w.message).lower()]
            self._caught.clear()
        else:
            found = list(self._reads.reads)
            self._reads.events.clear()
        self.counts[self.region] += len(found)
        self.what.update(f"{self.region}: {w}" for w in found)

    def enter(self, region: str) -> None:
        self._flush()
        self.region = region


def wrap_engine(engine, counter: SyncCounter) -> None:
    """Forward and backward calls count as "model", everything else as "step"."""
    ds = engine.ds
    for method in ("forward", "backward"):
        real = getattr(ds, method)

        def counted(*args, _real=real, **kwargs):
            counter.enter("model")
            try:
                return _real(*args, **kwargs)
            finally:
                counter.enter("step")
        setattr(ds, method, counted)


def run(config: str, capacity_factor, device: torch.device, steps: int, groups) -> dict:
    from moe_train.model.build import build_model
    from moe_train.train.control import StopRequest
    from moe_train.train.engine import build_engine
    from moe_train.train.step import train_step

    cfg = bench_config(config, capacity_factor=capacity_factor,
                       dtype="bf16" if device.type == "cuda" else "fp32")
    cfg.logging.every_steps = 10 ** 9  # no logging step inside the count
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, build_model(cfg, groups, device), groups)
    batches, stop = synthetic_batches(cfg, device), StopRequest()
    counter = SyncCounter(device)
    wrap_engine(engine, counter)
    for step in (1, 2):  # warm-up: kernel choices, the first-call agreement checks
        train_step(engine, batches, cfg, groups, device, step, stop)
    with counter.counting():
        for step in range(3, 3 + steps):
            train_step(engine, batches, cfg, groups, device, step, stop)
    moe_layers = sum(1 for i in range(cfg.model.num_layers) if cfg.model.is_moe_block(i))
    return {"model": counter.counts["model"] / steps, "step": counter.counts["step"] / steps,
            "moe_layers": moe_layers, "micro_batches": cfg.train.grad_accum_steps,
            "what": {k: v / steps for k, v in counter.what.most_common(8)}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--config", choices=tuple(CONFIGS), default="tiny")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIPPED: --device cuda, but no CUDA device is visible; nothing was measured")
        return {}
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    _quiet_deepspeed()
    import torch.distributed as dist

    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.init import init_distributed
    from moe_train.parallel.topology import Topology

    env, device = init_distributed(args.device, "auto", 600, always_group=True)
    kind = "set_sync_debug_mode warnings" if device.type == "cuda" else "host reads (HostReads)"
    results = {}
    try:
        groups = build_groups(Topology(1, 1, bench_config(args.config).moe.num_experts), 0)
        for label, cf in (("capacity 1.25", 1.25), ("dropless", None)):
            r = run(args.config, cf, device, args.steps, groups)
            results[label] = r
            print(f"{args.config} {label}: {kind} per step: {r['model']:g} in forward + backward "
                  f"({r['moe_layers']} MoE layers x {r['micro_batches']} micro-batches), "
                  f"{r['step']:g} in the rest of the step; {r['what']}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
