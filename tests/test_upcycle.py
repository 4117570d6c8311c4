"""Sparse upcycling (moe_train/transform/upcycle.py; MOE_REFERENCE.md "Upcycling", parity invariant
8): in exact mode the upcycled logits equal the dense logits at step 0 (fp32, 1e-5) at
ep 1 and ep 2, the router's LM-loss gradient at step 0 is zero, and the checkpoint
resumes through ``train`` with a fresh optimizer and the dense run's data position."""

import io
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from engine_harness import GlobalBatchLoader, make_cfg, run_train
import moe_train.checkpoint as ckpt
from moe_train.config import config_to_dict, load_config
from moe_train.inference import load_for_inference
from moe_train.model.transformer import MoETransformer
from moe_train.transform.upcycle import upcycle_checkpoint

EXACT = ["moe.normalize_topk=true", "moe.capacity_factor=null", "moe.eval_capacity_factor=null"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_checkpoint(tmp: Path, activation: str = "swiglu") -> Path:
    """An untrained dense model (init_std 0.2, so its MLPs weigh in the logits), saved
    weights-only as a training run would leave it."""
    cfg = make_cfg(tmp, model={"moe_every": 0, "mlp_activation": activation, "init_std": 0.2},
                   moe={"activation": activation})
    torch.manual_seed(0)
    model = MoETransformer(cfg.model, cfg.moe)
    return ckpt.save_model_checkpoint(tmp / "dense", model, config_to_dict(cfg),
                                      ckpt.TrainState(step=3, tokens_seen=192), "test")


def batch(vocab: int = 128, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(seed))


def logits(path) -> torch.Tensor:
    with torch.no_grad():
        return load_for_inference(path).model(batch()).logits_BSV


CASES = {  # name: (dense activation, overrides)
    "swiglu_top2": ("swiglu", ["moe.num_experts=4", "moe.top_k=2", "moe.d_ff=64"]),
    "gelu_top1": ("gelu", ["moe.num_experts=4", "moe.top_k=1", "moe.d_ff=64", "moe.activation=gelu"]),
    "granular2_top2_shared": ("swiglu", ["moe.num_experts=4", "moe.top_k=2", "moe.d_ff=32",
                                         "moe.shared_d_ff=16", "moe.shared_gate=sigmoid"]),
    "granular4_top4_sigmoid": ("gelu", ["moe.num_experts=8", "moe.top_k=4", "moe.d_ff=16",
                                        "moe.activation=gelu", "moe.score_func=sigmoid"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_exact_logits_ep1(tmp_path, name):
    """Upcycled == dense logits (fp32, 1e-5) in one process, for plain, top-1, granular
    (G_u 2 and 4) and shared-expert upcycling; the MoE blocks' MLP is not negligible."""
    activation, overrides = CASES[name]
    dense = dense_checkpoint(tmp_path, activation)
    report = upcycle_checkpoint(dense, tmp_path / "up", ["model.moe_every=2", *EXACT, *overrides])
    assert report.exact and report.max_logit_diff < 1e-5
    assert report.granularity == 64 // int(overrides[2].split("=")[1])
    assert report.params_after > report.params_before
    ref, up = logits(dense), logits(report.path)
    assert (up - ref).abs().max() < 1e-5
    loaded = load_for_inference(dense)
    with torch.no_grad():
        loaded.model.blocks[1].mlp.down.weight.zero_()
        without_mlp = loaded.model(batch()).logits_BSV
    assert (without_mlp - ref).abs().max() > 1e-2  # the copied MLP matters
    meta = ckpt.read_meta(report.path)
    assert meta["weights_only"] and meta["step"] == 0 and meta["tokens_seen"] == 192
    assert load_config(report.config_path).checkpoint.dir == str(tmp_path / "up")


def router_lm_grad(path) -> torch.Tensor:
    model = load_for_inference(path).model.train()
    ids = batch()
    model(ids[:, :-1], ids[:, 1:]).lm_loss.backward()
    return model.blocks[1].mlp.router.w_DE.grad


def test_router_lm_gradient_is_zero_in_exact_mode(tmp_path):
    """G_u = 1: the output is MLP(x) times the sum of the gates (= 1), so the LM loss does
    not depend on the router at step 0; without normalize_topk it does. (G_u > 1 is exact
    in the logits but its shards differ, so there the gradient is not zero.)"""
    dense = dense_checkpoint(tmp_path)
    base = ["model.moe_every=2", "moe.num_experts=4", "moe.top_k=2", "moe.d_ff=64",
            "moe.capacity_factor=null", "moe.eval_capacity_factor=null"]
    exact = upcycle_checkpoint(dense, tmp_path / "exact", base + ["moe.normalize_topk=true"])
    inexact = upcycle_checkpoint(dense, tmp_path / "inexact", base + ["moe.normalize_topk=false"],
                                 allow_inexact=True)
    assert not inexact.exact and "moe.normalize_topk" in inexact.inexact[0]
    granular = upcycle_checkpoint(dense, tmp_path / "granular", ["model.moe_every=2", "moe.num_experts=4",
                                                                  "moe.top_k=2", "moe.d_ff=32", *EXACT])
    assert granular.exact and granular.granularity == 2
    g_exact, g_inexact = router_lm_grad(exact.path), router_lm_grad(inexact.path)
    assert g_inexact.abs().max() > 1e-3
    assert g_exact.abs().max() < 1e-6 * max(1.0, float(g_inexact.abs().max()))
    assert router_lm_grad(granular.path).abs().max() > 1e-3  # as documented


def test_refusals_name_the_key(tmp_path):
    dense = dense_checkpoint(tmp_path)
    up = ["model.moe_every=2", "moe.d_ff=64"]
    cases = [
        (up + EXACT + ["model.d_model=64"], r"model\.d_model: 32 -> 64"),
        (up + ["moe.top_k=1"], r"moe\.normalize_topk.*moe\.capacity_factor = 1\.25.*--allow-inexact"),
        (up + EXACT + ["moe.activation=gelu"], r"moe\.activation = 'gelu'.*model\.mlp_activation = 'swiglu'"),
        (up + EXACT + ["moe.d_ff=48"], r"moe\.d_ff = 48"),
        (up + EXACT + ["moe.d_ff=32", "moe.num_experts=3", "moe.top_k=2"], r"moe\.num_experts = 3"),
        (EXACT, r"makes no MoE block"),
        (up + EXACT + ["checkpoint.dir=/elsewhere"], r"checkpoint\.dir"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            upcycle_checkpoint(dense, tmp_path / "out", overrides)
    assert not (tmp_path / "out").exists()  # nothing written by a refusal
    done = upcycle_checkpoint(dense, tmp_path / "up", up + EXACT)
    with pytest.raises(ValueError, match="already has 1 MoE blocks"):
        upcycle_checkpoint(done.path, tmp_path / "again", up + EXACT)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        upcycle_checkpoint(dense, tmp_path / "up", up + EXACT)
    data = (dense / "model_dense.pt").read_bytes()  # a corrupted dense checkpoint: refused
    (dense / "model_dense.pt").write_bytes(data[:-64] + bytes(64))
    with pytest.raises(ckpt.CheckpointError, match="model_dense.pt"):
        upcycle_checkpoint(dense, tmp_path / "bad", up + EXACT)
    from moe_train.cli import main  # the command: one error line, exit 2
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["upcycle", "--checkpoint", str(tmp_path / "up"), "--out", str(tmp_path / "cli"),
                     "--set", "model.moe_every=2"])
    assert code == 2 and err.getvalue().count("\n") == 1 and "upcycle: error:" in err.getvalue()


# ----------------------------------------------------------- ep 2 and the engine


def _ep2_worker(rank, world, dense, upcycled, granular):
    """Logits of the upcycled checkpoints on an ep-2 model == the dense logits; then
    ``train`` resumes the first one on 2 ranks (ep 2) from the dense data position."""
    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.topology import Topology
    from moe_train.train import train
    import os

    diffs = []
    ref = load_for_inference(dense).model
    for path in (upcycled, granular):
        cfg = load_config(Path(path).parent / "config.yaml")
        groups = build_groups(Topology(world, 2, cfg.moe.num_experts), rank)
        model = MoETransformer(cfg.model, cfg.moe, ep_group=groups.ep).eval()
        ckpt.load_model_weights(Path(path), model, groups.topology, rank)
        ids = batch(seed=10 + rank)  # each rank its own tokens: the all-to-all carries both
        with torch.no_grad():
            diffs.append(float((model(ids).logits_BSV - ref(ids).logits_BSV).abs().max()))
    dist.barrier()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = load_config(Path(upcycled).parent / "config.yaml")

    def loaders(r, w):
        return GlobalBatchLoader(r, w, cfg.data.micro_batch_size, 1, cfg.data.seq_len, cfg.model.vocab_size), None
    result = train(cfg, resume=str(upcycled), loaders=loaders)
    return diffs, result.losses, result.checkpoint


def test_ep2_exact_and_resume_through_train(tmp_path):
    """A dense run (2 ranks, ep 2) checkpoints at step 4 and runs on to 6. Its step-4
    checkpoint, upcycled (G_u 1 and 2), gives the dense logits on an ep-2 model, and
    ``train --resume`` on 2 ranks starts at step 0 with a fresh optimizer: its first loss
    is the dense run's step-5 loss (same batch, same function), and tokens seen continue."""
    dense_cfg = make_cfg(tmp_path / "dense", model={"moe_every": 0, "mlp_activation": "swiglu"},
                         parallel={"expert_parallel_size": 2}, train={"max_steps": 6},
                         checkpoint={"every_steps": 4, "keep_last": 5})
    dense_run = run_train(dense_cfg, 2)[0]  # a dense model at ep 2: the engine must not need experts
    dense = Path(dense_cfg.checkpoint.dir) / "step_00000004"
    common = ["model.moe_every=2", "moe.num_experts=4", "moe.top_k=2", *EXACT, "train.max_steps=2"]
    up = upcycle_checkpoint(dense, tmp_path / "up", common + ["moe.d_ff=64"])
    gran = upcycle_checkpoint(dense, tmp_path / "gran", common + ["moe.d_ff=32"])
    assert up.exact and gran.exact and gran.granularity == 2
    results = run_ranks(_ep2_worker, 2, timeout_s=240, dense=str(dense), upcycled=str(up.path),
                        granular=str(gran.path))
    for diffs, losses, saved in results:
        assert max(diffs) < 1e-5, diffs
        assert sorted(losses) == [1, 2]
        assert abs(losses[1] - dense_run.losses[5]) < 1e-5, (losses[1], dense_run.losses[5])
    meta = ckpt.read_meta(Path(results[0][2]))
    assert meta["step"] == 2 and meta["tokens_seen"] == 6 * 2 * 4 * 16  # 4 dense steps + 2 upcycled
