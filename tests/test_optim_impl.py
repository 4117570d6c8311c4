"""optim.impl: which AdamW kernel the engine builds (fused, foreach or the per-tensor
loop), ``auto`` resolved once from the engine's device, and the kernels' agreement."""

import pytest
import torch

from dist_utils import run_ranks
from engine_harness import make_cfg
from moe_train.config import OPTIM_IMPLS, OptimConfig, config_to_dict
from moe_train.train.engine import build_optimizer, resolve_optim_impl

FLAGS = {"fused": (True, False), "foreach": (None, True), "loop": (None, False)}  # (fused, foreach)


@pytest.mark.parametrize("device, want", [("cpu", "foreach"), ("cuda", "fused")])
def test_auto_resolves_from_the_device(device, want):
    assert resolve_optim_impl("auto", torch.device(device)) == want
    for impl in OPTIM_IMPLS[1:]:  # explicit values are honoured on every device
        assert resolve_optim_impl(impl, torch.device(device)) == impl


def test_default_is_auto_and_bad_value_is_refused_naming_the_field(tmp_path):
    assert OptimConfig().impl == "auto"
    with pytest.raises(ValueError, match=r"optim.impl = 'adam8bit': must be one of auto, fused, "
                                         r"foreach, loop"):
        make_cfg(tmp_path, optim={"impl": "adam8bit"})


@pytest.mark.parametrize("impl", ["auto", "fused", "foreach", "loop"])
def test_build_optimizer_sets_the_torch_flags(impl):
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer([{"params": list(model.parameters())}], OptimConfig(impl=impl), torch.device("cpu"))
    fused, foreach = FLAGS[resolve_optim_impl(impl, torch.device("cpu"))]
    assert (opt.defaults["fused"], opt.defaults["foreach"]) == (fused, foreach)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # torch accepts the kernel on this device


def _engine_optimizer_worker(rank, world, raw_cfg, resume="none"):
    """Trains through the real loop; returns the flags of the torch AdamW inside the
    DeepSpeed engine as they are at the end of the run (after any resume), and the losses."""
    import engine_harness
    from moe_train.train import loop

    built, real = [], loop.build_engine

    def spy(cfg, model, groups):
        built.append(real(cfg, model, groups))
        return built[-1]

    loop.build_engine = spy
    try:
        result = engine_harness._worker(rank, world, raw_cfg, resume, True, "", False)
    finally:
        loop.build_engine = real
    opt = built[-1].optimizer  # DeepSpeed's ZeRO wrapper holds the client optimizer
    while not isinstance(opt, torch.optim.AdamW):
        opt = opt.optimizer
    seen = dict(fused=opt.defaults["fused"], foreach=opt.defaults["foreach"],
                groups={(g.get("fused"), g.get("foreach")) for g in opt.param_groups})
    return seen, [result.losses[s] for s in sorted(result.losses)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One rank, 10 steps of the tiny model per (impl, ZeRO stage): ZeRO 1 and 2 wrap the
    client optimizer, ZeRO 0 (fp32) hands it through."""
    out = {}
    for impl, zero in [("loop", 1), ("foreach", 1), ("fused", 2), ("auto", 0)]:
        cfg = make_cfg(tmp_path_factory.mktemp(impl), optim={"impl": impl},
                       parallel={"zero_stage": zero}, checkpoint={"every_steps": 0})
        (out[impl],) = run_ranks(_engine_optimizer_worker, 1, raw_cfg=config_to_dict(cfg))
        out[impl, "cfg"] = cfg
    return out


@pytest.mark.parametrize("zero", [1, 0])
def test_resume_runs_the_configured_kernel_not_the_checkpoints(runs, tmp_path, zero):
    """torch's load_state_dict restores each group's fused/foreach flags from the
    checkpoint; the engine keeps optim.impl instead. The loop run's final checkpoint
    (step 10) resumed with impl fused for two more steps."""
    source = runs["loop", "cfg"] if zero == 1 else runs["auto", "cfg"]  # auto at ZeRO 0: foreach
    raw = config_to_dict(source)
    raw["optim"]["impl"], raw["train"]["max_steps"] = "fused", 12
    seen, losses = run_ranks(_engine_optimizer_worker, 1, raw_cfg=raw, resume="auto")[0]
    assert len(losses) == 2  # steps 11 and 12: it resumed
    assert (seen["fused"], seen["foreach"]) == FLAGS["fused"]
    assert seen["groups"] == {FLAGS["fused"]}


@pytest.mark.parametrize("impl", ["loop", "foreach", "fused", "auto"])
def test_engine_optimizer_has_the_flags(runs, impl):
    seen, _ = runs[impl]
    fused, foreach = FLAGS["foreach" if impl == "auto" else impl]  # auto on CPU: foreach
    assert (seen["fused"], seen["foreach"]) == (fused, foreach)
    assert seen["groups"] == {(fused, foreach)}


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_kernels_give_the_loop_losses(runs, impl):
    """Same model, batches and seed: the batched kernels round differently from the loop
    (so not bitwise), but 10 steps stay within 1e-5 relative."""
    _, ref = runs["loop"]
    _, losses = runs[impl]
    assert len(losses) == len(ref) == 10 and ref[-1] < ref[0] - 0.05, ref  # it learns
    print(impl, "max relative loss difference to loop:", max(abs(a - b) / b for a, b in zip(losses, ref)))
    assert losses == pytest.approx(ref, rel=1e-5, abs=0)
