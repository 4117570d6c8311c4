"""The README's main command end to end: corpus -> tokenizer -> shards -> 2 expert-
parallel ranks on gloo, through each real launcher. The loss must fall (a broken router,
dispatcher or gradient reduction shows up as a flat or diverging curve), and torchrun,
the deepspeed launcher and mpirun must train the very same model: same losses."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]


def run_demo(out_dir, launcher, steps):
    env = dict(os.environ, DEMO_OUT=str(out_dir), NPROC="2", LAUNCHER=launcher,
               MASTER_PORT=str(free_port()))
    env.pop("MASTER_ADDR", None)
    out = subprocess.run(["bash", "launchers/demo.sh", "--steps", str(steps), "--set", "logging.every_steps=5"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "world 2 = ep 2 x edp 1" in out.stdout
    steps_losses = re.findall(r"step\s+(\d+)\s+lm_loss ([\d.]+)", out.stdout)
    return out, {int(s): float(v) for s, v in steps_losses}


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    out, losses = run_demo(out_dir, "torchrun", 25)
    return out_dir, out, losses


def test_demo_trains_with_expert_parallelism_under_torchrun(torchrun_run):
    out_dir, out, losses = torchrun_run
    assert "+ torchrun --standalone --nproc_per_node 2" in out.stderr  # the launcher shows its command
    assert sorted(losses) == [5, 10, 15, 20, 25]
    assert losses[25] < losses[5] - 0.5, losses
    assert (out_dir / "shards" / "manifest.json").is_file()


@pytest.mark.parametrize("launcher, shown", [("deepspeed", "+ deepspeed --num_gpus 2"),
                                             ("mpirun", "+ mpirun --allow-run-as-root")])
def test_other_launchers_train_the_same_model(torchrun_run, launcher, shown):
    out_dir, _, reference = torchrun_run
    out, losses = run_demo(out_dir, launcher, 10)  # reuses the shards made by the torchrun run
    assert shown in out.stderr
    assert sorted(losses) == [5, 10]
    assert losses[5] == pytest.approx(reference[5], abs=1e-3)
    assert losses[10] == pytest.approx(reference[10], abs=1e-3)
