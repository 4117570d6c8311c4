"""Local multi-process runs without a launcher: a free port for the rendezvous, and N
spawned processes waited on to one shared deadline, stragglers killed.

Used where moe_train starts its own ranks on one machine (``moe-train ckpt canonical``
converting at the saved world size, the benchmarks' gloo ranks, the tests' ``run_ranks``):
a rank that hangs in a collective must end the run with an error naming it, not hang it.
"""

from __future__ import annotations

import socket
import time
from typing import Callable, Optional


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_processes(target: Callable, args_per_rank: list[tuple], timeout_s: float) -> list[Optional[int]]:
    """Runs ``target(*args_per_rank[r])`` in one spawned process per rank and waits for
    all of them, ``timeout_s`` in all. Returns each rank's exit code; a rank still
    running at the deadline is killed and its code is None. Results travel through
    whatever the target writes (files the caller reads afterwards)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_per_rank]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes: list[Optional[int]] = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes
