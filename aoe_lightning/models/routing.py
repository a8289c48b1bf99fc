"""Expert selection strategies shared by the router MoE and AoE.

A strategy turns per-token expert scores into a flat list of (token, expert, gate weight) assignments.
Router MoE scores are router logits; AoE scores are the norms of each expert's ``x W_down``. Everything here
runs in fp32: softmax and top-k over bf16 scores tie and round often enough to change which expert wins.

Shape legend: T tokens, N experts, K experts per token, A assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from aoe_lightning.models.config import FFNConfig


@dataclass
class Assignments:
    """Assignment of tokens to experts, with one gate weight per (token, expert) pair."""

    token_ids_A: Tensor
    """Row of the flattened token batch for each assignment (int64)."""
    expert_ids_A: Tensor
    """Expert for each assignment (int64)."""
    gates_A: Tensor
    """Gate weight of each assignment (fp32)."""
    probs_TN: Tensor
    """Softmax over all N scores per token (fp32); the load-balancing loss and entropies read it."""


def select_experts(scores_TN: Tensor, config: FFNConfig, token_mask_T: Tensor | None = None) -> Assignments:
    """Apply the selection strategy named by ``config.selection`` to fp32 scores."""
    scores_TN = scores_TN.float()
    if config.selection == "top_k":
        return top_k_selection(scores_TN, config.top_k, config.gate_norm)
    if config.selection == "top_p":
        return top_p_selection(scores_TN, config.top_p, config.gate_norm)
    if config.selection == "expert_choice":
        return expert_choice_selection(scores_TN, config.capacity_factor, token_mask_T)
    raise ValueError(f"selection={config.selection!r} is not one of top_k, top_p, expert_choice")


def top_k_selection(scores_TN: Tensor, top_k: int, gate_norm: str) -> Assignments:
    """Token choice: each token takes its K highest-scoring experts.

    ``softmax_selected`` renormalises over the K selected scores (the gates sum to 1); ``softmax_all`` keeps
    the selected entries of the softmax over all N scores without renormalising.
    """
    num_tokens = scores_TN.shape[0]
    probs_TN = torch.softmax(scores_TN, dim=-1)
    top_scores_TK, expert_ids_TK = torch.topk(scores_TN, top_k, dim=-1)
    if gate_norm == "softmax_selected":
        gates_TK = torch.softmax(top_scores_TK, dim=-1)
    else:
        gates_TK = probs_TN.gather(-1, expert_ids_TK)
    token_ids_TK = torch.arange(num_tokens, device=scores_TN.device)[:, None].expand(-1, top_k)
    return Assignments(token_ids_TK.reshape(-1), expert_ids_TK.reshape(-1), gates_TK.reshape(-1), probs_TN)


def top_p_selection(scores_TN: Tensor, top_p: float, gate_norm: str) -> Assignments:
    """Token choice with a variable number of experts: the smallest set whose probabilities sum to ``top_p``.

    Experts are sorted by their all-expert softmax probability. An expert is kept when the probability mass
    of the experts ranked before it is still below ``top_p``, so the first expert is always kept.
    """
    probs_TN = torch.softmax(scores_TN, dim=-1)
    sorted_probs_TN, sorted_ids_TN = torch.sort(probs_TN, dim=-1, descending=True, stable=True)
    mass_before_TN = torch.cumsum(sorted_probs_TN, dim=-1) - sorted_probs_TN
    keep_TN = mass_before_TN < top_p
    keep_TN[:, 0] = True
    gates_TN = sorted_probs_TN * keep_TN
    if gate_norm == "softmax_selected":
        gates_TN = gates_TN / gates_TN.sum(dim=-1, keepdim=True)
    token_ids, rank = keep_TN.nonzero(as_tuple=True)
    # A flat index_select has a fast backward (index_add_) on CPU, unlike advanced indexing.
    flat_A = token_ids * scores_TN.shape[1] + rank
    gates_A = gates_TN.reshape(-1).index_select(0, flat_A)
    return Assignments(token_ids, sorted_ids_TN.reshape(-1)[flat_A], gates_A, probs_TN)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes: ``ceil(T * capacity_factor / N)``, capped at T."""
    return min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts))


def expert_choice_selection(
    scores_TN: Tensor, capacity_factor: float, token_mask_T: Tensor | None = None
) -> Assignments:
    """Expert choice: each expert takes its highest-probability tokens, up to its capacity.

    The ranking runs along the token axis of the whole batch, so a token's output depends on later tokens of
    the batch: this strategy is not causal and suits training-time comparisons, not autoregressive decoding.
    Padding tokens (``token_mask_T`` False) are never chosen and do not count in T when sizing the capacity.
    A token may get zero, one or several experts.
    """
    num_tokens, num_experts = scores_TN.shape
    probs_TN = torch.softmax(scores_TN, dim=-1)
    ranking_TN = probs_TN
    num_real = num_tokens
    if token_mask_T is not None:
        # Capacity is a fraction of the real tokens: counting padding would let each expert take more of them.
        num_real = int(token_mask_T.sum())
        ranking_TN = probs_TN.masked_fill(~token_mask_T[:, None], -1.0)
    capacity = expert_choice_capacity(num_real, num_experts, capacity_factor)
    gates_CN, token_ids_CN = torch.topk(ranking_TN, capacity, dim=0)
    expert_ids_CN = torch.arange(num_experts, device=scores_TN.device)[None, :].expand(capacity, -1)
    # Expert-major order keeps each expert's tokens contiguous, which is how the dispatch sorts them anyway.
    return Assignments(
        token_ids_CN.t().reshape(-1), expert_ids_CN.t().reshape(-1), gates_CN.t().reshape(-1), probs_TN
    )
