"""Slurm, for real: a two-node cluster on this machine (tests/slurm/cluster.sh: slurmctld
and two slurmd's, installed from Debian's packages when missing), the project's own sbatch
templates and launchers, CPU ranks (gloo), the tiny MoE config at world 4, ep 2.

* the multi-node template trains to the end: 2 nodes x 2 tasks, ranks from Slurm;
* preemption: SIGUSR1 to the batch shell -> every rank checkpoints -> exit 85 -> the job
  requeues itself -> resumes -> finishes, with no step run twice and the losses after the
  resume equal to the uninterrupted run's;
* launchers/slurm_torchrun.sh trains the same model to the same losses;
* the signal / exit-code / requeue plumbing with a stand-in trainer (no torch; seconds):
  requeue and resume, a failing rank's exit code, a plain scancel, the 1-node template.

Needs root (the daemons) and, the first time, apt (the packages); otherwise every test
here is skipped with the reason. About 2.5 minutes on 2 cores once installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import moe_train.checkpoint as ckpt
from moe_train.data.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
FAKE_TRAINER = REPO / "tests" / "slurm" / "fake_trainer.py"
SLURM_DIR = os.environ.get("MOE_TRAIN_SLURM_DIR", "/tmp/moe_train_slurm")
STEPS = 60
STEP_LINE = re.compile(r"^step\s+(\d+)/(\d+) \|.*?\blm (\S+)", re.M)
RESUMED = re.compile(r"^resumed from (\S+) at step (\d+)", re.M)
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "BOOT_FAIL", "DEADLINE"}
# 2 nodes x 2 tasks, 1 CPU each, on the cluster's stand-in GPUs (gres backed by /dev/null).
MULTINODE = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=15"]


# ---------------------------------------------------------------------------- cluster


@pytest.fixture(scope="module")
def slurm():
    """Starts the cluster (unless it is already up); stops it afterwards if it started it.
    Returns the environment for Slurm commands and jobs."""
    if os.geteuid() != 0:
        reason = "test_slurm: not root; tests/slurm/cluster.sh runs the Slurm daemons as root"
        print(reason)
        pytest.skip(reason)
    env = dict(os.environ, SLURM_CONF=f"{SLURM_DIR}/slurm.conf", OMP_NUM_THREADS="1",
               # the jobs' `python` is this interpreter (sbatch passes PATH on)
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    was_up = subprocess.run(["bash", str(CLUSTER), "status"], env=env, capture_output=True,
                            stdin=subprocess.DEVNULL).returncode == 0
    t0 = time.monotonic()
    start = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=900)
    print(f"cluster.sh start ({time.monotonic() - t0:.1f} s): {start.stderr.strip()}")
    if start.returncode == 3:  # Slurm missing and not installable here (no apt, ...)
        reason = f"test_slurm: Slurm is not installed and cannot be: {start.stderr.strip()}"
        print(reason)
        pytest.skip(reason)
    assert start.returncode == 0, f"tests/slurm/cluster.sh start failed:\n{start.stdout}\n{start.stderr}"
    jobs: list[str] = []
    yield {"env": env, "jobs": jobs}
    for job in jobs:  # a test that failed midway leaves no job behind
        subprocess.run(["scancel", job], env=env, capture_output=True)
    if not was_up:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


def sbatch(slurm, options, script_and_args, env_extra=None) -> str:
    env = dict(slurm["env"], **(env_extra or {}))
    out = subprocess.run(["sbatch", "--parsable", *options, *script_and_args], env=env, cwd=REPO,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert out.returncode == 0, f"sbatch failed: {out.stderr}"
    job = out.stdout.strip().split(";")[0]
    slurm["jobs"].append(job)
    return job


def job_info(slurm, job) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm["env"], capture_output=True,
                         text=True, timeout=30).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_job(slurm, job, log: Path, timeout=240) -> dict:
    """Polls `scontrol show job` (no sacct without slurmdbd; `sbatch --wait` backs off
    to long sleeps) until the job is done, requeues included."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(slurm, job)
        if info.get("JobState") in DONE_STATES:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=slurm["env"], capture_output=True)
    raise AssertionError(f"job {job} not done within {timeout} s ({job_info(slurm, job).get('JobState')}); "
                         f"log:\n{read(log)[-4000:]}")


def wait_for_log(slurm, job, log: Path, pattern: str, timeout=180) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, read(log), re.M)
        if m:
            return m
        if job_info(slurm, job).get("JobState") in DONE_STATES:
            break
        time.sleep(0.1)
    raise AssertionError(f"job {job}: /{pattern}/ not in the log; log:\n{read(log)[-4000:]}")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def steps_logged(text: str) -> list[tuple[int, str]]:
    return [(int(s), lm) for s, _, lm in STEP_LINE.findall(text)]


# ------------------------------------------------------------------ the real trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm_shards")
    # 488 samples in all: the synthetic generator's first token is the sample index, so
    # ids stay below the tiny model's vocabulary of 512.
    write_synthetic_dataset(str(out), [120] * 4, seq_len=64, vocab_size=512, val_counts=(8,))
    return out / "manifest.json"


