"""Attention patterns, ALiBi and RoPE scaling (moe_train/model/attention.py, layers.py).

Every pattern and implementation against a slow dense reference (a per-head loop of
softmax(q k^T / sqrt(K) + bias + mask) v), outputs and gradients; causality of the whole
model for every pattern and position scheme; full attention unchanged; ALiBi slopes and
RoPE scaling against Hugging Face transformers (BLOOM's ALiBi, ``ROPE_INIT_FUNCTIONS``).
flex_attention has no backward on CPU (torch 2.13): there its forward is checked, and the
gradient test runs where CUDA is.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moe_train.model.attention as attention
from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.attention import AttentionPattern, alibi_slopes, attend, resolve_impl
from moe_train.model.layers import Attention, rope_cos_sin, rope_inv_freq, rope_tables
from moe_train.model.transformer import MoETransformer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: two OpenMP threads only spin on a busy machine
    yield
    torch.set_num_threads(threads)


def reference(q_BHSK, k_BGSK, v_BGSK, pattern, alibi_H=None):
    """The slow reference: one head at a time, scores, bias, mask, softmax, values."""
    B, H, S, K = q_BHSK.shape
    rep = H // k_BGSK.shape[1]
    i = torch.arange(S)
    mask_SS = pattern.dense_mask(S)
    out = torch.zeros_like(q_BHSK)
    for b in range(B):
        for h in range(H):
            scores_SS = q_BHSK[b, h] @ k_BGSK[b, h // rep].t() / math.sqrt(K)
            if alibi_H is not None:
                scores_SS = scores_SS - alibi_H[h] * (i[:, None] - i[None, :]).float()
            probs_SS = torch.softmax(scores_SS.masked_fill(~mask_SS, float("-inf")), dim=-1)
            out[b, h] = probs_SS @ v_BGSK[b, h // rep]
    return out


PATTERNS = [AttentionPattern("full"), AttentionPattern("sliding_window", 5),
            AttentionPattern("local_block", 4), AttentionPattern("longformer", 5, 7),
            AttentionPattern("longformer", 12, 2)]


def qkv(S, B=2, H=4, G=2, K=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, S, K, generator=g, requires_grad=True) for n in (H, G, G)]


def test_pattern_masks_by_hand():
    rows = lambda p: ["".join("x" if a else "." for a in row) for row in p.dense_mask(6).tolist()]  # noqa: E731
    assert rows(AttentionPattern("sliding_window", 2)) == ["x.....", "xx....", ".xx...", "..xx..", "...xx.", "....xx"]
    assert rows(AttentionPattern("local_block", 2)) == ["x.....", "xx....", "..x...", "..xx..", "....x.", "....xx"]
    assert rows(AttentionPattern("longformer", 2, 2)) == ["x.....", "xx....", "xxx...", "xxxx..", "xx.xx.", "xx..xx"]
    for p in PATTERNS:  # the FLOP count's keys per query is the mask's row count
        for S in (1, 7, 33):
            assert p.mean_keys_per_query(S) == pytest.approx(p.dense_mask(S).sum().item() / S)


@pytest.mark.parametrize("impl", ["sdpa", "sdpa_dense"])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_pattern_equals_dense_reference(pattern, alibi, impl):
    """S = 45 with a chunk of 8 (12 for the window of 12): the blocked path, with padding,
    and the global keys both inside and outside each chunk's window."""
    q, k, v = qkv(45)
    alibi_H = torch.tensor(alibi_slopes(4)) if alibi else None
    chunk = None if pattern.kind == "full" else (8 if pattern.window <= 8 else 12)
    out = attend(q, k, v, pattern, impl, alibi_H=alibi_H, chunk=chunk)
    want = reference(q, k, v, pattern, alibi_H)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-5)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = torch.autograd.grad(want, (q, k, v), grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_blocked_path_is_taken_and_drops_no_key():
    """Default chunks on a longer sequence (the path the benchmark times): sliding window
    128 with 3 global tokens over 600 positions, chunk 128, 5 chunks, padded."""
    pattern = AttentionPattern("longformer", 100, 3)
    assert pattern.chunk == 100
    q, k, v = (t.detach() for t in qkv(600, B=1, H=2, G=1))
    torch.testing.assert_close(attend(q, k, v, pattern, "sdpa"), reference(q, k, v, pattern), atol=2e-6, rtol=2e-5)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("alibi", [False, True])
def test_flex_forward_equals_reference_on_cpu(alibi):
    """The mask_mod, score_mod and block masks of every pattern through flex_attention
    (eager: the same functions on the whole grid), and one compiled run (the kernel)."""
    from torch.nn.attention.flex_attention import flex_attention

    alibi_H = torch.tensor(alibi_slopes(4)) if alibi else None
    with torch.no_grad():
        q, k, v = (t.detach() for t in qkv(40))
        for pattern in PATTERNS:
            block_mask = attention.flex_block_mask(pattern, 40, "cpu")
            score_mod = None if alibi_H is None else attention._alibi_score_mod(alibi_H)
            out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)
            torch.testing.assert_close(out, reference(q, k, v, pattern, alibi_H), atol=2e-6, rtol=2e-5)
        if alibi:  # the compiled kernel, once (a compile costs seconds)
            pattern = PATTERNS[3]
            out = attend(q, k, v, pattern, "flex", alibi_H=alibi_H)
            torch.testing.assert_close(out, reference(q, k, v, pattern, alibi_H), atol=2e-6, rtol=2e-5)


