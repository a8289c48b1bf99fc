"""GroupedExperts dispatch against a per-assignment oracle, and one expert against a dense SwiGLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from aoe_lightning.models import experts as experts_module
from aoe_lightning.models.config import FFNConfig
from aoe_lightning.models.experts import GroupedExperts, grouped_mm
from aoe_lightning.models.moe import RouterMoE
from aoe_lightning.models.transformer import SwiGLU

D_MODEL, HIDDEN, D_LOW, NUM_EXPERTS, NUM_TOKENS = 16, 24, 6, 5, 13
UNUSED_EXPERT = NUM_EXPERTS - 1


def make_experts(d_low: int | None, seed: int = 0) -> GroupedExperts:
    torch.manual_seed(seed)
    experts = GroupedExperts(D_MODEL, HIDDEN, NUM_EXPERTS, d_low)
    experts.reset_parameters(std=0.3, out_std=0.3)
    return experts


def make_assignments(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (token, expert, gate) triples: some tokens get several experts, some none, and the last expert none."""
    generator = torch.Generator().manual_seed(seed)
    num_assignments = 2 * NUM_TOKENS
    token_ids = torch.randint(0, NUM_TOKENS, (num_assignments,), generator=generator)
    expert_ids = torch.randint(0, UNUSED_EXPERT, (num_assignments,), generator=generator)
    gates = torch.rand(num_assignments, generator=generator)
    return token_ids, expert_ids, gates


