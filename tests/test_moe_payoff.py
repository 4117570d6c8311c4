"""The MoE payoff experiment's arithmetic, without training (benchmarks/moe_payoff.py):
FLOP matching router included, the speed-up interpolation, the finalist, the summary's
seed statistics; the frozen-router control; the python-stdlib corpus."""

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import moe_payoff as mp
from moe_train.config import MoEConfig
from moe_train.moe.router import Router

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_tools"))
import prepare_corpus  # noqa: E402


def test_every_variant_gets_at_most_the_dense_flops_router_included():
    dense = mp.flops_of(mp.COMMON + mp.VARIANTS["dense"]["set"])
    for name, spec in mp.VARIANTS.items():
        if spec["nominal"] is None:
            continue
        sets = mp.variant_overrides(name, seed=0)
        width = int(next(o for o in reversed(sets) if o.startswith("moe.d_ff=")).split("=")[1])
        flops = mp.flops_of(sets)
        assert flops <= dense, name
        # the next wider multiple of 4 would be over: the match is as close as allowed
        assert mp.flops_of(mp.COMMON + spec["set"] + [f"moe.d_ff={width + 4}"]) > dense or width == spec["nominal"]
        assert flops > 0.97 * dense, (name, flops / dense)
        assert width % 4 == 0 and width < spec["nominal"]  # the router's FLOPs came out of the experts


def test_speedup_interpolates_between_evaluations():
    dense = {"steps": [100, 200, 300, 400], "val_loss": [4.0, 3.5, 3.2, 3.0], "wall_s": [10, 20, 30, 40],
             "step_time_s": 0.1}
    moe = {"steps": [100, 200, 300, 400], "val_loss": [3.8, 3.2, 2.9, 2.7], "wall_s": [15, 30, 45, 60],
           "step_time_s": 0.15}
    sp = mp.speedups(dense, moe)
    # 3.0 is crossed between step 200 (3.2) and 300 (2.9): 200 + 100 * 0.2 / 0.3
    assert sp["steps_to_dense_final"] == pytest.approx(200 + 100 * 0.2 / 0.3)
    assert sp["step_speedup"] == pytest.approx(400 / (200 + 100 * 0.2 / 0.3))
    assert sp["wall_speedup"] == pytest.approx(400 * 0.1 / (sp["steps_to_dense_final"] * 0.15))
    assert sp["wall_speedup_run_clock"] == pytest.approx(40 / (30 + 15 * 0.2 / 0.3))
    assert sp["final_gap"] == pytest.approx(0.3)
    never = mp.speedups(dense, {**moe, "val_loss": [4.0, 3.6, 3.3, 3.1]})
    assert never["steps_to_dense_final"] is None and never["step_speedup"] is None


def _run(losses, step_time=0.1):
    steps = [100 * (i + 1) for i in range(len(losses))]
    return {"steps": steps, "val_loss": losses, "wall_s": [s * step_time for s in steps], "step_time_s": step_time}


def test_finalist_and_summary():
    runs = {"dense": _run([4.0, 3.5, 3.0]), "a": _run([3.9, 3.3, 2.9]), "b": _run([3.6, 2.9, 2.6]),
            "c": _run([4.1, 3.6, 3.1])}
    assert mp.choose_finalist(runs) == "b"  # reaches 3.0 first
    assert mp.choose_finalist({"dense": runs["dense"], "c": runs["c"], "d": _run([4.1, 3.6, 3.05])}) == "d"
    keyed = {"dense@0": runs["dense"], "b@0": runs["b"], "dense@1": _run([4.0, 3.4, 3.1]),
             "b@1": _run([3.5, 3.0, 2.7]), "dense@2": _run([4.0, 3.6, 2.9]), "b@2": _run([3.7, 2.8, 2.5]),
             "b@0-frozen": _run([3.9, 3.3, 2.95])}
    s = mp.summarize(keyed, "b", max_epochs=0.8)
    assert s["finalist"] == "b" and s["max_epochs"] == 0.8
    assert len(s["step_speedup_by_seed"]) == 3
    assert s["step_speedup_mean"] == pytest.approx(statistics.mean(s["step_speedup_by_seed"]))
    assert s["final_gap_mean"] == pytest.approx(statistics.mean([3.0 - 2.6, 3.1 - 2.7, 2.9 - 2.5]))
    assert s["seed_spread"] == pytest.approx(max(statistics.pstdev([3.0, 3.1, 2.9]), statistics.pstdev([2.6, 2.7, 2.5])))
    assert s["frozen_router_gap"] == pytest.approx(2.95 - 2.6)
    assert set(s["screening"]) == {"b"}


def test_epochs_used(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"seq_len": 128, "splits": {"train": {"samples": 1000}}}))
    assert mp.epochs_used(manifest, steps=500, tokens_per_step=1024) == pytest.approx(500 * 1024 / (1000 * 128))


def test_a_frozen_router_keeps_its_weights_and_passes_gradient_to_x():
    torch.manual_seed(0)
    router = Router(MoEConfig(num_experts=4, top_k=2, freeze_router=True), 8)
    assert not router.w_DE.requires_grad
    x = torch.randn(6, 8, requires_grad=True)
    routing = router(x)
    (routing.gates_A.sum() + routing.aux_loss).backward()
    assert router.w_DE.grad is None and x.grad is not None and x.grad.abs().sum() > 0


def test_python_stdlib_corpus_one_document_per_file_tests_left_out(tmp_path):
    root = tmp_path / "lib"
    for rel, text in {"a.py": "x = 1\n", "pkg/b.py": "def f():\n    return 2\n", "test/t.py": "skip\n",
                      "pkg/tests/u.py": "skip\n", "site-packages/v.py": "skip\n", "c.txt": "not python\n",
                      "empty.py": "\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    info = prepare_corpus.write_python_stdlib(str(tmp_path / "out"), str(root))
    lines = [json.loads(line) for line in (tmp_path / "out" / "corpus.jsonl").read_text().splitlines()]
    assert [d["path"] for d in lines] == ["a.py", "pkg/b.py"]
    assert lines[1]["text"] == "def f():\n    return 2\n"
    assert info["source"] == "python-stdlib" and info["bytes"] == len("x = 1\n") + len(lines[1]["text"])
    assert json.loads((tmp_path / "out" / "source.json").read_text())["sha256"] == info["sha256"]
    real = prepare_corpus.stdlib_files()
    assert len(real) > 100 and not any("/test/" in f"/{rel}" for rel, _ in real)


def test_speedup_by_dense_step():
    dense = _run([4.0, 3.5, 3.0, 2.8])
    moe = _run([3.5, 3.0, 2.8, 2.6])
    by = mp.speedup_by_dense_step(dense, moe)
    assert by == {"100": pytest.approx(100 / first_at(moe, 4.0)), "200": pytest.approx(2.0),
                  "300": pytest.approx(1.5), "400": pytest.approx(400 / 300)}


def first_at(run, target):
    from benchmarks.switch_vs_dense import first_reach
    return first_reach(run["steps"], run["val_loss"], target)