def train_args(shards: Path, run_dir: Path, steps=STEPS) -> list[str]:
    sets = {"data.manifest": shards, "parallel.device": "cpu", "train.max_steps": steps,
            "train.eval_every": 0, "checkpoint.every_steps": 0, "checkpoint.dir": run_dir / "ckpt",
            "logging.dir": run_dir / "tb", "logging.every_steps": 1}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def final_step(run_dir: Path) -> int:
    path = ckpt.find_checkpoint(run_dir / "ckpt", "auto")
    assert path is not None, f"no complete checkpoint under {run_dir / 'ckpt'}"
    return ckpt.read_meta(path)["train_state"]["step"]


@pytest.fixture(scope="module")
def uninterrupted(slurm, shards, tmp_path_factory):
    """slurm/train_multinode.sbatch, 2 nodes x 2 tasks, STEPS steps, no interruption."""
    run = tmp_path_factory.mktemp("slurm_uninterrupted")
    log = run / "job.out"
    t0 = time.monotonic()
    job = sbatch(slurm, [*MULTINODE, f"--output={log}"],
                 ["slurm/train_multinode.sbatch", "configs/tiny_moe.yaml", *train_args(shards, run)])
    info = wait_job(slurm, job, log)
    print(f"uninterrupted job {job}: {info['JobState']} in {time.monotonic() - t0:.1f} s")
    return {"job": job, "info": info, "log": read(log), "run": run}


