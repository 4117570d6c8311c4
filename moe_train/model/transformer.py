"""A decoder-only transformer whose MLPs are dense or MoE by config.

Shape legend: B batch, S sequence, D model width, V vocabulary, H heads.

Block i uses an MoE MLP when ``model.moe_every > 0``, ``i >= model.first_dense_layers``
and ``(i + 1) % moe_every == 0`` (Switch: every other block; DeepSeek: the first blocks
dense). Options (``ModelConfig``): LayerNorm or RMSNorm, learned or rotary positions,
GELU or SwiGLU dense MLP, multi-head or grouped-query attention, dropout, tied or untied
head; the defaults are the GPT-2-like model. The model knows no global process group:
the expert-parallel group is passed in.

ALBERT's parameter savings (Lan et al. 2019):
  * factorised embeddings (``model.embed_dim`` Ee < D): a V x Ee table, ``embed_proj``
    Ee -> D into the residual stream; the head is ``head_proj`` D -> Ee then ``head``
    Ee -> V, whose weight IS the table with ``tie_embeddings`` (else its own V x Ee).
    ``head_proj`` is its own matrix, not ``embed_proj`` transposed: ALBERT's output head
    has its own H -> E dense before the tied table (as does OPT-350m, a decoder with
    ``project_in``/``project_out``); reading the final hidden state and writing a token
    into the residual stream are different maps, and the second E x D costs little.
    Both projections start at std 1/sqrt(fan_in), so the residual stream starts at the
    scale of the unfactorised model (ALBERT reaches it with a LayerNorm before its
    projection).
  * cross-layer sharing (``model.share_layers``, ``share_group_size``): a block that
    shares uses the SAME module objects as the first block of its group
    (``sizing.layer_owners``), registered under both blocks, like a tied head: one set of
    ``Parameter``s, so ``parameters()``, the optimizer, ZeRO and the gradient reduction
    see each once, and autograd sums the uses' gradients into one ``.grad``. The
    ``state_dict`` lists a shared tensor under every block's name (all views of one
    storage; ``checkpoint.split_state`` stores it once). A shared MoE layer routes on
    its own at every use: one aux, z and sequence loss and one ``MoEStats`` per use (in
    block order), its all-to-alls run once per use, and its ``tally`` (selection bias,
    routing monitor) sums its uses; ``block_ids`` lists the blocks that use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch.utils.checkpoint import checkpoint

from moe_train.model.config import ModelConfig
from moe_train.model.layers import Attention, DenseMLP, make_norm, rope_tables
from moe_train.model.sizing import embed_width, factorised, layer_owners
from moe_train.moe.config import MoEConfig
from moe_train.moe.layer import MoELayer, MoEOutput
from moe_train.moe.stats import MoEStats


class Block(nn.Module):
    """Pre-norm block: x + drop(attn(norm1(x))), then x + drop(mlp(norm2(x))).

    Pure: it returns its MoE output instead of recording it, so a recomputation under
    activation checkpointing (which runs forward again during backward) adds nothing to
    the model's list of MoE losses and statistics.

    ``attn_from`` / ``mlp_from``: a block whose norm1 + attention / norm2 + MLP this
    block reuses (the same modules, ``model.share_layers``); None builds its own.
    """

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig | None, ep_group=None, balance_group=None,
                 attn_from: Block | None = None, mlp_from: Block | None = None):
        super().__init__()
        self.is_moe = moe_cfg is not None
        if attn_from is None:
            self.norm1 = make_norm(cfg)
            self.attn = Attention(cfg)
        else:
            self.norm1, self.attn = attn_from.norm1, attn_from.attn
        if mlp_from is None:
            self.norm2 = make_norm(cfg)
            self.mlp = (MoELayer(moe_cfg, cfg.d_model, ep_group=ep_group, balance_group=balance_group)
                        if self.is_moe else DenseMLP(cfg.d_model, cfg.d_ff, cfg.mlp_activation))
        else:
            assert mlp_from.is_moe == self.is_moe, "an MLP is shared between blocks of one kind only"
            self.norm2, self.mlp = mlp_from.norm2, mlp_from.mlp
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, MoEOutput | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.norm1(x_BSD), rope))
        h_BSD = self.norm2(x_BSD)
        if self.is_moe:
            out = self.mlp(h_BSD)
            # Dropped tokens: zero MoE output, the residual carries them.
            return x_BSD + self.drop(out.y), out
        return x_BSD + self.drop(self.mlp(h_BSD)), None


@dataclass
class ModelOutput:
    """Attributes:
        logits_BSV: next-token logits.
        lm_loss: mean cross-entropy over the labels (when labels were given).
        moe_losses: per MoE block (aux_loss, z_loss), coefficients not applied; a MoE
            layer shared by several blocks has one entry per use, in block order.
        moe_stats: per MoE block statistics (likewise per use).
        moe_seq_losses: per MoE block sequence-wise balance loss (``moe.seq_balance_coef``;
            a constant 0 when off), coefficient not applied.
    """

    logits_BSV: Tensor
    lm_loss: Tensor | None
    moe_losses: list[tuple[Tensor, Tensor]]
    moe_stats: list[MoEStats]
    moe_seq_losses: list[Tensor] = dataclasses.field(default_factory=list)


class MoETransformer(nn.Module):
    """Decoder-only transformer; block i's MLP is MoE iff ``cfg.is_moe_block(i)``.

    Args:
        cfg: ``model`` section; moe_cfg: ``moe`` section.
        ep_group, balance_group: passed to every MoE layer (None: single process).
        activation_checkpointing: recompute each block in backward
            (``torch.utils.checkpoint``, non-reentrant) instead of keeping its
            activations; only when gradients are enabled. The RNG state is restored for
            the recomputation, so router jitter and dropout repeat exactly, and the MoE
            losses and statistics are recorded once per layer (Megatron #1330). Under
            expert parallelism the recomputation repeats the all-to-alls; every rank
            recomputes the same blocks in the same order.
        device: None builds the parameters where torch's default device says (the CPU),
            drawing each as it is made. A device builds every module on the meta device
            (no memory, no work), allocates this rank's parameters once on ``device``
            (its experts only, under expert parallelism) and draws them there: the same
            draws in the same order, so on the CPU the result is bit for bit the model
            built with None (tests/test_model.py), without a CPU copy on the way to a GPU.
    """

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, ep_group=None, balance_group=None,
                 activation_checkpointing: bool = False, device: torch.device | str | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        if device is None:
            self._build(cfg, moe_cfg, ep_group, balance_group)
        else:
            with torch.device("meta"):
                self._build(cfg, moe_cfg, ep_group, balance_group)
            # to_empty makes new Parameters: carry over what the modules set on theirs
            # (the expert marks DeepSpeed groups by: allreduce, group_name).
            marks = {name: dict(p.__dict__) for name, p in self.named_parameters() if p.__dict__}
            self.to_empty(device=device)
            for name, p in self.named_parameters():
                p.__dict__.update(marks.get(name, {}))
            with torch.no_grad():
                # Every module's own draws, in the order the modules were made (that of an
                # eager build: its constructors drew in this order).
                for module in self.modules():
                    if module is not self and hasattr(module, "reset_parameters"):
                        module.reset_parameters()
        self._init_dense()

    def _build(self, cfg: ModelConfig, moe_cfg: MoEConfig, ep_group, balance_group) -> None:
        Ee = embed_width(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, Ee)
        self.embed_proj = nn.Linear(Ee, cfg.d_model, bias=False) if factorised(cfg) else None
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        # Dense weights are initialised from the global RNG, which the caller seeds the same
        # on every rank; expert weights are seeded by global expert id inside MoELayer.
        attn_owner, mlp_owner = layer_owners(cfg)
        blocks: list[Block] = []
        for i in range(cfg.num_layers):
            blocks.append(Block(cfg, moe_cfg if cfg.is_moe_block(i) else None, ep_group, balance_group,
                                attn_from=blocks[attn_owner[i]] if attn_owner[i] != i else None,
                                mlp_from=blocks[mlp_owner[i]] if mlp_owner[i] != i else None))
        self.blocks = nn.ModuleList(blocks)
        self.norm = make_norm(cfg)
        self.head_proj = nn.Linear(cfg.d_model, Ee, bias=False) if factorised(cfg) else None
        self.head = nn.Linear(Ee, cfg.vocab_size, bias=False)
        for i, block in enumerate(self.blocks):
            if block.is_moe and mlp_owner[i] == i:
                uses = [j for j in range(cfg.num_layers) if mlp_owner[j] == i]
                block.mlp.block_ids = uses  # metrics.RoutingMonitor names the layer by uses[0]
                # names the layer's all-to-alls in hang reports
                block.mlp.dispatcher.label = f"MoE layer {i}" + (
                    f" (shared by blocks {', '.join(map(str, uses))})" if len(uses) > 1 else "")

    @torch.no_grad()
    def _init_dense(self) -> None:
        """The dense 2-D weights N(0, init_std), the factorised projections N(0, 1/fan_in),
        then the tied head (after any materialisation, which unties)."""
        cfg = self.cfg
        for name, p in self.named_parameters():  # unique: a shared weight is drawn once
            if p.dim() == 2 and ".experts." not in name and ".router." not in name:
                nn.init.normal_(p, std=cfg.init_std)
        for proj in (self.embed_proj, self.head_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, input_ids_BS: Tensor, labels_BS: Tensor | None = None) -> ModelOutput:
        S = input_ids_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len ({self.cfg.max_seq_len})")
        x_BSE = self.embed(input_ids_BS)  # E = Ee, the table's width
        x_BSD = self.embed_proj(x_BSE) if self.embed_proj is not None else x_BSE  # factorised: Ee -> D
        rope = rope_tables(self.cfg, S, input_ids_BS.device)  # None unless model.position is rope
        if self.pos is not None:
            x_BSD = x_BSD + self.pos(torch.arange(S, device=input_ids_BS.device))
        x_BSD = self.drop(x_BSD)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        moe_out: list[MoEOutput] = []
        for block in self.blocks:
            if recompute:
                x_BSD, out = checkpoint(block, x_BSD, rope, use_reentrant=False)
            else:
                x_BSD, out = block(x_BSD, rope)
            if out is not None:  # appended here, once: never inside the recomputed function
                moe_out.append(out)
                if self.training and torch.is_grad_enabled():  # selection-bias counts, once
                    block.mlp.tally.add(out.stats)
        h_BSD = self.norm(x_BSD)
        logits_BSV = self.head(self.head_proj(h_BSD) if self.head_proj is not None else h_BSD)
        lm_loss = None
        if labels_BS is not None:
            lm_loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=-100)
        return ModelOutput(logits_BSV, lm_loss, [(o.aux_loss, o.z_loss) for o in moe_out],
                           [o.stats for o in moe_out], [o.seq_loss for o in moe_out])
