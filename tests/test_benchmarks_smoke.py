"""Smoke test of ``python -m benchmarks.train_step`` at its smallest (tiny config, one
timed step): the command runs, its --json has every key with positive numbers, and the
optimizer-state accounting agrees with ``sizing.memory_estimate``. Behaviour only: no
assertion reads a time (speed targets live in the benchmark's printed ratios).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP_KEYS = {"moe_step_s", "dense_step_s", "moe_tokens_per_s", "dense_tokens_per_s",
            "optimizer_bytes_per_rank", "analytic_optimizer_bytes_per_rank"}
STAGES = ("0", "1", "2")


def run_benchmark(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "train_step.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--configs", "tiny",
                           "--json", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fp32_report(tmp_path_factory) -> dict:
    return run_benchmark(tmp_path_factory.mktemp("fp32"), "--reps", "1", "--warmup", "1")


@pytest.fixture(scope="module")
def bf16_memory_report(tmp_path_factory) -> dict:
    return run_benchmark(tmp_path_factory.mktemp("bf16"), "--parts", "memory", "--dtype", "bf16")


def within(measured: int, analytic: int, tol: float = 0.10) -> bool:
    return abs(measured / analytic - 1) <= tol


def test_json_has_every_key_with_positive_numbers(fp32_report):
    assert TOP_KEYS <= fp32_report.keys()
    for key in ("moe_step_s", "dense_step_s", "moe_tokens_per_s", "dense_tokens_per_s"):
        assert fp32_report[key] > 0, key
    for key in ("optimizer_bytes_per_rank", "analytic_optimizer_bytes_per_rank"):
        assert set(fp32_report[key]) == set(STAGES), key
        assert all(v > 0 for v in fp32_report[key].values()), fp32_report[key]
    tiny = fp32_report["configs"]["tiny"]
    assert tiny["flops_per_token"]["moe"] > tiny["flops_per_token"]["dense"] > 0  # the router's share


def test_fp32_counts_what_the_formula_counts(fp32_report):
    """fp32: ZeRO 0 holds Adam's m and v only (the fp32 parameters are the master); ZeRO
    1/2 hold m and v plus DeepSpeed's own fp32 master partition, as the formula says."""
    measured, analytic = fp32_report["optimizer_bytes_per_rank"], fp32_report["analytic_optimizer_bytes_per_rank"]
    parts = fp32_report["configs"]["tiny"]["optimizer_bytes_parts_per_rank"]
    assert parts["0"]["fp32_master"] == 0 and within(measured["0"], analytic["0"])
    for stage in ("1", "2"):
        assert within(parts[stage]["fp32_master"], parts[stage]["adam_state"] // 2), parts[stage]


def test_fp32_zero12_optimizer_bytes_within_10pct_of_analytic(fp32_report):
    measured, analytic = fp32_report["optimizer_bytes_per_rank"], fp32_report["analytic_optimizer_bytes_per_rank"]
    for stage in ("1", "2"):
        assert within(measured[stage], analytic[stage]), (stage, measured[stage], analytic[stage])


def test_bf16_optimizer_bytes_within_10pct_of_analytic(bf16_memory_report):
    """bf16: master + m + v = 12 B per parameter held, on both sides."""
    measured = bf16_memory_report["optimizer_bytes_per_rank"]
    analytic = bf16_memory_report["analytic_optimizer_bytes_per_rank"]
    for stage in STAGES:
        assert within(measured[stage], analytic[stage]), (stage, measured[stage], analytic[stage])
    assert measured["1"] < measured["0"]
