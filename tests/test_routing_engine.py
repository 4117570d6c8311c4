"""The selection bias and the routing alarms through the real training loop (``train``
on 2 gloo ranks, DeepSpeed, ep 2, bf16, gradient accumulation 2):

* the bias is updated once per applied step, left alone by a skipped (non-finite) step,
  bitwise equal on both ranks, fp32 although DeepSpeed runs the model in bf16;
* it is saved in the checkpoint (``model_dense.pt``) and ``--resume auto`` restores it;
* shared-expert weights stay bitwise identical on both ranks (dense reduction);
* ``train.stop_on_routing_alarm`` stops with a checkpoint and an error naming the layer.
"""

import os

import torch

from dist_utils import run_ranks
from engine_harness import GlobalBatchLoader, make_cfg
import moe_train.checkpoint as ckpt
from moe_train.config import config_from_dict, config_to_dict

BIAS = "blocks.1.mlp.router.expert_bias"


def _worker(rank, world, raw_cfg, resume, fault):
    import moe_train.train.loop as loop

    from moe_train.train.faults import Faults

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cfg = config_from_dict(raw_cfg)
    records, real = {}, loop.update_selection_biases

    def spy(model, group, applied, step):  # the hook train.py calls after every step
        before = model.blocks[1].mlp.router.expert_bias.clone()
        real(model, group, applied=applied, step=step)
        after = model.blocks[1].mlp.router.expert_bias
        records[step] = {"applied": applied, "before": before, "after": after.clone(), "dtype": after.dtype,
                         "param_dtype": model.blocks[1].mlp.router.w_DE.dtype}

    loop.update_selection_biases = spy

    def loaders(r, w):
        return GlobalBatchLoader(r, w, cfg.data.micro_batch_size, cfg.train.grad_accum_steps,
                                 cfg.data.seq_len, cfg.model.vocab_size), None
    try:
        result = loop.train(cfg, resume=resume, loaders=loaders, keep_state=True, faults=Faults(fault))
    except RuntimeError as err:
        return {"error": str(err), "records": records}
    return {"result": result, "records": records}


def _cfg(tmp, **extra):
    sections = {"moe": {"bias_update_rate": 0.01, "score_func": "sigmoid", "shared_d_ff": 16,
                        "shared_gate": "sigmoid"},
                "parallel": {"expert_parallel_size": 2, "zero_stage": 1},
                "train": {"max_steps": 6, "grad_accum_steps": 2, "dtype": "bf16"},
                "logging": {"every_steps": 3, "max_drop_frac": None}}
    for key, values in extra.items():
        sections.setdefault(key, {}).update(values)
    return make_cfg(tmp, **sections)


def _run(cfg, resume="none", fault=""):
    return run_ranks(_worker, 2, timeout_s=300, raw_cfg=config_to_dict(cfg), resume=resume, fault=fault)


def test_bias_through_the_loop_skip_save_resume_and_alarm_stop(tmp_path):
    first = _run(_cfg(tmp_path), fault="nan_loss@2,stop@4")
    records = [r["records"] for r in first]
    assert first[0]["result"].stopped and first[0]["result"].final_step == 4
    assert sorted(records[0]) == [1, 2, 3, 4]
    for step, rec in records[0].items():
        assert rec["dtype"] == torch.float32 and rec["param_dtype"] == torch.bfloat16
        assert rec["applied"] == (step != 2)
        changed = not torch.equal(rec["before"], rec["after"])
        assert changed == (step != 2), f"step {step}: a skipped step must leave the bias alone"
        assert torch.equal(rec["after"], records[1][step]["after"])  # bitwise on both ranks
    state = [r["result"].state for r in first]
    for name in state[0]:
        if ".shared." in name:
            assert torch.equal(state[0][name], state[1][name]), name
    saved = ckpt.find_checkpoint(tmp_path / "ckpt", "auto")
    dense = torch.load(saved / "model_dense.pt", weights_only=True)
    assert saved.name == "step_00000004" and dense[BIAS].dtype == torch.float32
    assert torch.equal(dense[BIAS], records[0][4]["after"])

    # Resume: the bias comes back; then every drop raises the alarm, which stops the run.
    second = _run(_cfg(tmp_path, moe={"capacity_factor": 0.5}, train={"stop_on_routing_alarm": True},
                       logging={"max_drop_frac": 0.0}), resume="auto")
    assert torch.equal(second[0]["records"][5]["before"], dense[BIAS])
    for r in second:
        assert "step 6: routing alarm" in r["error"] and "MoE layer 1: drop fraction" in r["error"], r
    assert "step_00000006" in second[0]["error"]
    assert ckpt.find_checkpoint(tmp_path / "ckpt", "auto").name == "step_00000006"