def oracle_forward(
    experts: GroupedExperts,
    x_TD: torch.Tensor,
    token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
    low_rank_TNL: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute each assignment's SwiGLU with its own gathered weights, then combine with a one-hot matmul."""
    x_AD = x_TD[token_ids]
    if experts.factorized:
        if low_rank_TNL is None:
            low_rank_AL = torch.einsum("ad,adl->al", x_AD, experts.w_down[expert_ids])
        else:
            low_rank_AL = low_rank_TNL[token_ids, expert_ids]
        gate_AH = torch.einsum("al,alh->ah", low_rank_AL, experts.w_up[expert_ids])
    else:
        gate_AH = torch.einsum("ad,adh->ah", x_AD, experts.w_gate[expert_ids])
    proj_AH = torch.einsum("ad,adh->ah", x_AD, experts.w_proj[expert_ids])
    y_AD = torch.einsum("ah,ahd->ad", F.silu(gate_AH) * proj_AH, experts.w_out[expert_ids])
    combine_TA = F.one_hot(token_ids, x_TD.shape[0]).t().float() * gates[None, :]
    return combine_TA @ y_AD


def gradients(module: torch.nn.Module, x: torch.Tensor, output: torch.Tensor, upstream: torch.Tensor) -> dict:
    names = ["x"] + [name for name, _ in module.named_parameters()]
    tensors = [x] + list(module.parameters())
    # retain_graph: the oracle and the module share the graph of the cached low-rank rows.
    return dict(zip(names, torch.autograd.grad(output, tensors, upstream, retain_graph=True)))


@pytest.mark.parametrize(
    "d_low, cached",
    [(None, False), (D_LOW, False), (D_LOW, True)],
    ids=["swiglu", "factorized", "factorized-cached-low-rank"],
)
def test_dispatch_matches_oracle(d_low: int | None, cached: bool) -> None:
    experts = make_experts(d_low)
    token_ids, expert_ids, gates = make_assignments()
    x = torch.randn(NUM_TOKENS, D_MODEL, requires_grad=True)
    upstream = torch.randn(NUM_TOKENS, D_MODEL)

    # The cache is computed here, outside GroupedExperts; the oracle computes x W_down per assignment itself.
    low_rank = torch.einsum("td,ndl->tnl", x, experts.w_down) if cached else None
    out, counts = experts(x, token_ids, expert_ids, gates, low_rank)
    expected = oracle_forward(experts, x, token_ids, expert_ids, gates)

    assert out.dtype == torch.float32
    assert_close(out, expected)
    assert torch.equal(counts, torch.bincount(expert_ids, minlength=NUM_EXPERTS))

    got_grads = gradients(experts, x, out, upstream)
    expected_grads = gradients(experts, x, expected, upstream)
    assert got_grads.keys() == expected_grads.keys()
    for name in got_grads:
        assert_close(got_grads[name], expected_grads[name], msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("d_low", [None, D_LOW], ids=["swiglu", "factorized"])
def test_unused_expert_gets_zero_gradient(d_low: int | None) -> None:
    experts = make_experts(d_low)
    token_ids, expert_ids, gates = make_assignments()
    assert UNUSED_EXPERT not in expert_ids.tolist()
    x = torch.randn(NUM_TOKENS, D_MODEL)

    out, counts = experts(x, token_ids, expert_ids, gates)
    out.square().sum().backward()

    assert counts[UNUSED_EXPERT].item() == 0
    for name, param in experts.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        assert torch.count_nonzero(param.grad[UNUSED_EXPERT]).item() == 0, f"{name} of the unused expert"
        assert torch.count_nonzero(param.grad[0]).item() > 0, f"{name} of a used expert"


def test_dispatch_reads_cached_low_rank_rows() -> None:
    experts = make_experts(D_LOW)
    token_ids, expert_ids, gates = make_assignments()
    x = torch.randn(NUM_TOKENS, D_MODEL)
    # A cache that differs from x W_down shows whether the dispatch reads it or recomputes the product.
    altered_cache = torch.randn(NUM_TOKENS, NUM_EXPERTS, D_LOW)

    out, _ = experts(x, token_ids, expert_ids, gates, altered_cache)

    assert_close(out, oracle_forward(experts, x, token_ids, expert_ids, gates, altered_cache))
    assert not torch.allclose(out, oracle_forward(experts, x, token_ids, expert_ids, gates))


def test_token_without_assignment_outputs_zero() -> None:
    experts = make_experts(None)
    token_ids = torch.tensor([0, 0, 2])
    expert_ids = torch.tensor([1, 3, 1])
    gates = torch.tensor([0.25, 0.75, 1.0])
    x = torch.randn(4, D_MODEL)

    out, _ = experts(x, token_ids, expert_ids, gates)

    assert torch.count_nonzero(out[1]).item() == 0
    assert torch.count_nonzero(out[3]).item() == 0

    def swiglu(expert: int, x_D: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(x_D @ experts.w_gate[expert]) * (x_D @ experts.w_proj[expert])
        return hidden @ experts.w_out[expert]

    assert_close(out[0], 0.25 * swiglu(1, x[0]) + 0.75 * swiglu(3, x[0]))


def test_dispatch_keeps_input_dtype() -> None:
    experts = make_experts(None).to(torch.bfloat16)
    token_ids, expert_ids, gates = make_assignments()
    x = torch.randn(NUM_TOKENS, D_MODEL, dtype=torch.bfloat16)

    out, _ = experts(x, token_ids, expert_ids, gates)

    assert out.dtype == torch.bfloat16
    expected = oracle_forward(experts.float(), x.float(), token_ids, expert_ids, gates)
    # bf16 matmuls keep about 3 significant digits.
    assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_low_rank_all_matches_per_expert_products() -> None:
    experts = make_experts(D_LOW)
    x = torch.randn(NUM_TOKENS, D_MODEL)

    low_rank = experts.low_rank_all(x)

    assert low_rank.shape == (NUM_TOKENS, NUM_EXPERTS, D_LOW)
    for expert in range(NUM_EXPERTS):
        assert_close(low_rank[:, expert], x @ experts.w_down[expert])


@pytest.mark.parametrize("gate_norm", ["softmax_selected", "softmax_all"])
def test_single_expert_top1_equals_dense_swiglu(gate_norm: str) -> None:
    torch.manual_seed(0)
    config = FFNConfig(kind="moe", d_ffn=HIDDEN, num_experts=1, top_k=1, gate_norm=gate_norm)
    moe = RouterMoE(D_MODEL, config)
    moe.experts.reset_parameters(std=0.3, out_std=0.3)
    dense = SwiGLU(D_MODEL, HIDDEN)
    with torch.no_grad():
        dense.w_gate.weight.copy_(moe.experts.w_gate[0].t())
        dense.w_proj.weight.copy_(moe.experts.w_proj[0].t())
        dense.w_out.weight.copy_(moe.experts.w_out[0].t())
    x = torch.randn(2, 7, D_MODEL, requires_grad=True)
    upstream = torch.randn(2, 7, D_MODEL)

    out, _, _ = moe(x)
    expected = dense(x)

    assert_close(out, expected)
    (grad_x,) = torch.autograd.grad(out, x, upstream)
    (expected_grad_x,) = torch.autograd.grad(expected, x, upstream)
    assert_close(grad_x, expected_grad_x)


def test_grouped_mm_gradcheck_with_empty_group() -> None:
    generator = torch.Generator().manual_seed(3)
    counts = [3, 0, 5, 2]
    x = torch.randn(10, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(4, 4, 6, dtype=torch.float64, generator=generator, requires_grad=True)

    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, counts), (x, w))


def test_low_rank_l2_scores_match_autograd() -> None:
    experts = make_experts(D_LOW)
    x = torch.randn(NUM_TOKENS, D_MODEL, requires_grad=True)
    rows = torch.tensor([0, 7, 7, 30, 64])            # gathered (token * N + expert) rows, one repeated
    norm_weights = torch.randn(NUM_TOKENS, NUM_EXPERTS)
    row_weights = torch.randn(len(rows), D_LOW)

    def loss(norms, low_rank):
        gathered = low_rank.reshape(-1, D_LOW).index_select(0, rows)
        return (norms * norm_weights).sum() + (gathered * row_weights).sum()

    norms, low_rank = experts.low_rank_scores(x, 2)
    grads = torch.autograd.grad(loss(norms, low_rank), [x, experts.w_down])
    expected_low_rank = experts.low_rank_all(x)
    expected_norms = torch.linalg.vector_norm(expected_low_rank, dim=-1)
    expected_grads = torch.autograd.grad(loss(expected_norms, expected_low_rank), [x, experts.w_down])

    assert_close(norms, expected_norms)
    assert_close(low_rank, expected_low_rank)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad)


def test_low_rank_l2_norms_gradcheck() -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    w_down = torch.randn(4, 3 * 2, dtype=torch.float64, generator=generator, requires_grad=True)

    def low_rank_and_norms(x_TD, w_down_DX):
        return experts_module._LowRankL2Norms.apply(x_TD, w_down_DX, 3)

    assert torch.autograd.gradcheck(low_rank_and_norms, (x, w_down))


@pytest.mark.parametrize("factorized", [False, True], ids=["swiglu", "factorized"])
def test_grouped_swiglu_gradcheck(factorized: bool) -> None:
    generator = torch.Generator().manual_seed(4)
    counts = [3, 0, 4]

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)

    x, w_proj, w_out = tensor(7, 4), tensor(3, 4, 5), tensor(3, 5, 4)
    gate_input, w_gate = (tensor(7, 2), tensor(3, 2, 5)) if factorized else (None, tensor(3, 4, 5))
    inputs = (x, gate_input, w_gate, w_proj, w_out)

    assert torch.autograd.gradcheck(lambda *args: experts_module._GroupedSwiGLU.apply(*args, counts), inputs)


