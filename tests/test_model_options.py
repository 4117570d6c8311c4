"""Model options: RMSNorm, RoPE, SwiGLU, grouped-query attention, dropout, untied head,
first dense blocks, activation checkpointing; causality for every combination."""

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_train.config import ModelConfig, MoEConfig, load_config
from moe_train.model.layers import Attention, DenseMLP, RMSNorm, apply_rope, rope_cos_sin
from moe_train.model.transformer import MoETransformer
from moe_train.moe.layer import MoELayer
from moe_train.moe.losses import total_loss

REPO = Path(__file__).resolve().parents[1]


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=40, d_model=16, num_layers=2, num_heads=4, d_ff=24, max_seq_len=10, moe_every=2)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def test_rmsnorm_matches_hand_formula():
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-3)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(2, 3, 6)
    want = x / torch.sqrt((x ** 2).sum(-1, keepdim=True) / 6 + 1e-3) * torch.arange(1.0, 7.0)
    torch.testing.assert_close(norm(x), want)
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    model = MoETransformer(small_cfg(norm="rmsnorm"), MoEConfig(num_experts=2, d_ff=8))
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 5 and all(m.weight.dim() == 1 for m in norms)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    S, K = 7, 8
    cos, sin = rope_cos_sin(S, K, theta=100.0)
    q, k = torch.randn(K), torch.randn(K)
    q_S = apply_rope(q.expand(1, 1, S, K), cos, sin)[0, 0]  # the same vector at every position
    k_S = apply_rope(k.expand(1, 1, S, K), cos, sin)[0, 0]
    scores_SS = q_S @ k_S.t()  # scores[i, j] = <R(i) q, R(j) k>
    for offset in range(-S + 1, S):
        diag = torch.diagonal(scores_SS, offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-5, rtol=1e-5)
    assert (scores_SS[0, 0] - scores_SS[0, 3]).abs() > 1e-3  # not the identity
    torch.testing.assert_close(q_S[0], q)  # position 0: no rotation
    torch.testing.assert_close(q_S.norm(dim=-1), q.norm().expand(S))  # rotations keep norms


def test_swiglu_dense_mlp_math():
    torch.manual_seed(0)
    mlp = DenseMLP(6, 10, "swiglu")
    x = torch.randn(3, 6)
    want = (F.silu(x @ mlp.gate.weight.t()) * (x @ mlp.up.weight.t())) @ mlp.down.weight.t()
    torch.testing.assert_close(mlp(x), want)


def test_gqa_equals_mha_with_repeated_kv_weights():
    torch.manual_seed(0)
    H, G, K = 4, 2, 4
    gqa = Attention(small_cfg(num_kv_heads=G))
    mha = Attention(small_cfg(num_kv_heads=H))
    D = H * K
    wq, wk, wv = gqa.qkv.weight.split([H * K, G * K, G * K])
    rep = lambda w: w.view(G, K, D).repeat_interleave(H // G, dim=0).reshape(H * K, D)  # noqa: E731
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([wq, rep(wk), rep(wv)]))
        mha.proj.weight.copy_(gqa.proj.weight)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(gqa(x), mha(x))
    assert gqa.qkv.weight.shape == (D + 2 * G * K, D) and mha.qkv.weight.shape == (3 * D, D)


@pytest.mark.parametrize("kv", [1, 4, None])
def test_gqa_model_runs_and_kv_equal_heads_is_mha(kv):
    torch.manual_seed(0)
    model = MoETransformer(small_cfg(num_kv_heads=kv, position="rope"), MoEConfig(num_experts=2, d_ff=8))
    ids = torch.randint(0, 40, (2, 10))
    out = model(ids, ids)
    out.lm_loss.backward()
    assert out.logits_BSV.shape == (2, 10, 40) and torch.isfinite(out.lm_loss)
    if kv == 4:  # num_kv_heads = num_heads: the same model as None (MHA), same weights
        torch.manual_seed(0)
        mha = MoETransformer(small_cfg(num_kv_heads=None, position="rope"), MoEConfig(num_experts=2, d_ff=8))
        torch.testing.assert_close(mha(ids).logits_BSV, model(ids).logits_BSV)


def test_untied_head_differs_from_embedding():
    moe = MoEConfig(num_experts=2, d_ff=8)
    tied = MoETransformer(small_cfg(tie_embeddings=True), moe)
    untied = MoETransformer(small_cfg(tie_embeddings=False), moe)
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert not torch.equal(untied.head.weight, untied.embed.weight)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (unique parameters)
    assert n(untied) - n(tied) == 40 * 16


def test_dropout_only_in_training():
    torch.manual_seed(0)
    cfg = small_cfg(dropout=0.2, moe_every=0)
    model = MoETransformer(cfg, MoEConfig())
    no_drop = MoETransformer(small_cfg(dropout=0.0, moe_every=0), MoEConfig())
    no_drop.load_state_dict(model.state_dict())
    ids = torch.randint(0, 40, (2, 10))
    model.eval(), no_drop.eval()
    torch.testing.assert_close(model(ids).logits_BSV, no_drop(ids).logits_BSV)
    model.train()
    a, b = model(ids).logits_BSV, model(ids).logits_BSV
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, no_drop(ids).logits_BSV)


def test_first_dense_layers_placement_and_validation():
    def placement(**kw):
        model = MoETransformer(small_cfg(num_layers=6, **kw), MoEConfig(num_experts=2, d_ff=8))
        return [isinstance(b.mlp, MoELayer) for b in model.blocks]

    assert placement(moe_every=2) == [False, True, False, True, False, True]  # unchanged rule
    assert placement(moe_every=1, first_dense_layers=2) == [False, False, True, True, True, True]
    assert placement(moe_every=2, first_dense_layers=2) == [False, False, False, True, False, True]
    assert placement(moe_every=1, first_dense_layers=6) == [False] * 6
    assert small_cfg(num_layers=6, moe_every=1, first_dense_layers=2).num_moe_blocks == 4


