"""Atomic, self-describing training checkpoints.

Layout under ``checkpoint.dir``::

    latest                      "step_00000020": the newest COMPLETE checkpoint, written last
    step_00000020/
      meta.json                 step, tokens, topology, resolved config, versions, git commit,
                                every file with its size (written last, before the rename)
      model_dense.pt            rank 0: every non-expert parameter and buffer, by name
      experts_ep000.pt ...      ranks 0..ep-1 (one per expert-parallel position): that rank's
                                expert tensors [E_local, ...] and the first global expert id
      rank00000.pt ...          every rank: optimizer state (its ZeRO partition), RNG states
    .tmp_step_00000030/         a save in progress (or one whose writer died): never loaded

Save (collective over all ranks): every rank writes into the temporary directory; the
ranks agree on success; rank 0 writes ``meta.json``, renames the directory, then points
``latest`` at it (a rename too), then prunes to ``checkpoint.keep_last``. A failure on any
rank (disk full, permissions) removes the temporary directory on every rank's say and
raises ``CheckpointError`` on all ranks; the previous checkpoint and ``latest`` are
untouched. A writer killed mid-save leaves only a ``.tmp_`` directory, which
``find_checkpoint`` ignores.

Load: model weights are loaded BEFORE the DeepSpeed engine is built (so ZeRO's fp32
master copy starts from them), experts by GLOBAL expert id from whichever files hold
them, so any expert-parallel size dividing E loads. The optimizer state, RNG states and
every rank's data position are restored exactly when the layout (world size, ep, ZeRO
stage, dtype) is the one saved; otherwise the optimizer state is re-initialised (logged,
naming what was dropped) and the data loader re-splits the rest of the epoch.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moe_train.parallel.grads import is_expert_param
from moe_train.parallel.topology import Topology

log = logging.getLogger("moe_train.checkpoint")
FORMAT_VERSION = 1
LATEST = "latest"
# Config values a checkpoint's weights are shaped by: a resume with another value fails.
SHAPE_KEYS = (("model", "vocab_size"), ("model", "d_model"), ("model", "num_layers"),
              ("model", "num_heads"), ("model", "num_kv_heads"), ("model", "d_ff"),
              ("model", "moe_every"), ("model", "first_dense_layers"), ("model", "mlp_activation"),
              ("model", "position"), ("model", "norm"), ("model", "tie_embeddings"),
              ("moe", "num_experts"), ("moe", "d_ff"), ("moe", "activation"),
              ("moe", "shared_d_ff"), ("moe", "shared_gate"),
              ("model", "embed_dim"), ("model", "share_layers"), ("model", "share_group_size"),
              ("model", "qk_norm"))


class CheckpointError(RuntimeError):
    """A save or load that cannot go on; the message names the step, rank and file."""


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume needs."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    tokens_seen: int = 0
    skipped_steps: int = 0
    loader_states: list = field(default_factory=list)  # one per rank, rank order


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------ discovery


def read_meta(path: Path) -> Optional[dict]:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def is_complete(path: Path) -> bool:
    """meta.json present and every file it lists present with its recorded size."""
    meta = read_meta(path)
    if not meta or not meta.get("complete"):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size
               for name, size in meta["files"].items())


def list_checkpoints(root: str | Path) -> list[tuple[Path, Optional[dict], bool]]:
    """(path, meta or None, complete) for every step directory and in-progress save,
    oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and (path.name.startswith("step_") or path.name.startswith(".tmp_step_")):
            complete = path.name.startswith("step_") and is_complete(path)
            out.append((path, read_meta(path), complete))
    return out


def find_checkpoint(root: str | Path, resume: str) -> Optional[Path]:
    """``resume``: "none" -> None; "auto" -> the newest complete checkpoint under
    ``root`` (``latest`` if it is complete, else a scan), or None; anything else is a
    path, which must be a complete checkpoint (CheckpointError otherwise)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            raise CheckpointError(f"--resume {resume}: not a complete checkpoint directory "
                                  f"(meta.json missing or files missing/truncated)")
        return path
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
        log.warning("%s points at %s, which is incomplete; scanning for the newest complete one",
                    pointer, candidate)
    complete = [p for p, _, ok in list_checkpoints(root) if ok]
    return complete[-1] if complete else None


# ---------------------------------------------------------------------------- save


def _provenance() -> dict:
    import deepspeed

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "numpy": np.__version__, "git_commit": commit}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def split_state(model: nn.Module) -> tuple[dict, dict]:
    """(dense state incl. buffers, expert tensors) of the model, detached, on CPU."""
    expert_names = {n for n, p in model.named_parameters() if is_expert_param(p)}
    dense, experts = {}, {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        (experts if name in expert_names else dense)[name] = tensor.detach().cpu().clone()
    return dense, experts


def _write(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _agree(error: Optional[str], world: int) -> list[Optional[str]]:
    """Every rank's error (None for success); a collective."""
    if world == 1:
        return [error]
    errors: list = [None] * world
    dist.all_gather_object(errors, error)
    return errors


