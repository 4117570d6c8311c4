"""Checkpoint manifests: every tensor a checkpoint holds, with its shape, dtype and a
checksum, so that a load can prove it got everything it was given.

Why: the failure users of MoE stacks meet most is a resume that "succeeds" with an expert
or an optimizer moment missing or re-initialised (KempnerForge #202, Megatron PR #7162,
DeepSpeed #8147). A size check catches a truncated file, not a tensor that was never
written, nor a flipped bit. So every file of a checkpoint is listed with a CRC-32 of its
bytes, and every tensor inside it (nested dicts and lists flattened to ``a/b/0`` paths)
with its shape, dtype and a CRC-32 of its data. Loading compares what it read with the
manifest and fails with one line naming the file and tensor; verifying a checkpoint needs
no model and no GPU (``moe-train ckpt verify DIR``).

Manifest shape (stored in ``meta.json`` under ``"manifest"``)::

    {"format": 1,
     "files": {"model_dense.pt": {"crc32": 123, "bytes": 4567,
                                  "tensors": {"embed.weight": {"shape": [512, 64],
                                                               "dtype": "float32",
                                                               "crc32": 789}, ...}}, ...}}

CRC-32 (zlib) is a corruption check, not a security measure: it catches truncation,
bit rot and partial writes at about a GB/s.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from moe_train.checkpoint.state import CheckpointError, write_torch

MANIFEST_FORMAT = 1
_CHUNK = 1 << 24


def tensor_crc32(t: Tensor) -> int:
    """CRC-32 of a tensor's data in row-major order (device and strides do not matter)."""
    data = t.detach().contiguous().cpu().reshape(-1)
    return zlib.crc32(data.view(torch.uint8).numpy().tobytes()) if data.numel() else 0


def tensor_record(t: Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "crc32": tensor_crc32(t)}


def flatten_tensors(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor inside nested dicts, lists and tuples, keyed by its path ``a/b/0``
    (a top-level dict's keys are used as they are, so a state dict keeps its names)."""
    out: dict[str, Tensor] = {}
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten_tensors(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            out.update(flatten_tensors(value, f"{prefix}/{i}" if prefix else str(i)))
    return out


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_listed(directory: Path, name: str, obj: Any) -> dict[str, dict]:
    """Writes ``obj`` to ``directory/name``; returns its manifest entry. The file's CRC-32
    is computed while writing (no read-back: a save costs one pass over its bytes)."""
    crc, size = write_torch(directory / name, obj)
    return {name: {"crc32": crc, "bytes": size,
                   "tensors": {key: tensor_record(t) for key, t in flatten_tensors(obj).items()}}}


def build_manifest(files: dict[str, dict]) -> dict:
    return {"format": MANIFEST_FORMAT, "files": dict(sorted(files.items()))}


def compare_tensors(expected: dict[str, dict], tensors: dict[str, Tensor], where: str,
                    checksums: bool = True) -> list[str]:
    """Problems (empty: none) between manifest records and tensors read back, each naming
    ``where`` and the tensor."""
    problems = []
    for name in sorted(set(expected) - set(tensors)):
        problems.append(f"{where}: tensor {name} is missing (the manifest lists it, "
                        f"shape {tuple(expected[name]['shape'])})")
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"{where}: tensor {name} is not in the manifest (unexpected extra tensor)")
    for name in sorted(set(expected) & set(tensors)):
        want, t = expected[name], tensors[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if list(t.shape) != list(want["shape"]) or dtype != want["dtype"]:
            problems.append(f"{where}: tensor {name} is {dtype} {tuple(t.shape)}, the manifest says "
                            f"{want['dtype']} {tuple(want['shape'])} (reshaped or replaced)")
        elif checksums and tensor_crc32(t) != want["crc32"]:
            problems.append(f"{where}: tensor {name} is corrupted (checksum differs from the manifest)")
    return problems


def check_loaded(manifest: Optional[dict], file_name: str, obj: Any, where: str) -> None:
    """Raises ``CheckpointError`` naming the first problem when ``obj`` (the object read
    from ``file_name``) differs from the manifest. Without a manifest (a checkpoint from
    before manifests) nothing is checked."""
    if manifest is None:
        return
    entry = manifest["files"].get(file_name)
    if entry is None:
        raise CheckpointError(f"{where}: file {file_name} is not in the checkpoint's manifest")
    problems = compare_tensors(entry["tensors"], flatten_tensors(obj), f"{where}/{file_name}")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


def verify_files(root: Path, manifest: dict, load: Callable[[Path], Any],
                 present: Optional[Iterable[str]] = None, checksums: bool = True) -> list[str]:
    """Checks every file of ``manifest`` under ``root``: present, the recorded size and
    (``checksums``) CRC-32; when a file differs, it is loaded with ``load`` to name the
    tensors that differ. ``present``: the file names in the directory (extra files are
    reported). Without ``checksums`` no file is read: what a resume checks on one rank
    before every rank verifies the tensors it loads (``check_loaded``)."""
    problems = []
    for name, entry in manifest["files"].items():
        path = root / name
        where = f"{root}/{name}"
        if not path.is_file():
            problems.append(f"{where}: file is missing")
            continue
        size = path.stat().st_size
        if size == entry["bytes"] and (not checksums or file_crc32(path) == entry["crc32"]):
            continue
        # Name the tensors that differ first: more useful than "the file differs".
        resized = ([f"{where}: {size} bytes, the manifest says {entry['bytes']} (truncated or rewritten)"]
                   if size != entry["bytes"] else [])
        if not checksums:  # read nothing: the size is the finding
            problems.extend(resized)
            continue
        try:
            obj = load(path)
        except Exception as err:  # a torn zip or pickle: the file cannot be read at all
            problems.extend(resized + [f"{where}: cannot be read ({type(err).__name__}: {str(err)[:120]})"])
            continue
        found = compare_tensors(entry["tensors"], flatten_tensors(obj), where)
        problems.extend(found + resized or [f"{where}: corrupted outside tensor data (file checksum "
                                            f"differs; every tensor matches)"])
    if present is not None:
        for name in sorted(set(present) - set(manifest["files"]) - {"meta.json"}):
            problems.append(f"{root}/{name}: file is not in the manifest")
    return problems
