"""The engine on real gloo ranks: parity across layouts and ZeRO stages, expert-aware
reduction, non-finite steps, bad configs failing before any process group."""

import math
import re

import pytest
import torch

from dist_utils import run_ranks
from engine_harness import make_cfg, run_train
from moe_train.config import config_to_dict


def _losses(results):
    return [results[0].losses[s] for s in sorted(results[0].losses)]


def _rel(a, b):
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """World 1, grad accumulation 2: the single-process run of the global batch of 8."""
    cfg = make_cfg(tmp_path_factory.mktemp("ref"), train={"grad_accum_steps": 2},
                   checkpoint={"every_steps": 0})
    (result,) = run_train(cfg, 1, keep_state=True)
    return result


@pytest.mark.parametrize("ep, zero", [(2, 0), (2, 1), (2, 2), (1, 2)])
def test_layouts_and_zero_stages_match_single_process(tmp_path, reference, ep, zero):
    """Same seed and global batch: (world 2, ep, ZeRO stage) == (world 1, accumulation 2),
    losses to 1e-4 relative over 10 steps, and the gradient norm at every step (the norm
    DeepSpeed reports at ZeRO 1/2, ours at ZeRO 0) equals the single-process norm."""
    cfg = make_cfg(tmp_path, parallel={"expert_parallel_size": ep, "zero_stage": zero})
    results = run_train(cfg, 2, keep_state=True)
    ref = [reference.losses[s] for s in sorted(reference.losses)]
    assert ref[-1] < ref[0] - 0.3, ref  # it learns: the comparison is not of two flat lines
    for r in results:
        assert _rel([r.losses[s] for s in sorted(r.losses)], ref) < 1e-4
        for step, norm in reference.grad_norms.items():
            assert r.grad_norms[step] == pytest.approx(norm, rel=1e-4), (step, r.grad_norms[step], norm)
    # After training, every rank's view of the model equals the single-process model.
    for rank, r in enumerate(results):
        for name, value in r.state.items():
            want = reference.state[name]
            if ".experts." in name:  # this rank's slice of the stacked experts
                n = value.shape[0]
                want = want[(rank % ep) * n:(rank % ep + 1) * n]
            assert torch.allclose(value, want, rtol=1e-3, atol=1e-5), name


def test_expert_weights_split_by_ep_and_equal_within_edp_group(tmp_path):
    """World 4, ep 2, ZeRO 2: expert-data-parallel groups {0,2} and {1,3}. After training,
    experts are identical within a group and differ across groups; dense weights are
    identical on all four ranks (DeepSpeed reduced each over the right group)."""
    cfg = make_cfg(tmp_path, parallel={"expert_parallel_size": 2, "zero_stage": 2},
                   train={"max_steps": 4}, data={"micro_batch_size": 2})
    results = run_train(cfg, 4, keep_state=True)
    states = [r.state for r in results]
    for name in states[0]:
        if ".experts." in name:
            assert torch.equal(states[0][name], states[2][name]), name
            assert torch.equal(states[1][name], states[3][name]), name
            assert not torch.allclose(states[0][name], states[1][name]), name
        else:
            for s in states[1:]:
                assert torch.equal(states[0][name], s[name]), name


def _counting_groups_worker(rank, world, raw_cfg):
    """One training step with every ``torch.distributed.new_group`` call recorded: who
    made it (the innermost ``moe_train`` or ``deepspeed.utils.groups`` function) and the
    ranks, in order."""
    import traceback

    import torch.distributed as dist

    import engine_harness

    created, real = [], dist.new_group

    def new_group(ranks=None, *args, **kwargs):
        stack = traceback.extract_stack()[:-1]
        maker = next((f.name for f in reversed(stack)
                      if "/moe_train/" in f.filename or f.filename.endswith("deepspeed/utils/groups.py")), "?")
        created.append((maker, sorted(ranks) if ranks is not None else None))
        return real(ranks, *args, **kwargs)

    dist.new_group = new_group
    try:
        engine_harness._worker(rank, world, raw_cfg, "none", True, "", False)
    finally:
        dist.new_group = real
    return created


@pytest.mark.parametrize("world, ep, zero", [(4, 2, 2), (2, 1, 1)])
def test_expert_groups_are_created_once_and_deepspeed_makes_no_copy(tmp_path, world, ep, zero):
    """Every rank creates exactly the topology's groups, once, in build_groups: world/ep EP
    groups and ep EDP groups (ep 1: groups of one rank, which DeepSpeed's registry needs).
    DeepSpeed uses them (the engine checks it holds the same objects) and creates one group
    of its own, its clone of the world as its data-parallel group. Before, DeepSpeed's
    ``_create_expert_and_data_parallel`` made a second copy of every EP and EDP group.
    That the registered groups are the right ones for DeepSpeed's reduction is what the
    ZeRO and EDP-equality tests above prove."""
    from moe_train.parallel.topology import Topology

    cfg = make_cfg(tmp_path, parallel={"expert_parallel_size": ep, "zero_stage": zero}, train={"max_steps": 1})
    topo = Topology(world, ep, cfg.moe.num_experts)
    for rank, created in enumerate(run_ranks(_counting_groups_worker, world, raw_cfg=config_to_dict(cfg))):
        ours = [ranks for maker, ranks in created if maker == "build_groups"]
        assert ours == topo.ep_groups() + topo.edp_groups(), (rank, created)
        assert [c for c in created if c[0] != "build_groups"] == [("_clone_world_group", list(range(world)))], \
            (rank, created)
        assert len(created) == topo.num_groups + 1
        # groups this rank is a member of: its EP group, its EDP group, DeepSpeed's world clone
        assert sum(rank in ranks for _, ranks in created) == 3


