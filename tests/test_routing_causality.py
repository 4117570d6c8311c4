"""Causality of routing (MOE_REFERENCE.md "Causality", invariant 7): changing the tokens
after position t of one sequence leaves that sequence's MoE outputs and logits at
positions <= t unchanged, in training and in evaluation mode, for every routing option
documented as causal; and the test does catch the options that are not (``probs`` drop
policy with a finite capacity; with top_k > 1, also the ``position`` policy, whose
choice-major order puts a later token's first choice before an earlier token's second).
"""

import pytest
import torch

from moe_train.commands.check import _causality
from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.transformer import MoETransformer


MODEL = ModelConfig(vocab_size=40, d_model=16, num_layers=3, num_heads=4, d_ff=24, max_seq_len=12,
                    moe_every=1, first_dense_layers=1)
OPTIONS = {
    "sigmoid_scale": dict(score_func="sigmoid", route_scale=2.5),
    "bias_softmax": dict(bias_update_rate=0.01),
    "bias_sigmoid_groups": dict(score_func="sigmoid", bias_update_rate=0.01, num_experts=8,
                                num_groups=4, groups_per_token=2),
    "shared_gated_seq_loss": dict(shared_d_ff=8, shared_gate="sigmoid", seq_balance_coef=1e-4),
}
CAUSAL_ROUTINGS = {
    "dropless_top2": dict(top_k=2, capacity_factor=None, eval_capacity_factor=None),
    "position_top1": dict(top_k=1, capacity_factor=0.5, eval_capacity_factor=0.5, drop_policy="position"),
}
NOT_CAUSAL = {
    "probs_top1": dict(top_k=1, capacity_factor=0.5, eval_capacity_factor=0.5, drop_policy="probs"),
    "position_top2": dict(top_k=2, capacity_factor=0.5, eval_capacity_factor=0.5, drop_policy="position"),
}


def build(moe_kw, seed=0):
    moe = MoEConfig(**{"num_experts": 4, "d_ff": 8, "jitter_eps": 0.01, "min_capacity": 0, **moe_kw})
    torch.manual_seed(seed)
    model = MoETransformer(MODEL, moe)
    for block in model.blocks:
        if block.is_moe and block.mlp.router.expert_bias is not None:
            block.mlp.router.expert_bias.normal_(0, 0.3)  # a bias that matters
    return model


def outputs(model, ids, seed=1):
    """Logits and every MoE layer's output, the RNG (jitter, dropout) reset first."""
    moe_y = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: moe_y.append(o.y.detach()))
             for b in model.blocks if b.is_moe]
    torch.manual_seed(seed)
    with torch.no_grad():
        logits = model(ids).logits_BSV
    for h in hooks:
        h.remove()
    return logits, moe_y


def violations(model, ids, seq=0, t=5):
    """Max change at positions <= t of sequence ``seq`` when its tokens after t change."""
    changed = ids.clone()
    changed[seq, t + 1:] = (ids[seq, t + 1:] + 7) % MODEL.vocab_size
    (la, ya), (lb, yb) = outputs(model, ids), outputs(model, changed)
    worst = (la[seq, :t + 1] - lb[seq, :t + 1]).abs().max().item()
    for a, b in zip(ya, yb):
        worst = max(worst, (a[seq, :t + 1] - b[seq, :t + 1]).abs().max().item())
    assert not torch.allclose(la[seq, t + 1:], lb[seq, t + 1:])  # the perturbation did something
    return worst


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("routing", sorted(CAUSAL_ROUTINGS))
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_causal_options_are_causal(option, routing, train):
    moe_kw = {**OPTIONS[option], **CAUSAL_ROUTINGS[routing]}
    assert _causality(MoEConfig(**moe_kw), moe_kw["capacity_factor"]).startswith(("dropless", "position"))
    model = build(moe_kw).train(train)
    ids = torch.randint(0, MODEL.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    for seq in (0, 1):  # the first and a middle sequence of the routing group
        assert violations(model, ids, seq=seq) == 0.0, (option, routing, train, seq)


@pytest.mark.parametrize("routing", sorted(NOT_CAUSAL))
def test_non_causal_routing_is_caught_and_reported(routing):
    """``check`` calls them not causal, and the same test finds a violation (a later
    token taking an earlier token's slot) among a few seeds."""
    moe_kw = NOT_CAUSAL[routing]
    assert not _causality(MoEConfig(**moe_kw), moe_kw["capacity_factor"]).startswith(("dropless", "position"))
    found = 0.0
    for seed in range(6):
        model = build(moe_kw, seed=seed).train(seed % 2 == 0)
        ids = torch.randint(0, MODEL.vocab_size, (3, 12), generator=torch.Generator().manual_seed(seed))
        found = max(found, violations(model, ids, seq=0))
        if found > 1e-4:
            break
    assert found > 1e-4, f"{routing}: no violation found; the causality test would not see one"
