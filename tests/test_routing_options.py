"""Routing beyond the peers, single process: sigmoid scores, route_scale, shared experts,
the selection bias, group-limited routing and the sequence-wise loss against the slow
per-token reference (MOE_REFERENCE.md invariants 5 and 6), the -inf group mask, gates
that never come from key - b, the bias's dtype, and the config checks."""


import pytest
import torch
import torch.nn.functional as F

from moe_train.config import LoggingConfig, MoEConfig
from moe_train.moe.layer import MoELayer
from moe_train.moe.losses import total_loss
from moe_train.moe.reference import reference_moe_full
from moe_train.moe.router import Router, limit_to_groups

D_MODEL, BATCH, SEQ = 8, 3, 8


OPTIONS = {  # name -> MoEConfig overrides (num_experts 4 unless given)
    "sigmoid_k2": dict(score_func="sigmoid", top_k=2),
    "sigmoid_k1_unnormalised": dict(score_func="sigmoid", top_k=1),
    "sigmoid_scale_no_norm": dict(score_func="sigmoid", top_k=2, normalize_topk=False, route_scale=2.5),
    "softmax_scale": dict(top_k=2, route_scale=2.5),
    "bias_softmax": dict(top_k=2, bias_update_rate=0.01),
    "bias_sigmoid": dict(score_func="sigmoid", top_k=2, bias_update_rate=0.01),
    "groups_top2_sum_bias": dict(num_experts=8, num_groups=4, groups_per_token=2, top_k=3,
                                 score_func="sigmoid", bias_update_rate=0.01),
    "groups_max": dict(num_experts=8, num_groups=4, groups_per_token=1, top_k=2, group_score="max"),
    "shared_ungated": dict(top_k=2, shared_d_ff=12),
    "shared_gated_swiglu": dict(top_k=2, shared_d_ff=12, shared_gate="sigmoid", activation="swiglu"),
    "seq_loss_bias_sigmoid": dict(top_k=2, seq_balance_coef=1.0, bias_update_rate=0.01, score_func="sigmoid"),
}


def build(seed=0, **overrides) -> MoELayer:
    cfg = MoEConfig(**{"num_experts": 4, "d_ff": 16, "min_capacity": 0, "seed": 7, **overrides})
    torch.manual_seed(seed)
    layer = MoELayer(cfg, D_MODEL)
    if layer.router.expert_bias is not None:  # a bias that changes the choice
        with torch.no_grad():
            layer.router.expert_bias.copy_(torch.randn(cfg.num_experts) * 0.3)
    return layer


def shared_reference(layer):
    """The shared FFN written out again (not the layer's own code), and its gate weight."""
    if layer.shared is None:
        return None, None
    sh = layer.shared

    def ffn(x_1D):
        h = x_1D @ sh.w1_DF
        if layer.cfg.activation == "swiglu":
            h = F.silu(h) * (x_1D @ sh.w3_DF)
        elif layer.cfg.activation == "gelu":
            h = F.gelu(h)
        else:
            h = F.relu(h)
        return h @ sh.w2_FD
    return ffn, sh.w_gate_D


def objective(y, aux, z, seq, g):
    return (y * g).sum() + 0.3 * aux + 0.2 * z + 0.7 * seq


@pytest.mark.parametrize("cf, policy", [(None, "position"), (0.5, "position"), (0.75, "probs")])
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_equals_reference_outputs_and_gradients(name, cf, policy):
    layer = build(capacity_factor=cf, drop_policy=policy, **OPTIONS[name])
    torch.manual_seed(1)
    x = torch.randn(BATCH, SEQ, D_MODEL, requires_grad=True)
    g = torch.randn(BATCH * SEQ, D_MODEL)
    params = [x] + list(layer.parameters())
    out = layer(x)
    fast_grads = torch.autograd.grad(objective(out.y.reshape(-1, D_MODEL), out.aux_loss, out.z_loss,
                                               out.seq_loss, g), params)
    ffn, gate = shared_reference(layer)
    ref = reference_moe_full(x.reshape(-1, D_MODEL), layer.router.w_DE, layer.experts.expert_forward,
                             layer.cfg, True, bias_E=layer.router.expert_bias, shared_fn=ffn,
                             shared_gate_D=gate, seq_len=SEQ)
    ref_grads = torch.autograd.grad(objective(ref.y, ref.aux_loss, ref.z_loss, ref.seq_loss, g), params)
    torch.testing.assert_close(out.y.reshape(-1, D_MODEL), ref.y, rtol=1e-5, atol=1e-6)
    for key in ("aux_loss", "z_loss", "seq_loss"):
        torch.testing.assert_close(getattr(out, key), getattr(ref, key).reshape(()).float(), rtol=1e-5, atol=1e-6)
    assert out.stats.routed_per_expert_E.tolist() == ref.routed
    assert out.stats.num_dropped.item() == ref.num_dropped
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for pname, a, b in zip(names, fast_grads, ref_grads):
        # fp32 rounding of a sum grows with its terms: the atol scales with the gradient's
        # size (up to ~16 here: 1e-6 alone failed one element of 512 at 1.2e-6 on AVX512).
        atol = 1e-6 * max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"grad of {pname}: {m}")
        assert b.abs().sum() > 0, f"reference grad of {pname} is zero: the test would not see a bug"
    if layer.router.expert_bias is not None:  # the bias really changed the choice here
        unbiased = reference_moe_full(x.reshape(-1, D_MODEL), layer.router.w_DE,
                                      layer.experts.expert_forward, layer.cfg, True)
        assert unbiased.routed != ref.routed