def test_grouped_mm_matches_loop_and_expanded_grad() -> None:
    counts = [2, 4, 0]
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(3, 5, 7, requires_grad=True)

    # sum() sends back an expanded (stride-0) gradient, which the backward must accept.
    grouped_mm(x, w, counts).sum().backward()

    starts = [0, 2, 6]
    expected = torch.cat([x[s:s + c] @ w[e] for e, (s, c) in enumerate(zip(starts, counts))])
    assert_close(grouped_mm(x, w, counts), expected)
    x_grad, w_grad = torch.autograd.grad(expected.sum(), (x, w))
    assert_close(x.grad, x_grad)
    assert_close(w.grad, w_grad)
    assert torch.count_nonzero(w.grad[2]).item() == 0


def test_grouped_mm_odd_width_rows_aligned() -> None:
    counts = [3, 1, 2]
    x = torch.randn(6, 5, requires_grad=True)
    w_in = torch.randn(3, 5, 7, requires_grad=True)
    w_out = torch.randn(3, 7, 4, requires_grad=True)

    hidden = grouped_mm(x, w_in, counts)
    # Rows of width 7 sit in a buffer 16 fp32 values wide, so every row starts on a 64-byte boundary.
    assert hidden.shape == (6, 7)
    assert hidden.stride() == (16, 1)
    assert all(hidden[row].data_ptr() % 64 == 0 for row in range(6))
    out = grouped_mm(torch.tanh(hidden), w_out, counts)
    upstream = torch.randn(6, 4)
    grads = torch.autograd.grad(out, (x, w_in, w_out), upstream)

    starts = [0, 3, 4]
    expected = torch.cat([
        torch.tanh(x[s:s + c] @ w_in[e]) @ w_out[e] for e, (s, c) in enumerate(zip(starts, counts))
    ])
    assert_close(out, expected)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, (x, w_in, w_out), upstream)):
        assert_close(grad, expected_grad)


def test_grouped_mm_rejects_mismatched_counts() -> None:
    with pytest.raises(ValueError, match="do not match 3 weights and 6 input rows"):
        grouped_mm(torch.randn(6, 5), torch.randn(3, 5, 7), [2, 2, 1])


def test_dispatch_runs_in_autocast_dtype() -> None:
    experts = make_experts(D_LOW)
    token_ids, expert_ids, gates = make_assignments()
    x = torch.randn(NUM_TOKENS, D_MODEL, requires_grad=True)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = experts(x, token_ids, expert_ids, gates)
    out.sum().backward()

    assert out.dtype == torch.float32
    assert experts.w_up.grad.dtype == torch.float32
    assert_close(out, oracle_forward(experts, x, token_ids, expert_ids, gates), rtol=3e-2, atol=3e-2)
