"""Atomic, self-describing training checkpoints.

Layout under ``checkpoint.dir``::

    latest                      "step_00000020": the newest COMPLETE checkpoint, written last
    step_00000020/
      meta.json                 step, tokens, topology, resolved config, versions, git commit,
                                every file with its size, and the manifest: every file's
                                CRC-32 and every tensor's shape, dtype and CRC-32
                                (moe_train/manifest.py); written last, before the rename
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

A weights-only checkpoint (``save_weights_checkpoint``: upcycling, pruning, quantizing,
import) has the same model files, ``"weights_only": true`` in meta.json and no rank
files; a resume from it starts the optimizer fresh and says so.

Verify: ``verify_checkpoint`` checks every file against the manifest without a model;
``--resume PATH`` refuses a checkpoint that fails it, naming the file and tensor, and
``--resume auto`` skips it (warning) for the newest one that passes. Every load also
compares the tensors it read with the manifest.

Load: model weights are loaded BEFORE the DeepSpeed engine is built (so ZeRO's fp32
master copy starts from them), experts by GLOBAL expert id from whichever files hold
them, so any expert-parallel size dividing E loads. The optimizer state, RNG states and
every rank's data position are restored exactly when the layout (world size, ep, ZeRO
stage, dtype) is the one saved. On another layout the ZeRO partitions cannot be read:
the step's canonical checkpoint (``step_N/canonical``, ``moe_train.canonical``) is
loaded instead, and without one the resume fails naming ``moe-train ckpt canonical``
(``moe_train.canonical.choose_resume``); the optimizer is never silently re-initialised.

Pruning keeps the newest ``keep_last`` complete checkpoints plus the newest one that holds
a canonical checkpoint, so a run can always move to another layout from somewhere.
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

from moe_train import manifest as mf
from moe_train.parallel.grads import is_expert_param
from moe_train.parallel.topology import Topology

log = logging.getLogger("moe_train.checkpoint")
FORMAT_VERSION = 2  # 2: meta.json carries a manifest
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
        problems = verify_checkpoint(path)
        if problems:
            more = f" (and {len(problems) - 1} more; `moe-train ckpt verify {path}` lists them)" \
                if len(problems) > 1 else ""
            raise CheckpointError(f"--resume {resume}: {problems[0]}{more}")
        return path
    root = Path(root)
    pointer = root / LATEST
    candidates = [p for p, _, ok in reversed(list_checkpoints(root)) if ok]
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
        elif named.exists() or pointer.read_text().strip():
            log.warning("%s points at %s, which is incomplete; scanning for the newest complete one",
                        pointer, named)
    for candidate in candidates:
        problems = verify_checkpoint(candidate)
        if not problems:
            return candidate
        log.warning("--resume auto: skipping %s, which fails verification: %s", candidate, problems[0])
        print(f"WARNING: --resume auto: skipping {candidate}: {problems[0]}", flush=True)
    return None


def _load_any(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=not path.name.startswith("rank"))


def verify_checkpoint(path: str | Path) -> list[str]:
    """Every problem of the checkpoint at ``path`` against its manifest (empty: it is
    sound): meta.json unreadable or not complete, a file missing, truncated or corrupted,
    a tensor missing, extra, reshaped or corrupted. Reads every file; needs no model."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        return [f"{path}: no readable meta.json (not a checkpoint, or a save that never finished)"]
    if not meta.get("complete"):
        return [f"{path}: meta.json does not mark the checkpoint complete"]
    if "manifest" not in meta:
        return [f"{path}: no manifest (written before checkpoint format 2); it cannot be verified"]
    if meta.get("kind") == "canonical":
        from moe_train import canonical

        return canonical.verify(path)
    present = [p.name for p in path.iterdir() if p.is_file()]
    return mf.verify_files(path, meta["manifest"], _load_any, present)


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