def test_flex_refuses_what_it_cannot_do_on_cpu():
    q, k, v = qkv(8)
    with pytest.raises(ValueError, match=r"attention_impl = 'flex': torch .* has no flex_attention backward on CPU"):
        attend(q, k, v, PATTERNS[1], "flex")
    with pytest.raises(ValueError, match="flex_attention has no attention dropout"):
        attend(q, k, v, PATTERNS[1], "flex", dropout_p=0.1)
    with pytest.raises(ValueError, match=r"model.attention_impl = 'flex': flex_attention has no attention dropout"):
        ModelConfig(attention_impl="flex", dropout=0.1).validate()


def test_auto_impl_rule():
    """auto: SDPA is_causal for full causal attention without ALiBi on every device, flex
    only for the other patterns and ALiBi on CUDA without dropout, SDPA on CPU."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    full = AttentionPattern("full")
    assert resolve_impl("auto", cuda, 0.0, full) == "sdpa"
    assert resolve_impl("auto", cuda, 0.0, full, alibi=False) == "sdpa"
    assert resolve_impl("auto", cuda, 0.0, full, alibi=True) == "flex"
    for pattern in PATTERNS[1:]:
        for alibi in (False, True):
            assert resolve_impl("auto", cuda, 0.0, pattern, alibi) == "flex"
            assert resolve_impl("auto", cuda, 0.1, pattern, alibi) == "sdpa"
            assert resolve_impl("auto", cpu, 0.0, pattern, alibi) == "sdpa"
    assert resolve_impl("auto", cpu, 0.0, full) == "sdpa"
    assert resolve_impl("auto", cuda, 0.1) == "sdpa"
    assert resolve_impl("auto", cpu, 0.0) == "sdpa"
    assert resolve_impl("auto", cuda, 0.0) == "auto"  # no pattern: attend decides with its own
    assert resolve_impl("flex", cpu, 0.0, full) == "flex"
    assert resolve_impl("sdpa", cuda, 0.0, PATTERNS[1], True) == "sdpa"


def sdpa_spy(monkeypatch):
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_full_causal_auto_is_sdpa_is_causal_without_a_mask(device, monkeypatch):
    """The default model's attention (full, rope, auto) makes one SDPA call per layer with
    is_causal=True and no mask tensor, through the module (layers.py) and through attend."""
    calls = sdpa_spy(monkeypatch)
    monkeypatch.setattr(attention, "_compiled_flex", lambda: pytest.fail("auto compiled flex"))
    cfg = small_cfg()
    attn = Attention(cfg).to(device)
    x = torch.randn(2, 9, 32, device=device)
    attn(x, tuple(t.to(device) for t in rope_tables(cfg, 9))).sum().backward()
    q, k, v = (t.to(device) for t in qkv(9))
    attend(q, k, v, AttentionPattern("full"), "auto")
    assert len(calls) == 2
    for kwargs in calls:
        assert kwargs.get("is_causal") is True and kwargs.get("attn_mask") is None, kwargs


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_is_causal_equals_the_masked_sdpa(device):
    """SDPA is_causal (auto's full path) against SDPA with the explicit [S, S] causal mask
    (the dense path): outputs and gradients, MHA and GQA, lengths around a kernel tile."""
    full = AttentionPattern("full")
    tol = dict(atol=2e-6, rtol=2e-5) if device == "cpu" else dict(atol=1e-5, rtol=1e-4)  # CUDA: other kernels
    for S, G in ((1, 4), (17, 2), (130, 4), (257, 1)):
        q, k, v = (t.detach().to(device).requires_grad_() for t in qkv(S, G=G))
        out = attend(q, k, v, full, "auto")
        want = attend(q, k, v, full, "sdpa_dense")
        torch.testing.assert_close(out, want, **tol)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
            torch.testing.assert_close(a, b, atol=10 * tol["atol"], rtol=10 * tol["rtol"])


@pytest.mark.filterwarnings("ignore:.*flex_attention")
def test_flex_at_new_lengths_compiles_a_bounded_number_of_times():
    """Evaluation at 17, 33 and 65 tokens, then generation growing one token at a time
    for 20 tokens, then 200 tokens (two 128-blocks): flex (ALiBi, a window) gives SDPA's
    logits and tokens; the first length compiles a kernel that every length up to one
    128-block reuses (static shapes compiled again at the second length), all of it takes
    at most FLEX_GRAPHS_PER_VARIANT graphs, and the block-mask cache stays in its LRU."""
    from torch._dynamo.utils import counters

    from moe_train.inference.generate import sample_tokens

    def model(impl):
        torch.manual_seed(0)
        cfg = small_cfg(position="alibi", attention="sliding_window", window=5, attention_impl=impl, max_seq_len=256)
        return MoETransformer(cfg, MoEConfig(num_experts=2, d_ff=8, capacity_factor=None,
                                             eval_capacity_factor=None)).eval()

    flex, sdpa = model("flex"), model("sdpa")
    sdpa.load_state_dict(flex.state_dict())
    attention.flex_block_mask.cache_clear()
    start = counters["stats"]["unique_graphs"]

    def same_logits(S):
        with torch.no_grad():
            ids = torch.randint(0, 40, (1, S))
            torch.testing.assert_close(flex(ids).logits_BSV, sdpa(ids).logits_BSV, atol=1e-5, rtol=1e-5)

    same_logits(17)
    first = counters["stats"]["unique_graphs"]
    same_logits(33)
    same_logits(65)
    context = torch.randint(0, 40, (65,)).tolist()
    assert sample_tokens(flex, context, 20, temperature=0) == sample_tokens(sdpa, context, 20, temperature=0)
    assert counters["stats"]["unique_graphs"] == first  # 33 .. 84 tokens: no compile
    same_logits(200)
    assert 1 <= counters["stats"]["unique_graphs"] - start <= attention.FLEX_GRAPHS_PER_VARIANT
    info = attention.flex_block_mask.cache_info()  # generation's first step reuses length 65's mask
    assert info.misses == 3 + 19 + 1 and info.currsize == attention.FLEX_BLOCK_MASKS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward needs CUDA (none on CPU)")
@pytest.mark.parametrize("pattern", PATTERNS[1:], ids=str)
def test_flex_gradients_equal_reference_on_cuda(pattern):
    q, k, v = (t.detach().cuda().requires_grad_() for t in qkv(300, K=32))
    alibi_H = torch.tensor(alibi_slopes(4)).cuda()
    out = attend(q, k, v, pattern, "flex", alibi_H=alibi_H)
    idx = torch.arange(300, device="cuda")
    bias = -alibi_H[:, None, None] * (idx[:, None] - idx[None, :]).float()
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        attn_mask=bias.masked_fill(~pattern.dense_mask(300, "cuda"), float("-inf")))
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=24,
                max_seq_len=64, moe_every=2, position="rope")
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_model_is_causal_for_every_pattern(pattern, position, monkeypatch):
    """Changing tokens after t changes no logit up to t (chunks of 8: the blocked path)."""
    monkeypatch.setattr(attention, "MIN_CHUNK", 8)
    cfg = small_cfg(position=position, attention=pattern.kind, window=max(pattern.window, 1),
                    global_tokens=pattern.global_tokens)
    torch.manual_seed(0)
    model = MoETransformer(cfg, MoEConfig(num_experts=2, d_ff=8, capacity_factor=None,
                                          eval_capacity_factor=None)).eval()
    ids = torch.randint(0, 40, (1, 50))
    t = 30
    changed = ids.clone()
    changed[0, t + 1:] = (ids[0, t + 1:] + 7) % 40
    a, b = model(ids).logits_BSV, model(changed).logits_BSV
    torch.testing.assert_close(a[0, :t + 1], b[0, :t + 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[0, t + 1:], b[0, t + 1:])


def test_full_attention_unchanged():
    """Defaults (full, rope unscaled, auto -> SDPA is_causal on any device) give exactly the
    computation of before this module: the same tables, the same SDPA call."""
    torch.manual_seed(0)
    cfg = small_cfg(qk_norm=True)
    attn = Attention(cfg)
    x = torch.randn(2, 9, 32)
    theta, K = cfg.rope_theta, cfg.head_dim
    inv_freq = theta ** (-torch.arange(0, K, 2, dtype=torch.float32) / K)
    angle = torch.arange(9, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = rope_tables(cfg, 9)
    assert torch.equal(cos, angle.cos()) and torch.equal(sin, angle.sin())
    q, k, v = attn.qkv(x).split([4 * K, 2 * K, 2 * K], dim=-1)
    q, k, v = (t.view(2, 9, -1, K).transpose(1, 2) for t in (q, k, v))
    rot = lambda t: torch.cat((t.chunk(2, -1)[0] * cos - t.chunk(2, -1)[1] * sin,  # noqa: E731
                               t.chunk(2, -1)[1] * cos + t.chunk(2, -1)[0] * sin), -1)
    q, k = rot(attn.q_norm(q)), rot(attn.k_norm(k))
    want = attn.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                     .transpose(1, 2).reshape(2, 9, 32))
    assert torch.equal(attn(x, (cos, sin)), want)


def test_alibi_slopes_and_no_position_parameters():
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    for H in (4, 6, 12, 16):  # BLOOM: alibi[h, 0, j] = m_h * j, so position 1 holds m_h
        bloom = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), H, torch.float32)[:, 0, 1]
        torch.testing.assert_close(torch.tensor(alibi_slopes(H), dtype=torch.float32), bloom)
    model = MoETransformer(small_cfg(position="alibi"), MoEConfig(num_experts=2, d_ff=8))
    rope_model = MoETransformer(small_cfg(position="rope"), MoEConfig(num_experts=2, d_ff=8))
    assert model.state_dict().keys() == rope_model.state_dict().keys()  # no table, no buffer


def hf_inv_freq(rope_type: str, head_dim: int, theta: float, factor: float, original: int, max_len: int,
                seq_len=None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = {"rope_type": rope_type, "rope_theta": theta, "factor": factor}
    if rope_type == "yarn":
        params["original_max_position_embeddings"] = original
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_len,
                      rope_parameters=params)
    kw = {"seq_len": seq_len} if seq_len is not None else {}
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", **kw)


@pytest.mark.parametrize("head_dim, theta, factor, original", [(32, 10000.0, 4.0, 64), (64, 500000.0, 2.0, 128),
                                                                (16, 10000.0, 8.0, 2048)])
def test_rope_scaling_matches_transformers(head_dim, theta, factor, original):
    """linear and yarn as Hugging Face's; ntk (static) as Hugging Face's "dynamic" at
    sequence length factor x original with its factor 1 (module docstring)."""
    for ours, theirs in [("linear", hf_inv_freq("linear", head_dim, theta, factor, original, int(original * factor))),
                         ("yarn", hf_inv_freq("yarn", head_dim, theta, factor, original, int(original * factor))),
                         ("ntk", hf_inv_freq("dynamic", head_dim, theta, 1.0, original, original,
                                             seq_len=int(original * factor)))]:
        inv_freq, attention_factor = rope_inv_freq(head_dim, theta, ours, factor, original)
        torch.testing.assert_close(inv_freq, theirs[0], rtol=1e-6, atol=0)
        assert attention_factor == pytest.approx(theirs[1], rel=1e-12)
    assert rope_inv_freq(head_dim, theta, "yarn", factor, original)[1] == pytest.approx(0.1 * math.log(factor) + 1)
    base = rope_inv_freq(head_dim, theta)[0]
    ntk = rope_inv_freq(head_dim, theta, "ntk", factor)[0]
    assert ntk[0] == base[0] and float(ntk[-1]) == pytest.approx(float(base[-1]) / factor, rel=1e-5)  # NTK's two ends


def test_rope_scaling_in_the_model_tables():
    """linear: position 2p of a factor-2 model rotates as p did; yarn: cos and sin carry
    the attention factor; yarn's pretraining length defaults to max_seq_len / factor."""
    plain = rope_tables(small_cfg(max_seq_len=32), 32)
    linear = rope_tables(small_cfg(max_seq_len=64, rope_scaling="linear", rope_scaling_factor=2.0), 64)
    torch.testing.assert_close(linear[0][0::2], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(linear[1][0::2], plain[1], atol=1e-5, rtol=0)
    yarn = rope_tables(small_cfg(max_seq_len=64, rope_scaling="yarn", rope_scaling_factor=2.0), 64)
    want = rope_cos_sin(64, 8, 10000.0, scaling="yarn", factor=2.0, original_max_len=32)
    assert torch.equal(yarn[0], want[0])
    torch.testing.assert_close(yarn[0][0], torch.full((4,), 0.1 * math.log(2.0) + 1))
    assert rope_tables(small_cfg(position="alibi"), 8) is None


def test_benchmark_smoke(tmp_path):
    """benchmarks/attention.py end to end on two rows and two short lengths: table and JSON."""
    import json
    import subprocess
    import sys

    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "benchmarks/attention.py", "--quick", "--rows", "full", "sliding_window",
                           "--seq-lens", "160", "320", "--json", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "growth per doubling" in proc.stdout
    section = json.loads(out.read_text())["attention"]
    assert set(section) == {"full", "sliding_window"}
    for entry in section.values():
        assert entry["seq_len"] == [160, 320] and len(entry["growth"]) == 1
        assert all(ms > 0 for ms in entry["ms"]) and all(mb is not None for mb in entry["peak_mb"])
