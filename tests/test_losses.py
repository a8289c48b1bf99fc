"""Load-balancing loss, z-loss and entropies against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from aoe_lightning.models import losses


def round_robin(num_tokens: int, num_experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t takes experts (t*K + j) mod N for j < K: every expert gets the same number of assignments."""
    token_ids = torch.arange(num_tokens).repeat_interleave(top_k)
    expert_ids = torch.arange(num_tokens * top_k) % num_experts
    return token_ids, expert_ids


@pytest.mark.parametrize("num_experts, top_k", [(4, 1), (8, 2), (6, 3)])
def test_load_balance_balanced_is_one(num_experts: int, top_k: int) -> None:
    num_tokens = 4 * num_experts
    token_ids, expert_ids = round_robin(num_tokens, num_experts, top_k)
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts)

    loss = losses.load_balancing_loss(probs, expert_ids, token_ids)

    assert loss.item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("num_experts, top_k", [(4, 1), (8, 2), (6, 3)])
def test_load_balance_collapsed_is_n_over_k(num_experts: int, top_k: int) -> None:
    num_tokens = 10
    token_ids = torch.arange(num_tokens).repeat_interleave(top_k)
    expert_ids = torch.arange(top_k).repeat(num_tokens)
    probs = torch.zeros(num_tokens, num_experts)
    probs[:, :top_k] = 1.0 / top_k

    loss = losses.load_balancing_loss(probs, expert_ids, token_ids)

    assert loss.item() == pytest.approx(num_experts / top_k, rel=1e-6)


def test_load_balance_ignores_padding() -> None:
    torch.manual_seed(0)
    num_tokens, num_experts, top_k = 12, 4, 2
    probs = torch.softmax(torch.randn(num_tokens, num_experts), dim=-1)
    expert_ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).flatten()
    token_ids = torch.arange(num_tokens).repeat_interleave(top_k)
    token_mask = torch.ones(num_tokens, dtype=torch.bool)
    token_mask[[2, 5, 6, 11]] = False

    padded = losses.load_balancing_loss(probs, expert_ids, token_ids, token_mask)

    real = token_mask.nonzero().flatten()
    new_index = torch.full((num_tokens,), -1)
    new_index[real] = torch.arange(len(real))
    keep = token_mask[token_ids]
    unpadded = losses.load_balancing_loss(probs[real], expert_ids[keep], new_index[token_ids[keep]])
    assert_close(padded, unpadded)


def test_load_balance_gradient_only_through_probs() -> None:
    torch.manual_seed(1)
    num_tokens, num_experts, top_k = 10, 5, 2
    probs = torch.softmax(torch.randn(num_tokens, num_experts), dim=-1).requires_grad_()
    expert_ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).flatten()
    token_ids = torch.arange(num_tokens).repeat_interleave(top_k)
    token_mask = torch.ones(num_tokens, dtype=torch.bool)
    token_mask[[0, 9]] = False

    loss = losses.load_balancing_loss(probs, expert_ids, token_ids, token_mask)
    (grad,) = torch.autograd.grad(loss, probs)

    # With f held constant, dL/dP[t, i] = N * f_i / T_real at real tokens and 0 at padding.
    keep = token_mask[token_ids]
    f = torch.bincount(expert_ids[keep], minlength=num_experts).float() / keep.sum()
    num_real = token_mask.sum()
    expected = (num_experts * f / num_real)[None, :].expand(num_tokens, -1) * token_mask[:, None]
    assert_close(grad, expected)
    expected_loss = num_experts * torch.sum(f * probs.detach()[token_mask].mean(dim=0))
    assert_close(loss.detach(), expected_loss)


def test_expert_counts_exact() -> None:
    expert_ids = torch.tensor([0, 3, 3, 1, 3, 0])
    weights = torch.tensor([1, 1, 0, 1, 1, 0])
    assert torch.equal(losses.expert_counts(expert_ids, 5), torch.tensor([2, 1, 0, 3, 0]))
    weighted = losses.expert_counts(expert_ids, 5, weights)
    assert weighted.dtype == torch.int64
    assert torch.equal(weighted, torch.tensor([1, 1, 0, 2, 0]))


@pytest.mark.parametrize("value", [0.0, 1.5, -3.0])
def test_z_loss_uniform_logits(value: float) -> None:
    num_experts = 8
    logits = torch.full((5, num_experts), value)
    expected = (value + math.log(num_experts)) ** 2
    assert losses.router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_z_loss_hand_computed_with_mask() -> None:
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [100.0, 100.0]], dtype=torch.bfloat16)
    mask = torch.tensor([True, True, False])
    z0 = math.log(math.exp(0.0) + math.exp(1.0)) ** 2
    z1 = math.log(math.exp(2.0) + math.exp(-1.0)) ** 2

    loss = losses.router_z_loss(logits, mask)

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((z0 + z1) / 2, rel=1e-6)


@pytest.mark.parametrize("num_experts", [2, 8, 64])
def test_confidence_entropy_uniform_is_log_n(num_experts: int) -> None:
    probs = torch.full((7, num_experts), 1.0 / num_experts)
    assert losses.confidence_entropy(probs).item() == pytest.approx(math.log(num_experts), rel=1e-6)


def test_confidence_entropy_hand_computed_with_mask() -> None:
    probs = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    mask = torch.tensor([True, True, False])

    entropy = losses.confidence_entropy(probs, mask)

    # Row 0: 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2; row 1 is one-hot (0); row 2 is padding.
    assert entropy.item() == pytest.approx(1.5 * math.log(2) / 2, rel=1e-6)
    assert not torch.isnan(losses.confidence_entropy(probs[1:2]))


def test_load_entropy_closed_forms() -> None:
    assert losses.load_entropy(torch.tensor([5, 5, 5, 5])).item() == pytest.approx(math.log(4), rel=1e-6)
    assert losses.load_entropy(torch.tensor([0, 9, 0, 0])).item() == 0.0
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert losses.load_entropy(torch.tensor([2, 0, 1, 1])).item() == pytest.approx(expected, rel=1e-6)
    assert losses.max_load_entropy(8) == math.log(8)
