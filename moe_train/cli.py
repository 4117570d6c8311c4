"""``moe-train``: one subcommand per file of ``moe_train/commands``; this file only
dispatches, and turns the two kinds of user error into one line and an exit code
(``ValueError``: 2, a bad config or argument; ``CheckpointError``: 3, a checkpoint that
cannot be used)."""

from __future__ import annotations

import argparse
import sys

from moe_train.commands import check, ckpt, compress, evaluate, generate, hf, launch, train, upcycle

# In the order ``moe-train --help`` lists them: a run, then its checkpoints, then what
# turns a checkpoint into another.
COMMANDS = (train, launch, check, ckpt, generate, evaluate, hf, upcycle, compress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-train", description="Mixture-of-Experts pretraining with "
                                     "expert parallelism and DeepSpeed ZeRO")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK from the environment is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # user mistakes: one clear line, no traceback
        print(f"moe-train {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # Imported here, not at the top: `--help` and `launch` never load torch.
        from moe_train.checkpoint.state import CheckpointError

        if not isinstance(err, CheckpointError):
            raise
        print(f"moe-train {args.command}: checkpoint error: {err}", file=sys.stderr)
        return 3
