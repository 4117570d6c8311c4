"""Worker-side reading: samples of a range list -> shuffled blocks -> batches.

Runs inside DataLoader worker processes (or the main process when num_workers = 0).
Errors never cross the process boundary as exceptions: a worker yields
("error", ShardError) and the main process raises it, so the user sees one message
naming shard and member instead of a wrapped worker traceback.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from moe_train.data.errors import DataError, ShardError
from moe_train.data.plan import Ranges, block_order, is_slice, ranges_len, take
from moe_train.data.shards import iter_shard

IGNORE_INDEX = -100


@dataclass
class SourceInfo:
    """What a worker needs to read samples: shard URLs, sizes, format, policies."""

    urls: list
    counts: list
    offsets: list
    sample_tokens: int
    dtype: str
    pad_id: int
    on_error: str
    allow_pipe: bool
    read_timeout_s: float


@dataclass
class WorkerSpec:
    """One worker's share of one epoch (see plan.py).

    ranges: samples it reads, in order; num_pad: pad slots after them (evaluation);
    start_batch: local batches already consumed (resume); seed_key: seeds the block
    permutations together with the block index; None = no shuffle.
    """

    worker: int
    num_workers: int
    ranges: Ranges
    num_pad: int
    start_batch: int
    batch_size: int
    block: int
    seed_key: Optional[list]


def iter_samples(src: SourceInfo, ranges: Ranges, events: list) -> Iterator[Optional[np.ndarray]]:
    """Yield each sample of `ranges` (None for a skipped one) in order.

    With on_error="skip", a bad sample or the unreadable rest of a shard becomes None
    slots and an event {"skipped_samples": n, "message": ...}; otherwise ShardError.
    """
    for piece in ranges:
        if is_slice(piece):
            yield from _slice_samples(src, piece, events)
        else:
            yield from _range_samples(src, piece[0], piece[1], events)


def _slice_samples(src: SourceInfo, piece: dict, events: list
                   ) -> Iterator[Optional[np.ndarray]]:
    """The samples of a block slice (the unserved rest of a block cut by a re-split): the
    whole block is read and permuted as when it was first served, and the slice kept.
    Only the slice's bad samples are reported: the rest of the block was served before."""
    inner: list = []
    block = list(iter_samples(src, piece["block"], inner))
    order = block_order(piece["key"], len(block))[piece["start"]:piece["stop"]]
    kept = [block[i] for i in order]
    missing = sum(s is None for s in kept)
    if missing:
        events.append({"skipped_samples": missing,
                       "message": "; ".join(e["message"] for e in inner)})
    yield from kept


def _range_samples(src: SourceInfo, lo: int, hi: int, events: list
                   ) -> Iterator[Optional[np.ndarray]]:
    """The samples of ids [lo, hi) of one shard, in order (see iter_samples)."""
    shard = bisect.bisect_right(src.offsets, lo) - 1
    base = src.offsets[shard]
    expect = lo - base
    try:
        for _, sample in iter_shard(src.urls[shard], src.counts[shard], lo - base,
                                    hi - base, src.sample_tokens, src.dtype,
                                    src.allow_pipe, src.read_timeout_s):
            if isinstance(sample, ShardError):
                if src.on_error != "skip":
                    raise sample
                events.append({"skipped_samples": 1, "message": str(sample)})
                sample = None
            expect += 1
            yield sample
    except ShardError as err:
        if src.on_error != "skip":
            raise
        missing = hi - base - expect
        events.append({"skipped_samples": missing, "bad_shard": 1,
                       "message": f"{err} ({missing} samples skipped)"})
        for _ in range(missing):
            yield None


def stack_samples(samples: list, pad_id: int, sample_tokens: int, dtype: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Stack samples (None = masked slot, filled with pad_id) into (tokens_BT, mask_B).

    Workers send these small numpy arrays (pickled, in the token dtype); turning them
    into int64 tensors in the main process is cheaper than moving three tensors
    through shared memory per batch.
    """
    mask_B = np.array([s is not None for s in samples])
    if mask_B.all():
        return np.stack(samples), mask_B
    tokens_BT = np.full((len(samples), sample_tokens), pad_id, dtype=dtype)
    for i, s in enumerate(samples):
        if s is not None:
            tokens_BT[i] = s
    return tokens_BT, mask_B


def make_batch(tokens_BT: np.ndarray, mask_B: np.ndarray, pad_id: int) -> dict:
    """input_ids/labels LongTensor [B, S] (labels = tokens shifted by one; pad tokens and
    masked slots -> -100) and sample_mask BoolTensor [B]."""
    tokens_BT = torch.from_numpy(tokens_BT.astype(np.int64))
    input_ids_BS = tokens_BT[:, :-1].contiguous()
    labels_BS = tokens_BT[:, 1:].clone()
    labels_BS[labels_BS == pad_id] = IGNORE_INDEX
    mask_B = torch.from_numpy(mask_B)
    labels_BS[~mask_B] = IGNORE_INDEX
    return {"input_ids": input_ids_BS, "labels": labels_BS, "sample_mask": mask_B}


def iter_worker(src: SourceInfo, spec: WorkerSpec) -> Iterator[tuple]:
    """Yield ("batch", rank_batch_index, (tokens_BT, mask_B), events) for the worker's
    remaining batches.

    The worker's slots (ranges, then pads) are cut into blocks of `block` samples; each
    block is permuted by block_order(seed_key + [block index]) and cut into consecutive
    batches. Rank batch index = local index * num_workers + worker.
    """
    B, C = spec.batch_size, spec.block
    real = ranges_len(spec.ranges)
    total = real + spec.num_pad
    start = spec.start_batch * B
    block_start = start // C * C
    events: list = []
    samples = iter_samples(src, take(spec.ranges, block_start, real), events)
    local = spec.start_batch
    for pos in range(block_start, total, C):
        size = min(C, total - pos)
        block = [next(samples) if pos + i < real else None for i in range(size)]
        if spec.seed_key is not None:
            block = [block[i] for i in block_order(spec.seed_key + [pos // C], size)]
        first = max(start - pos, 0)
        for a in range(first, size, B):
            raw = stack_samples(block[a:a + B], src.pad_id, src.sample_tokens, src.dtype)
            yield "batch", local * spec.num_workers + spec.worker, raw, events[:]
            events.clear()
            local += 1


class BlockDataset(IterableDataset):
    """IterableDataset over the worker specs of one rank; DataLoader worker w runs spec w."""

    def __init__(self, src: SourceInfo, specs: list):
        self.src, self.specs = src, specs

    def __iter__(self):
        info = get_worker_info()
        specs = self.specs if info is None else [self.specs[info.id]]
        try:
            for spec in specs:
                yield from iter_worker(self.src, spec)
        except DataError as err:
            yield "error", -1, err, []
