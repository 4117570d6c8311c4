"""The canonical checkpoint: the whole training state by logical parameter name, loadable
at any world size, any expert-parallel size dividing E and ZeRO stage 0, 1 or 2.

Why a second format: the engine checkpoint (``engine_format``) stores each rank's
ZeRO partition of the optimizer, which only the same layout can read back. Stacks that
move such state to another layout lose experts or moments on the way (DeepSpeed's
universal checkpoint skips experts of layers it did not build, DeepSpeed #5716), so this
one is built from the pieces that do hold: DeepSpeed's public accessors and
``torch.distributed.checkpoint`` (DCP).

Layout, beside the engine files of the same step::

    step_00000020/canonical/
      meta.json         kind "canonical", step, train state (tokens seen, skipped steps, every
                        rank's data-loader position), the layout it was saved from, config,
                        versions, loss scaler, and the manifest (below); written last
      .metadata         DCP's index of every tensor: global shape, dtype, chunks
      __R_0.distcp      the chunks rank R wrote

DCP keys, ``NAME`` a logical parameter (``model.named_parameters()``) or buffer name:

    master/NAME       the fp32 master weight; an expert tensor stacked over ALL experts by
                      global expert id, [E, ...]
    exp_avg/NAME      AdamW's first moment (fp32), same shape
    exp_avg_sq/NAME   AdamW's second moment (fp32), same shape
    step/NAME         AdamW's step count of that tensor (0-d fp32)
    buffer/NAME       every persistent buffer (e.g. the router's selection bias b_E)

The learning rate needs no state: it is a pure function of the step
(``moe_train.train.schedule``). The RNG is not carried over: a resume re-derives it from
(seed, step, rank) and says so, since another layout has other ranks anyway.

Gathering: ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` are
all-reduces over the parameter's own data-parallel group (the expert-data-parallel group
for experts), so every rank calls them for every parameter in the same order. At ZeRO 0
they do not apply (no ``_hp_mapping``): the master is the parameter itself (fp32) or
DeepSpeed's fp32 copy (bf16/fp16), and the moments are read from the optimizer's state.

Writing: experts are a ``DTensor`` sharded ``Shard(0)`` over the expert-parallel ranks
(replicated over the expert-data-parallel ones), so each rank of the first EP block writes
its own experts in parallel, no rank ever holds all of them, and a load reads only the
rows of the experts it will own; DCP writes replicated dense tensors once (its planner
de-duplicates them across ranks). The alternative, gathering everything onto rank 0,
needs the whole model and optimizer (12 bytes a parameter) in one process's memory.

Manifest (in meta.json): every file with its size and CRC-32, and every tensor with its
global shape, dtype and a CRC-32 of its data; for expert tensors one CRC-32 per global
expert id (``rows_crc32``), so that a load at any layout checks exactly the experts it
read. A load compares what it read with the manifest and fails naming the tensor (and
the expert); nothing missing is ever initialised instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

import moe_train.checkpoint.manifest as mf
from moe_train.checkpoint.optimizer_state import MOMENTS, OptimizerView, restore_scaler, scaler_state
from moe_train.checkpoint.state import (CANONICAL_DIRNAME, CheckpointError, TrainState, agree, gather, provenance,
                                        read_meta)
from moe_train.parallel.grads import is_expert_param
from moe_train.parallel.groups import ParallelGroups

FORMAT_VERSION = 1
DIRNAME = CANONICAL_DIRNAME
KIND = "canonical"


# ------------------------------------------------------------------------ gathering


def _names(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, Tensor]]:
    """(logical parameters, persistent buffers) by name; a tensor shared by several
    modules appears once, under its first name."""
    params = dict(model.named_parameters())
    keys = set(model.state_dict(keep_vars=True))
    buffers = {n: b for n, b in model.named_buffers() if n in keys}
    return params, buffers


def gather_state(model: nn.Module, optimizer) -> tuple[dict[str, Tensor], set[str]]:
    """Every canonical tensor as this rank holds it (CPU copies): dense ones whole,
    expert ones as this rank's ``[E_local, ...]`` rows. A collective: every rank calls
    it. Returns (tensors by DCP key, the keys that are expert tensors)."""
    view = OptimizerView(optimizer, model)
    view.ensure_state()
    params, buffers = _names(model)
    out, expert_keys = {}, set()
    for name, p in params.items():
        keys = [f"master/{name}"] + ([f"{m}/{name}" for m in MOMENTS] if view.has(p) else [])
        for key in keys:
            value = view.get(p, key.split("/", 1)[0])
            out[key] = (value if value is not None else p.detach()).float().cpu().clone()
        if view.has(p):
            out[f"step/{name}"] = torch.tensor(view.get_step(p), dtype=torch.float32)
        if is_expert_param(p):
            expert_keys.update(k for k in keys)
    for name, b in buffers.items():
        out[f"buffer/{name}"] = b.detach().cpu().clone()
    return out, expert_keys


# --------------------------------------------------------------------------- manifest


def _records(tensors: dict[str, Tensor], expert_keys: set[str], groups: ParallelGroups) -> dict:
    """Manifest records of the tensors this rank is responsible for: dense tensors
    round-robin over the ranks, expert rows on the first EP block (one CRC per expert)."""
    topo, rank = groups.topology, groups.rank
    out = {}
    for i, key in enumerate(sorted(tensors)):
        t = tensors[key]
        if key in expert_keys:
            if rank < topo.ep_size:
                first = topo.local_experts(rank).start
                out[key] = {"rows": {first + j: mf.tensor_crc32(t[j]) for j in range(t.shape[0])},
                            "shape": [topo.num_experts, *t.shape[1:]],
                            "dtype": str(t.dtype).removeprefix("torch.")}
        elif i % topo.world_size == rank:
            out[key] = mf.tensor_record(t)
    return out


def _merge_records(parts: list[dict]) -> dict:
    merged: dict[str, dict] = {}
    for part in parts:
        for key, rec in part.items():
            if "rows" in rec:
                entry = merged.setdefault(key, {"shape": rec["shape"], "dtype": rec["dtype"], "rows": {}})
                entry["rows"].update(rec["rows"])
            else:
                merged[key] = rec
    for rec in merged.values():
        if "rows" in rec:
            rows = rec.pop("rows")
            rec["rows_crc32"] = [rows[e] for e in sorted(rows)]
    return dict(sorted(merged.items()))


def check_tensors(records: dict, tensors: dict[str, Tensor], first_expert: int, where: str) -> list[str]:
    """Problems between manifest ``records`` and tensors read back (dense whole, experts
    as rows starting at global expert id ``first_expert``), each naming the tensor."""
    problems = []
    for key in sorted(tensors):
        rec, t = records.get(key), tensors[key]
        if rec is None:
            problems.append(f"{where}: tensor {key} is not in the manifest")
            continue
        dtype = str(t.dtype).removeprefix("torch.")
        if "rows_crc32" in rec:
            if list(t.shape[1:]) != rec["shape"][1:] or dtype != rec["dtype"]:
                problems.append(f"{where}: tensor {key} is {dtype} {tuple(t.shape)}, the manifest says "
                                f"{rec['dtype']} {tuple(rec['shape'])}")
                continue
            for j in range(t.shape[0]):
                if mf.tensor_crc32(t[j]) != rec["rows_crc32"][first_expert + j]:
                    problems.append(f"{where}: tensor {key}, expert {first_expert + j}, is corrupted "
                                    f"(checksum differs from the manifest)")
        else:
            problems.extend(mf.compare_tensors({key: rec}, {key: t}, where))
    return problems


# ---------------------------------------------------------------------------- saving


def _mesh(groups: ParallelGroups):
    """DCP's view of the layout: a (expert-data-parallel x expert-parallel) mesh made from
    our own process groups (no new groups), or None at ep 1 (experts are whole)."""
    from torch.distributed.device_mesh import DeviceMesh

    topo = groups.topology
    if topo.ep_size == 1:
        return None
    return DeviceMesh.from_group([groups.edp, groups.ep], "cpu",
                                 mesh=torch.arange(topo.world_size).reshape(topo.edp_size, topo.ep_size),
                                 mesh_dim_names=("edp", "ep"))


def _as_dcp(tensors: dict[str, Tensor], expert_keys: set[str], mesh) -> dict:
    if mesh is None:
        return dict(tensors)
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return {k: DTensor.from_local(t, mesh, [Replicate(), Shard(0)], run_check=False) if k in expert_keys else t
            for k, t in tensors.items()}


def _dcp_errors() -> tuple:
    """What a DCP call raises (its CheckpointException is a BaseException); evaluated only
    when an exception reaches the handler, so importing this module stays cheap."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def one_line_error(err: BaseException) -> str:
    """The innermost error of a (DCP) exception, in one line: what the user can act on."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))), "")
    return f"{type(err).__name__}: {last[:240]}" if last else type(err).__name__


def _agree(error: Optional[str], world: int) -> list[str]:
    return [e for e in agree(error, world) if e]


def save(step_dir: str | Path, *, model: nn.Module, optimizer, state: TrainState,
         groups: ParallelGroups, config: dict) -> Path:
    """Writes ``step_dir/canonical`` atomically (module docstring). Every rank calls it.

    Raises:
        CheckpointError on every rank when any rank failed; nothing was published and
        ``step_dir`` (the engine checkpoint) is untouched.
    """
    step_dir = Path(step_dir)
    tmp, final = step_dir / f".tmp_{DIRNAME}", step_dir / DIRNAME
    topo, rank, world = groups.topology, groups.rank, groups.topology.world_size
    tensors, expert_keys = gather_state(model, optimizer)
    records = gather(_records(tensors, expert_keys, groups), world)
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as err:
            error = f"rank 0: cannot create {tmp}: {err}"
    _raise_if(_agree(error, world), state.step, tmp, rank)
    import torch.distributed.checkpoint as dcp

    try:
        dcp.save(_as_dcp(tensors, expert_keys, _mesh(groups)), checkpoint_id=str(tmp))
    except _dcp_errors() as err:  # DCP re-raises every rank's failure on every rank
        error = f"rank {rank}: writing {tmp} failed: {one_line_error(err)}"
    _raise_if(_agree(error, world), state.step, tmp, rank)
    if rank == 0:
        try:
            _publish(tmp, final, state, topo, config, _merge_records(records), scaler_state(optimizer))
        except OSError as err:
            error = f"rank 0: publishing {final} failed: {err}"
    _raise_if(_agree(error, world), state.step, tmp, rank)
    return final


def _raise_if(errors: list[str], step: int, tmp: Path, rank: int) -> None:
    if not errors:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(f"canonical checkpoint of step {step} failed: {'; '.join(errors)}. "
                          f"Nothing was published; the engine checkpoint {tmp.parent} is intact")


def _publish(tmp: Path, final: Path, state: TrainState, topo, config: dict, records: dict,
             scaler: dict) -> None:
    entries = {p.name: {"crc32": mf.file_crc32(p), "bytes": p.stat().st_size, "tensors": {}}
               for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = mf.build_manifest(entries)
    manifest["tensors"] = records
    meta = {"format": FORMAT_VERSION, "kind": KIND, "complete": True, "step": state.step,
            "tokens_seen": state.tokens_seen, "train_state": asdict(state),
            "topology": {"world_size": topo.world_size, "ep_size": topo.ep_size, "num_experts": topo.num_experts},
            "config": config, "versions": provenance(), "saved_at": time.time(),
            "files": {name: e["bytes"] for name, e in entries.items()}, "loss_scaler": scaler,
            "manifest": manifest}
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step converted again
        shutil.rmtree(final)
    os.rename(tmp, final)


# --------------------------------------------------------------------------- verifying


def complete_canonical(step_dir: Path) -> Optional[Path]:
    """``step_dir/canonical`` when it is a complete canonical checkpoint."""
    path = Path(step_dir) / DIRNAME
    meta = read_meta(path)
    return path if meta and meta.get("kind") == KIND and meta.get("complete") else None


def read_all(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a canonical checkpoint, whole (experts ``[E, ...]``), in this one
    process, without a process group: for inspection, export and tests."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()}
    with warnings.catch_warnings():  # one process on purpose: no "assuming a single process" warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(out, checkpoint_id=str(path), no_dist=True)
    return out


def verify(path: str | Path) -> list[str]:
    """Every problem of the canonical checkpoint at ``path`` (empty: sound): meta.json,
    every file's presence, size and CRC-32; when a file differs, the tensors are read to
    name the ones that differ. Needs no model and no process group."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        return [f"{path}: no readable meta.json (not a canonical checkpoint, or a save that never finished)"]
    if meta.get("kind") != KIND or not meta.get("complete") or "manifest" not in meta:
        return [f"{path}: meta.json does not describe a complete canonical checkpoint"]
    manifest, problems = meta["manifest"], []
    for name, entry in manifest["files"].items():
        p = path / name
        if not p.is_file():
            problems.append(f"{path}/{name}: file is missing")
        elif p.stat().st_size != entry["bytes"]:
            problems.append(f"{path}/{name}: {p.stat().st_size} bytes, the manifest says {entry['bytes']} "
                            f"(truncated or rewritten)")
        elif mf.file_crc32(p) != entry["crc32"]:
            problems.append(f"{path}/{name}: corrupted (checksum differs from the manifest)")
    for p in sorted(path.iterdir()):
        if p.is_file() and p.name not in manifest["files"] and p.name != "meta.json":
            problems.append(f"{path}/{p.name}: file is not in the manifest")
    if problems:
        try:
            tensors = read_all(path)
        except _dcp_errors() as err:  # a torn file: DCP cannot read it at all
            return problems + [f"{path}: cannot be read ({one_line_error(err)})"]
        named = check_tensors(manifest["tensors"], tensors, 0, str(path))
        named += [f"{path}: tensor {k} is missing (the manifest lists it)"
                  for k in sorted(set(manifest["tensors"]) - set(tensors))]
        problems = named + problems
    return problems


