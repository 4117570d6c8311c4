"""Resumable streaming loader with equal steps on every data-parallel rank.

Build one per rank with explicit `rank` and `world_size` (the data-parallel ones; this
module never calls torch.distributed):

    train = build_train_loader(cfg.data, rank, world_size)
    for batch in train:            # one epoch from the current position, then epoch += 1
        batch["input_ids"], batch["labels"]    # LongTensor [B, S]; labels -100 = ignore
    state = train.state_dict()     # plain ints/lists/dicts: JSON- and torch.save-able
    train.load_state_dict(state)   # exact resume (same world size and workers)

Order (details in plan.py): each epoch is a seeded permutation of whole shards (plus the
carried-in tail of the previous epoch); rank r reads a contiguous 1/W of it, its workers
contiguous pieces of that, each shuffled in seeded blocks of `shuffle_buffer` samples;
batches are interleaved over workers in a fixed round-robin. Every rank computes the same
S = len(epoch) // (W*B) from the manifest, so all ranks yield S batches: no hang.
Remainder (< W*B samples): tail_policy "carry" puts it at the start of the next epoch
(and out of its shard's place there, so every epoch holds every sample exactly once),
"drop" skips it for this epoch (counted in stats()["dropped_tail_samples"]); since the
shard order changes every epoch, different samples fall in the tail each time.

State: {"epoch", "step" (batches consumed per rank), the layout, carry_in, ...}; it is the
same on every rank, so saving rank 0's copy is enough. Loaded with the same layout, the
stream continues sample for sample. Loaded with a different world size, worker count or
batch size, the unconsumed rest of the epoch is re-split over the new layout (logged):
every sample of the epoch is still served exactly once, the unserved samples of partly
read shuffle blocks included (a block's permutation depends only on its seed key, so
the new owner recomputes which of them were served; plan.py).

Validation (`build_val_loader`): manifest order, no shuffle, rank r gets N//W (+1)
samples; every rank yields ceil(ceil(N/W)/B) batches; padding slots have
sample_mask False and labels -100, so token-summed losses give the exact mean.

Bad data: on_error="raise" raises ShardError naming shard and member (also from workers);
"skip" masks the sample's slot (batch shapes and counts unchanged, so no rank hangs),
warns, and counts it in stats().
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Iterator, Optional

from braceexpand import braceexpand
import torch
from torch.utils.data import DataLoader

from moe_train.data.config import DataConfig
import moe_train.data.plan as plan
from moe_train.data.reader import BlockDataset, SourceInfo, WorkerSpec, make_batch
from moe_train.data.shards import check_url, load_manifest

log = logging.getLogger("moe_train.data")
STATE_VERSION = 2        # 2: ranges may hold block slices (plan.py); 1 has plain ranges only


def _keep(item):
    """collate_fn that leaves worker output as numpy (pickled, not shared-memory tensors)."""
    return item


def expand_urls(pattern: str, allow_pipe: bool, field: str) -> list[str]:
    """Expand brace patterns separated by '::' or whitespace into a URL list ("pipe:"
    commands may contain spaces, so separate them with '::')."""
    parts = []
    for part in pattern.split("::"):
        part = part.strip()
        parts.extend([part] if part.startswith("pipe:") else part.split())
    urls = [u for part in parts if part for u in braceexpand(part)]
    for url in urls:
        check_url(url, allow_pipe, field)
    return urls


def resolve_shards(manifest: dict, manifest_url: str, split: str, override: str,
                   allow_pipe: bool, field: str) -> tuple[list[str], list[int]]:
    """(shard URLs, samples per shard) of one split.

    Raises:
        ValueError: unknown split, empty split, or an override URL not in the manifest.
    """
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(f"data split {split!r} not in manifest {manifest_url!r} "
                         f"(it has {sorted(splits)})")
    entries = splits[split]["shards"]
    if not override:
        base = manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else "."
        urls, counts = [f"{base}/{e['name']}" for e in entries], [e["samples"] for e in entries]
    else:
        by_name = {os.path.basename(e["name"]): e for e in entries}
        urls = expand_urls(override, allow_pipe, field)
        counts = []
        for url in urls:
            names = re.findall(r"([^/\s]+\.tar)(?![^\s?#])", url)
            name = names[-1] if names else url
            if name not in by_name:
                raise ValueError(f"{field}: {url!r} is not a shard of split {split!r} in "
                                 f"{manifest_url!r}")
            counts.append(by_name[name]["samples"])
    if not urls or sum(counts) == 0:
        raise ValueError(f"{field}: split {split!r} of {manifest_url!r} has no samples "
                         f"({len(urls)} shards)")
    return urls, counts


class StreamingLoader:
    """Streams one split for one data-parallel rank (see the module docstring).

    Args:
        cfg: the data config section.
        rank, world_size: data-parallel rank and size.
        train: True = shuffled, resumable training stream; False = one ordered,
            padded evaluation pass per iteration.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, train: bool = True):
        cfg.validate()
        if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"data loader: rank={rank!r}, world_size={world_size!r}: need "
                             "0 <= rank < world_size")
        self.cfg, self.rank, self.train = cfg, rank, train
        manifest = load_manifest(cfg.manifest, cfg.allow_pipe, cfg.read_timeout_s)
        if manifest["seq_len"] != cfg.seq_len:
            raise ValueError(f"data.seq_len={cfg.seq_len} but the shards of "
                             f"{cfg.manifest!r} hold seq_len={manifest['seq_len']}")
        split = cfg.train_split if train else cfg.val_split
        field = "data.train_shards" if train else "data.val_shards"
        urls, self.counts = resolve_shards(manifest, cfg.manifest, split,
                                           cfg.train_shards if train else cfg.val_shards,
                                           cfg.allow_pipe, field)
        self.manifest = manifest
        self.src = SourceInfo(urls, self.counts, plan.shard_offsets(self.counts),
                              manifest["sample_tokens"], manifest["dtype"], manifest["pad_id"],
                              cfg.on_error, cfg.allow_pipe, cfg.read_timeout_s)
        B = cfg.micro_batch_size if train else (cfg.val_micro_batch_size or cfg.micro_batch_size)
        block = B if (not train or cfg.shuffle_buffer == 0) else -(-cfg.shuffle_buffer // B) * B
        self.layout = plan.Layout(world_size, max(1, cfg.num_workers), B, block)
        names = [os.path.basename(u) for u in urls]
        self.fingerprint = hashlib.sha256(json.dumps([names, self.counts]).encode()).hexdigest()
        self.num_samples = sum(self.counts)
        self.epoch, self.step = 0, 0
        self._carry_in: list = []
        self._resplit: Optional[list] = None
        self._generation = 0
        self._stats = {"batches": 0, "samples": 0, "skipped_samples": 0, "bad_shards": 0,
                       "dropped_tail_samples": 0, "carried_samples": 0,
                       "skipped_on_resplit": 0}
        if train and self.steps_per_epoch == 0:
            raise ValueError(f"data.micro_batch_size={B}: split {split!r} has "
                             f"{self.num_samples} samples, fewer than one global batch "
                             f"(world_size {world_size} x {B})")

    # ------------------------------------------------------------------ epoch order
    def _ranges(self) -> list:
        if self._resplit is not None:
            return self._resplit
        if not self.train:
            return plan.epoch_ranges(self.counts, 0, 0, False, [])
        return plan.epoch_ranges(self.counts, self.cfg.seed, self.epoch,
                                 self.cfg.shuffle_shards, self._carry_in)

    @property
    def steps_per_epoch(self) -> int:
        """Batches every rank yields in the current epoch (from its start)."""
        total = plan.ranges_len(self._ranges())
        return plan.train_steps(total, self.layout) if self.train else \
            plan.eval_steps(total, self.layout)

    def __len__(self) -> int:
        """Batches left in the current epoch (a full pass for validation)."""
        return self.steps_per_epoch - (self.step if self.train else 0)

    def _advance_epoch(self) -> None:
        tail = plan.tail_ranges(self._ranges(), self.layout)
        num_tail = plan.ranges_len(tail)
        if self.cfg.tail_policy == "carry":
            self._carry_in = tail
            self._stats["carried_samples"] += num_tail
        else:
            self._carry_in = []
            self._stats["dropped_tail_samples"] += num_tail
        self.epoch, self.step, self._resplit, self._generation = self.epoch + 1, 0, None, 0

    def _key_prefix(self) -> list:
        """Start of every shuffle block's seed key this epoch (plan.py): the same after a
        re-split, so blocks served before it can be recomputed."""
        return [self.cfg.seed, self.epoch, self._generation]

    def _specs(self, start_step: int) -> list:
        ranges, L = self._ranges(), self.layout
        specs = []
        for w in range(L.num_workers):
            if self.train:
                mine, pad = plan.train_worker_ranges(ranges, L, self.rank, w), 0
                seed_key = None if self.cfg.shuffle_buffer == 0 else \
                    self._key_prefix() + [self.rank, w]
            else:
                (mine, pad), seed_key = plan.eval_worker_ranges(ranges, L, self.rank, w), None
            start = plan.worker_batches(start_step, L.num_workers, w)
            specs.append(WorkerSpec(w, L.num_workers, mine, pad, start, L.batch_size,
                                    L.block, seed_key))
        return specs

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        if self.train and self.step >= self.steps_per_epoch:
            self._advance_epoch()
        start = self.step if self.train else 0
        steps = self.steps_per_epoch
        dataset = BlockDataset(self.src, self._specs(start))
        if self.cfg.num_workers == 0:
            source = iter(dataset)
        else:
            # A generator of its own: without one, every new DataLoader iterator draws its
            # workers' base seed from the global torch RNG, which a resume at a later step
            # would not repeat (router jitter would shift). The workers use no randomness.
            source = iter(DataLoader(
                dataset, batch_size=None, num_workers=self.cfg.num_workers,
                prefetch_factor=self.cfg.prefetch_factor, collate_fn=_keep,
                timeout=self.cfg.worker_timeout_s, persistent_workers=False,
                generator=torch.Generator().manual_seed(self.cfg.seed)))
        expected, pending = start, {}
        try:
            for kind, index, payload, events in source:
                if kind == "error":
                    raise payload
                self._record(events)
                pending[index] = payload
                while expected in pending:
                    batch = make_batch(*pending.pop(expected), self.src.pad_id)
                    if self.cfg.pin_memory:
                        batch = {k: v.pin_memory() for k, v in batch.items()}
                    expected += 1
                    if self.train:
                        self.step = expected
                    self._stats["batches"] += 1
                    self._stats["samples"] += int(batch["sample_mask"].sum())
                    yield batch
        finally:
            # Stop workers now, not when a traceback holding this frame is collected.
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        assert expected == steps and not pending, (expected, steps, sorted(pending))
        if self.train:
            self._advance_epoch()

    def _record(self, events: list) -> None:
        for event in events:
            self._stats["skipped_samples"] += event.get("skipped_samples", 0)
            self._stats["bad_shards"] += event.get("bad_shard", 0)
            log.warning("data (rank %d): skipped bad data: %s", self.rank, event["message"])

    def stats(self) -> dict:
        """Counters of this rank since construction: batches, samples (real, unmasked),
        skipped_samples, bad_shards, dropped_tail_samples / carried_samples (global
        counts, same on every rank), and the current epoch/step. skipped_on_resplit stays
        0: a re-split serves every unconsumed sample (older versions skipped the rest of
        partly consumed shuffle blocks and counted it here)."""
        return dict(self._stats, epoch=self.epoch, step=self.step)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Position of the stream: plain Python values, identical on every rank."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step,
                "seed": self.cfg.seed, "shuffle_shards": self.cfg.shuffle_shards,
                "layout": self.layout.to_dict(), "carry_in": plan.copy_ranges(self._carry_in),
                "resplit": None if self._resplit is None else plan.copy_ranges(self._resplit),
                "generation": self._generation,
                "dataset": {"fingerprint": self.fingerprint, "num_samples": self.num_samples}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by `state_dict` (see module docstring for layouts).

        A version 1 state (before block slices) is a version 2 state without them, and
        its blocks were seeded the same way, so it resumes and re-splits exactly too.

        Raises:
            ValueError: the state belongs to another dataset, seed or format.
        """
        if not self.train:
            raise ValueError("the validation loader has no position to restore")
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"data loader state version {state.get('version')!r} is unknown "
                             f"(this moe_train reads versions 1 and {STATE_VERSION}): resume "
                             "with the moe_train version that saved the checkpoint")
        if state["dataset"]["fingerprint"] != self.fingerprint:
            raise ValueError(f"data loader state was saved for another shard set "
                             f"({state['dataset']['num_samples']} samples, this one has "
                             f"{self.num_samples}): check data.manifest / data.train_shards")
        for key in ("seed", "shuffle_shards"):
            if state[key] != getattr(self.cfg, key):
                raise ValueError(f"data.{key}={getattr(self.cfg, key)!r} but the checkpoint "
                                 f"was made with {state[key]!r}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._carry_in = plan.copy_ranges(state["carry_in"])
        self._resplit = None if state["resplit"] is None else plan.copy_ranges(state["resplit"])
        self._generation = int(state["generation"])
        old = plan.Layout(**state["layout"])
        if old != self.layout:
            self._resplit_from(old)

    def _resplit_from(self, old: plan.Layout) -> None:
        remaining = plan.remaining_after(self._ranges(), old, self.step, self._key_prefix())
        self._resplit, self._generation, self.step = remaining, self._generation + 1, 0
        log.warning(
            "data: resuming epoch %d saved with %s on %s: re-split the %d unconsumed samples "
            "of this epoch (%d of them in partly consumed shuffle blocks) "
            "over the new layout (%d steps per rank)",
            self.epoch, old.to_dict(), self.layout.to_dict(), plan.ranges_len(remaining),
            sum(plan.piece_len(p) for p in remaining if plan.is_slice(p)),
            self.steps_per_epoch)
        if self.steps_per_epoch == 0:
            self._advance_epoch()


def build_train_loader(cfg: DataConfig, rank: int, world_size: int) -> StreamingLoader:
    """Training stream of `cfg.train_split` for data-parallel `rank` of `world_size`."""
    return StreamingLoader(cfg, rank, world_size, train=True)


def build_val_loader(cfg: DataConfig, rank: int, world_size: int) -> StreamingLoader:
    """Evaluation stream of `cfg.val_split`: each iteration is one full ordered pass."""
    return StreamingLoader(cfg, rank, world_size, train=False)
