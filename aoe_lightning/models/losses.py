"""Auxiliary losses and routing statistics of MoE and AoE layers, as pure functions.

Shape legend: T tokens, N experts, A (token, expert) assignments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def expert_counts(expert_ids_A: Tensor, num_experts: int, token_weight_A: Tensor | None = None) -> Tensor:
    """Count the assignments each expert received; ``token_weight_A`` (0 or 1) drops padding assignments."""
    if token_weight_A is None:
        return torch.bincount(expert_ids_A, minlength=num_experts)
    return torch.bincount(expert_ids_A, weights=token_weight_A.float(), minlength=num_experts).long()


def load_balancing_loss(
    probs_TN: Tensor,
    expert_ids_A: Tensor,
    token_ids_A: Tensor,
    token_mask_T: Tensor | None = None,
) -> Tensor:
    """Switch-Transformer load-balancing loss, unweighted (multiply by ``alpha`` outside).

    Autonomy-of-Experts Models (Lv et al., 2025), Eq. 2 and Eq. 6: ``L = N * sum_i f_i * P_i``.

    Normalisation: ``f_i`` is the fraction of (token, expert) assignments that went to expert ``i``, so it sums
    to 1 over experts (the paper's Eq. 2 lets it sum to K; this is that value divided by K, as in megablocks).
    ``P_i`` is the mean over tokens of the softmax over all N scores (router logits for MoE, activation norms
    for AoE). Closed forms: a perfectly balanced layer (uniform ``f`` and ``P``) gives exactly 1; every token
    sent to the same K experts with probability 1/K each gives ``N / K``.

    Only ``P`` carries gradient: ``f`` comes from a discrete choice. Tokens where ``token_mask_T`` is False
    (padding) count in neither ``f`` nor ``P``.
    """
    num_tokens, num_experts = probs_TN.shape
    if token_mask_T is None:
        token_mask_T = torch.ones(num_tokens, dtype=torch.bool, device=probs_TN.device)
    weight_T = token_mask_T.to(probs_TN.dtype)
    counts_N = expert_counts(expert_ids_A, num_experts, weight_T[token_ids_A])
    f_N = counts_N.to(probs_TN.dtype) / counts_N.sum().clamp(min=1)
    P_N = (probs_TN * weight_T[:, None]).sum(dim=0) / weight_T.sum().clamp(min=1)
    return num_experts * torch.sum(f_N.detach() * P_N)


def router_z_loss(logits_TN: Tensor, token_mask_T: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``, in fp32."""
    z_T = torch.logsumexp(logits_TN.float(), dim=-1) ** 2
    return _masked_mean(z_T, token_mask_T)


def confidence_entropy(probs_TN: Tensor, token_mask_T: Tensor | None = None) -> Tensor:
    """Mean over tokens of the entropy of the all-expert softmax, in nats (max ``ln N``)."""
    entropy_T = -(probs_TN * torch.log(probs_TN.clamp(min=torch.finfo(probs_TN.dtype).tiny))).sum(dim=-1)
    return _masked_mean(entropy_T, token_mask_T)


def load_entropy(counts_N: Tensor) -> Tensor:
    """Entropy of the expert load ``-sum_i f_i ln f_i`` with ``f`` normalised to sum to 1 (max ``ln N``)."""
    f_N = counts_N.double() / counts_N.sum().clamp(min=1)
    terms = torch.where(f_N > 0, -f_N * torch.log(f_N.clamp(min=1e-300)), torch.zeros_like(f_N))
    return terms.sum().float()


def max_load_entropy(num_experts: int) -> float:
    return math.log(num_experts)


def _masked_mean(values_T: Tensor, token_mask_T: Tensor | None) -> Tensor:
    if token_mask_T is None:
        return values_T.mean()
    weight_T = token_mask_T.to(values_T.dtype)
    return (values_T * weight_T).sum() / weight_T.sum().clamp(min=1)
