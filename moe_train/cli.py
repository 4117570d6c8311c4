"""Command line: ``moe-train train``, ``moe-train check`` and ``moe-train ckpt``.

``check`` prints the resolved config, the batch arithmetic and the process-group layout
for a world size without starting any process group, so a user can see what a launch
will do before spending a queue slot on it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

from moe_train import commands
from moe_train.checkpoint import CheckpointError
from moe_train.config import check_vocab_fits, deepspeed_config, dump_config, load_config, validate


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set moe.top_k=2 (repeatable)")


def cmd_check(args: argparse.Namespace) -> int:
    from moe_train.moe.router import expert_capacity
    from moe_train.parallel.topology import Topology

    cfg = load_config(args.config, args.overrides)
    plan = validate(cfg, args.world_size)
    topo = Topology(args.world_size, cfg.parallel.expert_parallel_size, cfg.moe.num_experts)
    # Everything that can fail runs before anything is printed: one error line, no wall.
    data_lines = _check_data(cfg, args.world_size, plan.tokens_per_step) if cfg.data.manifest else []
    size_lines, memory_lines = _model_size_lines(cfg), _memory_lines(cfg, args.world_size)
    print(f"# resolved config ({args.config})")
    print(dump_config(cfg).rstrip())
    print("\n# batch arithmetic")
    print(f"world size {plan.world_size} x micro batch {plan.micro_batch_size} x grad accum "
          f"{plan.grad_accum_steps} = global batch {plan.global_batch_size} sequences "
          f"= {plan.tokens_per_step} tokens per step (seq_len {plan.seq_len})")
    print(f"routing group: {plan.tokens_per_routing_group} tokens per rank per micro-step")
    for name, cf in (("train", cfg.moe.capacity_factor), ("eval", cfg.moe.eval_capacity_factor)):
        cap = expert_capacity(plan.tokens_per_routing_group, cfg.moe.num_experts, cfg.moe.top_k,
                              cf, cfg.moe.min_capacity)
        print(f"{name} capacity per expert per rank: " + ("dropless" if cap is None else str(cap)))
    print(_causality_line(cfg.moe))
    if data_lines:
        print(f"\n# data ({cfg.data.manifest})")
        print("\n".join(data_lines))
    print("\n# model size")
    print("\n".join(size_lines))
    print(f"\n# memory per rank (estimate; world size {args.world_size})")
    print("\n".join(memory_lines))
    print("\n# process groups")
    print("\n".join(topo.describe()))
    print("\n# deepspeed config (derived)")
    print(deepspeed_config(cfg, args.world_size))
    return 0


def _causality_line(moe) -> str:
    """MOE_REFERENCE.md, Causality: a decoder's routing must not let later tokens of a
    sequence change earlier tokens' outputs. Training and evaluation have their own
    capacity factor, so each is judged; scores, the selection bias (fixed during a
    forward), groups and the shared expert act per token and never break causality."""
    train, evaluation = (_causality(moe, moe.capacity_factor), _causality(moe, moe.eval_capacity_factor))
    if train == evaluation:
        return (f"routing is causal ({train})" if train.startswith(("dropless", "position"))
                else f"WARNING: routing is NOT causal in training and evaluation: {train}")
    parts = [f"{name}: " + (f"causal ({why})" if why.startswith(("dropless", "position")) else f"NOT causal: {why}")
             for name, why in (("training", train), ("evaluation", evaluation))]
    flag = "WARNING: " if any("NOT" in p for p in parts) else ""
    return f"{flag}routing {'; '.join(parts)}"


def _causality(moe, capacity_factor) -> str:
    """Why routing with this capacity factor is causal (starts with 'dropless' or
    'position') or not (anything else)."""
    if capacity_factor is None:
        return "dropless"
    if moe.drop_policy == "probs":
        return ("drop_policy 'probs' with a finite capacity lets a later token with a higher "
                "router prob evict an earlier one")
    if moe.top_k > 1:
        return ("with top_k > 1 and a finite capacity the position policy places every first "
                "choice before any second choice, so a later token can evict an earlier token's "
                "second choice")
    return "position drop policy, top-1"


def _model_size_lines(cfg) -> list[str]:
    from moe_train.model.sizing import flops_per_token, human_count, param_counts, saving_lines

    n = param_counts(cfg.model, cfg.moe)
    flops = flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len)
    moe_blocks = [i for i in range(cfg.model.num_layers) if cfg.model.is_moe_block(i)]
    shared = (f", shared experts {human_count(n.shared)} (d_ff {cfg.moe.shared_d_ff}, "
              f"gate {cfg.moe.shared_gate}; dense)" if n.shared else "")
    return [f"parameters: total {human_count(n.total)} ({n.total:,}), expert {human_count(n.expert)}, "
            f"dense {human_count(n.dense)} (embeddings {human_count(n.embedding)}, "
            f"routers {human_count(n.router)}{shared})",
            f"active per token: {human_count(n.active_per_token)} ({n.active_per_token:,}; "
            f"dense + top-{cfg.moe.top_k} experts per MoE block"
            f"{' + the shared expert' if n.shared else ''}, embeddings included)",
            f"MoE blocks: {len(moe_blocks)} of {cfg.model.num_layers} ({_index_list(moe_blocks)})",
            f"training FLOPs per token: {flops:.4g} (3 x forward, seq_len {cfg.data.seq_len})",
            *saving_lines(cfg.model, cfg.moe)]


def _index_list(ids: list[int]) -> str:
    """[1, 3, 5, 7, 9] -> '1, 3, ..., 9' (an arithmetic run longer than 4); else all."""
    steps = {b - a for a, b in zip(ids, ids[1:])}
    if len(ids) > 4 and len(steps) == 1:
        return f"{ids[0]}, {ids[1]}, ..., {ids[-1]}"
    return ", ".join(map(str, ids)) or "none"


def _memory_lines(cfg, world_size: int) -> list[str]:
    from moe_train.model.sizing import gib, memory_estimate

    ckpt = getattr(cfg.train, "activation_checkpointing", False)
    mem = memory_estimate(cfg.model, cfg.moe, world_size=world_size,
                          ep_size=cfg.parallel.expert_parallel_size, zero_stage=cfg.parallel.zero_stage,
                          dtype=cfg.train.dtype, micro_batch_size=cfg.data.micro_batch_size,
                          seq_len=cfg.data.seq_len, activation_checkpointing=ckpt)
    return [f"ZeRO-{cfg.parallel.zero_stage}, {cfg.train.dtype}, Adam, activation checkpointing "
            f"{'on' if ckpt else 'off'}",
            f"parameters: {gib(mem.params)}",
            f"gradients: {gib(mem.grads)}",
            f"optimizer state: {gib(mem.optimizer)}",
            f"activations per micro-batch ({cfg.data.micro_batch_size} x {cfg.data.seq_len} "
            f"tokens): {gib(mem.activations)}",
            f"total: {gib(mem.total)} (no allocator overhead, buffers or communication buffers)"]


def _check_data(cfg, world_size: int, tokens_per_step: int) -> list[str]:
    """Opens the manifest (not the shards): split sizes, steps per epoch, vocabulary fit."""
    from moe_train.data import build_train_loader

    train = build_train_loader(cfg.data, 0, world_size)  # raises ValueError on a mismatch
    vocab = train.manifest["vocab_size"]
    check_vocab_fits(cfg, vocab)
    epochs = cfg.train.max_steps * cfg.train.grad_accum_steps / max(train.steps_per_epoch, 1)
    return [f"train split: {train.num_samples} samples of {cfg.data.seq_len} tokens, "
            f"{train.steps_per_epoch} steps per epoch on every rank; tokenizer vocab {vocab}",
            f"train.max_steps = {cfg.train.max_steps}: {cfg.train.max_steps * tokens_per_step:,} "
            f"tokens, {epochs:.2f} epochs"]


def cmd_train(args: argparse.Namespace) -> int:
    """Exit codes: 0 finished; 85 stopped on a signal or time limit with a checkpoint
    written (requeue); 2 bad config; 3 checkpoint unusable; 1 a failure (rank, step and
    phase printed); 86 the watchdog ended a hung rank."""
    import os

    from moe_train.control import EARLY_STOP, EXIT_REQUEUE, ignore_stop_signals
    from moe_train.parallel.phase import failure_report
    from moe_train.train import train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume, stop=EARLY_STOP)
    except (ValueError, CheckpointError):
        raise
    except Exception as err:  # a dead peer, a timeout, a bug: say where, exit non-zero now
        sys.stderr.write(failure_report(err))
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)  # no atexit handlers: they may wait on peers that are gone
    ignore_stop_signals()
    return EXIT_REQUEUE if result.stopped else 0


def cmd_ckpt(args: argparse.Namespace) -> int:
    """Lists a run's checkpoints (step, tokens, topology, complete or not, size),
    verifies checkpoints against their manifests (``ckpt verify PATH``), or converts one
    into a canonical checkpoint that loads at any layout (``ckpt canonical PATH``)."""
    from moe_train.canonical import complete_canonical
    from moe_train.checkpoint import LATEST, list_checkpoints

    if args.action == "verify":
        return _verify(args.path or args.dir)
    if args.action == "canonical":
        return _canonical(args.path or args.dir)
    if args.path:
        raise ValueError(f"`ckpt {args.path}`: the actions are list (default), verify PATH and canonical PATH")
    root = args.dir
    if args.config:
        root = load_config(args.config, args.overrides).checkpoint.dir
    if not root:
        raise ValueError("give a checkpoint directory (--dir) or --config")
    entries = list_checkpoints(root)
    if not entries:
        print(f"no checkpoints under {root}")
        return 0
    pointer = Path(root) / LATEST
    latest = pointer.read_text().strip() if pointer.is_file() else None
    print(f"{'checkpoint':<24} {'step':>8} {'tokens':>14} {'world':>5} {'ep':>3} {'MiB':>8}  state")
    for path, meta, complete in entries:
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2 ** 20
        topo = (meta or {}).get("topology", {})
        status = "complete" if complete else "INCOMPLETE (ignored by --resume auto)"
        if path.name == latest:
            status += ", latest"
        if complete and complete_canonical(path):
            status += ", + canonical (any layout)"
        print(f"{path.name:<24} {(meta or {}).get('step', '?'):>8} {(meta or {}).get('tokens_seen', '?'):>14,} "
              f"{topo.get('world_size', '?'):>5} {topo.get('ep_size', '?'):>3} {size:>8.1f}  {status}"
              if meta else f"{path.name:<24} {'?':>8} {'?':>14} {'?':>5} {'?':>3} {size:>8.1f}  {status}")
    return 0


def _verify(target: str | None) -> int:
    """Checks one checkpoint (a step directory) or every checkpoint under a
    checkpoint.dir against its manifest, without loading a model. Exit 0 when all pass,
    3 when any fails (each problem on its own line)."""
    from moe_train.checkpoint import list_checkpoints, read_meta, verify_checkpoint

    if not target:
        raise ValueError("ckpt verify needs a checkpoint directory: moe-train ckpt verify PATH")
    path = Path(target)
    if not path.exists():
        raise ValueError(f"ckpt verify {target}: no such directory")
    steps = [path] if (path / "meta.json").is_file() else [p for p, _, _ in list_checkpoints(path)
                                                            if p.name.startswith("step_")]
    if not steps:
        raise ValueError(f"ckpt verify {target}: neither a checkpoint (no meta.json) nor a directory of them")
    failed = 0
    for step_dir in steps:
        if (read_meta(step_dir) or {}).get("kind") == "canonical":  # PATH/canonical itself
            failed += _verify_canonical(step_dir)
            continue
        problems = verify_checkpoint(step_dir)
        meta = read_meta(step_dir) or {}
        files = meta.get("manifest", {}).get("files", {})
        tensors = sum(len(f["tensors"]) for f in files.values())
        if problems:
            failed += 1
            print(f"FAILED  {step_dir}: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  - {problem}")
        else:
            kind = "weights only" if meta.get("weights_only") else "weights + optimizer + RNG"
            print(f"OK      {step_dir}: {len(files)} files, {tensors} tensors match the manifest ({kind})")
        failed += _verify_canonical(step_dir / "canonical")
    return 3 if failed else 0


def _verify_canonical(path: Path) -> int:
    """Prints the verification of a step's canonical checkpoint, if it has one; 1 if it fails."""
    from moe_train.canonical import verify

    if not path.is_dir():
        return 0
    problems = verify(path)
    if problems:
        print(f"FAILED  {path}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    manifest = json.loads((path / "meta.json").read_text())["manifest"]
    print(f"OK      {path}: {len(manifest['files'])} files, {len(manifest['tensors'])} tensors match the "
          f"manifest (canonical: any layout)")
    return 0


def _canonical(target: str | None) -> int:
    """``ckpt canonical PATH``: writes PATH/canonical from an engine checkpoint
    (``moe_train.reshard.convert``: the saved number of ranks, gloo on CPU when not
    launched)."""
    from moe_train.checkpoint import read_meta
    from moe_train.reshard import convert

    if not target:
        raise ValueError("ckpt canonical needs an engine checkpoint: moe-train ckpt canonical PATH")
    if not Path(target).exists():
        raise ValueError(f"ckpt canonical {target}: no such directory")
    out = convert(target)
    meta = read_meta(out)
    topo, size = meta["topology"], sum(f["bytes"] for f in meta["manifest"]["files"].values()) / 2 ** 20
    print(f"OK      {out}: canonical checkpoint of step {meta['step']} from the ZeRO partitions of "
          f"{topo['world_size']} ranks (ep {topo['ep_size']}); {len(meta['manifest']['tensors'])} tensors, "
          f"{size:.1f} MiB, verified. `moe-train train --resume {out}` loads it at any world size, ep "
          f"dividing {topo['num_experts']} and ZeRO stage 0-2 (--resume auto picks it at another layout)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Samples text from a checkpoint in this process (moe_train/generate.py)."""
    from moe_train.data.tokenizer import Tokenizer
    from moe_train.generate import generate_text, load_for_inference, tokenizer_path, unescape

    loaded = load_for_inference(args.checkpoint, dropless=args.dropless)
    tok = Tokenizer(tokenizer_path(loaded.cfg, args.tokenizer))
    capacity = "dropless" if loaded.cfg.moe.eval_capacity_factor is None else \
        f"eval capacity factor {loaded.cfg.moe.eval_capacity_factor}"
    print(f"# {loaded.path} (step {loaded.meta['step']}, trained at ep "
          f"{loaded.meta['topology']['ep_size']}; {loaded.cfg.moe.num_experts} experts loaded, "
          f"{capacity}; {'greedy' if args.greedy else f'temperature {args.temperature}, top-p {args.top_p}'})")
    texts = generate_text(loaded, tok, unescape(args.prompt), args.max_new_tokens,
                          0.0 if args.greedy else args.temperature, args.top_p, args.seed,
                          args.num_samples)
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1}\n{text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-train", description=__doc__.split("\n")[0])
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK from the environment is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="pretrain (one process, or under torchrun / deepspeed / srun / mpirun)")
    _add_config_args(train)
    train.add_argument("--resume", default="auto", metavar="auto|PATH|none",
                       help="auto (default): the newest complete checkpoint in checkpoint.dir, if any; "
                            "PATH: that checkpoint; none: start fresh")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    train.set_defaults(func=cmd_train)
    ck = sub.add_parser("ckpt", help="list a run's checkpoints (step, tokens, topology, complete), "
                                     "verify them (ckpt verify PATH), or make one loadable at any layout "
                                     "(ckpt canonical PATH)")
    ck.add_argument("action", nargs="?", default="list", choices=["list", "verify", "canonical"],
                    help="list (default); verify PATH against its manifest (no model, no GPU); canonical "
                         "PATH: write PATH/canonical, which resumes at any world size, ep and ZeRO stage "
                         "(runs the saved number of ranks: gloo processes on this CPU, or under a launcher)")
    ck.add_argument("path", nargs="?", default=None,
                    help="verify, canonical: a step_N directory or a checkpoint.dir (canonical: its newest)")
    ck.add_argument("--dir", default=None, help="checkpoint directory (checkpoint.dir)")
    ck.add_argument("--config", default=None, help="or: read checkpoint.dir from this config")
    ck.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ck.set_defaults(func=cmd_ckpt)
    check = sub.add_parser("check", help="validate a config for a world size and print the layout")
    _add_config_args(check)
    check.add_argument("--world-size", type=int, required=True, help="number of ranks to plan for")
    check.set_defaults(func=cmd_check)
    gen = sub.add_parser("generate", help="sample text from a checkpoint (one process, any ep)")
    gen.add_argument("--checkpoint", required=True, help="a step_N directory, or a checkpoint.dir (its newest)")
    gen.add_argument("--prompt", default="", help="text to continue (default: a new document); "
                                                  "\\n is a line break")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--greedy", action="store_true", help="argmax decoding (else temperature + top-p)")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument("--dropless", action="store_true",
                     help="route every token (default: the config's moe.eval_capacity_factor)")
    gen.add_argument("--tokenizer", default="", help="sentencepiece .model (default: the one in the "
                                                     "training manifest)")
    gen.set_defaults(func=cmd_generate)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)  # see moe_train/commands
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # user mistakes: one clear line, no traceback
        print(f"moe-train {args.command}: error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"moe-train {args.command}: checkpoint error: {err}", file=sys.stderr)
        return 3
