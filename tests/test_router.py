"""Router semantics against hand computations (MOE_REFERENCE.md, Router/Capacity/Losses)."""

import math

import pytest
import torch

from moe_train.moe.config import MoEConfig
from moe_train.moe.router import Router, expert_capacity, rank_within_expert, topk_ties_low
from moe_train.parallel.topology import Topology


def make_router(d_model=2, w_DE=None, **overrides):
    cfg = MoEConfig(**{"num_experts": 2, "top_k": 1, "d_ff": 4, "min_capacity": 0, **overrides})
    router = Router(cfg, d_model)
    if w_DE is not None:
        with torch.no_grad():
            router.w_DE.copy_(w_DE)
    return router


def test_aux_loss_matches_hand_computation():
    # w = identity: logits are the inputs. Top-1 goes to expert 0 for rows 0, 2, 3.
    router = make_router(w_DE=torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0]])
    routing = router(x)
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # softmax of 2 logits = sigmoid of the gap
    p0 = [sig(2.0), sig(-1.0), sig(1.0), sig(3.0)]
    P = [sum(p0) / 4, sum(1 - p for p in p0) / 4]
    f = [3 / 4, 1 / 4]
    expected = 2 * (f[0] * P[0] + f[1] * P[1])
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    assert routing.routed_per_expert_E.tolist() == [3, 1]


def test_aux_loss_is_one_at_perfect_balance_and_has_router_gradient():
    num_experts = 4
    router = make_router(d_model=num_experts, w_DE=3.0 * torch.eye(num_experts), num_experts=num_experts)
    x = torch.eye(num_experts).repeat(2, 1)  # each expert is the top choice of 2 tokens
    routing = router(x)
    assert routing.routed_per_expert_E.tolist() == [2, 2, 2, 2]
    assert routing.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    # Off balance, the gradient through P must reach the router weights.
    routing = router(torch.randn(16, num_experts))
    routing.aux_loss.backward()
    assert router.w_DE.grad is not None and router.w_DE.grad.abs().sum() > 0


def test_f_is_counted_before_dropping_over_all_k_choices():
    # capacity 1 per expert drops most assignments, but f must count all k*T choices.
    router = make_router(d_model=3, w_DE=torch.eye(3), num_experts=3, top_k=2,
                         capacity_factor=0.1, min_capacity=1)
    x = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [3.0, 0.0, 2.0]])
    routing = router(x)
    assert routing.capacity == 1
    assert routing.routed_per_expert_E.tolist() == [3, 2, 1]
    assert routing.kept_per_expert_E.tolist() == [1, 1, 1]
    assert routing.num_dropped == 3
    probs = torch.softmax(x, dim=-1)
    expected = 3 * sum((c / 6) * probs[:, i].mean().item() for i, c in enumerate([3, 2, 1]))
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_z_loss_equals_formula():
    router = make_router(d_model=5, num_experts=3)
    x = torch.randn(7, 5)
    logits = x @ router.w_DE.detach()
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 7
    assert router(x).z_loss.item() == pytest.approx(expected, rel=1e-5)


def test_jitter_only_in_training():
    router = make_router(d_model=8, num_experts=4, jitter_eps=0.5)
    x = torch.randn(32, 8)
    router.eval()
    clean = x @ router.w_DE.detach()
    assert torch.equal(router.logits(x), clean)
    assert torch.equal(router.logits(x), router.logits(x))
    router.train()
    jittered = router.logits(x)
    assert not torch.allclose(jittered, clean)
    # Multiplicative noise on the input, inside [1 - eps, 1 + eps]: logits stay bounded.
    bound = (x.abs() * 0.5) @ router.w_DE.detach().abs()
    assert torch.all((jittered - clean).abs() <= bound + 1e-5)


