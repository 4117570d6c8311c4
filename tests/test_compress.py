"""moe-train prune and quantize: the highest-load experts are kept and the pruned model
computes what the original did when the dropped experts got no tokens; shapes follow;
dense magnitude pruning reaches its sparsity and is permanent; the pruned checkpoint
verifies, generates and resumes through train; int8 round-trips within half a step,
its model stays close to fp32, generates, is smaller on disk and is refused by train."""

import pytest
import torch

from engine_harness import make_cfg, run_train
import moe_train.checkpoint as ckpt
from moe_train.cli import main
from moe_train.config import config_to_dict, load_config
from moe_train.data.synthetic import write_synthetic_dataset
from moe_train.inference import load_for_inference, sample_tokens
from moe_train.inference.int8 import Int8GroupedExperts, Int8Linear, dequantize_int8, quantize_int8
from moe_train.model.transformer import MoETransformer
from moe_train.transform.prune import experts_to_keep, kept_experts, magnitude_prune
from moe_train.transform.report import model_bytes

# Block 0 dense, blocks 1-2 MoE (6 experts, top-2, renormalised gates, a selection bias,
# a gated shared expert), dropless evaluation so no capacity differs after pruning.
SECTIONS = {"model": {"vocab_size": 512, "num_layers": 3, "moe_every": 1, "first_dense_layers": 1},
            "moe": {"num_experts": 6, "top_k": 2, "eval_capacity_factor": None, "bias_update_rate": 1e-3,
                    "shared_d_ff": 32, "shared_gate": "sigmoid"},
            "parallel": {"expert_parallel_size": 1}, "train": {"max_steps": 3}}
