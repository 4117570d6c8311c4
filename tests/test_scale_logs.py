"""Logs that do not grow with the world size: ``moe-train check`` and the training
start-up block (``Topology.describe``) give the process groups by their pattern above 16
ranks, and one line per rank only up to 16 ranks or with ``--verbose``. At 4096 ranks the
per-rank form was 4,245 lines and 12.5 MB."""

import re
from pathlib import Path

import pytest

from moe_train.cli import main
from moe_train.parallel.topology import Topology

REPO = Path(__file__).resolve().parents[1]
RANK_LINE = re.compile(r"^rank (\d+): experts (\d+)\.\.(\d+), all-to-all with (\[[^\]]*\]), "
                       r"expert grads reduced over (\[[^\]]*\])$")


def _check(capsys, world: int, *extra: str) -> list[str]:
    rc = main(["check", "--config", str(REPO / "configs" / "moe_64e.yaml"), "--world-size", str(world), *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out.splitlines()


def _expand(text: str) -> list[int]:
    """'[0, 1, 2]' -> [0, 1, 2]; '[a, b, ..., z]' -> every rank from a to z in steps of b - a."""
    items = [t.strip() for t in text.strip()[1:-1].split(",")]
    if "..." in items:
        assert len(items) == 4 and items[2] == "...", text
        a, b, z = int(items[0]), int(items[1]), int(items[3])
        return list(range(a, z + 1, b - a))
    return [int(t) for t in items]


def _group_list(text: str) -> tuple[list[list[int]], bool]:
    """'[..], [..], ..., [..]' -> the listed groups, and whether some were elided."""
    tokens = re.findall(r"\[[^\]]*\]|\.\.\.(?=,|$)", text)
    return [_expand(t) for t in tokens if t != "..."], "..." in tokens


def _pattern(lines: list[str], prefix: str) -> re.Match:
    (line,) = [line for line in lines if line.startswith(prefix)]
    return re.match(prefix + r" \((?:token all-to-all|expert grads)\): (\d+) \w+ of (\d+) [a-z ]+?"
                    r"(?: at stride (\d+))?: (.*)$", line)


def test_check_output_does_not_grow_with_the_world_size(capsys):
    """moe_64e at 4096 ranks: at most 300 lines (it was 4,245), the same number as at 64
    ranks, no line longer than 1000 characters, and one per-rank line (rank 0's)."""
    small, large = _check(capsys, 64), _check(capsys, 4096)
    assert len(large) <= 300, len(large)
    assert len(large) == len(small)
    assert max(len(line) for line in large) < 1000
    assert [line for line in large if RANK_LINE.match(line)] == [
        "rank 0: experts 0..7, all-to-all with [0, 1, 2, 3, 4, 5, 6, 7], expert grads reduced over [0, 8, ..., 4088]"]
    assert any("--verbose" in line for line in large)


@pytest.mark.parametrize("world, ep, experts", [(4096, 8, 64), (64, 64, 64), (4096, 1, 8), (48, 4, 8), (32, 2, 4),
                                                (16, 4, 8)])
def test_pattern_lines_name_the_right_groups(world, ep, experts):
    """The EP and EDP lines give the number of groups, their size, the first two and the
    last group; expanded, they equal Topology.ep_groups() / edp_groups(). Rank 0's line
    and the expert ownership line agree with the topology too."""
    topo = Topology(world, ep, experts)
    lines = topo.describe()
    for prefix, want, size in (("EP groups", topo.ep_groups(), ep), ("EDP groups", topo.edp_groups(), world // ep)):
        m = _pattern(lines, prefix)
        assert m, (prefix, lines)
        assert (int(m.group(1)), int(m.group(2))) == (len(want), size)
        if prefix == "EDP groups":
            assert int(m.group(3)) == ep
        shown, elided = _group_list(m.group(4))
        assert shown == (want[:2] + want[-1:] if elided else want)
        assert elided == (len(want) > 3)
    (dense,) = [line for line in lines if line.startswith("dense grads")]
    assert _expand(dense[dense.index("["):]) == list(range(world))
    rank0 = RANK_LINE.match(next(line for line in lines if line.startswith("rank 0:")))
    assert (_expand(rank0.group(4)), _expand(rank0.group(5))) == (topo.ep_group_of(0), topo.edp_group_of(0))
    (owners,) = [line for line in lines if line.startswith("experts:")]
    last = topo.local_experts(ep - 1)
    assert f"rank 0 owns 0..{topo.num_local_experts - 1}" in owners
    assert ep == 1 or f"rank {ep - 1} owns {last.start}..{last.stop - 1}" in owners
    per_rank = [line for line in lines if RANK_LINE.match(line)]
    assert len(per_rank) == (world if world <= 16 else 1)


@pytest.mark.parametrize("world, extra", [(64, ["--verbose"]), (16, [])])
def test_per_rank_lines_up_to_16_ranks_or_with_verbose(capsys, world, extra):
    """One line per rank, in order, each naming that rank's experts and its EP and EDP
    groups exactly as the topology has them."""
    topo = Topology(world, 8, 64)
    matches = [m for m in map(RANK_LINE.match, _check(capsys, world, *extra)) if m]
    assert [int(m.group(1)) for m in matches] == list(range(world))
    for rank, m in enumerate(matches):
        experts = topo.local_experts(rank)
        assert (int(m.group(2)), int(m.group(3)) + 1) == (experts.start, experts.stop)
        assert _expand(m.group(4)) == topo.ep_group_of(rank)
        assert _expand(m.group(5)) == topo.edp_group_of(rank)


def test_start_up_block_is_compact_by_default():
    """``loop.startup_report`` calls ``describe()``: a few lines at any world size."""
    assert len(Topology(4096, 8, 64).describe()) == len(Topology(64, 8, 64).describe()) < 10
    assert len(Topology(4096, 8, 64).describe(verbose=True)) > 4096
