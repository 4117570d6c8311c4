"""Checkpoint manifests (issue 12): a deleted expert tensor, a truncated file, a flipped
byte in a weight or in an optimizer moment each make the load fail with one line naming
the file and tensor; `--resume auto` falls back to the previous good checkpoint;
`moe-train ckpt verify` needs no model; weights-only checkpoints load at any ep."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_train.checkpoint as ckpt
from moe_train.checkpoint.engine_format import load_rank_state
from moe_train.checkpoint.resume import same_layout
from moe_train.config import Config, config_to_dict
from moe_train.model.transformer import MoETransformer
from moe_train.parallel.topology import Topology

REPO = Path(__file__).resolve().parents[1]


def _model(seed=0):
    cfg = Config()
    cfg.model.vocab_size, cfg.model.d_model, cfg.model.num_layers, cfg.model.num_heads = 64, 16, 2, 2
    cfg.model.d_ff, cfg.model.max_seq_len = 32, 16
    cfg.moe.num_experts, cfg.moe.d_ff, cfg.moe.top_k = 4, 8, 2
    torch.manual_seed(seed)
    return cfg, MoETransformer(cfg.model, cfg.moe)


def _save_two(root: Path):
    """Two checkpoints (steps 1 and 2) of a tiny MoE model with AdamW moments in them."""
    cfg, model = _model()
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2):
        out = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
        out.lm_loss.backward()
        opt.step()
        ckpt.save_checkpoint(root, model=model, optimizer=opt, state=ckpt.TrainState(step=step),
                             topo=Topology(1, 1, 4), rank=0, config=config_to_dict(cfg), keep_last=3)
    return cfg, model, opt


def _flip_byte_of(path: Path, tensor: torch.Tensor) -> None:
    raw = bytearray(path.read_bytes())
    offset = raw.find(tensor.detach().contiguous().numpy().tobytes())
    assert offset >= 0
    raw[offset + 1] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.fixture()
def saved(tmp_path):
    cfg, model, opt = _save_two(tmp_path)
    return tmp_path, tmp_path / "step_00000002", cfg, model, opt


def test_manifest_lists_every_tensor_and_verifies(saved):
    root, step2, _, model, opt = saved
    meta = ckpt.read_meta(step2)
    files = meta["manifest"]["files"]
    assert set(files) == {"model_dense.pt", "experts_ep000.pt", "rank00000.pt"}
    expert_names = {n for n, p in model.named_parameters() if ".experts." in n}
    assert {f"tensors/{n}" for n in expert_names} <= set(files["experts_ep000.pt"]["tensors"])
    moments = [n for n in files["rank00000.pt"]["tensors"] if n.endswith("exp_avg_sq")]
    assert len(moments) == len(list(model.parameters()))  # every parameter's second moment
    assert ckpt.verify_checkpoint(step2) == []


def test_deleted_expert_tensor_is_named_and_auto_falls_back(saved):
    root, step2, *_ = saved
    path = step2 / "experts_ep000.pt"
    obj = torch.load(path, weights_only=True)
    victim = sorted(obj["tensors"])[0]
    del obj["tensors"][victim]
    torch.save(obj, path)
    problems = ckpt.verify_checkpoint(step2)
    assert any(f"tensor tensors/{victim} is missing" in p for p in problems), problems
    with pytest.raises(ckpt.CheckpointError, match=f"experts_ep000.pt.*tensors/{victim} is missing"):
        ckpt.find_checkpoint(root, str(step2))
    assert ckpt.find_checkpoint(root, "auto").name == "step_00000001"


def test_flipped_byte_in_a_weight_and_in_a_moment_are_named(saved):
    root, step2, _, model, opt = saved
    dense = torch.load(step2 / "model_dense.pt", weights_only=True)
    _flip_byte_of(step2 / "model_dense.pt", dense["embed.weight"])
    problems = ckpt.verify_checkpoint(step2)
    assert problems == [f"{step2}/model_dense.pt: tensor {name} is corrupted (checksum differs from the "
                        f"manifest)" for name in ("embed.weight", "head.weight")]  # tied: stored once
    rank = torch.load(step2 / "rank00000.pt", weights_only=False)
    _flip_byte_of(step2 / "rank00000.pt", rank["optimizer"]["state"][3]["exp_avg"])
    problems = ckpt.verify_checkpoint(step2)
    assert f"{step2}/rank00000.pt: tensor optimizer/state/3/exp_avg is corrupted " \
           f"(checksum differs from the manifest)" in problems
    # A load that skipped the verification still compares what it read.
    _, fresh = _model(seed=1)
    with pytest.raises(ckpt.CheckpointError, match="model_dense.pt: tensor embed.weight is corrupted"):
        ckpt.load_model_weights(step2, fresh, Topology(1, 1, 4), 0)
    assert ckpt.find_checkpoint(root, "auto").name == "step_00000001"


def test_before_a_resume_one_rank_checks_shared_files_and_each_rank_its_own(saved):
    """verify_checkpoint(checksums=False), what rank 0 runs before a training resume,
    reads no file and stats no per-rank file, so its time grows with neither the bytes
    nor the world size; the rank whose file is gone or cut finds out as it loads it."""
    root, step2, *_ = saved
    (step2 / "rank00000.pt").unlink()
    assert ckpt.verify_checkpoint(step2, checksums=False) == []
    assert any("rank00000.pt: file is missing" in p for p in ckpt.verify_checkpoint(step2))
    with pytest.raises(ckpt.CheckpointError, match=r"rank 0: checkpoint \S+: rank00000.pt is missing"):
        load_rank_state(step2, 0)
    with open(step2 / "experts_ep000.pt", "r+b") as f:  # a shared file: rank 0 sees it
        f.truncate(100)
    assert ckpt.verify_checkpoint(step2, checksums=False) == [
        f"{step2}/experts_ep000.pt: 100 bytes, the manifest says "
        f"{ckpt.read_meta(step2)['manifest']['files']['experts_ep000.pt']['bytes']} (truncated or rewritten)"]


def test_ckpt_verify_command(saved):
    root, step2, *_ = saved
    cmd = [sys.executable, "-m", "moe_train", "ckpt", "verify"]
    ok = subprocess.run(cmd + [str(root)], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("OK ") == 2 and "tensors match the manifest" in ok.stdout
    with open(step2 / "experts_ep000.pt", "r+b") as f:
        f.truncate(100)
    bad = subprocess.run(cmd + [str(step2)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 3
    assert "FAILED" in bad.stdout and "experts_ep000.pt: 100 bytes, the manifest says" in bad.stdout


def test_weights_only_checkpoint_loads_at_another_ep(tmp_path):
    cfg, model = _model()
    path = ckpt.save_model_checkpoint(tmp_path, model, config_to_dict(cfg),
                                      ckpt.TrainState(step=7, tokens_seen=100), origin="test")
    meta = ckpt.read_meta(path)
    assert meta["weights_only"] and meta["origin"] == "test" and ckpt.verify_checkpoint(path) == []
    assert ckpt.find_checkpoint(tmp_path, "auto") == path
    _, fresh = _model(seed=1)
    ckpt.load_model_weights(path, fresh, Topology(1, 1, 4), 0)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert not same_layout(meta, Topology(1, 1, 4), config_to_dict(cfg))


def test_resume_check_benchmark_runs_and_both_checks_choose_the_checkpoint():
    from benchmarks.resume_check import main as resume_check

    rows = resume_check(["--ranks", "2", "4", "--file-kib", "4"])["rows"]
    assert [r["rank_files"] for r in rows] == [2, 4]
    assert all(r["full_crc_s"] > 0 and r["sizes_only_s"] > 0 for r in rows)
