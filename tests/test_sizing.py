"""Model sizing: parameter counts against the real model, FLOPs against torch's counter,
the memory estimate against hand arithmetic, and `check` on every GPU config."""

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_train.cli import main
from moe_train.config import ModelConfig, MoEConfig, load_config
from moe_train.model.sizing import (flops_per_token, forward_flops_per_token, human_count,
                                    memory_estimate, param_counts)
from moe_train.model.transformer import MoETransformer
from moe_train.moe.experts import GroupedExperts

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name != "tiny_moe.yaml")

VARIANTS = [
    dict(),
    dict(num_kv_heads=2, mlp_activation="swiglu", norm="rmsnorm", position="rope"),
    dict(tie_embeddings=False, position="rope"),
    dict(moe_every=1, first_dense_layers=2, num_kv_heads=1),
    dict(moe_every=1, tie_embeddings=False, norm="rmsnorm"),
    dict(moe_every=0),
]
MOE_VARIANTS = [dict(activation="gelu", top_k=1), dict(activation="swiglu", top_k=2),
                dict(activation="relu", top_k=3)]


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=50, d_model=16, num_layers=4, num_heads=4, d_ff=24, max_seq_len=12, moe_every=2)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("model_kw", VARIANTS)
@pytest.mark.parametrize("moe_kw", MOE_VARIANTS)
def test_param_counts_match_the_real_model(model_kw, moe_kw):
    cfg, moe = small(**model_kw), MoEConfig(num_experts=4, d_ff=8, **moe_kw)
    model = MoETransformer(cfg, moe)
    n = param_counts(cfg, moe)
    named = dict(model.named_parameters())  # unique: a tied head appears once
    assert n.total == sum(p.numel() for p in model.parameters())
    assert n.expert == sum(p.numel() for k, p in named.items() if ".experts." in k)
    assert n.router == sum(p.numel() for k, p in named.items() if ".router." in k)
    assert n.dense == n.total - n.expert
    per_expert = n.expert // (cfg.num_moe_blocks * 4) if cfg.num_moe_blocks else 0
    assert n.active_per_token == n.dense + cfg.num_moe_blocks * moe.top_k * per_expert


def test_param_counts_by_hand():
    # V 10, D 4, H 1, Fd 8, 2 blocks (block 1 MoE), LayerNorm, learned positions (4), tied.
    cfg = ModelConfig(vocab_size=10, d_model=4, num_layers=2, num_heads=1, d_ff=8, max_seq_len=4, moe_every=2)
    n = param_counts(cfg, MoEConfig(num_experts=4, top_k=1, d_ff=2, activation="gelu"))
    block = 2 * 8 + 4 * 12 + 16  # two LayerNorms (w, b), qkv [4, 12], proj [4, 4]
    assert n.embedding == 40 + 16
    assert n.router == 16 and n.expert == 4 * (2 * 4 * 2)
    assert n.dense == 56 + 2 * block + 2 * 4 * 8 + 16 + 8  # + dense MLP + router + final norm
    assert n.total == 368 and n.active_per_token == 304 + 16


def _mm_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("model_kw", [dict(), dict(num_kv_heads=2, mlp_activation="swiglu"),
                                      dict(tie_embeddings=False, num_kv_heads=1)])
def test_forward_flops_match_torch_counter_on_a_dense_model(model_kw):
    cfg = small(moe_every=0, **model_kw)
    moe = MoEConfig(num_experts=4, d_ff=8)
    B, S = 2, 12
    model = MoETransformer(cfg, moe)
    counted = _mm_flops(lambda: model(torch.randint(0, 50, (B, S))))  # CPU SDPA is not counted
    f = forward_flops_per_token(cfg, moe, S)
    assert counted == B * S * (f["attn_proj"] + f["dense_mlp"] + f["lm_head"])
    assert f["router"] == f["experts"] == 0
    # Scores: QK^T and AV done in full (S x S) count twice our causal-halved figure.
    H, K = cfg.num_heads, cfg.head_dim
    q, k = torch.randn(B, H, S, K), torch.randn(B, H, S, K)
    full = _mm_flops(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ k)
    assert full == 2 * B * S * f["attn_scores"] / cfg.num_layers
    assert flops_per_token(cfg, moe, S) == 3 * sum(f.values())


