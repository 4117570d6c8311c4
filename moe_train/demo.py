"""End-to-end demo: a tiny MoE language model trained with expert parallelism on
streaming webdataset shards, on CPU (gloo) or GPU (NCCL).

    python -m moe_train.demo corpus --out demo_out/corpus.jsonl     # synthetic text
    torchrun --standalone --nproc_per_node 2 -m moe_train.demo train \\
        --config configs/tiny_moe.yaml --set data.manifest=demo_out/shards/manifest.json

``launchers/demo.sh`` runs the whole chain (corpus -> tokenizer -> shards -> training).

This is a plain PyTorch loop (AdamW, EP-aware gradient reduction and clipping) that
exercises the MoE layer, the expert-parallel groups and the data pipeline together; the
DeepSpeed ZeRO engine replaces its optimizer step in the training issue that follows.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from moe_train.config import Config, check_vocab_fits, load_config, validate
from moe_train.moe.losses import total_loss
from moe_train.parallel.grads import allreduce_gradients, clip_grad_norm_

_WORDS = ("the expert router sends each token to a small network that learns one kind of "
          "pattern while a shared attention layer mixes context across the whole sequence "
          "capacity limits how many tokens an expert may take and the balancing loss keeps "
          "the load even so that no expert sits idle during training on many machines").split()


def write_demo_corpus(path: str, num_docs: int = 4000, seed: int = 0) -> int:
    """Writes a synthetic JSONL corpus ({"text": ...} per line) with learnable structure:
    sentences drawn from a small Markov chain over ``_WORDS``. Returns the doc count."""
    rng = random.Random(seed)
    successors = {w: rng.sample(_WORDS, 4) for w in _WORDS}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(num_docs):
            sentences = []
            for _ in range(rng.randint(2, 6)):
                word = rng.choice(_WORDS)
                words = [word]
                for _ in range(rng.randint(5, 14)):
                    word = rng.choice(successors[word])
                    words.append(word)
                sentences.append(" ".join(words).capitalize() + ".")
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return num_docs


def _log(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def _batches(loader):
    """Endless stream over epochs (the loader yields one epoch per iteration)."""
    while True:
        yield from loader


def train(cfg: Config, max_steps: int | None = None) -> list[float]:
    """Trains ``cfg`` for ``max_steps`` (default ``train.max_steps``); returns the lm
    losses on rank 0 (an empty list on other ranks)."""
    from moe_train.data.loader import build_train_loader
    from moe_train.model.transformer import MoETransformer
    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.init import init_distributed
    from moe_train.parallel.topology import Topology

    env, device = init_distributed(cfg.parallel.device, cfg.parallel.backend, cfg.parallel.timeout_s)
    plan = validate(cfg, env.world_size)
    topo = Topology(env.world_size, cfg.parallel.expert_parallel_size, cfg.moe.num_experts)
    groups = build_groups(topo, env.rank)
    _log(env.rank, "\n".join(topo.describe()))
    torch.manual_seed(cfg.train.seed)  # same dense init on every rank
    balance_group = groups.dp if cfg.moe.balance_scope == "global" else None
    model = MoETransformer(cfg.model, cfg.moe, ep_group=groups.ep, balance_group=balance_group).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    loader = build_train_loader(cfg.data, env.rank, env.world_size)
    check_vocab_fits(cfg, loader.manifest["vocab_size"])
    batches = _batches(loader)
    steps = max_steps or cfg.train.max_steps
    losses: list[torch.Tensor] = []  # read on log steps only: no per-step host sync
    t0 = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            for group in opt.param_groups:
                group["lr"] = cfg.optim.lr * min(1.0, step / max(cfg.optim.warmup_steps, 1))
            opt.zero_grad(set_to_none=True)
            for _ in range(cfg.train.grad_accum_steps):
                batch = next(batches)
                out = model(batch["input_ids"].to(device), batch["labels"].to(device))
                loss = total_loss(out.lm_loss, out.moe_losses, cfg.moe) / cfg.train.grad_accum_steps
                loss.backward()
            allreduce_gradients(model, groups)
            grad_norm = clip_grad_norm_(model, cfg.optim.grad_clip, groups)
            opt.step()
            losses.append(out.lm_loss.detach())
            if step % cfg.logging.every_steps == 0 or step == steps:
                summary = [s.summary() for s in out.moe_stats]
                drop = sum(float(s["drop_frac"]) for s in summary) / max(len(summary), 1)
                cv = sum(float(s["load_cv"]) for s in summary) / max(len(summary), 1)
                tok_s = step * plan.tokens_per_step / (time.perf_counter() - t0)
                _log(env.rank, f"step {step:4d}  lm_loss {float(losses[-1]):.4f}  grad_norm {float(grad_norm):.3f}  "
                               f"drop_frac {drop:.3f}  load_cv {cv:.3f}  tokens/s {tok_s:,.0f}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return [float(v) for v in losses] if env.rank == 0 else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_train.demo", description=__doc__.split("\n")[0])
    # The deepspeed launcher passes --local_rank before the subcommand; LOCAL_RANK is read.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="write the synthetic JSONL corpus")
    corpus.add_argument("--out", required=True)
    corpus.add_argument("--docs", type=int, default=4000)
    run = sub.add_parser("train", help="train (run under torchrun / deepspeed / srun / mpirun)")
    run.add_argument("--config", required=True)
    run.add_argument("--set", dest="overrides", action="append", default=[])
    run.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "corpus":
            print(f"wrote {write_demo_corpus(args.out, args.docs)} documents to {args.out}")
            return 0
        losses = train(load_config(args.config, args.overrides), args.steps)
    except ValueError as err:
        print(f"moe_train.demo: error: {err}", file=sys.stderr)
        return 2
    if not losses:
        return 0
    first, last = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
    print(f"mean lm_loss of the first 5 steps {first:.3f}, of the last 5 steps {last:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
