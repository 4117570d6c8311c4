"""The canonical checkpoint: the whole training state by logical parameter name, loadable
at any world size, any expert-parallel size dividing E and ZeRO stage 0, 1 or 2.

Why a second format: the engine checkpoint (``engine_format``) stores each rank's
ZeRO partition of the optimizer, which only the same layout can read back. Stacks that
move such state to another layout lose experts or moments on the way (DeepSpeed's
universal checkpoint skips experts of layers it did not build, DeepSpeed #5716), so this
one is built from the pieces that do hold: DeepSpeed's map of each parameter's slice of
the ZeRO partitions (``_hp_mapping``, what its public ``safe_get_``/``safe_set_``
accessors read and write) and ``torch.distributed.checkpoint`` (DCP).

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

Who writes what (``gather_owned``): every tensor is written by exactly one rank (experts
by one EP block), and no rank gathers the state whole. Under ZeRO 1/2 each rank holds a
slice of every flat fp32 partition (DeepSpeed's ``_hp_mapping``); a tensor whole in one
rank's partition (most are; the partitions are balanced already) is written by that rank
straight from the partition, without a copy; a tensor split across partitions by the
least loaded of its holders, which receives the other slices in one ``all_to_all_single``
per bucket of at most ``BUCKET_BYTES`` over the parameter's data-parallel group (the EDP
group for experts). A save's collectives: one small all-gather of who holds what, the
buckets, the manifest's all-gather and DCP's own few; not the three all-reduces a
parameter, each leaving the whole tensor on every rank, of DeepSpeed's
``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` (the slow reference in
``tests/test_canonical_cost.py``). At ZeRO 0 every rank holds everything whole (the master
is the parameter at fp32, DeepSpeed's fp32 copy at bf16/fp16): no collective, each tensor
written by one rank, balanced by bytes; steps and buffers too.

Writing: experts are a ``DTensor`` sharded ``Shard(0)`` over the expert-parallel ranks of
the EP block that writes them (the other blocks leave the key out), so each rank writes
its own experts, no rank ever holds all of them, and a load reads only the rows of the
experts it will own. Same keys, shapes, chunks and manifest as when every rank offered
every tensor and DCP de-duplicated them; only which rank's file holds a tensor differs.

Manifest (in meta.json): every file with its size and CRC-32, and every tensor with its
global shape, dtype and a CRC-32 of its data; for expert tensors one CRC-32 per global
expert id (``rows_crc32``), so that a load at any layout checks exactly the experts it
read. A load compares what it read with the manifest and fails naming the tensor (and
the expert); nothing missing is ever initialised instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
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

BUCKET_BYTES = 64 * 2 ** 20  # at most this much state moves in one collective of a save (fp32)


def _names(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, Tensor]]:
    """(logical parameters, persistent buffers) by name; a tensor shared by several
    modules appears once, under its first name."""
    params = dict(model.named_parameters())
    keys = set(model.state_dict(keep_vars=True))
    buffers = {n: b for n, b in model.named_buffers() if n in keys}
    return params, buffers


@dataclass
class _Part:
    """One canonical tensor in the save plan (the same list, in the same order, on every
    rank). ``owner``: dense, the global rank that writes it; expert, the EDP index whose
    EP block writes it (each rank of that block its own ``[E_local, ...]`` rows)."""

    key: str
    shape: tuple
    expert: bool
    index: int = -1  # position of its parameter in ``_names`` (the fragment maps key by it)
    param: Optional[Tensor] = None
    read: Optional[Callable[[], Tensor]] = None  # the tensor as stored; None: ZeRO fragments
    owner: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _plan(model: nn.Module, view: OptimizerView) -> list[_Part]:
    params, buffers = _names(model)
    parts = []
    for i, (name, p) in enumerate(params.items()):
        shape, expert = tuple(p.shape), is_expert_param(p)
        if not view.has(p):  # frozen: every rank holds the weight, its own master
            parts.append(_Part(f"master/{name}", shape, expert, read=lambda p=p: p.detach().float()))
            continue
        for key in ("master", *MOMENTS):
            read = None if view.kind == "flat" else (lambda p=p, key=key: view.get(p, key).float())
            parts.append(_Part(f"{key}/{name}", shape, expert, i, p, read))
        parts.append(_Part(f"step/{name}", (), False,
                           read=lambda p=p: torch.tensor(view.get_step(p), dtype=torch.float32)))
    parts += [_Part(f"buffer/{name}", tuple(b.shape), False, read=b.detach) for name, b in buffers.items()]
    return parts


def _assign(parts: list[_Part], maps: list[dict], members: list[int], load: list[int]) -> None:
    """Writers for ``parts`` (every rank computes the same). A ZeRO-partitioned part goes
    to a member holding some of it: whole in one partition, to that member (nothing
    moves; the partitions are already balanced), else to the least loaded of its holders;
    the rest each to the least loaded writer, largest first."""
    held = {t.key: [maps[r].get(t.index, (0, 0))[1] for r in members] for t in parts if t.read is None}
    for part in sorted(parts, key=lambda t: t.read is not None or max(held[t.key]) < t.numel):
        if part.read is None:
            holders = [i for i, n in enumerate(held[part.key]) if n] or [0]
            part.owner = min(holders, key=lambda i: (load[i], -held[part.key][i], i))
            load[part.owner] += part.numel
    for part in sorted((t for t in parts if t.read is not None), key=lambda t: (-t.numel, t.key)):
        part.owner = min(range(len(load)), key=load.__getitem__)
        load[part.owner] += part.numel


def _moves(parts: list[_Part], members: list[int], maps: list[dict], numel: int):
    """What writers need from other members, in buckets of at most ``numel`` elements:
    lists of (part, sender's index in ``members``, start, end) in the flattened part."""
    bucket, room = [], numel
    for part in parts:
        for src, r in enumerate(members):
            start, n = maps[r].get(part.index, (0, 0))
            end = start + n
            while src != part.owner and start < end:
                take = min(room, end - start)
                bucket.append((part, src, start, start + take))
                start, room = start + take, room - take
                if room == 0:
                    yield bucket
                    bucket, room = [], numel
    if bucket:
        yield bucket


def _fragment(part: _Part) -> Tensor:
    """This rank's ZeRO fragment of ``part`` (flat fp32, DeepSpeed's ``_hp_mapping``)."""
    moment = part.key.split("/", 1)[0]
    return part.param._hp_mapping.get_hp_fragment(None if moment == "master" else moment).detach().reshape(-1)


def _alone(t: Tensor) -> Tensor:
    """A CPU view into a larger buffer (a ZeRO partition) as a tensor sharing its bytes
    whose storage is exactly them: DCP clones a tensor with a larger storage before writing
    it, and those short-lived clones grew the rank's RSS by about all it wrote (glibc kept
    the freed blocks; benchmarks/checkpoint.py). On a GPU DCP's copy to the host is the
    only one anyway."""
    if t.device.type != "cpu" or not t.numel() or not t.is_contiguous() or t.untyped_storage().nbytes() == t.nbytes:
        return t
    return torch.frombuffer(memoryview(t.reshape(-1).view(torch.uint8).numpy()), dtype=t.dtype).view(t.shape)


def _gather_fragments(parts: list[_Part], members: list[int], group, maps: list[dict], rank: int,
                      out: dict[str, Tensor], numel: int) -> dict[str, int]:
    """Completes, on its writer only, each part partitioned over ``members`` (a ZeRO
    data-parallel group: every rank for dense parameters, the EDP group for experts):
    the writer already holds its own fragment (``gather_owned``); the other members'
    fragments come in one ``all_to_all_single`` over ``group`` per bucket, each member
    sending each writer only what that writer writes. Returns the elements each written
    part received."""
    me, filled = members.index(rank), {}
    for bucket in _moves(parts, members, maps, numel):
        send: list[list[Tensor]] = [[] for _ in members]
        recv, places = [0] * len(members), []
        for part, src, start, end in bucket:
            if src == me:
                first = maps[rank][part.index][0]
                send[part.owner].append(_fragment(part)[start - first:end - first])
            if part.owner == me:
                recv[src] += end - start
                places.append((src, part.key, start, end))
        device = bucket[0][0].param.device  # where DeepSpeed's own gathers run (the backend's device)
        got = torch.empty(sum(recv), dtype=torch.float32, device=device)
        data = torch.cat([t for ts in send for t in ts]).to(device) if any(send) else got[:0]
        dist.all_to_all_single(got, data, recv, [sum(t.numel() for t in ts) for ts in send], group=group)
        offset = [sum(recv[:src]) for src in range(len(members))]
        for src, key, start, end in places:  # per sender in bucket order: the order it sent in
            out[key][start:end] = got[offset[src]:offset[src] + end - start]
            offset[src] += end - start
            filled[key] = filled.get(key, 0) + end - start
    return filled


def gather_owned(model: nn.Module, optimizer, groups: ParallelGroups,
                 bucket_bytes: int = BUCKET_BYTES) -> tuple[dict[str, Tensor], set[str]]:
    """The canonical tensors THIS rank writes (CPU; fp32 but buffers): each dense tensor
    on one rank, each expert tensor on one EP block (``_assign``), as each rank's
    ``[E_local, ...]`` rows. A collective: every rank calls it. A tensor whole in this
    rank's ZeRO partition, and ZeRO 0 state, steps and buffers (every rank holds those
    whole), are the rank's own tensors, not copies: nothing changes them while the save
    runs. Returns (tensors by DCP key, the keys that are expert tensors)."""
    view = OptimizerView(optimizer, model)
    view.ensure_state()
    topo, rank = groups.topology, groups.rank
    parts = _plan(model, view)
    flat = [t for t in parts if t.read is None]
    frags = {t.index: (m.lp_fragment_address.start, m.lp_fragment_address.numel)
             for t in flat if (m := getattr(t.param, "_hp_mapping", None)) is not None}
    maps = gather(frags, topo.world_size) if flat else []  # one small all-gather: who holds what
    dense, experts = list(range(topo.world_size)), topo.edp_group_of(rank)
    _assign([t for t in parts if not t.expert], maps, dense, [0] * len(dense))
    _assign([t for t in parts if t.expert], maps, experts, [0] * len(experts))
    mine = [t for t in parts if t.owner == (experts.index(rank) if t.expert else rank)]
    out, filled = {}, {}
    for t in mine:
        start, n = frags.get(t.index, (0, 0))
        if t.read is not None:
            out[t.key], n = _alone(t.read().cpu()), t.numel
        elif n == t.numel and n:  # whole in this rank's partition: a view of it, no copy
            out[t.key] = _alone(_fragment(t))
        else:
            out[t.key] = torch.empty(t.numel, dtype=torch.float32)
            if n:
                out[t.key][start:start + n] = _fragment(t)
        filled[t.key] = n
    numel = max(1, bucket_bytes // 4)
    for members, group, expert in ((dense, groups.dp, False), (experts, groups.edp, True)):
        if len(members) > 1:
            for key, n in _gather_fragments([t for t in flat if t.expert == expert], members, group, maps,
                                            rank, out, numel).items():
                filled[key] += n
    for t in mine:
        assert filled[t.key] == t.numel, f"{t.key}: {filled[t.key]} of {t.numel} elements gathered"
        if t.read is None:
            out[t.key] = out[t.key].view(t.shape)
    return out, {t.key for t in mine if t.expert}


# --------------------------------------------------------------------------- manifest


def _records(tensors: dict[str, Tensor], expert_keys: set[str], groups: ParallelGroups) -> dict:
    """Manifest records of the tensors this rank writes: dense ones whole, expert ones
    one CRC per expert (this rank's rows)."""
    first = groups.topology.local_experts(groups.rank).start
    out = {}
    for key in sorted(tensors):
        t = tensors[key]
        if key in expert_keys:
            out[key] = {"rows": {first + j: mf.tensor_crc32(t[j]) for j in range(t.shape[0])},
                        "shape": [groups.topology.num_experts, *t.shape[1:]],
                        "dtype": str(t.dtype).removeprefix("torch.")}
        else:
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
         groups: ParallelGroups, config: dict, bucket_bytes: int = BUCKET_BYTES) -> Path:
    """Writes ``step_dir/canonical`` atomically (module docstring). Every rank calls it;
    each writes only the tensors ``gather_owned`` gives it (``bucket_bytes``: at most this
    much ZeRO state moves in one collective).

    Raises:
        CheckpointError on every rank when any rank failed; nothing was published and
        ``step_dir`` (the engine checkpoint) is untouched.
    """
    step_dir = Path(step_dir)
    tmp, final = step_dir / f".tmp_{DIRNAME}", step_dir / DIRNAME
    topo, rank, world = groups.topology, groups.rank, groups.topology.world_size
    tensors, expert_keys = gather_owned(model, optimizer, groups, bucket_bytes)
    records = gather(_records(tensors, expert_keys, groups), world)
    error = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except Exception as err:  # noqa: BLE001 - any failure must reach the agreement
            error = f"rank 0: cannot create {tmp}: {one_line_error(err)}"
    _raise_if(_agree(error, world), state.step, tmp, rank)
    import torch.distributed.checkpoint as dcp

    own: dict = {}
    try:
        dcp.save(_as_dcp(tensors, expert_keys, _mesh(groups)), checkpoint_id=str(tmp))
        own = _own_file_entries(tmp, rank)
    except _dcp_errors() as err:  # DCP re-raises every rank's failure on every rank
        error = f"rank {rank}: writing {tmp} failed: {one_line_error(err)}"
    _raise_if(_agree(error, world), state.step, tmp, rank)
    entries = {name: entry for part in gather(own, world) for name, entry in part.items()}
    if rank == 0:
        try:
            _publish(tmp, final, state, topo, config, _merge_records(records), scaler_state(optimizer), entries)
        except Exception as err:  # noqa: BLE001
            error = f"rank 0: publishing {final} failed: {one_line_error(err)}"
    _raise_if(_agree(error, world), state.step, tmp, rank)
    return final


def _own_file_entries(tmp: Path, rank: int) -> dict:
    """Manifest entries (CRC-32, bytes) of the data files this rank just wrote (DCP names
    them ``__{rank}_{i}.distcp``): each rank reads back only its own, in parallel, so no
    rank reads the whole checkpoint."""
    return {p.name: _file_entry(p) for p in sorted(tmp.glob(f"__{rank}_*.distcp"))}


def _file_entry(path: Path) -> dict:
    """A manifest entry of a DCP file (its tensors are listed in ``manifest["tensors"]``)."""
    return {"crc32": mf.file_crc32(path), "bytes": path.stat().st_size, "tensors": {}}


def _raise_if(errors: list[str], step: int, tmp: Path, rank: int) -> None:
    if not errors:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(f"canonical checkpoint of step {step} failed: {'; '.join(errors)}. "
                          f"Nothing was published; the engine checkpoint {tmp.parent} is intact")


def _publish(tmp: Path, final: Path, state: TrainState, topo, config: dict, records: dict,
             scaler: dict, entries: dict) -> None:
    """Rank 0: ``entries`` (every rank's own files) plus the files no rank claimed (DCP's
    ``.metadata``), then meta.json and the rename."""
    entries = dict(entries)
    for p in sorted(tmp.iterdir()):
        if p.is_file() and p.name not in entries:
            entries[p.name] = _file_entry(p)
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


def verify(path: str | Path, checksums: bool = True) -> list[str]:
    """Every problem of the canonical checkpoint at ``path`` (empty: sound): meta.json,
    every file's presence, size and (``checksums``) CRC-32; when a file differs, the
    tensors are read to name the ones that differ. Needs no model and no process group.
    ``checksums=False`` reads no file (a resume: each rank checks what it loads)."""
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
        elif checksums and mf.file_crc32(p) != entry["crc32"]:
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
