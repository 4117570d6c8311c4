"""Routing beyond the peers on real gloo ranks (MOE_REFERENCE.md invariants 2, 5 and 6):

* every new option (sigmoid scores, route_scale, selection bias, groups, shared experts,
  the sequence-wise loss) at ep 2 and 4 equals one process with ep 1 (which
  tests/test_routing_options.py holds against the per-token reference): outputs, losses,
  input, router, shared and expert gradients, with per-assignment and once-per-rank
  dispatch alike;
* once-per-rank dispatch sends the (token, rank) pairs counted by hand, fewer rows than
  the per-assignment dispatcher, and never hangs on a rank with zero tokens (dropless);
  capacity routing sends the E * C slots, and unequal token counts across the EP group
  are one clear error on every rank;
* the selection bias after a step at (world 4, ep 2, gradient accumulation 2) equals a
  single-process reference on the concatenated global batch, bitwise equal on every
  rank, with and without activation checkpointing.
"""

import torch
import torch.distributed as dist

from dist_utils import run_ranks
from moe_train.config import ModelConfig, MoEConfig
from moe_train.model.transformer import MoETransformer
from moe_train.moe.balance import update_selection_biases
from moe_train.moe.layer import MoELayer
from moe_train.parallel.groups import build_groups
from moe_train.parallel.topology import Topology

D_MODEL, BATCH, SEQ, NUM_EXPERTS = 8, 2, 6, 8
CASES = [  # MoEConfig overrides; all with 8 experts
    dict(top_k=3, score_func="sigmoid", bias_update_rate=0.01, num_groups=4, groups_per_token=2,
         shared_d_ff=12, shared_gate="sigmoid", activation="swiglu", seq_balance_coef=1.0,
         capacity_factor=1.25),
    dict(top_k=2, bias_update_rate=0.01, route_scale=2.5, shared_d_ff=12, capacity_factor=None,
         num_groups=2, groups_per_token=1, group_score="max"),
    dict(top_k=4, drop_policy="probs", capacity_factor=1.0, activation="relu"),
]
DISPATCHES = ("per_assignment", "once_per_rank")


def build_layer(case, dispatch, ep_group=None):
    cfg = MoEConfig(num_experts=NUM_EXPERTS, d_ff=16, min_capacity=0, seed=11, dispatch=dispatch, **case)
    torch.manual_seed(0)
    layer = MoELayer(cfg, D_MODEL, ep_group=ep_group)
    if layer.router.expert_bias is not None:
        with torch.no_grad():
            layer.router.expert_bias.copy_(torch.randn(NUM_EXPERTS, generator=torch.Generator().manual_seed(3)) * 0.2)
    return layer


def batch(world, case_index, empty_rank=None):
    gen = torch.Generator().manual_seed(100 + case_index)
    xs = [torch.randn(BATCH, SEQ, D_MODEL, generator=gen) for _ in range(world)]
    gs = [torch.randn(BATCH, SEQ, D_MODEL, generator=gen) for _ in range(world)]
    if empty_rank is not None:
        xs[empty_rank], gs[empty_rank] = xs[empty_rank][:0], gs[empty_rank][:0]
    return xs, gs


