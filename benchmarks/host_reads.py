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

prints the reads of one MoE layer's forward + backward at ep 1 for a capacity (Switch)
and a dropless config: the counts issue 17 wants at 0 (capacity) and 0 (dropless, ep 1).
The tests use ``HostReads`` (``tests/test_step_syncs.py``).
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


def layer_reads(cfg, d_model: int = 16, tokens: int = 128) -> list[str]:
    """The host reads of one training forward + backward of a ``MoELayer`` at ep 1."""
    from moe_train.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(cfg, d_model).train()
    x = torch.randn(2, tokens // 2, d_model, requires_grad=True)
    with HostReads() as reads:
        out = layer(x)
        (out.y.float().sum() + out.aux_loss + out.z_loss).backward()
    return reads.reads


def main() -> dict:
    from collections import Counter

    from moe_train.moe import MoEConfig

    results = {}
    for name, kw in (("top-1, capacity 1.25 (Switch)", dict(num_experts=8, top_k=1, capacity_factor=1.25)),
                     ("top-2, dropless", dict(num_experts=8, top_k=2, capacity_factor=None))):
        reads = layer_reads(MoEConfig(d_ff=32, **kw))
        results[name] = len(reads)
        print(f"{name}: {len(reads)} host reads in one MoE layer forward + backward at ep 1 "
              f"({dict(Counter(reads))})")
    return results


if __name__ == "__main__":
    main()
