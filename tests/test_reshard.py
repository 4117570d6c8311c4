"""Resharding through the canonical checkpoint (issue 12; MOE_REFERENCE parity invariant 9).

One straight run at A = (world 4, ep 2, ZeRO 2) writes canonical checkpoints at steps 3
and 6 (module fixture). Each other layout B then, in one process per rank:
  1. loads A's step-3 canonical checkpoint through the accessors and writes it back out
     from B: masters, moments and steps bitwise equal to A's (nothing lost or rounded);
  2. trains steps 4..6 through ``train(resume=...)``: the losses equal A's to 1e-5
     relative (dropout and router jitter off, no dropped tokens, the same global batch at
     every layout: micro-batch 2, accumulation making up the world size).
A -> B -> A is bitwise; a plain ``torch.optim.AdamW`` given the canonical state and the
engine's gradients steps to the engine's masters bitwise; a sample-id ledger over resumes at
4 -> 2 -> 3 ranks with the real streaming loader sees every sample of the epoch once.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from dist_utils import run_ranks
from engine_harness import GlobalBatchLoader, make_cfg
import moe_train.checkpoint as ckpt
import moe_train.checkpoint.canonical as canonical
import moe_train.checkpoint.resume as resume_choice
from moe_train.config import config_from_dict, config_to_dict
from moe_train.data.synthetic import sample_id, write_synthetic_dataset

SAVE_AT, END = 3, 6
A = (4, 2, 2)  # world, ep, ZeRO stage
LAYOUTS = [(4, 4, 1), (2, 1, 0), (1, 1, 2)]


def _cfg(tmp, world, ep, zero, **extra):
    """TINY with no dropped tokens (capacity factor E / k) and no clipping, micro-batch 2
    and accumulation 4 / world: the global batch of 8 rows is the same at every layout.
    The selection bias is on, so a buffer (b_E, updated every step) travels too."""
    sections = {"parallel": {"expert_parallel_size": ep, "zero_stage": zero},
                "moe": {"capacity_factor": 2.0, "bias_update_rate": 1e-3}, "optim": {"grad_clip": 0.0},
                "data": {"micro_batch_size": 2},
                "train": {"max_steps": END, "grad_accum_steps": 4 // world},
                "checkpoint": {"canonical_every_steps": SAVE_AT}}
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return make_cfg(tmp, **sections)


class StepLoader(GlobalBatchLoader):
    """GlobalBatchLoader whose position survives a change of accumulation steps (its
    state counts micro-batches, which mean different steps at another accumulation)."""

    def state_dict(self) -> dict:
        return {"pos": self.pos, "gas": self.gas}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"] // state["gas"] * self.gas


def _loaders(cfg):
    def loaders(rank, world):
        return StepLoader(rank, world, cfg.data.micro_batch_size, cfg.train.grad_accum_steps,
                          cfg.data.seq_len, cfg.model.vocab_size), None
    return loaders


def _train_worker(rank, world, raw_cfg, resume):
    from moe_train.train import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = config_from_dict(raw_cfg)
    return train(cfg, resume=resume, loaders=_loaders(cfg)).losses


def _engine_from_canonical(cfg, src, rank, world):
    """Model, engine and the canonical state of ``src`` loaded at this layout (the
    library calls ``train`` makes, without the loop)."""
    from moe_train.model.build import build_model
    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.topology import Topology
    from moe_train.train.engine import build_engine

    groups = build_groups(Topology(world, cfg.parallel.expert_parallel_size, cfg.moe.num_experts), rank)
    model = build_model(cfg, groups, torch.device("cpu"))
    loaded = canonical.load(src, model, groups)
    canonical.apply_to_model(model, loaded)
    engine = build_engine(cfg, model, groups)
    canonical.restore_optimizer(engine.optimizer, engine.module, loaded)
    return engine, groups, loaded


def _one_engine_step(engine, cfg):
    """One optimizer step on a fixed batch; returns (full fp32 gradients the optimizer
    used, by name; the learning rate)."""
    from deepspeed.utils import safe_get_full_grad

    from moe_train.moe.losses import total_loss
    from moe_train.train.engine import set_lr

    tokens = GlobalBatchLoader(0, 1, 8, 1, cfg.data.seq_len, cfg.model.vocab_size, seed=5)._global_batch(0)
    ds = engine.ds
    ds.set_gradient_accumulation_boundary(True)
    out = ds(tokens[:, :-1], tokens[:, 1:])
    ds.backward(total_loss(out.lm_loss, out.moe_losses, cfg.moe, out.moe_seq_losses))
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    set_lr(engine, 3e-3)
    ds.step()
    return grads, 3e-3


def _reshard_worker(rank, world, raw_cfg, src, dst, adamw, back_cfg):
    """Loads ``src`` at this layout and writes it back out as ``dst/canonical``; with
    ``adamw``, one engine step written to ``dst/after_step``; with ``back_cfg`` (another
    layout of the same world size), ``dst/canonical`` loaded there and written to
    ``dst/back``; then trains from ``src`` through ``train``. Each engine is a new one
    in this process (the spawn and imports are what a test pays for)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = config_from_dict(raw_cfg)
    engine, groups, loaded = _engine_from_canonical(cfg, src, rank, world)
    state = ckpt.TrainState(**loaded.meta["train_state"])
    canonical.save(dst, model=engine.module, optimizer=engine.optimizer, state=state, groups=groups,
                   config=raw_cfg)
    out = {}
    if adamw:
        out["grads"], out["lr"] = _one_engine_step(engine, cfg)
        canonical.save(Path(dst) / "after_step", model=engine.module, optimizer=engine.optimizer,
                       state=state, groups=groups, config=raw_cfg)
    if back_cfg:
        engine, groups, _ = _engine_from_canonical(config_from_dict(back_cfg), Path(dst) / canonical.DIRNAME,
                                                   rank, world)
        canonical.save(Path(dst) / "back", model=engine.module, optimizer=engine.optimizer, state=state,
                       groups=groups, config=back_cfg)
    out["losses"] = _train_worker(rank, world, raw_cfg, src)
    return out


