"""Fast MoE layer == slow reference loop: outputs, losses, drops and gradients."""

import itertools

import pytest
import torch

from moe_train.moe.config import MoEConfig
from moe_train.moe.layer import MoELayer
from moe_train.moe.losses import total_loss
from moe_train.moe.reference import reference_moe

D_MODEL, NUM_TOKENS = 8, 24


def build(seed=0, **overrides) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 4, "d_ff": 16, "min_capacity": 0, "seed": 7, **overrides})
    torch.manual_seed(seed)
    return MoELayer(cfg, D_MODEL)


def objective(y, aux_loss, z_loss, g):
    """A loss touching every output element with distinct weights, plus both aux losses."""
    return (y * g).sum() + 0.3 * aux_loss + 0.2 * z_loss


def fast_and_reference(layer, x, g, training=True):
    """Returns (outputs, grads) of the fast layer and of the reference, same parameters."""
    params = [x] + list(layer.parameters())
    layer.train(training)
    out = layer(x)
    fast = (out.y, out.aux_loss, out.z_loss, out.stats.num_dropped.item())
    fast_grads = torch.autograd.grad(objective(out.y, out.aux_loss, out.z_loss, g), params)
    ref = reference_moe(x, layer.router.w_DE, layer.experts.expert_forward, layer.cfg, training)
    ref_grads = torch.autograd.grad(objective(ref[0], ref[1], ref[2], g), params)
    return fast, fast_grads, ref, ref_grads


CASES = list(itertools.product([1, 2], ["position", "probs"], [0.5, 1.0, 1.25, None]))


@pytest.mark.parametrize("top_k, policy, cf", CASES)
def test_fast_layer_equals_reference(top_k, policy, cf):
    layer = build(top_k=top_k, drop_policy=policy, capacity_factor=cf)
    torch.manual_seed(1)
    x = torch.randn(NUM_TOKENS, D_MODEL, requires_grad=True)
    g = torch.randn(NUM_TOKENS, D_MODEL)
    fast, fast_grads, ref, ref_grads = fast_and_reference(layer, x, g)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], ref[1].reshape(()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[2], ref[2].reshape(()), rtol=1e-5, atol=1e-6)
    assert fast[3] == ref[3]
    if cf == 0.5:
        assert fast[3] > 0, "a capacity factor of 0.5 must drop something"
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")
        assert b.abs().sum() > 0, f"reference grad of {name} is zero: the test would not see a bug"


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_activations_and_eval_mode_equal_reference(activation):
    layer = build(top_k=2, activation=activation, capacity_factor=0.5, eval_capacity_factor=1.0)
    x = torch.randn(NUM_TOKENS, D_MODEL, requires_grad=True)
    g = torch.randn(NUM_TOKENS, D_MODEL)
    fast, fast_grads, ref, ref_grads = fast_and_reference(layer, x, g, training=False)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)
    assert fast[3] == ref[3]
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dropped_tokens_get_zero_output_and_keep_batch_shape():
    layer = build(capacity_factor=0.25)
    x = torch.randn(2, NUM_TOKENS // 2, D_MODEL)
    out = layer(x)
    assert out.y.shape == x.shape
    zero_rows = (out.y.reshape(-1, D_MODEL) == 0).all(dim=1).sum().item()
    assert zero_rows == out.stats.num_dropped.item() > 0  # top-1: one dropped choice = one zero row
    assert out.stats.drop_frac.item() == pytest.approx(zero_rows / NUM_TOKENS)


def test_expert_with_no_tokens_and_empty_input_run_forward_and_backward():
    layer = build(num_experts=4)
    with torch.no_grad():
        layer.router.w_DE.zero_()
        layer.router.w_DE[0, 2] = 10.0  # every token with x[:, 0] > 0 goes to expert 2
    x = torch.randn(NUM_TOKENS, D_MODEL).abs().requires_grad_()
    out = layer(x)
    assert out.stats.routed_per_expert_E.tolist() == [0, 0, NUM_TOKENS, 0]
    (out.y.sum() + out.aux_loss).backward()
    assert torch.isfinite(x.grad).all() and layer.experts.w1_EDF.grad[2].abs().sum() > 0
    empty = torch.zeros(0, D_MODEL, requires_grad=True)
    out = layer(empty)
    (out.y.sum() + out.aux_loss + out.z_loss).backward()
    assert out.y.shape == (0, D_MODEL) and torch.isfinite(out.aux_loss)


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    layer = build(top_k=2)
    x = torch.randn(NUM_TOKENS, D_MODEL)
    ref = layer(x).y
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.y.dtype == x.dtype
    torch.testing.assert_close(out.y.float(), ref, rtol=0.1, atol=0.05)


def test_total_loss_applies_coefficients_once():
    cfg = MoEConfig(aux_loss_coef=0.01, z_loss_coef=0.001)
    aux = [(torch.tensor(1.5), torch.tensor(20.0)), (torch.tensor(1.0), torch.tensor(10.0))]
    loss = total_loss(torch.tensor(3.0), aux, cfg)
    assert loss.item() == pytest.approx(3.0 + 0.01 * 2.5 + 0.001 * 30.0)


def test_expert_params_are_marked_for_deepspeed_moe_groups():
    from deepspeed.moe.utils import is_moe_param

    layer = build()
    assert all(is_moe_param(p) for p in layer.experts.parameters())
    assert not is_moe_param(layer.router.w_DE)
    assert {p.group_name for p in layer.experts.parameters()} == {"ep_size_1"}
