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
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import free_port
from moe_train.checkpoint import verify_checkpoint
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
    from moe_train.train.metrics.writer import event_dir

    acc = EventAccumulator(event_dir(logdir), size_guidance={"scalars": 0})
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


# ------------------------------------------------------------- full and read-only disks


@pytest.fixture
def mounted(tmp_path):
    """``mount(options)`` -> a directory with that mount (tmpfs ``size=6m``, or a read-only
    bind of an empty directory); unmounted afterwards. Skips, saying why, where this
    process may not mount (not root, or a container without CAP_SYS_ADMIN)."""
    points = []

    def mount(kind: str, size: str = "6m") -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        if kind == "tmpfs":
            cmds = [["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)]]
        else:
            source = tmp_path / f"ro_source{len(points)}"
            source.mkdir()
            cmds = [["mount", "--bind", str(source), str(point)],
                    ["mount", "-o", "remount,bind,ro", str(point)]]
        for cmd in cmds:
            try:
                out = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as err:
                pytest.skip(f"cannot run mount here ({err}): real-fault test not run")
            if out.returncode != 0:
                if cmd is not cmds[0]:
                    subprocess.run(["umount", str(point)])
                pytest.skip(f"`{' '.join(cmd)}` is not allowed here ({out.stderr.strip()}): real-fault "
                            f"test not run")
        points.append(point)
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)])


def run_ranks(run_dir: Path, shards: Path, ckpt_dir: Path, *, steps: int, world: int = 2,
              timeout: float = 600) -> list[tuple[int, str]]:
    """configs/tiny_moe.yaml on ``world`` ranks started as srun starts tasks (the exit code
    of each rank is the trainer's own): (exit code, output) per rank."""
    sets = {"data.manifest": shards, "train.max_steps": steps, "checkpoint.every_steps": 5,
            "checkpoint.dir": ckpt_dir, "logging.dir": run_dir / "tb"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    port, procs = free_port(), []
    for rank in range(world):
        env = dict(cli_env(), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "moe_train", "train", "--config", str(TINY_MOE),
                                       *args], env=env, cwd=run_dir, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout), p.stdout.read()) for p in procs]


def test_full_disk_fails_saves_alone_then_stops_naming_the_last_good_checkpoint(tmp_path, shards, mounted):
    """6 MiB of tmpfs holds one 4.5 MB checkpoint of tiny_moe on 2 ranks, not two: the
    step-5 save succeeds, those of steps 10, 15 and 20 hit ENOSPC (torch.save raises
    RuntimeError there). Each failure is reported and training goes on; the third in a
    row (checkpoint.max_failed_saves, default 3) stops the run."""
    disk = mounted("tmpfs", "6m")
    ckpt_dir = disk / "ckpt"
    results = run_ranks(tmp_path, shards, ckpt_dir, steps=30)
    out = results[0][1]
    assert [code for code, _ in results] == [3, 3], out[-4000:]
    assert "checkpoint step 5 ->" in out
    failure = re.search(r"ERROR: checkpoint save at step 10 failed: rank (\d): writing (\S+) failed: (\w+)", out)
    assert failure, out[-4000:]
    assert "/.tmp_step_00000010/" in failure.group(2) and failure.group(2).endswith(".pt")
    assert "WARNING: training goes on without the checkpoint of step 10" in out
    assert re.search(r"^step 15/30 \|", out, re.M) and re.search(r"^step 20/30 \|", out, re.M)
    assert not re.search(r"^step 21/30", out, re.M)
    assert (f"3 checkpoint saves in a row failed (checkpoint.max_failed_saves = 3); stopping at step 20 "
            f"rather than training on without checkpoints; the last good checkpoint is "
            f"{ckpt_dir / 'step_00000005'}") in out
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step_00000005"]  # no half-written step
    assert verify_checkpoint(ckpt_dir / "step_00000005") == []


def test_read_only_checkpoint_dir_fails_every_save_and_the_final_one_ends_the_run(tmp_path, shards, mounted):
    ckpt_dir = mounted("read-only") / "ckpt"
    results = run_ranks(tmp_path, shards, ckpt_dir, steps=10)
    out = results[0][1]
    assert [code for code, _ in results] == [3, 3], out[-4000:]
    assert "ERROR: checkpoint save at step 5 failed: rank 0: cannot create" in out
    assert "Read-only file system" in out
    assert "WARNING: training goes on without the checkpoint of step 5" in out
    assert re.search(r"^step 10/10 \|", out, re.M)
    assert "the FINAL checkpoint (step 10) failed, so the last steps are not saved; the last good " \
           f"checkpoint is none (no {ckpt_dir / 'latest'})" in out


def test_a_tensor_corrupted_in_one_ranks_file_is_caught_by_that_rank_and_auto_resumes_older(tmp_path, shards):
    """Rank 0 checks only presence and sizes before a resume (reading every rank's files
    would cost it the whole checkpoint while all others wait); each rank checks the
    tensors it loads. A flipped bit in rank 1's optimizer file (same size) is caught by
    rank 1, every rank agrees, and --resume auto falls back to the previous checkpoint."""
    ckpt_dir = tmp_path / "ckpt"
    results = run_ranks(tmp_path, shards, ckpt_dir, steps=10)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:]
    victim = ckpt_dir / "step_00000010" / "rank00001.pt"
    moment = torch.load(victim, weights_only=False)["optimizer"]["base_optimizer_state"]["state"][0]["exp_avg"]
    raw = bytearray(victim.read_bytes())
    offset = raw.find(moment.contiguous().numpy().tobytes())
    assert offset >= 0
    raw[offset + 1] ^= 0x10
    victim.write_bytes(bytes(raw))
    assert verify_checkpoint(ckpt_dir / "step_00000010", checksums=False) == []  # sizes alone pass
    results = run_ranks(tmp_path, shards, ckpt_dir, steps=12)
    out = results[0][1]
    assert [code for code, _ in results] == [0, 0], out[-3000:]
    assert re.search(rf"WARNING: --resume auto: skipping {ckpt_dir / 'step_00000010'}: rank 1: checkpoint "
                     rf"\S+/rank00001.pt: tensor optimizer/base_optimizer_state/state/0/exp_avg is corrupted",
                     out), out[-3000:]
    assert f"resumed from {ckpt_dir / 'step_00000005'} at step 5" in out
