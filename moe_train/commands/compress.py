"""``moe-train prune`` and ``moe-train quantize``: shrink a trained checkpoint into a new
one (``moe_train.transform``), printing weights, bytes on disk and validation loss before
and after."""

from __future__ import annotations

import argparse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a step_N directory, or a checkpoint.dir (its newest)")
    parser.add_argument("--out", required=True, help="a new checkpoint directory: OUT/step_N and OUT/latest "
                                                     "are written")
    parser.add_argument("--eval-batches", type=int, default=0, metavar="K",
                        help="measure load and loss on the first K validation micro-batches (default 0: "
                             "the whole validation split)")
    parser.add_argument("--data", default=None, metavar="MANIFEST",
                        help="validation data (default: the data.manifest of the checkpoint's config)")


def cmd_prune(args: argparse.Namespace) -> int:
    from moe_train.transform.prune import prune_checkpoint

    if args.eval_batches < 0:
        raise ValueError(f"--eval-batches {args.eval_batches}: must be >= 0")
    prune_checkpoint(args.checkpoint, args.out, keep=args.keep_experts, min_load=args.min_load,
                     dense_sparsity=args.dense_sparsity, dense_scope=args.dense_scope,
                     eval_batches=args.eval_batches, data=args.data)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from moe_train.transform.quantize import quantize_checkpoint

    if args.eval_batches < 0:
        raise ValueError(f"--eval-batches {args.eval_batches}: must be >= 0")
    quantize_checkpoint(args.checkpoint, args.out, dynamic=args.dynamic, eval_batches=args.eval_batches,
                        data=args.data)
    return 0


def register(subparsers) -> None:
    prune = subparsers.add_parser(
        "prune", help="drop the least-loaded experts of every MoE layer and/or magnitude-prune the dense "
                      "weights; writes a checkpoint that train --resume, generate and evaluation load")
    _common(prune)
    how = prune.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep-experts", type=int, default=None, metavar="N",
                     help="keep the N experts with the highest measured load in every MoE layer")
    how.add_argument("--min-load", type=float, default=None, metavar="FRAC",
                     help="keep, in every layer, as many experts as the layer with the most experts whose "
                          "load (share of its routed assignments) is >= FRAC")
    prune.add_argument("--dense-sparsity", type=float, default=0.0, metavar="S",
                       help="zero the fraction S of the smallest dense block weights (torch.nn.utils.prune, "
                            "permanent; default 0: none)")
    prune.add_argument("--dense-scope", choices=["layer", "global"], default="layer",
                       help="S per weight tensor (l1_unstructured, default) or one threshold over all of "
                            "them (global_unstructured)")
    prune.set_defaults(func=cmd_prune)
    quant = subparsers.add_parser(
        "quantize", help="int8 weight-only (per output channel) copy of a checkpoint for generate and "
                         "evaluation")
    _common(quant)
    quant.add_argument("--dynamic", action="store_true",
                       help="also run the dense linears as PyTorch dynamic-quantized linears (int8 GEMMs, "
                            "CPU; torch.ao.quantization, deprecated in torch 2.13 but working)")
    quant.set_defaults(func=cmd_quantize)
