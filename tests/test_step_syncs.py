"""The training step reads nothing from the device between the last forward and its
backward (on a GPU such a read stalls queuing the backward until the forward has run):
the agreement flags (a non-finite loss anywhere, a stop request) act on the device and
are read once, after the optimizer step."""

from __future__ import annotations

import torch

from benchmarks.host_reads import HostReads
from moe_train.config import Config
from moe_train.model.transformer import MoETransformer
from moe_train.parallel.groups import ParallelGroups
from moe_train.parallel.topology import Topology
from moe_train.train.control import StopRequest
from moe_train.train.engine import Engine
from moe_train.train.faults import Faults
from moe_train.train.step import train_step


class OneProcessEngine:
    """The part of DeepSpeed's engine that ``train_step`` uses, around a plain model and
    AdamW; it marks the end of each forward and the start of each backward."""

    def __init__(self, model, reads: HostReads):
        self.module, self.reads = model, reads
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.skipped_steps = 0

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        pass

    def __call__(self, input_ids, labels):
        out = self.module(input_ids, labels)
        self.reads.mark("forward done")
        return out

    def backward(self, loss):
        self.reads.mark("backward")
        self.last_loss = loss.detach().clone()
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad()

    def get_global_grad_norm(self):
        return None


def _setup(grad_accum: int):
    cfg = Config()
    cfg.model.vocab_size, cfg.model.d_model, cfg.model.num_layers, cfg.model.num_heads = 64, 16, 2, 2
    cfg.model.d_ff, cfg.model.max_seq_len = 32, 16
    cfg.moe.num_experts, cfg.moe.d_ff, cfg.moe.top_k = 4, 8, 2
    cfg.train.grad_accum_steps, cfg.train.max_steps = grad_accum, 10
    torch.manual_seed(0)
    model = MoETransformer(cfg.model, cfg.moe)
    groups = ParallelGroups(Topology(1, 1, 4), 0, None, None, None)
    batches = iter([{"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.randint(0, 64, (2, 8))}
                    for _ in range(4 * grad_accum)])
    return cfg, model, groups, batches


def test_no_host_read_between_the_last_forward_and_its_backward():
    cfg, model, groups, batches = _setup(grad_accum=2)
    with HostReads() as reads:
        engine = Engine(OneProcessEngine(model, reads), own_clipping=False, ds_config={})
        out = train_step(engine, batches, cfg, groups, torch.device("cpu"), 1, StopRequest())
    assert reads.between("forward done", "backward") == []
    assert not out.skipped and not out.stop and out.mean_lm > 0


def test_a_non_finite_loss_and_a_stop_still_act_through_the_device_flags():
    cfg, model, groups, batches = _setup(grad_accum=2)
    stop = StopRequest()
    stop.request("test")
    with HostReads() as reads:
        ds = OneProcessEngine(model, reads)
        out = train_step(Engine(ds, own_clipping=False, ds_config={}), batches, cfg, groups,
                         torch.device("cpu"), 5, stop, Faults("nan_loss@5"))
    assert reads.between("forward done", "backward") == []
    assert out.skipped and out.stop
    assert torch.isnan(ds.last_loss)  # the last backward got NaN: every rank's optimizer skips alike


def test_host_reads_counts_what_reads_and_not_what_does_not():
    t = torch.arange(6.0)
    with HostReads() as reads:
        reads.mark("a")
        _ = t * 2 + 1  # device work only
        reads.mark("b")
        bool(t[0] > 0), float(t[1]), t.tolist(), t.numpy(), t[t > 2], torch.bincount(t.long())
        t.repeat_interleave(2), t.repeat_interleave(torch.full((6,), 2), output_size=12)  # no read
        torch.full((6,), 2).repeat_interleave(torch.full((6,), 2))  # a read: its size is data
        reads.mark("c")
    assert reads.between("a", "b") == []
    assert reads.between("b", "c") == [
        "_local_scalar_dense", "_local_scalar_dense", "tolist", "numpy", "boolean-mask index", "bincount",
        "repeat_interleave without output_size"]
    assert torch.Tensor.tolist(t) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # unpatched again
