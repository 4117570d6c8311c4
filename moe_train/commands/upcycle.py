"""``moe-train upcycle``: a dense checkpoint becomes a MoE one (``moe_train.transform.upcycle``).

    moe-train upcycle --checkpoint runs/dense/checkpoints --out runs/upcycled \\
        --set model.moe_every=2 --set moe.num_experts=8 --set moe.top_k=2 \\
        --set moe.normalize_topk=true --set moe.capacity_factor=null --set moe.eval_capacity_factor=null
    moe-train train --config runs/upcycled/config.yaml
"""

from __future__ import annotations

import argparse


def cmd_upcycle(args: argparse.Namespace) -> int:
    from moe_train.transform.upcycle import upcycle_checkpoint

    report = upcycle_checkpoint(args.checkpoint, args.out, args.overrides, allow_inexact=args.allow_inexact)
    print("\n".join(report.lines()))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "upcycle", help="turn a dense checkpoint into a MoE one (sparse upcycling): experts copy the "
                        "dense MLP, a new router, a weights-only checkpoint that train --resume continues")
    p.add_argument("--checkpoint", required=True,
                   help="the dense checkpoint: a step_N directory, or a checkpoint.dir (its newest)")
    p.add_argument("--out", required=True,
                   help="new directory: gets step_00000000, latest and config.yaml (checkpoint.dir = it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change the dense run's config, e.g. --set model.moe_every=2 --set moe.num_experts=8 "
                        "(repeatable); keys that reshape copied tensors are refused")
    p.add_argument("--allow-inexact", action="store_true",
                   help="accept a config whose step-0 logits differ from the dense model's (not normalised "
                        "top-k, finite capacity, route_scale != 1, ...)")
    p.set_defaults(func=cmd_upcycle)