def test_eval_uses_eval_capacity_factor():
    router = make_router(d_model=2, w_DE=torch.eye(2), capacity_factor=0.5, eval_capacity_factor=2.0)
    x = torch.tensor([[1.0, 0.0]] * 8)  # all 8 tokens choose expert 0
    router.train()
    routing = router(x)
    assert routing.capacity == 2 and routing.num_dropped == 6
    router.eval()
    routing = router(x)
    assert routing.capacity == 8 and routing.num_dropped == 0


def test_router_computes_fp32_under_bf16_autocast():
    router = make_router(d_model=16, num_experts=4)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router.logits(x.bfloat16())
        routing = router(x.bfloat16())
    assert logits.dtype == torch.float32 and routing.gates_A.dtype == torch.float32
    assert routing.aux_loss.dtype == torch.float32 and routing.z_loss.dtype == torch.float32
    assert torch.equal(logits, x.bfloat16().float() @ router.w_DE.detach())


def test_topk_ties_go_to_lower_expert():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.4, 0.1]])
    values, indices = topk_ties_low(probs, 2)
    assert indices.tolist() == [[0, 1], [1, 2]]
    assert topk_ties_low(probs, 1)[1].tolist() == [[0], [1]]


def test_probs_policy_keeps_highest_probs_and_breaks_ties_by_position():
    expert_ids = torch.tensor([0, 0, 0, 0, 1])
    priority = torch.tensor([0.5, 0.9, 0.5, 0.7, 0.3])
    order, slot, counts = rank_within_expert(expert_ids, 2, priority)
    assert order.tolist() == [1, 3, 0, 2, 4]
    assert slot.tolist() == [2, 0, 3, 1, 0] and counts.tolist() == [4, 1]


def test_position_policy_places_first_choices_before_second_choices():
    # Token 1's FIRST choice (expert 0) must beat token 0's SECOND choice (expert 0).
    router = make_router(d_model=2, w_DE=torch.eye(2), top_k=2, capacity_factor=0.5, min_capacity=1)
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    routing = router(x)
    assert routing.capacity == 1
    kept = routing.kept_order_N.tolist()
    kept_pairs = sorted((routing.token_ids_A[i].item(), routing.expert_ids_A[i].item()) for i in kept)
    assert kept_pairs == [(0, 1), (1, 0)]


def test_capacity_formula():
    assert expert_capacity(100, 8, 1, 1.25, 4) == math.ceil(100 * 1.25 / 8)
    assert expert_capacity(100, 8, 2, 1.25, 4) == math.ceil(2 * 100 * 1.25 / 8)
    assert expert_capacity(4, 64, 1, 1.0, 8) == 4  # min_capacity floors, T caps
    assert expert_capacity(100, 8, 1, None, 4) is None


@pytest.mark.parametrize("overrides, needle", [
    ({"top_k": 3}, "moe.top_k = 3"),
    ({"drop_policy": "random"}, "'random'"),
    ({"capacity_factor": 0.0}, "moe.capacity_factor = 0.0"),
    ({"eval_capacity_factor": -1.0}, "moe.eval_capacity_factor = -1.0"),
])
def test_bad_arguments_raise_value_error_naming_value(overrides, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        make_router(**overrides)
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        MoEConfig(**{"num_experts": 2, "d_ff": 4, **overrides}).validate()


def test_experts_not_divisible_by_ep_raises():
    with pytest.raises(ValueError, match=r"moe\.num_experts = 6"):
        Topology(world_size=4, ep_size=4, num_experts=6)


def test_router_entropy_equals_formula():
    router = make_router(d_model=6, num_experts=5)
    x = torch.randn(9, 6)
    probs = torch.softmax(x @ router.w_DE.detach(), dim=-1)
    expected = -(probs * probs.log()).sum(dim=-1).mean()
    assert router(x).entropy.item() == pytest.approx(expected.item(), rel=1e-5)
    uniform = make_router(d_model=6, w_DE=torch.zeros(6, 5), num_experts=5)
    assert uniform(x).entropy.item() == pytest.approx(math.log(5), rel=1e-6)
