"""The metrics API: TensorBoard output read back, MoE reductions on real gloo ranks,
the console line, memory and peak FLOP/s."""

import math
import re

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_ranks
from moe_train.train.metrics import (MetricsWriter, StepTimer, format_console_line, format_eta,
                               measure_peak_flops, memory_tag, moe_metrics,
                               peak_memory_bytes, reduce_mean, table_peak_flops)
from moe_train.moe.stats import MoEStats


def _stats(routed, kept, num_assignments, entropy):
    return MoEStats(routed_per_expert_E=torch.tensor(routed, dtype=torch.int64),
                    kept_per_expert_E=torch.tensor(kept, dtype=torch.int64),
                    num_assignments=num_assignments,
                    router_entropy=torch.tensor(entropy), aux_loss=torch.tensor(1.0),
                    z_loss=torch.tensor(0.1))


# Layer 1, per rank (E = 4, K * T = 8 each):
#   rank 0 routed [3, 0, 1, 4] kept [3, 0, 1, 2]  (2 dropped) entropy 1.0
#   rank 1 routed [0, 0, 6, 2] kept [0, 0, 6, 1]  (1 dropped) entropy 2.0
# Global routed [3, 0, 7, 6]: mean 4, deviations -1 -4 3 2, population var 30/4 = 7.5,
# load_cv sqrt(7.5)/4; max_load 7/4; dead 1 (expert 1); drop 3/16; entropy 1.5.
# Per-rank values all differ (cv 0.79 / 1.22, max 2 / 3, dead 1 / 2, drop 0.25 / 0.125).
# Layer 3 (E = 2): rank 0 [4, 4] kept [4, 4]; rank 1 [0, 8] kept [0, 4]
# Global [4, 12]: mean 8, cv 0.5, max 1.5, dead 0, drop 4/16, entropy (0.5 + 0.7)/2.
LAYER1 = [_stats([3, 0, 1, 4], [3, 0, 1, 2], 8, 1.0), _stats([0, 0, 6, 2], [0, 0, 6, 1], 8, 2.0)]
LAYER3 = [_stats([4, 4], [4, 4], 8, 0.5), _stats([0, 8], [0, 4], 8, 0.7)]
EXPECTED = {
    "moe/layer_1/load_cv": math.sqrt(7.5) / 4, "moe/layer_1/max_load": 1.75,
    "moe/layer_1/dead_experts": 1.0, "moe/layer_1/drop_frac": 3 / 16,
    "moe/layer_1/router_entropy": 1.5,
    "moe/layer_3/load_cv": 0.5, "moe/layer_3/max_load": 1.5,
    "moe/layer_3/dead_experts": 0.0, "moe/layer_3/drop_frac": 0.25,
    "moe/layer_3/router_entropy": 0.6,
    "moe/mean/load_cv": (math.sqrt(7.5) / 4 + 0.5) / 2, "moe/mean/drop_frac": (3 / 16 + 0.25) / 2,
}


def _moe_metrics_rank(rank, world_size):
    scalars, hists = moe_metrics([LAYER1[rank], LAYER3[rank]], [1, 3], group=dist.group.WORLD)
    means = reduce_mean({"train/loss": torch.tensor(float(rank + 1)), "train/lr": 3e-4},
                        group=dist.group.WORLD)
    return scalars, {k: v.tolist() for k, v in hists.items()}, means


def test_moe_metrics_are_global_and_identical_on_two_ranks():
    results = run_ranks(_moe_metrics_rank, world_size=2)
    for scalars, hists, means in results:
        assert scalars.keys() == EXPECTED.keys()
        for tag, value in EXPECTED.items():
            assert scalars[tag] == pytest.approx(value), tag
        assert hists == {"moe/layer_1/expert_load": [3.0, 0.0, 7.0, 6.0],
                         "moe/layer_3/expert_load": [4.0, 12.0]}
        assert means == pytest.approx({"train/loss": 1.5, "train/lr": 3e-4})
    assert results[0] == results[1]


def test_moe_metrics_single_process_matches_stats_summary():
    s = _stats([5, 0, 2, 9, 1, 0], [4, 0, 2, 5, 1, 0], 20, 1.3)
    scalars, hists = moe_metrics([s], [7])
    direct = {k: v.item() for k, v in s.summary().items()}
    assert scalars["moe/layer_7/load_cv"] == pytest.approx(direct["load_cv"])
    assert scalars["moe/layer_7/max_load"] == pytest.approx(direct["load_max_over_mean"])
    assert scalars["moe/layer_7/dead_experts"] == direct["dead_experts"] == 2
    assert scalars["moe/layer_7/drop_frac"] == pytest.approx(direct["drop_frac"]) == 0.25
    assert scalars["moe/layer_7/router_entropy"] == pytest.approx(1.3)
    assert scalars["moe/mean/load_cv"] == pytest.approx(direct["load_cv"])
    assert hists["moe/layer_7/expert_load"].tolist() == [5.0, 0.0, 2.0, 9.0, 1.0, 0.0]
    assert moe_metrics([], []) == ({}, {})
    assert reduce_mean({"a": torch.tensor(2.5), "b": 1}) == {"a": 2.5, "b": 1.0}