def test_multinode_template_trains_on_two_nodes(uninterrupted):
    info, text = uninterrupted["info"], uninterrupted["log"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    job = uninterrupted["job"]
    # srun -v says where the tasks ran; the trainer says where its ranks came from.
    assert re.search(rf"launching StepId={job}\.0 on host n1, 2 tasks: \[0-1\]", text), text[-4000:]
    assert re.search(rf"launching StepId={job}\.0 on host n2, 2 tasks: \[2-3\]", text), text[-4000:]
    assert re.search(r"\bworld 4\b", text) and "ranks from the slurm environment" in text, text[:4000]
    assert f"MASTER_ADDR=n1 MASTER_PORT={20000 + int(job) % 20000}" in text
    assert "SLURM_RESTART_COUNT=0" in text and "SLURM_RESTART_COUNT=1" not in text
    assert [s for s, _ in steps_logged(text)] == list(range(1, STEPS + 1))
    assert final_step(uninterrupted["run"]) == STEPS


def test_preemption_checkpoints_requeues_and_resumes_exactly(slurm, shards, uninterrupted, tmp_path):
    log = tmp_path / "job.out"
    t0 = time.monotonic()
    job = sbatch(slurm, [*MULTINODE, f"--output={log}"],
                 ["slurm/train_multinode.sbatch", "configs/tiny_moe.yaml", *train_args(shards, tmp_path)])
    wait_for_log(slurm, job, log, rf"^step\s+5/{STEPS} ")   # training is under way
    # What `#SBATCH --signal=B:USR1@120` does before the time limit, now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm["env"], check=True, timeout=30)
    info = wait_job(slurm, job, log)
    text = read(log)
    print(f"preempted job {job}: {info['JobState']} in {time.monotonic() - t0:.1f} s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert info["Restarts"] == "1" and "SLURM_RESTART_COUNT=1" in text, text[-4000:]
    first, second = text.split("SLURM_RESTART_COUNT=1", 1)
    # The first run: signal relayed, every rank stopped, one checkpoint, exit 85, requeued.
    assert "SIGUSR1 to the batch shell: relaying SIGUSR1 to srun" in first
    assert "checkpoint written, exit 85" in first and f"requeued job {job}" in first, first[-4000:]
    assert len(re.findall(r"Exited with exit code 85", first)) >= 1, first[-4000:]
    stopped = [s for s, _ in steps_logged(first)][-1]
    assert 5 <= stopped < STEPS
    assert re.search(rf"^checkpoint step {stopped} -> ", first, re.M), first[-4000:]
    # The second run resumed from it, and went on from the next step.
    resumed = RESUMED.search(second)
    assert resumed and int(resumed.group(2)) == stopped, second[:4000]
    after = steps_logged(second)
    assert [s for s, _ in after] == list(range(stopped + 1, STEPS + 1))
    assert [s for s, _ in steps_logged(text)] == list(range(1, STEPS + 1))   # no step twice
    assert final_step(tmp_path) == STEPS
    # Same losses as the run that was never interrupted, before and after the requeue.
    reference = dict(steps_logged(uninterrupted["log"]))
    assert dict(steps_logged(text)) == reference


def test_torchrun_launcher_trains_the_same(slurm, shards, uninterrupted, tmp_path):
    log = tmp_path / "job.out"
    command = " ".join(["bash", "launchers/slurm_torchrun.sh", "--config", "configs/tiny_moe.yaml",
                        *train_args(shards, tmp_path)])
    job = sbatch(slurm, [*MULTINODE, f"--output={log}", f"--wrap={command}"], [])
    info = wait_job(slurm, job, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert re.search(r"srun -v --nodes=2 --ntasks=2 --ntasks-per-node=1 .*-m torch\.distributed\.run "
                     r"--nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d "
                     rf"--rdzv-endpoint=n1:{20000 + int(job) % 20000} --rdzv-id={job}", text), text[:3000]
    assert "ranks from the torchrun environment" in text and re.search(r"\bworld 4\b", text)
    assert dict(steps_logged(text)) == dict(steps_logged(uninterrupted["log"]))
    assert final_step(tmp_path) == STEPS


# ------------------------------------------------- the plumbing, with a stand-in trainer


def fake_env(state: Path, steps=30, **extra) -> dict:
    state.mkdir(parents=True, exist_ok=True)
    return {"MOE_TRAIN_PYTHON": f"{sys.executable} {FAKE_TRAINER}", "FAKE_DIR": str(state),
            "FAKE_STEPS": str(steps), "FAKE_STEP_S": "0.2", **extra}


def test_plumbing_usr1_requeues_and_resumes(slurm, tmp_path):
    log = tmp_path / "job.out"
    job = sbatch(slurm, [*MULTINODE, f"--output={log}"],
                 ["slurm/train_multinode.sbatch", "configs/tiny_moe.yaml", "--set", "a.b=c"],
                 env_extra=fake_env(tmp_path / "state"))
    wait_for_log(slurm, job, log, r"^\[fake rank 0\] step 3/30$")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm["env"], check=True)
    info = wait_job(slurm, job, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-3000:])
    first, second = text.split("SLURM_RESTART_COUNT=1", 1)
    # every task got SIGUSR1 from srun (not SIGTERM, not SIGKILL) and exited 85
    assert sorted(re.findall(r"\[fake rank (\d)\] got SIGUSR1", first)) == ["0", "1", "2", "3"], first
    assert "Exited with exit code 85" in first and f"requeued job {job}" in first
    # the arguments after the config reached the trainer unchanged
    assert "-m moe_train train --config configs/tiny_moe.yaml --set a.b=c" in first
    stopped = int(re.findall(r"\[fake rank 0\] stopping at step (\d+)", first)[-1])
    assert f"resumed from {tmp_path / 'state' / 'latest'} at step {stopped}" in second
    assert "[fake rank 0] step 30/30" in second and "training finished (exit 0)" in second


def test_plumbing_failing_rank_fails_the_job_with_its_exit_code(slurm, tmp_path):
    log = tmp_path / "job.out"
    job = sbatch(slurm, [*MULTINODE, f"--output={log}"],
                 ["slurm/train_multinode.sbatch", "configs/tiny_moe.yaml"],
                 env_extra=fake_env(tmp_path / "state", steps=8, FAKE_FAIL="3:3"))
    info = wait_job(slurm, job, log)
    text = read(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0" and info["Restarts"] == "0", info
    assert re.search(r"srun: error: n2: task 3: Exited with exit code 3", text), text[-3000:]
    assert "FAILED: srun exited 3" in text


def test_plumbing_plain_scancel_checkpoints_without_requeue(slurm, tmp_path):
    log = tmp_path / "job.out"
    state = tmp_path / "state"
    job = sbatch(slurm, [*MULTINODE, f"--output={log}"],
                 ["slurm/train_multinode.sbatch", "configs/tiny_moe.yaml"], env_extra=fake_env(state))
    wait_for_log(slurm, job, log, r"^\[fake rank 0\] step 2/30$")
    subprocess.run(["scancel", job], env=slurm["env"], check=True)
    info = wait_job(slurm, job, log)
    text = read(log)
    # Slurm itself sends SIGTERM to every task; the trainer checkpoints within KillWait.
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, text[-3000:])
    assert sorted(re.findall(r"\[fake rank (\d)\] got SIGTERM", text)) == ["0", "1", "2", "3"], text
    assert (state / "latest").read_text().strip().isdigit()
    assert "checkpoint written, exit 85" in text and "not requeued" in text, text[-3000:]


def test_plumbing_one_node_template(slurm, tmp_path):
    log = tmp_path / "job.out"
    job = sbatch(slurm, ["--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=5",
                         f"--output={log}"],
                 ["slurm/train_1node.sbatch", "configs/tiny_moe.yaml"],
                 env_extra=fake_env(tmp_path / "state", steps=3))
    info = wait_job(slurm, job, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED", (info, text[-3000:])
    assert re.search(rf"launching StepId={job}\.0 on host n1, 2 tasks: \[0-1\]", text), text
    assert "srun -v --nodes=1 --ntasks=2 --ntasks-per-node=2 --cpus-per-task=1" in text


def test_template_refuses_a_missing_config(slurm, tmp_path):
    log = tmp_path / "job.out"
    job = sbatch(slurm, ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1",
                         "--time=1", f"--output={log}"],
                 ["slurm/train_multinode.sbatch", "configs/no_such.yaml"])
    info = wait_job(slurm, job, log, timeout=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert "config file 'configs/no_such.yaml' not found" in read(log)
