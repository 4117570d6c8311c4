"""``moe-train launch``: run ``moe-train train`` under a local launcher (deepspeed,
torchrun or mpirun) with stop signals forwarded to the trainers as a checkpoint-and-stop
request (``moe_train.parallel.launch``). Prints the launcher's exact command."""

from __future__ import annotations

import argparse
import os


def cmd_launch(args: argparse.Namespace) -> int:
    from moe_train.parallel.launch import build_command, run

    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: must be >= 1")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    return run(build_command(args.launcher, args.nproc, train_args, args.master_port), args.grace_s)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", help="run `train` on this machine under deepspeed, torchrun or mpirun, forwarding SIGTERM / "
                       "SIGINT / SIGUSR1 to the trainers as a checkpoint-and-stop request",
        description="moe-train launch --launcher deepspeed --nproc 2 -- --config configs/tiny_moe.yaml "
                    "[--set a.b=c] [--resume auto|PATH|none]")
    p.add_argument("--launcher", default="deepspeed", choices=("deepspeed", "torchrun", "mpirun"))
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this machine")
    p.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", 29500)))
    p.add_argument("--grace-s", type=float, default=float(os.environ.get("MOE_TRAIN_GRACE_S", 600)),
                   help="after a stop signal, how long the trainers get to checkpoint and exit")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of `moe-train train`")
    p.set_defaults(func=cmd_launch)