# The multi-rank runs are independent chains (A, then the B layouts; the ledger's three
# runs): they run concurrently, each in its own gloo processes, so that the 2-core
# machine is never idle while one rank set waits on its slowest process.
_POOL = ThreadPoolExecutor(max_workers=4)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, ledger_started):
    """A = (4, 2, ZeRO 2), steps 1..6, canonical checkpoints at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = _cfg(tmp, *A)
    losses = run_ranks(_train_worker, A[0], timeout_s=400, raw_cfg=config_to_dict(cfg), resume="none")[0]
    src = Path(cfg.checkpoint.dir) / ckpt.step_dir_name(SAVE_AT) / canonical.DIRNAME
    return {"losses": losses, "src": src, "tmp": tmp, "state": canonical.read_all(src)}


_RESUMED: dict = {}


def _resume_at(straight, layout):
    world, ep, zero = layout
    tmp = straight["tmp"] / f"b_{world}_{ep}_{zero}"
    raw = config_to_dict(_cfg(tmp, world, ep, zero))
    back = config_to_dict(_cfg(tmp / "back", *A)) if world == A[0] else None
    out = run_ranks(_reshard_worker, world, timeout_s=400, raw_cfg=raw, src=str(straight["src"]),
                    dst=str(tmp / "loaded"), adamw=layout == (1, 1, 2), back_cfg=back)
    return tmp / "loaded" / canonical.DIRNAME, out[0]


def _resumed(straight, layout):
    """Layout B's reshard worker; the first call starts every layout's at once."""
    if not _RESUMED:
        _RESUMED.update({b: _POOL.submit(_resume_at, straight, b) for b in LAYOUTS})
    return _RESUMED[layout].result()


def _assert_bitwise(a: dict, b: dict, what: str):
    assert sorted(a) == sorted(b), what
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{what}: {key}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"world{l[0]}_ep{l[1]}_zero{l[2]}")
def test_resume_on_another_layout_is_bitwise_then_trains_like_the_straight_run(straight, layout):
    written, out = _resumed(straight, layout)
    saved = straight["state"]
    assert any(k.startswith("exp_avg_sq/") and ".experts." in k for k in saved)  # moments of experts
    assert any(k.startswith("buffer/") and saved[k].abs().sum() > 0 for k in saved)  # b_E, updated
    assert all(float(v) == SAVE_AT for k, v in saved.items() if k.startswith("step/"))
    _assert_bitwise(canonical.read_all(written), saved, f"A -> {layout}")
    assert sorted(out["losses"]) == [4, 5, 6]
    for step, loss in out["losses"].items():
        want = straight["losses"][step]
        assert abs(loss - want) <= 1e-5 * abs(want), (layout, step, loss, want)


def test_a_model_with_shared_layers_reshards_exactly(tmp_path):
    """ALBERT sharing (``share_layers: all``: every block reuses the first block's modules,
    so the shared MoE layer's experts and its selection bias appear under every block's
    name) through the canonical checkpoint: saved at (world 2, ep 2, ZeRO 2), resumed at
    (1, 1, ZeRO 1); the next losses equal the straight run's to 1e-5 relative."""
    share = {"model": {"share_layers": "all", "num_layers": 4}}
    a = _cfg(tmp_path / "a", 2, 2, 2, **share)
    losses = run_ranks(_train_worker, 2, timeout_s=400, raw_cfg=config_to_dict(a), resume="none")[0]
    src = Path(a.checkpoint.dir) / ckpt.step_dir_name(SAVE_AT)
    b = _cfg(tmp_path / "b", 1, 1, 1, **share)
    resumed = run_ranks(_train_worker, 1, timeout_s=400, raw_cfg=config_to_dict(b), resume=str(src))[0]
    assert sorted(resumed) == [4, 5, 6]
    for step, loss in resumed.items():
        assert abs(loss - losses[step]) <= 1e-5 * abs(losses[step]), (step, loss, losses[step])


