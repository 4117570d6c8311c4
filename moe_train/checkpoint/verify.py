"""Verifying a checkpoint against its manifest without a model: ``moe-train ckpt verify``,
``--resume PATH`` (which refuses a checkpoint that fails) and ``--resume auto`` (which
skips it for the newest one that passes)."""

from __future__ import annotations

from pathlib import Path

import moe_train.checkpoint.canonical as canonical
from moe_train.checkpoint.engine_format import load_file
import moe_train.checkpoint.manifest as mf
from moe_train.checkpoint.state import RANK_FILE, read_meta


def verify_checkpoint(path: str | Path, checksums: bool = True) -> list[str]:
    """Every problem of the checkpoint at ``path`` against its manifest (empty: it is
    sound): meta.json unreadable or not complete, a file missing, truncated or corrupted,
    a tensor missing, extra, reshaped or corrupted. Reads every file; needs no model.
    ``checksums=False``: what one rank checks before a training resume, in time that
    grows with neither the checkpoint's bytes nor the world size: presence and sizes of
    the shared files (dense, experts), reading none; each rank then checks its own rank
    file and every tensor it loads against the manifest."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        return [f"{path}: no readable meta.json (not a checkpoint, or a save that never finished)"]
    if not meta.get("complete"):
        return [f"{path}: meta.json does not mark the checkpoint complete"]
    if "manifest" not in meta:
        return [f"{path}: no manifest (written before checkpoint format 2); it cannot be verified"]
    if meta.get("kind") == canonical.KIND:
        return canonical.verify(path, checksums=checksums)
    if checksums:
        present = [p.name for p in path.iterdir() if p.is_file()]
        return mf.verify_files(path, meta["manifest"], load_file, present)
    shared = {name: entry for name, entry in meta["manifest"]["files"].items() if not RANK_FILE.fullmatch(name)}
    return mf.verify_files(path, {**meta["manifest"], "files": shared}, load_file, checksums=False)
