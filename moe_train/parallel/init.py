"""Distributed start-up: where rank and world come from, which device and backend.

Rank discovery, in order:
  1. torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.
  2. Slurm (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR must be set by
     the sbatch script (from ``scontrol show hostnames``), never guessed from the login node.
  3. MPI (mpirun/mpiexec): OMPI_COMM_WORLD_* / PMI_* variables, or mpi4py's COMM_WORLD;
     rank 0's address is broadcast through MPI when MASTER_ADDR is unset.
  4. Nothing: a single process, world size 1.

The device and the backend are chosen here and nowhere else: CUDA + NCCL when a GPU is
visible (``parallel.device: auto``), otherwise CPU + gloo.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from moe_train.parallel.spawn import free_local_port


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm", "mpi" or "single"


def _int_env(environ: Mapping[str, str], name: str) -> Optional[int]:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _mpi_env(environ: Mapping[str, str]) -> Optional[tuple[int, int, int]]:
    for prefix in ("OMPI_COMM_WORLD_", "PMI_", "PMIX_"):
        rank, size = _int_env(environ, prefix + "RANK"), _int_env(environ, prefix + "SIZE")
        if rank is not None and size is not None:
            local = _int_env(environ, prefix + "LOCAL_RANK") or _int_env(environ, "MPI_LOCALRANKID") or 0
            return rank, size, local
    return None


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expands a Slurm node list (``n[1-3],gpu7``) with ``scontrol show hostnames``."""
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise ValueError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with `scontrol show "
                         f"hostnames`: {err}; export MASTER_ADDR in the sbatch script") from None
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise ValueError(f"`scontrol show hostnames {nodelist}` failed ({out.stderr.strip()}); "
                         f"export MASTER_ADDR in the sbatch script")
    return hosts


def _half_set(e: Mapping[str, str], pairs) -> None:
    for a, b in pairs:
        if (e.get(a) not in (None, "")) != (e.get(b) not in (None, "")):
            have, missing = (a, b) if e.get(a) not in (None, "") else (b, a)
            raise ValueError(f"{have} is set but {missing} is not: the launcher's environment is "
                             f"half set; set both (or neither, for a single process)")


def discover(environ: Optional[Mapping[str, str]] = None, hostnames=slurm_hostnames) -> DistEnv:
    """Reads rank, world size and rendezvous address from the launcher's environment
    (``os.environ`` by default). Raises ValueError naming the variable when it is
    inconsistent.

    Under Slurm (a task of an ``srun`` step: SLURM_STEP_ID is set; the batch shell alone
    is not a step), MASTER_ADDR defaults to the first host of SLURM_JOB_NODELIST as
    ``scontrol show hostnames`` expands it (never this host's name: several nodes may
    share one, and a login node's is wrong) and MASTER_PORT to 20000 + job id % 20000,
    so every task of a job computes the same address with no ssh and no hostfile.
    """
    e = os.environ if environ is None else environ
    _half_set(e, [("RANK", "WORLD_SIZE")])
    port = _int_env(e, "MASTER_PORT")
    addr = e.get("MASTER_ADDR", "")
    in_slurm_step = e.get("SLURM_STEP_ID", e.get("SLURM_STEPID")) not in (None, "")
    if _int_env(e, "RANK") is not None:
        rank, world, source = _int_env(e, "RANK"), _int_env(e, "WORLD_SIZE"), "torchrun"
        local = _int_env(e, "LOCAL_RANK") or 0
    elif in_slurm_step and (e.get("SLURM_PROCID") or e.get("SLURM_NTASKS")):
        _half_set(e, [("SLURM_PROCID", "SLURM_NTASKS")])
        rank, world, source = _int_env(e, "SLURM_PROCID"), _int_env(e, "SLURM_NTASKS"), "slurm"
        local = _int_env(e, "SLURM_LOCALID") or 0
        if world > 1 and not addr:
            nodelist = e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError("under Slurm with SLURM_NTASKS > 1 but neither MASTER_ADDR nor "
                                 "SLURM_JOB_NODELIST is set: export MASTER_ADDR in the sbatch script")
            addr = hostnames(nodelist)[0]
        if port is None and _int_env(e, "SLURM_JOB_ID") is not None:
            port = 20000 + _int_env(e, "SLURM_JOB_ID") % 20000
    elif _mpi_env(e) is not None:
        (rank, world, local), source = _mpi_env(e), "mpi"
    else:
        rank, world, local, source = 0, 1, 0, "single"
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world} (from the {source} environment)")
    return DistEnv(rank, world, local, addr or "127.0.0.1", port or 29500, source)


def keep_freed_memory() -> bool:
    """Keeps freed memory in the process heap instead of returning it to the kernel.

    glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mmap
    pages, so on CPU every large activation and gradient is page-faulted and zeroed by
    the kernel again each step (measured: 25-40% of an E = 128 MoE layer's time).
    mallopt(M_MMAP_MAX = 0) and a huge M_TRIM_THRESHOLD make glibc reuse freed memory,
    as jemalloc and tcmalloc do by default. Process-wide; set MOE_TRAIN_MALLOC=default
    to opt out. Returns whether the setting was applied (False off glibc).
    """
    if os.environ.get("MOE_TRAIN_MALLOC", "keep") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = libc.mallopt(m_mmap_max, 0) == 1
    return ok and libc.mallopt(m_trim_threshold, 1 << 40 if ctypes.sizeof(ctypes.c_long) == 8 else 1 << 30) == 1


def choose_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``parallel.device``: auto picks CUDA (GPU ``local_rank``) when available."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("parallel.device = 'cuda': no CUDA device is visible on this host")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def choose_backend(backend: str, device: torch.device) -> str:
    """``parallel.backend``: auto is nccl on CUDA and gloo on CPU."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("parallel.backend = 'nccl' needs CUDA devices; use gloo (or auto) on CPU")
    return backend


def _mpi_master_addr(env: DistEnv) -> str:
    """Under mpirun without MASTER_ADDR, rank 0 tells everyone its host name."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.bcast(socket.gethostname() if env.rank == 0 else None, root=0)


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 600,
                     env: Optional[DistEnv] = None,
                     always_group: bool = False) -> tuple[DistEnv, torch.device]:
    """Initialises the default process group (when world > 1) and picks the device.

    Args:
        always_group: also give a single process a 1-rank group (DeepSpeed needs one),
            on a free loopback port unless MASTER_PORT is set.
    Returns:
        (DistEnv, torch.device). Without ``always_group`` a single process gets no
        process group at all.
    """
    env = env or discover()
    dev = choose_device(device, env.local_rank)
    if dev.type == "cpu":
        keep_freed_memory()
    if dist.is_initialized() or (env.world_size == 1 and not always_group):
        return env, dev
    addr = env.master_addr
    if env.world_size == 1 and env.source == "single":
        addr = "127.0.0.1"
        if "MASTER_PORT" not in os.environ:
            env = DistEnv(0, 1, 0, addr, free_local_port(), "single")
    if env.source == "mpi" and "MASTER_ADDR" not in os.environ:
        addr = _mpi_master_addr(env)
    os.environ.setdefault("MASTER_ADDR", addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    # DeepSpeed reads these whatever launched us (Slurm, MPI or a single process).
    for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
        os.environ.setdefault(name, str(value))
    dist.init_process_group(
        backend=choose_backend(backend, dev),
        init_method=f"tcp://{addr}:{env.master_port}",
        rank=env.rank, world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=dev if dev.type == "cuda" else None,
    )
    return env, dev
