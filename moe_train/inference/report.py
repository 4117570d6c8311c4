"""What ``moe-train eval`` prints (and ``launchers/demo.sh`` ends with): the held-out loss
and perplexity of a checkpoint on its validation split, a few sampled lines with the
``moe-train generate`` command that makes each, and the command that opens TensorBoard.
"""

from __future__ import annotations

import math
import shlex
from typing import Optional

from moe_train.inference.generate import generate_text, load_run_tokenizer, unescape
from moe_train.inference.load import heldout_loss, load_for_inference


def report(checkpoint: str, logdir: Optional[str], prompts: list[str], max_new_tokens: int = 80,
           seed: int = 0) -> None:
    """Prints the held-out loss and perplexity of ``checkpoint`` (a step directory, or a
    checkpoint.dir: its newest), one sample per prompt (one unprompted sample when there
    is none) and, given the run's ``logdir``, the TensorBoard command."""
    loaded = load_for_inference(checkpoint)
    loss, tokens = heldout_loss(loaded)
    print(f"\n=== {loaded.path} (step {loaded.meta['step']}, "
          f"{loaded.meta['tokens_seen']:,} training tokens)")
    print(f"held-out validation loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.1f} "
          f"({tokens:,} tokens of {loaded.cfg.data.manifest}, split {loaded.cfg.data.val_split!r})")
    tok = load_run_tokenizer(loaded.cfg)
    for i, prompt in enumerate(prompts or [""]):
        text = generate_text(loaded, tok, unescape(prompt), max_new_tokens, seed=seed + i)[0]
        command = ["python", "-m", "moe_train", "generate", "--checkpoint", checkpoint, "--seed", str(seed + i)]
        if prompt:
            command += ["--prompt", prompt]
        print(f"\n--- sampled (temperature 0.8, top-p 0.95): {' '.join(map(shlex.quote, command))}")
        print(text.rstrip())
    if logdir:
        print(f"\nTensorBoard: tensorboard --logdir {logdir}")
