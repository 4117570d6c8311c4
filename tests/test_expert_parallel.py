"""Expert parallelism on real gloo ranks == one process with ep = 1 (MOE_REFERENCE.md
parity invariant 2): outputs, losses and gradients, fp32, 1e-5.

Each rank's micro-batch is its own routing group (capacity is per source rank), so the
single-process side runs the layer once per rank chunk of the same global batch and sums
the objectives. Gradient bookkeeping: the router (dense) gradient summed over all ranks,
and an expert's gradient summed over its expert-data-parallel group, must equal the
single-process gradient; that sum is what the engine's all-reduces produce.
"""

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from moe_train.moe.config import MoEConfig
from moe_train.moe.layer import MoELayer
from moe_train.parallel.groups import build_groups
from moe_train.parallel.topology import Topology

D_MODEL, TOKENS_PER_RANK, NUM_EXPERTS = 8, 12, 8  # ep = 4 still has 2 local experts
CASES = [  # (top_k, capacity_factor, drop_policy, activation)
    (1, 1.0, "position", "gelu"),
    (2, 1.25, "probs", "swiglu"),
    (2, None, "position", "relu"),
]


def make_cfg(top_k, cf, policy, activation, num_experts=NUM_EXPERTS):
    return MoEConfig(num_experts=num_experts, top_k=top_k, d_ff=16, capacity_factor=cf,
                     drop_policy=policy, activation=activation, min_capacity=0, seed=11)


def global_batch(world_size, case_index, empty_rank=None):
    gen = torch.Generator().manual_seed(100 + case_index)
    chunks = [torch.randn(TOKENS_PER_RANK, D_MODEL, generator=gen) for _ in range(world_size)]
    grads = [torch.randn(TOKENS_PER_RANK, D_MODEL, generator=gen) for _ in range(world_size)]
    if empty_rank is not None:  # this rank routes zero tokens
        chunks[empty_rank], grads[empty_rank] = chunks[empty_rank][:0], grads[empty_rank][:0]
    return chunks, grads


def run_layer(layer, x, g):
    x = x.clone().requires_grad_()
    out = layer(x)
    loss = (out.y * g).sum() + 0.3 * out.aux_loss + 0.2 * out.z_loss
    loss.backward()
    return {"y": out.y.detach(), "aux": out.aux_loss.detach(), "z": out.z_loss.detach(),
            "x_grad": x.grad, "router_grad": layer.router.w_DE.grad.clone(),
            "expert_grads": {n: p.grad.clone() for n, p in layer.experts.named_parameters()},
            "routed": out.stats.routed_per_expert_E}


def build_case(case_index, world_size, ep_group=None, empty_rank=None, force_expert=None):
    """The layer (same init on every rank and in the single process) and the global batch.
    ``force_expert``: every token's first choice goes to that expert (x >= 0)."""
    torch.manual_seed(0)
    layer = MoELayer(make_cfg(*CASES[case_index]), D_MODEL, ep_group=ep_group)
    chunks, grads = global_batch(world_size, case_index, empty_rank)
    if force_expert is not None:
        with torch.no_grad():
            layer.router.w_DE.zero_()
            layer.router.w_DE[:, force_expert] = 5.0
        chunks = [c.abs() for c in chunks]
    return layer, chunks, grads


def ep_worker(rank, world_size, ep_size, cases=range(len(CASES)), **case_kwargs):
    groups = build_groups(Topology(world_size, ep_size, NUM_EXPERTS), rank)
    results = {}
    for i in cases:
        layer, chunks, grads = build_case(i, world_size, groups.ep, **case_kwargs)
        results[i] = run_layer(layer, chunks[rank], grads[rank])
    if ep_size > 1:
        with pytest.raises(ValueError, match=r"moe\.num_experts = 3"):
            MoELayer(make_cfg(*CASES[0], num_experts=3), D_MODEL, ep_group=groups.ep)
    dist.barrier()
    return results


def single_process_reference(world_size, cases=range(len(CASES)), **case_kwargs):
    per_case = {}
    for i in cases:
        layer, chunks, grads = build_case(i, world_size, **case_kwargs)
        per_rank = [run_layer(layer, x, g) for x, g in zip(chunks, grads)]
        # grads accumulate across the per-rank calls: the last call holds the sums
        per_case[i] = (per_rank, per_rank[-1]["router_grad"], per_rank[-1]["expert_grads"])
    return per_case


def check_parity(world_size, ep_size, ranks, reference):
    topo = Topology(world_size, ep_size, NUM_EXPERTS)
    for case_index, (per_rank, router_sum, expert_sum) in reference.items():
        ctx = f"case {CASES[case_index]}"
        for r in range(world_size):
            got, want = ranks[r][case_index], per_rank[r]
            for key in ("y", "aux", "z", "x_grad"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{ctx} rank {r} {key}: {m}")
        router_total = sum(ranks[r][case_index]["router_grad"] for r in range(world_size))
        torch.testing.assert_close(router_total, router_sum, rtol=1e-5, atol=1e-5)
        for r in range(ep_size):  # one rank per EP position; sum over its EDP group
            experts = topo.local_experts(r)
            for name, full in expert_sum.items():
                total = sum(ranks[q][case_index]["expert_grads"][name] for q in topo.edp_group_of(r))
                torch.testing.assert_close(total, full[experts.start:experts.stop], rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{ctx} {name} of experts {experts}: {m}")


@pytest.mark.parametrize("world_size, ep_size", [(2, 2), (4, 4), (4, 2)])
def test_expert_parallel_equals_single_process(world_size, ep_size):
    ranks = run_ranks(ep_worker, world_size, ep_size=ep_size)
    check_parity(world_size, ep_size, ranks, single_process_reference(world_size))


def test_empty_rank_and_unused_experts_do_not_hang():
    # Dropless (capacity routing needs equal token counts: tests/test_routing_parallel.py).
    # Rank 1 routes zero tokens; first choices all go to expert 0 and second choices to
    # expert 1, so rank 1 (experts 4..7) receives nothing and experts 2..7 get no token.
    dropless = [i for i, case in enumerate(CASES) if case[1] is None]
    ranks = run_ranks(ep_worker, 2, ep_size=2, cases=dropless, empty_rank=1, force_expert=0)
    for case_index in dropless:
        assert ranks[1][case_index]["y"].shape == (0, D_MODEL)
        assert ranks[0][case_index]["routed"].tolist() == [TOKENS_PER_RANK] * 2 + [0] * (NUM_EXPERTS - 2)
        assert all((g == 0).all() for g in ranks[1][case_index]["expert_grads"].values())
    check_parity(2, 2, ranks, single_process_reference(2, cases=dropless, empty_rank=1, force_expert=0))
