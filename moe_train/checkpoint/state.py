"""What every checkpoint format shares: the errors, the resume state, ``meta.json``,
listing a run's checkpoints, the collective agreement on success, atomic publishing
(write into ``.tmp_step_N``, rename, then point ``latest`` at it) and provenance.

A writer killed mid-save leaves only a ``.tmp_`` directory, which nothing ever loads;
``latest`` names the newest COMPLETE checkpoint and is replaced by a rename. Pruning keeps
the newest ``keep_last`` complete checkpoints plus the newest one that holds a canonical
checkpoint (``moe_train.checkpoint.canonical``), so a run can always move to another
layout from somewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from moe_train.parallel.topology import Topology

FORMAT_VERSION = 2  # 2: meta.json carries a manifest
LATEST = "latest"
CANONICAL_DIRNAME = "canonical"  # step_N/canonical: the any-layout checkpoint of step N


class CheckpointError(RuntimeError):
    """A save or load that cannot go on; the message names the step, rank and file."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume needs."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    tokens_seen: int = 0
    skipped_steps: int = 0
    loader_states: list = field(default_factory=list)  # one per rank, rank order
    run_name: str = ""  # the TensorBoard run folder (logging.dir/run_name) a resume continues


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------ discovery


def read_meta(path: Path) -> Optional[dict]:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None


RANK_FILE = re.compile(r"rank\d{5}\.pt")  # one per rank: optimizer partition and RNG


def is_complete(path: Path, rank_files: bool = True) -> bool:
    """meta.json present and every file it lists present with its recorded size.
    ``rank_files=False`` leaves out the one-per-rank files (``RANK_FILE``): what one
    rank checks at a resume in time independent of the world size, each rank then
    checking its own file as it loads it."""
    meta = read_meta(path)
    if not meta or not meta.get("complete"):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size
               for name, size in meta["files"].items() if rank_files or not RANK_FILE.fullmatch(name))


def list_checkpoints(root: str | Path, rank_files: bool = True) -> list[tuple[Path, Optional[dict], bool]]:
    """(path, meta or None, complete) for every step directory and in-progress save,
    oldest first (``rank_files``: as for ``is_complete``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and (path.name.startswith("step_") or path.name.startswith(".tmp_step_")):
            complete = path.name.startswith("step_") and is_complete(path, rank_files)
            out.append((path, read_meta(path), complete))
    return out


# ------------------------------------------------------------- writing and agreeing


def provenance() -> dict:
    import deepspeed

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "numpy": np.__version__, "git_commit": commit}


class _Checksummed:
    """A write-only file that keeps the CRC-32 and length of what passed through it, so
    a checkpoint file's checksum costs no second read of the file."""

    def __init__(self, f):
        self.f, self.crc32, self.bytes = f, 0, 0

    def write(self, data) -> int:
        view = memoryview(data)
        written = self.f.write(view)
        self.crc32 = zlib.crc32(view, self.crc32)
        self.bytes += view.nbytes
        return written

    def flush(self) -> None:
        self.f.flush()


def write_torch(path: Path, obj: Any) -> tuple[int, int]:
    """``torch.save`` to ``path``, flushed to disk before it returns (every checkpoint file
    goes through here: ``manifest.write_listed``). Returns the file's (CRC-32, bytes),
    computed while writing."""
    with open(path, "wb") as f:
        out = _Checksummed(f)
        torch.save(obj, out)
        f.flush()
        os.fsync(f.fileno())
    return out.crc32, out.bytes


def gather(obj: Any, world: int) -> list:
    """Every rank's ``obj`` in rank order; a collective (every rank calls it)."""
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def agree(error: Optional[str], world: int) -> list[Optional[str]]:
    """Every rank's error (None for success); a collective."""
    if world == 1:
        return [error]
    errors: list = [None] * world
    dist.all_gather_object(errors, error)
    return errors


def publish(root: Path, tmp: Path, final: Path, state: TrainState, topo: Topology,
            config: dict, keep_last: int, manifest: dict, extra: Optional[dict] = None) -> None:
    """Rank 0's last act of a save: ``meta.json`` (with provenance and the manifest) into
    ``tmp``, ``tmp`` renamed to ``final``, ``latest`` pointed at it by a rename, then the
    older checkpoints pruned (module docstring)."""
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    meta = {"format": FORMAT_VERSION, "complete": True, "step": state.step, **(extra or {}),
            "tokens_seen": state.tokens_seen, "train_state": asdict(state),
            "topology": {"world_size": topo.world_size, "ep_size": topo.ep_size,
                         "num_experts": topo.num_experts},
            "config": config, "versions": provenance(), "saved_at": time.time(), "files": files,
            "manifest": manifest}
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step saved again (e.g. a resumed run's last step)
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    # Rank files are not stat'ed here: pruning must not cost rank 0 time per rank.
    complete = [p for p, _, ok in list_checkpoints(root, rank_files=False) if ok and p != final]
    with_canonical = [p for p in complete if _has_canonical(p)]
    keep = {with_canonical[-1]} if with_canonical else set()  # somewhere to change layout from
    for old in complete[:max(len(complete) - (keep_last - 1), 0)]:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _has_canonical(path: Path) -> bool:
    meta = read_meta(path / CANONICAL_DIRNAME)
    return bool(meta and meta.get("complete"))
