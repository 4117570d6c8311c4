"""Subcommands beyond train/check/ckpt/generate: every module in this package defines
``register(subparsers)``, which adds its parser(s) with ``set_defaults(func=...)``, and
``moe-train`` picks each module up. Heavy imports (torch, transformers) stay inside the
command functions so that ``moe-train --help`` stays fast."""
