"""Pure sample-order arithmetic of the streaming loader (no I/O, no torch.distributed).

Legend: N = samples in the split, W = data-parallel world size, K = workers per rank
(K = 1 when num_workers = 0), B = micro batch size, S = steps (batches per rank) in the
current layout, C = shuffle block (samples, a multiple of B).

A sample is named by its global id: shard i's samples are ids offsets[i] .. offsets[i+1]-1
in manifest order. An ordered set of samples ("ranges") is a list of pieces, each either
    [lo, hi)                 ids lo .. hi-1 in order, inside one shard, or
    {"block": ranges, "key": k, "start": a, "stop": b}
                             a block slice: positions [a, b) of the samples of `block`
                             permuted by block_order(k, len(block)) (made by a re-split);
"position" p means the p-th sample of that list.

The order of epoch e is a pure function of (seed, e, manifest, carry_in):
    Q_e = carry_in + [shards in a seeded permutation of (seed, e), minus carry_in]
A layout (W, K, B, C) cuts Q_e into S = len(Q_e) // (W*B) batches per rank:
    rank r owns positions [r*S*B, (r+1)*S*B)    (contiguous: few shards per rank)
    rank batch b is made by worker b % K as its local batch b // K; worker w owns a
    contiguous piece of the rank's positions, of n_w = #{b < S : b % K == w} batches.
    Each worker shuffles its piece in blocks of C samples: block j (its positions
    [j*C, (j+1)*C)) is permuted by block_order([seed, e, g, r, w, j]), where g counts
    the re-splits of this epoch so far.
    The tail positions [W*S*B, len(Q_e)) are carried into epoch e+1 or dropped.
So the state "epoch e, step k" fixes exactly which samples were consumed, on every rank.

Re-split (resume on another layout): the unconsumed samples are, per old worker, the
unserved slice of its partly consumed block (a block slice: the permutation depends on
the key only, so whoever reads it recomputes which samples were served) and its unread
blocks, then the old tail. That list is the new Q of the epoch, and g += 1.
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass

import numpy as np

Ranges = list  # list of pieces: [lo, hi) pairs of global sample ids or block slices (dicts)


@dataclass(frozen=True)
class Layout:
    """How one epoch's sample list is cut: world size, workers, batch and block sizes."""

    world_size: int
    num_workers: int
    batch_size: int
    block: int

    def to_dict(self) -> dict:
        return asdict(self)


def is_slice(piece) -> bool:
    return isinstance(piece, dict)


def piece_len(piece) -> int:
    return piece["stop"] - piece["start"] if is_slice(piece) else piece[1] - piece[0]


def ranges_len(ranges: Ranges) -> int:
    return sum(piece_len(p) for p in ranges)


def _cut(piece, a: int, b: int):
    """Positions [a, b) of one piece, as a piece of the same kind."""
    if is_slice(piece):
        return dict(piece, start=piece["start"] + a, stop=piece["start"] + b)
    return [piece[0] + a, piece[0] + b]


def take(ranges: Ranges, start: int, stop: int) -> Ranges:
    """Sub-list of positions [start, stop) of `ranges`, as ranges."""
    out, pos = [], 0
    for piece in ranges:
        n = piece_len(piece)
        a, b = max(start - pos, 0), min(stop - pos, n)
        if a < b:
            out.append(_cut(piece, a, b))
        pos += n
        if pos >= stop:
            break
    return out


def copy_ranges(ranges: Ranges) -> Ranges:
    """A deep copy of plain lists, dicts and ints (for state dicts)."""
    return [{"block": copy_ranges(p["block"]), "key": [int(k) for k in p["key"]],
             "start": int(p["start"]), "stop": int(p["stop"])} if is_slice(p)
            else [int(p[0]), int(p[1])] for p in ranges]


def block_order(key: list, size: int) -> np.ndarray:
    """The permutation of a shuffle block of `size` samples with seed key `key`: a pure
    function of the key, so a block's order can be recomputed after a re-split."""
    return np.random.default_rng(key).permutation(size)


def sample_ids(ranges: Ranges) -> list[int]:
    """The global ids of `ranges`, in order."""
    out = []
    for piece in ranges:
        if is_slice(piece):
            block = sample_ids(piece["block"])
            order = block_order(piece["key"], len(block))[piece["start"]:piece["stop"]]
            out.extend(block[i] for i in order)
        else:
            out.extend(range(piece[0], piece[1]))
    return out


def _merged(ids: list[int]) -> Ranges:
    """Sorted, disjoint [lo, hi) ranges covering `ids`."""
    out: Ranges = []
    for i in sorted(ids):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        elif not out or out[-1][1] < i:
            out.append([i, i + 1])
    return out


def shard_offsets(counts: list[int]) -> list[int]:
    """offsets[i] = first global id of shard i; offsets[-1] = N."""
    return [0] + np.cumsum(counts, dtype=np.int64).tolist()


def subtract(ranges: Ranges, holes: Ranges) -> Ranges:
    """Plain `ranges` without the ids in `holes` (any pieces), order kept.

    Holes from a block slice are scattered ids, so they are merged and bisected rather
    than tested against every range."""
    cuts = _merged(sample_ids(holes))
    starts = [lo for lo, _ in cuts]
    out = []
    for lo, hi in ranges:
        i = max(bisect.bisect_right(starts, lo) - 1, 0)
        while lo < hi and i < len(cuts) and cuts[i][0] < hi:
            h_lo, h_hi = cuts[i]
            if h_hi > lo:
                if h_lo > lo:
                    out.append([lo, h_lo])
                lo = h_hi
            i += 1
        if lo < hi:
            out.append([lo, hi])
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
    return copy_ranges(carry_in) + subtract(shards, carry_in)


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


def remaining_after(ranges: Ranges, layout: Layout, step: int, key_prefix: list) -> Ranges:
    """Samples not yet consumed after `step` batches per rank, for re-splitting them
    over a different layout (world size, workers, batch or block size).

    A worker's partly consumed shuffle block becomes a block slice of its unserved
    positions (none when C == B: whole blocks are consumed).

    Args:
        key_prefix: [seed, epoch, re-splits so far], the start of every block key.

    Returns:
        the remaining ranges in rank, worker, position order, then the tail.
    """
    B, K, C = layout.batch_size, layout.num_workers, layout.block
    out: Ranges = []
    for rank in range(layout.world_size):
        for worker in range(K):
            mine = train_worker_ranges(ranges, layout, rank, worker)
            size = ranges_len(mine)
            used = worker_batches(step, K, worker) * B
            block_start = used // C * C
            if used > block_start:
                block_stop = min(block_start + C, size)
                out.append({"block": take(mine, block_start, block_stop),
                            "key": [*key_prefix, rank, worker, block_start // C],
                            "start": used - block_start, "stop": block_stop - block_start})
                used = block_stop
            out.extend(take(mine, used, size))
    return out + tail_ranges(ranges, layout)
