"""Sampling text from a loaded model (``load.load_for_inference``).

    python -m moe_train generate --checkpoint demo_out/shakespeare/checkpoints --prompt "ROMEO."
    python -m moe_train generate --checkpoint CKPT_DIR/step_00000300 --greedy --max-new-tokens 60

With a finite eval capacity a token that overflows its expert skips the MoE (the residual
carries it), and under the ``position`` drop policy the newest token is the first to
overflow; ``--dropless`` routes every token instead. Without a KV cache every new token
recomputes the context (the last ``model.max_seq_len`` tokens): fine for the small models
this is for.

Decoding: greedy (``temperature=0`` or ``--greedy``) or temperature plus nucleus (top-p)
sampling, seeded. The context starts with EOS (BOS too when the shards had it), since
every training document followed one; a generated EOS ends a document and is shown as a
blank line. The tokenizer is the one named in the training manifest, a SentencePiece
``.model`` or a ``tokenizer.json``, with the special ids the manifest recorded
(``--tokenizer`` overrides the file; ``load_run_tokenizer``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from moe_train.config import Config
from moe_train.data.tokenizer import Tokenizer, load_tokenizer
from moe_train.inference.load import LoadedModel, tokenizer_path


def load_run_tokenizer(cfg: Config, override: str = "") -> Tokenizer:
    """The tokenizer of a checkpoint's training data (``override``: another file), with
    the BOS/EOS/PAD ids its shard manifest recorded for that file."""
    manifest = cfg.data.manifest
    recorded = json.loads(Path(manifest).read_text()) if manifest and Path(manifest).is_file() else None
    return load_tokenizer(tokenizer_path(cfg, override), recorded)


def unescape(prompt: str) -> str:
    """``\\n`` and ``\\t`` typed on a command line become a line break and a tab."""
    return prompt.replace("\\n", "\n").replace("\\t", "\t")


def filter_top_p(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose mass reaches ``top_p``
    (always at least the most likely one); renormalised. probs_V: [V], sums to 1."""
    if top_p >= 1.0:
        return probs_V
    sorted_V, order_V = torch.sort(probs_V, descending=True)
    before_V = torch.cumsum(sorted_V, 0) - sorted_V  # mass of the tokens ranked above
    sorted_V = torch.where(before_V < top_p, sorted_V, torch.zeros_like(sorted_V))
    kept_V = torch.zeros_like(probs_V).scatter_(0, order_V, sorted_V)
    return kept_V / kept_V.sum()


@torch.no_grad()
def sample_tokens(model: torch.nn.Module, context: list[int], max_new_tokens: int,
                  temperature: float = 0.8, top_p: float = 0.95,
                  generator: Optional[torch.Generator] = None,
                  vocab_limit: Optional[int] = None) -> list[int]:
    """Extends ``context`` by ``max_new_tokens`` ids; returns only the new ids.

    Args:
        temperature: 0 = greedy (argmax); else logits / temperature, then top-p.
        top_p: nucleus mass (1.0 = plain sampling).
        generator: the RNG of the draws (seeded by the caller).
        vocab_limit: never emit ids >= this (the tokenizer's size, when the model's
            ``vocab_size`` is larger: those rows were never a target).
    """
    if not context:
        raise ValueError("the context must hold at least one token")
    window = model.cfg.max_seq_len
    ids = list(context)
    for _ in range(max_new_tokens):
        x_BS = torch.tensor([ids[-window:]], dtype=torch.long)
        logits_V = model(x_BS).logits_BSV[0, -1].float()
        if vocab_limit is not None:
            logits_V[vocab_limit:] = float("-inf")
        if temperature <= 0:
            nxt = int(torch.argmax(logits_V))
        else:
            probs_V = filter_top_p(torch.softmax(logits_V / temperature, dim=-1), top_p)
            nxt = int(torch.multinomial(probs_V, 1, generator=generator))
        ids.append(nxt)
    return ids[len(context):]


def decode_with_breaks(tok, ids: list[int]) -> str:
    """Decodes ids, showing an EOS (end of a document) as a blank line."""
    parts, cur = [], []
    for i in ids:
        if i == tok.eos_id:
            parts.append(tok.decode(cur))
            cur = []
        elif i != tok.pad_id:
            cur.append(i)
    parts.append(tok.decode(cur))
    return "\n\n".join(parts)


def generate_text(loaded: LoadedModel, tok, prompt: str = "", max_new_tokens: int = 100,
                  temperature: float = 0.8, top_p: float = 0.95, seed: int = 0,
                  num_samples: int = 1) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (prompt included), decoded."""
    start = [tok.eos_id]
    manifest = loaded.cfg.data.manifest
    if manifest and Path(manifest).is_file() and json.loads(Path(manifest).read_text()).get("add_bos"):
        start.append(tok.bos_id)
    context = start + (tok.encode(prompt) if prompt else [])
    gen = torch.Generator().manual_seed(seed)
    return [prompt + decode_with_breaks(tok, sample_tokens(loaded.model, context, max_new_tokens,
                                                           temperature, top_p, gen, tok.vocab_size))
            for _ in range(num_samples)]
