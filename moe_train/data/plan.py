"""Pure sample-order arithmetic of the streaming loader (no I/O, no torch.distributed).

Legend: N = samples in the split, W = data-parallel world size, K = workers per rank
(K = 1 when num_workers = 0), B = micro batch size, S = steps (batches per rank) in the
current layout, C = shuffle block (samples, a multiple of B).

A sample is named by its global id: shard i's samples are ids offsets[i] .. offsets[i+1]-1
in manifest order. An ordered set of samples is a list of id ranges [[lo, hi), ...], each
inside one shard; "position" p means the p-th sample of that list.

The order of epoch e is a pure function of (seed, e, manifest, carry_in):
    Q_e = carry_in + [shards in a seeded permutation of (seed, e), minus carry_in]
A layout (W, K, B, C) cuts Q_e into S = len(Q_e) // (W*B) batches per rank:
    rank r owns positions [r*S*B, (r+1)*S*B)    (contiguous: few shards per rank)
    rank batch b is made by worker b % K as its local batch b // K; worker w owns a
    contiguous piece of the rank's positions, of n_w = #{b < S : b % K == w} batches.
    Each worker shuffles its piece in blocks of C samples with a seeded permutation.
    The tail positions [W*S*B, len(Q_e)) are carried into epoch e+1 or dropped.
So the state "epoch e, step k" fixes exactly which samples were consumed, on every rank.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

Ranges = list  # list of [lo, hi) pairs of global sample ids


@dataclass(frozen=True)
class Layout:
    """How one epoch's sample list is cut: world size, workers, batch and block sizes."""

    world_size: int
    num_workers: int
    batch_size: int
    block: int

    def to_dict(self) -> dict:
        return asdict(self)


def ranges_len(ranges: Ranges) -> int:
    return sum(hi - lo for lo, hi in ranges)


def take(ranges: Ranges, start: int, stop: int) -> Ranges:
    """Sub-list of positions [start, stop) of `ranges`, as ranges."""
    out, pos = [], 0
    for lo, hi in ranges:
        n = hi - lo
        a, b = max(start - pos, 0), min(stop - pos, n)
        if a < b:
            out.append([lo + a, lo + b])
        pos += n
        if pos >= stop:
            break
    return out


def shard_offsets(counts: list[int]) -> list[int]:
    """offsets[i] = first global id of shard i; offsets[-1] = N."""
    return [0] + np.cumsum(counts, dtype=np.int64).tolist()


def subtract(ranges: Ranges, holes: Ranges) -> Ranges:
    """`ranges` without the ids in `holes` (order kept)."""
    out = []
    for lo, hi in ranges:
        pieces = [[lo, hi]]
        for h_lo, h_hi in holes:
            pieces = [p for a, b in pieces for p in ([a, min(b, h_lo)], [max(a, h_hi), b])
                      if p[0] < p[1]]
        out.extend(pieces)
    return out


def epoch_ranges(counts: list[int], seed: int, epoch: int, shuffle_shards: bool,
                 carry_in: Ranges) -> Ranges:
    """Q_e: the carried-in samples, then every shard (without those samples) in a seeded
    per-epoch order; so each epoch holds every sample exactly once."""
    offsets = shard_offsets(counts)
    order = range(len(counts))
    if shuffle_shards:
        order = np.random.default_rng([seed, epoch]).permutation(len(counts)).tolist()
    shards = [[offsets[i], offsets[i + 1]] for i in order if counts[i] > 0]
    return [list(r) for r in carry_in] + subtract(shards, carry_in)


def worker_batches(steps: int, num_workers: int, worker: int) -> int:
    """#{b < steps : b % num_workers == worker}."""
    return max(0, (steps - worker + num_workers - 1) // num_workers)


def train_steps(total: int, layout: Layout) -> int:
    return total // (layout.world_size * layout.batch_size)


def eval_steps(total: int, layout: Layout) -> int:
    per_rank = -(-total // layout.world_size)
    return -(-per_rank // layout.batch_size)


def _worker_window(steps: int, layout: Layout, worker: int) -> tuple[int, int]:
    B, K = layout.batch_size, layout.num_workers
    before = sum(worker_batches(steps, K, v) for v in range(worker)) * B
    return before, before + worker_batches(steps, K, worker) * B


def train_worker_ranges(ranges: Ranges, layout: Layout, rank: int, worker: int) -> Ranges:
    """The samples worker `worker` of rank `rank` reads, in its reading order."""
    S = train_steps(ranges_len(ranges), layout)
    rank_start = rank * S * layout.batch_size
    lo, hi = _worker_window(S, layout, worker)
    return take(ranges, rank_start + lo, rank_start + hi)


def eval_worker_ranges(ranges: Ranges, layout: Layout, rank: int, worker: int
                       ) -> tuple[Ranges, int]:
    """Evaluation split: rank r gets N//W (+1 for r < N%W) samples in manifest order,
    padded to S*B slots; returns (the worker's real samples, its number of pad slots)."""
    total, W = ranges_len(ranges), layout.world_size
    S = eval_steps(total, layout)
    base, extra = divmod(total, W)
    real = base + (rank < extra)
    start = rank * base + min(rank, extra)
    lo, hi = _worker_window(S, layout, worker)
    real_lo, real_hi = min(lo, real), min(hi, real)
    return take(ranges, start + real_lo, start + real_hi), (hi - lo) - (real_hi - real_lo)


def tail_ranges(ranges: Ranges, layout: Layout) -> Ranges:
    """The samples no rank reads in this layout (fewer than W*B)."""
    total = ranges_len(ranges)
    used = train_steps(total, layout) * layout.world_size * layout.batch_size
    return take(ranges, used, total)


def remaining_after(ranges: Ranges, layout: Layout, step: int) -> tuple[Ranges, int]:
    """Samples not yet consumed after `step` batches per rank, for re-splitting them
    over a different layout (world size, workers, batch or block size).

    A worker's partly consumed shuffle block cannot be described as ranges, so its
    unconsumed rest is skipped (counted; zero when C == B, i.e. no sample shuffle).

    Returns:
        (remaining ranges in rank, worker, position order, then the tail; skipped count)
    """
    B, K, C = layout.batch_size, layout.num_workers, layout.block
    out, skipped = [], 0
    for rank in range(layout.world_size):
        for worker in range(K):
            mine = train_worker_ranges(ranges, layout, rank, worker)
            size = ranges_len(mine)
            used = worker_batches(step, K, worker) * B
            resume = min(size, -(-used // C) * C)
            skipped += resume - used
            out.extend(take(mine, resume, size))
    return out + tail_ranges(ranges, layout), skipped