def save_checkpoint(root: str | Path, *, model: nn.Module, optimizer, state: TrainState,
                    topo: Topology, rank: int, config: dict, keep_last: int,
                    fault_hook=None) -> Path:
    """Writes one checkpoint atomically (module docstring). Every rank must call it.

    Raises:
        CheckpointError on every rank when any rank failed; nothing was published.
    """
    root = Path(root)
    name = step_dir_name(state.step)
    tmp, final = root / f".tmp_{name}", root / name
    world = topo.world_size
    error = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
    except OSError as err:
        error = f"rank {rank}: cannot create {tmp}: {err}"
    _check(_agree(error, world), state.step, root, tmp, rank)
    try:
        dense, experts = split_state(model)
        if rank == 0:
            _write(tmp / "model_dense.pt", dense)
        if rank < topo.ep_size:  # the first EP group holds every expert once
            _write(tmp / f"experts_ep{rank:03d}.pt",
                   {"first_expert": topo.local_experts(rank).start, "tensors": experts})
        _write(tmp / f"rank{rank:05d}.pt", {"optimizer": optimizer.state_dict(), "rng": rng_state()})
        if fault_hook is not None:
            fault_hook("save", tmp)
    except OSError as err:
        error = f"rank {rank}: writing into {tmp} failed: {err}"
    _check(_agree(error, world), state.step, root, tmp, rank)
    error = None
    if rank == 0:
        try:
            _publish(root, tmp, final, state, topo, config, keep_last)
        except OSError as err:
            error = f"rank 0: publishing {final} failed: {err}"
    _check(_agree(error, world), state.step, root, tmp, rank)
    return final


def _check(errors: list, step: int, root: Path, tmp: Path, rank: int) -> None:
    failed = [e for e in errors if e]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / LATEST
    previous = pointer.read_text().strip() if pointer.is_file() else "none"
    raise CheckpointError(f"checkpoint save at step {step} failed: {'; '.join(failed)}. "
                          f"Nothing was published; the previous checkpoint ({previous}) is intact")


def _publish(root: Path, tmp: Path, final: Path, state: TrainState, topo: Topology,
             config: dict, keep_last: int) -> None:
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    meta = {"format": FORMAT_VERSION, "complete": True, "step": state.step,
            "tokens_seen": state.tokens_seen, "train_state": asdict(state),
            "topology": {"world_size": topo.world_size, "ep_size": topo.ep_size,
                         "num_experts": topo.num_experts},
            "config": config, "versions": _provenance(), "saved_at": time.time(), "files": files}
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
    complete = [p for p, _, ok in list_checkpoints(root) if ok and p != final]
    for old in complete[:max(len(complete) - (keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- load


def check_compatible(meta: dict, config: dict, path: Path) -> None:
    """Refuses a checkpoint whose weights cannot fit this config, naming both values."""
    saved = meta.get("config", {})
    for section, key in SHAPE_KEYS:
        old, new = saved.get(section, {}).get(key), config.get(section, {}).get(key)
        if key in saved.get(section, {}) and old != new:
            raise CheckpointError(f"checkpoint {path} was saved with {section}.{key} = {old!r}, "
                                  f"this run has {section}.{key} = {new!r}: its weights do not fit; "
                                  f"resume with the saved value or start a new checkpoint.dir")


def load_model_weights(path: Path, model: nn.Module, topo: Topology, rank: int) -> None:
    """Loads dense tensors and this rank's experts (by global expert id) into ``model``;
    a missing or unexpected tensor, or a shape mismatch, raises naming it."""
    dense_saved = torch.load(path / "model_dense.pt", map_location="cpu", weights_only=True)
    dense_now, experts_now = split_state(model)
    _compare_names("dense", set(dense_saved), set(dense_now), path)
    meta = read_meta(path) or {}
    saved_ep = meta["topology"]["ep_size"]
    files = [torch.load(path / f"experts_ep{i:03d}.pt", map_location="cpu", weights_only=True)
             for i in _expert_files_for(topo.local_experts(rank), topo.num_experts, saved_ep)]
    if experts_now:
        names = set(files[0]["tensors"]) if files else set()
        _compare_names("expert", names, set(experts_now), path)
    state = dict(dense_saved)
    first = topo.local_experts(rank).start
    for name, current in experts_now.items():
        rows = []
        for f in files:
            t = f["tensors"][name]
            for j in range(t.shape[0]):
                gid = f["first_expert"] + j
                if first <= gid < first + current.shape[0]:
                    rows.append((gid, t[j]))
        state[name] = torch.stack([r for _, r in sorted(rows, key=lambda x: x[0])])
    for name, tensor in state.items():
        if name in dense_now and dense_now[name].shape != tensor.shape:
            raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(dense_now[name].shape)}")
        if name in experts_now and experts_now[name].shape != tensor.shape:
            raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                                  f"this rank expects {tuple(experts_now[name].shape)}")
    model.load_state_dict(state, strict=True)


def _expert_files_for(experts: range, num_experts: int, saved_ep: int) -> list[int]:
    per_file = num_experts // saved_ep
    return sorted({g // per_file for g in experts})


def _compare_names(kind: str, saved: set, expected: set, path: Path) -> None:
    missing, extra = sorted(expected - saved), sorted(saved - expected)
    if missing or extra:
        raise CheckpointError(f"checkpoint {path}: {kind} tensors differ from the model: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}")


def same_layout(meta: dict, topo: Topology, config: dict) -> bool:
    saved_topo, saved_cfg = meta["topology"], meta.get("config", {})
    return (saved_topo["world_size"] == topo.world_size and saved_topo["ep_size"] == topo.ep_size
            and saved_cfg.get("parallel", {}).get("zero_stage") == config["parallel"]["zero_stage"]
            and saved_cfg.get("train", {}).get("dtype") == config["train"]["dtype"])


def load_rank_state(path: Path, rank: int) -> dict:
    return torch.load(path / f"rank{rank:05d}.pt", map_location="cpu", weights_only=False)


def load_optimizer_state(optimizer, saved: dict, world: int) -> None:
    """Restores a DeepSpeed optimizer's state saved on the same layout. ZeRO 1/2 take a
    list indexed by data-parallel rank (only this rank's entry is read) and restore
    their fp32 master partitions from it; a plain optimizer takes the dict."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        optimizer.load_state_dict([saved] * world, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(saved)
