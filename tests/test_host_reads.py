"""Host reads of one MoE layer's forward + backward (each one a device->host sync on a
GPU, which stops the CPU from queuing kernels), counted with ``benchmarks.host_reads``:

* capacity routing (a capacity factor set): 0 at ep 1, 2 and 4: the layout is fixed
  [E, C, D] slots (or, at ep 1 with ``_grouped_mm``, the kept rows packed first with
  device offsets), so every size is known to the host from T and the config;
* dropless: 0 at ep 1 (``_grouped_mm`` takes device offsets) and 1 at ep > 1 (the
  [ep, local experts] count matrices, read once for the all-to-all splits and the
  kernel sizes);
for top-1 with capacity, top-2 dropless, and top-8 of 64 experts with a shared expert,
sigmoid scores, a selection bias and groups (with and without a capacity):
``benchmarks.host_reads.CASES``. At ep > 1 the first call with a new token count checks
once that the EP group agrees on it (capacity mode), so the counted call is the second
one, the steady state of training. Before this layout the same cases read 3 / 2 times
at ep 1 (capacity / dropless) and 6 / 5 times at ep 2 and 4.
"""

from collections import Counter

import pytest
import torch.distributed as dist

from benchmarks.host_reads import CASES, layer_reads
from dist_utils import run_ranks
from moe_train.moe import MoEConfig
from moe_train.parallel.groups import build_groups
from moe_train.parallel.topology import Topology


def expected(overrides: dict, ep: int) -> list[str]:
    return ["tolist"] if overrides["capacity_factor"] is None and ep > 1 else []


def config(overrides: dict, **extra) -> MoEConfig:
    return MoEConfig(d_ff=32, min_capacity=0, **overrides, **extra)


@pytest.mark.parametrize("name", CASES)
def test_host_reads_at_ep_1(name):
    reads = layer_reads(config(CASES[name]))
    assert reads == expected(CASES[name], 1), (name, Counter(reads))


def test_dropless_with_bmm_reads_the_counts_once():
    """bmm pads to the busiest expert, whose count the host must know: one read."""
    assert layer_reads(config(CASES["top-2, dropless"], expert_impl="bmm")) == ["tolist"]


def ep_worker(rank, world):
    out = {}
    for ep in (2, 4):
        groups = build_groups(Topology(world, ep, 64), rank)
        for name, overrides in CASES.items():
            out[ep, name] = layer_reads(config(overrides), ep_group=groups.ep, seed=rank)
    dist.barrier()
    return out


def test_host_reads_at_ep_2_and_4():
    ranks = run_ranks(ep_worker, 4, timeout_s=240)
    for rank, got in enumerate(ranks):
        for (ep, name), reads in got.items():
            assert reads == expected(CASES[name], ep), (rank, ep, name, Counter(reads))
