"""``moe-train train``: pretrain (one process, or under torchrun / deepspeed / srun / mpirun)."""

from __future__ import annotations

import argparse
import os
import sys

from moe_train.commands import add_config_args


def cmd_train(args: argparse.Namespace) -> int:
    """Exit codes: 0 finished; 85 stopped on a signal or time limit with a checkpoint
    written (requeue); 2 bad config; 3 a checkpoint unusable, or the final save / a stop's save /
    checkpoint.max_failed_saves saves in a row failed; 1 a failure (rank, step and
    phase printed); 86 the watchdog ended a hung rank."""
    from moe_train.checkpoint.state import CheckpointError
    from moe_train.config import load_config
    from moe_train.parallel.phase import failure_report
    from moe_train.train.control import EARLY_STOP, EXIT_REQUEUE, ignore_stop_signals
    from moe_train.train.faults import Faults
    from moe_train.train.loop import train

    cfg = load_config(args.config, args.overrides)
    faults = Faults.from_env()  # empty unless a test asked for faults (moe_train/train/faults.py)
    try:
        result = train(cfg, resume=args.resume, stop=EARLY_STOP, faults=faults)
    except ValueError:
        raise
    except CheckpointError as err:  # the CLI's one line, then out without interpreter shutdown,
        # whose teardown of gloo and DeepSpeed threads can abort (SIGABRT) while a peer exits
        sys.stderr.write(f"moe-train train: checkpoint error: {err}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(3)
    except Exception as err:  # a dead peer, a timeout, a bug: say where, exit non-zero now
        sys.stderr.write(failure_report(err))
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)  # no atexit handlers: they may wait on peers that are gone
    ignore_stop_signals()
    return EXIT_REQUEUE if result.stopped else 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain (one process, or under torchrun / deepspeed / srun / mpirun)")
    add_config_args(p)
    p.add_argument("--resume", default="auto", metavar="auto|PATH|none",
                   help="auto (default): the newest complete checkpoint in checkpoint.dir, if any; "
                        "PATH: that checkpoint; none: start fresh")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)
