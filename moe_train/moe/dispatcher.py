"""Dispatcher: moves kept assignments to the rank owning their expert and back.

Shape legend:
  T  tokens in the routing group     D  model width
  N  kept assignments on this rank, grouped by global expert
  M  rows for this rank's local experts (from all EP peers), grouped by local expert
  R  expert-parallel group size      L  local experts, E / R
  U  (token, destination rank) pairs this rank sends (once-per-rank mode)
  V  such rows this rank receives from all peers (once-per-rank mode)

Local work (permute, un-permute, weighted combine) is separate from communication:
with R = 1 no collective is issued at all. Rank r owns global experts [r * L, (r + 1) * L),
so rows grouped by global expert are also grouped by destination rank.

Host reads (each a device->host synchronisation on a GPU, which stalls the queuing of
kernels; counted in tests/test_host_reads.py): the layouts are chosen so that the host
learns no size from the data where it need not.
  capacity (a capacity factor; Switch, GShard): C slots per expert, known from T and the
    config. At ep 1 with a kernel taking device offsets (``_grouped_mm``) the kept rows
    are packed first in an [A, D] buffer; otherwise (``bmm``, and at any ep > 1) the
    layout is [E, C, D] slots, empty ones zero, and the exchange is one all_to_all_single
    of [R, L, C, D] with equal splits L * C each way: no count exchange, no read. Every
    rank of the EP group must route the same T (checked once per new T).
  dropless: at ep 1 no read with ``_grouped_mm`` (one ``tolist`` with ``bmm``, which pads
    to the busiest expert). At ep > 1
      counts:  all_to_all of [R, L] ints, so each rank knows its receive splits; the host
               reads both count matrices ONCE, for the splits, the regrouping and the
               experts' kernel sizes;
      tokens:  all_to_all_single with variable splits (no padding to the busiest expert);
      results: the same exchange with the splits swapped.
  once per rank (below) reads the counts, the distinct pairs and the expansion: it trades
    host reads for fewer bytes on the wire.

Once-per-rank mode (``moe.dispatch: once_per_rank``, for k > 1): a token whose kept
assignments go to several experts of one rank crosses the all-to-all ONCE to that rank,
with a routing table row [L flags | L gates]; the receiver expands it into one row per
local expert (an index_select, whose backward sums the rows' gradients there), runs the
experts, and sums the gated outputs per received row before sending ONE row back. So
both all-to-alls carry U rows instead of N; the gates travel with the token (fp32; in
the same all-to-all as the token when the activations are fp32, else in a second one)
and their gradients come back through it. Same math as per-assignment dispatch, another
summation order (equal to fp32 rounding, tested at ep 1, 2 and 4).

Combine precision and order. The gates stay fp32 and every sum of gated expert outputs
accumulates in an fp32 buffer, whatever the activations' dtype (bf16 under autocast or in
a bf16 model): the layer casts its output once, at the end. The gate (router) gradient is
the dot product of the fp32 output gradient with the expert output upcast to fp32, so the
fp32 router never learns from a gradient rounded through bf16. The sums are
deterministic: no scatter-add (``index_add_`` is atomic on CUDA, its order and so its
bits vary from run to run, in fp32 as in bf16). Instead a slot table [S, X] names, for
each destination x (a token; in once-per-rank mode also a received row) and each slot s,
the row to add there (or a hole: a dropped assignment, a missing rank); the combine adds
slot 0, then slot 1, ... with S gathers of X rows, a fixed order on any device. Per
assignment, slot = choice: S = k, and a token's outputs are summed in choice order, as
``moe/reference.py`` does. The work is S * X rows, N when nothing is dropped (a sorted
segment sum would need a host sync for its longest segment, or fp32 prefix sums that
cancel). Once-per-rank mode sends each rank's partial sum back in the activations' dtype
(its reason to exist is the smaller return exchange): one rounding per (token, rank)
partial sum, the sum over ranks in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from moe_train.moe.router import Routing
from moe_train.parallel.comm import all_to_all, exchange_counts


@dataclass
class Dispatched:
    """Rows ready for the local experts, and what is needed to bring results back.

    Attributes:
        x_MD: rows for the local experts, grouped by local expert.
        tokens_per_expert_L: int64 [L] row counts per local expert (sums to M).
        token_ids_N, gates_N: source token and combine weight of each kept assignment.
        send_splits, recv_splits: per-rank row counts of the token exchange (EP only).
        regroup_M: permutation from rank-major received rows to expert-major (EP only).
        rows_sent: rows this rank puts into the token all-to-all (its own chunk included;
            the results come back in as many rows); rows_sent_remote: those for other ranks.
        once_per_rank: the rows are (token, rank) pairs; then ``token_ids_U`` is the
            source token of each sent row, ``row_of_M`` the received row each expert row
            expands, ``gates_M`` its gate, ``num_received`` V.
        rows_per_expert: set in the capacity layouts where every local expert gets the
            same host-known number of rows (x_MD is [L * rows_per_expert, D]).
        host_counts_L: ``tokens_per_expert_L`` as host ints, where the host already has
            them (dropless at ep > 1).
        has_holes: the combine's slot table may name a missing row (a dropped assignment).
    """

    x_MD: Tensor
    tokens_per_expert_L: Tensor
    token_ids_N: Tensor
    gates_N: Tensor
    send_splits: Optional[list[int]] = None
    recv_splits: Optional[list[int]] = None
    regroup_M: Optional[Tensor] = None
    rows_sent: int = 0
    rows_sent_remote: int = 0
    once_per_rank: bool = False
    token_ids_U: Optional[Tensor] = None
    row_of_M: Optional[Tensor] = None
    gates_M: Optional[Tensor] = None
    num_received: int = 0
    slots_ST: Optional[Tensor] = None
    slots_SV: Optional[Tensor] = None
    rows_per_expert: Optional[int] = None
    host_counts_L: Optional[list[int]] = None
    has_holes: bool = False


def _row_chunk(device: torch.device, width: int, num_rows: int) -> int:
    """Rows per chunk of the combine's loops: on CPU 2**20 elements, so that the fp32
    temporaries stay in cache (measured on 2 CPU cores, bf16, T = 16384, D = 512, k = 8:
    backward 400 -> 150 ms); elsewhere all rows at once (each pass is bandwidth-bound
    anyway, chunks would only add kernel launches; not measured, no GPU here)."""
    if device.type != "cpu":
        return max(num_rows, 1)
    return max(1, (1 << 20) // max(width, 1))


class _GatedSlotSum(torch.autograd.Function):
    """out_XD[x] = sum over slots s of gate_N[n] * y_ND[n], n = slots_SX[s, x] (holes add
    nothing), accumulated in fp32 slot by slot: deterministic, and fp32 whatever the dtype
    of y (module docstring). ``gates_N`` None: plain sum (all gates 1).

    Backward: each row n has one destination dest_N[n], so its gradients need no sum:
    grad_y_N = gate_N * grad_XD[dest_N] (fp32, rounded once to y's dtype) and
    grad_gate_N = <grad_XD[dest_N], y_ND[n]> in fp32. One gather of grad_XD serves both
    (two fewer N x D passes than autograd through mul + gather). Both directions run in
    row chunks (``_row_chunk``); a chunk changes no number, only what stays in cache."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, gates_N: Optional[Tensor], dest_N: Tensor, slots_SX: Tensor,
                has_holes: bool = False) -> Tensor:
        ctx.save_for_backward(y_ND, gates_N, dest_N)
        num_rows, (num_slots, num_dest), width = y_ND.shape[0], slots_SX.shape, y_ND.shape[1]
        out_XD = y_ND.new_zeros((num_dest, width), dtype=torch.float32)
        if num_rows == 0:
            return out_XD
        has_holes = has_holes or num_rows < num_slots * num_dest
        gates_N = None if gates_N is None else gates_N.float()
        chunk = _row_chunk(y_ND.device, width, num_dest)
        for start in range(0, num_dest, chunk):
            out_cD = out_XD[start:start + chunk]
            for s in range(num_slots):
                rows_c = slots_SX[s, start:start + chunk].clamp(max=num_rows - 1)
                y_cD = y_ND.index_select(0, rows_c)
                if has_holes:  # a hole's stand-in row adds exact zeros (never 0 * inf)
                    y_cD.masked_fill_((slots_SX[s, start:start + chunk] == num_rows).unsqueeze(1), 0)
                if gates_N is None:
                    out_cD.add_(y_cD)
                else:  # the product and the sum in fp32, y upcast on the fly
                    out_cD.addcmul_(y_cD, gates_N.index_select(0, rows_c).unsqueeze(1))
        return out_XD

    @staticmethod
    def backward(ctx, grad_XD: Tensor):
        y_ND, gates_N, dest_N = ctx.saved_tensors
        need_y, need_gates = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_XD = grad_XD.float()
        grad_y_ND = torch.empty_like(y_ND) if need_y else None
        grad_gates_N = torch.empty_like(gates_N) if need_gates else None
        chunk = _row_chunk(y_ND.device, y_ND.shape[1], y_ND.shape[0])
        for start in range(0, y_ND.shape[0], chunk):
            rows = slice(start, start + chunk)
            grad_cD = grad_XD.index_select(0, dest_N[rows])
            if need_gates:
                grad_gates_N[rows] = torch.linalg.vecdot(grad_cD, y_ND[rows].float())
            if need_y and gates_N is not None:  # fp32 product, rounded once on the write
                torch.mul(grad_cD, gates_N[rows].float().unsqueeze(1), out=grad_y_ND[rows])
            elif need_y:
                grad_y_ND[rows] = grad_cD
        return grad_y_ND, grad_gates_N, None, None, None


