"""Switch vs dense at equal FLOPs per token: does Switch reach the dense loss in fewer steps?

    python -m benchmarks.switch_vs_dense                      # the committed run (~30-50 min, 2 cores)
    python -m benchmarks.switch_vs_dense --steps 40 --eval-every 20 --out /tmp/svd   # a smoke run

The Switch Transformer paper's speed-up measure (Fedus et al. 2021, section 3 / figure 4):
train a dense model and Switch models with the same FLOPs per token on the same data, and
count the steps each Switch model needs to reach the dense model's final quality. Here,
on CPU, each model is one process (world 1, ep 1) of ``python -m moe_train train`` (the
real loop and DeepSpeed engine, ZeRO 0), all three at once with one thread each (--jobs,
--threads: a busy machine then slows every model alike), on Project Gutenberg
Shakespeare (the demo's corpus and tokenizer, made by the data tools when missing):

  dense     configs/tiny_switch.yaml widened to d_model 192, d_ff 768, with every MLP dense
  switch8   the same, blocks 1 and 3 MoE: 8 experts of d_ff 768, top-1, capacity factor 1.25
  switch16  the same with 16 experts

An expert is exactly the dense MLP it replaces, and top-1 sends each token through one, so
the FLOPs per token are the dense model's plus the router's 2 x d_model x E per MoE block
(``moe_train.model.sizing.flops_per_token``; written to the JSON). Same seed, data order,
batch (16 x 128 = 2048 tokens a step), learning-rate schedule (AdamW 2e-3, --warmup-steps
linear warm-up, cosine to 2e-4) and steps for all three. Defaults: 1600 steps (3.3M
tokens, about two passes over the 1.73M training tokens), warm-up 200, evaluation every
100 steps. The first run, as the recipe was first written (800 steps, warm-up 50), is
`--steps 800 --eval-every 50 --warmup-steps 50 --name switch_vs_dense_800steps_warmup50`:
see docs/ for both and for why the second exists.

Measured: the validation loss over the whole held-out split every --eval-every steps
(TensorBoard ``eval/loss``), the training wall-clock at those steps (the sum of the step
times the trainer logs, ``perf/step_time_s``: evaluation and checkpoints excluded), and
the MoE diagnostics (``moe/mean/drop_frac``, ``moe/mean/load_cv``) near each evaluation.
Reported: for each Switch model, the step (and training seconds) at which its validation
loss first reaches the dense model's final validation loss, by linear interpolation
between evaluations, and the speed-ups dense_steps / switch_steps and dense_s / switch_s.

Outputs under --out (default docs/): switch_vs_dense.json
({"runs": {"dense": {"steps", "val_loss", "flops_per_token", "wall_s", ...}, ...},
"summary": ..., "command": ...}), switch_vs_dense.md (table) and switch_vs_dense.png
(validation loss against steps and against wall-clock). --plot-only remakes the table and
plot from an existing JSON. Wall-clock is only comparable when the models see the same
machine: the 1-minute load average is sampled during the runs and recorded, and after
the runs the models' steps are also timed interleaved in one process (--time-reps).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
BASE_YAML = REPO / "configs" / "tiny_switch.yaml"
# Shared by all models: the experiment's shape (on top of configs/tiny_switch.yaml).
COMMON = ["model.d_model=192", "model.num_heads=6", "model.d_ff=768", "moe.d_ff=768",
          "parallel.expert_parallel_size=1", "parallel.zero_stage=0", "data.micro_batch_size=16",
          "train.eval_steps=0", "optim.lr=0.002", "optim.min_lr=0.0002",
          "checkpoint.every_steps=0", "checkpoint.keep_last=1", "logging.every_steps=10"]
MODELS = {"dense": ["model.moe_every=0"],
          "switch8": ["moe.num_experts=8", "moe.top_k=1", "moe.capacity_factor=1.25"],
          "switch16": ["moe.num_experts=16", "moe.top_k=1", "moe.capacity_factor=1.25"]}
DEMO_DATA = REPO / "demo_out" / "shakespeare"


# ------------------------------------------------------------------------ running


def ensure_data(data_dir: Path) -> Path:
    """The demo's Shakespeare shards (launchers/demo.sh makes the same); built if missing."""
    manifest = data_dir / "shards" / "manifest.json"
    if manifest.is_file():
        return manifest
    py = sys.executable
    steps = [[py, "data_tools/prepare_corpus.py", "shakespeare", "--out", str(data_dir / "corpus")],
             [py, "data_tools/train_tokenizer.py", "--input", str(data_dir / "corpus" / "*.txt"),
              "--output", str(data_dir / "tok" / "sp"), "--vocab-size", "2048"],
             [py, "data_tools/make_shards.py", "--input", str(data_dir / "corpus" / "*.txt"),
              "--tokenizer", str(data_dir / "tok" / "sp.model"), "--output", str(data_dir / "shards"),
              "--seq-len", "128", "--val-fraction", "0.02", "--samples-per-shard", "1024"]]
    for cmd in steps:
        if cmd[1].endswith("prepare_corpus.py") and (data_dir / "corpus" / "source.json").is_file():
            continue
        print("+ " + " ".join(map(shlex.quote, cmd)), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    return manifest


def model_overrides(name: str, args: argparse.Namespace, manifest: Path, run_dir: Path) -> list[str]:
    every = args.eval_every
    return (COMMON + MODELS[name] +
            [f"data.manifest={manifest}", f"train.max_steps={args.steps}", f"train.eval_every={every}",
             f"optim.warmup_steps={args.warmup_steps}",
             f"checkpoint.dir={run_dir / 'checkpoints'}", f"logging.dir={run_dir / 'tb'}"])


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_model(name: str, overrides: list[str], run_dir: Path, threads: int) -> dict:
    """One training run in its own process; the console goes to run_dir/console.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "moe_train", "train", "--config", str(BASE_YAML.relative_to(REPO)),
           "--resume", "none"] + [a for o in overrides for a in ("--set", o)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"  # the console log follows the run
    print(f"[{name}] + {' '.join(map(shlex.quote, cmd))}", flush=True)
    load_before, start = load_average(), time.time()
    with open(run_dir / "console.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if line.startswith(("eval step", "done:")) or "error" in line.lower():
                print(f"[{name}] {line.rstrip()}", flush=True)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{name}: training exited with {rc}; see {run_dir / 'console.log'}")
    return {"elapsed_s": time.time() - start, "load_before": load_before, "load_after": load_average()}


def time_steps(overrides: dict[str, list[str]], threads: int, reps: int, warmup: int) -> dict:
    """Seconds per training step of each model (name: its --set overrides on BASE_YAML, data
    manifest included) with the models' steps INTERLEAVED (one step of each in turn, so a
    busy neighbour slows all alike): ``moe_train.train.train_step`` on the real engine and
    real batches, after ``warmup`` steps each; min and median over ``reps`` rounds. In
    this process (world 1), ``threads`` threads."""
    import statistics

    import torch
    import torch.distributed as dist

    from moe_train.config import load_config
    from moe_train.data import build_train_loader
    from moe_train.model.build import build_model
    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.init import init_distributed
    from moe_train.parallel.topology import Topology
    from moe_train.train.control import StopRequest
    from moe_train.train.engine import build_engine
    from moe_train.train.step import train_step

    torch.set_num_threads(threads)
    env, device = init_distributed("cpu", "gloo", 600, always_group=True)
    try:
        steppers = {}
        for name, sets in overrides.items():
            cfg = load_config(BASE_YAML, sets + ["logging.tensorboard=false"])
            groups = build_groups(Topology(1, 1, cfg.moe.num_experts), 0)
            engine = build_engine(cfg, build_model(cfg, groups, device), groups)
            batches = iter(build_train_loader(cfg.data, 0, 1))
            steppers[name] = (engine, batches, cfg, groups)
        times: dict[str, list[float]] = {name: [] for name in steppers}
        for rnd in range(warmup + reps):
            for name, (engine, batches, cfg, groups) in steppers.items():
                t0 = time.perf_counter()
                train_step(engine, batches, cfg, groups, device, rnd + 1, StopRequest())
                if rnd >= warmup:
                    times[name].append(time.perf_counter() - t0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return {name: {"min_s": min(ts), "median_s": statistics.median(ts)} for name, ts in times.items()}


# ------------------------------------------------------------------------ reading


def read_run(tb_dir: Path) -> dict:
    """Validation curve, cumulative training seconds and MoE diagnostics from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from moe_train.train.metrics.writer import event_dir

    acc = EventAccumulator(event_dir(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in acc.Scalars(tag)} if tag in tags else {}

    val = series("eval/loss")
    # Each logged step time is the mean over the steps since the previous log step.
    step_time, cumulative, last, total = series("perf/step_time_s"), {}, 0, 0.0
    for step in sorted(step_time):
        total += step_time[step] * (step - last)
        cumulative[step], last = total, step
    steps = sorted(val)
    out = {"steps": steps, "val_loss": [val[s] for s in steps],
           "wall_s": [_at(cumulative, s) for s in steps]}
    for key in ("drop_frac", "load_cv"):
        values = series(f"moe/mean/{key}")
        if values:
            out[key] = [_at(values, s) for s in steps]
    return out


def _at(series: dict[int, float], step: int) -> float:
    """The value logged at ``step``, or at the nearest logged step before it."""
    earlier = [s for s in series if s <= step]
    return series[max(earlier)] if earlier else float("nan")


def first_reach(steps: list[int], values: list[float], target: float) -> Optional[float]:
    """Where the piecewise-linear curve through (steps, values) first gets to ``target``
    or below; None if it never does. Used for steps and for seconds alike."""
    for i, (s, v) in enumerate(zip(steps, values)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], values[i - 1]
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def summarize(runs: dict, step_times: Optional[dict] = None) -> dict:
    """Steps and seconds for each Switch model to reach the dense final validation loss."""
    dense = runs["dense"]
    target = dense["val_loss"][-1]
    out = {"dense_final_val_loss": target, "dense_steps": dense["steps"][-1], "dense_wall_s": dense["wall_s"][-1]}
    for name, run in runs.items():
        if name == "dense":
            continue
        step = first_reach(run["steps"], run["val_loss"], target)
        wall = first_reach(run["wall_s"], run["val_loss"], target) if step is not None else None
        out[name] = {"steps_to_dense_final": step, "wall_s_to_dense_final": wall,
                     "step_speedup": dense["steps"][-1] / step if step else None,
                     "wall_speedup": dense["wall_s"][-1] / wall if wall else None,
                     "final_val_loss": run["val_loss"][-1],
                     "final_minus_dense": run["val_loss"][-1] - target}
        # The same measure against every dense evaluation, not only the last one.
        out[name]["speedup_by_dense_step"] = {
            str(s): (s / reach if reach else None) for s, reach in
            ((s, first_reach(run["steps"], run["val_loss"], v)) for s, v in zip(dense["steps"], dense["val_loss"]))}
        if step_times and step is not None:
            # The same, with every step costed at its interleaved (noise-shared) time.
            ratio = step_times[name]["min_s"] / step_times["dense"]["min_s"]
            out[name]["step_time_ratio_interleaved"] = ratio
            out[name]["wall_speedup_interleaved"] = dense["steps"][-1] / (step * ratio)
    return out


# ------------------------------------------------------------------------ writing


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def write_table(result: dict, path: Path) -> None:
    runs, summary, times = result["runs"], result["summary"], result.get("step_times") or {}
    steps = runs["dense"]["steps"]
    shown = sorted({steps[len(steps) // 4 - 1], steps[len(steps) // 2 - 1], steps[-1]}) if len(steps) >= 4 else steps
    head = (["model", "params total / active", "train FLOPs/token"] + [f"val loss @ {x}" for x in shown] +
            ["steps to dense final", "speed-up (steps)", "train s to dense final", "speed-up (wall)",
             "s/step (run)", "s/step (interleaved)", "speed-up (wall, interleaved)"])
    lines = ["# Switch vs dense at equal FLOPs per token", "", f"Made by: `{result['command']}`", "",
             f"Corpus: {_corpus_of(result)}. Machine: {result['machine']}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    if result.get("note"):
        lines[4:4] = [f"Note: {result['note']}", ""]
    for name, run in runs.items():
        by_step = dict(zip(run["steps"], run["val_loss"]))
        s = summary.get(name, {})
        ref = name == "dense"
        cells = [name, f"{run['params_total'] / 1e6:.2f}M / {run['params_active'] / 1e6:.2f}M",
                 f"{run['flops_per_token'] / 1e6:.2f}M"] + [f"{by_step[x]:.4f}" for x in shown]
        cells += (["(reference)", "1.00", f"{run['wall_s'][-1]:.0f}", "1.00"] if ref else
                  [_fmt(s.get("steps_to_dense_final"), ".0f", "not reached"), _fmt(s.get("step_speedup"), ".2f"),
                   _fmt(s.get("wall_s_to_dense_final"), ".0f"), _fmt(s.get("wall_speedup"), ".2f")])
        cells += [f"{run['wall_s'][-1] / run['steps'][-1]:.3f}", _fmt(times.get(name, {}).get("min_s"), ".3f"),
                  "1.00" if ref else _fmt(s.get("wall_speedup_interleaved"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    every = steps[1] - steps[0] if len(steps) > 1 else steps[0]
    lines += ["", f"Dense final validation loss {summary['dense_final_val_loss']:.4f} (step "
              f"{summary['dense_steps']}). *Steps to dense final*: the first step at which a model's "
              f"validation loss is at or below it, linear between evaluations (every {every} steps). "
              f"*Train s*: the summed step times the trainer logged (evaluation excluded; the runs "
              f"went at the same time, so a busy machine slowed them alike). *s/step (interleaved)*: "
              f"the minimum over steps of the three models taken in turn in one process (noise hits "
              f"all alike); *speed-up (wall, interleaved)* = dense steps / (switch steps x its step "
              f"time / the dense step time).", ""]
    names = [n for n in runs if n != "dense"]
    lines += ["Speed-up against every dense evaluation: the dense model's validation loss at step s, "
              "and s / the step at which each Switch model first reached it:", "",
              "| dense step | dense val loss | " + " | ".join(f"{n} val loss | {n} speed-up" for n in names) + " |",
              "|---" * (2 + 2 * len(names)) + "|"]
    for i, x in enumerate(steps):
        cells = [str(x), f"{runs['dense']['val_loss'][i]:.4f}"]
        for n in names:
            speed = summary[n]["speedup_by_dense_step"].get(str(x))
            cells += [f"{runs[n]['val_loss'][i]:.4f}", _fmt(speed, ".2f", "not reached") + ("x" if speed else "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""]
    lines += ["MoE diagnostics near the evaluations (mean over the MoE layers, training batches):", "",
              "| model | step | val loss | drop_frac | load_cv |", "|---|---|---|---|---|"]
    for name, run in runs.items():
        if "drop_frac" in run:
            for x in sorted({run["steps"][0], *shown}):
                i = run["steps"].index(x)
                lines.append(f"| {name} | {x} | {run['val_loss'][i]:.4f} | {run['drop_frac'][i]:.3f} "
                             f"| {run['load_cv'][i]:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    target = result["summary"]["dense_final_val_loss"]
    dense = result["runs"]["dense"]
    for name, run in result["runs"].items():
        axes[0].plot(run["steps"], run["val_loss"], marker=".", label=name)
        axes[1].plot(run["wall_s"], run["val_loss"], marker=".", label=name)
        axes[2].plot(run["steps"], [v - d for v, d in zip(run["val_loss"], dense["val_loss"])], marker=".",
                     label=name)
    axes[2].axhline(0.0, color="gray", linewidth=1)
    axes[2].set_xlabel("training step")
    axes[2].set_ylabel("validation loss minus dense (below 0: better)")
    axes[2].set_ylim(-0.15, 0.15)
    axes[2].grid(alpha=0.3)
    axes[2].legend()
    for ax, xlabel in zip(axes[:2], ("training step (2048 tokens each)", "training wall-clock (s, eval excluded)")):
        ax.axhline(target, color="gray", linestyle=":", linewidth=1, label="dense final")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        low = min(min(r["val_loss"]) for r in result["runs"].values())
        ax.set_ylim(low - 0.05, low + 1.2)
    fig.suptitle("Switch (top-1, cf 1.25, MoE every other block) vs dense, equal FLOPs per token, "
                 f"{_corpus_of(result)}, CPU")
    fig.text(0.5, 0.005, f"made by: {result['command']}", ha="center", fontsize=7, family="monospace")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def corpus_name(manifest: Path) -> str:
    """What the data is, from the corpus folder's source.json beside the shards folder
    (``<data>/corpus/source.json``, as the data tools write it), else the data folder's name."""
    source = manifest.parent.parent / "corpus" / "source.json"
    if source.is_file():
        info = json.loads(source.read_text())
        extra = f" (Python {info['python']})" if info.get("python") else ""
        return f"{info.get('source', manifest.parent.parent.name)}{extra}, {info.get('bytes', 0) / 1e6:.1f} MB"
    return manifest.parent.parent.name


def _corpus_of(result: dict) -> str:
    """The corpus a result was trained on: recorded, else read from its runs' manifest."""
    if result.get("corpus"):
        return result["corpus"]
    for run in result["runs"].values():
        for o in run.get("overrides", []):
            if o.startswith("data.manifest="):
                return corpus_name(Path(o.split("=", 1)[1]))
    return "unknown corpus"


def model_sizes(overrides: list[str]) -> dict:
    from moe_train.config import load_config
    from moe_train.model.sizing import flops_per_token, param_counts

    cfg = load_config(BASE_YAML, overrides)
    n = param_counts(cfg.model, cfg.moe)
    return {"flops_per_token": flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len),
            "params_total": n.total, "params_active": n.active_per_token}


def git_commit() -> Optional[str]:
    """HEAD, with "+changes" when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return (head + ("+changes" if dirty else "")) or None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


class LoadSampler:
    """The 1-minute load average every ``period_s`` while the runs go (a background thread)."""

    def __init__(self, period_s: float = 15.0):
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period_s,), daemon=True)

    def _loop(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            load = load_average()
            if load is not None:
                self.samples.append(load)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def machine_line(args: argparse.Namespace, loads: list[float]) -> str:
    import torch

    load = (f"1-minute load average during the runs: mean {sum(loads) / len(loads):.1f}, max {max(loads):.1f} "
            f"({min(args.jobs, 3)} of it these runs)" if loads else "load average not sampled")
    return (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.jobs} run(s) at once, "
            f"{args.threads} thread(s) each; {load}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--warmup-steps", type=int, default=200,
                   help="linear LR warm-up, then cosine to 0.1 x at --steps (all models)")
    p.add_argument("--name", default="switch_vs_dense", help="file stem of the .json, .md and .png")
    p.add_argument("--models", default="dense,switch8,switch16")
    p.add_argument("--data", default=str(DEMO_DATA), help="folder with shards/manifest.json (made if missing)")
    p.add_argument("--out", default=str(REPO / "docs"), help="where the .json, .md and .png go")
    p.add_argument("--work", default=str(REPO / "runs" / "switch_vs_dense"),
                   help="the runs' checkpoints, TensorBoard events and console logs")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--jobs", type=int, default=3, help="runs at once (default: every model together)")
    p.add_argument("--time-reps", type=int, default=20, help="interleaved timing: rounds (0: skip)")
    p.add_argument("--time-warmup", type=int, default=3, help="interleaved timing: untimed rounds")
    p.add_argument("--plot-only", action="store_true", help="remake the .md and .png from the .json")
    args = p.parse_args(argv)
    out = Path(args.out)
    json_path = out / f"{args.name}.json"
    if args.plot_only:
        result = json.loads(json_path.read_text())
        result["summary"] = summarize(result["runs"], result.get("step_times"))
    else:
        names = args.models.split(",")
        if names[0] != "dense" or any(n not in MODELS for n in names):
            raise SystemExit(f"--models {args.models}: dense first, then any of {', '.join(MODELS)}")
        manifest = ensure_data(Path(args.data))
        work = Path(args.work)
        command = "python -m benchmarks.switch_vs_dense " + " ".join(map(shlex.quote, argv or sys.argv[1:]))
        overrides = {name: model_overrides(name, args, manifest, work / name) for name in names}
        # --jobs runs at once (default: all): a busy machine then slows every model alike.
        with LoadSampler() as sampler, ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {name: pool.submit(run_model, name, overrides[name], work / name, args.threads)
                       for name in names}
            meta = {name: f.result() for name, f in futures.items()}
        runs = {}
        for name in names:
            meta[name]["threads"] = args.threads
            runs[name] = {**read_run(work / name / "tb"), **model_sizes(overrides[name]),
                          "elapsed_s": round(meta[name]["elapsed_s"], 1),
                          "load_average_before_after": [meta[name]["load_before"], meta[name]["load_after"]],
                          "overrides": overrides[name]}
        step_times = (time_steps(overrides, args.threads, args.time_reps, args.time_warmup)
                      if args.time_reps else None)
        result = {"runs": runs, "summary": summarize(runs, step_times), "step_times": step_times,
                  "command": command.strip(), "base_config": str(BASE_YAML.relative_to(REPO)),
                  "corpus": corpus_name(manifest),
                  "git_commit": git_commit(),
                  "machine": machine_line(args, sampler.samples), "load_average_samples": sampler.samples}
        out.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    write_table(result, out / f"{args.name}.md")
    write_plot(result, out / f"{args.name}.png")
    print((out / f"{args.name}.md").read_text())
    print(f"wrote {json_path}, {out / (args.name + '.md')}, {out / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