def test_seq_loss_is_one_at_perfect_balance_and_zero_when_off():
    router = Router(MoEConfig(num_experts=4, top_k=1, d_ff=4, seq_balance_coef=1e-4), 4)
    with torch.no_grad():
        router.w_DE.copy_(torch.eye(4) * 50)
    routing = router(torch.eye(4).repeat(2, 1), seq_len=4)  # two sequences, each expert once
    assert routing.seq_loss.item() == pytest.approx(1.0, abs=1e-6)
    off = Router(MoEConfig(num_experts=4, top_k=1, d_ff=4), 4)(torch.randn(8, 4), seq_len=4)
    assert off.seq_loss.item() == 0 and not off.seq_loss.requires_grad
    # and it joins the one loss sum with its coefficient
    cfg = MoEConfig(seq_balance_coef=0.5, aux_loss_coef=0.0, z_loss_coef=0.0)
    pairs = [(torch.tensor(1.0), torch.tensor(1.0))]
    assert total_loss(torch.tensor(2.0), pairs, cfg, [torch.tensor(3.0)]).item() == pytest.approx(3.5)


def test_group_mask_is_minus_inf_when_every_key_is_negative():
    """Sigmoid keys + a large negative bias are all negative: a 0 mask would make the
    masked experts the best (DeepSeek-V3 #741); -inf never picks them."""
    cfg = MoEConfig(num_experts=8, top_k=2, d_ff=4, score_func="sigmoid", bias_update_rate=1e-3,
                    num_groups=4, groups_per_token=1, capacity_factor=None)
    torch.manual_seed(3)
    router = Router(cfg, D_MODEL)
    with torch.no_grad():
        router.expert_bias.fill_(-10.0)
    x = torch.randn(32, D_MODEL)
    logits = router.logits(x)
    key = torch.sigmoid(logits) - 10.0
    assert (key < 0).all()
    chosen = router.select(logits, torch.sigmoid(logits))
    best_group = (key.view(32, 4, 2).topk(2, dim=-1).values.sum(-1)).argmax(-1)
    assert (chosen // 2 == best_group.unsqueeze(1)).all()  # both choices inside the kept group
    masked = limit_to_groups(key, 4, 1, "top2_sum")
    assert torch.isinf(masked).sum() == 32 * 6
    zero_masked = torch.where(torch.isinf(masked), torch.zeros_like(key), key)  # the bug
    wrong = zero_masked.topk(2, dim=-1).indices
    assert not (wrong // 2 == best_group.unsqueeze(1)).all(), "a 0 mask would pick masked experts"
    ref = reference_moe_full(x, router.w_DE, lambda e, v: v, cfg, True, bias_E=router.expert_bias)
    assert router(x).routed_per_expert_E.tolist() == ref.routed


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_gates_are_unbiased_scores_never_key_minus_bias(score_func):
    cfg = MoEConfig(num_experts=4, top_k=1, d_ff=4, score_func=score_func, bias_update_rate=1e-3,
                    capacity_factor=None)
    router = Router(cfg, D_MODEL)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1e4]))  # everybody picks expert 3
    x = torch.randn(16, D_MODEL)
    routing = router(x)
    assert routing.routed_per_expert_E.tolist() == [0, 0, 0, 16]
    logits = router.logits(x)
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    assert torch.equal(routing.gates_A, scores[:, 3])  # bitwise: no (key - b) round trip


def test_normalisation_clamps_at_float32_tiny():
    cfg = MoEConfig(num_experts=4, top_k=2, d_ff=4, score_func="sigmoid", capacity_factor=None)
    router = Router(cfg, 2)
    with torch.no_grad():
        router.w_DE.fill_(-1e3)  # sigmoid underflows to 0 for every expert
    routing = router(torch.ones(3, 2))
    assert torch.isfinite(routing.gates_A).all() and (routing.gates_A == 0).all()


def test_bias_is_an_fp32_persistent_buffer_whatever_the_module_dtype():
    layer = build(bias_update_rate=1e-3)
    bias = layer.router.expert_bias.clone()
    assert "router.expert_bias" in layer.state_dict()
    assert all(p is not layer.router.expert_bias for p in layer.parameters())
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.float64)):
        cast(layer)
        assert layer.router.expert_bias.dtype == torch.float32
        assert torch.equal(layer.router.expert_bias, bias)
    assert layer.router.w_DE.dtype == torch.float64  # the parameters did follow
    assert build().router.expert_bias is None and "router.expert_bias" not in build().state_dict()


