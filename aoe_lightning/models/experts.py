"""SwiGLU experts stored as stacked weights, and the sort-based token dispatch shared by MoE and AoE.

Shape legend: T tokens, D d_model, N experts, H expert hidden width (d_ffn or d_wide), L d_low,
A (token, expert) assignments.

Each expert computes ``(SiLU(x W_g) * (x W_p)) W_o``. With a factorized gate, ``W_g = W_down W_up``
(Autonomy-of-Experts Models, Lv et al., 2025, Eq. 3-4), and the caller may pass the rows ``x W_down`` it
already computed, which is how AoE never computes that product twice.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupedExperts(nn.Module):
    """N SwiGLU experts whose weights are stacked along a leading expert axis."""

    def __init__(self, d_model: int, hidden: int, num_experts: int, d_low: int | None = None) -> None:
        super().__init__()
        self.d_model = d_model
        self.hidden = hidden
        self.num_experts = num_experts
        self.d_low = d_low
        if d_low is None:
            self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        else:
            self.w_down = nn.Parameter(torch.empty(num_experts, d_model, d_low))
            self.w_up = nn.Parameter(torch.empty(num_experts, d_low, hidden))
        self.w_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    @property
    def factorized(self) -> bool:
        return self.d_low is not None

    def reset_parameters(self, std: float, out_std: float) -> None:
        for name, param in self.named_parameters(recurse=False):
            nn.init.normal_(param, mean=0.0, std=out_std if name == "w_out" else std)

    def w_down_all(self) -> Tensor:
        """Return every expert's ``W_down`` side by side, (D, N*L), so that one matmul computes all of them."""
        return self.w_down.permute(1, 0, 2).reshape(self.d_model, self.num_experts * self.d_low)

    def low_rank_all(self, x_TD: Tensor) -> Tensor:
        """Compute every expert's ``x W_down`` with one matmul: (T, D) @ (D, N*L) -> (T, N, L)."""
        return (x_TD @ self.w_down_all()).view(x_TD.shape[0], self.num_experts, self.d_low)

    def low_rank_scores(self, x_TD: Tensor, order: float) -> tuple[Tensor, Tensor]:
        """Compute every expert's ``x W_down`` (T, N, L) and the ``order``-norm of each expert's row (T, N) in fp32.

        The L2 norm, AoE's default score, runs through ``_LowRankL2Norms``. Its backward adds the norm's gradient
        into the gradient of the rows in one (T, N, L) buffer, where autograd over ``vector_norm`` would allocate
        three buffers of that size. Returns ``(norms_TN, low_rank_TNL)``.
        """
        if order != 2:
            low_rank_TNL = self.low_rank_all(x_TD)
            return torch.linalg.vector_norm(low_rank_TNL.float(), ord=order, dim=-1), low_rank_TNL
        dtype = _compute_dtype(x_TD)
        with torch.autocast(x_TD.device.type, enabled=False):
            low_rank_TX, norms_TN = _LowRankL2Norms.apply(x_TD.to(dtype), self.w_down_all().to(dtype), self.num_experts)
        return norms_TN, low_rank_TX.view(x_TD.shape[0], self.num_experts, self.d_low)

    def forward(
        self,
        x_TD: Tensor,
        token_ids_A: Tensor,
        expert_ids_A: Tensor,
        gates_A: Tensor,
        low_rank_TNL: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run each assignment through its expert, weight it by its gate and sum per token.

        Assignments are stable-sorted by expert so that each expert reads one contiguous slice and does one
        matmul per weight (``_GroupedSwiGLU``). Every expert runs every step, on an empty slice if it got no tokens,
        so its weights always receive a (zero) gradient: data-parallel ranks then issue identical collectives even
        when their tokens pick different experts. Gate weights multiply in fp32 and the sum accumulates in
        fp32, because bf16 accumulation over K experts loses the small gates.

        Returns the output (T, D) in the dtype of ``x_TD`` and the per-expert assignment counts (N,).
        """
        order_A = torch.argsort(expert_ids_A, stable=True)
        token_ids_A = token_ids_A[order_A]
        expert_ids_A = expert_ids_A[order_A]
        counts_N = torch.bincount(expert_ids_A, minlength=self.num_experts)

        # Gathers use index_select, whose backward is index_add_; the backward of advanced indexing
        # (index_put_ with accumulate) is over 10x slower on CPU.
        gates_A = gates_A.index_select(0, order_A)
        x_AD = x_TD.index_select(0, token_ids_A)
        low_rank_AL = None
        if low_rank_TNL is not None:
            num_tokens, num_experts, d_low = low_rank_TNL.shape
            rows_A = token_ids_A * num_experts + expert_ids_A
            low_rank_AL = low_rank_TNL.reshape(num_tokens * num_experts, d_low).index_select(0, rows_A)
        y_AD = self.swiglu(x_AD, counts_N.tolist(), low_rank_AL)

        weighted_AD = y_AD.float() * gates_A.float()[:, None]
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        out_TD.index_add_(0, token_ids_A, weighted_AD)
        return out_TD.to(x_TD.dtype), counts_N

    def swiglu(self, x_AD: Tensor, counts: list[int], low_rank_AL: Tensor | None = None) -> Tensor:
        """Compute each expert's SwiGLU on its contiguous slice of ``x_AD`` (``counts[e]`` rows for expert e).

        ``low_rank_AL`` contains the cached rows ``x W_down`` of a factorized gate. Without it they are computed
        here. Under autocast the matmuls run in the autocast dtype, as ``torch.matmul`` would.
        """
        dtype = _compute_dtype(x_AD)

        def matmul(input_AK: Tensor, weight_NKM: Tensor) -> Tensor:
            return grouped_mm(input_AK.to(dtype), weight_NKM.to(dtype), counts)

        if self.factorized:
            if low_rank_AL is None:
                low_rank_AL = matmul(x_AD, self.w_down)
            gate_input_AK, w_gate = low_rank_AL.to(dtype), self.w_up
        else:
            gate_input_AK, w_gate = None, self.w_gate
        with torch.autocast(x_AD.device.type, enabled=False):
            return _GroupedSwiGLU.apply(
                _row_major(x_AD.to(dtype)),
                None if gate_input_AK is None else _row_major(gate_input_AK),
                w_gate.to(dtype),
                self.w_proj.to(dtype),
                self.w_out.to(dtype),
                counts,
            )


class _LowRankL2Norms(torch.autograd.Function):
    """Autograd function for every expert's ``x W_down`` (one (T, N*L) matmul) and the L2 norm of each expert's rows.

    The norms are fp32, or fp64 for fp64 inputs.
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, w_down_DX: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
        low_rank_TX = x_TD @ w_down_DX
        low_rank_TNL = low_rank_TX.view(x_TD.shape[0], num_experts, -1)
        norms_TN = torch.linalg.vector_norm(low_rank_TNL, dim=-1, dtype=torch.promote_types(x_TD.dtype, torch.float32))
        ctx.save_for_backward(x_TD, w_down_DX, low_rank_TX, norms_TN)
        return low_rank_TX, norms_TN

    @staticmethod
    def backward(ctx, grad_low_rank_TX: Tensor | None, grad_norms_TN: Tensor | None):
        x_TD, w_down_DX, low_rank_TX, norms_TN = ctx.saved_tensors
        num_tokens, num_experts = norms_TN.shape
        if grad_norms_TN is None:
            grad_TX = torch.zeros_like(low_rank_TX)
        else:
            # d||c|| / dc = c / ||c||, taken as 0 at c = 0 like torch.linalg.vector_norm.
            scale_TN = torch.where(norms_TN > 0, grad_norms_TN / norms_TN, 0.0)
            grad_TNL = low_rank_TX.view(num_tokens, num_experts, -1) * scale_TN[..., None]
            grad_TX = grad_TNL.to(low_rank_TX.dtype).view(num_tokens, -1)
        if grad_low_rank_TX is not None:
            grad_TX.add_(grad_low_rank_TX)
        grad_x_TD = grad_TX @ w_down_DX.t() if ctx.needs_input_grad[0] else None
        grad_w_down_DX = x_TD.t() @ grad_TX if ctx.needs_input_grad[1] else None
        return grad_x_TD, grad_w_down_DX, None


class _GroupedSwiGLU(torch.autograd.Function):
    """Autograd function for each expert's SwiGLU ``(SiLU(g W_g) * (x W_p)) W_o`` on its contiguous row slice.

    ``g`` is the gate input: the rows ``x`` themselves, or the low-rank rows ``x W_down`` of a factorized gate
    (then ``W_g`` is ``W_up``). Only the gate and projection activations are saved. The backward recomputes
    ``SiLU(g W_g) * (x W_p)`` one expert at a time, so each elementwise product and its gradient fill an
    expert-sized buffer rather than a buffer over all rows (small experts' buffers stay in cache).
    """

    @staticmethod
    def forward(
        ctx,
        x_AD: Tensor,
        gate_input_AK: Tensor | None,
        w_gate_NKH: Tensor,
        w_proj_NDH: Tensor,
        w_out_NHD: Tensor,
        counts: list[int],
    ) -> Tensor:
        gate_in_AK = x_AD if gate_input_AK is None else gate_input_AK
        num_rows, hidden = x_AD.shape[0], w_proj_NDH.shape[2]
        gate_AH = _empty_aligned_rows(x_AD, num_rows, hidden)
        proj_AH = _empty_aligned_rows(x_AD, num_rows, hidden)
        out_AD = x_AD.new_empty(x_AD.shape)
        for expert, (start, end) in enumerate(_bounds(counts)):
            gate = torch.mm(gate_in_AK[start:end], w_gate_NKH[expert], out=gate_AH[start:end])
            proj = torch.mm(x_AD[start:end], w_proj_NDH[expert], out=proj_AH[start:end])
            torch.mm(F.silu(gate).mul_(proj), w_out_NHD[expert], out=out_AD[start:end])
        ctx.save_for_backward(x_AD, gate_input_AK, w_gate_NKH, w_proj_NDH, w_out_NHD, gate_AH, proj_AH)
        ctx.counts = counts
        return out_AD

    @staticmethod
    def backward(ctx, grad_out_AD: Tensor):
        x_AD, gate_input_AK, w_gate_NKH, w_proj_NDH, w_out_NHD, gate_AH, proj_AH = ctx.saved_tensors
        gate_in_AK = x_AD if gate_input_AK is None else gate_input_AK
        grad_out_AD = _row_major(grad_out_AD)
        needs = ctx.needs_input_grad
        grad_x_AD = torch.empty_like(x_AD) if needs[0] else None
        grad_gate_input_AK = torch.empty_like(gate_input_AK) if needs[1] else None
        grad_w_gate, grad_w_proj, grad_w_out = (
            torch.empty_like(weight) if need else None
            for weight, need in zip((w_gate_NKH, w_proj_NDH, w_out_NHD), needs[2:5])
        )
        for expert, (start, end) in enumerate(_bounds(ctx.counts)):
            gate, proj, grad_out = gate_AH[start:end], proj_AH[start:end], grad_out_AD[start:end]
            silu = F.silu(gate)
            # An expert without rows gets exact zero weight gradients: matmuls over an empty inner dimension.
            if grad_w_out is not None:
                torch.mm((silu * proj).t(), grad_out, out=grad_w_out[expert])
            grad_hidden = torch.mm(grad_out, w_out_NHD[expert].t())
            grad_proj = silu.mul_(grad_hidden)
            grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(proj), gate)
            if grad_w_proj is not None:
                torch.mm(x_AD[start:end].t(), grad_proj, out=grad_w_proj[expert])
            if grad_w_gate is not None:
                torch.mm(gate_in_AK[start:end].t(), grad_gate, out=grad_w_gate[expert])
            if grad_x_AD is not None:
                grad_x = torch.mm(grad_proj, w_proj_NDH[expert].t(), out=grad_x_AD[start:end])
                if gate_input_AK is None:
                    # FlopCounterMode counts addmm with out= but not addmm_, so the in-place form is avoided.
                    torch.addmm(grad_x, grad_gate, w_gate_NKH[expert].t(), out=grad_x)
            if grad_gate_input_AK is not None:
                torch.mm(grad_gate, w_gate_NKH[expert].t(), out=grad_gate_input_AK[start:end])
        return grad_x_AD, grad_gate_input_AK, grad_w_gate, grad_w_proj, grad_w_out, None