def test_nonfinite_loss_skips_the_step_on_every_rank(tmp_path):
    """A NaN loss on rank 1 at step 3: no rank updates (weights after step 3 equal the
    step-2 checkpoint), the step is counted, later steps train normally."""
    cfg = make_cfg(tmp_path, parallel={"expert_parallel_size": 2, "zero_stage": 2},
                   train={"max_steps": 3}, checkpoint={"every_steps": 2})
    results = run_train(cfg, 2, fault="nan_loss@3:1", keep_state=True)
    for r in results:
        assert r.skipped_steps == 1 and math.isnan(r.losses[3]) and math.isfinite(r.losses[2])
    dense = torch.load(tmp_path / "ckpt" / "step_00000002" / "model_dense.pt", weights_only=True)
    for name, value in dense.items():
        if name in results[0].state:
            assert torch.equal(results[0].state[name], value.float()), name


def test_too_many_nonfinite_steps_stop_the_run_naming_the_step(tmp_path):
    cfg = make_cfg(tmp_path, train={"max_steps": 6, "max_skipped_in_a_row": 2},
                   parallel={"zero_stage": 0})
    with pytest.raises(AssertionError, match=r"step 4: 2 non-finite steps in a row"):
        run_train(cfg, 1, fault="nan_loss@3,nan_loss@4")


@pytest.mark.parametrize("overrides, message", [
    (["parallel.expert_parallel_size=3"], r"parallel.expert_parallel_size = 3: must divide the world size \(2\)"),
    (["parallel.expert_parallel_size=2", "moe.num_experts=3"], r"moe.num_experts = 3: must be divisible"),
    (["train.global_batch_size=12"], r"train.global_batch_size = 12: does not add up: data.micro_batch_size 4 "
                                     r"x train.grad_accum_steps 1 x world size 2 = 8"),
    (["deepspeed.zero_optimization.stage=1"], r"deepspeed.zero_optimization.stage = 1: conflicts .* \(2\)"),
    (["deepspeed.optimizer.type=Adam"], r"deepspeed.optimizer: moe_train builds the optimizer"),
    (["parallel.zero_stage=3"], r"parallel.zero_stage = 3: .*ZeRO-3.*use zero_stage 2"),
])
def test_bad_config_fails_before_any_process_group(monkeypatch, capsys, overrides, message):
    """Under a 2-rank launch environment, a bad config is one error line naming the field,
    and no process group is ever started (so no rank waits for the others)."""
    import torch.distributed as dist

    from moe_train.cli import main

    def forbidden(*args, **kwargs):
        raise AssertionError("init_process_group called for a bad config")

    monkeypatch.setattr(dist, "init_process_group", forbidden)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["train", "--config", "configs/tiny_moe.yaml"]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.count("\n") == 1  # one line, no traceback


def test_passthrough_keys_merge_when_they_do_not_conflict():
    from moe_train.config import deepspeed_config, load_config

    cfg = load_config("configs/tiny_moe.yaml", ["deepspeed.zero_optimization.overlap_comm=true",
                                                "deepspeed.zero_optimization.stage=2",
                                                "deepspeed.communication_data_type=fp32"])
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["communication_data_type"] == "fp32" and ds["train_batch_size"] == 8


@pytest.mark.parametrize("zero", [0, 2])
def test_bf16_trains_with_the_single_process_grad_norm(tmp_path, reference, zero):
    """bf16 on CPU (DeepSpeed's bf16 optimizer at ZeRO 0, ZeRO's bf16 path at 2), ep 2:
    losses and the reported gradient norm track the fp32 single-process run to bf16
    precision; a norm that averaged per-rank expert norms would be far off."""
    cfg = make_cfg(tmp_path, parallel={"expert_parallel_size": 2, "zero_stage": zero},
                   train={"dtype": "bf16"})
    results = run_train(cfg, 2, fault="stop@4")  # the reference's LR schedule, 4 of its 10 steps
    for r in results:  # step 1: same weights up to bf16 rounding; later steps drift apart slowly
        assert r.grad_norms[1] == pytest.approx(reference.grad_norms[1], rel=1e-2)
        for step in range(1, 5):
            assert r.losses[step] == pytest.approx(reference.losses[step], rel=2e-2), step
            assert r.grad_norms[step] == pytest.approx(reference.grad_norms[step], rel=1e-1), step


def test_activation_checkpointing_through_the_engine_changes_nothing(tmp_path, reference):
    cfg = make_cfg(tmp_path, parallel={"expert_parallel_size": 2, "zero_stage": 2},
                   train={"activation_checkpointing": True})
    for r in run_train(cfg, 2, fault="stop@4"):
        for step in range(1, 5):
            assert r.losses[step] == pytest.approx(reference.losses[step], rel=1e-4), step
            assert r.grad_norms[step] == pytest.approx(reference.grad_norms[step], rel=1e-4), step


def test_fp16_config_path_uses_dynamic_loss_scaling():
    """fp16 is for GPUs; its DeepSpeed config (dynamic loss scale from 2^16) is derived here."""
    from moe_train.config import deepspeed_config, load_config

    ds = deepspeed_config(load_config("configs/tiny_moe.yaml", ["train.dtype=fp16"]), 2)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 16
    assert not ds["bf16"]["enabled"]
