"""Stopping on signals, and dead peers that become errors: real processes, each rank
started the way srun starts tasks (its own environment, no launcher in between), so the
behaviour under test is the trainer's own."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import free_port
import moe_train.checkpoint as ckpt
from moe_train.config import dump_config
from moe_train.data.synthetic import write_synthetic_dataset
from engine_harness import make_cfg

STEP_LINE = re.compile(r"^step\s+(\d+)/\d+ \|.*\blm (\S+)", re.M)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_dataset(str(out), [240, 240], seq_len=16, vocab_size=512, val_counts=(9,))  # ids < 512
    return str(out / "manifest.json")


def start_ranks(tmp_path, shards, world, *, steps, extra=(), env_extra=None, resume="auto"):
    cfg = make_cfg(tmp_path, data={"manifest": shards}, model={"vocab_size": 512},
                   parallel={"expert_parallel_size": world, "zero_stage": 2, "timeout_s": 20},
                   train={"max_steps": steps}, checkpoint={"every_steps": 10},
                   logging={"every_steps": 1})
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(cfg))
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **(env_extra or {}))
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "moe_train", "train", "--config", str(path),
                                       "--resume", resume, *extra], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=tmp_path))
    return procs


def wait_for_step(tmp_path, step, timeout=400):  # a fresh machine compiles a DeepSpeed op first
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = (tmp_path / "rank0.log").read_text()
        done = [int(s) for s, _ in STEP_LINE.findall(text)]
        if done and max(done) >= step:
            return max(done)
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s:\n{text[-2000:]}")


def finish(procs, timeout=300):
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append("hung")
    return codes


def test_sigusr1_on_one_rank_checkpoints_every_rank_and_exits_85(tmp_path, shards):
    """SIGUSR1 to rank 1 only (then again, during the stop): both ranks finish the step,
    write one complete checkpoint, exit 85 (requeue); --resume auto continues from it
    and no step runs twice."""
    procs = start_ranks(tmp_path, shards, 2, steps=100000)
    seen = wait_for_step(tmp_path, 15)
    procs[1].send_signal(signal.SIGUSR1)
    time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)  # a second signal must not break the save
    assert finish(procs) == [85, 85]
    log0 = (tmp_path / "rank0.log").read_text()
    stopped = int(re.search(r"stopping at step (\d+) on request", log0).group(1))
    assert stopped >= seen
    latest = ckpt.find_checkpoint(tmp_path / "ckpt", "auto")
    assert latest.name == ckpt.step_dir_name(stopped) and ckpt.is_complete(latest)
    # requeued: resume and run 5 more steps
    for rank in range(2):
        os.rename(tmp_path / f"rank{rank}.log", tmp_path / f"first{rank}.log")
    procs = start_ranks(tmp_path, shards, 2, steps=stopped + 5)
    assert finish(procs) == [0, 0]
    log0 = (tmp_path / "rank0.log").read_text()
    assert f"at step {stopped}: weights, optimizer, RNG and data position" in log0
    assert [int(s) for s, _ in STEP_LINE.findall(log0)] == list(range(stopped + 1, stopped + 6))


def test_killed_rank_makes_the_survivor_fail_with_a_report_then_resume(tmp_path, shards):
    """kill -9 of rank 1 mid-run: rank 0 exits non-zero within parallel.timeout_s (20 s)
    plus a margin, naming its rank, step and phase with a Python stack; the last
    checkpoint stays intact and --resume auto continues from it."""
    procs = start_ranks(tmp_path, shards, 2, steps=100000)
    wait_for_step(tmp_path, 25)
    killed_at = time.monotonic()
    procs[1].kill()
    code = finish(procs[:1], timeout=60)[0]
    elapsed = time.monotonic() - killed_at
    procs[1].wait()
    log0 = (tmp_path / "rank0.log").read_text()
    assert code not in (0, 85, "hung"), log0[-3000:]
    assert elapsed < 20 + 30, elapsed
    assert re.search(r"moe_train: (FAILED|HUNG) at rank 0, step \d+, in ", log0), log0[-3000:]
    assert "Traceback" in log0 or "Thread" in log0  # the Python stack
    last = ckpt.find_checkpoint(tmp_path / "ckpt", "auto")
    assert last is not None and ckpt.is_complete(last)
    step = ckpt.read_meta(last)["step"]
    procs = start_ranks(tmp_path, shards, 2, steps=step + 3)
    assert finish(procs) == [0, 0]
    assert f"at step {step}: weights, optimizer" in (tmp_path / "rank0.log").read_text()


def test_a_slow_save_outlives_the_step_budget_and_a_hang_is_still_caught_after_it(tmp_path, shards):
    """Per-phase budgets: rank 0 spends 30 s inside the step-10 save (a healthy, slow
    writer) while the step budget is 5 s (watchdog limit 20 s): the save has its own
    budget (parallel.save_timeout_s), so both ranks finish. Then rank 1 hangs in step 13:
    rank 0 is still reported within the step budget plus the margin."""
    procs = start_ranks(tmp_path, shards, 2, steps=100000, extra=("--set", "parallel.timeout_s=5"),
                        env_extra={"MOE_TRAIN_FAULT": "slow_save=30@10:0,hang@13:1"})
    wait_for_step(tmp_path, 12, timeout=400)
    log0 = (tmp_path / "rank0.log").read_text()
    assert "checkpoint step 10 ->" in log0 and "HUNG" not in log0, log0[-3000:]
    start = time.monotonic()
    code = finish(procs[:1], timeout=90)[0]
    elapsed = time.monotonic() - start
    procs[1].kill()
    procs[1].wait()
    log0, log1 = (tmp_path / "rank0.log").read_text(), (tmp_path / "rank1.log").read_text()
    assert code not in (0, 85, "hung"), log0[-3000:]
    # Both watchdogs run out at about the same time (each polls once a second): either
    # rank 0's reports the hang, or rank 1's does first and exits, and rank 0's collective
    # then fails naming its step; both within the step budget, not the save's.
    hung = r"moe_train: HUNG at rank {}, step 13, in .* \(step phase\) for \d+ s \(the step budget 5 s"
    assert (re.search(hung.format(0), log0) or (re.search(hung.format(1), log1) and re.search(
        r"moe_train: FAILED at rank 0, step 13, in ", log0))), log0[-3000:] + log1[-3000:]
    assert elapsed < 60


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_to_the_local_launcher_reaches_the_trainers_as_a_checkpoint(tmp_path, shards, launcher):
    """SIGTERM to launchers/train.sh (what a scheduler or Ctrl-C sends): the wrapper turns
    it into SIGUSR1 for the trainers only, both ranks checkpoint the same step and stop;
    the launcher is not left to kill them mid-save."""
    cfg = make_cfg(tmp_path, data={"manifest": shards}, model={"vocab_size": 512},
                   parallel={"expert_parallel_size": 2, "zero_stage": 2},
                   train={"max_steps": 100000}, logging={"every_steps": 1})
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(cfg))
    env = dict(os.environ, LAUNCHER=launcher, NPROC="2", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    log = open(tmp_path / "rank0.log", "w")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(["bash", str(repo / "launchers" / "train.sh"), "--config", str(path)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    wait_for_step(tmp_path, 10)
    proc.send_signal(signal.SIGTERM)
    code = finish([proc], timeout=120)[0]
    text = (tmp_path / "rank0.log").read_text()
    assert "[launch] SIGTERM: sending SIGUSR1 to trainers" in text
    stopped = int(re.search(r"stopping at step (\d+) on request", text).group(1))
    latest = ckpt.find_checkpoint(tmp_path / "ckpt", "auto")
    assert latest.name == ckpt.step_dir_name(stopped) and ckpt.is_complete(latest)
    assert code != "hung"
    if launcher == "deepspeed":
        assert code == 85  # the deepspeed launcher passes the trainers' exit code on
