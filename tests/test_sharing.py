"""ALBERT options: factorised embeddings and cross-layer sharing (model.embed_dim,
model.share_layers, model.share_group_size).

A shared model's gradient of a shared parameter equals the sum of the gradients of the
copies in the same model unshared (same weights: the shared model's state dict lists
each shared tensor under every block's name, so the unshared model loads it directly);
parameter counts equal the real model's; a shared MoE model trains at world 2, ep 2,
ZeRO-2 like the single process and its checkpoint stores each shared tensor once and
round-trips through the real engine.
"""

import dataclasses

import pytest
import torch

from engine_harness import make_cfg, run_train
import moe_train.checkpoint as ckpt
from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.sizing import forward_flops_per_token, layer_owners, param_counts
from moe_train.model.transformer import MoETransformer
from moe_train.moe.balance import moe_layers, update_selection_biases
from moe_train.parallel.topology import Topology
from moe_train.train.metrics import RoutingMonitor


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=40, d_model=16, num_layers=4, num_heads=4, d_ff=24, max_seq_len=12, moe_every=2)
    return ModelConfig(**{**base, **kw})


MOE = MoEConfig(num_experts=4, top_k=2, d_ff=8, capacity_factor=1.0, min_capacity=1, shared_d_ff=8,
                shared_gate="sigmoid")

# (name, model options): which modules are shared, and where
GRAD_CASES = [
    ("attention", dict(share_layers="attention", moe_every=0)),
    ("dense_mlp", dict(share_layers="mlp", moe_every=0, share_group_size=2)),
    ("moe_mlp", dict(share_layers="mlp", moe_every=1)),  # experts, router, shared expert
    ("all", dict(share_layers="all", moe_every=2, embed_dim=8)),  # MoE with MoE, dense with dense
]


def _loss(out):
    return out.lm_loss + sum(a + z for a, z in out.moe_losses)


