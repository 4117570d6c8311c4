"""Inference from a checkpoint, in one process, whatever layout trained it.

  ``load``      ``load_for_inference``: the model of a checkpoint with every expert;
                ``heldout_loss`` on its validation split (the one evaluation)
  ``generate``  greedy or temperature + top-p sampling, seeded
  ``int8``      the int8 model format (weight-only, per output channel)
  ``report``    what ``moe-train eval`` prints: loss, perplexity, samples

May import: ``train`` (its one evaluation only), ``checkpoint``, ``config``, ``model``,
``moe``, ``data``, ``parallel``.

    from moe_train.inference import load_for_inference, generate_text
"""

from moe_train.inference.generate import generate_text, sample_tokens
from moe_train.inference.load import LoadedModel, heldout_loss, load_for_inference, tokenizer_path

__all__ = ["LoadedModel", "generate_text", "heldout_loss", "load_for_inference", "sample_tokens", "tokenizer_path"]
