"""The demo's synthetic corpus: text with learnable structure, no download.

    python -m moe_train.demo corpus --out demo_out/corpus.jsonl

``launchers/demo.sh`` runs the whole chain: corpus -> tokenizer -> shards -> training
through ``moe_train train`` (the one training loop, ``moe_train/train.py``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

_WORDS = ("the expert router sends each token to a small network that learns one kind of "
          "pattern while a shared attention layer mixes context across the whole sequence "
          "capacity limits how many tokens an expert may take and the balancing loss keeps "
          "the load even so that no expert sits idle during training on many machines").split()


def write_demo_corpus(path: str, num_docs: int = 4000, seed: int = 0) -> int:
    """Writes a synthetic JSONL corpus ({"text": ...} per line) with learnable structure:
    sentences drawn from a small Markov chain over ``_WORDS``. Returns the doc count."""
    rng = random.Random(seed)
    successors = {w: rng.sample(_WORDS, 4) for w in _WORDS}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for _ in range(num_docs):
            sentences = []
            for _ in range(rng.randint(2, 6)):
                word = rng.choice(_WORDS)
                words = [word]
                for _ in range(rng.randint(5, 14)):
                    word = rng.choice(successors[word])
                    words.append(word)
                sentences.append(" ".join(words).capitalize() + ".")
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return num_docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_train.demo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="write the synthetic JSONL corpus")
    corpus.add_argument("--out", required=True)
    corpus.add_argument("--docs", type=int, default=4000)
    args = parser.parse_args(argv)
    print(f"wrote {write_demo_corpus(args.out, args.docs)} documents to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
