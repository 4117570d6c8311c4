"""GPU tests: one process, one CUDA device. Every test is skipped, with the reason
printed by ``pytest -ra``, where no CUDA device is visible, so the suite collects them on
CPU-only machines too and they cannot rot unnoticed.

  engine step   init_distributed(device auto) picks CUDA + NCCL; one bf16 DeepSpeed step
                through moe_train.train.step.train_step on configs/tiny_moe.yaml (ep 1) with
                synthetic tokens: finite loss, parameters move, held in bf16.
  autocast      the MoE layer under bf16 autocast against the same layer in fp32: same
                routing, outputs close, router logits in fp32 (a dtype check); and
                whether the expert matmuls really run in bf16 (not with impl "grouped_mm":
                strict xfail while torch has no autocast rule for _grouped_mm).
  grouped_mm    GroupedExperts(impl="grouped_mm") (torch._grouped_mm, the fused bf16 path
                on SM90+) equals impl="bmm" in bf16 on equal counts, outputs and gradients.
"""

from __future__ import annotations

import math
import multiprocessing
from pathlib import Path

import pytest
import torch

from moe_train.moe.config import MoEConfig
from moe_train.moe.experts import GroupedExperts
from moe_train.moe.layer import MoELayer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: torch.cuda.is_available() is False (CPU-only host or CPU build of "
           "torch); these tests need one GPU")

REPO = Path(__file__).resolve().parents[2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# ----------------------------------------------------------------- engine step, NCCL


def engine_step_worker(device: str = "auto", steps: int = 2) -> dict:
    """Runs in a fresh process (its own default process group and DeepSpeed state): world 1
    through init_distributed, tiny config in bf16, ``steps`` train_steps on random ids."""
    import torch.distributed as dist

    from moe_train.config import load_config
    from moe_train.model.build import build_model
    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.init import init_distributed
    from moe_train.parallel.topology import Topology
    from moe_train.train.control import StopRequest
    from moe_train.train.engine import build_engine
    from moe_train.train.loop import seed_everything
    from moe_train.train.step import train_step

    env, dev = init_distributed(device, "auto", 120, always_group=True)
    try:
        cfg = load_config(REPO / "configs" / "tiny_moe.yaml",
                          ["parallel.expert_parallel_size=1", "train.dtype=bf16", "logging.tensorboard=false",
                           # Adam's first steps move each weight by about lr: 0.05 shows in
                           # bf16 (spacing 2^-7 at 1.0), the config's warm-up lr would not.
                           "optim.lr=0.05", "optim.warmup_steps=0"])
        groups = build_groups(Topology(env.world_size, 1, cfg.moe.num_experts), env.rank)
        model = build_model(cfg, groups, dev)
        engine = build_engine(cfg, model, groups)
        seed_everything(cfg.train.seed, env.rank)
        before = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch_size, cfg.data.seq_len + 1),
                            generator=gen)
        batches = iter([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}] * steps)
        outs = [train_step(engine, batches, cfg, groups, dev, s + 1, StopRequest()) for s in range(steps)]
        moved = {n: float((p.detach().float() - before[n]).abs().max())
                 for n, p in engine.module.named_parameters()}
        return {"backend": dist.get_backend(), "device": str(dev),
                "losses": [o.mean_lm for o in outs], "skipped": [o.skipped for o in outs],
                "param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
                "moved": moved}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_engine_bf16_step_on_nccl():
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got = pool.apply_async(engine_step_worker).get(timeout=300)
    assert got["backend"] == "nccl" and got["device"].startswith("cuda"), got
    assert all(math.isfinite(x) for x in got["losses"]), got["losses"]
    assert not any(got["skipped"]), got["skipped"]
    assert got["param_dtypes"] == ["torch.bfloat16"], got["param_dtypes"]
    frozen = [n for n, d in got["moved"].items() if d == 0.0]
    assert not frozen, f"parameters unchanged by two optimizer steps: {frozen}"


# --------------------------------------------------------------------- MoE autocast


