"""Selection bias (auxiliary-loss-free balancing), single process: the update against
golden numbers worked by hand, counting once per micro-batch (activation recomputation
and eval add nothing), skipped and frozen steps, convergence of maxvio with a frozen
router, and the routing-health monitor's alarms."""

import pytest
import torch

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.transformer import MoETransformer
from moe_train.moe.balance import bias_delta, maxvio, update_selection_biases
from moe_train.moe.layer import MoELayer
from moe_train.train.metrics import RoutingMonitor


def test_bias_delta_golden_numbers():
    u = 0.25  # a power of two: every value below is exact in fp32
    # counts [10, 0, 5, 5], mean 5: signs [-1, +1, 0, 0]; their mean is 0, centring changes nothing
    assert bias_delta(torch.tensor([10, 0, 5, 5]), u).tolist() == [-u, u, 0.0, 0.0]
    # [9, 1, 1, 1], mean 3: signs [-1, +1, +1, +1] * u, mean u/2, centred [-1.5u, .5u, .5u, .5u]
    assert bias_delta(torch.tensor([9, 1, 1, 1]), u).tolist() == [-1.5 * u, 0.5 * u, 0.5 * u, 0.5 * u]
    # exact integer sign beyond fp32's 2^24: c_0 = 2^25 + 1 is above the mean by 3/4, the
    # others below it by 1/4 (in fp32 all four counts would round to 2^25: no update)
    big = torch.tensor([2 ** 25 + 1, 2 ** 25, 2 ** 25, 2 ** 25], dtype=torch.int64)
    assert bias_delta(big, u).tolist() == [-1.5 * u, 0.5 * u, 0.5 * u, 0.5 * u]
    assert bias_delta(torch.tensor([3, 3, 3]), u).tolist() == [0.0, 0.0, 0.0]
    assert maxvio(torch.tensor([10, 0, 5, 5])).item() == pytest.approx(1.0)
    assert maxvio(torch.zeros(4, dtype=torch.int64)).item() == 0


def tiny_model(activation_checkpointing=False, **moe):
    cfg = ModelConfig(vocab_size=40, d_model=16, num_layers=2, num_heads=2, d_ff=24, max_seq_len=8, moe_every=1)
    moe_cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "d_ff": 8, "bias_update_rate": 0.01, **moe})
    torch.manual_seed(0)
    return MoETransformer(cfg, moe_cfg, activation_checkpointing=activation_checkpointing)


def micro_step(model, ids):
    out = model(ids, ids)
    out.lm_loss.backward()
    return out


def test_counts_once_under_activation_checkpointing_and_not_in_eval():
    ids = [torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    biases = []
    for ckpt in (False, True):
        model = tiny_model(activation_checkpointing=ckpt)
        expected = [torch.zeros(4, dtype=torch.int64) for _ in range(2)]
        for batch in ids:  # two micro-batches: counts add up
            out = micro_step(model, batch)
            for e, s in zip(expected, out.moe_stats):
                e += s.routed_per_expert_E
        model.eval()
        with torch.no_grad():
            model(ids[0])  # eval: not counted
        model.train()
        layers = [b.mlp for b in model.blocks]
        assert [layer.tally.routed_E.tolist() for layer in layers] == [e.tolist() for e in expected]
        counts = update_selection_biases(model, None, applied=True, step=1)
        assert counts.tolist() == [e.tolist() for e in expected]
        for layer, e in zip(layers, expected):
            assert torch.equal(layer.router.expert_bias, bias_delta(e, 0.01))
            assert layer.tally.routed_E.sum() == 0  # reset for the next step
        biases.append([layer.router.expert_bias.clone() for layer in layers])
    for a, b in zip(*biases):
        assert torch.equal(a, b)  # recomputation routed exactly as the first forward


def test_skipped_and_frozen_steps_leave_the_bias_alone():
    model = tiny_model(bias_freeze_step=2)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(5))
    router = model.blocks[0].mlp.router
    micro_step(model, ids)
    assert update_selection_biases(model, None, applied=False, step=1) is None  # skipped: discarded
    assert (router.expert_bias == 0).all() and model.blocks[0].mlp.tally.routed_E.sum() == 0
    out = micro_step(model, ids)
    update_selection_biases(model, None, applied=True, step=2)  # only this step's counts
    assert torch.equal(router.expert_bias, bias_delta(out.moe_stats[0].routed_per_expert_E, 0.01))
    frozen = router.expert_bias.clone()
    micro_step(model, ids)
    assert update_selection_biases(model, None, applied=True, step=3) is None  # after bias_freeze_step
    assert torch.equal(router.expert_bias, frozen)


@pytest.mark.parametrize("score_func, rate", [("softmax", 0.01), ("sigmoid", 0.003)])
def test_bias_balances_a_frozen_skewed_router(score_func, rate):
    """lr 0 (the router never moves) and logits skewed towards the high experts: the sign
    update alone brings maxvio below 0.1. The bias must travel about the skew's range
    (2.0 in logits; ~0.4 in sigmoid scores, hence the smaller rate) at u per step, so
    250 steps bound it (measured: about 100 and 80)."""
    from moe_train.moe.stats import MoEStats

    cfg = MoEConfig(num_experts=8, top_k=2, d_ff=4, score_func=score_func, bias_update_rate=rate,
                    capacity_factor=None)
    torch.manual_seed(0)
    layer = MoELayer(cfg, 8)
    x = torch.randn(256, 8)
    x[:, 0] = 1.0
    with torch.no_grad():
        layer.router.w_DE.mul_(3.0)
        layer.router.w_DE[0] = torch.linspace(-1.0, 1.0, 8)  # expert 7 favoured by 2.0 in logit
    start = maxvio(layer.router(x).routed_per_expert_E).item()
    assert start > 1.0
    history = []
    with torch.no_grad():
        for step in range(1, 251):
            r = layer.router(x)  # the router alone: the experts do not change the counts
            layer.tally.add(MoEStats(r.routed_per_expert_E, r.kept_per_expert_E, 512, r.entropy,
                                     r.aux_loss, r.z_loss))
            counts = update_selection_biases(layer, None, applied=True, step=step)[0]
            history.append(maxvio(counts).item())
            if history[-1] < 0.1:
                break
    assert history[-1] < 0.1, f"maxvio {start:.2f} -> {history[-1]:.3f} after {len(history)} steps"
    assert abs(layer.router.expert_bias.sum().item()) < 1e-4  # centred updates


def test_routing_monitor_raises_dead_expert_and_drop_alarms():
    model = tiny_model(top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.router.expert_bias[3] = -1e4  # expert 3 is never chosen
    monitor = RoutingMonitor(model, [0, 1], dead_expert_steps=3, max_drop_frac=0.2)
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    for step in range(1, 3):
        micro_step(model, ids)
        update_selection_biases(model, None, applied=True, step=step)
    values = monitor.check()
    assert values["moe/layer_0/dead_experts_window"] == 0 and values["moe/layer_0/max_idle_steps"] == 2
    assert any("drop fraction" in a for a in monitor.alarms)  # capacity 0.5 drops ~half
    micro_step(model, ids)
    update_selection_biases(model, None, applied=True, step=3)
    values = monitor.check()
    assert values["moe/layer_1/dead_experts_window"] == 1
    assert "MoE layer 1: experts [3] received no token for >= 3 steps" in " ".join(monitor.alarms)
    assert values["train/routing_alarms"] == monitor.num_alarms >= 4
    assert values["moe/layer_0/maxvio"] > 0 and "moe/layer_0/bias_max" in values
    assert values["moe/layer_0/bias_max"] > 0 > values["moe/layer_0/bias_min"]
