"""Measure a config's training memory per rank: the allocator's peak, by phase.

The phases: ``build`` (``build_model``), ``engine`` (``build_engine``), then per step
``forward``, ``backward`` and ``step`` as ``train_step`` marks them (``PHASE.enter``):
the per-step agreement all-reduce counts as forward, the gradient-norm all-reduce as step.
Per phase, ``peak`` is the most bytes live at any moment of it (over every step run),
``peaks`` that peak per occurrence (per step) and ``end`` the bytes live when it ended
(its last occurrence), all counted from just before the model is built (what the process
held before is not the run's). Later steps can peak higher than the first by a buffer an
asynchronous reduction still holds: gloo's worker thread releases it when it gets to it,
sometimes after the next forward has begun, so on a busy machine peaks vary by up to one
reduction buffer from run to run.

How bytes are counted:
  CUDA  ``torch.cuda.max_memory_allocated`` (what the caching allocator handed out; its
        reserve is not counted), reset at every phase change.
  CPU   the PyTorch profiler with ``profile_memory=True`` records every allocation and
        free of torch's CPU allocator as a ``[memory]`` event with a signed byte count;
        summed in time order they give the live bytes at every instant, and zero-length
        ``memory_probe:<phase>`` events mark the phase changes on the same clock. This is
        the allocator's count (``torch.empty`` of 2 GB counts 2 GB, touched or not), not
        RSS. Not seen: buffers gloo allocates outside torch's allocator, Python objects.
        tests/test_memory_plan.py checks the count against hand-counted tensors.

``measure(config_path, overrides, world_size)`` runs ``world_size`` gloo ranks on this
machine (``parallel.spawn``), each building the model and engine of the config and taking
``steps`` training steps on random token ids, and returns every rank's phases.
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

PHASES = ("build", "engine", "forward", "backward", "step")
# train_step's PHASE labels (their starts) -> our phase; other labels (the collectives
# of parallel/comm.py) leave the phase as it is.
_STEP_LABELS = (("forward of", "forward"), ("the per-step agreement", "forward"), ("backward of", "backward"),
                ("gradient-norm", "step"), ("optimizer step", "step"))


class CpuMemoryTracker:
    """Live bytes of torch's CPU allocator over time, from the profiler's memory events
    (module docstring). ``mark(phase)`` starts a phase; after the ``with`` block,
    ``phases()`` gives {phase: {"peak", "end"}} in bytes."""

    def __init__(self):
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                            profile_memory=True)
        self.result: dict[str, dict[str, int]] = {}

    def __enter__(self) -> "CpuMemoryTracker":
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mark("end")
        self._prof.__exit__(*exc)
        if exc[0] is None:
            self.result = self._walk()

    def mark(self, phase: str) -> None:
        with torch.profiler.record_function(f"memory_probe:{phase}"):
            pass

    def _walk(self) -> dict[str, dict[str, int]]:
        events = sorted(((e.start_ns(), i, e) for i, e in enumerate(self._prof.profiler.kineto_results.events())
                         if e.name() == "[memory]" or e.name().startswith("memory_probe:")),
                        key=lambda t: (t[0], t[1]))
        live, phase, out = 0, None, {}
        for _, _, e in events:
            if e.name() == "[memory]":
                live += e.nbytes()
                if phase is not None:
                    got = out[phase]
                    got["peak"], got["peaks"][-1] = max(got["peak"], live), max(got["peaks"][-1], live)
                continue
            if phase is not None:
                out[phase]["end"] = live
            phase = e.name().split(":", 1)[1]
            if phase == "end":
                phase = None
                continue
            out.setdefault(phase, {"peak": live, "end": live, "peaks": []})
            out[phase]["peak"] = max(out[phase]["peak"], live)
            out[phase]["peaks"].append(live)
        return out

    def phases(self) -> dict[str, dict[str, int]]:
        return self.result


class CudaMemoryTracker:
    """The same phases from ``torch.cuda.max_memory_allocated``, reset at each mark."""

    def __init__(self, device):
        self.device, self.phase, self.base = device, None, 0
        self.result: dict[str, dict[str, int]] = {}

    def __enter__(self) -> "CudaMemoryTracker":
        torch.cuda.synchronize(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.mark("end")

    def mark(self, phase: str) -> None:
        torch.cuda.synchronize(self.device)
        if self.phase is not None:
            got = self.result.setdefault(self.phase, {"peak": 0, "end": 0, "peaks": []})
            got["peaks"].append(torch.cuda.max_memory_allocated(self.device) - self.base)
            got["peak"] = max(got["peak"], got["peaks"][-1])
            got["end"] = torch.cuda.memory_allocated(self.device) - self.base
        torch.cuda.reset_peak_memory_stats(self.device)
        self.phase = None if phase == "end" else phase

    def phases(self) -> dict[str, dict[str, int]]:
        return self.result


@contextmanager
def _step_phases(tracker):
    """Marks ``train_step``'s phases on ``tracker`` by listening to ``PHASE.enter`` (the
    process-wide phase label the watchdog reads), for the duration of the block."""
    from moe_train.parallel.phase import PHASE

    current = {"phase": None}

    def enter(label, *args, **kwargs):
        for prefix, phase in _STEP_LABELS:
            if label.startswith(prefix) and phase != current["phase"]:
                current["phase"] = phase
                tracker.mark(phase)
        return original(label, *args, **kwargs)

    original = PHASE.enter
    PHASE.enter = enter  # an instance attribute, shadowing the method until restored
    try:
        yield
    finally:
        del PHASE.enter


def measure_rank(cfg, groups, device, steps: int) -> dict:
    """Builds the model and engine of ``cfg`` and takes ``steps`` steps on random token
    ids, tracking memory (module docstring). Returns {"phases": {phase: {peak, end}},
    "peak": the largest, "param_bytes", "optimizer_bytes"} for this rank."""
    from moe_train.model.build import build_model
    from moe_train.train.control import StopRequest
    from moe_train.train.engine import build_engine
    from moe_train.train.step import train_step

    gen = torch.Generator().manual_seed(groups.rank)
    shape = (cfg.data.micro_batch_size, cfg.data.seq_len + 1)
    ids = [torch.randint(0, cfg.model.vocab_size, shape, generator=gen).to(device) for _ in range(2)]
    batches = [{"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()} for t in ids]

    def stream():
        i = 0
        while True:
            yield batches[i % len(batches)]
            i += 1

    tracker = CudaMemoryTracker(device) if device.type == "cuda" else CpuMemoryTracker()
    with tracker:
        tracker.mark("build")
        model = build_model(cfg, groups, device)
        tracker.mark("engine")
        engine = build_engine(cfg, model, groups)
        with _step_phases(tracker):
            data, stop = stream(), StopRequest()
            for step in range(1, steps + 1):
                train_step(engine, data, cfg, groups, device, step, stop)
    phases = tracker.phases()
    return {"phases": phases, "peak": max(p["peak"] for p in phases.values()),
            "param_bytes": _unique_bytes(engine.module.parameters()),
            "optimizer_bytes": _optimizer_bytes(engine),
            "reduce_bucket_size": int(getattr(engine.optimizer, "reduce_bucket_size", 0))}


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _optimizer_bytes(engine) -> int:
    """The torch optimizer's state plus the tensors it updates that are not model
    parameters (DeepSpeed's fp32 master partitions)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    model = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    master = [p for g in opt.param_groups for p in g["params"] if p.untyped_storage().data_ptr() not in model]
    return _unique_bytes(state + master)


def _rank_main(rank: int, world: int, port: int, config_path: Optional[str], overrides: list[str],
               steps: int, out_dir: str) -> None:
    """One spawned gloo rank of ``measure``: writes rank<r>.json (result or traceback)."""
    os.environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    path = Path(out_dir, f"rank{rank}.json")
    try:
        import logging

        import torch.distributed as dist

        from moe_train.config import load_config
        from moe_train.parallel.groups import build_groups
        from moe_train.parallel.init import init_distributed
        from moe_train.parallel.topology import Topology

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        torch.set_num_threads(1)
        cfg = load_config(config_path, overrides)
        env, device = init_distributed("cpu", "gloo", 300, always_group=True)
        try:
            groups = build_groups(Topology(world, cfg.parallel.expert_parallel_size, cfg.moe.num_experts), rank)
            result = measure_rank(cfg, groups, device, steps)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        path.write_text(json.dumps({"ok": True, "result": result}))
    except BaseException:  # the parent reports it, with this traceback
        path.write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))


def measure(config_path: Optional[str], overrides: list[str], world_size: int, steps: int = 3,
            timeout_s: float = 900) -> list[dict]:
    """Runs ``world_size`` CPU gloo ranks of the config for ``steps`` steps; returns each
    rank's ``measure_rank`` result. Raises RuntimeError naming a rank that failed or hung."""
    from moe_train.parallel.spawn import free_local_port, run_local_processes

    port = free_local_port()
    with tempfile.TemporaryDirectory() as out_dir:
        args = [(r, world_size, port, None if config_path is None else str(config_path), list(overrides),
                 steps, out_dir) for r in range(world_size)]
        codes = run_local_processes(_rank_main, args, timeout_s)
        results = []
        for r in range(world_size):
            path = Path(out_dir, f"rank{r}.json")
            if codes[r] is None:
                raise RuntimeError(f"memory probe rank {r} still running after {timeout_s} s; killed")
            if not path.exists():
                raise RuntimeError(f"memory probe rank {r} exited with code {codes[r]} and no result")
            got = json.loads(path.read_text())
            if not got["ok"]:
                raise RuntimeError(f"memory probe rank {r} failed:\n{got['error']}")
            results.append(got["result"])
    return results
