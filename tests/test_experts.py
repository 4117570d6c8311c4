"""GroupedExperts: the batched kernels == a per-expert loop, init by global expert id."""

import itertools

import pytest
import torch

from moe_train.moe.experts import ACTIVATIONS, IMPLS, GroupedExperts, expert_seed

D_MODEL, D_FF = 8, 16
COUNTS = {
    "uneven_with_zeros": [3, 0, 5, 1],
    "uniform": [3, 3, 3, 3],
    "one_expert": [0, 0, 7, 0],
    "all_zero": [0, 0, 0, 0],
}


def loop_reference(experts: GroupedExperts, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """y_ND from expert_forward, one expert at a time."""
    pieces = [experts.expert_forward(e, x_nD) for e, x_nD in enumerate(x_ND.split(counts))]
    return torch.cat(pieces) if pieces else x_ND[:0]


def outputs_and_grads(experts, x_ND, counts, g_ND, fast: bool):
    params = [x_ND] + list(experts.parameters())
    if fast:
        y_ND = experts(x_ND, torch.tensor(counts, dtype=torch.int64))
    else:
        y_ND = loop_reference(experts, x_ND, counts)
    # (y * g).sum() gives every output element its own weight; + 0 * sum keeps an
    # empty output connected for the all-zero count vector.
    grads = torch.autograd.grad((y_ND * g_ND).sum() + 0 * y_ND.sum(), params, allow_unused=True)
    return y_ND, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("activation,impl,counts_name",
                         list(itertools.product(ACTIVATIONS, IMPLS, COUNTS)))
def test_forward_and_grads_match_loop(activation, impl, counts_name):
    counts = COUNTS[counts_name]
    experts = GroupedExperts(len(counts), D_MODEL, D_FF, activation, seed=3, impl=impl)
    gen = torch.Generator().manual_seed(1)
    x_ND = torch.randn(sum(counts), D_MODEL, generator=gen, requires_grad=True)
    g_ND = torch.randn(sum(counts), D_MODEL, generator=gen)

    y_fast, grads_fast = outputs_and_grads(experts, x_ND, counts, g_ND, fast=True)
    y_ref, grads_ref = outputs_and_grads(experts, x_ND, counts, g_ND, fast=False)

    assert y_fast.shape == (sum(counts), D_MODEL) and y_fast.dtype == x_ND.dtype
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    names = ["x"] + [n for n, _ in experts.named_parameters()]
    assert len(grads_fast) == len(names) == (4 if activation == "swiglu" else 3)
    for name, g_fast, g_ref in zip(names, grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-6, msg=name)
    if counts_name == "uneven_with_zeros":  # an expert with no rows gets exactly zero grad
        assert grads_fast[1][1].abs().max() == 0 and grads_fast[1][0].abs().max() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_all_zero_counts_backward_reaches_weights(impl):
    experts = GroupedExperts(4, D_MODEL, D_FF, "gelu", impl=impl)
    x_ND = torch.zeros(0, D_MODEL, requires_grad=True)
    y_ND = experts(x_ND, torch.zeros(4, dtype=torch.int64))
    assert y_ND.shape == (0, D_MODEL) and y_ND.requires_grad
    y_ND.sum().backward()  # an expanded (stride-0) gradient, as from a plain .sum()
    assert experts.w1_EDF.grad is not None and experts.w1_EDF.grad.abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_expanded_output_grad(impl):
    """y.sum().backward() hands an expanded gradient; _grouped_mm rejects stride-0 inputs."""
    experts = GroupedExperts(3, D_MODEL, D_FF, "gelu", impl=impl)
    counts = [2, 0, 4]
    x_ND = torch.randn(6, D_MODEL, requires_grad=True)
    experts(x_ND, torch.tensor(counts)).sum().backward()
    expected = torch.autograd.grad(loop_reference(experts, x_ND, counts).sum(), x_ND)[0]
    torch.testing.assert_close(x_ND.grad, expected, rtol=1e-5, atol=1e-6)


def test_init_depends_on_global_expert_id_only():
    whole = GroupedExperts(8, D_MODEL, D_FF, "swiglu", first_global_expert_id=0, seed=11)
    part = GroupedExperts(2, D_MODEL, D_FF, "swiglu", first_global_expert_id=4, seed=11)
    for name in ("w1_EDF", "w2_EFD", "w3_EDF"):
        torch.testing.assert_close(getattr(part, name), getattr(whole, name)[4:6], rtol=0, atol=0)
    # distinct experts and seeds differ; scales follow N(0, D**-0.5) / N(0, F**-0.5)
    assert not torch.equal(whole.w1_EDF[0], whole.w1_EDF[1])
    other_seed = GroupedExperts(2, D_MODEL, D_FF, "swiglu", first_global_expert_id=4, seed=12)
    assert not torch.equal(other_seed.w1_EDF, part.w1_EDF)
    big = GroupedExperts(2, 256, 512, "gelu")
    assert abs(big.w1_EDF.std().item() - 256 ** -0.5) < 0.01 * 256 ** -0.5 * 10
    assert abs(big.w2_EFD.std().item() - 512 ** -0.5) < 0.01 * 512 ** -0.5 * 10


def test_expert_seed_deterministic_and_distinct():
    seeds = [expert_seed(5, g) for g in range(4096)]
    assert seeds == [expert_seed(5, g) for g in range(4096)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2 ** 63 for s in seeds)
    assert expert_seed(5, 0) != expert_seed(6, 0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="'tanh_gelu'"):
        GroupedExperts(2, D_MODEL, D_FF, "tanh_gelu")
    with pytest.raises(ValueError, match="'cuda_fast'"):
        GroupedExperts(2, D_MODEL, D_FF, "gelu", impl="cuda_fast")
    # _grouped_mm needs 16-byte row strides: 6 fp32 columns are 24 bytes
    misaligned = GroupedExperts(2, 6, D_FF, "gelu", impl="grouped_mm")
    with pytest.raises(ValueError, match="d_model \\(6\\)"):
        misaligned(torch.randn(3, 6), torch.tensor([1, 2]))


def test_auto_falls_back_to_bmm_when_misaligned():
    experts = GroupedExperts(2, 6, 10, "gelu", impl="auto")
    x_ND = torch.randn(5, 6)
    torch.testing.assert_close(experts(x_ND, torch.tensor([4, 1])),
                               loop_reference(experts, x_ND, [4, 1]), rtol=1e-5, atol=1e-6)


def test_bf16_input_with_fp32_weights():
    experts = GroupedExperts(3, D_MODEL, D_FF, "gelu")
    x_ND = torch.randn(5, D_MODEL)
    y_ND = experts(x_ND.bfloat16(), torch.tensor([2, 0, 3]))
    assert y_ND.dtype == torch.bfloat16
    torch.testing.assert_close(y_ND.float(), loop_reference(experts, x_ND, [2, 0, 3]),
                               rtol=5e-2, atol=5e-2)


def test_counts_must_fit_the_rows():
    """Counts past the rows would make _grouped_mm read past x: device counts are checked
    on the device (no host read), host counts on the host."""
    experts = GroupedExperts(2, D_MODEL, D_FF, "gelu", impl="grouped_mm")
    with pytest.raises(RuntimeError, match="sums to more rows than x_ND has"):
        experts(torch.randn(5, D_MODEL), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="sums to 6"):
        experts(torch.randn(5, D_MODEL), torch.tensor([3, 3]), host_counts=[3, 3])
    with pytest.raises(ValueError, match="sums to 6"):
        GroupedExperts(2, D_MODEL, D_FF, "gelu", impl="bmm")(torch.randn(5, D_MODEL), torch.tensor([3, 3]))


@pytest.mark.parametrize("impl", ["bmm", "grouped_mm"])
def test_rows_past_the_counts_are_padding_and_the_uniform_layout(impl):
    """Ragged rows with padding after them give the same rows as without (the padding's
    outputs are never read); the uniform layout equals ragged equal counts."""
    experts = GroupedExperts(3, D_MODEL, D_FF, "swiglu", seed=3, impl=impl)
    gen = torch.Generator().manual_seed(0)
    x_ND = torch.randn(9, D_MODEL, generator=gen)
    counts = torch.tensor([2, 0, 4])
    want = loop_reference(experts, x_ND[:6], [2, 0, 4])
    torch.testing.assert_close(experts(x_ND, counts)[:6], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(experts(x_ND, counts, host_counts=[2, 0, 4])[:6], want, rtol=1e-5, atol=1e-6)
    uniform = experts(x_ND, rows_per_expert=3)
    torch.testing.assert_close(uniform, loop_reference(experts, x_ND, [3, 3, 3]), rtol=1e-5, atol=1e-6)


def _spy_kernels(experts: GroupedExperts) -> list[str]:
    """Records which kernel each forward of ``experts`` runs."""
    used = []
    for name in ("bmm", "grouped_mm"):
        real = getattr(experts, f"_forward_{name}")

        def spy(*args, _real=real, _name=name):
            used.append(_name)
            return _real(*args)
        setattr(experts, f"_forward_{name}", spy)
    return used


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_kernel_does_not_depend_on_the_counts(dtype):
    """"auto" picks its kernel once per (device, dtype, alignment), not per batch: a batch
    with equal counts and one with unequal counts run the same kernel, and expert 0's
    output for the same rows is bitwise the same whatever the other experts received.
    (Before, equal counts ran bmm and unequal ones _grouped_mm, which round differently:
    fp32 differed here by ~1e-7.)"""
    experts = GroupedExperts(4, D_MODEL, D_FF, "swiglu", seed=3, impl="auto")
    used = _spy_kernels(experts)
    gen = torch.Generator().manual_seed(0)
    x0_nD = torch.randn(3, D_MODEL, generator=gen).to(dtype)  # expert 0's rows in both batches
    equal_ND = torch.cat([x0_nD, torch.randn(9, D_MODEL, generator=gen).to(dtype)])
    unequal_ND = torch.cat([x0_nD, torch.randn(7, D_MODEL, generator=gen).to(dtype)])
    y_equal = experts(equal_ND, torch.tensor([3, 3, 3, 3]))[:3]
    y_unequal = experts(unequal_ND, torch.tensor([3, 4, 3, 0]))[:3]
    assert used == ["grouped_mm", "grouped_mm"]
    assert experts.resolved_impl(torch.device("cpu"), dtype) == "grouped_mm"
    assert torch.equal(y_equal, y_unequal)


def test_resolved_impl_per_device_dtype_and_alignment():
    experts = GroupedExperts(2, 6, 10, "gelu", impl="auto")  # 6 fp32 = 24 bytes, 6 bf16 = 12
    assert experts.resolved_impl(torch.device("cpu"), torch.float32) == "bmm"
    aligned = GroupedExperts(2, D_MODEL, D_FF, "gelu", impl="auto")
    assert aligned.resolved_impl(torch.device("cpu"), torch.float32) == "grouped_mm"
    assert aligned.resolved_impl(torch.device("cuda"), torch.bfloat16) == "grouped_mm"
    assert GroupedExperts(2, D_MODEL, D_FF, "gelu", impl="bmm").resolved_impl(
        torch.device("cpu"), torch.float32) == "bmm"
    # the choice is cached per key and used by every later batch
    used = _spy_kernels(experts)
    for counts in ([2, 2], [4, 0], [1, 3]):
        experts(torch.randn(4, 6), torch.tensor(counts))
    assert used == ["bmm"] * 3
    assert experts._impl_by_key == {("cpu", torch.float32, False): "bmm"}
