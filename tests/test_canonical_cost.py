"""What the canonical save costs (issue 18, item 8): collectives per bucket, not per
parameter, and no rank holding the whole dense state.

On 2 real gloo ranks, after one ZeRO step, ``canonical.save`` runs with every
``torch.distributed`` collective counted (DeepSpeed's accessors and DCP call them through
that module) and with what each rank hands to DCP recorded:
  - no all-reduce, and the collectives are bounded by the number of buckets plus a
    constant, far below one a parameter (gathering through ``safe_get_full_*`` issued
    three all-reduces a parameter); most of the state never moves;
  - with small buckets (a tensor split across them) every all-to-all moves at most a
    bucket, one all-to-all a bucket of what moves;
  - every tensor is written by exactly one rank: each rank holds about its share of the
    dense state, never all of it;
  - what was written equals, bitwise, the state DeepSpeed's own accessors assemble (the
    slow reference), experts by global id;
  - ``benchmarks/checkpoint.py`` reports the saves' peak RSS and collectives.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from dist_utils import run_ranks
from engine_harness import make_cfg
import moe_train.checkpoint as ckpt
import moe_train.checkpoint.canonical as canonical
from moe_train.config import config_from_dict, config_to_dict

COLLECTIVES = ("all_reduce", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "gather",
               "gather_object", "broadcast", "broadcast_object_list", "scatter", "scatter_object_list",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier", "send",
               "recv", "isend", "irecv", "batch_isend_irecv")
FIXED = 12  # collectives of a save besides the buckets: fragment map, manifest, agreements, DCP's own
SMALL_BUCKET = 8 * 2 ** 10  # bytes: the embedding alone spans two buckets


class Counted:
    """Counts every collective called through ``torch.distributed``, records the elements
    each ``all_to_all_single`` sends and receives, and the bytes of the tensors each
    ``dcp.save`` is given, while active."""

    def __init__(self):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        self.calls: dict[str, int] = {}
        self.all_to_all: list[tuple[int, int]] = []  # (elements sent, received)
        self.handed: list[dict[str, int]] = []
        self._saved = {name: getattr(dist, name) for name in COLLECTIVES}
        self._dcp_save = dcp.save

    def __enter__(self):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.tensor import DTensor

        def counting(name, fn):
            def wrapper(*args, **kwargs):
                self.calls[name] = self.calls.get(name, 0) + 1
                if name == "all_to_all_single":
                    self.all_to_all.append((args[1].numel(), args[0].numel()))
                return fn(*args, **kwargs)
            return wrapper

        def recording(state_dict, *args, **kwargs):
            local = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state_dict.items()}
            self.handed.append({k: v.numel() * v.element_size() for k, v in local.items()})
            return self._dcp_save(state_dict, *args, **kwargs)

        for name, fn in self._saved.items():
            setattr(dist, name, counting(name, fn))
        dcp.save = recording
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        dcp.save = self._dcp_save


def _reference(model, optimizer) -> dict:
    """The canonical tensors as DeepSpeed's accessors assemble them (an all-reduce each:
    the slow path the save used to take), this rank's expert rows."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in model.named_parameters():
        out[f"master/{name}"] = safe_get_full_fp32_param(p).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).clone()
    return out


def _flat_numel(model, expert: bool) -> int:
    from moe_train.parallel.grads import is_expert_param

    return 3 * sum(p.numel() for p in model.parameters() if p.requires_grad and is_expert_param(p) == expert)


def _save_worker(rank, world, raw_cfg, root):
    """One engine step, then canonical saves counted: default buckets, then small ones."""
    from moe_train.model.build import build_model
    from moe_train.moe.losses import total_loss
    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.topology import Topology
    from moe_train.train.engine import build_engine

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = config_from_dict(raw_cfg)
    topo = Topology(world, cfg.parallel.expert_parallel_size, cfg.moe.num_experts)
    groups = build_groups(topo, rank)
    engine = build_engine(cfg, build_model(cfg, groups, torch.device("cpu")), groups)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch_size, cfg.data.seq_len + 1),
                           generator=torch.Generator().manual_seed(rank))
    engine.ds.set_gradient_accumulation_boundary(True)
    out = engine.ds(tokens[:, :-1], tokens[:, 1:])
    engine.ds.backward(total_loss(out.lm_loss, out.moe_losses, cfg.moe, out.moe_seq_losses))
    engine.ds.step()
    kwargs = dict(model=engine.module, optimizer=engine.optimizer, groups=groups, config=raw_cfg,
                  state=ckpt.TrainState(step=1, loader_states=[{}] * world))
    result = {"first_expert": topo.local_experts(rank).start,
              "parameters": len(list(engine.module.parameters())),
              "largest_numel": max(p.numel() for p in engine.module.parameters()),
              "dense_numel": _flat_numel(engine.module, False), "expert_numel": _flat_numel(engine.module, True)}
    with Counted() as default:
        canonical.save(os.path.join(root, "default"), **kwargs)
    with Counted() as small:
        canonical.save(os.path.join(root, "small"), bucket_bytes=SMALL_BUCKET, **kwargs)
    result.update(default=default.calls, small=small.calls, handed=default.handed[0],
                  moved={"default": default.all_to_all, "small": small.all_to_all},
                  reference=_reference(engine.module, engine.optimizer))
    return result


