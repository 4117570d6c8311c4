"""Stop requests ahead of a Slurm time limit, and the local launcher's command lines."""

import datetime
import subprocess

import pytest

from moe_train.parallel.launch import build_command, trainer_pids
from moe_train.train import control


def test_time_limit_asks_for_a_stop_n_minutes_before_the_end():
    limit = control.TimeLimit(end=10_000.0, minutes=5)
    assert not limit.due(now=10_000.0 - 301) and limit.due(now=10_000.0 - 300)
    assert not control.TimeLimit(end=None, minutes=5).due(now=1e12)
    assert not control.TimeLimit(end=10_000.0, minutes=0).due(now=1e12)  # 0 = off


def test_slurm_job_end_from_the_environment_or_scontrol(monkeypatch):
    assert control.slurm_job_end({"SLURM_JOB_END_TIME": "1790000000"}) == 1790000000.0
    assert control.slurm_job_end({}) is None  # not under Slurm

    def fake_run(cmd, **kwargs):
        assert cmd == ["scontrol", "show", "job", "42"]
        return subprocess.CompletedProcess(cmd, 0, stdout="JobId=42 JobName=x\n   RunTime=00:01:00 "
                                                          "TimeLimit=01:00:00 EndTime=2026-11-29T23:00:00 X=1\n")

    monkeypatch.setattr(control.subprocess, "run", fake_run)
    want = datetime.datetime(2026, 11, 29, 23, 0, 0).timestamp()
    assert control.slurm_job_end({"SLURM_JOB_ID": "42"}) == want


def test_stop_request_keeps_the_first_reason():
    stop = control.StopRequest()
    assert not stop.requested
    stop.request("SIGUSR1 on rank 1")
    stop.request("time limit")
    assert stop.requested and stop.reason == "SIGUSR1 on rank 1"


@pytest.mark.parametrize("launcher, head", [
    ("deepspeed", ["deepspeed", "--num_gpus", "4", "--master_port", "29555", "--module", "moe_train", "train"]),
    ("torchrun", ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "moe_train", "train"]),
])
def test_launch_builds_the_launcher_command(launcher, head):
    cmd = build_command(launcher, 4, ["--config", "c.yaml"], 29555)
    assert cmd == head + ["--config", "c.yaml"]
    with pytest.raises(ValueError, match="must be deepspeed, torchrun or mpirun"):
        build_command("pdsh", 4, [], 1)


def test_trainer_pids_finds_only_the_top_most_ranked_descendants():
    """A shell (no rank) -> a python with LOCAL_RANK -> its child (a DataLoader worker):
    only the middle one is a trainer."""
    import os
    import sys
    import time

    script = ("import os, subprocess, sys, time; "
              "env = dict(os.environ, LOCAL_RANK='0'); "
              "subprocess.Popen([sys.executable, '-c', "
              "'import subprocess, sys, time; subprocess.Popen([sys.executable, \"-c\", \"import time; time.sleep(30)\"]); "
              "time.sleep(30)'], env=env); time.sleep(30)")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")}
    root = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        pids = []
        while time.monotonic() < deadline and not pids:
            time.sleep(0.2)
            pids = trainer_pids(root.pid)
        assert len(pids) == 1
        time.sleep(0.5)  # the grandchild has started by now
        assert pids == trainer_pids(root.pid)  # the grandchild (inherits LOCAL_RANK) is left out
    finally:
        os.killpg(root.pid, 9)
        root.wait()


def test_faults_seam_parses_targets_and_refuses_a_malformed_spec():
    from moe_train.train.faults import NO_FAULTS, Faults

    faults = Faults.from_env({"MOE_TRAIN_FAULT": "nan_loss@5, hang@12:1"})
    assert faults.at("nan_loss", 5, 0) and faults.at("nan_loss", 5, 3)  # no rank: every rank
    assert faults.at("hang", 12, 1) and not faults.at("hang", 12, 0) and not faults.at("hang", 11, 1)
    assert faults.loss(2.0, 4, 0) == 2.0 and faults.loss(2.0, 5, 0) != faults.loss(2.0, 5, 0)  # NaN
    stop = control.StopRequest()
    Faults("stop@3").before_step(3, 0, stop)
    assert stop.requested and stop.reason == "fault injection"
    assert not NO_FAULTS and not Faults.from_env({}) and NO_FAULTS.save_hook(10, 0) is None
    assert Faults("kill_in_save@10:0").save_hook(10, 0) is not None
    with pytest.raises(ValueError, match=r"MOE_TRAIN_FAULT: 'nan@x': expected kind@step\[:rank\]"):
        Faults("nan@x")
