"""``moe-train generate``: sample text from a checkpoint (one process, any ep)."""

from __future__ import annotations

import argparse


def cmd_generate(args: argparse.Namespace) -> int:
    """Samples text from a checkpoint in this process (``moe_train.inference``)."""
    from moe_train.inference.generate import generate_text, load_run_tokenizer, unescape
    from moe_train.inference.load import load_for_inference

    loaded = load_for_inference(args.checkpoint, dropless=args.dropless)
    tok = load_run_tokenizer(loaded.cfg, args.tokenizer)
    capacity = "dropless" if loaded.cfg.moe.eval_capacity_factor is None else \
        f"eval capacity factor {loaded.cfg.moe.eval_capacity_factor}"
    print(f"# {loaded.path} (step {loaded.meta['step']}, trained at ep "
          f"{loaded.meta['topology']['ep_size']}; {loaded.cfg.moe.num_experts} experts loaded, "
          f"{capacity}; {'greedy' if args.greedy else f'temperature {args.temperature}, top-p {args.top_p}'})")
    texts = generate_text(loaded, tok, unescape(args.prompt), args.max_new_tokens,
                          0.0 if args.greedy else args.temperature, args.top_p, args.seed,
                          args.num_samples)
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1}\n{text}")
    return 0


def register(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="sample text from a checkpoint (one process, any ep)")
    gen.add_argument("--checkpoint", required=True, help="a step_N directory, or a checkpoint.dir (its newest)")
    gen.add_argument("--prompt", default="", help="text to continue (default: a new document); "
                                                  "\\n is a line break")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--greedy", action="store_true", help="argmax decoding (else temperature + top-p)")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument("--dropless", action="store_true",
                     help="route every token (default: the config's moe.eval_capacity_factor)")
    gen.add_argument("--tokenizer", default="", help="sentencepiece .model or tokenizer.json (default: "
                                                     "the one in the training manifest)")
    gen.set_defaults(func=cmd_generate)