def _buckets(numel: int, bucket_bytes: int) -> int:
    return math.ceil(numel / (bucket_bytes // 4))


LAYOUTS = [(2, 1, 2), (2, 2, 1)]  # world, ep, ZeRO stage: experts partitioned over 2 ranks, then over 1


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda l: f"world{l[0]}_ep{l[1]}_zero{l[2]}")
def saved(request, tmp_path_factory):
    world, ep, zero = request.param
    tmp = tmp_path_factory.mktemp(f"cost_{world}_{ep}_{zero}")
    cfg = make_cfg(tmp, model={"num_layers": 4, "moe_every": 2}, optim={"grad_clip": 0.0},
                   parallel={"expert_parallel_size": ep, "zero_stage": zero})
    results = run_ranks(_save_worker, world, timeout_s=400, raw_cfg=config_to_dict(cfg), root=str(tmp))
    return {"layout": request.param, "root": tmp, "ranks": results}


def _total(calls: dict) -> int:
    return sum(calls.values())


def test_collectives_are_bounded_by_buckets_not_parameters(saved):
    """At most one collective a bucket of the ZeRO state (plus a few fixed ones), none
    per parameter; most of the state never moves (each tensor is written by the rank
    whose partition holds most of it)."""
    world, ep, _ = saved["layout"]
    r0 = saved["ranks"][0]
    for rank, r in enumerate(saved["ranks"]):
        assert r["default"].get("all_reduce", 0) == 0, (rank, r["default"])  # no per-tensor gathering
        assert _total(r["default"]) < r["parameters"], (rank, r["default"])
    flat = r0["dense_numel"] + (r0["expert_numel"] if world // ep > 1 else 0)
    buckets = _buckets(r0["dense_numel"], canonical.BUCKET_BYTES) + (
        _buckets(r0["expert_numel"], canonical.BUCKET_BYTES) if world // ep > 1 else 0)
    assert 3 * r0["parameters"] > buckets + FIXED  # the bound below means something
    for rank, r in enumerate(saved["ranks"]):
        assert _total(r["default"]) <= buckets + FIXED, (rank, r["default"])
        assert 1 <= r["default"].get("all_to_all_single", 0) <= buckets, (rank, r["default"])
    moved = sum(got for r in saved["ranks"] for _, got in r["moved"]["default"])
    assert 0 < moved < flat / 4, (moved, flat)


def test_small_buckets_bound_what_one_collective_moves(saved):
    """With 8 KiB buckets (a tensor larger than one): every all-to-all sends and receives
    at most a bucket on every rank, the same elements move in all, in one all-to-all per
    bucket of them."""
    ranks, numel = saved["ranks"], SMALL_BUCKET // 4
    assert 4 * ranks[0]["largest_numel"] > SMALL_BUCKET
    moved = {which: sum(got for r in ranks for _, got in r["moved"][which]) for which in ("default", "small")}
    assert moved["small"] == moved["default"] > numel
    for rank, r in enumerate(ranks):
        assert all(sent <= numel and got <= numel for sent, got in r["moved"]["small"]), (rank, r["moved"])
        assert r["small"].get("all_to_all_single", 0) == math.ceil(moved["small"] / numel), (rank, r["small"])
        assert _total(r["small"]) - r["small"]["all_to_all_single"] == \
            _total(r["default"]) - r["default"]["all_to_all_single"]


def test_each_tensor_is_written_once_and_no_rank_holds_the_whole_dense_state(saved):
    ranks = saved["ranks"]
    handed = [r["handed"] for r in ranks]
    state = canonical.read_all(saved["root"] / "default" / canonical.DIRNAME)
    dense = {k: v.numel() * v.element_size() for k, v in state.items() if ".experts." not in k}
    for key, nbytes in dense.items():  # each dense tensor on exactly one rank
        assert [h.get(key) for h in handed].count(nbytes) == 1, (key, [h.get(key) for h in handed])
    largest, total = max(dense.values()), sum(dense.values())
    for rank, h in enumerate(handed):
        mine = sum(v for k, v in h.items() if k in dense)
        assert mine <= total / len(ranks) + largest, (rank, mine, total)


@pytest.mark.parametrize("which", ["default", "small"])
def test_written_state_equals_deepspeeds_accessors_bitwise(saved, which):
    path = saved["root"] / which / canonical.DIRNAME
    assert canonical.verify(path) == []
    state = canonical.read_all(path)
    for r in saved["ranks"]:
        for key, want in r["reference"].items():
            got = state[key]
            if ".experts." in key:
                got = got[r["first_expert"]:r["first_expert"] + want.shape[0]]
            assert got.dtype == want.dtype and torch.equal(got, want), key


def test_the_checkpoint_benchmark_reports_the_canonical_saves_cost(tmp_path):
    """``python -m benchmarks.checkpoint`` at its smallest: its --json carries each save's
    per-rank peak RSS and collectives, and the canonical save's collectives are fewer than
    its tensors (behaviour only: no assertion reads a time or a byte count of RSS)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "checkpoint.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.checkpoint", "--configs", "tiny", "--repeats", "1",
                           "--json", str(out)], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "what a save costs per rank" in proc.stdout
    tiny = json.loads(out.read_text())["configs"]["tiny"]
    for kind in ("engine", "canonical"):
        assert len(tiny[kind]["save_peak_rss_bytes"]) == 2 and tiny[kind]["save_collectives"], kind
    assert tiny["dense_state_bytes"] > 0 and tiny["state_tensors"] > 0
    assert _total(tiny["canonical"]["save_collectives"]) < tiny["state_tensors"]
