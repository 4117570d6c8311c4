"""Local launch with signals that reach the trainers: ``moe-train launch`` (which
``launchers/train.sh`` and ``launchers/demo.sh`` run).

    moe-train launch --launcher deepspeed|torchrun|mpirun --nproc 2 -- \\
        --config configs/tiny_moe.yaml --set a.b=c

builds the launcher's command line for ``moe_train train``, prints it, and runs it in its
own process group. Launchers handle a SIGTERM badly for training: torchrun kills its
workers 30 s after forwarding it, the deepspeed launcher terminates the whole tree at
once, mpirun turns it into a kill. So this wrapper catches SIGTERM, SIGINT and SIGUSR1
itself and sends SIGUSR1 to the trainer processes only (the top-most descendants that
carry a rank in their environment; not the launchers, not DataLoader workers), which
makes them stop at the next step and write a checkpoint (``moe_train.train.control``), and then
waits up to ``--grace-s`` for the launcher to exit before ending it. Exit code: the
launcher's. (srun forwards signals to its tasks itself: ``launchers/slurm_srun.sh``.)
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

RANK_MARKERS = (b"LOCAL_RANK=", b"OMPI_COMM_WORLD_RANK=", b"PMI_RANK=")


def build_command(launcher: str, nproc: int, train_args: list[str], master_port: int) -> list[str]:
    train = ["train", *train_args]
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(master_port),
                "--module", "moe_train", *train]
    if launcher == "torchrun":
        return ["torchrun", "--standalone", "--nproc_per_node", str(nproc), "-m", "moe_train", *train]
    if launcher == "mpirun":
        extra = ["--allow-run-as-root"] if os.geteuid() == 0 else []
        return ["mpirun", *extra, "--oversubscribe", "-n", str(nproc), "-x", "OMP_NUM_THREADS", "-x", "PATH",
                sys.executable, "-m", "moe_train", *train]
    raise ValueError(f"--launcher {launcher!r}: must be deepspeed, torchrun or mpirun")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _has_rank(pid: int) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(item.startswith(m) for item in environ for m in RANK_MARKERS)


def trainer_pids(root: int) -> list[int]:
    """The top-most descendants of ``root`` with a rank in their environment."""
    tree, found, todo = _children(), [], list(_children().get(root, []))
    while todo:
        pid = todo.pop()
        if _has_rank(pid):
            found.append(pid)  # its own children (DataLoader workers) are not trainers
        else:
            todo.extend(tree.get(pid, []))
    return sorted(found)


def run(cmd: list[str], grace_s: float) -> int:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)  # keeps terminal signals ours to route
    deadline = [None]

    def forward(signum, frame):
        pids = trainer_pids(proc.pid)
        name = signal.Signals(signum).name
        print(f"[launch] {name}: sending SIGUSR1 to trainers {pids}; they checkpoint and stop "
              f"(grace {grace_s:.0f} s)", file=sys.stderr, flush=True)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        deadline[0] = deadline[0] or time.monotonic() + grace_s

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if deadline[0] is not None and time.monotonic() > deadline[0]:
                print(f"[launch] grace period of {grace_s:.0f} s over: terminating the launcher",
                      file=sys.stderr, flush=True)
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    return proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    return proc.wait()
