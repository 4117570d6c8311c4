"""``moe-train export --format hf`` and ``moe-train import --from-hf`` (moe_train/hf/).

    moe-train export --checkpoint runs/x/checkpoints --out runs/x/hf --format hf
    moe-train import --from-hf runs/x/hf --out runs/y --config configs/my_training.yaml
    moe-train train --config runs/y/config.yaml
"""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> int:
    from moe_train.hf.export import export_hf

    if args.format != "hf":
        raise ValueError(f"--format {args.format}: the only format is hf")
    report = export_hf(args.checkpoint, args.out, arch=args.arch, allow_inexact=args.allow_inexact,
                       dtype=args.dtype, tokenizer=args.tokenizer, with_tokenizer=not args.no_tokenizer,
                       check=args.check)
    print("\n".join(report.lines()))
    if report.check and not report.plan.inexact and report.check["max_abs_diff"] > 1e-4:
        print("ERROR: an exact export computes different logits: please report this as a bug")
        return 1
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from moe_train.hf.importer import import_hf

    report = import_hf(args.from_hf, args.out, args.config, args.overrides)
    print("\n".join(report.lines()))
    return 0


def register(subparsers) -> None:
    ex = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face transformers model directory (Qwen3-MoE, "
                       "Mixtral or Qwen2-MoE, whichever computes the same function), with its tokenizer")
    ex.add_argument("--checkpoint", required=True,
                    help="a step_N directory, or a checkpoint.dir (its newest complete checkpoint, which "
                         "must pass verification)")
    ex.add_argument("--out", required=True, help="a new (or empty) directory")
    ex.add_argument("--format", default="hf", choices=["hf"], help="hf: transformers (default, the only one)")
    ex.add_argument("--arch", default="auto", choices=["auto", "qwen3_moe", "mixtral", "qwen2_moe"],
                    help="target architecture (default auto: Qwen3-MoE, else Mixtral, else Qwen2-MoE, "
                         "the first that represents the model)")
    ex.add_argument("--allow-inexact", action="store_true",
                    help="export even when an option has no exact counterpart (eval capacity dropping, "
                         "sigmoid scores, selection bias, expert groups, block/Longformer attention), "
                         "with a warning naming each difference")
    ex.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="tensor dtype (default auto: as stored in the checkpoint)")
    ex.add_argument("--tokenizer", default=None,
                    help="SentencePiece .model (default: the one named by the training data manifest)")
    ex.add_argument("--no-tokenizer", action="store_true", help="write the model without tokenizer files")
    ex.add_argument("--check", action="store_true",
                    help="load the result with transformers and print the largest logit difference from "
                         "moe_train's model on a random batch and whether greedy decoding agrees")
    ex.set_defaults(func=cmd_export)
    im = subparsers.add_parser(
        "import", help="turn a Hugging Face Qwen3-MoE / Mixtral / Qwen2-MoE directory into a weights-only "
                       "checkpoint and config that train --resume continues")
    im.add_argument("--from-hf", required=True, dest="from_hf", help="the Hugging Face model directory")
    im.add_argument("--out", required=True,
                    help="a new directory: gets step_00000000, latest and config.yaml (checkpoint.dir = it)")
    im.add_argument("--config", default=None,
                    help="YAML whose data/optim/train/parallel/logging sections (and training-only model/moe "
                         "keys) the imported run uses; its model-defining keys are replaced")
    im.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one training key, e.g. --set data.manifest=shards/manifest.json")
    im.set_defaults(func=cmd_import)