NEVER = {"blocks.1.mlp": [1, 4], "blocks.2.mlp": [0, 5]}  # experts the selection bias shuts out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny model whose selection bias keeps NEVER's experts from ever being chosen,
    saved as a weights-only checkpoint at step 3, with synthetic shards."""
    root = tmp_path_factory.mktemp("compress")
    write_synthetic_dataset(str(root / "shards"), [40, 37], seq_len=16, vocab_size=512, val_counts=(9,))
    cfg = make_cfg(root, data={"manifest": str(root / "shards" / "manifest.json")}, **SECTIONS)
    torch.manual_seed(0)
    model = MoETransformer(cfg.model, cfg.moe)
    with torch.no_grad():
        for name, ids in NEVER.items():
            model.get_submodule(name).router.expert_bias[ids] = -1e4
    model.eval()
    path = ckpt.save_model_checkpoint(root / "src", model, config_to_dict(cfg), ckpt.TrainState(step=3), "test")
    return root, cfg, model, path


@pytest.fixture(scope="module")
def pruned(source):
    root, *_ = source
    return _cli(["prune", "--checkpoint", str(root / "src"), "--out", str(root / "pruned"), "--keep-experts", "4"])


def _cli(argv):
    rc = main(argv)
    assert rc == 0, argv
    return ckpt.find_checkpoint(argv[argv.index("--out") + 1], "auto")


def _logits(model, seed=0):
    x = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits_BSV


def test_prune_keeps_the_loaded_experts_and_the_output(source, pruned, capsys):
    _, cfg, model, _ = source
    assert ckpt.verify_checkpoint(pruned) == []
    loaded = load_for_inference(pruned)
    assert loaded.cfg.moe.num_experts == 4 and loaded.meta["weights_only"]
    for name, never in NEVER.items():
        kept = [i for i in range(6) if i not in never]
        old, new = model.get_submodule(name), loaded.model.get_submodule(name)
        assert new.router.w_DE.shape == (cfg.model.d_model, 4) and new.experts.w1_EDF.shape[0] == 4
        assert torch.equal(new.router.w_DE, old.router.w_DE[:, kept])
        assert torch.equal(new.router.expert_bias, old.router.expert_bias[kept])
        for w in ("w1_EDF", "w2_EFD", "w3_EDF"):
            assert torch.equal(getattr(new.experts, w), getattr(old.experts, w)[kept]), (name, w)
    torch.testing.assert_close(_logits(loaded.model), _logits(model), rtol=1e-5, atol=1e-5)
    assert len(sample_tokens(loaded.model, [1, 2, 3], 4, temperature=0)) == 4


def test_prune_prints_before_after_and_the_resume_command(source, tmp_path, capsys):
    root, *_ = source
    path = _cli(["prune", "--checkpoint", str(root / "src"), "--out", str(tmp_path / "p"), "--min-load", "0.01",
                 "--dense-sparsity", "0.5", "--eval-batches", "2"])
    text = capsys.readouterr().out
    assert "before" in text and "after" in text and "val loss" in text and "bytes on disk" in text
    assert f"--config {tmp_path / 'p' / 'config.yaml'}" in text and "--set moe.num_experts=4" in text
    loaded = load_for_inference(path)
    assert loaded.cfg.moe.num_experts == 4  # --min-load: the 4 experts that get tokens
    state = loaded.model.state_dict()
    assert not [n for n in state if n.endswith(("_orig", "_mask"))]
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.up.weight", "blocks.1.mlp.shared.w2_FD"):
        assert (state[name] == 0).float().mean() == 0.5, name
    assert (state["blocks.1.mlp.experts.w1_EDF"] != 0).all() and (state["embed.weight"] != 0).all()
    assert main(["prune", "--checkpoint", str(root / "src"), "--out", str(tmp_path / "p"), "--keep-experts", "4"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_highest_load_experts_per_layer_and_per_group(source):
    _, cfg, _, _ = source
    load_E = torch.tensor([5, 1, 3, 3, 0, 9])
    assert kept_experts(load_E, 3) == [0, 2, 5]  # 9, 5, then 3 and 3 tie: the lower id
    assert kept_experts(load_E, 4, num_groups=2) == [0, 2, 3, 5]  # two from each half
    loads = {"a": torch.tensor([50, 30, 10, 5, 5, 0]), "b": torch.tensor([90, 10, 0, 0, 0, 0])}
    assert experts_to_keep(loads, cfg.moe, None, 0.1) == 3  # layer a has 3 experts at >= 10%
    assert experts_to_keep(loads, cfg.moe, None, 0.6) == 2  # never below top_k
    with pytest.raises(ValueError, match="--keep-experts 1: must be between moe.top_k"):
        experts_to_keep(loads, cfg.moe, 1, None)


def test_global_magnitude_pruning_is_permanent(source):
    _, cfg, model, _ = source
    fresh = MoETransformer(cfg.model, cfg.moe)
    fresh.load_state_dict(model.state_dict())
    tensors, weights, zeros = magnitude_prune(fresh, 0.3, "global")
    assert tensors == 3 * 2 + 2 + 2 * 3  # attention, the dense MLP (gelu), the shared experts (swiglu)
    assert zeros == round(0.3 * weights)
    assert not any(n.endswith("_orig") for n, _ in fresh.named_parameters())
    assert not fresh.blocks[0].attn.qkv._forward_pre_hooks


def test_pruned_checkpoint_resumes_through_train(source, pruned):
    """OUT/config.yaml carries moe.num_experts = 4 and checkpoint.dir = OUT: --resume auto
    picks the pruned checkpoint (step 3) and trains on with a fresh optimizer."""
    cfg = load_config(pruned.parent / "config.yaml", ["train.max_steps=5", "checkpoint.every_steps=0"])
    assert cfg.moe.num_experts == 4 and cfg.checkpoint.dir == str(pruned.parent)
    (result,) = run_train(cfg, 1, resume="auto", synthetic=False)
    assert result.final_step == 5 and sorted(result.losses) == [4, 5]


def _dequantized(state: dict) -> dict:
    """Float weights (the original names) from an int8 state dict: q * scale."""
    out = {}
    for name, q in state.items():
        if q.dtype != torch.int8:
            continue
        prefix, leaf = name.rsplit(".", 1)
        if leaf == "weight_int8":  # Int8Linear: weight_int8, scale_O1
            out[f"{prefix}.weight"] = dequantize_int8(q, state[f"{prefix}.scale_O1"])
        else:  # experts / shared expert: w1_int8_EDF, w1_scale_E1F
            w, _, shape = leaf.split("_")
            scale = next(t for n, t in state.items() if n.startswith(f"{prefix}.{w}_scale_"))
            out[f"{prefix}.{w}_{shape}"] = dequantize_int8(q, scale)
    return out


def test_int8_round_trip_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 16, 8, generator=g) * torch.logspace(-3, 1, 8)  # channels of very different size
    w[1, :, 2] = 0  # an all-zero channel
    q, scale = quantize_int8(w, reduce_dim=1)
    assert q.dtype == torch.int8 and scale.shape == (3, 1, 8) and int(q.abs().max()) == 127
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale / 2 * (1 + 1e-6)).all()
    assert (q[1, :, 2] == 0).all()


def test_quantized_checkpoint_evaluates_generates_and_is_smaller(source, tmp_path, capsys):
    root, cfg, model, src = source
    path = _cli(["quantize", "--checkpoint", str(src), "--out", str(tmp_path / "q")])
    assert "before" in capsys.readouterr().out
    assert ckpt.verify_checkpoint(path) == []
    files = ckpt.read_meta(path)["manifest"]["files"]
    int8 = {n for f in files.values() for n, t in f["tensors"].items() if t["dtype"] == "int8"}
    assert {"tensors/blocks.1.mlp.experts.w1_int8_EDF", "blocks.0.attn.qkv.weight_int8"} <= int8
    assert "tensors/blocks.1.mlp.experts.w1_scale_E1F" in files["experts_ep000.pt"]["tensors"]
    loaded = load_for_inference(path)
    assert isinstance(loaded.model.blocks[1].mlp.experts, Int8GroupedExperts)
    assert isinstance(loaded.model.blocks[0].attn.qkv, Int8Linear)
    out = _logits(loaded.model)
    # Exactly the float model holding the dequantised weights: dequantisation on the fly.
    dequantized = MoETransformer(cfg.model, cfg.moe)
    dequantized.load_state_dict({**model.state_dict(), **_dequantized(loaded.model.state_dict())})
    torch.testing.assert_close(out, _logits(dequantized.eval()), rtol=1e-5, atol=1e-5)
    # Close to fp32, except where a token's top-k choice flips (routing is discrete).
    ref = _logits(model)
    close_T = (out - ref).abs().amax(-1) < 0.1 * ref.std()
    assert close_T.float().mean() >= 0.9
    assert len(sample_tokens(loaded.model, [1, 2, 3], 4, temperature=0)) == 4
    assert model_bytes(path) < 0.6 * model_bytes(src)
    refused = make_cfg(tmp_path / "t", data={"manifest": cfg.data.manifest}, **SECTIONS)
    with pytest.raises(AssertionError, match="holds int8 weights for inference"):
        run_train(refused, 1, resume=str(path), synthetic=False)


def test_dynamic_quantization_of_a_pruned_checkpoint(pruned, source, tmp_path):
    import torch.ao.nn.quantized.dynamic as nnqd

    from moe_train.transform.quantize import quantize_checkpoint

    _, _, model, _ = source
    result = quantize_checkpoint(pruned, tmp_path / "qd", dynamic=True, eval_batches=1, log=lambda line: None)
    loaded = load_for_inference(result["path"])
    assert isinstance(loaded.model.blocks[0].attn.qkv, nnqd.Linear)
    assert loaded.model.blocks[1].mlp.experts.w1_int8_EDF.shape[0] == 4
    ref, out = _logits(model), _logits(loaded.model)
    close_T = (out - ref).abs().amax(-1) < 0.2 * ref.std()  # activations are quantized too
    assert close_T.float().mean() >= 0.9
    assert result["after"].bytes < result["before"].bytes


def test_shared_layers_untied_factorised_head_prune_and_quantize(source, tmp_path):
    """share_layers all (one MoE layer used by blocks 1 and 2: its load sums both uses), an
    untied head and factorised embeddings: pruned once, quantized once, still shared."""
    from moe_train.transform import prune_checkpoint, quantize_checkpoint

    root, cfg, _, _ = source
    shared = make_cfg(tmp_path, data={"manifest": cfg.data.manifest},
                      **{**SECTIONS, "model": {**SECTIONS["model"], "share_layers": "all", "embed_dim": 16,
                                               "tie_embeddings": False}})
    torch.manual_seed(0)
    model = MoETransformer(shared.model, shared.moe).eval()
    src = ckpt.save_model_checkpoint(tmp_path / "src", model, config_to_dict(shared), ckpt.TrainState(step=1), "t")
    pruned = prune_checkpoint(src, tmp_path / "p", keep=3, eval_batches=1, log=lambda line: None)
    assert list(pruned["kept"]) == ["blocks.1.mlp"]  # block 2 reuses it
    quantized = quantize_checkpoint(pruned["path"], tmp_path / "q", eval_batches=1, log=lambda line: None)
    m = load_for_inference(quantized["path"]).model
    assert isinstance(m.head, Int8Linear) and isinstance(m.embed_proj, Int8Linear)
    assert m.blocks[1].mlp is m.blocks[2].mlp and m.blocks[1].mlp.experts.w1_int8_EDF.shape[0] == 3
    assert abs(quantized["after"].val_loss - quantized["before"].val_loss) < 0.01