def _read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_writer_round_trips_through_tensorboard(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=True)
    writer.scalars(10, {"train/loss": 4.25, "perf/tokens_per_s": 1234.0})
    writer.scalars(20, {"train/loss": torch.tensor(3.5)})
    writer.histogram("moe/layer_1/expert_load", torch.tensor([3.0, 0.0, 7.0, 6.0]), 20)
    writer.text("config", "model.dim: 64", 0)
    writer.close()
    writer.close()  # idempotent, as the loop's finally may call it after an error

    acc = _read_events(str(tmp_path))
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(10, 4.25), (20, 3.5)]
    assert [(e.step, e.value) for e in acc.Scalars("perf/tokens_per_s")] == [(10, 1234.0)]
    (hist,) = acc.Histograms("moe/layer_1/expert_load")
    h = hist.histogram_value
    # Relative loads counts / mean = [0.75, 0, 1.75, 1.5]: E values summing to E.
    assert hist.step == 20 and h.num == 4
    assert (h.min, h.max, h.sum) == pytest.approx((0.0, 1.75, 4.0))
    assert sum(h.bucket) == 4
    assert "config/text_summary" in acc.Tags()["tensors"]
    (text,) = acc.Tensors("config/text_summary")
    assert text.step == 0 and text.tensor_proto.string_val[0] == b"model.dim: 64"


def test_disabled_writer_creates_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # SummaryWriter(None) would write under ./runs
    for writer in (MetricsWriter(str(tmp_path / "tb"), enabled=False),
                   MetricsWriter(None, enabled=True)):
        assert not writer.active
        writer.scalars(1, {"train/loss": 1.0})
        writer.histogram("moe/layer_0/expert_load", torch.ones(4), 1)
        writer.text("config", "x", 0)
        writer.flush()
        writer.close()
    assert list(tmp_path.iterdir()) == []


LINE_RE = re.compile(r"^step\s+(\d+)/(\d+) \|.*\blm (\S+)")


def test_console_line_format_and_parse():
    values = {"loss": 4.1234, "lm_loss": 4.1, "aux_loss": 1.0123, "z_loss": 0.2345,
              "lr": 3e-4, "grad_norm": 0.812, "tokens_per_s": 12345.0, "step_time_s": 0.21,
              "drop_frac": 0.012, "load_cv": 0.231, "eta_s": 15}
    line = format_console_line(30, 100, values)
    assert line == ("step  30/100 | loss 4.1234 (lm 4.1000 aux 1.0123 z 0.2345) | lr 3.00e-04 "
                    "| gnorm 0.812 | 12,345 tok/s | 0.210 s/step | drop 0.012 | load_cv 0.231 "
                    "| eta 0m15s")
    m = LINE_RE.match(line)
    assert m and (int(m[1]), int(m[2]), float(m[3])) == (30, 100, 4.1)
    short = format_console_line(3, 1000, {"lm_loss": 2.5})
    assert short == "step    3/1000 | lm 2.5000"
    assert LINE_RE.match(short)[3] == "2.5000"
    assert format_console_line(1, 10, {}) == "step  1/10"


def test_eta_format():
    assert format_eta(15) == "0m15s"
    assert format_eta(3725) == "1h02m"
    assert format_eta(59.6) == "1m00s"
    assert format_eta(30 * 3600 + 60) == "30h01m"
    assert format_eta(float("inf")) == format_eta(None) == "?"


def test_step_timer_window(monkeypatch):
    clock = iter([100.0, 100.5, 101.5, 110.0, 110.25])
    monkeypatch.setattr("moe_train.train.metrics.console.time.perf_counter", lambda: next(clock))
    timer = StepTimer()                      # t = 100
    assert timer.tick(1000) == 0.5           # t = 100.5
    timer.tick(1000)                         # t = 101.5: window 1.5 s, 2 steps
    assert timer.window(steps_left=10) == pytest.approx(
        {"tokens_per_s": 2000 / 1.5, "step_time_s": 0.75, "eta_s": 7.5})
    timer.restart()                          # t = 110: the pause is not step time
    timer.tick(500)                          # t = 110.25
    assert timer.window(0) == pytest.approx({"tokens_per_s": 2000, "step_time_s": 0.25,
                                             "eta_s": 0.0})
    assert timer.window(5) == {}


def test_peak_memory_on_cpu_covers_a_large_allocation():
    cpu = torch.device("cpu")
    big = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, touched
    assert peak_memory_bytes(cpu) >= big.numel() * 4
    assert memory_tag(cpu) == "mem/peak_rss_bytes"
    assert memory_tag(torch.device("cuda", 0)) == "mem/max_allocated_bytes"


def test_measure_peak_flops_cpu_and_overrides(monkeypatch):
    monkeypatch.delenv("MOE_TRAIN_PEAK_FLOPS", raising=False)
    flops = measure_peak_flops(torch.device("cpu"), torch.float32, seconds=0.2)
    assert math.isfinite(flops) and 1e8 < flops < 1e14
    monkeypatch.setenv("MOE_TRAIN_PEAK_FLOPS", "123e12")
    assert measure_peak_flops(torch.device("cpu"), torch.float32) == 123e12
    monkeypatch.setenv("MOE_TRAIN_PEAK_FLOPS", "fast")
    with pytest.raises(ValueError, match="MOE_TRAIN_PEAK_FLOPS"):
        measure_peak_flops(torch.device("cpu"), torch.float32)


def test_cuda_peak_table():
    assert table_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert table_peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert table_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert table_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 156e12
    assert table_peak_flops("NVIDIA GeForce RTX 3090", torch.bfloat16) is None