def _write(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_listed(directory: Path, name: str, obj: Any) -> dict[str, dict]:
    """Writes ``obj`` to ``directory/name``; returns its manifest entry."""
    path = directory / name
    _write(path, obj)
    return {name: mf.file_entry(path, obj)}


def _gather(obj: Any, world: int) -> list:
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


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
    entries: dict[str, dict] = {}
    try:
        dense, experts = split_state(model)
        if rank == 0:
            entries.update(_write_listed(tmp, "model_dense.pt", dense))
        if rank < topo.ep_size:  # the first EP group holds every expert once
            entries.update(_write_listed(tmp, f"experts_ep{rank:03d}.pt",
                                         {"first_expert": topo.local_experts(rank).start, "tensors": experts}))
        entries.update(_write_listed(tmp, f"rank{rank:05d}.pt",
                                     {"optimizer": optimizer_state(optimizer), "rng": rng_state()}))
        if fault_hook is not None:
            fault_hook("save", tmp)
    except OSError as err:
        error = f"rank {rank}: writing into {tmp} failed: {err}"
    _check(_agree(error, world), state.step, root, tmp, rank)
    error = None
    listed = _gather(entries, world)
    if rank == 0:
        try:
            _publish(root, tmp, final, state, topo, config, keep_last,
                     manifest=mf.build_manifest({k: v for part in listed for k, v in part.items()}))
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
             config: dict, keep_last: int, manifest: dict, extra: Optional[dict] = None) -> None:
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    meta = {"format": FORMAT_VERSION, "complete": True, "step": state.step, **(extra or {}),
            "tokens_seen": state.tokens_seen, "train_state": asdict(state),
            "topology": {"world_size": topo.world_size, "ep_size": topo.ep_size,
                         "num_experts": topo.num_experts},
            "config": config, "versions": _provenance(), "saved_at": time.time(), "files": files,
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
    complete = [p for p, _, ok in list_checkpoints(root) if ok and p != final]
    with_canonical = [p for p in complete if _has_canonical(p)]
    keep = {with_canonical[-1]} if with_canonical else set()  # somewhere to change layout from
    for old in complete[:max(len(complete) - (keep_last - 1), 0)]:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _has_canonical(path: Path) -> bool:
    meta = read_meta(path / "canonical")
    return bool(meta and meta.get("complete"))


# ---------------------------------------------------------------------------- load


def check_compatible(meta: dict, config: dict, path: Path) -> None:
    """Refuses a checkpoint whose weights cannot fit this config, naming both values."""
    if "quantization.pt" in meta.get("files", {}):  # moe-train quantize (moe_train/compress/quantize.py)
        raise CheckpointError(f"checkpoint {path} holds int8 weights for inference ({meta.get('origin')}); "
                              f"training needs the float weights: resume from the checkpoint it was "
                              f"quantized from")
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
    """torch.load of one checkpoint file, compared tensor by tensor with the manifest."""
    obj = _load_any(path / name)
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


def same_layout(meta: dict, topo: Topology, config: dict) -> bool:
    saved_topo, saved_cfg = meta["topology"], meta.get("config", {})
    return (not meta.get("weights_only") and saved_topo["world_size"] == topo.world_size and saved_topo["ep_size"] == topo.ep_size
            and saved_cfg.get("parallel", {}).get("zero_stage") == config["parallel"]["zero_stage"]
            and saved_cfg.get("train", {}).get("dtype") == config["train"]["dtype"])


def load_rank_state(path: Path, rank: int) -> dict:
    return _load_checked(path, f"rank{rank:05d}.pt", (read_meta(path) or {}).get("manifest"), rank)


MASTERS_FROM_WEIGHTS = "moe_train_masters_from_weights"


def optimizer_state(optimizer) -> dict:
    """The optimizer's state dict for the rank file. Under ZeRO 1/2 with fp32 weights,
    DeepSpeed's "fp32 master" partitions are bit-for-bit copies of the weights the model
    files already hold (the optimizer step writes the master into the weight); saving
    them again made engine checkpoints a third larger than 12 bytes a parameter
    (benchmarks/checkpoint.py). They are left out and rebuilt from the weights on load,
    exactly. Under bf16/fp16 the masters carry more bits than the weights and are kept."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    state = optimizer.state_dict()
    if isinstance(optimizer, DeepSpeedZeroOptimizer) and all(
            p.dtype == torch.float32 for group in optimizer.bit16_groups for p in group):
        from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS

        state = dict(state)
        del state[SINGLE_PARTITION_OF_FP32_GROUPS]
        state[MASTERS_FROM_WEIGHTS] = True
    return state


def load_optimizer_state(optimizer, saved: dict, world: int) -> None:
    """Restores a DeepSpeed optimizer's state saved on the same layout. ZeRO 1/2 take a
    list indexed by data-parallel rank (only this rank's entry is read) and restore
    their fp32 master partitions from it, or, when ``optimizer_state`` left them out
    (fp32 weights), from the weights loaded before the engine was built; a plain
    optimizer takes the dict."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        from_weights = bool(saved.get(MASTERS_FROM_WEIGHTS))
        saved = {k: v for k, v in saved.items() if k != MASTERS_FROM_WEIGHTS}
        optimizer.load_state_dict([saved] * world, load_optimizer_states=True,
                                  load_from_fp32_weights=not from_weights)
    else:
        optimizer.load_state_dict(saved)


# ------------------------------------------------------------- weights-only checkpoints


def save_weights_checkpoint(root: str | Path, *, dense: dict, experts: dict, num_experts: int,
                            config: dict, state: TrainState, origin: str,
                            extra_files: Optional[dict[str, Any]] = None) -> Path:
    """Writes a checkpoint of model weights only, from one process, under ``root`` as
    ``step_N`` (N = ``state.step``) with ``latest`` pointing at it, so that
    ``train --resume auto`` (with ``checkpoint.dir = root``) or ``--resume root/step_N``
    loads it at any world size and ep dividing ``num_experts``; the optimizer starts
    fresh (the resume says so) and the data position continues from
    ``state.loader_states``.

    Args:
        dense: every non-expert parameter and buffer, by the model's state-dict name.
        experts: every expert tensor stacked over ALL experts, ``[E, ...]``.
        origin: what made it ("upcycled from ...", "pruned from ..."), recorded in meta.
        extra_files: further ``name -> object`` files (e.g. quantization scales), listed in
            the manifest like the rest.
    """
    from moe_train.parallel.topology import Topology

    root = Path(root)
    name = step_dir_name(state.step)
    tmp, final = root / f".tmp_{name}", root / name
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        entries = _write_listed(tmp, "model_dense.pt", dense)
        entries.update(_write_listed(tmp, "experts_ep000.pt", {"first_expert": 0, "tensors": experts}))
        for file_name, obj in (extra_files or {}).items():
            entries.update(_write_listed(tmp, file_name, obj))
        _publish(root, tmp, final, state, Topology(1, 1, num_experts), config, keep_last=10 ** 9,
                 manifest=mf.build_manifest(entries), extra={"weights_only": True, "origin": origin})
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing the checkpoint {final} failed: {err}; nothing was published") from err
    return final


def save_model_checkpoint(root: str | Path, model: nn.Module, config: dict, state: TrainState,
                          origin: str) -> Path:
    """``save_weights_checkpoint`` of a single-process model holding every expert."""
    dense, experts = split_state(model)
    num_experts = config["moe"]["num_experts"]
    for name, t in experts.items():
        if t.shape[0] != num_experts:
            raise ValueError(f"{name} holds {t.shape[0]} experts, not moe.num_experts = {num_experts}: "
                             f"save_model_checkpoint needs a model with every expert (ep 1)")
    return save_weights_checkpoint(root, dense=dense, experts=experts, num_experts=num_experts,
                                   config=config, state=state, origin=origin)
