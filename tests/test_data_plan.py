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


def test_remaining_after_resplit_covers_rest_once():
    counts = [13, 7, 20, 3, 11, 9, 16]
    q = plan.epoch_ranges(counts, 0, 0, True, [])
    old = plan.Layout(2, 2, 2, 2)       # block == batch: no shuffle, nothing skipped
    rest, skipped = plan.remaining_after(q, old, step=5)
    consumed = []
    for r in range(2):
        for w in range(2):
            mine = plan.train_worker_ranges(q, old, r, w)
            consumed += positions(plan.take(mine, 0, plan.worker_batches(5, 2, w) * 2))
    assert skipped == 0
    assert sorted(consumed + positions(rest)) == list(range(sum(counts)))