def _slot_table(cell_N: Tensor, num_slots: int, num_dest: int) -> Tensor:
    """int64 [S, X] with table[cell_N[n] // X, cell_N[n] % X] = n; other cells hold N (a
    hole). ``cell_N`` must be distinct (an index_copy with distinct indices: deterministic)."""
    num_rows = cell_N.numel()
    table = torch.full((num_slots * num_dest,), num_rows, dtype=torch.int64, device=cell_N.device)
    table.index_copy_(0, cell_N, torch.arange(num_rows, device=cell_N.device))
    return table.view(num_slots, num_dest)


class Dispatcher:
    """Token permutation and expert-parallel exchange over ``ep_group``.

    Args:
        num_experts: E, global.
        ep_size, ep_group: the expert-parallel group (None and 1 for local only).
        once_per_rank: send each token once per destination rank (module docstring);
            only matters with ep_size > 1.
        ep_rank: this rank's index in ``ep_group`` (for the rows-sent accounting).
        top_k: k, bounds the once-per-rank slot tables (None: the bounds L and R).
    """

    def __init__(self, num_experts: int, ep_size: int = 1, ep_group=None, once_per_rank: bool = False,
                 ep_rank: int = 0, top_k: Optional[int] = None):
        assert num_experts % ep_size == 0, "checked by MoELayer"
        self.num_experts, self.ep_size, self.ep_group = num_experts, ep_size, ep_group
        self.top_k = top_k
        self.num_local = num_experts // ep_size
        self.once_per_rank, self.ep_rank = once_per_rank and ep_size > 1, ep_rank
        self.label = "MoE layer"  # the model names it ("MoE layer 3") for hang reports
        self._tokens_checked: set[int] = set()  # T values the EP group agreed on (capacity mode)

    def dispatch(self, x_TD: Tensor, routing: Routing, packed: bool = False) -> Dispatched:
        """Lays out the kept assignments for the experts (and exchanges them at ep > 1).

        Args:
            packed: with a capacity at ep 1, pack the kept rows at the front of an [A, D]
                buffer for a kernel that takes device offsets (``_grouped_mm``) instead of
                the [E, C, D] slots (``bmm``); the layer says which its experts run.
        """
        if routing.capacity is not None and not self.once_per_rank:
            if packed and self.ep_size == 1:
                return self._dispatch_packed(x_TD, routing)
            return self._dispatch_capacity(x_TD, routing)
        kept_N = routing.kept_order_N  # dropless: all of order_A, no read
        token_ids_N = routing.token_ids_A.index_select(0, kept_N)
        gates_N = routing.gates_A.index_select(0, kept_N)
        if self.once_per_rank:
            return self._dispatch_once_per_rank(x_TD, routing, token_ids_N, gates_N)
        # Slot = choice: assignment a = j * T + t (choice-major) is slot j of token t.
        num_tokens = x_TD.shape[0]
        num_choices = routing.expert_ids_A.numel() // num_tokens if num_tokens else 1
        slots_KT = _slot_table(kept_N, num_choices, num_tokens)
        x_ND = x_TD.index_select(0, token_ids_N)
        if self.ep_size == 1:
            num_kept = token_ids_N.numel()
            return Dispatched(x_ND, routing.kept_per_expert_E, token_ids_N, gates_N,
                              rows_sent=num_kept, slots_ST=slots_KT)

        send_RL = routing.kept_per_expert_E.view(self.ep_size, self.num_local)
        recv_RL = exchange_counts(send_RL, self.ep_group, f"{self.label} (token counts)")
        # The one host read of a dropless layer at ep > 1: both count matrices at once,
        # for the all-to-all splits, the regrouping and the experts' kernel sizes.
        send_counts, recv_counts = torch.stack([send_RL, recv_RL]).tolist()
        send_splits, recv_splits = [sum(row) for row in send_counts], [sum(row) for row in recv_counts]
        host_counts_L = [sum(col) for col in zip(*recv_counts)]
        x_MD = all_to_all(x_ND, send_splits, recv_splits, self.ep_group, f"{self.label} (tokens to experts)")
        regroup_M = self._rank_major_to_expert_major(recv_RL, sum(recv_splits))
        return Dispatched(x_MD.index_select(0, regroup_M), recv_RL.sum(dim=0), token_ids_N,
                          gates_N, send_splits, recv_splits, regroup_M, rows_sent=sum(send_splits),
                          rows_sent_remote=sum(send_splits) - send_splits[self.ep_rank],
                          slots_ST=slots_KT, host_counts_L=host_counts_L)

    def _dispatch_capacity(self, x_TD: Tensor, routing: Routing) -> Dispatched:
        """The capacity layout: C slots per global expert, S = E * C rows, slot (e, c) at
        row e * C + c holding expert e's kept assignment of rank c (zeros when empty).
        Every size follows from T and the config, so the host reads nothing; at ep > 1
        the exchange is the [R, L, C, D] buffer with equal splits L * C, no count
        exchange. This needs the same T on every rank of the EP group, which the data
        pipeline guarantees (every micro-batch is [B, S], padded at the end of an epoch);
        the first call with a given T checks it (``_check_same_tokens``).
        """
        R, L, T = self.ep_size, self.num_local, x_TD.shape[0]
        if R > 1 and T not in self._tokens_checked:
            self._check_same_tokens(T, x_TD.device)
        C, num_slots = routing.capacity, self.num_experts * routing.capacity
        kept_A = routing.kept_A
        num_assignments = kept_A.numel()
        arange_A = torch.arange(num_assignments, device=x_TD.device)
        # Distinct targets: a dropped assignment goes past the slots (num_slots + a).
        pos_A = torch.where(kept_A, routing.expert_ids_A * C + routing.slot_A, num_slots + arange_A)
        assign_S = torch.full((num_slots + num_assignments,), num_assignments, dtype=torch.int64,
                              device=x_TD.device).index_copy_(0, pos_A, arange_A)[:num_slots]
        filled_S = assign_S < num_assignments
        assign_S = assign_S.clamp(max=max(num_assignments - 1, 0))
        token_S = routing.token_ids_A.index_select(0, assign_S)
        gates_S = torch.where(filled_S, routing.gates_A.index_select(0, assign_S), 0.0)
        x_SD = x_TD.index_select(0, token_S).masked_fill(~filled_S.unsqueeze(1), 0)
        slots_KT = torch.where(kept_A, pos_A, num_slots).view(-1, T) if T else pos_A.view(0, 0)
        rows_local = num_slots // R
        if R > 1:  # [R, L, C, D] out, [R (sources), L, C, D] in: regroup expert-major
            splits = [rows_local] * R
            x_RLCD = all_to_all(x_SD, splits, splits, self.ep_group,
                                f"{self.label} (tokens to experts, capacity slots)").view(R, L, C, -1)
            x_SD = x_RLCD.transpose(0, 1).reshape(num_slots, -1)
        else:
            splits = None
        return Dispatched(x_SD, routing.kept_per_expert_E, token_S, gates_S, splits, splits,
                          rows_sent=num_slots, rows_sent_remote=num_slots - rows_local,
                          slots_ST=slots_KT, rows_per_expert=R * C, has_holes=True)

    def _check_same_tokens(self, num_tokens: int, device: torch.device) -> None:
        """Once per distinct T: every rank of the EP group must route T tokens, or the
        capacity exchange's fixed splits would not match (gloo aborts the process, NCCL
        may hang or mix rows). One gather and one host read per new T, none after."""
        got = torch.empty(self.ep_size, dtype=torch.int64, device=device)
        dist.all_gather_single(got, torch.tensor([num_tokens], dtype=torch.int64, device=device),
                               group=self.ep_group)
        counts = got.tolist()
        if len(set(counts)) > 1:
            raise ValueError(
                f"{self.label}: capacity routing at ep {self.ep_size} exchanges fixed [E, C, D] "
                f"slots and needs the same number of tokens on every rank of the expert-parallel "
                f"group; they route {counts}. Give every rank the same micro-batch shape, or set "
                f"moe.capacity_factor: null (dropless, variable splits)")
        self._tokens_checked.add(num_tokens)

    def _dispatch_packed(self, x_TD: Tensor, routing: Routing) -> Dispatched:
        """Capacity at ep 1 for a kernel with device offsets: the A assignments in expert
        order with the kept ones first (expert e's kept rows at [start_e, start_e + n_e)),
        the dropped ones after them as zero rows the kernel never computes. No host read,
        and no work on empty slots."""
        T, A = x_TD.shape[0], routing.slot_A.numel()
        order_A, kept_A = routing.order_A, routing.kept_A
        kept_sorted_A = kept_A.index_select(0, order_A)
        arange_A = torch.arange(A, device=x_TD.device)
        kept_before_A = torch.cumsum(kept_sorted_A, 0)
        num_kept = kept_before_A[-1:] if A else kept_before_A.new_zeros(1)
        # Kept: its rank among the kept; dropped: after every kept row, in sorted order.
        pos_sorted_A = torch.where(kept_sorted_A, kept_before_A - 1, num_kept + arange_A - kept_before_A)
        assign_of_row_A = torch.empty_like(order_A).index_copy_(0, pos_sorted_A, order_A)
        pos_A = torch.empty_like(order_A).index_copy_(0, order_A, pos_sorted_A)
        kept_row_A = arange_A < num_kept
        token_of_row_A = routing.token_ids_A.index_select(0, assign_of_row_A)
        gates_row_A = torch.where(kept_row_A, routing.gates_A.index_select(0, assign_of_row_A), 0.0)
        # Zero rows for the dropped: the kernel leaves their outputs AND input gradients
        # unwritten, and the fill's backward keeps those out of x's gradient.
        x_AD = x_TD.index_select(0, token_of_row_A).masked_fill(~kept_row_A.unsqueeze(1), 0)
        slots_KT = torch.where(kept_A, pos_A, A).view(-1, T) if T else pos_A.view(0, 0)
        return Dispatched(x_AD, routing.kept_per_expert_E, token_of_row_A, gates_row_A,
                          rows_sent=A, slots_ST=slots_KT, has_holes=True)

    def _dispatch_once_per_rank(self, x_TD: Tensor, routing: Routing, token_ids_N: Tensor,
                                gates_N: Tensor) -> Dispatched:
        """One row per (token, destination rank) with its routing table; see the module
        docstring. Rows are sent in (rank, token) order."""
        R, L, T, D = self.ep_size, self.num_local, x_TD.shape[0], x_TD.shape[1]
        expert_N = routing.expert_ids_A.index_select(0, routing.kept_order_N)
        pair_N = torch.div(expert_N, L, rounding_mode="floor") * T + token_ids_N
        pairs_U, row_of_N = torch.unique(pair_N, sorted=True, return_inverse=True)
        num_rows = pairs_U.numel()
        rank_U = torch.div(pairs_U, T, rounding_mode="floor") if T else pairs_U
        send_R = torch.bincount(rank_U, minlength=R)
        recv_R = exchange_counts(send_R.view(R, 1), self.ep_group, f"{self.label} (token counts)").view(R)
        send_splits, recv_splits = send_R.tolist(), recv_R.tolist()
        token_ids_U = pairs_U - rank_U * T
        # Routing table [U, 2L]: flags (1.0 = this row goes to local expert l), then gates.
        cell_N = row_of_N * L + expert_N % L
        flags_UL = x_TD.new_zeros(num_rows * L, dtype=torch.float32).index_fill_(0, cell_N, 1.0)
        gates_UL = gates_N.new_zeros(num_rows * L).scatter(0, cell_N, gates_N)
        table_UC = torch.cat([flags_UL.view(num_rows, L), gates_UL.view(num_rows, L)], dim=1)
        x_UD = x_TD.index_select(0, token_ids_U)
        label = f"{self.label} (tokens to experts, once per rank)"
        if x_UD.dtype == torch.float32:  # one all-to-all for the tokens and their table
            packed_VC = all_to_all(torch.cat([x_UD, table_UC], dim=1), send_splits, recv_splits,
                                   self.ep_group, label)
            x_VD, table_VC = packed_VC[:, :D], packed_VC[:, D:]
        else:  # keep the gates in fp32: a second, small exchange
            x_VD = all_to_all(x_UD, send_splits, recv_splits, self.ep_group, label)
            table_VC = all_to_all(table_UC, send_splits, recv_splits, self.ep_group,
                                  f"{self.label} (routing table)")
        flags_VL = table_VC[:, :L].detach() > 0.5
        # Expert-major expansion: (local expert, received row) pairs sorted by expert.
        local_M, row_of_M = flags_VL.t().nonzero(as_tuple=True)
        gates_M = table_VC[:, L:][row_of_M, local_M]
        # Combine slot tables (module docstring). Received row v: slot = rank of the local
        # expert among v's flagged ones (at most min(k, L)). Token t: slot = rank of the
        # destination rank among t's (at most min(k, R)).
        num_received, k = x_VD.shape[0], self.top_k
        slot_M = (flags_VL.cumsum(dim=1) - 1)[row_of_M, local_M]
        slots_SV = _slot_table(slot_M * num_received + row_of_M, min(k or L, L), num_received)
        cell_U = token_ids_U * R + rank_U
        present_TR = torch.zeros(T * R, dtype=torch.int64, device=x_TD.device).index_fill_(0, cell_U, 1)
        slot_U = (present_TR.view(T, R).cumsum(dim=1) - 1).view(-1).index_select(0, cell_U)
        slots_ST = _slot_table(slot_U * T + token_ids_U, min(k or R, R), T)
        return Dispatched(x_VD.index_select(0, row_of_M), flags_VL.sum(dim=0), token_ids_N, gates_N,
                          send_splits, recv_splits, rows_sent=num_rows,
                          rows_sent_remote=num_rows - send_splits[self.ep_rank], once_per_rank=True,
                          token_ids_U=token_ids_U, row_of_M=row_of_M, gates_M=gates_M,
                          num_received=num_received, slots_ST=slots_ST, slots_SV=slots_SV)

    def combine(self, y_MD: Tensor, d: Dispatched, num_tokens: int) -> Tensor:
        """Returns y_TD = sum over kept assignments of gate * expert output, fp32 whatever
        the dtype of ``y_MD`` (the caller casts once); a token whose every choice was
        dropped gets zeros (the residual carries it). Deterministic: module docstring."""
        assert d.slots_ST.shape[1] == num_tokens, (tuple(d.slots_ST.shape), num_tokens)
        if d.once_per_rank:  # gated partial sums per received row, one row back per pair
            z_VD = _GatedSlotSum.apply(y_MD, d.gates_M, d.row_of_M, d.slots_SV)
            z_UD = all_to_all(z_VD.to(y_MD.dtype), d.recv_splits, d.send_splits, self.ep_group,
                              f"{self.label} (expert outputs back, once per rank)")
            return _GatedSlotSum.apply(z_UD, None, d.token_ids_U, d.slots_ST)
        if self.ep_size > 1 and d.rows_per_expert is not None:  # capacity slots back, [R, L, C, D]
            R, L = self.ep_size, self.num_local
            y_RLCD = y_MD.view(L, R, d.rows_per_expert // R, -1).transpose(0, 1).reshape(y_MD.shape)
            y_ND = all_to_all(y_RLCD, d.recv_splits, d.send_splits, self.ep_group,
                              f"{self.label} (expert outputs back, capacity slots)")
        elif self.ep_size > 1:
            y_rank_major_MD = torch.empty_like(y_MD).index_copy(0, d.regroup_M, y_MD)
            y_ND = all_to_all(y_rank_major_MD, d.recv_splits, d.send_splits, self.ep_group,
                              f"{self.label} (expert outputs back)")
        else:
            y_ND = y_MD
        return _GatedSlotSum.apply(y_ND, d.gates_N, d.token_ids_N, d.slots_ST, d.has_holes)

    def _rank_major_to_expert_major(self, recv_RL: Tensor, num_rows: int) -> Tensor:
        """Received rows come as (source rank, local expert) chunks in rank-major order;
        the experts want them expert-major. Returns the row permutation."""
        num_ranks, num_local = recv_RL.shape
        chunk_key_RL = (torch.arange(num_local, device=recv_RL.device).unsqueeze(0) * num_ranks
                        + torch.arange(num_ranks, device=recv_RL.device).unsqueeze(1))
        key_M = torch.repeat_interleave(chunk_key_RL.reshape(-1), recv_RL.reshape(-1), output_size=num_rows)
        return torch.argsort(key_M, stable=True)