def run_layer(layer, x, g):
    rows = []
    dispatch = layer.dispatcher.dispatch
    layer.dispatcher.dispatch = lambda *a, **k: rows.append(dispatch(*a, **k)) or rows[-1]
    x = x.clone().requires_grad_()
    out = layer(x)
    ((out.y * g).sum() + 0.3 * out.aux_loss + 0.2 * out.z_loss + 0.7 * out.seq_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return {"y": out.y.detach(), "aux": out.aux_loss.detach(), "z": out.z_loss.detach(),
            "seq": out.seq_loss.detach(), "x_grad": x.grad, "grads": grads,
            "rows_sent": rows[0].rows_sent, "rows_sent_remote": rows[0].rows_sent_remote}


def hand_count(layer, x, ep_size):
    """What each dispatcher must send, from the router's decision: per assignment, the
    kept assignments (dropless) or the E * C capacity slots, filled or not (capacity);
    once per rank, the distinct (token, destination rank) pairs."""
    with torch.no_grad():
        routing = layer.router(x.reshape(-1, D_MODEL), seq_len=SEQ)
    kept = routing.kept_order_N
    tokens, experts = routing.token_ids_A[kept].tolist(), routing.expert_ids_A[kept].tolist()
    per_rank = NUM_EXPERTS // ep_size
    per_assignment = len(kept) if routing.capacity is None else NUM_EXPERTS * routing.capacity
    return per_assignment, len({(t, e // per_rank) for t, e in zip(tokens, experts)})


def parity_worker(rank, world, ep_size, empty_rank=None, cases=range(len(CASES))):
    groups = build_groups(Topology(world, ep_size, NUM_EXPERTS), rank)
    out = {}
    for i in cases:
        xs, gs = batch(world, i, empty_rank)
        for dispatch in DISPATCHES:
            layer = build_layer(CASES[i], dispatch, groups.ep)
            out[i, dispatch] = run_layer(layer, xs[rank], gs[rank])
            out[i, dispatch]["hand"] = hand_count(layer, xs[rank], ep_size)
    dist.barrier()
    return out


def single_process(world, empty_rank=None, cases=range(len(CASES))):
    ref = {}
    for i in cases:
        xs, gs = batch(world, i, empty_rank)
        layer = build_layer(CASES[i], "per_assignment")
        per_rank = [run_layer(layer, x, g) for x, g in zip(xs, gs)]
        ref[i] = (per_rank, per_rank[-1]["grads"])  # grads accumulate: the last holds the sums
    return ref


def check(world, ep_size, ranks, ref):
    topo = Topology(world, ep_size, NUM_EXPERTS)
    for (i, dispatch), _ in ranks[0].items():
        per_rank, summed = ref[i]
        ctx = f"case {i} {dispatch} world {world} ep {ep_size}"
        for r in range(world):
            got = ranks[r][i, dispatch]
            for key in ("y", "aux", "z", "seq", "x_grad"):
                torch.testing.assert_close(got[key], per_rank[r][key], rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{ctx} rank {r} {key}: {m}")
            assignments, pairs = got["hand"]
            assert got["rows_sent"] == (pairs if dispatch == "once_per_rank" else assignments), ctx
        for name, full in summed.items():
            if ".experts." in name or name.startswith("experts."):
                for r in range(ep_size):  # sum over the expert-data-parallel group
                    local = topo.local_experts(r)
                    total = sum(ranks[q][i, dispatch]["grads"][name] for q in topo.edp_group_of(r))
                    torch.testing.assert_close(total, full[local.start:local.stop], rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"{ctx} {name}: {m}")
            else:  # dense: router, shared expert and its gate, summed over every rank
                total = sum(ranks[q][i, dispatch]["grads"][name] for q in range(world))
                torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-5, msg=lambda m: f"{ctx} {name}: {m}")


def bias_worker(rank, world, ep_size):
    """One optimizer step's worth of micro-batches (gradient accumulation 2), then the
    bias update; twice, with and without activation checkpointing."""
    groups = build_groups(Topology(world, ep_size, 4), rank)
    out = {}
    for ckpt in (False, True):
        model = bias_model(groups.ep, ckpt)
        for step in (1, 2):
            for micro in range(2):
                ids = global_ids(step)[micro * world + rank]
                model(ids, ids).lm_loss.backward()
            update_selection_biases(model, groups.dp, applied=True, step=step)
            out[ckpt, step] = [b.mlp.router.expert_bias.clone() for b in model.blocks if b.is_moe]
    return out


def bias_model(ep_group, checkpointing):
    cfg = ModelConfig(vocab_size=50, d_model=16, num_layers=3, num_heads=2, d_ff=24, max_seq_len=8,
                      moe_every=1, first_dense_layers=1)
    moe = MoEConfig(num_experts=4, top_k=2, d_ff=8, bias_update_rate=1e-3, capacity_factor=1.0,
                    score_func="sigmoid", min_capacity=0)
    torch.manual_seed(0)
    return MoETransformer(cfg, moe, ep_group=ep_group, activation_checkpointing=checkpointing)


def global_ids(step):
    """The global batch of a step: 8 micro-batch chunks of [2, 8] token ids."""
    gen = torch.Generator().manual_seed(step)
    return list(torch.randint(0, 50, (8, 2, 8), generator=gen))


def reference_biases():
    """One process, ep 1, the whole global batch chunk by chunk; the update written out."""
    model = bias_model(None, False)
    biases = [torch.zeros(4) for _ in range(2)]
    history = {}
    for step in (1, 2):
        for layer, b in zip([blk.mlp for blk in model.blocks if blk.is_moe], biases):
            layer.router.expert_bias.copy_(b)
        counts = [torch.zeros(4, dtype=torch.int64) for _ in range(2)]
        with torch.no_grad():
            for ids in global_ids(step):
                for c, s in zip(counts, model(ids).moe_stats):
                    c += s.routed_per_expert_E
        for b, c in zip(biases, counts):
            sign = torch.tensor([1.0 if c.sum() > 4 * ci else -1.0 if c.sum() < 4 * ci else 0.0 for ci in c])
            delta = 1e-3 * sign
            b += delta - delta.mean()
        history[step] = [b.clone() for b in biases]
    return history


def world4_worker(rank, world):
    return {"ep4": parity_worker(rank, world, 4), "bias": bias_worker(rank, world, 2)}


def test_world_4_ep_4_parity_and_bias_after_one_step():
    ranks = run_ranks(world4_worker, 4, timeout_s=240)
    check(4, 4, [r["ep4"] for r in ranks], single_process(4))
    ref = reference_biases()
    for ckpt in (False, True):
        for step in (1, 2):
            mine = ranks[0]["bias"][ckpt, step]
            for r in range(1, 4):  # bitwise equal on every rank
                assert all(torch.equal(a, b) for a, b in zip(ranks[r]["bias"][ckpt, step], mine)), (ckpt, step, r)
            for got, want in zip(mine, ref[step]):  # and equal to the single process
                assert torch.equal(got, want), (ckpt, step, got, want)
                assert got.abs().sum() > 0
    for step in (1, 2):  # recomputation changes nothing, bit for bit
        for a, b in zip(ranks[0]["bias"][False, step], ranks[0]["bias"][True, step]):
            assert torch.equal(a, b)


def world2_worker(rank, world):
    out = {"ep2": parity_worker(rank, world, 2),
           "empty": parity_worker(rank, world, 2, empty_rank=1, cases=[1])}
    # Capacity routing exchanges fixed slots: unequal token counts are one clear error on
    # every rank (checked once per count), never a gloo abort or a hang.
    groups = build_groups(Topology(world, 2, NUM_EXPERTS), rank)
    layer = build_layer(dict(top_k=1, capacity_factor=1.25), "per_assignment", groups.ep)
    try:
        layer(torch.randn(1 + rank, SEQ, D_MODEL))
        out["unequal"] = None
    except ValueError as e:
        out["unequal"] = str(e)
    # Hand example: every token's two choices are experts 0 and 1, both on rank 0.
    groups = build_groups(Topology(world, 2, NUM_EXPERTS), rank)
    x = torch.rand(5, D_MODEL) + 0.1
    for dispatch in DISPATCHES:
        layer = build_layer(dict(top_k=2, capacity_factor=None), dispatch, groups.ep)
        with torch.no_grad():
            layer.router.w_DE.zero_()
            layer.router.w_DE[:, 0], layer.router.w_DE[:, 1] = 3.0, 2.0
        res = run_layer(layer, x, torch.ones(5, D_MODEL))
        out["hand", dispatch] = (res["rows_sent"], res["rows_sent_remote"])
    return out


def test_world_2_ep_2_parity_rows_sent_and_an_empty_rank():
    ranks = run_ranks(world2_worker, 2, timeout_s=180)
    check(2, 2, [r["ep2"] for r in ranks], single_process(2))
    check(2, 2, [r["empty"] for r in ranks], single_process(2, empty_rank=1, cases=[1]))
    for r in range(2):
        assert "they route [6, 12]" in ranks[r]["unequal"], ranks[r]["unequal"]
    for r in range(2):  # per assignment: 10 rows (5 tokens x 2); once per rank: 5
        assert ranks[r]["hand", "per_assignment"] == (10, 10 if r == 1 else 0)
        assert ranks[r]["hand", "once_per_rank"] == (5, 5 if r == 1 else 0)
    assert ranks[1]["empty"][1, "once_per_rank"]["y"].shape == (0, SEQ, D_MODEL)
    sent = {d: sum(r["ep2"][i, d]["rows_sent"] for r in ranks for i in range(len(CASES))) for d in DISPATCHES}
    assert sent["once_per_rank"] < sent["per_assignment"], sent
