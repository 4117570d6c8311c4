"""Shrinking a trained model: ``moe-train prune`` and ``moe-train quantize``.

  ``prune.py``     expert pruning by measured load (router columns, selection-bias entries
                   and stacked expert weights of the dropped experts removed, moe.num_experts
                   updated) and unstructured magnitude pruning of the dense weights
                   (``torch.nn.utils.prune``, made permanent); writes a normal weights-only
                   checkpoint that ``train --resume``, ``generate`` and evaluation load.
  ``quantize.py``  post-training weight-only int8 (symmetric, per output channel) of the
                   dense linears, the stacked expert weights and the shared expert, held and
                   stored as int8 + fp32 scales and dequantised right before each matmul;
                   optionally PyTorch's dynamic-quantized linears (int8 GEMMs on CPU).
  ``report.py``    what both print before and after: weights, nonzero weights, bytes of the
                   model files on disk, held-out validation loss.

Both read and write checkpoints through ``moe_train.checkpoint`` (manifest-verified) and
evaluate through ``moe_train.demo.heldout_loss``, in one process, any ep the source was
trained at.
"""

from moe_train.compress.prune import prune_checkpoint
from moe_train.compress.quantize import quantize_checkpoint

__all__ = ["prune_checkpoint", "quantize_checkpoint"]