def moe_layer_autocast(device: str, impl: str = "auto") -> dict:
    """The MoE layer's fp32 forward and its bf16-autocast forward on the same fp32 input;
    the router logits' and expert outputs' dtypes under autocast."""
    cfg = MoEConfig(num_experts=8, top_k=2, d_ff=256, activation="swiglu", capacity_factor=None,
                    jitter_eps=0.0, expert_impl=impl)
    layer = MoELayer(cfg, d_model=256).to(device)
    x_TD = torch.randn(512, 256, generator=torch.Generator().manual_seed(0)).to(device)
    seen: dict = {}
    logits_fn = layer.router.logits

    def logits(x):  # records what the router computed with
        seen["logits_dtype"] = (out := logits_fn(x)).dtype
        return out

    layer.router.logits = logits
    layer.experts.register_forward_hook(lambda m, args, out: seen.__setitem__("experts_dtype", out.dtype))
    ref = layer(x_TD)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        low = layer(x_TD)
        seen["logits_dtype_bf16_input"] = logits_fn(x_TD.bfloat16()).dtype
    return {"ref": ref, "low": low, **seen}


def test_moe_layer_bf16_autocast_matches_fp32():
    # bmm: the kernel that autocast does lower to bf16 (see the next test for grouped_mm),
    # so this compares a real bf16 computation with fp32, not fp32 with itself.
    got = moe_layer_autocast("cuda", impl="bmm")
    assert got["experts_dtype"] == torch.bfloat16
    ref, low = got["ref"], got["low"]
    assert got["logits_dtype"] == torch.float32 and got["logits_dtype_bf16_input"] == torch.float32
    assert torch.equal(low.stats.routed_per_expert_E, ref.stats.routed_per_expert_E)  # fp32 routing
    assert low.y.dtype == torch.float32  # the layer returns its input's dtype
    assert rel_err(low.y, ref.y) < 2e-2, rel_err(low.y, ref.y)
    assert abs(float(low.aux_loss) - float(ref.aux_loss)) < 1e-6  # fp32 router statistics


_GROUPED_MM_AUTOCAST = torch._C._dispatch_has_kernel_for_dispatch_key("aten::_grouped_mm", "AutocastCUDA")


@pytest.mark.parametrize("impl", [
    "bmm",
    pytest.param("grouped_mm", marks=pytest.mark.xfail(
        not _GROUPED_MM_AUTOCAST, strict=True,
        reason="aten::_grouped_mm has no AutocastCUDA kernel in this torch, and GroupedExperts "
               "casts its weights to the input's dtype (fp32 here), so under autocast the "
               "grouped_mm experts run in fp32; strict: fix GroupedExperts or torch, then drop this")),
])
def test_moe_experts_compute_in_bf16_under_autocast(impl):
    got = moe_layer_autocast("cuda", impl=impl)
    assert got["experts_dtype"] == torch.bfloat16, got["experts_dtype"]


# ----------------------------------------------------------------------- grouped_mm


def grouped_mm_vs_bmm(device: str, num_experts: int = 4, rows: int = 64, d_model: int = 128,
                      d_ff: int = 256) -> dict:
    """Both kernels on the same bf16 weights and rows (equal counts); outputs and grads."""
    counts_E = torch.full((num_experts,), rows, dtype=torch.int64, device=device)
    x = torch.randn(num_experts * rows, d_model, generator=torch.Generator().manual_seed(1))
    x = x.to(device, torch.bfloat16)
    dy = torch.randn(num_experts * rows, d_model, generator=torch.Generator().manual_seed(2))
    dy = dy.to(device, torch.bfloat16)
    out = {}
    for impl in ("grouped_mm", "bmm"):
        experts = GroupedExperts(num_experts, d_model, d_ff, "swiglu", seed=3, impl=impl)
        experts = experts.to(device, torch.bfloat16)
        x_ND = x.clone().requires_grad_()
        y = experts(x_ND, counts_E)
        y.backward(dy)
        out[impl] = {"y": y.detach(), "dx": x_ND.grad,
                     **{n: p.grad for n, p in experts.named_parameters()}}
    return out


def test_grouped_mm_equals_bmm_cuda_bf16():
    got = grouped_mm_vs_bmm("cuda")
    fast, ref = got["grouped_mm"], got["bmm"]
    assert fast["y"].dtype == torch.bfloat16 and fast["y"].is_cuda
    for name in ref:
        assert rel_err(fast[name], ref[name]) < 1e-2, (name, rel_err(fast[name], ref[name]))
