"""Checkpoints: exact resume with the data position, atomic saves, refusals that name
the values, resume on another layout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_harness import make_cfg, run_train
import moe_train.checkpoint as ckpt
from moe_train.data.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_dataset(str(out), [40, 37, 51, 29], seq_len=16, vocab_size=512, val_counts=(9,))  # ids 0..157 in tokens 0-1
    return str(out / "manifest.json")


def _cfg(tmp, shards, **extra):
    sections = {"data": {"manifest": shards}, "moe": {"jitter_eps": 0.01}, "model": {"vocab_size": 512},
                "parallel": {"expert_parallel_size": 2, "zero_stage": 2},
                "train": {"max_steps": 20}, "checkpoint": {"every_steps": 5}}
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return make_cfg(tmp, **sections)


def test_resume_is_exact_same_losses_and_batches(tmp_path, shards):
    """20 steps straight == 10 steps, stop (as on a signal), --resume auto, 10 more:
    identical losses for steps 11..20 and the same input ids on every rank (streaming
    loader over real shards, router jitter on, so RNG and data position both matter)."""
    straight = run_train(_cfg(tmp_path / "a", shards), 2, synthetic=False)
    first = run_train(_cfg(tmp_path / "b", shards), 2, synthetic=False, fault="stop@10:1")
    assert first[0].stopped and first[0].final_step == 10
    assert ckpt.find_checkpoint(tmp_path / "b" / "ckpt", "auto").name == "step_00000010"
    second = run_train(_cfg(tmp_path / "b", shards), 2, synthetic=False, resume="auto")
    assert sorted(second[0].losses) == list(range(11, 21))
    for rank in range(2):
        for step in range(11, 21):
            assert second[rank].batch_digests[step] == straight[rank].batch_digests[step], (rank, step)
            assert second[rank].losses[step] == straight[rank].losses[step], (rank, step)
    assert straight[0].losses[20] < straight[0].losses[1] - 0.1  # it trains


def test_resume_on_another_layout_loads_experts_by_global_id(tmp_path, shards):
    """Saved at (world 2, ep 2) with no canonical checkpoint, resumed at (world 1, ep 1)
    with checkpoint.fresh_optimizer_on_new_layout (without it the resume is refused:
    test_reshard.py): every expert lands at its global id; the optimizer restarts
    (warned), the step and tokens continue."""
    cfg = _cfg(tmp_path, shards, train={"max_steps": 5})
    (saved,) = run_train(cfg, 2, synthetic=False, keep_state=True)[:1]
    other = _cfg(tmp_path, shards, train={"max_steps": 5}, parallel={"expert_parallel_size": 1},
                 checkpoint={"fresh_optimizer_on_new_layout": True})
    (loaded,) = run_train(other, 1, synthetic=False, keep_state=True, resume="auto")
    assert loaded.final_step == 5 and loaded.losses == {}  # nothing left to train
    rank1 = run_train(cfg, 2, synthetic=False, keep_state=True, resume="auto")[1]
    for name, value in loaded.state.items():
        if ".experts." in name:
            assert torch.equal(value[:2], saved.state[name]), name
            assert torch.equal(value[2:], rank1.state[name]), name
        else:
            assert torch.equal(value, saved.state[name]), name


def test_incompatible_config_is_refused_naming_both_values(tmp_path, shards):
    one = {"expert_parallel_size": 1}
    run_train(_cfg(tmp_path, shards, train={"max_steps": 2}, parallel=one), 1, synthetic=False)
    bad = _cfg(tmp_path, shards, train={"max_steps": 4}, moe={"num_experts": 8}, parallel=one)
    with pytest.raises(AssertionError, match=r"moe.num_experts = 4, this run has moe.num_experts = 8"):
        run_train(bad, 1, synthetic=False, resume="auto")


def test_writer_killed_mid_save_is_skipped_by_resume_auto(tmp_path, shards):
    """The process dies inside the step-10 save (after writing its files, before the
    rename): step 5 stays latest and complete; --resume auto continues from it."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg = _cfg(tmp_path, shards, parallel={"expert_parallel_size": 1}, train={"max_steps": 12})
    from moe_train.config import dump_config
    cfg_path.write_text(dump_config(cfg))
    env = dict(os.environ, MOE_TRAIN_FAULT="kill_in_save@10:0", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "moe_train", "train", "--config", str(cfg_path)]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert killed.returncode == 137, killed.stderr[-2000:]
    root = tmp_path / "ckpt"
    assert (root / ".tmp_step_00000010").is_dir() and not (root / "step_00000010").exists()
    assert ckpt.find_checkpoint(root, "auto").name == "step_00000005"
    listing = subprocess.run([sys.executable, "-m", "moe_train", "ckpt", "--dir", str(root)],
                             capture_output=True, text=True, timeout=60)
    assert "INCOMPLETE" in listing.stdout and "complete, latest" in listing.stdout
    env.pop("MOE_TRAIN_FAULT")
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step_00000005 at step 5" in resumed.stdout
    assert ckpt.find_checkpoint(root, "auto").name == "step_00000012"


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """Disk full while writing: CheckpointError names the rank, the file and the
    previous checkpoint; nothing is published; latest and step 1 stay intact."""
    from moe_train.parallel.topology import Topology

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    topo = Topology(1, 1, 1)
    kwargs = dict(model=model, optimizer=opt, topo=topo, rank=0, config={}, keep_last=2)
    ckpt.save_checkpoint(tmp_path, state=ckpt.TrainState(step=1), **kwargs)
    import moe_train.checkpoint.manifest as manifest

    real_write = manifest.write_torch  # what every checkpoint file goes through

    def full_disk(path, obj):  # injected; tests/test_real_faults.py fills a real tmpfs
        if path.name.startswith("rank"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 998: "
                               "No space left on device")  # torch.save's type, not OSError
        return real_write(path, obj)

    monkeypatch.setattr(manifest, "write_torch", full_disk)
    with pytest.raises(ckpt.CheckpointError, match=r"step 2 failed: rank 0: writing \S+/rank00000.pt failed: "
                                                   r"RuntimeError: .*No space left.*"
                                                   r"previous checkpoint \(step_00000001\) is intact"):
        ckpt.save_checkpoint(tmp_path, state=ckpt.TrainState(step=2), **kwargs)
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    assert ckpt.is_complete(tmp_path / "step_00000001")
    assert not (tmp_path / ".tmp_step_00000002").exists() and not (tmp_path / "step_00000002").exists()


def test_truncated_file_makes_a_checkpoint_incomplete_and_keep_last_prunes(tmp_path):
    from moe_train.parallel.topology import Topology

    model = torch.nn.Linear(3, 2)
    kwargs = dict(model=model, optimizer=torch.optim.AdamW(model.parameters()), topo=Topology(1, 1, 1),
                  rank=0, config={}, keep_last=2)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, state=ckpt.TrainState(step=step), **kwargs)
    assert [p.name for p, _, ok in ckpt.list_checkpoints(tmp_path) if ok] == ["step_00000002", "step_00000003"]
    with open(tmp_path / "step_00000003" / "model_dense.pt", "r+b") as f:
        f.truncate(10)
    assert ckpt.find_checkpoint(tmp_path, "auto").name == "step_00000002"
    with pytest.raises(ckpt.CheckpointError, match=r"model_dense.pt: 10 bytes, the manifest says \d+ \(truncated"):
        ckpt.find_checkpoint(tmp_path, str(tmp_path / "step_00000003"))
    meta = json.loads((tmp_path / "step_00000002" / "meta.json").read_text())
    assert meta["step"] == 2 and "model_dense.pt" in meta["files"] and meta["versions"]["torch"]
