"""What ``prune`` and ``quantize`` print before and after: weights, nonzero weights, bytes
of the model files on disk and the held-out validation loss, measured the same way on
both sides.

* weights: every unique weight tensor of the model (a tied or ``share_layers``-shared
  tensor once), float or int8; the per-channel scales of an int8 model and buffers (the
  selection bias) are not weights.
* bytes: the checkpoint's model files (``model_dense.pt``, ``experts_ep*.pt`` and, for an
  int8 checkpoint, ``quantization.pt``); the optimizer and RNG files of a training
  checkpoint (``rank*.pt``) and ``meta.json`` are not the model and are left out, so a
  training checkpoint and a weights-only one compare fairly.
* validation loss: ``moe_train.inference.heldout_loss`` (the one evaluation) (token-weighted cross-entropy over the
  validation split of the data manifest, in training micro-batches, eval capacity), on
  the first ``eval_batches`` batches (0: the whole split).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from moe_train.checkpoint.state import list_checkpoints, read_meta
from moe_train.inference.load import heldout_loss


@dataclass
class Snapshot:
    """One side of the before/after table."""

    weights: int
    nonzero: int
    bytes: int
    val_loss: float
    tokens: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(weights, nonzero weights) of ``model``: unique parameters, plus int8 tensors held
    as buffers; scales (any tensor whose name holds ``scale``) and float buffers excluded."""
    seen, total, nonzero = set(), 0, 0
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        leaf = name.rsplit(".", 1)[-1]
        is_weight = t.dtype == torch.int8 or (isinstance(t, nn.Parameter) and "scale" not in leaf)
        if not is_weight or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel()
        nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def model_bytes(step_dir: str | Path) -> int:
    """Bytes on disk of the model files of a checkpoint (module docstring)."""
    meta = read_meta(Path(step_dir)) or {}
    return sum(size for name, size in meta.get("files", {}).items()
               if name != "meta.json" and not name.startswith("rank"))


def with_data(loaded, data: Optional[str]):
    """``loaded`` (a ``generate.LoadedModel``) evaluating on the manifest ``data`` instead
    of the one in its config (None: unchanged)."""
    if not data:
        return loaded
    if not Path(data).is_file():
        raise ValueError(f"--data {data}: no such manifest file")
    cfg = dataclasses.replace(loaded.cfg, data=dataclasses.replace(loaded.cfg.data, manifest=str(data)))
    return dataclasses.replace(loaded, cfg=cfg)


def evaluate(loaded, eval_batches: int) -> tuple[float, int]:
    """(validation loss, tokens) of a loaded model; a missing manifest is a user error."""
    manifest = loaded.cfg.data.manifest
    if not manifest or not Path(manifest).is_file():
        raise ValueError(f"data.manifest {manifest!r} of the checkpoint's config is not a readable file "
                         f"here; give --data PATH/manifest.json (the validation split is measured)")
    return heldout_loss(loaded, eval_batches)


def snapshot(loaded, step_dir: Path, eval_batches: int, loss: Optional[tuple[float, int]] = None) -> Snapshot:
    """Weights and bytes of ``loaded`` / ``step_dir``; the loss measured now unless given."""
    total, nonzero = weight_counts(loaded.model)
    loss, tokens = loss if loss is not None else evaluate(loaded, eval_batches)
    return Snapshot(total, nonzero, model_bytes(step_dir), loss, tokens)


def check_out_dir(out: str | Path) -> Path:
    """``--out`` must not hold checkpoints already (it could be the source's own run)."""
    out = Path(out)
    existing = [p.name for p, _, _ in list_checkpoints(out)]
    if existing:
        raise ValueError(f"--out {out} already holds checkpoints ({', '.join(existing[:3])}); "
                         f"give a new directory")
    return out


def table(before: Snapshot, after: Snapshot) -> list[str]:
    """The before/after lines both commands print."""
    def row(name: str, s: Snapshot) -> str:
        return (f"{name:<8} {s.weights:>14,} {s.nonzero:>14,} {s.bytes:>14,} "
                f"{s.bytes / 2 ** 20:>9.2f} {s.val_loss:>10.4f}")

    ratio = after.bytes / before.bytes if before.bytes else float("nan")
    return [f"{'':<8} {'weights':>14} {'nonzero':>14} {'bytes on disk':>14} {'MiB':>9} {'val loss':>10}",
            row("before", before), row("after", after),
            f"bytes x{ratio:.3f}, validation loss {after.val_loss - before.val_loss:+.4f} "
            f"({after.tokens:,} validation tokens)"]
