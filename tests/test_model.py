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
