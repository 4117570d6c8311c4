"""The transformer: MoE blocks where the config says, losses returned per MoE layer."""

import torch

from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.transformer import MoETransformer
from moe_train.moe.layer import MoELayer
from moe_train.moe.losses import total_loss


def test_moe_every_places_moe_blocks_and_losses_flow():
    cfg = ModelConfig(vocab_size=50, d_model=16, num_layers=4, num_heads=2, d_ff=32,
                      max_seq_len=12, moe_every=2)
    moe_cfg = MoEConfig(num_experts=4, top_k=2, d_ff=16)
    torch.manual_seed(0)
    model = MoETransformer(cfg, moe_cfg)
    assert [isinstance(b.mlp, MoELayer) for b in model.blocks] == [False, True, False, True]
    ids = torch.randint(0, 50, (3, 12))
    out = model(ids, ids.roll(-1, dims=1))
    assert out.logits_BSV.shape == (3, 12, 50) and len(out.moe_losses) == 2
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5  # near-uniform at init
    total_loss(out.lm_loss, out.moe_losses, moe_cfg).backward()
    for block in (model.blocks[1], model.blocks[3]):
        assert block.mlp.router.w_DE.grad.abs().sum() > 0
        assert block.mlp.experts.w1_EDF.grad.abs().sum() > 0


def test_dense_only_model_and_causality():
    cfg = ModelConfig(vocab_size=30, d_model=8, num_layers=2, num_heads=2, d_ff=16,
                      max_seq_len=6, moe_every=0)
    model = MoETransformer(cfg, MoEConfig(num_experts=2, d_ff=8)).eval()
    assert not any(isinstance(b.mlp, MoELayer) for b in model.blocks)
    ids = torch.randint(0, 30, (1, 6))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 30
    a, b = model(ids).logits_BSV, model(changed).logits_BSV
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6) and not torch.allclose(a[:, -1], b[:, -1])


def test_a_model_built_on_the_meta_device_equals_the_eager_build():
    """build_model makes every module on the meta device, allocates once and draws there:
    on the CPU the same parameters and buffers, bit for bit, as building eagerly, with
    ties and shared layers kept (options that add modules of every kind)."""
    import pytest

    configs = [
        (ModelConfig(vocab_size=40, d_model=16, num_layers=3, num_heads=2, d_ff=24, max_seq_len=8),
         MoEConfig(num_experts=4, d_ff=8, top_k=2)),
        (ModelConfig(vocab_size=40, d_model=16, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=24, max_seq_len=8,
                     norm="rmsnorm", position="rope", mlp_activation="swiglu", qk_norm=True, embed_dim=8,
                     tie_embeddings=True, share_layers="all", share_group_size=2, first_dense_layers=1,
                     moe_every=1),
         MoEConfig(num_experts=8, d_ff=8, top_k=2, shared_d_ff=12, shared_gate="sigmoid", activation="swiglu",
                   score_func="sigmoid", bias_update_rate=1e-3)),
    ]
    for cfg, moe in configs:
        torch.manual_seed(5)
        eager = MoETransformer(cfg, moe)
        torch.manual_seed(5)
        meta = MoETransformer(cfg, moe, device="cpu")
        want, got = eager.state_dict(), meta.state_dict()
        assert list(want) == list(got)
        for name in want:
            assert torch.equal(want[name], got[name]), name
        assert not any(p.is_meta for p in meta.parameters())
        assert len(list(meta.parameters())) == len(list(eager.parameters()))  # ties and sharing kept
        if cfg.tie_embeddings:
            assert meta.head.weight is meta.embed.weight
        marks = [(n, p.allreduce, p.group_name) for n, p in meta.named_parameters() if hasattr(p, "allreduce")]
        assert marks == [(n, p.allreduce, p.group_name) for n, p in eager.named_parameters()
                         if hasattr(p, "allreduce")] and marks  # DeepSpeed's expert marks kept
        ids = torch.randint(0, 40, (2, 8))
        torch.testing.assert_close(meta(ids).logits_BSV, eager(ids).logits_BSV, rtol=0, atol=0)
    with pytest.raises(AssertionError):  # the check can fail: another seed, other weights
        torch.manual_seed(6)
        other = MoETransformer(*configs[0], device="cpu")
        assert torch.equal(other.head.weight, MoETransformer(*configs[0]).head.weight)
