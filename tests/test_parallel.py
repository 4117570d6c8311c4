"""Rank arithmetic, launcher environments, and EP-aware gradient reduction/clipping."""

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from moe_train.moe.config import MoEConfig
from moe_train.moe.layer import MoELayer
from moe_train.parallel.grads import allreduce_gradients, clip_grad_norm_, global_grad_norm
from moe_train.parallel.groups import build_groups
from moe_train.parallel.init import choose_backend, discover
from moe_train.parallel.topology import Topology


def test_topology_matches_deepspeed_layout():
    from deepspeed.utils.groups import _get_expert_parallel_ranks

    for world, ep in [(8, 4), (8, 2), (4, 4), (6, 3), (1, 1)]:
        topo = Topology(world, ep, 12)
        ep_ranks, edp_ranks = _get_expert_parallel_ranks(world, 1, ep)
        assert topo.ep_groups() == ep_ranks
        assert sorted(topo.edp_groups()) == sorted(edp_ranks)


def test_topology_owns_every_expert_once_per_ep_group():
    topo = Topology(8, 4, 16)
    for group in topo.ep_groups():
        owned = [e for r in group for e in topo.local_experts(r)]
        assert owned == list(range(16))
    assert topo.edp_group_of(5) == [1, 5] and topo.local_experts(5) == range(4, 8)


def test_group_of_a_rank_is_the_group_holding_it():
    """ep_group_of / edp_group_of compute a rank's group directly (describe(verbose=True)
    asks for all of them); they must equal the group of ep_groups() / edp_groups() that
    holds the rank, and num_groups counts both lists."""
    for world, ep in [(8, 4), (8, 2), (4, 4), (6, 3), (1, 1), (12, 1), (32, 8)]:
        topo = Topology(world, ep, 24)
        for rank in range(world):
            (ep_group,) = [g for g in topo.ep_groups() if rank in g]
            (edp_group,) = [g for g in topo.edp_groups() if rank in g]
            assert topo.ep_group_of(rank) == ep_group and topo.edp_group_of(rank) == edp_group
        assert topo.num_groups == (0 if world == 1 else len(topo.ep_groups()) + len(topo.edp_groups()))


@pytest.mark.parametrize("environ, expected", [
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1"}, (3, 4, 1, "n1", "torchrun")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "node7",
      "SLURM_STEP_ID": "0"}, (5, 8, 1, "node7", "slurm")),
    # the batch shell (no srun step) is one process whatever SLURM_NTASKS says
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}, (0, 1, 0, "127.0.0.1", "single")),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     (1, 2, 1, "127.0.0.1", "mpi")),
    ({}, (0, 1, 0, "127.0.0.1", "single")),
])
def test_discover_reads_each_launcher(environ, expected):
    env = discover(environ)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == expected


def test_discover_under_slurm_takes_the_first_host_of_the_nodelist_and_a_job_port():
    seen = []

    def hostnames(nodelist):
        seen.append(nodelist)
        return ["gpu-a7", "gpu-a8"]

    env = discover({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
                    "SLURM_JOB_NODELIST": "gpu-a[7-8]", "SLURM_JOB_ID": "123456"}, hostnames=hostnames)
    assert seen == ["gpu-a[7-8]"]
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        3, 4, 1, "gpu-a7", 20000 + 123456 % 20000, "slurm")


def test_discover_rejects_inconsistent_environments():
    with pytest.raises(ValueError, match="neither MASTER_ADDR nor SLURM_JOB_NODELIST"):
        discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"})
    with pytest.raises(ValueError, match="SLURM_PROCID is set but SLURM_NTASKS is not"):
        discover({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})
    with pytest.raises(ValueError, match="RANK is set but WORLD_SIZE is not"):
        discover({"RANK": "1"})
    with pytest.raises(ValueError, match="rank 4 is outside world size 4"):
        discover({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        discover({"RANK": "x", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="nccl"):
        choose_backend("nccl", torch.device("cpu"))
    assert choose_backend("auto", torch.device("cpu")) == "gloo"


def _layer_grads(layer, x, g):
    out = layer(x)
    ((out.y * g).sum() + out.aux_loss).backward()


def grad_worker(rank, world_size, ep_size):
    """Each rank trains on its own chunk; after reduction the global norm must equal the
    single-process norm of the mean gradient."""
    groups = build_groups(Topology(world_size, ep_size, 4), rank)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, d_ff=8, capacity_factor=None, seed=3), 6,
                     ep_group=groups.ep)
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(10, 6, generator=gen) for _ in range(world_size)]
    gs = [torch.randn(10, 6, generator=gen) for _ in range(world_size)]
    _layer_grads(layer, xs[rank], gs[rank])
    allreduce_gradients(layer, groups)
    router_grad = layer.router.w_DE.grad.clone()
    expert_grads = {n: p.grad.clone() for n, p in layer.experts.named_parameters()}
    norm = global_grad_norm(layer, groups)
    clipped = clip_grad_norm_(layer, 0.5 * float(norm), groups)
    after = global_grad_norm(layer, groups)
    dist.barrier()
    return {"norm": norm, "clipped_from": clipped, "after": after,
            "router": router_grad, "experts": expert_grads, "local": list(groups.topology.local_experts(rank))}


def test_reduced_gradients_and_global_norm_match_single_process():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=4, top_k=2, d_ff=8, capacity_factor=None, seed=3), 6)
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(10, 6, generator=gen) for _ in range(4)]
    gs = [torch.randn(10, 6, generator=gen) for _ in range(4)]
    for x, g in zip(xs, gs):
        _layer_grads(layer, x, g)
    for p in layer.parameters():  # the DP mean of 4 ranks' gradients
        p.grad /= 4
    want = torch.sqrt(sum(p.grad.pow(2).sum() for p in layer.parameters()))
    ranks = run_ranks(grad_worker, 4, ep_size=2)
    for r in ranks:
        torch.testing.assert_close(r["norm"], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["router"], layer.router.w_DE.grad, rtol=1e-5, atol=1e-6)
        for name, grad in r["experts"].items():  # ep-independent expert gradients
            full = dict(layer.experts.named_parameters())[name].grad
            torch.testing.assert_close(grad, full[r["local"][0]:r["local"][-1] + 1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["after"], 0.5 * want, rtol=1e-4, atol=1e-6)


def global_balance_worker(rank, world_size):
    groups = build_groups(Topology(world_size, 1, 4), rank)
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=8, balance_scope="global", seed=3)
    layer = MoELayer(cfg, 6, balance_group=groups.dp)
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(10, 6, generator=gen) for _ in range(world_size)]
    out = layer(xs[rank])
    out.aux_loss.backward()
    return {"aux": out.aux_loss.detach(), "router": layer.router.w_DE.grad.clone()}


def test_global_balance_scope_averages_f_and_p_over_data_parallel_ranks():
    ranks = run_ranks(global_balance_worker, 2)
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=8, seed=3)
    layer = MoELayer(cfg, 6)
    gen = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(10, 6, generator=gen) for _ in range(2)])  # equal chunks
    probs = torch.softmax(x @ layer.router.w_DE, dim=-1)
    top2 = probs.topk(2, dim=-1).indices.flatten()
    f = torch.bincount(top2, minlength=4).float() / top2.numel()
    want = 4 * (f * probs.mean(dim=0)).sum()
    (2 * want).backward()  # every rank's loss is the same global aux loss
    for r in ranks:
        torch.testing.assert_close(r["aux"], want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["router"] + ranks[1]["router"], layer.router.w_DE.grad,
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ranks[0]["router"], ranks[1]["router"])  # inputs differ per rank
