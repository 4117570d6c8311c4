"""Counting the host's reads of device values (each one a device->host synchronisation on
a GPU, which stops the CPU from queuing kernels until the device catches up).

    with HostReads() as reads:
        ...
        reads.mark("forward done")
        ...
    reads.between("forward done", "backward") == []

Counted: the aten ops that read a value on the host (``_local_scalar_dense``: ``item``,
``bool``, ``float``, ``int``), the ops whose output size depends on the data (``nonzero``,
``unique``, ``bincount``, ``masked_select``, boolean-mask indexing, ``repeat_interleave``
without ``output_size``), and ``Tensor.tolist`` / ``Tensor.numpy``, which do not dispatch
on a CPU tensor and are patched for the duration.

    python -m benchmarks.host_reads

prints the reads of one MoE layer's forward + backward at ep 1, 2 and 4 (4 gloo ranks)
for capacity and dropless configs; the targets (0 with a capacity at any ep; dropless 0
at ep 1 and 1 at ep > 1) are asserted in ``tests/test_host_reads.py``, the step's in
``tests/test_step_syncs.py``; ``benchmarks/sync_debug.py`` counts a whole training step.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READ_OPS = {"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive",
            "unique_dim", "bincount", "masked_select"}


def _is_read(func, args, kwargs) -> Optional[str]:
    name = func._schema.name.split("::")[-1]
    if name in READ_OPS:
        return name
    if name == "repeat_interleave" and (kwargs or {}).get("output_size") is None:
        return "repeat_interleave without output_size"
    if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                               for i in (args[1] if len(args) > 1 else ()) if i is not None):
        return "boolean-mask index"
    return None


class HostReads(TorchDispatchMode):
    """Records every host read (see the module docstring) and markers, in order."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []  # ("read", what) or ("mark", label)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        what = _is_read(func, args, kwargs)
        if what:
            self.events.append(("read", what))
        return func(*args, **(kwargs or {}))

    def mark(self, label: str) -> None:
        self.events.append(("mark", label))

    @property
    def reads(self) -> list[str]:
        return [what for kind, what in self.events if kind == "read"]

    def between(self, first: str, second: str) -> list[str]:
        """The reads after the LAST ``first`` marker and before the next ``second``."""
        marks = [i for i, (kind, label) in enumerate(self.events) if kind == "mark" and label == first]
        assert marks, f"no marker {first!r}"
        out = []
        for kind, what in self.events[marks[-1] + 1:]:
            if kind == "mark" and what == second:
                return out
            if kind == "read":
                out.append(what)
        raise AssertionError(f"no marker {second!r} after {first!r}")

    def __enter__(self):
        self._saved = torch.Tensor.tolist, torch.Tensor.numpy
        tolist, numpy = self._saved

        def counted_tolist(t, *a, **k):
            self.events.append(("read", "tolist"))
            return tolist(t, *a, **k)

        def counted_numpy(t, *a, **k):
            self.events.append(("read", "numpy"))
            return numpy(t, *a, **k)

        torch.Tensor.tolist, torch.Tensor.numpy = counted_tolist, counted_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist, torch.Tensor.numpy = self._saved
        return super().__exit__(*exc)


CASES = {  # name: MoEConfig overrides (d_ff 32, min_capacity 0, D = 16)
    "top-1, capacity 1.25 (Switch)": dict(num_experts=8, top_k=1, capacity_factor=1.25),
    "top-2, dropless": dict(num_experts=8, top_k=2, capacity_factor=None),
    "top-8 of 64, shared, sigmoid, bias, groups, dropless": dict(
        num_experts=64, top_k=8, capacity_factor=None, shared_d_ff=32, score_func="sigmoid",
        bias_update_rate=1e-3, num_groups=8, groups_per_token=4, activation="swiglu"),
    "top-8 of 64, shared, sigmoid, bias, groups, capacity 1.0": dict(
        num_experts=64, top_k=8, capacity_factor=1.0, shared_d_ff=32, score_func="sigmoid",
        bias_update_rate=1e-3, num_groups=8, groups_per_token=4, drop_policy="probs"),
}
EPS = (1, 2, 4)


def layer_reads(cfg, d_model: int = 16, tokens: int = 32, ep_group=None, seed: int = 0) -> list[str]:
    """The host reads of one training forward + backward of a ``MoELayer``: the second of
    two calls (the first with a new token count may check it with the EP group once)."""
    from moe_train.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(cfg, d_model, ep_group=ep_group).train()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        x = torch.randn(2, tokens // 2, d_model, generator=gen, requires_grad=True)
        with HostReads() as reads:
            out = layer(x)
            (out.y.float().square().sum() + out.aux_loss + out.z_loss).backward()
    return reads.reads


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from moe_train.moe import MoEConfig
    from moe_train.parallel.groups import build_groups
    from moe_train.parallel.topology import Topology

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = {}
    for ep in EPS:
        groups = build_groups(Topology(world, ep, 64), rank)
        for name, kw in CASES.items():
            out[f"{name} @ ep {ep}"] = layer_reads(MoEConfig(d_ff=32, min_capacity=0, **kw),
                                                   ep_group=groups.ep if ep > 1 else None, seed=rank)
    dist.barrier()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main(world: int = 4) -> dict:
    """Every case at ep 1, 2 and 4 on ``world`` gloo ranks; prints the largest count over
    the ranks and what was read. Run it with PYTHONPATH set to another checkout to see
    that checkout's counts (this file only needs ``HostReads``)."""
    import os
    import tempfile
    from collections import Counter

    from moe_train.parallel.spawn import free_local_port, run_local_processes

    with tempfile.TemporaryDirectory() as out_dir:
        port = free_local_port()
        codes = run_local_processes(_rank, [(r, world, port, out_dir) for r in range(world)], 600)
        if any(code != 0 for code in codes):
            raise SystemExit(f"host_reads: ranks exited {codes}")
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    results = {}
    for key in ranks[0]:
        counts = [len(r[key]) for r in ranks]
        results[key] = max(counts)
        print(f"{key}: {max(counts)} host reads in one MoE layer forward + backward "
              f"({dict(Counter(ranks[counts.index(max(counts))][key]))})")
    return results


if __name__ == "__main__":
    main()
