"""The engine checkpoint: what a training run writes, per rank, at its own layout.

Layout under ``checkpoint.dir``::

    latest                      "step_00000020": the newest COMPLETE checkpoint, written last
    step_00000020/
      meta.json                 step, tokens, topology, resolved config, versions, git commit,
                                every file with its size, and the manifest: every file's
                                CRC-32 and every tensor's shape, dtype and CRC-32
                                (``moe_train.checkpoint.manifest``); written last, before the rename
      model_dense.pt            rank 0: every non-expert parameter and buffer, by name
      experts_ep000.pt ...      ranks 0..ep-1 (one per expert-parallel position): that rank's
                                expert tensors [E_local, ...] and the first global expert id
      rank00000.pt ...          every rank: optimizer state (its ZeRO partition), RNG states
      canonical/                optional: the same state at any layout (``canonical``)
    .tmp_step_00000030/         a save in progress (or one whose writer died): never loaded

Save (collective over all ranks): every rank writes into the temporary directory; the
ranks agree on success; rank 0 writes ``meta.json``, renames the directory, then points
``latest`` at it (a rename too), then prunes to ``checkpoint.keep_last``
(``state.publish``). A failure of any kind on any rank (a full disk makes ``torch.save``
raise ``RuntimeError``, not ``OSError``; a read-only mount; permissions) still completes
the agreement on every rank, removes the half-written directory and raises one
``CheckpointError`` on all ranks naming the rank and file; the previous checkpoint and
``latest`` are untouched. File CRCs are computed while writing (no read-back).

Load: model weights are loaded BEFORE the DeepSpeed engine is built (so ZeRO's fp32
master copy starts from them), experts by GLOBAL expert id from whichever files hold
them, so any expert-parallel size dividing E loads. The optimizer state
(``optimizer_state``), RNG states (``rng``) and every rank's data position are restored
exactly when the layout (world size, ep, ZeRO stage, dtype) is the one saved; which
checkpoint a resume loads, and how, is ``resume``. Every load compares the tensors it
read with the manifest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import moe_train.checkpoint.manifest as mf
from moe_train.checkpoint.optimizer_state import optimizer_state
from moe_train.checkpoint.rng import rng_state
from moe_train.checkpoint.state import (LATEST, CheckpointError, TrainState, agree, gather, publish, read_meta,
                                        step_dir_name)
from moe_train.parallel.grads import is_expert_param
from moe_train.parallel.topology import Topology


def split_state(model: nn.Module) -> tuple[dict, dict]:
    """(dense state incl. buffers, expert tensors) of the model, detached, on CPU.

    A tensor the state dict lists under several names (a tied head; a module shared by
    several blocks, ``model.share_layers``) is copied once and kept under every name, so
    ``torch.save`` stores it once, and it is an expert tensor under every name."""
    expert_names = {n for n, p in model.named_parameters(remove_duplicate=False) if is_expert_param(p)}
    dense, experts, copies = {}, {}, {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()) if tensor.numel() else name
        if key not in copies:
            copies[key] = tensor.detach().cpu().clone()
        (experts if name in expert_names else dense)[name] = copies[key]
    return dense, experts


def load_file(path: Path) -> Any:
    """``torch.load`` of one checkpoint file (rank files hold RNG states: not weights-only)."""
    return torch.load(path, map_location="cpu", weights_only=not path.name.startswith("rank"))


# ---------------------------------------------------------------------------- save


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
    except Exception as err:  # noqa: BLE001 - any failure must reach the agreement
        error = f"rank {rank}: cannot create {tmp}: {_describe(err)}"
    _check(agree(error, world), state.step, root, tmp, rank)
    entries: dict[str, dict] = {}
    writing = tmp
    try:
        dense, experts = split_state(model)
        files = []
        if rank == 0:
            files.append(("model_dense.pt", dense))
        if rank < topo.ep_size:  # the first EP group holds every expert once
            files.append((f"experts_ep{rank:03d}.pt",
                          {"first_expert": topo.local_experts(rank).start, "tensors": experts}))
        files.append((f"rank{rank:05d}.pt", {"optimizer": optimizer_state(optimizer), "rng": rng_state()}))
        for file_name, obj in files:
            writing = tmp / file_name
            entries.update(mf.write_listed(tmp, file_name, obj))
        writing = tmp
        if fault_hook is not None:
            fault_hook("save", tmp)
    except Exception as err:  # noqa: BLE001 - a full disk raises RuntimeError from torch.save
        error = f"rank {rank}: writing {writing} failed: {_describe(err)}"
    _check(agree(error, world), state.step, root, tmp, rank)
    error = None
    listed = gather(entries, world)
    if rank == 0:
        try:
            publish(root, tmp, final, state, topo, config, keep_last,
                    manifest=mf.build_manifest({k: v for part in listed for k, v in part.items()}))
        except Exception as err:  # noqa: BLE001
            error = f"rank 0: publishing {final} failed: {_describe(err)}"
    _check(agree(error, world), state.step, root, tmp, rank)
    return final


def _describe(err: BaseException) -> str:
    """One line: the exception's type and the first line of its message (torch.save's
    full-disk error carries a C++ stack)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first[:300]}"


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


# ---------------------------------------------------------------------------- load


def load_model_weights(path: Path, model: nn.Module, topo: Topology, rank: int) -> None:
    """Loads dense tensors and this rank's experts (by global expert id) into ``model``;
    a missing or unexpected tensor, or a shape mismatch, raises naming it."""
    meta = read_meta(path) or {}
    manifest = meta.get("manifest")
    dense_saved = _load_checked(path, "model_dense.pt", manifest, rank)
    dense_now, experts_now = split_state(model)
    _compare_names("dense", set(dense_saved), set(dense_now), path)
    saved_ep = meta["topology"]["ep_size"]
    files = [_load_checked(path, f"experts_ep{i:03d}.pt", manifest, rank)
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


def _load_checked(path: Path, name: str, manifest: Optional[dict], rank: int) -> Any:
    """torch.load of one checkpoint file, checked for presence and size first, then
    compared tensor by tensor with the manifest (the check of a rank's own file: one rank
    does not check all of them before a resume)."""
    entry = (manifest or {}).get("files", {}).get(name)
    if entry is not None:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"rank {rank}: checkpoint {path}: {name} is missing (the manifest lists it)")
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"rank {rank}: checkpoint {path}: {name} is {file.stat().st_size} bytes, the "
                                  f"manifest says {entry['bytes']} (truncated or rewritten)")
    obj = load_file(path / name)
    mf.check_loaded(manifest, name, obj, f"rank {rank}: checkpoint {path}")
    return obj


def _expert_files_for(experts: range, num_experts: int, saved_ep: int) -> list[int]:
    per_file = num_experts // saved_ep
    return sorted({g // per_file for g in experts})


def _compare_names(kind: str, saved: set, expected: set, path: Path) -> None:
    missing, extra = sorted(expected - saved), sorted(saved - expected)
    if missing or extra:
        raise CheckpointError(f"checkpoint {path}: {kind} tensors differ from the model: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}")


def load_rank_state(path: Path, rank: int) -> dict:
    return _load_checked(path, f"rank{rank:05d}.pt", (read_meta(path) or {}).get("manifest"), rank)
