"""The MoE layer: ``router`` -> ``dispatcher`` -> ``experts`` -> combine (``layer``)."""

from moe_train.moe.layer import MoELayer, MoEOutput
from moe_train.moe.losses import moe_aux_total, total_loss

__all__ = ["MoELayer", "MoEOutput", "moe_aux_total", "total_loss"]