class _GroupedMatmul(torch.autograd.Function):
    """Per-group matmul ``out[rows of e] = input[rows of e] @ weight[e]`` with a hand-written backward.

    Autograd over a Python loop of ``input[s:e] @ weight[e]`` would record one node per expert and assemble
    the weight gradient by stacking N per-expert gradients, a full extra copy of it. Here every product,
    forward and backward, writes straight into its slice of one preallocated output.
    """

    @staticmethod
    def forward(ctx, input_AK: Tensor, weight_NKM: Tensor, counts: list[int]) -> Tensor:
        ctx.save_for_backward(input_AK, weight_NKM)
        ctx.counts = counts
        out_AM = _empty_aligned_rows(input_AK, input_AK.shape[0], weight_NKM.shape[2])
        for expert, (start, end) in enumerate(_bounds(counts)):
            torch.mm(input_AK[start:end], weight_NKM[expert], out=out_AM[start:end])
        return out_AM

    @staticmethod
    def backward(ctx, grad_AM: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        input_AK, weight_NKM = ctx.saved_tensors
        grad_AM = _row_major(grad_AM)
        grad_input_AK = grad_weight_NKM = None
        if ctx.needs_input_grad[0]:
            grad_input_AK = _empty_aligned_rows(input_AK, *input_AK.shape)
        if ctx.needs_input_grad[1]:
            grad_weight_NKM = torch.empty_like(weight_NKM)
        for expert, (start, end) in enumerate(_bounds(ctx.counts)):
            if grad_input_AK is not None:
                torch.mm(grad_AM[start:end], weight_NKM[expert].t(), out=grad_input_AK[start:end])
            if grad_weight_NKM is not None:
                # An expert without rows gets an exact zero gradient: a matmul over an empty inner dimension.
                torch.mm(input_AK[start:end].t(), grad_AM[start:end], out=grad_weight_NKM[expert])
        return grad_input_AK, grad_weight_NKM, None


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """Return the autocast dtype of ``tensor``'s device if autocast is on there, else ``tensor``'s dtype."""
    device_type = tensor.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else tensor.dtype


def _empty_aligned_rows(like: Tensor, rows: int, cols: int) -> Tensor:
    """Allocate an uninitialised (rows, cols) tensor whose rows start on 64-byte boundaries.

    On a 2-vCPU EPYC, an fp32 matmul that writes rows of the Eq. 5 AoE width 4393 measured about 10% slower
    than one that writes rows of 4416 values. Writing into a view of a slightly wider buffer recovers that
    speed. The padding costs under 1.5% more memory at the Eq. 5 widths.
    """
    align = max(1, 64 // like.element_size())
    padded = -(-cols // align) * align
    return like.new_empty(rows, padded)[:, :cols]


def _row_major(matrix: Tensor) -> Tensor:
    """Return ``matrix`` if its rows are unit-stride and do not overlap (padded rows allowed), else a copy."""
    if matrix.stride(-1) == 1 and matrix.stride(0) >= matrix.shape[1]:
        return matrix
    return matrix.contiguous()


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(counts))
    return list(zip([0] + ends[:-1], ends))


def grouped_mm(input_AK: Tensor, weight_NKM: Tensor, counts: list[int]) -> Tensor:
    """Multiply consecutive row groups of ``input_AK`` by their expert's weight: (A, K) x (N, K, M) -> (A, M).

    ``counts[e]`` rows belong to expert e, and ``sum(counts)`` must equal A. Both inputs share one dtype.
    """
    if len(counts) != weight_NKM.shape[0] or sum(counts) != input_AK.shape[0]:
        raise ValueError(
            f"grouped_mm: {len(counts)} group counts summing to {sum(counts)} do not match {weight_NKM.shape[0]} "
            f"weights and {input_AK.shape[0]} input rows"
        )
    with torch.autocast(input_AK.device.type, enabled=False):
        return _GroupedMatmul.apply(_row_major(input_AK), weight_NKM, counts)
