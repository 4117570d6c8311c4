"""``moe-train check``: validate a config for a world size and print the resolved config,
the batch arithmetic, capacities, causality, data, model size, memory per rank (each
part and the peak of each phase, ``sizing.memory_plan``), process groups and the derived
DeepSpeed config, without starting any process group, so a user can see what a launch
will do before spending a queue slot on it. The output does not grow with the world size
(per-rank group lines only up to 16 ranks or with ``--verbose``). ``--measure`` also
trains the config for a few steps on this machine and prints the estimate against the
measured peak (``train/memory_probe.py``)."""

from __future__ import annotations

import argparse

from moe_train.commands import add_config_args


def cmd_check(args: argparse.Namespace) -> int:
    from moe_train.config import deepspeed_config, dump_config, load_config, validate
    from moe_train.model.sizing import with_bucket_default
    from moe_train.moe.router import expert_capacity
    from moe_train.parallel.topology import Topology

    if args.measure and args.measure_steps < 2:
        raise ValueError(f"--measure-steps {args.measure_steps}: must be >= 2 (Adam's state exists from the "
                         "first step on)")
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
    if args.measure:
        print(f"\n# memory per rank, measured (world size {args.world_size})")
        print("\n".join(_measure_lines(cfg, args)))
    print("\n# process groups")
    print("\n".join(topo.describe(verbose=args.verbose)))
    print("\n# deepspeed config (derived)")
    print(with_bucket_default(deepspeed_config(cfg, args.world_size), cfg.model, cfg.moe,
                              cfg.parallel.expert_parallel_size))
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
    """The memory plan (``sizing.memory_plan``): each part, the peak of each phase, the
    total (the largest phase) and where the reduce bucket's size comes from."""
    from moe_train.model.sizing import DEEPSPEED_REDUCE_BUCKET, PLAN_PHASES, gib, plan_from_config

    plan = plan_from_config(cfg, world_size)
    ckpt = cfg.train.activation_checkpointing
    lines = [f"ZeRO-{cfg.parallel.zero_stage}, {cfg.train.dtype}, Adam, activation checkpointing "
             f"{'on' if ckpt else 'off'}; bytes the allocator hands out (formulas: moe_train/model/sizing.py)"]
    for name, value in plan.parts.items():
        lines.append(f"{name}: {gib(value)}")
    lines.append("peak by phase: " + ", ".join(f"{p} {gib(plan.phases[p])}" for p in PLAN_PHASES))
    if plan.worst_case_extra:
        lines.append(f"dropless worst case (every assignment of the EP group routed to this rank's experts): "
                     f"+{gib(plan.worst_case_extra)}")
    if plan.bucket_source == "derived" and plan.reduce_bucket == DEEPSPEED_REDUCE_BUCKET:
        lines.append("reduce_bucket_size: DeepSpeed's 5e8 elements (this rank reduces more gradient elements "
                     "than that, so the bucket fills and reduces several times)")
    elif plan.bucket_source == "derived":
        waste = (DEEPSPEED_REDUCE_BUCKET - plan.reduce_bucket) * plan.bucket_bytes_per_element
        lines.append(f"reduce_bucket_size: {plan.reduce_bucket:,} elements, derived from the model size (the "
                     f"gradient elements this rank reduces); DeepSpeed's default 5e8 would allocate "
                     f"{gib(waste)} more and reduce the same gradients in the same one bucket "
                     f"(set deepspeed.zero_optimization.reduce_bucket_size to override)")
    elif plan.bucket_source == "deepspeed":
        lines.append(f"reduce_bucket_size: {plan.reduce_bucket:,} elements, from deepspeed.zero_optimization."
                     f"reduce_bucket_size")
    lines.append(f"total: {gib(plan.peak)} (the peak, in {plan.peak_phase}; allocator padding, CUDA context "
                 f"and NCCL buffers not included)")
    return lines


def _measure_lines(cfg, args) -> list[str]:
    """``--measure``: the same config trained for ``--measure-steps`` steps on
    ``--world-size`` gloo ranks of this machine, the allocator's peak by phase
    (``train/memory_probe.py``) against the plan."""
    from moe_train.model.sizing import PLAN_PHASES, gib, plan_from_config
    from moe_train.train.memory_probe import measure

    plan = plan_from_config(cfg, args.world_size)
    ranks = measure(args.config, args.overrides, args.world_size, steps=args.measure_steps)
    top = max(ranks, key=lambda r: r["peak"])
    lines = [f"{args.world_size} gloo rank(s) on this machine's CPU, {args.measure_steps} steps on random tokens; "
             f"the allocator's peak (PyTorch profiler memory events), the larger rank "
             f"(per rank: {', '.join(gib(r['peak']) for r in ranks)})",
             f"{'phase':>9} {'estimate':>12} {'measured':>12} {'ratio':>6}"]
    for p in PLAN_PHASES:
        got = top["phases"].get(p, {}).get("peak", 0)
        ratio = f"{plan.phases[p] / got:6.2f}" if got else "     -"
        lines.append(f"{p:>9} {gib(plan.phases[p]):>12} {gib(got):>12} {ratio}")
    lines.append(f"{'peak':>9} {gib(plan.peak):>12} {gib(top['peak']):>12} {plan.peak / top['peak']:6.2f}")
    return lines


def _check_data(cfg, world_size: int, tokens_per_step: int) -> list[str]:
    """Opens the manifest (not the shards): split sizes, steps per epoch, vocabulary fit."""
    from moe_train.config import check_vocab_fits
    from moe_train.data import build_train_loader

    train = build_train_loader(cfg.data, 0, world_size)  # raises ValueError on a mismatch
    vocab = train.manifest["vocab_size"]
    check_vocab_fits(cfg, vocab)
    epochs = cfg.train.max_steps * cfg.train.grad_accum_steps / max(train.steps_per_epoch, 1)
    return [f"train split: {train.num_samples} samples of {cfg.data.seq_len} tokens, "
            f"{train.steps_per_epoch} steps per epoch on every rank; tokenizer vocab {vocab}",
            f"train.max_steps = {cfg.train.max_steps}: {cfg.train.max_steps * tokens_per_step:,} "
            f"tokens, {epochs:.2f} epochs"]


def register(subparsers) -> None:
    p = subparsers.add_parser("check", help="validate a config for a world size and print the layout")
    add_config_args(p)
    p.add_argument("--world-size", type=int, required=True, help="number of ranks to plan for")
    p.add_argument("--verbose", action="store_true",
                   help="one process-group line per rank whatever the world size (by default only "
                        "up to 16 ranks; above that the groups are printed by their pattern)")
    p.add_argument("--measure", action="store_true",
                   help="also train the config for a few steps on --world-size gloo ranks of this machine "
                        "(CPU) and print the estimate against the allocator's measured peak, by phase")
    p.add_argument("--measure-steps", type=int, default=3, help="steps --measure trains (>= 2; default 3)")
    p.set_defaults(func=cmd_check)
