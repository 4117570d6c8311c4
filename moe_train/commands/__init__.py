"""Every subcommand of ``moe-train``, one small file each: argument parsing and one call
down. Each module defines ``register(subparsers)``, which adds its parser(s) with
``set_defaults(func=...)``; ``moe_train.cli`` lists the modules in the order ``--help``
shows them. Heavy imports (torch, deepspeed, transformers) stay inside the command
functions, so ``moe-train --help`` stays fast and ``train``'s stop handlers are in place
before torch loads.

May import: anything in moe_train (the top of the house, with ``cli``).
"""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set section.key=value``."""
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set moe.top_k=2 (repeatable)")
