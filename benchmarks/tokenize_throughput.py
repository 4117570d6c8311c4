"""make_shards' tokenize throughput against the tokenizer libraries' own batch encoding.

    python -m benchmarks.tokenize_throughput [--mb 24] [--procs 2] [--vocab 8000]

On one synthetic corpus (Zipf-distributed words made of syllables, documents of 50-800
words, written once as parquet), for each kind of tokenizer (a byte-level BPE
`tokenizer.json` trained here with the `tokenizers` library, a SentencePiece BPE `.model`
trained with data_tools' trainer), in this process, on this machine:

  peer    the library's own batch encoding of the documents already in memory (all its
          threads): `tokenizers.Tokenizer.encode_batch` and `encode_batch_fast`;
          `SentencePieceProcessor.encode(list)`;
  ours    `make_shards` end to end with `--procs N`: parquet read in record batches,
          encode, split by hash, pack, write tar shards, manifest.

tokens/s counts the documents' tokens (the same number for both); the ratio is ours /
the fastest peer. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time

from moe_train.data.build import make_shards
from moe_train.data.tokenizer import Tokenizer, train_tokenizer

SYLLABLES = ("ka ri to na me lo su pe da vi zo ghu tra ston ex per ro ut ing ed al le "
             "qu ar th ch sh ba co de fi ge hi ja ku mo ny pi ra si tu we ya ze").split()


def corpus(target_mb: float, seed: int = 0) -> list[str]:
    """Documents of Zipf-distributed words, about ``target_mb`` MB of UTF-8 text."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(30000)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    docs, size = [], 0
    while size < target_mb * 1e6:
        n = rng.randint(50, 800)
        text = " ".join(rng.choices(words, weights, k=n))
        text = ".\n".join(text[i:i + 300].strip().capitalize() for i in range(0, len(text), 300)) + "."
        docs.append(text)
        size += len(text) + 1
    return docs


def write_parquet(docs: list[str], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=4096)


def train_hf(docs: list[str], path: str, vocab: int) -> None:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs[:2000], trainer)
    tok.save(path)


def measure(kind: str, tok_path: str, docs: list[str], parquet: str, work: str, procs: int,
            rounds: int = 3) -> list[tuple]:
    """(what, tokens/s) rows: each peer and ours, timed in alternation for ``rounds``
    rounds (best of each), so a busy spell of a shared machine hits both alike."""
    tok = Tokenizer(tok_path)
    if kind == "tokenizers":
        peers = {"tokenizers encode_batch": lambda: tok.hf.encode_batch(docs, add_special_tokens=False),
                 "tokenizers encode_batch_fast": lambda: tok.hf.encode_batch_fast(docs, add_special_tokens=False)}
    else:
        peers = {"sentencepiece encode(list)": lambda: tok.sp.encode(docs)}
    num_tokens = sum(len(ids) for ids in tok.encode_batch(docs))
    out = os.path.join(work, f"shards_{kind}")

    def ours():
        shutil.rmtree(out, ignore_errors=True)
        make_shards([parquet], tok_path, out, seq_len=2048, val_fraction=0.005, num_procs=procs)

    runs = {**peers, f"make_shards --procs {procs} (parquet -> shards)": ours}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return [(name, num_tokens / t) for name, t in best.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=24.0, help="corpus size in MB of text")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8000)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="tokenize_throughput_")
    try:
        docs = corpus(args.mb)
        parquet = os.path.join(work, "corpus.parquet")
        write_parquet(docs, parquet)
        print(f"# corpus: {len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f} MB of text, "
              f"{os.path.getsize(parquet) / 1e6:.1f} MB parquet; {os.cpu_count()} CPU cores, load average "
              f"{os.getloadavg()[0]:.1f} at start")
        hf_path = os.path.join(work, "tokenizer.json")
        train_hf(docs, hf_path, args.vocab)
        train_tokenizer(iter(docs[:2000]), os.path.join(work, "sp"), args.vocab, num_threads=os.cpu_count() or 1)
        print(f"{'tokenizer':<14} {'what':<44} {'Mtok/s':>8} {'ratio':>7}")
        for kind, path in (("tokenizers", hf_path), ("sentencepiece", os.path.join(work, "sp.model"))):
            rows = measure(kind, path, docs, parquet, work, args.procs)
            peer = max(r for _, r in rows[:-1])
            for name, rate in rows:
                print(f"{kind:<14} {name:<44} {rate / 1e6:>8.3f} {rate / peer:>6.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
