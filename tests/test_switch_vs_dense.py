"""benchmarks/switch_vs_dense.py without training: the speed-up arithmetic (first step at
which a curve reaches the dense final loss, interpolated) and the table and plot written
from a result of the committed JSON's shape. The runs themselves are the experiment."""
import json
import math

import pytest

from benchmarks.switch_vs_dense import first_reach, summarize, write_plot, write_table


def test_first_reach_interpolates_between_evaluations():
    steps, loss = [50, 100, 150, 200], [6.0, 5.0, 4.5, 4.2]
    assert first_reach(steps, loss, 5.0) == 100
    assert first_reach(steps, loss, 4.75) == pytest.approx(125)
    assert first_reach(steps, loss, 7.0) == 50  # already there at the first evaluation
    assert first_reach(steps, loss, 4.0) is None  # never
    assert first_reach([10.0, 30.0], [5.0, 4.0], 4.5) == pytest.approx(20.0)  # seconds alike


def fake_result():
    steps = [50, 100, 150, 200]

    def run(losses, step_s, flops, drop=None):
        out = {"steps": steps, "val_loss": losses, "wall_s": [s * step_s for s in steps],
               "flops_per_token": flops, "params_total": 2e6, "params_active": 1e6}
        if drop:
            out.update(drop_frac=[drop] * 4, load_cv=[0.5] * 4)
        return out

    runs = {"dense": run([6.0, 5.0, 4.6, 4.4], 0.20, 1.0e7),
            "switch8": run([6.1, 4.8, 4.4, 4.2], 0.25, 1.001e7, 0.05),
            "switch16": run([6.2, 5.2, 4.9, 4.7], 0.30, 1.002e7, 0.10)}
    times = {"dense": {"min_s": 0.2}, "switch8": {"min_s": 0.24}, "switch16": {"min_s": 0.3}}
    return {"runs": runs, "summary": summarize(runs, times), "step_times": times,
            "command": "python -m benchmarks.switch_vs_dense --steps 200", "machine": "test"}


def test_summary_counts_steps_and_seconds_to_the_dense_final_loss():
    summary = fake_result()["summary"]
    assert summary["dense_final_val_loss"] == 4.4 and summary["dense_steps"] == 200
    s8 = summary["switch8"]
    assert s8["steps_to_dense_final"] == pytest.approx(150)  # 4.4 reached exactly at 150
    assert s8["step_speedup"] == pytest.approx(200 / 150)
    assert s8["wall_s_to_dense_final"] == pytest.approx(150 * 0.25)
    assert s8["wall_speedup"] == pytest.approx(40 / 37.5)
    assert s8["wall_speedup_interleaved"] == pytest.approx(200 / (150 * 1.2))
    assert summary["switch16"]["steps_to_dense_final"] is None
    assert summary["switch16"]["final_minus_dense"] == pytest.approx(0.3)


def test_table_and_plot_are_written(tmp_path):
    result = fake_result()
    json.loads(json.dumps(result))  # the JSON the benchmark writes
    write_table(result, tmp_path / "t.md")
    table = (tmp_path / "t.md").read_text()
    assert "`python -m benchmarks.switch_vs_dense --steps 200`" in table
    main_table = table.split("\n\n")[3]  # title, command, machine, then the table
    rows = {line.split(" | ")[0].strip("| "): line for line in main_table.splitlines()}
    assert "| 150 | 1.33 |" in rows["switch8"] and "not reached" in rows["switch16"]
    header = next(line for line in table.splitlines() if line.startswith("| model | params"))
    assert header.count("|") == rows["dense"].count("|")  # every row fills every column
    write_plot(result, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert not math.isnan(result["summary"]["switch8"]["step_speedup"])
