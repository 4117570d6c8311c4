"""The MoE layer: ``router`` -> ``dispatcher`` -> ``experts`` -> combine (``layer``).

Holds the MoE section of the config (``config``: ``MoEConfig``), the router (scores,
top-k, capacity, selection bias, groups), the dispatcher (permutation and the
expert-parallel all-to-all), the stacked experts, the shared expert, the layer that
composes them, the one home of the auxiliary losses (``losses``), the per-step selection
bias update (``balance``), per-layer statistics (``stats``) and the slow reference every
fast path is tested against (``reference``). Semantics: MOE_REFERENCE.md.

May import: ``moe_train.config_checks`` and ``moe_train.parallel`` (collectives over the
process groups it is given). Knows no global process group.

    from moe_train.moe import MoEConfig, MoELayer
"""

from moe_train.moe.config import MoEConfig
from moe_train.moe.layer import MoELayer, MoEOutput
from moe_train.moe.losses import moe_aux_total, total_loss

__all__ = ["MoEConfig", "MoELayer", "MoEOutput", "moe_aux_total", "total_loss"]