@pytest.mark.parametrize("override, needle", [
    ("model.first_dense_layers=5", "model.first_dense_layers = 5: must be in [0, model.num_layers = 4]"),
    ("model.num_kv_heads=3", "model.num_kv_heads = 3: must be >= 1 and divide model.num_heads (4)"),
    ("model.num_kv_heads=0", "model.num_kv_heads = 0"),
    ("model.norm=batchnorm", "model.norm = 'batchnorm': must be one of layernorm, rmsnorm"),
    ("model.position=sinusoidal", "model.position = 'sinusoidal': must be one of learned, rope, alibi"),
    ("model.mlp_activation=relu", "model.mlp_activation = 'relu'"),
    ("model.dropout=1.0", "model.dropout = 1.0: must be in [0, 1)"),
    ("model.rope_theta=0", "model.rope_theta = 0.0: must be > 0"),
    ("model.norm_eps=-1", "model.norm_eps = -1.0: must be > 0"),
])
def test_new_model_keys_are_validated(override, needle):
    with pytest.raises(ValueError) as err:
        load_config(REPO / "configs" / "tiny_moe.yaml", [override])
    assert needle in str(err.value)


def test_rope_needs_an_even_head_dim():
    with pytest.raises(ValueError, match=r"model.position = 'rope': rope needs an even head dim, got .* = 3"):
        ModelConfig(d_model=12, num_heads=4, position="rope").validate()


OPTION_SETS = [  # (norm, position, mlp_activation, num_kv_heads, tie_embeddings, dropout)
    ("layernorm", "learned", "gelu", None, True, 0.0),
    ("rmsnorm", "rope", "swiglu", 2, False, 0.1),
    ("rmsnorm", "learned", "swiglu", 1, True, 0.1),
    ("layernorm", "rope", "gelu", 4, False, 0.0),
]
# Dropless top-2, and top-1 with the position drop policy and a capacity that drops. (With
# top_k > 1 the position policy's choice-major order lets a later token's first choice
# evict an earlier token's second choice: not causal, so not listed here.)
ROUTINGS = [dict(top_k=2, capacity_factor=None, eval_capacity_factor=None),
            dict(top_k=1, capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=0,
                 drop_policy="position")]


@pytest.mark.parametrize("options, routing, train",
                         list(itertools.product(OPTION_SETS, ROUTINGS, [False, True])))
def test_causality_for_every_option_combination(options, routing, train):
    norm, position, act, kv, tie, dropout = options
    cfg = small_cfg(norm=norm, position=position, mlp_activation=act, num_kv_heads=kv,
                    tie_embeddings=tie, dropout=dropout, num_layers=3, moe_every=1, first_dense_layers=1)
    moe = MoEConfig(num_experts=4, d_ff=8, jitter_eps=0.01, **routing)
    torch.manual_seed(0)
    model = MoETransformer(cfg, moe).train(train)
    ids = torch.randint(0, 40, (2, 10))
    t = 5
    changed = ids.clone()
    changed[1, t + 1:] = (ids[1, t + 1:] + 7) % 40  # only sequence 1, only after t
    torch.manual_seed(1)  # same dropout masks and jitter for both runs (training mode)
    a = model(ids).logits_BSV
    torch.manual_seed(1)
    b = model(changed).logits_BSV
    torch.testing.assert_close(a[1, :t + 1], b[1, :t + 1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[1, t + 1:], b[1, t + 1:])


def _loss_and_grads(model, ids, moe_cfg):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # jitter and dropout draw from here
    out = model(ids, ids.roll(-1, dims=1))
    loss = total_loss(out.lm_loss, out.moe_losses, moe_cfg)
    loss.backward()
    return out, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("routing", ROUTINGS)
def test_activation_checkpointing_same_loss_and_gradients_losses_counted_once(routing):
    cfg = small_cfg(num_layers=4, moe_every=1, first_dense_layers=1, dropout=0.1,
                    norm="rmsnorm", position="rope", mlp_activation="swiglu", num_kv_heads=2)
    moe = MoEConfig(num_experts=4, d_ff=8, jitter_eps=0.05, aux_loss_coef=0.1,
                    z_loss_coef=0.01, **routing)
    torch.manual_seed(0)
    model = MoETransformer(cfg, moe).train()
    ids = torch.randint(0, 40, (3, 10))
    calls = []
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda *_: calls.append(1))
    out_a, loss_a, grads_a = _loss_and_grads(model, ids, moe)
    plain_calls = len(calls)
    model.activation_checkpointing = True
    out_b, loss_b, grads_b = _loss_and_grads(model, ids, moe)
    assert plain_calls == 4 and len(calls) - plain_calls == 8  # each MLP recomputed once
    assert len(out_b.moe_losses) == len(out_b.moe_stats) == cfg.num_moe_blocks == 3
    torch.testing.assert_close(loss_b, loss_a, atol=0, rtol=0)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=1e-6, rtol=1e-5, msg=name)
    for (aux_a, z_a), (aux_b, z_b) in zip(out_a.moe_losses, out_b.moe_losses):
        assert aux_a.item() == aux_b.item() and z_a.item() == z_b.item()
    assert all(torch.equal(sa.routed_per_expert_E, sb.routed_per_expert_E)
               for sa, sb in zip(out_a.moe_stats, out_b.moe_stats))
    with torch.no_grad():  # no gradients: nothing to recompute, plain forward
        n = len(calls)
        model(ids)
        assert len(calls) - n == 4