def test_shared_expert_params_are_dense_and_counted():
    from deepspeed.moe.utils import is_moe_param

    from moe_train.config import ModelConfig
    from moe_train.model.sizing import param_counts
    from moe_train.model.transformer import MoETransformer

    layer = build(top_k=2, shared_d_ff=12, shared_gate="sigmoid")
    assert all(is_moe_param(p) for p in layer.experts.parameters())
    assert not any(is_moe_param(p) for p in layer.shared.parameters())
    cfg = ModelConfig(vocab_size=30, d_model=16, num_layers=4, num_heads=2, d_ff=24, max_seq_len=8, moe_every=2)
    for act, gate in (("swiglu", "sigmoid"), ("gelu", "none")):
        moe = MoEConfig(num_experts=4, d_ff=8, top_k=2, activation=act, shared_d_ff=20, shared_gate=gate)
        model = MoETransformer(cfg, moe)
        n = param_counts(cfg, moe)
        assert n.total == sum(p.numel() for p in model.parameters())
        assert n.shared == sum(p.numel() for k, p in model.named_parameters() if ".shared." in k) > 0
        assert n.dense == n.total - n.expert


def test_every_token_gets_the_shared_output_even_when_dropped():
    layer = build(top_k=1, capacity_factor=0.25, shared_d_ff=12)
    x = torch.randn(2, 12, D_MODEL)
    out = layer(x)
    assert out.stats.num_dropped.item() > 0
    shared_y = layer.shared(x.reshape(-1, D_MODEL))
    routed_zero = (out.y.reshape(-1, D_MODEL) - shared_y).abs().amax(dim=1) < 1e-7
    assert routed_zero.sum().item() == out.stats.num_dropped.item()  # top-1: dropped = shared only


@pytest.mark.parametrize("overrides, message", [
    (dict(num_experts=8, num_groups=4, groups_per_token=5), r"moe\.groups_per_token = 5: must be <= moe\.num_groups \(4\)"),
    (dict(num_experts=8, num_groups=3), r"moe\.num_groups = 3: must be >= 1 and divide moe\.num_experts \(8\)"),
    (dict(num_experts=8, top_k=4, num_groups=4, groups_per_token=1), r"moe\.groups_per_token = 1: keeps 1 x 2 = 2"),
    (dict(num_experts=4, num_groups=4, groups_per_token=2), r"moe\.group_score = 'top2_sum': needs at least 2"),
    (dict(shared_gate="sigmoid"), r"moe\.shared_gate = 'sigmoid': needs a shared expert"),
    (dict(score_func="tanh"), r"moe\.score_func = 'tanh'"),
    (dict(route_scale=0.0), r"moe\.route_scale = 0\.0"),
    (dict(bias_update_rate=-1e-3), r"moe\.bias_update_rate = -0\.001"),
    (dict(bias_freeze_step=-1), r"moe\.bias_freeze_step = -1"),
    (dict(dispatch="twice"), r"moe\.dispatch = 'twice'"),
    (dict(shared_d_ff=-1), r"moe\.shared_d_ff = -1"),
])
def test_bad_routing_options_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{"d_ff": 4, **overrides}).validate()


def test_logging_alarm_keys_are_checked():
    with pytest.raises(ValueError, match=r"logging\.max_drop_frac = 1\.5"):
        LoggingConfig(max_drop_frac=1.5).validate()
    with pytest.raises(ValueError, match=r"logging\.dead_expert_steps = -1"):
        LoggingConfig(dead_expert_steps=-1).validate()


def test_check_prints_causality_and_shared_counts(capsys, tmp_path):
    from moe_train.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {vocab_size: 64, d_model: 16, num_layers: 2, num_heads: 2, d_ff: 32, max_seq_len: 16}\n"
                   "moe: {num_experts: 4, top_k: 2, d_ff: 8, shared_d_ff: 16, shared_gate: sigmoid,\n"
                   "      capacity_factor: null, eval_capacity_factor: 2.0}\n"
                   "data: {seq_len: 16, micro_batch_size: 2}\n")
    assert main(["check", "--config", str(cfg), "--world-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "training: causal (dropless)" in out and "evaluation: NOT causal" in out
    assert "shared experts 528 (d_ff 16, gate sigmoid; dense)" in out  # 2 * 16 * 16 + 16
    assert "+ the shared expert" in out
    assert main(["check", "--config", str(cfg), "--world-size", "1",
                 "--set", "moe.groups_per_token=5", "--set", "moe.num_groups=4"]) == 2
    assert "moe.groups_per_token = 5: must be <= moe.num_groups (4)" in capsys.readouterr().err
