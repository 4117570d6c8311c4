"""Sample text from a checkpoint, in one process, whatever expert parallelism trained it.

    python -m moe_train generate --checkpoint demo_out/shakespeare/checkpoints --prompt "ROMEO."
    python -m moe_train generate --checkpoint CKPT_DIR/step_00000300 --greedy --max-new-tokens 60

Loading: the model is rebuilt from the resolved config stored in the checkpoint's
``meta.json`` (``MoETransformer(cfg.model, cfg.moe)``, no process group), then the dense
weights and every expert are loaded, experts by global expert id from all of the
``experts_ep*.pt`` files (``checkpoint.load_model_weights`` with a world-1, ep-1
topology), so a checkpoint saved at ep = 2, 4, ... samples the same as one saved at ep = 1.
A pruned checkpoint (``moe-train prune``) is an ordinary one with fewer experts in its
config; an int8 one (``moe-train quantize``, ``quantization.pt`` in its manifest) gets
its int8 modules (``moe_train.compress.quantize``) before the int8 tensors load.

The model runs in eval mode: no dropout, no router jitter, and each MoE layer's capacity
comes from ``moe.eval_capacity_factor`` over the tokens of the one sequence in flight, as
when the validation loss was measured. With a finite capacity a token that overflows its
expert skips the MoE (the residual carries it), and under the ``position`` drop policy
the newest token is the first to overflow; ``dropless=True`` (``--dropless``) routes every
token instead. Without a KV cache every new token recomputes the context (the last
``model.max_seq_len`` tokens): fine for the small models this is for.

Decoding: greedy (``temperature=0`` or ``--greedy``) or temperature plus nucleus (top-p)
sampling, seeded. The context starts with EOS (BOS too when the shards had it), since
every training document followed one; a generated EOS ends a document and is shown as a
blank line. The tokenizer is the one named in the training manifest (``--tokenizer``
overrides it).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from moe_train.checkpoint import CheckpointError, find_checkpoint, load_model_weights, read_meta
from moe_train.config import Config, config_from_dict


@dataclass
class LoadedModel:
    """A checkpoint in one process: the model (eval mode), its config and meta; for an
    int8 checkpoint (``moe-train quantize``) its quantization record."""

    model: torch.nn.Module
    cfg: Config
    meta: dict
    path: Path
    quantization: Optional[dict] = None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory (holding meta.json), or a run's checkpoint directory (its newest
    complete checkpoint). Raises CheckpointError when there is none."""
    path = Path(path)
    if (path / "meta.json").is_file():
        found = find_checkpoint(path.parent, str(path))
    else:
        found = find_checkpoint(path, "auto")
    if found is None:
        raise CheckpointError(f"no complete checkpoint under {path}")
    return found


def load_for_inference(path: str | Path, dropless: bool = False) -> LoadedModel:
    """Rebuilds the model of a checkpoint in this process and loads every expert.

    Args:
        path: a step directory or a checkpoint root (see `resolve_checkpoint`).
        dropless: route every token (``moe.eval_capacity_factor = None``) instead of the
            configured eval capacity.
    """
    from moe_train.compress.quantize import finish_load, prepare_for_load, read_record
    from moe_train.model.transformer import MoETransformer
    from moe_train.parallel.topology import Topology

    path = resolve_checkpoint(path)
    meta = read_meta(path)
    cfg = config_from_dict(meta["config"])
    if dropless:
        cfg.moe = dataclasses.replace(cfg.moe, eval_capacity_factor=None)
    torch.manual_seed(cfg.train.seed)  # irrelevant after loading; keeps construction quiet
    model = MoETransformer(cfg.model, cfg.moe)  # ep_group None: every expert is local
    quantization = read_record(path, meta)  # moe-train quantize wrote int8 weights + scales
    if quantization is not None:
        prepare_for_load(model, quantization, path)  # the int8 modules, before their tensors load
    # world 1, ep 1: rank 0 owns experts [0, E), gathered from every experts_ep*.pt file
    load_model_weights(path, model, Topology(1, 1, cfg.moe.num_experts), rank=0)
    if quantization is not None:
        finish_load(model, quantization)
    model.eval()
    return LoadedModel(model, cfg, meta, path, quantization)


def tokenizer_path(cfg: Config, override: str = "") -> str:
    """The tokenizer the training shards were made with (from the data manifest)."""
    if override:
        return override
    manifest = cfg.data.manifest
    if not manifest or not Path(manifest).is_file():
        raise ValueError(f"data.manifest {manifest!r} of the checkpoint's config is not a readable "
                         f"file here; give --tokenizer PATH.model")
    model = json.loads(Path(manifest).read_text()).get("tokenizer", {}).get("model", "")
    if not model or not Path(model).is_file():
        raise ValueError(f"the manifest {manifest} names tokenizer {model!r}, which does not exist; "
                         f"give --tokenizer PATH.model")
    return model


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
