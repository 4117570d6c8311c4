"""The demo's helpers: the synthetic corpus, and the end-of-run report.

    python -m moe_train.demo corpus --out demo_out/synthetic/corpus/corpus.jsonl
    python -m moe_train.demo report --checkpoint demo_out/shakespeare/checkpoints \
        --logdir demo_out/shakespeare/runs --prompt "ROMEO."

``launchers/demo.sh`` runs the whole chain: corpus (``data_tools/prepare_corpus.py``) ->
tokenizer -> shards -> training through ``moe_train train`` (the one training loop,
``moe_train/train.py``) -> this report: the held-out loss and perplexity of the final
checkpoint, a few sampled lines (``moe_train/generate.py``), and the TensorBoard command.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
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


REPO = Path(__file__).resolve().parents[1]


def run_command(cmd: list[str]) -> None:
    """Runs one step of an experiment script from the repository root, echoing it; the
    venv's bin first on PATH (torchrun, deepspeed), one OpenMP thread unless set."""
    import os
    import subprocess
    import sys

    print("+ " + " ".join(map(shlex.quote, cmd)), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def prepare_demo_data(data: Path, corpus: str = "shakespeare", seq_lens: tuple[int, ...] = (128,),
                      run=run_command) -> list[Path]:
    """Corpus, tokenizer and shards as ``launchers/demo.sh`` makes them, each made once
    and reused: ``data/corpus``, ``data/tok/sp.model`` (vocab 2048), and per sequence
    length S the packed shards (``data/shards`` for the demo's 128, ``data/shards_sS``
    otherwise). Returns the shard manifests in ``seq_lens`` order. The experiment
    scripts under docs/ share this so that they train on the demo's data."""
    import sys

    data, py = Path(data), sys.executable
    if not (data / "corpus" / "source.json").is_file():
        run([py, "data_tools/prepare_corpus.py", corpus, "--out", str(data / "corpus")])
    inputs = str(data / "corpus" / ("*.txt" if corpus == "shakespeare" else "corpus.jsonl"))
    if not (data / "tok" / "sp.model").is_file():
        run([py, "data_tools/train_tokenizer.py", "--input", inputs, "--output", str(data / "tok" / "sp"),
             "--vocab-size", "2048"])
    manifests = []
    for seq_len in seq_lens:
        shards = data / ("shards" if seq_len == 128 else f"shards_s{seq_len}")
        if not (shards / "manifest.json").is_file():
            run([py, "data_tools/make_shards.py", "--input", inputs, "--tokenizer", str(data / "tok" / "sp.model"),
                 "--output", str(shards), "--seq-len", str(seq_len), "--val-fraction", "0.02",
                 "--samples-per-shard", "1024"])
        manifests.append(shards / "manifest.json")
    return manifests


def heldout_loss(loaded, max_batches: int = 0) -> tuple[float, int]:
    """Token-weighted mean cross-entropy of a loaded checkpoint (``generate.LoadedModel``)
    over the validation split of its training manifest, in this process. Batches are the
    training micro-batches, so each MoE layer routes as many tokens at a time as one rank
    did in the training run's evaluation (same eval capacity). Returns (loss, tokens)."""
    import torch
    import torch.nn.functional as F

    from moe_train.data import build_val_loader

    total, tokens = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(build_val_loader(loaded.cfg.data, 0, 1)):
            if max_batches and i >= max_batches:
                break
            logits = loaded.model(batch["input_ids"]).logits_BSV.float()
            total += float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                           ignore_index=-100, reduction="sum"))
            tokens += int((batch["labels"] != -100).sum())
    return total / max(tokens, 1), tokens


def report(checkpoint: str, logdir: str, prompts: list[str], max_new_tokens: int = 80,
           seed: int = 0) -> None:
    """Prints the final held-out loss and perplexity, samples, and the TensorBoard command."""
    from moe_train.data.tokenizer import Tokenizer
    from moe_train.generate import generate_text, load_for_inference, tokenizer_path, unescape

    loaded = load_for_inference(checkpoint)
    loss, tokens = heldout_loss(loaded)
    print(f"\n=== {loaded.path} (step {loaded.meta['step']}, "
          f"{loaded.meta['tokens_seen']:,} training tokens)")
    print(f"held-out validation loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.1f} "
          f"({tokens:,} tokens of {loaded.cfg.data.manifest}, split {loaded.cfg.data.val_split!r})")
    tok = Tokenizer(tokenizer_path(loaded.cfg))
    for i, prompt in enumerate(prompts or [""]):
        text = generate_text(loaded, tok, unescape(prompt), max_new_tokens, seed=seed + i)[0]
        command = ["python", "-m", "moe_train", "generate", "--checkpoint", checkpoint, "--seed", str(seed + i)]
        if prompt:
            command += ["--prompt", prompt]
        print(f"\n--- sampled (temperature 0.8, top-p 0.95): {' '.join(map(shlex.quote, command))}")
        print(text.rstrip())
    print(f"\nTensorBoard: tensorboard --logdir {logdir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_train.demo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="write the synthetic JSONL corpus")
    corpus.add_argument("--out", required=True)
    corpus.add_argument("--docs", type=int, default=4000)
    rep = sub.add_parser("report", help="held-out loss, samples and the TensorBoard command of a run")
    rep.add_argument("--checkpoint", required=True, help="checkpoint.dir of the run (its newest) or a step dir")
    rep.add_argument("--logdir", required=True, help="logging.dir of the run")
    rep.add_argument("--prompt", action="append", default=[],
                     help="one sample per prompt (repeatable; \\n is a line break)")
    rep.add_argument("--max-new-tokens", type=int, default=80)
    args = parser.parse_args(argv)
    if args.command == "report":
        report(args.checkpoint, args.logdir, args.prompt, args.max_new_tokens)
        return 0
    print(f"wrote {write_demo_corpus(args.out, args.docs)} documents to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
