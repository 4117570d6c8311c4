"""``moe-train check``: validate a config for a world size and print the resolved config,
the batch arithmetic, capacities, causality, data, model size, memory per rank, process
groups and the derived DeepSpeed config, without starting any process group, so a user
can see what a launch will do before spending a queue slot on it. The output does not
grow with the world size (per-rank group lines only up to 16 ranks or with ``--verbose``)."""

from __future__ import annotations

import argparse

from moe_train.commands import add_config_args


def cmd_check(args: argparse.Namespace) -> int:
    from moe_train.config import deepspeed_config, dump_config, load_config, validate
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
    print("\n".join(topo.describe(verbose=args.verbose)))
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
    p.set_defaults(func=cmd_check)
