"""Runs a function on N real gloo ranks (separate processes) and collects the results.

A rank that raises makes the whole call fail with that rank's traceback; a rank that
hangs past ``timeout_s`` is killed and the failure names the ranks still running, so a
broken collective fails the test instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import torch
import torch.distributed as dist

from moe_train.parallel.spawn import free_local_port, run_local_processes

free_port = free_local_port


def _worker(rank, world_size, port, out_dir, fn, kwargs):
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        result = fn(rank, world_size, **kwargs)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report every failure to the parent, with its traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, timeout_s: float = 180, **kwargs) -> list:
    """Calls ``fn(rank, world_size, **kwargs)`` on ``world_size`` gloo ranks; returns
    the list of per-rank return values (anything ``torch.save`` can store)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        codes = run_local_processes(_worker, [(r, world_size, port, out_dir, fn, kwargs)
                                              for r in range(world_size)], timeout_s)
        alive = [r for r, code in enumerate(codes) if code is None]
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                raise AssertionError(f"rank {r} produced no result (still running after "
                                     f"{timeout_s}s: ranks {alive}; exit code {codes[r]})")
            out = torch.load(path, weights_only=False)
            if not out["ok"]:
                raise AssertionError(f"rank {r} failed:\n{out['error']}")
            results.append(out["result"])
        return results
