"""Long-context experiment: train the demo's tiny model at sequence length S, evaluate it at
2S without and with RoPE scaling (linear, NTK-aware, YaRN), and after a short fine-tune at
2S; writes section "long_context" of docs/model_options.json.

    python docs/long_context_experiment.py                 # the committed run (~5-10 min on 2 cores)
    python docs/long_context_experiment.py --steps 20 --ft-steps 5 --no-json --work /tmp/lc   # smoke

Model: configs/tiny_switch.yaml (the README's main command, launchers/demo.sh: 4 blocks,
d 128, 8 experts top-1 in blocks 1 and 3) with ``model.position: rope`` (the demo uses
learned positions, which cannot extend past their table) and ``model.max_seq_len: S``.
One process (world 1, ep 1, ZeRO 0) through the real trainer, ``python -m moe_train
train``; 2048 tokens a step as in the demo (S = 64: 32 sequences), --steps steps (default
400), the demo's optimizer and warm-up (AdamW 2e-3, 100 warm-up steps, cosine to 2e-4).
Data: the demo's Project Gutenberg Shakespeare corpus and tokenizer (built as
launchers/demo.sh builds them when missing, under --data, default demo_out/shakespeare),
packed twice by data_tools/make_shards.py: at S (shards_s64/) and at 2S (the demo's
shards/ at 128). The held-out documents are the same in both (chosen by content hash).

Evaluated (this process, every held-out token, dropless routing so that no token is
dropped by capacity and the comparison is only about positions):

  train_S           the trained model at S
  eval_2S_none      the same weights at 2S, max_seq_len 2S, no scaling (extrapolation)
  eval_2S_linear    position interpolation, factor 2 (model.rope_scaling: linear)
  eval_2S_ntk       NTK-aware base change, factor 2
  eval_2S_yarn      YaRN, factor 2, original length S (attention factor 0.1 ln 2 + 1)
  finetune_2S_none  --ft-steps more steps at 2S (weights of train_S, fresh AdamW, lr
  finetune_2S_linear  --ft-lr constant after 10 warm-up steps), no scaling / linear;
  finetune_2S_yarn    evaluated at 2S with the scaling they were tuned with
  continue_S        control: the same fine-tune at S, evaluated at S (how much of the
                    fine-tune's gain is just more training)

For 2S evaluations also the loss over positions < S and >= S of each 2S window. How a
model trained at S is evaluated at 2S: max_seq_len is not a checkpoint SHAPE key for rope
(no learned position table), so the checkpoint's weights load into a model built with
max_seq_len 2S and any rope_scaling; the fine-tunes start from a weights-only checkpoint
(moe_train.checkpoint.save_model_checkpoint) that ``train --resume`` loads with a fresh
optimizer at the new length.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.experiments import prepare_demo_data  # noqa: E402

SCALINGS = ("none", "linear", "ntk", "yarn")
FINETUNES = ("none", "linear", "yarn")
TOKENS_PER_STEP = 2048  # the demo's: 2 ranks x 8 x 128


def run(cmd: list[str], log: Path | None = None) -> None:
    print("+ " + " ".join(map(shlex.quote, cmd)), flush=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", "1")
    if log is None:
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    lines = log.read_text().splitlines()
    print("\n".join("    " + line for line in lines if line.startswith(("done:", "eval step"))), flush=True)
    if rc:
        print("\n".join(lines[-30:]))
        raise SystemExit(f"{cmd[3] if len(cmd) > 3 else cmd}: exit status {rc}; the whole log is {log}")


def overrides(seq_len: int, manifest: Path, out: Path, steps: int, scaling: str = "none",
              original: int | None = None) -> list[str]:
    sets = ["model.position=rope", f"model.max_seq_len={seq_len}", f"data.seq_len={seq_len}",
            f"data.manifest={manifest}", f"data.micro_batch_size={TOKENS_PER_STEP // seq_len}",
            "parallel.expert_parallel_size=1", "parallel.zero_stage=0", f"train.max_steps={steps}",
            "train.eval_every=0", "checkpoint.every_steps=0", "checkpoint.keep_last=1",
            f"checkpoint.dir={out / 'ckpt'}", f"logging.dir={out / 'tb'}", "logging.every_steps=50"]
    if scaling != "none":
        sets += [f"model.rope_scaling={scaling}", f"model.rope_scaling_factor={seq_len / original}",
                 f"model.rope_original_max_len={original}"]
    return sets


def train(sets: list[str], log: Path, resume: str = "none") -> None:
    cmd = [sys.executable, "-m", "moe_train", "train", "--config", "configs/tiny_switch.yaml", "--resume", resume]
    run(cmd + [a for s in sets for a in ("--set", s)], log)


def evaluate(checkpoint: Path, manifest: Path, seq_len: int, scaling: str = "none",
             original: int | None = None) -> dict:
    """Held-out loss of a checkpoint's weights in a model of max_seq_len ``seq_len`` with
    ``scaling`` (factor seq_len / original), dropless, over every held-out token of the
    manifest; also split into positions < original and >= original."""
    import torch
    import torch.nn.functional as F

    from moe_train.data import DataConfig, build_val_loader
    from moe_train.inference import load_for_inference
    from moe_train.model.transformer import MoETransformer

    loaded = load_for_inference(checkpoint, dropless=True)
    model_cfg = dataclasses.replace(loaded.cfg.model, max_seq_len=seq_len, rope_scaling=scaling,
                                    rope_scaling_factor=seq_len / original if scaling != "none" else 1.0,
                                    rope_original_max_len=original if scaling != "none" else None)
    model = MoETransformer(model_cfg, loaded.cfg.moe).eval()
    model.load_state_dict(loaded.model.state_dict())
    data_cfg = DataConfig(manifest=str(manifest), seq_len=seq_len, micro_batch_size=TOKENS_PER_STEP // seq_len,
                          num_workers=0)
    split = original or seq_len
    sums, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in build_val_loader(data_cfg, 0, 1):
            logits = model(batch["input_ids"]).logits_BSV.float()
            labels = batch["labels"]
            nll_BS = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                     reduction="none").view(labels.shape).double()
            valid_BS = labels != -100
            late_S = torch.arange(labels.shape[1]) >= split
            for i, part in enumerate((~late_S, late_S)):
                sums[i] += nll_BS[:, part][valid_BS[:, part]].sum()
                counts[i] += valid_BS[:, part].sum()
    result = {"seq_len": seq_len, "val_loss": round(float(sums.sum() / counts.sum()), 4),
              "tokens": int(counts.sum())}
    if counts[1] > 0:
        result[f"val_loss_pos_lt_{split}"] = round(float(sums[0] / counts[0]), 4)
        result[f"val_loss_pos_ge_{split}"] = round(float(sums[1] / counts[1]), 4)
    return result


def weights_checkpoint(source: Path, root: Path, sets: list[str]) -> Path:
    """The trained weights as a weights-only checkpoint at step 0 under the fine-tune's
    config (``train --resume`` checks the SHAPE keys against it: they are the same)."""
    import torch

    from moe_train.checkpoint import TrainState, save_model_checkpoint
    from moe_train.config import config_to_dict, load_config
    from moe_train.inference import load_for_inference

    loaded = load_for_inference(source)
    cfg = load_config(REPO / "configs" / "tiny_switch.yaml", sets)
    torch.manual_seed(0)
    return save_model_checkpoint(root, loaded.model, config_to_dict(cfg), TrainState(),
                                 origin=f"docs/long_context_experiment.py: the weights of {source}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=64, help="S, the training length (2S: evaluation)")
    p.add_argument("--steps", type=int, default=400, help="training steps at S")
    p.add_argument("--ft-steps", type=int, default=60, help="fine-tune steps at 2S")
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--data", default=str(REPO / "demo_out" / "shakespeare"))
    p.add_argument("--work", default=str(REPO / "demo_out" / "long_context"))
    p.add_argument("--json", default=str(REPO / "docs" / "model_options.json"))
    p.add_argument("--no-json", action="store_true")
    args = p.parse_args(argv)
    S, data, work = args.seq_len, Path(args.data), Path(args.work)
    start = time.time()
    short, long = prepare_demo_data(data, "shakespeare", (S, 2 * S), run=run)
    base = work / "train_S"
    train(overrides(S, short, base, args.steps), base / "console.log")
    ckpt = base / "ckpt"
    results = {"train_S": evaluate(ckpt, short, S)}
    print(f"train_S: {results['train_S']}", flush=True)
    for scaling in SCALINGS:
        results[f"eval_2S_{scaling}"] = evaluate(ckpt, long, 2 * S, scaling, S)
        print(f"eval_2S_{scaling}: {results[f'eval_2S_{scaling}']}", flush=True)
    ft_opt = [f"optim.lr={args.ft_lr}", f"optim.min_lr={args.ft_lr}", "optim.warmup_steps=10",
              "optim.decay=constant"]
    runs = [(f"finetune_2S_{s}", 2 * S, long, s) for s in FINETUNES] + [("continue_S", S, short, "none")]
    for name, seq_len, manifest, scaling in runs:
        out = work / name
        sets = overrides(seq_len, manifest, out, args.ft_steps, scaling, S) + ft_opt
        init = weights_checkpoint(ckpt, out / "init", sets)
        train(sets, out / "console.log", resume=str(init))
        results[name] = evaluate(out / "ckpt", manifest, seq_len, scaling, S)
        print(f"{name}: {results[name]}", flush=True)
    command = " ".join(["python docs/long_context_experiment.py"] + (argv if argv is not None else sys.argv[1:]))
    for name, entry in results.items():
        entry["command"] = command
        entry["train_steps_at_S"] = args.steps
        entry["finetune_steps"] = args.ft_steps if name.startswith(("finetune", "continue")) else 0
    print_table(results, S)
    print(f"\n{time.time() - start:.0f} s")
    if not args.no_json:
        from benchmarks.results import update_json_section
        update_json_section(args.json, "long_context", results)
        print(f"wrote section 'long_context' of {args.json}")
    return 0


def print_table(results: dict, S: int) -> None:
    print(f"\n| run | eval length | held-out loss | positions < {S} | positions >= {S} | perplexity |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        lt, ge = r.get(f"val_loss_pos_lt_{S}"), r.get(f"val_loss_pos_ge_{S}")
        fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        print(f"| {name} | {r['seq_len']} | {r['val_loss']:.4f} | {fmt(lt)} | {fmt(ge)} | "
              f"{math.exp(r['val_loss']):.1f} |")


if __name__ == "__main__":
    raise SystemExit(main())