@pytest.mark.parametrize("moe_kw", MOE_VARIANTS)
def test_forward_flops_of_an_moe_model(moe_kw):
    cfg = small(moe_every=1, first_dense_layers=1, num_layers=3)
    moe = MoEConfig(num_experts=4, d_ff=8, capacity_factor=None, eval_capacity_factor=None, **moe_kw)
    B, S = 2, 12
    model = MoETransformer(cfg, moe).eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 50, (B, S)))
    by_module = counter.get_flop_counts()
    expert_flops = sum(sum(v.values()) for name, v in by_module.items() if name.endswith(".experts"))
    f = forward_flops_per_token(cfg, moe, S)
    assert counter.get_total_flops() - expert_flops == B * S * (
        f["attn_proj"] + f["dense_mlp"] + f["router"] + f["lm_head"])
    # Experts: k assignments per token, each one expert MLP (balanced counts: no padding).
    experts = GroupedExperts(4, cfg.d_model, moe.d_ff, moe.activation, impl="bmm")
    rows = B * S * moe.top_k
    counted = _mm_flops(lambda: experts(torch.randn(rows, cfg.d_model), torch.full((4,), rows // 4)))
    assert counted * cfg.num_moe_blocks == B * S * f["experts"]


def tiny_memory(**kw):
    cfg = ModelConfig(vocab_size=10, d_model=4, num_layers=2, num_heads=1, d_ff=8, max_seq_len=4, moe_every=2)
    moe = MoEConfig(num_experts=4, top_k=1, d_ff=2, activation="gelu")
    args = dict(world_size=4, ep_size=2, zero_stage=0, dtype="bf16", micro_batch_size=2, seq_len=4,
                activation_checkpointing=False)
    return memory_estimate(cfg, moe, **{**args, **kw})


def test_memory_estimate_by_hand():
    # 304 dense + 64 expert parameters; ep 2: 32 local expert parameters; edp = 4 / 2 = 2.
    held, shard = 304 + 32, 304 // 4 + 32 // 2
    for stage in (0, 1, 2):
        m = tiny_memory(zero_stage=stage)
        assert m.params == 2 * held  # bf16
        assert m.grads == 2 * (shard if stage == 2 else held)
        assert m.optimizer == 12 * (shard if stage >= 1 else held)  # fp32 master + m + v
        assert m.total == m.params + m.grads + m.optimizer + m.activations
    fp32 = tiny_memory(dtype="fp32", zero_stage=0)
    assert fp32.params == 4 * held and fp32.optimizer == 8 * held  # ZeRO 0: params are the master
    fp32 = tiny_memory(dtype="fp32", zero_stage=1)
    assert fp32.optimizer == 12 * shard  # ZeRO 1/2 keep their own fp32 master partition
    # Activations per token (b = 2): attention 3D + 3K = 24 elements; dense MLP 2D + 2Fd = 24;
    # MoE 2D + k(2D + 2F) = 20 elements + 8E = 32 bytes; head 2D elements + V(2 + 4) bytes.
    dense_block, moe_block, head = (24 + 24) * 2, (24 + 20) * 2 + 32, 8 * 2 + 10 * 6
    tokens = 2 * 4
    assert tiny_memory().activations == tokens * (dense_block + moe_block + head)
    ckpt = tiny_memory(activation_checkpointing=True).activations
    assert ckpt == tokens * (2 * 4 * 2 + max(dense_block, moe_block) + head)


def test_memory_monotone_in_zero_stage_and_experts_divided_by_ep():
    cfg = load_config(REPO / "configs" / "mixtral_style_dropless.yaml")
    n = param_counts(cfg.model, cfg.moe)

    def est(**kw):
        args = dict(world_size=64, ep_size=8, zero_stage=0, dtype="bf16", micro_batch_size=1,
                    seq_len=1024, activation_checkpointing=False)
        return memory_estimate(cfg.model, cfg.moe, **{**args, **kw})

    stages = [est(zero_stage=s) for s in (0, 1, 2)]
    assert stages[0].total > stages[1].total > stages[2].total
    assert stages[0].grads == stages[1].grads > stages[2].grads
    assert est(ep_size=1).params - est(ep_size=8).params == 2 * (n.expert - n.expert // 8)
    assert est(activation_checkpointing=True).activations < est().activations
    with pytest.raises(ValueError, match="ep_size = 3"):
        est(ep_size=3)


def test_human_count():
    assert [human_count(x) for x in (512, 45_600_000, 1_234_000_000, 123_400_000)] == \
        ["512", "45.6M", "1.23B", "123M"]


@pytest.mark.parametrize("world", [8, 64, 512])
@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_check_prints_size_and_memory_for_gpu_configs(name, world, capsys):
    assert len(GPU_CONFIGS) >= 4
    rc = main(["check", "--config", str(REPO / "configs" / name), "--world-size", str(world)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    cfg = load_config(REPO / "configs" / name)
    n = param_counts(cfg.model, cfg.moe)
    assert "# model size" in out and f"parameters: total {human_count(n.total)} ({n.total:,})" in out
    assert f"active per token: {human_count(n.active_per_token)}" in out
    assert f"# memory per rank (estimate; world size {world})" in out
    memory = out[out.index("# memory per rank"):out.index("# process groups")].splitlines()
    for prefix in ("parameters: ", "gradients: ", "optimizer state: ", "activations per micro-batch", "total: "):
        assert any(line.startswith(prefix) and " GiB" in line for line in memory), prefix
    assert out.index("# batch arithmetic") < out.index("# model size") < out.index("# process groups")


def test_local_attention_scores_count_the_keys_each_query_reads():
    """A window of W costs about 4 * L * D * W score FLOPs per token, not 2 * L * S * D."""
    from moe_train.config import ModelConfig, MoEConfig
    from moe_train.model.sizing import forward_flops_per_token

    S, W = 4096, 256
    full = ModelConfig(d_model=64, num_heads=4, max_seq_len=S)
    window = ModelConfig(d_model=64, num_heads=4, max_seq_len=S, attention="sliding_window", window=W)
    f_full = forward_flops_per_token(full, MoEConfig(), S)["attn_scores"]
    f_win = forward_flops_per_token(window, MoEConfig(), S)["attn_scores"]
    assert f_full == 2 * full.num_layers * S * 64
    mean_keys = (W * (W + 1) / 2 + (S - W) * W) / S  # ramp up to W keys, then W
    assert abs(f_win - 4 * window.num_layers * 64 * mean_keys) < 1e-6 * f_win
    assert f_win < f_full / 7