def test_a_to_b_to_a_is_bitwise(straight):
    """A's step-3 state loaded at B = (4, 4, ZeRO 1) and written there (each rank one
    expert), then that loaded at A = (4, 2, ZeRO 2) again and written: every tensor
    bitwise A's. (B has A's world size so that one set of processes does both legs;
    the other layouts' single legs cross world sizes.)"""
    written_at_b, _ = _resumed(straight, (4, 4, 1))
    _assert_bitwise(canonical.read_all(written_at_b.parent / "back" / canonical.DIRNAME), straight["state"],
                    "A -> B -> A")


def test_plain_adamw_from_the_canonical_state_steps_to_the_engine_masters(straight):
    """torch.optim.AdamW with the canonical masters, moments and step, the engine's
    weight-decay groups and the gradients the engine used: one step gives, bitwise, the
    masters the engine (ZeRO 2, flat partitions) wrote after its step."""
    from moe_train.model.transformer import MoETransformer
    from moe_train.train.engine import optimizer_param_groups

    written, out = _resumed(straight, (1, 1, 2))
    before, after = straight["state"], canonical.read_all(written.parent / "after_step" / canonical.DIRNAME)
    cfg = _cfg(straight["tmp"] / "adamw", 1, 1, 2)
    model = MoETransformer(cfg.model, cfg.moe)
    groups = optimizer_param_groups(model, cfg.optim)
    o = cfg.optim
    opt = torch.optim.AdamW(groups, lr=out["lr"], betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(before[f"master/{name}"])
            p.grad = out["grads"][name].clone()
            opt.state[p] = {"step": before[f"step/{name}"].clone(),
                            "exp_avg": before[f"exp_avg/{name}"].clone(),
                            "exp_avg_sq": before[f"exp_avg_sq/{name}"].clone()}
    opt.step()
    changed = 0
    for name, p in model.named_parameters():
        want = after[f"master/{name}"]
        assert torch.equal(p.detach(), want), (name, (p.detach() - want).abs().max())
        changed += int(not torch.equal(want, before[f"master/{name}"]))
        assert float(after[f"step/{name}"]) == SAVE_AT + 1
    assert changed == len(list(model.parameters()))


# ------------------------------------------------------------------- sample ledger


class Recording:
    """The real streaming loader, noting the id of every sample it hands out."""

    def __init__(self, inner):
        self.inner, self.manifest, self.ids = inner, inner.manifest, []

    def __iter__(self):
        for batch in self.inner:
            self.ids += [sample_id(row) for row, keep in zip(batch["input_ids"], batch["sample_mask"]) if keep]
            yield batch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _ledger_worker(rank, world, raw_cfg):
    from moe_train.data import build_train_loader
    from moe_train.train import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = config_from_dict(raw_cfg)
    made = []

    def loaders(r, w):
        made.append(Recording(build_train_loader(cfg.data, r, w)))
        return made[-1], None

    result = train(cfg, resume="auto", loaders=loaders)
    return made[0].ids, result.final_step


@pytest.fixture(scope="module")
def ledger_started(tmp_path_factory):
    """The ledger's runs, started in the background (see ``ledger``)."""
    future = _POOL.submit(_ledger_runs, tmp_path_factory.mktemp("ledger"))
    yield future
    future.result()  # never leave its processes running past the module


@pytest.fixture(scope="module")
def ledger(ledger_started):
    return ledger_started.result()


def _ledger_runs(tmp):
    """60 samples, micro-batch 2, no sample shuffle (so a re-split skips nothing): 2 steps
    at 4 ranks (16 samples), 2 at 2 ranks (8), then 6 at 3 ranks (36), each change of
    layout resumed by --resume auto from the canonical checkpoint of the last step."""
    write_synthetic_dataset(str(tmp / "shards"), [20, 17, 13, 10], seq_len=16, vocab_size=512)
    seen, cfg = [], None
    for world, ep, steps in ((4, 2, 2), (2, 2, 4), (3, 1, 10)):
        cfg = make_cfg(tmp, model={"vocab_size": 512},
                       data={"manifest": str(tmp / "shards" / "manifest.json"), "micro_batch_size": 2,
                             "shuffle_buffer": 0},
                       parallel={"expert_parallel_size": ep, "zero_stage": 2},
                       train={"max_steps": steps}, checkpoint={"canonical_every_steps": 100})
        results = run_ranks(_ledger_worker, world, timeout_s=400, raw_cfg=config_to_dict(cfg))
        assert all(final == steps for _, final in results)
        seen += [i for ids, _ in results for i in ids]
    return seen, Path(cfg.checkpoint.dir)


def test_sample_ledger_over_resumes_at_4_2_3_ranks_sees_the_epoch_once(ledger):
    seen, root = ledger
    assert sorted(seen) == list(range(60)), sorted(seen)
    for step in (2, 4, 10):
        assert canonical.complete_canonical(root / ckpt.step_dir_name(step)), step


def test_ckpt_canonical_converts_an_engine_checkpoint_to_the_canonical_one_training_wrote(ledger, tmp_path,
                                                                                         capsys):
    """`moe-train ckpt canonical` on the engine files of the ledger's step 4 (world 2,
    ep 2, ZeRO 2; it starts two gloo processes) writes the canonical checkpoint that
    training wrote for that step: every tensor bitwise, the same train state; `ckpt
    verify` then checks it too."""
    import shutil

    from moe_train.cli import main

    _, root = ledger
    step = root / ckpt.step_dir_name(4)
    engine_only = tmp_path / step.name
    shutil.copytree(step, engine_only, ignore=shutil.ignore_patterns(canonical.DIRNAME))
    assert main(["ckpt", "canonical", str(engine_only)]) == 0
    assert "from the ZeRO partitions of 2 ranks" in capsys.readouterr().out
    converted = engine_only / canonical.DIRNAME
    _assert_bitwise(canonical.read_all(converted), canonical.read_all(step / canonical.DIRNAME), "converted")
    assert ckpt.read_meta(converted)["train_state"] == ckpt.read_meta(step / canonical.DIRNAME)["train_state"]
    assert main(["ckpt", "verify", str(engine_only)]) == 0
    assert "tensors match the manifest (canonical: any layout)" in capsys.readouterr().out


# --------------------------------------------------------------------- refusals


def test_engine_only_checkpoint_on_another_layout_is_refused_naming_the_conversion(tmp_path):
    """No silent optimizer re-initialisation: an engine checkpoint without a canonical
    one does not resume on another layout; the refusal names the conversion command and
    the opt-in."""
    from moe_train.parallel.topology import Topology

    model = torch.nn.Linear(3, 2)
    raw = config_to_dict(make_cfg(tmp_path, parallel={"expert_parallel_size": 2}))
    ckpt.save_checkpoint(tmp_path / "ckpt", model=model, optimizer=torch.optim.AdamW(model.parameters()),
                         state=ckpt.TrainState(step=4), topo=Topology(1, 1, 4), rank=0, config=raw, keep_last=2)
    with pytest.raises(ckpt.CheckpointError, match=r"saved at world 1, ep 1, ZeRO 1, fp32 and has no canonical "
                                                   r"checkpoint; this run is world 2, ep 2.*moe-train ckpt canonical "
                                                   r".*step_00000004.*fresh_optimizer_on_new_layout=true"):
        resume_choice.choose_resume(tmp_path / "ckpt", "auto", Topology(2, 2, 4), raw)
    raw["checkpoint"]["fresh_optimizer_on_new_layout"] = True
    assert resume_choice.choose_resume(tmp_path / "ckpt", "auto", Topology(2, 2, 4), raw).kind == "fresh_optimizer"


# ------------------------------------------- one process: manifest, corruption, pruning


def _tiny_model(d_ff=8, seed=0):
    from moe_train.config import Config
    from moe_train.model.transformer import MoETransformer

    cfg = Config()
    cfg.model.vocab_size, cfg.model.d_model, cfg.model.num_layers, cfg.model.num_heads = 64, 16, 2, 2
    cfg.model.d_ff, cfg.model.max_seq_len = 32, 16
    cfg.moe.num_experts, cfg.moe.d_ff, cfg.moe.top_k, cfg.moe.bias_update_rate = 4, d_ff, 2, 1e-3
    torch.manual_seed(seed)
    model = MoETransformer(cfg.model, cfg.moe)
    for name, b in model.named_buffers():  # the selection bias b_E, as after some updates
        b.copy_(torch.randn(b.shape))
    return cfg, model


@pytest.fixture()
def single(tmp_path):
    """A canonical checkpoint written by one process (ZeRO-0 view: a plain AdamW), one
    step in, beside an engine checkpoint of the same step."""
    from moe_train.parallel.groups import ParallelGroups
    from moe_train.parallel.topology import Topology

    cfg, model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).lm_loss.backward()
    opt.step()
    raw, state, topo = config_to_dict(cfg), ckpt.TrainState(step=1, loader_states=[{"pos": 1}]), Topology(1, 1, 4)
    step = ckpt.save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, state=state, topo=topo, rank=0,
                                config=raw, keep_last=1)
    path = canonical.save(step, model=model, optimizer=opt, state=state,
                          groups=ParallelGroups(topo, 0, None, None, None), config=raw)
    return path, model, opt


