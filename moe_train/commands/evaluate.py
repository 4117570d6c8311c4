"""``moe-train eval``: the held-out loss and perplexity of a checkpoint on the validation
split of its training data, sampled lines, and the TensorBoard command of its run (what
``launchers/demo.sh`` ends with; ``moe_train.inference.report``)."""

from __future__ import annotations

import argparse


def cmd_eval(args: argparse.Namespace) -> int:
    from moe_train.inference.report import report

    report(args.checkpoint, args.logdir, args.prompt, args.max_new_tokens)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="held-out loss and perplexity of a checkpoint, samples, and the "
                                           "TensorBoard command (one process, any ep)")
    p.add_argument("--checkpoint", required=True, help="checkpoint.dir of the run (its newest) or a step dir")
    p.add_argument("--logdir", default=None, help="logging.dir of the run (prints the TensorBoard command)")
    p.add_argument("--prompt", action="append", default=[],
                   help="one sample per prompt (repeatable; \\n is a line break; default: one unprompted sample)")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.set_defaults(func=cmd_eval)
