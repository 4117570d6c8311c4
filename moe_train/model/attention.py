"""Causal attention patterns (full, sliding window, local block, Longformer) and ALiBi,
on PyTorch's flex_attention or on SDPA with explicit masks.

Shape legend: B batch, H query heads, G key/value heads (H % G == 0), S sequence, K head
dim, N number of query chunks, C chunk length, J keys per chunk.

Which keys query i may read (``model.attention``; positions 0-based, W ``model.window``,
g ``model.global_tokens``), always causal (j <= i):

  full            every j <= i
  sliding_window  i - j < W: the last W tokens, itself included (Mistral's window)
  local_block     i // W == j // W: the tokens of its own block of W, up to itself
  longformer      i - j < W, or j < g: the window plus the first g tokens of the sequence
                  (the global tokens). A global token (i < g) reads every j <= i, which
                  the rule already says since then j <= i < g. Causal Longformer: the
                  original's global tokens also read the future, which a decoder cannot.

ALiBi (``model.position: alibi``, Press et al. 2021): no position embedding; head h adds
``-m_h * (i - j)`` to the scaled score of query i and key j (m_h from ``alibi_slopes``),
whatever the pattern.

Implementations (``model.attention_impl``; ``resolve_impl`` decides "auto"):

  auto   full causal attention without ALiBi: sdpa's ``is_causal`` on every device (no
         mask tensor, no compile; FlashAttention / cuDNN / memory-efficient kernels on
         CUDA). The windowed, block and Longformer patterns, and any pattern with ALiBi:
         flex on CUDA without attention dropout, sdpa otherwise (CPU, or dropout > 0).
  flex   ``torch.nn.attention.flex_attention``, compiled once with the sequence length
         dynamic (one kernel serves every length: evaluation and generation at new
         lengths do not recompile; at most ``FLEX_GRAPHS_PER_VARIANT`` graphs per pattern,
         ALiBi, dtype and device), with a block mask built by ``create_block_mask`` per
         (pattern, length, device) and kept in an LRU of ``FLEX_BLOCK_MASKS`` (blocks that
         the pattern masks out entirely are skipped, so a window costs O(S W)), ALiBi as
         a ``score_mod``. No attention dropout. On CPU (torch 2.13) it has a compiled
         forward but no backward: usable for evaluation and generation only.
  sdpa   ``F.scaled_dot_product_attention``. Full attention without ALiBi: ``is_causal``
         with no mask (FlashAttention-style kernels). A local pattern (window, block,
         Longformer) on a sequence longer than two chunks: the queries in chunks of C
         (a multiple of W, at least ``MIN_CHUNK``), each chunk against its J keys (its
         own chunk and, except for local_block, the previous one; plus the global
         tokens) with an explicit [C, J] mask, all chunks in one SDPA call: O(S C) time
         and memory, autograd and dropout as for any SDPA call.
         Otherwise one dense [S, S] mask (bool; float with ALiBi).
  sdpa_dense  (not a config value: tests and benchmarks/attention.py) always the dense
         [S, S] mask: the quadratic baseline a windowed pattern is measured against.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PATTERNS = ("full", "sliding_window", "local_block", "longformer")
MIN_CHUNK = 64  # smallest query chunk of the blocked SDPA path: fewer, larger SDPA problems
FLEX_BLOCK_MASKS = 8  # LRU of flex block masks, one per (pattern, length, device)
# Graphs dynamo compiles for one flex variant (pattern, ALiBi, GQA, dtype, device) with the
# length dynamic: length 1 and a single 128-block are specialised apart from the rest (its
# 0/1 and one-block specialisations); below dynamo's recompile_limit (8), which would
# otherwise silently fall back to eager flex (a dense [S, S] score matrix).
FLEX_GRAPHS_PER_VARIANT = 3


@dataclass(frozen=True)
class AttentionPattern:
    """Which keys each query reads (module docstring). Hashable: the block-mask cache key."""

    kind: str = "full"
    window: int = 0
    global_tokens: int = 0

    @classmethod
    def from_config(cls, cfg) -> "AttentionPattern":
        """From ``ModelConfig`` (``attention``, ``window``, ``global_tokens``)."""
        if cfg.attention == "full":
            return cls("full")
        return cls(cfg.attention, cfg.window, cfg.global_tokens if cfg.attention == "longformer" else 0)

    def __post_init__(self):
        assert self.kind in PATTERNS, self.kind
        assert self.kind == "full" or self.window >= 1, self

    def allowed(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """Boolean "query q_idx may read key kv_idx", broadcasting; also flex_attention's
        ``mask_mod`` (only tensor ops, no data-dependent Python control flow)."""
        causal = q_idx >= kv_idx
        if self.kind == "full":
            return causal
        if self.kind == "local_block":
            return causal & (q_idx // self.window == kv_idx // self.window)
        near = q_idx - kv_idx < self.window
        if self.kind == "longformer":
            near = near | (kv_idx < self.global_tokens)
        return causal & near

    def dense_mask(self, seq_len: int, device=None) -> Tensor:
        """[S, S] boolean mask, True where query i may read key j."""
        idx_S = torch.arange(seq_len, device=device)
        return self.allowed(idx_S[:, None], idx_S[None, :])

    @property
    def chunk(self) -> int:
        """Query chunk C of the blocked SDPA path: a multiple of the window, >= MIN_CHUNK.
        C >= W lets a chunk's queries find every key they read in their own and the
        previous chunk; for local_block, chunks made of whole blocks need only their own."""
        return self.window * max(1, math.ceil(MIN_CHUNK / self.window))

    def mean_keys_per_query(self, seq_len: int) -> float:
        """Average number of keys a query reads over a sequence of ``seq_len``: the
        attention-score FLOPs per token are 2 * 2 * D * this (QK^T and AV). Full causal
        attention: (S + 1) / 2; a window W << S: about W."""
        i_S = torch.arange(seq_len, dtype=torch.float64)
        if self.kind == "full":
            keys_S = i_S + 1
        elif self.kind == "local_block":
            keys_S = i_S % self.window + 1
        else:
            keys_S = torch.clamp(i_S + 1, max=self.window)
            if self.global_tokens:  # global keys left of the window: j < g and j <= i - W
                keys_S = keys_S + torch.clamp(i_S - self.window + 1, min=0, max=self.global_tokens)
        return float(keys_S.mean())


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes m_h (Press et al. 2021, the authors' ``get_slopes``): for H a power
    of two the geometric sequence m_h = 2^(-8 (h + 1) / H); otherwise the slopes of the
    closest power of two below H, P, followed by every other slope of 2P (the odd-indexed
    ones, 2^(-8 (2i + 1) / (2P))) until there are H. Also BLOOM's ``build_alibi_tensor``."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][:num_heads - closest]


def resolve_impl(requested: str, device: torch.device, dropout_p: float,
                 pattern: AttentionPattern | None = None, alibi: bool = False) -> str:
    """The implementation "auto" stands for (module docstring).

    Args:
        requested: ``model.attention_impl``: "auto", "flex" or "sdpa" (the last two are
            returned as they are).
        device: where the attention runs.
        dropout_p: the module's attention dropout (flex has none).
        pattern: which keys each query reads; None from a caller that does not pass it,
            which then gets "auto" back wherever the pattern decides (CUDA, no dropout)
            and ``attend`` resolves it with its own pattern.
        alibi: whether an ALiBi bias is added.
    Returns:
        "sdpa", "flex", or (pattern None only) "auto".

    auto -> sdpa for full causal attention without ALiBi on every device: ``is_causal``
    reaches FlashAttention / cuDNN on CUDA with no mask and no compile, which flex can
    only match after compiling. flex for the other patterns and ALiBi on CUDA when there
    is no attention dropout: it skips the blocks a window masks out in its fused kernel,
    forward and backward (not measured in this repo: no GPU in its CI;
    tests/test_attention.py checks it where CUDA is), and takes ALiBi as a score_mod
    where SDPA needs a dense float [H, S, S] bias. sdpa on CPU: in torch 2.13
    flex_attention has no backward on CPU ("FlexAttention does not support backward on
    CPU"), so it cannot train there, and its first compile costs seconds (3-15 s measured
    here) that CPU runs of tiny models never earn back. Its compiled CPU forward does
    work, and for a window it is about twice as fast as the blocked SDPA path, while for
    full attention it is slower than SDPA's causal kernel (``python -m benchmarks.attention
    --flex``), so ``attention_impl: flex`` is allowed on CPU for evaluation and generation.
    """
    if requested != "auto":
        return requested
    if device.type != "cuda" or dropout_p > 0.0:
        return "sdpa"
    if pattern is None:
        return "auto"
    return "sdpa" if pattern.kind == "full" and not alibi else "flex"


def attend(q_BHSK: Tensor, k_BGSK: Tensor, v_BGSK: Tensor, pattern: AttentionPattern,
           impl: str = "sdpa", dropout_p: float = 0.0, alibi_H: Tensor | None = None,
           chunk: int | None = None) -> Tensor:
    """softmax(q k^T / sqrt(K) + bias, masked by ``pattern``) v for every query head.

    Args:
        q_BHSK: queries; k_BGSK, v_BGSK: keys and values, G heads (query head h reads
            key/value head h // (H / G), as ``repeat_interleave``).
        pattern: which keys each query reads (always causal).
        impl: "auto", "flex", "sdpa" or "sdpa_dense" (module docstring); "auto" is
            resolved here by ``resolve_impl`` with this pattern and ALiBi.
        dropout_p: attention-probability dropout (pass 0 in evaluation); sdpa only.
        alibi_H: fp32 ALiBi slopes (``alibi_slopes``), or None.
        chunk: the blocked path's query chunk (default ``pattern.chunk``); tests shrink it.
    Returns:
        out_BHSK.
    """
    if impl == "auto":
        impl = resolve_impl("auto", q_BHSK.device, dropout_p, pattern, alibi_H is not None)
    if impl == "flex":
        if dropout_p > 0:
            raise ValueError("model.attention_impl = 'flex': flex_attention has no attention "
                             "dropout; set model.dropout = 0 or model.attention_impl = sdpa")
        return _flex(q_BHSK, k_BGSK, v_BGSK, pattern, alibi_H)
    assert impl in ("sdpa", "sdpa_dense"), impl
    gqa = k_BGSK.shape[1] != q_BHSK.shape[1]
    S = q_BHSK.shape[2]
    if pattern.kind == "full" and alibi_H is None and impl == "sdpa":
        return F.scaled_dot_product_attention(q_BHSK, k_BGSK, v_BGSK, is_causal=True,
                                              dropout_p=dropout_p, enable_gqa=gqa)
    chunk = chunk or (pattern.chunk if pattern.kind != "full" else 0)
    if impl == "sdpa" and pattern.kind != "full" and S > 2 * chunk:
        return _sdpa_blocked(q_BHSK, k_BGSK, v_BGSK, pattern, chunk, dropout_p, alibi_H)
    idx_S = torch.arange(S, device=q_BHSK.device)
    mask = _mask_or_bias(pattern, idx_S[:, None], idx_S[None, :], alibi_H, q_BHSK.dtype)
    return F.scaled_dot_product_attention(q_BHSK, k_BGSK, v_BGSK, attn_mask=mask,
                                          dropout_p=dropout_p, enable_gqa=gqa)


def _mask_or_bias(pattern: AttentionPattern, q_idx: Tensor, kv_idx: Tensor, alibi_H: Tensor | None,
                  dtype: torch.dtype, valid: Tensor | None = None) -> Tensor:
    """SDPA's attn_mask for query positions q_idx [..., Q, 1] and keys kv_idx [..., 1, J]:
    boolean [..., Q, J] without ALiBi; with it, the float bias -m_h (i - j) where allowed and
    -inf elsewhere, [..., H, Q, J] (a head axis inserted before the last two)."""
    allowed = pattern.allowed(q_idx, kv_idx)
    if valid is not None:
        allowed = allowed & valid
    if alibi_H is None:
        return allowed
    dist = (q_idx - kv_idx).to(torch.float32).unsqueeze(-3)  # [..., 1, Q, J]
    bias = -alibi_H.to(dist.device)[:, None, None] * dist
    return bias.masked_fill(~allowed.unsqueeze(-3), float("-inf")).to(dtype)


def _sdpa_blocked(q_BHSK: Tensor, k_BGSK: Tensor, v_BGSK: Tensor, pattern: AttentionPattern,
                  C: int, dropout_p: float, alibi_H: Tensor | None) -> Tensor:
    """The local patterns in O(S C): query chunk n (positions nC .. nC + C - 1) reads the
    keys of chunks n - 1 and n (local_block: n only; chunks are whole blocks, C % W == 0)
    and, for Longformer, the g global keys; an explicit [C, J] mask per chunk. The
    sequence is zero-padded to N C: padded keys come after every real query (causally
    masked), padded queries are cut off; every query reads at least itself, so no row is
    all -inf."""
    assert C >= pattern.window and (pattern.kind != "local_block" or C % pattern.window == 0), (C, pattern)
    B, H, S, K = q_BHSK.shape
    G = k_BGSK.shape[1]
    N = -(-S // C)
    pad = N * C - S
    dev = q_BHSK.device

    def chunks(x_BXSK: Tensor) -> Tensor:  # [B, X, S, K] -> [B, N, X, C, K]
        x_BXSK = F.pad(x_BXSK, (0, 0, 0, pad))
        return x_BXSK.view(x_BXSK.shape[0], x_BXSK.shape[1], N, C, K).transpose(1, 2)

    q_BNHCK, k_BNGCK, v_BNGCK = chunks(q_BHSK), chunks(k_BGSK), chunks(v_BGSK)
    start_N = torch.arange(N, device=dev) * C
    q_pos_NC = start_N[:, None] + torch.arange(C, device=dev)
    if pattern.kind == "local_block":
        k_BNGJK, v_BNGJK, kv_pos_NJ = k_BNGCK, v_BNGCK, q_pos_NC
    else:  # the previous chunk, then this one (chunk -1 is zeros, masked by kv_pos < 0)
        def with_previous(x: Tensor) -> Tensor:
            return torch.cat((F.pad(x, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1], x), dim=-2)
        k_BNGJK, v_BNGJK = with_previous(k_BNGCK), with_previous(v_BNGCK)
        kv_pos_NJ = start_N[:, None] - C + torch.arange(2 * C, device=dev)
    valid_NJ = kv_pos_NJ >= 0
    g = min(pattern.global_tokens, S)
    if g:  # global keys in front; one already inside the chunk's keys is read there only
        expand = (B, N, G, g, K)
        k_BNGJK = torch.cat((k_BGSK[:, None, :, :g].expand(expand), k_BNGJK), dim=-2)
        v_BNGJK = torch.cat((v_BGSK[:, None, :, :g].expand(expand), v_BNGJK), dim=-2)
        g_pos_Ng = torch.arange(g, device=dev).expand(N, g)
        valid_NJ = torch.cat((g_pos_Ng < kv_pos_NJ[:, :1], valid_NJ), dim=1)
        kv_pos_NJ = torch.cat((g_pos_Ng, kv_pos_NJ), dim=1)
    mask = _mask_or_bias(pattern, q_pos_NC[:, :, None], kv_pos_NJ[:, None, :], alibi_H, q_BHSK.dtype,
                         valid_NJ[:, None, :])
    if alibi_H is None:
        mask = mask[:, None]  # [N, 1, C, J]: one mask for every head
    # Chunks as batch entries of 4-D tensors: SDPA's fused CPU kernel takes an explicit mask
    # in 4-D only (with 5-D inputs it falls back to the math path: 2.7x slower forward +
    # backward at 16k tokens, and it keeps the [C, J] probabilities of every chunk).
    out_XHCK = F.scaled_dot_product_attention(
        q_BNHCK.flatten(0, 1), k_BNGJK.flatten(0, 1), v_BNGJK.flatten(0, 1),
        attn_mask=mask.expand(B, *mask.shape).flatten(0, 1), dropout_p=dropout_p, enable_gqa=G != H)
    return out_XHCK.view(B, N, H, C, K).transpose(1, 2).reshape(B, H, N * C, K)[:, :, :S]


# ----------------------------------------------------------------------------- flex


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    """flex_attention compiled with the sequence length dynamic from the first call, so
    each evaluation length and each step of a generation without KV cache reuse it.
    torch.compile's default compiles static shapes first and again, dynamic, at the
    second length (measured: tests/test_attention.py); static shapes alone
    (``dynamic=False``) compile once per length, seconds each, until dynamo's
    recompile_limit drops flex to eager, which materialises the [S, S] scores."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=True)


@functools.lru_cache(maxsize=FLEX_BLOCK_MASKS)
def flex_block_mask(pattern: AttentionPattern, seq_len: int, device: str):
    """``create_block_mask`` of the pattern for one length and device, built once and kept
    in a bounded LRU (generation at growing lengths evicts the oldest): it evaluates the
    mask on the whole [S, S] grid, which costs far more than it should per forward. Batch
    and head independent (B = H = None)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return pattern.allowed(q_idx, kv_idx)

    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)


def _alibi_score_mod(alibi_H: Tensor):
    """flex_attention's score_mod adding -m_h (i - j) to the scaled score of head h."""
    slopes_H = alibi_H.to(torch.float32)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - slopes_H[h] * (q_idx - kv_idx)

    return score_mod


def _flex(q_BHSK: Tensor, k_BGSK: Tensor, v_BGSK: Tensor, pattern: AttentionPattern,
          alibi_H: Tensor | None) -> Tensor:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHSK, k_BGSK, v_BGSK))
    if q_BHSK.device.type == "cpu" and needs_grad:
        raise ValueError(f"model.attention_impl = 'flex': torch {torch.__version__} has no flex_attention "
                         f"backward on CPU; train with model.attention_impl = sdpa (or auto), use flex on "
                         f"CPU for evaluation and generation only")
    if not needs_grad:  # flex refuses inputs that require grad on CPU even under no_grad
        q_BHSK, k_BGSK, v_BGSK = q_BHSK.detach(), k_BGSK.detach(), v_BGSK.detach()
    block_mask = flex_block_mask(pattern, q_BHSK.shape[2], str(q_BHSK.device))
    score_mod = None if alibi_H is None else _alibi_score_mod(alibi_H.to(q_BHSK.device))
    return _compiled_flex()(q_BHSK, k_BGSK, v_BGSK, score_mod=score_mod, block_mask=block_mask,
                            enable_gqa=k_BGSK.shape[1] != q_BHSK.shape[1])