def test_canonical_manifest_names_a_corrupted_expert_moment_and_a_truncated_file(single):
    from moe_train.parallel.groups import ParallelGroups
    from moe_train.parallel.topology import Topology

    path, model, opt = single
    assert canonical.verify(path) == [] and ckpt.verify_checkpoint(path) == []
    records = ckpt.read_meta(path)["manifest"]["tensors"]
    name = next(n for n, p in model.named_parameters() if ".experts." in n)
    assert len(records[f"exp_avg_sq/{name}"]["rows_crc32"]) == 4  # one checksum per global expert
    assert records[f"step/{name}"]["shape"] == []
    buffers = {f"buffer/{b}" for b, _ in model.named_buffers()}
    assert buffers and buffers <= set(records)
    row = opt.state[dict(model.named_parameters())[name]]["exp_avg"][2]
    data = next(path.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    offset = raw.find(row.numpy().tobytes())
    assert offset >= 0
    raw[offset + 1] ^= 0x10
    data.write_bytes(bytes(raw))
    problems = canonical.verify(path)
    assert f"{path}: tensor exp_avg/{name}, expert 2, is corrupted (checksum differs from the manifest)" \
        in problems, problems
    _, fresh = _tiny_model(seed=1)
    with pytest.raises(ckpt.CheckpointError, match=rf"exp_avg/{name}, expert 2, is corrupted"):
        canonical.load(path, fresh, ParallelGroups(Topology(1, 1, 4), 0, None, None, None))
    with open(data, "r+b") as f:
        f.truncate(100)
    assert any("100 bytes, the manifest says" in p for p in canonical.verify(path))


def test_canonical_load_refuses_a_model_it_does_not_fit(single):
    from moe_train.parallel.groups import ParallelGroups
    from moe_train.parallel.topology import Topology

    path, model, _ = single
    name = next(n for n, p in model.named_parameters() if ".experts." in n)
    _, other = _tiny_model(d_ff=16)
    with pytest.raises(ckpt.CheckpointError, match=r"master/.*experts.* has shape \(4, .*this model needs"):
        canonical.load(path, other, ParallelGroups(Topology(1, 1, 4), 0, None, None, None))
    _, same = _tiny_model(seed=3)
    loaded = canonical.load(path, same, ParallelGroups(Topology(1, 1, 4), 0, None, None, None))
    canonical.apply_to_model(same, loaded)
    assert torch.equal(dict(same.named_parameters())[name], dict(model.named_parameters())[name])
    for (b, want), got in zip(model.named_buffers(), same.buffers()):
        assert torch.equal(got, want), b


def test_half_written_canonical_is_never_used_and_pruning_keeps_the_newest_canonical(single):
    from moe_train.parallel.topology import Topology

    path, model, opt = single
    root, raw = path.parent.parent, ckpt.read_meta(path)["config"]
    for step in (2, 3):
        ckpt.save_checkpoint(root, model=model, optimizer=opt, state=ckpt.TrainState(step=step),
                             topo=Topology(1, 1, 4), rank=0, config=raw, keep_last=1)
    assert [p.name for p, _, ok in ckpt.list_checkpoints(root) if ok] == ["step_00000001", "step_00000003"]
    (root / "step_00000003" / ".tmp_canonical").mkdir()  # a writer died inside the canonical save
    (root / "step_00000003" / ".tmp_canonical" / "__0_0.distcp").write_bytes(b"partial")
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000003 was saved at .* no canonical checkpoint.*"
                                                   r"or resume from the older .*step_00000001/canonical"):
        resume_choice.choose_resume(root, "auto", Topology(2, 2, 4), raw)
    source = resume_choice.choose_resume(root, str(path), Topology(2, 2, 4), raw)
    assert source.kind == "canonical" and source.path == path