# ---------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    """A canonical checkpoint as this rank needs it: dense tensors whole, experts as this
    rank's rows (CPU), with the checkpoint's meta."""

    path: Path
    meta: dict
    tensors: dict[str, Tensor]


def load(path: str | Path, model: nn.Module, groups: ParallelGroups) -> Loaded:
    """Reads what this rank needs at ITS layout (a collective: every rank calls it) and
    checks it against the manifest: the names must be the model's, the shapes must fit,
    every tensor read must match its checksum.

    Raises:
        CheckpointError on every rank, naming the first problem of any rank.
    """
    path = Path(path)
    meta = read_meta(path) or {}
    records, topo, rank = meta["manifest"]["tensors"], groups.topology, groups.rank
    params, buffers = _names(model)
    want: dict[str, Tensor] = {}
    expert_keys: set[str] = set()
    for name, p in params.items():
        keys = [f"master/{name}"] + [f"{m}/{name}" for m in MOMENTS] * p.requires_grad
        for key in keys:
            want[key] = torch.zeros(p.shape, dtype=torch.float32)
            if is_expert_param(p):
                expert_keys.add(key)
        if p.requires_grad:
            want[f"step/{name}"] = torch.zeros((), dtype=torch.float32)
    for name, b in buffers.items():
        want[f"buffer/{name}"] = torch.zeros(b.shape, dtype=getattr(torch, records.get(
            f"buffer/{name}", {}).get("dtype", str(b.dtype).removeprefix("torch."))))
    error = _names_and_shapes(records, want, expert_keys, topo, path)
    if error is None:
        sd = _as_dcp(want, expert_keys, _mesh(groups))
        import torch.distributed.checkpoint as dcp

        try:
            dcp.load(sd, checkpoint_id=str(path))
        except _dcp_errors() as err:
            error = f"rank {rank}: reading {path} failed: {one_line_error(err)}"
    if error is None:
        first = topo.local_experts(rank).start
        problems = check_tensors(records, {k: v for k, v in want.items() if k not in expert_keys}, 0,
                                 f"rank {rank}: {path}")
        problems += check_tensors(records, {k: want[k] for k in expert_keys}, first, f"rank {rank}: {path}")
        error = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") if problems else None
    errors = _agree(error, topo.world_size)
    if errors:
        raise CheckpointError(errors[0])
    return Loaded(path, meta, want)


def _names_and_shapes(records: dict, want: dict[str, Tensor], expert_keys: set[str], topo,
                      path: Path) -> Optional[str]:
    missing, extra = sorted(set(want) - set(records)), sorted(set(records) - set(want))
    if missing or extra:
        return (f"canonical checkpoint {path}: tensors differ from the model: missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}, unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    for key, t in want.items():
        shape = [topo.num_experts, *t.shape[1:]] if key in expert_keys else list(t.shape)
        if records[key]["shape"] != shape:
            return (f"canonical checkpoint {path}: {key} has shape {tuple(records[key]['shape'])}, "
                    f"this model needs {tuple(shape)}")
    return None


@torch.no_grad()
def apply_to_model(model: nn.Module, loaded: Loaded) -> None:
    """Weights from the fp32 masters and the buffers, BEFORE the engine is built (so any
    low-precision copy DeepSpeed makes starts from them)."""
    params, buffers = _names(model)
    for name, p in params.items():
        p.copy_(loaded.tensors[f"master/{name}"])
    for name, b in buffers.items():
        b.copy_(loaded.tensors[f"buffer/{name}"])


@torch.no_grad()
def restore_optimizer(optimizer, model: nn.Module, loaded: Loaded) -> str:
    """Masters, then moments, then steps set through the accessors (ZeRO 1/2) or the
    optimizer's own state (ZeRO 0), then the low-precision weights refreshed from the
    masters. Local writes only (the setters are not collectives). Returns a summary."""
    view = OptimizerView(optimizer, model)
    view.ensure_state()
    params, _ = _names(model)
    steps = {}
    for name, p in params.items():
        master = loaded.tensors[f"master/{name}"].to(p.device)
        if view.has(p):
            view.set(p, "master", master)
            for key in MOMENTS:
                view.set(p, key, loaded.tensors[f"{key}/{name}"].to(p.device))
            steps[id(p)] = float(loaded.tensors[f"step/{name}"])
        p.data.copy_(master.to(p.dtype))  # the low-precision weights follow the masters
    view.set_steps(steps)
    adam_steps = sorted(set(steps.values()))
    return (f"AdamW step {', '.join(f'{s:g}' for s in adam_steps)}"
            f"{restore_scaler(optimizer, loaded.meta.get('loss_scaler', {}))}")


