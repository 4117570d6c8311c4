"""What users run, under faults the operating system really produces.

- Exact resume with a SHIPPED config through the public CLI (torchrun, 2 ranks): the
  harness only shortens the run and points it at data; no override of what a user runs
  (no ``logging.peak_flops``: a measured MFU peak once drew from the global RNG after the
  restore and shifted router jitter). Losses are read back with TensorBoard's reader.
- A really full disk: ``checkpoint.dir`` on a small tmpfs (``mount -t tmpfs``; the tests
  run as root, and skip saying why where mounting is not allowed). ``torch.save`` there
  raises ``RuntimeError``, not ``OSError``.
- A read-only checkpoint directory (a read-only bind mount).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_utils import free_port
from moe_train.data.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TINY_MOE = REPO / "configs" / "tiny_moe.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_faults_shards")
    # 496 samples: the synthetic generator's first token is the sample index, kept below the
    # vocabulary of 512
    write_synthetic_dataset(str(out), [120] * 4, seq_len=64, vocab_size=512, val_counts=(16,))
    return out / "manifest.json"


def cli_env() -> dict:
    """torchrun from beside this interpreter; moe_train from this checkout (the runs change
    directory, so an installed copy elsewhere must not be the one under test)."""
    bin_dir = os.path.dirname(sys.executable)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO),
                OMP_NUM_THREADS="1")


def launch(run_dir: Path, shards: Path, *, steps: int, resume: str = "auto", extra: dict | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """``moe-train launch --launcher torchrun --nproc 2`` with configs/tiny_moe.yaml: only
    the length of the run, its data and its directories are set."""
    sets = {"data.manifest": shards, "train.max_steps": steps, "checkpoint.every_steps": 10,
            "checkpoint.dir": run_dir / "ckpt", "logging.dir": run_dir / "tb", "logging.every_steps": 1,
            **(extra or {})}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "moe_train", "launch", "--launcher", "torchrun", "--nproc", "2",
           "--master-port", str(free_port()), "--", "--config", str(TINY_MOE), *args, "--resume", resume]
    return subprocess.run(cmd, env=cli_env(), cwd=run_dir, capture_output=True, text=True, timeout=timeout)


def scalars(logdir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_resume_with_a_shipped_config_repeats_the_uninterrupted_run(tmp_path, shards):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    straight.mkdir()
    out = launch(straight, shards, steps=20, resume="none")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # The resumed run starts from the straight run's step-10 checkpoint, as a user's
    # requeued job would: a copy of the directory without the later checkpoint.
    shutil.copytree(straight / "ckpt", resumed / "ckpt")
    shutil.rmtree(resumed / "ckpt" / "step_00000020")
    (resumed / "ckpt" / "latest").write_text("step_00000010\n")
    out = launch(resumed, shards, steps=20, resume="auto")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from" in out.stdout and "at step 10" in out.stdout
    for tag in ("train/lm_loss", "train/aux_loss", "moe/mean/drop_frac"):
        a, b = scalars(straight / "tb", tag), scalars(resumed / "tb", tag)
        assert sorted(b) == list(range(11, 21)), (tag, sorted(b))
        diffs = {s: abs(a[s] - b[s]) for s in b}
        assert max(diffs.values()) == 0.0, (tag, diffs)
