"""Config layer: every shipped config loads and validates; bad input names key and value."""

import subprocess
import sys
from pathlib import Path

import pytest

from moe_train.config import deepspeed_config, load_config, validate
from tests.data_fixtures import synthetic  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_directory_is_not_empty():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    world = cfg.parallel.expert_parallel_size * 2
    plan = validate(cfg, world)
    ds = deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == plan.global_batch_size == (
        cfg.data.micro_batch_size * cfg.train.grad_accum_steps * world)
    assert ds["zero_optimization"]["stage"] == cfg.parallel.zero_stage


@pytest.mark.parametrize("override, needle", [
    ("moe.top_k=9", "moe.top_k = 9"),
    ("moe.capacity_factor=0", "moe.capacity_factor = 0.0"),
    ("moe.drop_policy=random", "moe.drop_policy = 'random'"),
    ("moe.bogus=1", "moe.bogus = 1: unknown key"),
    ("bogus.x=1", "bogus: unknown config section"),
    ("model.d_model=hello", "model.d_model = 'hello': must be an integer"),
    ("parallel.zero_stage=3", "parallel.zero_stage = 3"),
    ("moe.normalize_topk=maybe", "moe.normalize_topk = 'maybe': must be true or false"),
    ("data.seq_len=4096", "data.seq_len"),
])
def test_bad_values_name_key_and_value(override, needle):
    with pytest.raises(ValueError) as err:
        load_config(REPO / "configs" / "tiny_moe.yaml", [override])
    assert needle in str(err.value) and "tiny_moe.yaml" in str(err.value)


def test_overrides_apply_and_null_means_dropless(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny_moe.yaml",
                      ["moe.capacity_factor=null", "moe.top_k=1", "optim.lr=1e-3"])
    assert cfg.moe.capacity_factor is None and cfg.moe.top_k == 1 and cfg.optim.lr == 1e-3
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_world_size_must_be_a_multiple_of_ep():
    cfg = load_config(REPO / "configs" / "tiny_moe.yaml")
    with pytest.raises(ValueError, match=r"parallel\.expert_parallel_size = 2: must divide the world size \(3\)"):
        validate(cfg, 3)


def run_check(*args):
    return subprocess.run([sys.executable, "-m", "moe_train", "check", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_check_command_prints_layout_without_process_group():
    out = run_check("--config", "configs/tiny_moe.yaml", "--world-size", "4")
    assert out.returncode == 0, out.stderr
    assert "global batch 16 sequences" in out.stdout
    assert "rank 3: experts 2..3, all-to-all with [2, 3], expert grads reduced over [1, 3]" in out.stdout
    assert "train capacity per expert per rank: 160" in out.stdout  # ceil(2*256*1.25/4)


def test_check_command_reports_bad_input_in_one_line():
    out = run_check("--config", "configs/tiny_moe.yaml", "--world-size", "3")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "must divide the world size (3)" in out.stderr


def test_check_command_reads_the_data_manifest(synthetic):  # noqa: F811 (fixture)
    common = ["--config", "configs/tiny_moe.yaml", "--world-size", "2",
              "--set", f"data.manifest={synthetic.manifest_path}", "--set", "data.seq_len=16"]
    out = run_check(*common)
    assert out.returncode == 2 and "model.vocab_size = 512: the tokenizer" in out.stderr
    out = run_check(*common, "--set", "model.vocab_size=1000")
    assert out.returncode == 0, out.stderr
    # 79 samples over 2 ranks x 4 per micro-batch: 9 steps per epoch on every rank
    assert f"train split: {synthetic.num_train} samples of 16 tokens, 9 steps per epoch" in out.stdout
    out = run_check(*common, "--set", "model.vocab_size=1000", "--set", "data.seq_len=32")
    assert out.returncode == 2 and "hold seq_len=16" in out.stderr
