"""SwiGLU experts stored as stacked weights, and the sort-based token dispatch shared by MoE and AoE.

Shape legend: T tokens, D d_model, N experts, H expert hidden width (d_ffn or d_wide), L d_low,
A (token, expert) assignments.

Each expert computes ``(SiLU(x W_g) * (x W_p)) W_o``. With a factorized gate, ``W_g = W_down W_up``
(Autonomy-of-Experts Models, Lv et al., 2025, Eq. 3-4), and the caller may pass the rows ``x W_down`` it
already computed, which is how AoE never computes that product twice.
"""

from __future__ import annotations

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

    def low_rank_all(self, x_TD: Tensor) -> Tensor:
        """Compute every expert's ``x W_down`` with one matmul: (T, D) @ (D, N*L) -> (T, N, L)."""
        w_down_DNL = self.w_down.permute(1, 0, 2).reshape(self.d_model, self.num_experts * self.d_low)
        return (x_TD @ w_down_DNL).view(x_TD.shape[0], self.num_experts, self.d_low)

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
        matmul per weight. Every expert runs every step, on an empty slice if it got no tokens, so its
        weights always receive a (zero) gradient: data-parallel ranks then issue identical collectives even
        when their tokens pick different experts. Gate weights multiply in fp32 and the sum accumulates in
        fp32, because bf16 accumulation over K experts loses the small gates.

        Returns the output (T, D) in the dtype of ``x_TD`` and the per-expert assignment counts (N,).
        """
        order_A = torch.argsort(expert_ids_A, stable=True)
        token_ids_A = token_ids_A[order_A]
        expert_ids_A = expert_ids_A[order_A]
        gates_A = gates_A[order_A]
        counts_N = torch.bincount(expert_ids_A, minlength=self.num_experts)

        x_AD = x_TD[token_ids_A]
        low_rank_AL = None
        if low_rank_TNL is not None:
            low_rank_AL = low_rank_TNL[token_ids_A, expert_ids_A]

        # Split each stacked weight once. Indexing ``w[expert]`` inside the loop would make the backward pass
        # build a full-size (N, ...) zero gradient per expert and weight: O(N^2) memory traffic per step.
        weights = {name: param.unbind(0) for name, param in self.named_parameters(recurse=False)}
        outputs = []
        start = 0
        for expert, count in enumerate(counts_N.tolist()):
            end = start + count
            gate_input = None if low_rank_AL is None else low_rank_AL[start:end]
            outputs.append(self.expert_forward(expert, x_AD[start:end], gate_input, weights))
            start = end
        y_AD = torch.cat(outputs, dim=0)

        weighted_AD = y_AD.float() * gates_A.float()[:, None]
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        out_TD.index_add_(0, token_ids_A, weighted_AD)
        return out_TD.to(x_TD.dtype), counts_N

    def expert_forward(
        self,
        expert: int,
        x_SD: Tensor,
        low_rank_SL: Tensor | None = None,
        weights: dict[str, tuple[Tensor, ...]] | None = None,
    ) -> Tensor:
        """Compute the SwiGLU of one expert on S tokens.

        ``low_rank_SL`` is a cached ``x W_down`` for factorized gates. ``weights`` maps each weight name to its
        per-expert slices (``param.unbind(0)``) for callers that loop over all experts.
        """

        def weight(name: str) -> Tensor:
            return getattr(self, name)[expert] if weights is None else weights[name][expert]

        if self.factorized:
            if low_rank_SL is None:
                low_rank_SL = x_SD @ weight("w_down")
            gate_SH = low_rank_SL @ weight("w_up")
        else:
            gate_SH = x_SD @ weight("w_gate")
        hidden_SH = F.silu(gate_SH) * (x_SD @ weight("w_proj"))
        return hidden_SH @ weight("w_out")
