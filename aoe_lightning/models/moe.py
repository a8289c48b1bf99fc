"""Router MoE and Autonomy-of-Experts feed-forward layers.

Both layers own a ``GroupedExperts`` and share its dispatch. They differ only in how they score experts:
the router MoE runs a learned router over the token, AoE takes the norm of each expert's own low-rank
activation ``x W_down``. Each layer returns its output, its unweighted auxiliary losses and its routing
statistics; nothing is kept in module state between calls.

Shape legend: B batch, S sequence, T = B*S tokens, D d_model, N experts, L d_low.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aoe_lightning.models import losses
from aoe_lightning.models.config import FFNConfig
from aoe_lightning.models.experts import GroupedExperts
from aoe_lightning.models.routing import Assignments, select_experts


@dataclass
class RoutingStats:
    """Detached routing statistics of one layer for one forward pass (padding excluded)."""

    expert_counts: Tensor
    """Assignments per expert (N,), int64."""
    load_entropy: Tensor
    """Entropy of the normalised expert load, nats (max ln N)."""
    confidence_entropy: Tensor
    """Mean over tokens of the entropy of the all-expert softmax, nats."""
    mean_score: Tensor
    """Mean score per expert (N,): router logit for MoE, activation norm for AoE."""
    experts_per_token: Tensor
    """Mean number of experts that processed a token."""


class MoEBase(nn.Module):
    """Shared forward pass: score, select, dispatch, compute auxiliary terms and statistics."""

    def __init__(self, d_model: int, config: FFNConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        d_low = config.d_low if config.is_factorized else None
        self.experts = GroupedExperts(d_model, config.expert_width(d_model), config.num_experts, d_low)

    def score(self, x_TD: Tensor) -> tuple[Tensor, Tensor | None]:
        """Return the per-expert scores (T, N) and, for AoE, the cached ``x W_down`` rows (T, N, L)."""
        raise NotImplementedError

    def forward(self, x_BSD: Tensor, token_mask_BS: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], RoutingStats]:
        batch, seq, d_model = x_BSD.shape
        x_TD = x_BSD.reshape(batch * seq, d_model)
        token_mask_T = None if token_mask_BS is None else token_mask_BS.reshape(-1)

        scores_TN, low_rank_TNL = self.score(x_TD)
        assignments = select_experts(scores_TN, self.config, token_mask_T)
        out_TD, _ = self.experts(
            x_TD, assignments.token_ids_A, assignments.expert_ids_A, assignments.gates_A, low_rank_TNL
        )
        aux = self.auxiliary_losses(scores_TN, assignments, token_mask_T)
        stats = self.routing_stats(scores_TN, assignments, token_mask_T)
        return out_TD.view(batch, seq, d_model), aux, stats

    def auxiliary_losses(
        self, scores_TN: Tensor, assignments: Assignments, token_mask_T: Tensor | None
    ) -> dict[str, Tensor]:
        aux = {}
        if self.config.selection != "expert_choice":
            # Expert choice balances load by construction and uses no auxiliary loss.
            aux["load_balance"] = losses.load_balancing_loss(
                assignments.probs_TN, assignments.expert_ids_A, assignments.token_ids_A, token_mask_T
            )
        if self.config.selection == "top_p":
            aux["entropy"] = losses.confidence_entropy(assignments.probs_TN, token_mask_T)
        return aux

    @torch.no_grad()
    def routing_stats(self, scores_TN: Tensor, assignments: Assignments, token_mask_T: Tensor | None) -> RoutingStats:
        num_tokens = scores_TN.shape[0]
        if token_mask_T is None:
            token_mask_T = torch.ones(num_tokens, dtype=torch.bool, device=scores_TN.device)
        real_A = token_mask_T[assignments.token_ids_A]
        counts_N = losses.expert_counts(assignments.expert_ids_A[real_A], self.num_experts)
        weight_T = token_mask_T.float()
        num_real = weight_T.sum().clamp(min=1)
        mean_score_N = (scores_TN.float() * weight_T[:, None]).sum(dim=0) / num_real
        return RoutingStats(
            expert_counts=counts_N,
            load_entropy=losses.load_entropy(counts_N),
            confidence_entropy=losses.confidence_entropy(assignments.probs_TN.detach(), token_mask_T),
            mean_score=mean_score_N,
            experts_per_token=counts_N.sum().float() / num_real,
        )


class RouterMoE(MoEBase):
    """Router-based mixture of SwiGLU experts.

    Autonomy-of-Experts Models (Lv et al., 2025), Algorithm 1: a router maps each token to N logits and the
    selection strategy picks experts from them. Router variants:

    - ``linear``: ``x -> Linear(D, N)`` without bias, the standard router.
    - ``large``: ``x -> Linear(D, N*L) -> SiLU -> Linear(N*L, N)``, both without bias. Its first layer has the
      ``N * L * D`` parameters that AoE spends on its ``W_down`` projections, so it tests whether AoE's gain
      comes from a bigger selection budget alone. The SiLU keeps the two layers from collapsing into one
      linear map of rank ``min(D, N)``.

    With ``factorized_gate``, each expert's W_g is ``W_down W_up`` as in AoE, but the router still chooses.
    """

    def __init__(self, d_model: int, config: FFNConfig) -> None:
        super().__init__(d_model, config)
        if config.router == "linear":
            self.router = nn.Linear(d_model, config.num_experts, bias=False)
        else:
            hidden = config.num_experts * config.d_low
            self.router = nn.Sequential(
                nn.Linear(d_model, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, config.num_experts, bias=False)
            )

    def score(self, x_TD: Tensor) -> tuple[Tensor, None]:
        # Router logits in fp32: under bf16 autocast near-equal logits tie and flip the top-k choice.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TN = self._router_fp32(x_TD.float())
        return logits_TN, None

    def _router_fp32(self, x_TD: Tensor) -> Tensor:
        if isinstance(self.router, nn.Linear):
            return x_TD @ self.router.weight.float().t()
        first, activation, last = self.router
        return activation(x_TD @ first.weight.float().t()) @ last.weight.float().t()

    def auxiliary_losses(
        self, scores_TN: Tensor, assignments: Assignments, token_mask_T: Tensor | None
    ) -> dict[str, Tensor]:
        aux = super().auxiliary_losses(scores_TN, assignments, token_mask_T)
        aux["z_loss"] = losses.router_z_loss(scores_TN, token_mask_T)
        return aux


class AutonomyOfExperts(MoEBase):
    """Router-free experts that select themselves by the norm of their low-rank activation.

    Autonomy-of-Experts Models (Lv et al., 2025), Eq. 3-5 and Algorithm 2. One matmul computes every expert's
    ``C_i = x W_down^i`` (T, N, L); the score of expert ``i`` is ``||C_i||`` (L2 by default; L1 and L-inf are
    options). The selected experts continue from the cached ``C_i`` through ``W_up``, ``W_p`` and ``W_o``; the
    others stop after ``W_down``. The all-expert softmax over the norms feeds the load-balancing loss.
    """

    def score(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        order = {"l2": 2, "l1": 1, "linf": math.inf}[self.config.score_norm]
        # Norms in fp32: bf16 norms of d_low-sized rows differ in the third digit and reorder close experts.
        return self.experts.low_rank_scores(x_TD, order)


def build_sparse_ffn(d_model: int, config: FFNConfig) -> MoEBase:
    if config.kind == "moe":
        return RouterMoE(d_model, config)
    if config.kind == "aoe":
        return AutonomyOfExperts(d_model, config)
    raise ValueError(f"ffn kind={config.kind!r} is not sparse; expected 'moe' or 'aoe'")
