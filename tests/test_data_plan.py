"""Pure order arithmetic (plan.py): every position read once, equal steps, re-split."""
import pytest

from moe_train.data import plan


def positions(ranges):
    return [i for lo, hi in ranges for i in range(lo, hi)]


@pytest.mark.parametrize("counts", [[13, 7, 20, 3, 11, 9, 16], [1] * 9, [50], [0, 5, 0, 30]])
@pytest.mark.parametrize("world, workers, batch", [(1, 1, 1), (2, 2, 3), (3, 4, 2), (4, 1, 5)])
def test_train_split_partitions_epoch(counts, world, workers, batch):
    layout = plan.Layout(world, workers, batch, batch * 2)
    q = plan.epoch_ranges(counts, seed=5, epoch=2, shuffle_shards=True, carry_in=[])
    steps = plan.train_steps(plan.ranges_len(q), layout)
    read = []
    for r in range(world):
        mine = [plan.train_worker_ranges(q, layout, r, w) for w in range(workers)]
        assert sum(plan.ranges_len(m) for m in mine) == steps * batch   # equal per rank
        read += [i for m in mine for i in positions(m)]
    tail = positions(plan.tail_ranges(q, layout))
    assert sorted(read + tail) == list(range(sum(counts)))
    assert len(tail) < world * batch


def test_carry_in_is_not_repeated_in_the_epoch():
    counts = [13, 7, 20, 3]
    carry = [[15, 18], [40, 43]]
    q = plan.epoch_ranges(counts, 1, 1, True, carry)
    assert q[:2] == carry
    assert sorted(positions(q)) == list(range(43))


def served_order(q, layout, rank, worker, key_prefix):
    """Ids in the order a worker serves them: its piece cut into blocks of C, each in
    block_order (what reader.iter_worker does, without the I/O)."""
    ids, C = plan.sample_ids(plan.train_worker_ranges(q, layout, rank, worker)), layout.block
    out = []
    for pos in range(0, len(ids), C):
        block = ids[pos:pos + C]
        key = key_prefix + [rank, worker, pos // C]
        out += [block[i] for i in plan.block_order(key, len(block))]
    return out


def serve(q, layout, steps, key_prefix):
    """The ids every worker of every rank serves in its first `steps` rank batches."""
    K, B = layout.num_workers, layout.batch_size
    out = []
    for r in range(layout.world_size):
        for w in range(K):
            out += served_order(q, layout, r, w, key_prefix)[:plan.worker_batches(steps, K, w) * B]
    return out


def slice_depth(ranges):
    return max([1 + slice_depth(p["block"]) for p in ranges if plan.is_slice(p)], default=0)


def test_remaining_after_without_sample_shuffle_is_plain_ranges():
    counts = [13, 7, 20, 3, 11, 9, 16]
    q = plan.epoch_ranges(counts, 0, 0, True, [])
    old = plan.Layout(2, 2, 2, 2)       # block == batch: only whole blocks are consumed
    rest = plan.remaining_after(q, old, 5, [0, 0, 0])
    assert not any(plan.is_slice(p) for p in rest)
    consumed = serve(q, old, 5, [0, 0, 0])
    assert sorted(consumed + positions(rest)) == list(range(sum(counts)))


@pytest.mark.parametrize("seed", range(4))
def test_resplits_serve_every_sample_once(seed):
    """4 -> 2 -> 3 ranks (workers, batch and block sizes changing too), each re-split
    in the middle of shuffle blocks: the served ids plus the final tail are the epoch,
    each id once."""
    counts = [13, 7, 20, 3, 11, 9, 16, 40, 25, 31]
    q = plan.epoch_ranges(counts, seed, 3, True, [])
    stages = [(plan.Layout(4, 2, 2, 8), 3), (plan.Layout(2, 1, 3, 9), 5)]
    served = []
    for generation, (layout, step) in enumerate(stages):
        served += serve(q, layout, step, [seed, 3, generation])
        q = plan.remaining_after(q, layout, step, [seed, 3, generation])
    assert slice_depth(q) == 2          # a slice of a block holding a slice: both re-splits
    last = plan.Layout(3, 2, 2, 6)
    served += serve(q, last, plan.train_steps(plan.ranges_len(q), last), [seed, 3, 2])
    tail = plan.sample_ids(plan.tail_ranges(q, last))
    assert sorted(served + tail) == list(range(sum(counts)))


def test_carry_in_with_block_slices_is_not_repeated():
    counts = [13, 7, 20, 3]
    carry = [{"block": [[20, 30], [0, 4]], "key": [1, 0, 0, 0, 0, 0], "start": 5,
              "stop": 12}, [40, 42]]
    q = plan.epoch_ranges(counts, 1, 1, True, carry)
    ids = plan.sample_ids(q)
    assert ids[:9] == plan.sample_ids(carry)                # the carried samples open it
    assert sorted(ids) == list(range(43))
    assert all(not plan.is_slice(p) for p in q[2:])      # the shards stay plain ranges