@pytest.mark.parametrize("name, kw", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_shared_gradient_is_the_sum_of_the_per_use_gradients(name, kw):
    torch.manual_seed(0)
    cfg = small(**kw)
    shared = MoETransformer(cfg, MOE).train()
    unshared = MoETransformer(dataclasses.replace(cfg, share_layers="none"), MOE).train()
    unshared.load_state_dict(shared.state_dict())  # every block gets a copy of the same weights
    ids = torch.randint(0, 40, (3, 12))
    out_s, out_u = shared(ids, ids), unshared(ids, ids)
    # Each use routes on its own: one aux and z loss per MoE block, equal to the copies'.
    assert len(out_s.moe_losses) == cfg.num_moe_blocks
    for (a_s, z_s), (a_u, z_u) in zip(out_s.moe_losses, out_u.moe_losses):
        torch.testing.assert_close(a_s, a_u)
        torch.testing.assert_close(z_s, z_u)
    torch.testing.assert_close(out_s.logits_BSV, out_u.logits_BSV)
    _loss(out_s).backward()
    _loss(out_u).backward()
    grads_u = dict(unshared.named_parameters())
    uses: dict[int, list[str]] = {}  # id(parameter) -> every name it has in the shared model
    for n, p in shared.named_parameters(remove_duplicate=False):
        uses.setdefault(id(p), []).append(n)
    params = {id(p): p for p in shared.parameters()}
    multi = [ids_ for ids_ in uses if len(uses[ids_]) > 1 and not uses[ids_][0].startswith(("embed.", "head."))]
    assert multi, "nothing shared"
    for key, names in uses.items():
        want = sum(grads_u[n].grad for n in names if n in grads_u and grads_u[n].grad is not None)
        torch.testing.assert_close(params[key].grad, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{names}: {m}")
    kinds = {n.split(".")[2] for key in multi for n in uses[key]}
    expect = {"attention": {"attn", "norm1"}, "dense_mlp": {"mlp", "norm2"}, "moe_mlp": {"mlp", "norm2"},
              "all": {"attn", "norm1", "mlp", "norm2"}}[name]
    assert kinds == expect
    if kw["moe_every"]:  # the experts and the router are among the shared parameters
        names = [n for key in multi for n in uses[key]]
        assert any(".experts." in n for n in names) and any(".router." in n for n in names)


def test_activation_checkpointing_of_shared_blocks_changes_nothing():
    """Recomputing shared blocks in backward: same gradients, and the shared layer's
    tally counts each use once (not again in the recomputation)."""
    cfg = small(share_layers="all", moe_every=1)
    grads, tallies = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = MoETransformer(cfg, MOE, activation_checkpointing=recompute).train()
        ids = torch.randint(0, 40, (3, 12))
        out = model(ids, ids)
        _loss(out).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        (layer,) = moe_layers(model)
        tallies.append(int(layer.tally.routed_E.sum()))
        assert tallies[-1] == sum(int(s.routed_per_expert_E.sum()) for s in out.moe_stats)
    assert tallies[0] == tallies[1]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=lambda m: f"{name}: {m}")


def test_layer_owners_share_by_group_and_by_kind():
    # moe_every 2: blocks 1, 3, 5, 7 are MoE. Groups of 4: {0..3}, {4..7}.
    attn, mlp = layer_owners(small(num_layers=8, share_layers="all", share_group_size=4))
    assert attn == [0, 0, 0, 0, 4, 4, 4, 4]
    assert mlp == [0, 1, 0, 1, 4, 5, 4, 5]
    attn, mlp = layer_owners(small(num_layers=8, share_layers="mlp", first_dense_layers=4))
    assert attn == list(range(8)) and mlp == [0, 0, 0, 0, 0, 5, 0, 5]
    assert layer_owners(small(share_layers="none")) == (list(range(4)), list(range(4)))


def test_shared_modules_are_the_same_objects():
    model = MoETransformer(small(share_layers="all", moe_every=2), MOE)
    b = model.blocks
    assert b[0].attn is b[3].attn and b[0].norm1 is b[2].norm1
    assert b[1].mlp is b[3].mlp and b[0].mlp is b[2].mlp and b[0].mlp is not b[1].mlp
    assert b[1].mlp.block_ids == [1, 3] and "shared by blocks 1, 3" in b[1].mlp.dispatcher.label
    assert len(moe_layers(model)) == 1


COUNT_CASES = [dict(share_layers=s, share_group_size=g, **extra)
               for s in ("none", "attention", "mlp", "all") for g in (0, 2)
               for extra in (dict(), dict(moe_every=1, qk_norm=True), dict(embed_dim=4, tie_embeddings=False,
                                                                          norm="rmsnorm", first_dense_layers=1))]


@pytest.mark.parametrize("kw", COUNT_CASES)
def test_param_counts_match_the_real_model(kw):
    cfg = small(**kw)
    model = MoETransformer(cfg, MOE)
    n = param_counts(cfg, MOE)
    named = dict(model.named_parameters())  # unique parameters
    assert n.total == sum(p.numel() for p in model.parameters())
    assert n.expert == sum(p.numel() for k, p in named.items() if ".experts." in k)
    assert n.router == sum(p.numel() for k, p in named.items() if ".router." in k)
    assert n.embed_proj == sum(p.numel() for k, p in named.items() if "_proj." in k and "blocks" not in k)
    # Active: each use counted, so sharing leaves it as it is unshared.
    unshared = param_counts(dataclasses.replace(cfg, share_layers="none"), MOE)
    assert n.active_per_token == unshared.active_per_token
    assert forward_flops_per_token(cfg, MOE, 12) == forward_flops_per_token(
        dataclasses.replace(cfg, share_layers="none"), MOE, 12)


@pytest.mark.parametrize("tie", [True, False])
def test_factorised_embeddings_forward_and_counts(tie):
    cfg = small(embed_dim=4, tie_embeddings=tie)
    model = MoETransformer(cfg, MOE)
    assert model.embed.weight.shape == (40, 4) and model.embed_proj.weight.shape == (16, 4)
    assert model.head_proj.weight.shape == (4, 16) and model.head.weight.shape == (40, 4)
    assert (model.head.weight is model.embed.weight) == tie
    ids = torch.randint(0, 40, (2, 12))
    out = model(ids, ids)
    assert out.logits_BSV.shape == (2, 12, 40) and torch.isfinite(out.lm_loss)
    out.lm_loss.backward()
    assert model.embed_proj.weight.grad.abs().sum() > 0 and model.head_proj.weight.grad.abs().sum() > 0
    n, full = param_counts(cfg, MOE), param_counts(small(tie_embeddings=tie), MOE)
    assert n.total == sum(p.numel() for p in model.parameters())
    table = (1 if tie else 2) * 40
    assert full.total - n.total == table * (16 - 4) - 2 * 4 * 16
    # embed_dim = d_model is the plain table: no projections.
    plain = MoETransformer(small(embed_dim=16, tie_embeddings=tie), MOE)
    assert plain.embed_proj is None and plain.head_proj is None


def test_factorised_projections_keep_the_residual_scale():
    """The projection starts at std 1/sqrt(Ee): the embedding enters the residual stream
    at the unfactorised scale (init_std), not init_std^2 * sqrt(Ee)."""
    torch.manual_seed(0)
    model = MoETransformer(small(d_model=64, num_heads=4, embed_dim=16, vocab_size=500), MOE)
    x = model.embed_proj(model.embed.weight).detach()
    assert 0.015 < float(x.std()) < 0.025


def test_tally_counts_every_use_and_the_monitor_names_the_first_block():
    moe = dataclasses.replace(MOE, bias_update_rate=1e-2)
    model = MoETransformer(small(share_layers="mlp"), moe).train()
    ids = torch.randint(0, 40, (2, 12))
    out = model(ids, ids)
    (layer,) = moe_layers(model)
    per_use = [int(s.routed_per_expert_E.sum()) for s in out.moe_stats]
    assert len(per_use) == 2 and int(layer.tally.routed_E.sum()) == sum(per_use)
    monitor = RoutingMonitor(model, [1, 3], dead_expert_steps=5, max_drop_frac=None)
    assert monitor.layer_ids == [1]
    counts = update_selection_biases(model, None, applied=True, step=1)
    assert counts.shape == (1, 4) and int(counts.sum()) == sum(per_use)
    assert "moe/layer_1/maxvio" in monitor.check()


def test_split_state_stores_a_shared_tensor_once(tmp_path):
    model = MoETransformer(small(share_layers="all", moe_every=2), MOE)
    dense, experts = ckpt.split_state(model)
    assert set(experts) == {n for n in model.state_dict() if ".experts." in n}  # both uses' names
    assert experts["blocks.1.mlp.experts.w1_EDF"].data_ptr() == experts["blocks.3.mlp.experts.w1_EDF"].data_ptr()
    assert dense["blocks.0.attn.qkv.weight"].data_ptr() == dense["blocks.2.attn.qkv.weight"].data_ptr()
    unique = sum(p.numel() * 4 for p in model.parameters())
    torch.save(dense | experts, tmp_path / "all.pt")
    assert (tmp_path / "all.pt").stat().st_size < unique * 1.1 + 20000


def test_shared_moe_model_at_world_2_ep_2_zero_2_matches_one_process_and_resumes(tmp_path):
    """Experts, router and attention shared (4 blocks, share all; MoE blocks 1 and 3 use
    one MoE layer, whose all-to-alls run at each use). World 2, ep 2, ZeRO-2 matches the
    single process (gradient reduction of the shared experts); a checkpoint saved at step
    3 holds each shared tensor once and a resume from it continues with the same losses
    and weights; the checkpoint also loads into a world-1 model."""
    shared = {"model": {"num_layers": 4, "moe_every": 2, "share_layers": "all"},
              "train": {"max_steps": 6}, "checkpoint": {"every_steps": 3}}
    cfg = make_cfg(tmp_path / "a", parallel={"expert_parallel_size": 2, "zero_stage": 2}, **shared)
    straight = run_train(cfg, 2, keep_state=True)
    ref_cfg = make_cfg(tmp_path / "ref", parallel={"expert_parallel_size": 1, "zero_stage": 2},
                       **{**shared, "train": {"max_steps": 6, "grad_accum_steps": 2}})
    (ref,) = run_train(ref_cfg, 1, keep_state=True)
    for step, loss in ref.losses.items():
        assert straight[0].losses[step] == pytest.approx(loss, rel=1e-4), step
    assert ref.losses[6] < ref.losses[1] - 0.03, ref.losses  # it learns: not two flat lines
    for rank, r in enumerate(straight):
        for name, value in r.state.items():
            want = ref.state[name][rank * 2:(rank + 1) * 2] if ".experts." in name else ref.state[name]
            assert torch.allclose(value, want, rtol=1e-3, atol=1e-5), name

    step3 = tmp_path / "a" / "ckpt" / "step_00000003"
    files = torch.load(step3 / "experts_ep001.pt", weights_only=True)["tensors"]
    assert files["blocks.1.mlp.experts.w1_EDF"].data_ptr() == files["blocks.3.mlp.experts.w1_EDF"].data_ptr()
    resumed = run_train(cfg, 2, resume=str(step3), keep_state=True)
    assert sorted(resumed[0].losses) == [4, 5, 6]
    for rank in range(2):
        for step in (4, 5, 6):
            assert resumed[rank].losses[step] == straight[rank].losses[step], (rank, step)
        for name, value in resumed[rank].state.items():
            assert torch.equal(value, straight[rank].state[name]), name

    model = MoETransformer(cfg.model, cfg.moe)  # world 1: every expert, from both files
    ckpt.load_model_weights(tmp_path / "a" / "ckpt" / "step_00000006", model, Topology(1, 1, 4), 0)
    assert model.blocks[1].mlp is model.blocks[3].mlp
    for name, p in model.named_parameters():
        want = (torch.cat([straight[0].state[name], straight[1].state[name]]) if ".experts." in name
                else straight[0].state[name])
        assert torch.equal(p.detach(), want), name
