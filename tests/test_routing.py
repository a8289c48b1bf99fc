"""Selection strategies: gate weights on hand-computed inputs, top-p set sizes, expert-choice capacity."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from aoe_lightning.models.config import FFNConfig
from aoe_lightning.models.routing import (
    Assignments,
    expert_choice_capacity,
    expert_choice_selection,
    select_experts,
    top_k_selection,
    top_p_selection,
)


def per_token_gates(assignments: Assignments, num_tokens: int) -> list[dict[int, float]]:
    """Map each token to {expert: gate} from the flat assignment lists."""
    result: list[dict[int, float]] = [{} for _ in range(num_tokens)]
    for token, expert, gate in zip(
        assignments.token_ids_A.tolist(), assignments.expert_ids_A.tolist(), assignments.gates_A.tolist()
    ):
        assert expert not in result[token], f"token {token} got expert {expert} twice"
        result[token][expert] = gate
    return result


def assert_gates(got: list[dict[int, float]], expected: list[dict[int, float]]) -> None:
    assert [sorted(row) for row in got] == [sorted(row) for row in expected]
    for token, (got_row, expected_row) in enumerate(zip(got, expected)):
        for expert in expected_row:
            assert got_row[expert] == pytest.approx(expected_row[expert], rel=1e-6), (token, expert)


SCORES = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 0.0, 2.5]])


def test_top_k_softmax_selected_gates() -> None:
    assignments = top_k_selection(SCORES, top_k=2, gate_norm="softmax_selected")

    e3, e2, e05, e25 = math.exp(3.0), math.exp(2.0), math.exp(0.5), math.exp(2.5)
    expected = [
        {1: e3 / (e3 + e2), 2: e2 / (e3 + e2)},
        {3: e25 / (e25 + e05), 0: e05 / (e25 + e05)},
    ]
    assert_gates(per_token_gates(assignments, 2), expected)
    assert assignments.gates_A.dtype == torch.float32


def test_top_k_softmax_all_gates() -> None:
    assignments = top_k_selection(SCORES, top_k=2, gate_norm="softmax_all")

    total0 = math.exp(1.0) + math.exp(3.0) + math.exp(2.0) + math.exp(0.0)
    total1 = math.exp(0.5) + math.exp(-1.0) + math.exp(0.0) + math.exp(2.5)
    expected = [
        {1: math.exp(3.0) / total0, 2: math.exp(2.0) / total0},
        {3: math.exp(2.5) / total1, 0: math.exp(0.5) / total1},
    ]
    assert_gates(per_token_gates(assignments, 2), expected)
    expected_probs = torch.tensor(
        [
            [math.exp(1.0) / total0, math.exp(3.0) / total0, math.exp(2.0) / total0, math.exp(0.0) / total0],
            [math.exp(0.5) / total1, math.exp(-1.0) / total1, math.exp(0.0) / total1, math.exp(2.5) / total1],
        ]
    )
    assert_close(assignments.probs_TN, expected_probs)


# Probabilities chosen away from the 0.6 boundary, so that rounding cannot change the set size.
TOP_P_PROBS = [
    [0.7, 0.1, 0.1, 0.1, 0.0, 0.0],  # 0.7 >= 0.6 -> 1 expert
    [0.3, 0.5, 0.1, 0.05, 0.05, 0.0],  # 0.5 + 0.3 -> 2 experts
    [0.25, 0.25, 0.25, 0.25, 0.0, 0.0],  # 0.75 -> 3 experts
    [0.16, 0.16, 0.2, 0.16, 0.16, 0.16],  # 0.2 + 3 * 0.16 = 0.68 -> 4 experts
]
TOP_P_SETS = [{0}, {1, 0}, {0, 1, 2}, {2, 0, 1, 3}]


def top_p_scores() -> torch.Tensor:
    # log(0) would be -inf: a tiny probability keeps the softmax finite and leaves the ranking unchanged.
    return torch.tensor(TOP_P_PROBS).clamp(min=1e-9).log()


def test_top_p_expert_counts_per_token() -> None:
    assignments = top_p_selection(top_p_scores(), top_p=0.6, gate_norm="softmax_all")

    got = per_token_gates(assignments, len(TOP_P_PROBS))
    assert [len(row) for row in got] == [1, 2, 3, 4]
    # Ties among equal probabilities keep the lower expert id first (stable sort).
    assert [set(row) for row in got] == TOP_P_SETS


@pytest.mark.parametrize("gate_norm", ["softmax_selected", "softmax_all"])
def test_top_p_gates(gate_norm: str) -> None:
    assignments = top_p_selection(top_p_scores(), top_p=0.6, gate_norm=gate_norm)

    expected = []
    for probs, chosen in zip(TOP_P_PROBS, TOP_P_SETS):
        selected_mass = sum(probs[expert] for expert in chosen)
        scale = selected_mass if gate_norm == "softmax_selected" else 1.0
        expected.append({expert: probs[expert] / scale for expert in chosen})
    assert_gates(per_token_gates(assignments, len(TOP_P_PROBS)), expected)


def test_top_p_one_keeps_every_expert_with_mass() -> None:
    scores = torch.randn(5, 4)
    assignments = top_p_selection(scores, top_p=1.0, gate_norm="softmax_all")
    # The mass before the last expert is below 1 whenever that expert has any probability.
    assert torch.equal(torch.bincount(assignments.token_ids_A, minlength=5), torch.full((5,), 4))


def brute_force_top_tokens(probs_TN: torch.Tensor, expert: int, capacity: int, real: list[int]) -> set[int]:
    ranked = sorted(real, key=lambda token: probs_TN[token, expert].item(), reverse=True)
    return set(ranked[:capacity])


@pytest.mark.parametrize(
    "num_tokens, num_experts, capacity_factor, expected_capacity",
    [(20, 4, 1.5, 8), (16, 8, 2.0, 4), (10, 8, 2.0, 3), (7, 2, 2.0, 7), (5, 4, 0.1, 1)],
)
def test_expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float, expected_capacity: int) -> None:
    assert expert_choice_capacity(num_tokens, num_experts, capacity_factor) == expected_capacity


def test_expert_choice_takes_top_tokens_up_to_capacity() -> None:
    torch.manual_seed(0)
    num_tokens, num_experts, capacity_factor = 20, 4, 1.5
    scores = torch.randn(num_tokens, num_experts)

    assignments = expert_choice_selection(scores, capacity_factor)

    capacity = math.ceil(num_tokens * capacity_factor / num_experts)
    probs = torch.softmax(scores, dim=-1)
    assert torch.equal(
        torch.bincount(assignments.expert_ids_A, minlength=num_experts), torch.full((num_experts,), capacity)
    )
    for expert in range(num_experts):
        chosen = assignments.token_ids_A[assignments.expert_ids_A == expert].tolist()
        assert len(set(chosen)) == capacity, f"expert {expert} took a token twice"
        assert set(chosen) == brute_force_top_tokens(probs, expert, capacity, list(range(num_tokens)))
    triples = zip(assignments.token_ids_A.tolist(), assignments.expert_ids_A.tolist(), assignments.gates_A.tolist())
    for token, expert, gate in triples:
        assert gate == pytest.approx(probs[token, expert].item(), rel=1e-6)


def test_expert_choice_skips_padding() -> None:
    torch.manual_seed(1)
    num_tokens, num_experts, capacity_factor = 24, 4, 2.0
    scores = torch.randn(num_tokens, num_experts)
    token_mask = torch.ones(num_tokens, dtype=torch.bool)
    token_mask[[3, 7, 8, 20, 21, 22, 23]] = False
    # Padding tokens get the highest scores, so a ranking that ignored the mask would pick them first.
    scores[~token_mask] += 10.0
    real = token_mask.nonzero().flatten().tolist()

    assignments = expert_choice_selection(scores, capacity_factor, token_mask)

    capacity = math.ceil(len(real) * capacity_factor / num_experts)
    assert capacity == 9
    assert torch.equal(
        torch.bincount(assignments.expert_ids_A, minlength=num_experts), torch.full((num_experts,), capacity)
    )
    assert token_mask[assignments.token_ids_A].all()
    probs = torch.softmax(scores, dim=-1)
    for expert in range(num_experts):
        chosen = set(assignments.token_ids_A[assignments.expert_ids_A == expert].tolist())
        assert chosen == brute_force_top_tokens(probs, expert, capacity, real)


def test_expert_choice_capacity_capped_at_token_count() -> None:
    scores = torch.randn(3, 2)
    assignments = expert_choice_selection(scores, capacity_factor=2.0)
    assert torch.equal(torch.bincount(assignments.expert_ids_A, minlength=2), torch.tensor([3, 3]))


@pytest.mark.parametrize("selection", ["top_k", "top_p", "expert_choice"])
def test_select_experts_dispatches_on_config(selection: str) -> None:
    torch.manual_seed(2)
    config = FFNConfig(kind="moe", num_experts=4, top_k=2, selection=selection, top_p=0.6, capacity_factor=2.0)
    scores = torch.randn(8, 4, dtype=torch.bfloat16)

    got = select_experts(scores, config)

    reference = {
        "top_k": lambda s: top_k_selection(s, 2, "softmax_selected"),
        "top_p": lambda s: top_p_selection(s, 0.6, "softmax_selected"),
        "expert_choice": lambda s: expert_choice_selection(s, 2.0),
    }[selection](scores.float())
    assert got.probs_TN.dtype == torch.float32
    assert torch.equal(got.token_ids_A, reference.token_ids_A)
    assert torch.equal(got.expert_ids_A, reference.expert_ids_A)
    assert torch.equal(got.gates_A, reference.gates_A)
