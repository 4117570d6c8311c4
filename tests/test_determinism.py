"""train.deterministic (issue 12): two runs with the same seed and layout give
bit-identical losses and weights for 50 steps on CPU, with dropout and router jitter on
(so every RNG stream matters), at world 2, ep 2, ZeRO-2; and the ops PyTorch reports as
having no deterministic kernel are named in the report instead of failing the run."""

import warnings

import torch

from engine_harness import make_cfg, run_train
from moe_train.train import determinism


def test_two_runs_are_bit_identical(tmp_path):
    def run(name):
        cfg = make_cfg(tmp_path / name, train={"max_steps": 50, "deterministic": True},
                       model={"dropout": 0.1}, moe={"jitter_eps": 0.01},
                       parallel={"expert_parallel_size": 2, "zero_stage": 2})
        return run_train(cfg, 2, keep_state=True)

    first, second = run("a"), run("b")
    for a, b in zip(first, second):  # every rank
        assert len(a.losses) == 50
        assert a.losses == b.losses  # float equality: bit-identical
        assert a.grad_norms == b.grad_norms
        for name, tensor in a.state.items():
            assert torch.equal(tensor, b.state[name]), name
    assert first[0].losses[50] < first[0].losses[1]  # it trained


def test_nondeterministic_ops_are_named_not_fatal():
    det = determinism.configure(True, torch.device("cpu"))
    try:
        assert torch.are_deterministic_algorithms_enabled()
        warnings.warn("index_add_cuda_ does not have a deterministic implementation, but you set "
                      "'torch.use_deterministic_algorithms(True, warn_only=True)'.")
        assert det.ops == {"index_add_cuda_"}
        assert "NOT deterministic on this device: index_add_cuda_" in det.report()
    finally:
        determinism.restore(det)
    assert not torch.are_deterministic_algorithms_enabled()
