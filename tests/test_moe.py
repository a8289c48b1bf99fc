"""Router MoE and AoE layers against per-token brute-force computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from aoe_lightning.models import experts as experts_module
from aoe_lightning.models import losses
from aoe_lightning.models.config import FFNConfig
from aoe_lightning.models.moe import AutonomyOfExperts, RouterMoE, build_sparse_ffn

D_MODEL, D_LOW, NUM_EXPERTS, TOP_K = 16, 5, 6, 2
BATCH, SEQ = 2, 9


def make_aoe(score_norm: str = "l2", gate_norm: str = "softmax_selected", **overrides) -> AutonomyOfExperts:
    torch.manual_seed(0)
    config = FFNConfig(
        kind="aoe", d_ffn=20, num_experts=NUM_EXPERTS, top_k=TOP_K, d_low=D_LOW,
        score_norm=score_norm, gate_norm=gate_norm, **overrides,
    )
    layer = AutonomyOfExperts(D_MODEL, config)
    layer.experts.reset_parameters(std=0.3, out_std=0.3)
    return layer


def vector_norm(values: list[float], score_norm: str) -> float:
    if score_norm == "l2":
        return math.sqrt(sum(v * v for v in values))
    if score_norm == "l1":
        return sum(abs(v) for v in values)
    return max(abs(v) for v in values)


def brute_force_norms(layer: AutonomyOfExperts, x_TD: torch.Tensor, score_norm: str) -> list[list[float]]:
    """Norm of x W_down^i for every token and expert, one expert weight at a time."""
    norms = []
    for token in range(x_TD.shape[0]):
        row = []
        for expert in range(NUM_EXPERTS):
            low_rank = (x_TD[token] @ layer.experts.w_down[expert]).tolist()
            row.append(vector_norm(low_rank, score_norm))
        norms.append(row)
    return norms


def top_experts(norms: list[float], top_k: int) -> list[int]:
    ranked = sorted(range(len(norms)), key=lambda expert: norms[expert], reverse=True)
    # The test is only meaningful when float rounding cannot swap the K-th and (K+1)-th experts.
    assert norms[ranked[top_k - 1]] - norms[ranked[top_k]] > 1e-4
    return sorted(ranked[:top_k])


def capture_dispatch(layer) -> dict:
    """Record the assignments that reach the layer's GroupedExperts."""
    captured = {}

    def hook(module, args):
        captured["token_ids"], captured["expert_ids"], captured["gates"] = args[1], args[2], args[3]
        captured["low_rank"] = args[4] if len(args) > 4 else None

    layer.experts.register_forward_pre_hook(hook)
    return captured


def assigned_experts(captured: dict, num_tokens: int) -> list[list[int]]:
    per_token: list[list[int]] = [[] for _ in range(num_tokens)]
    for token, expert in zip(captured["token_ids"].tolist(), captured["expert_ids"].tolist()):
        per_token[token].append(expert)
    return [sorted(experts) for experts in per_token]


@pytest.mark.parametrize("score_norm", ["l2", "l1", "linf"])
def test_aoe_selects_top_k_by_low_rank_norm(score_norm: str) -> None:
    layer = make_aoe(score_norm)
    captured = capture_dispatch(layer)
    x = torch.randn(BATCH, SEQ, D_MODEL)

    layer(x)

    x_TD = x.reshape(-1, D_MODEL)
    norms = brute_force_norms(layer, x_TD, score_norm)
    expected = [top_experts(row, TOP_K) for row in norms]
    assert assigned_experts(captured, x_TD.shape[0]) == expected


@pytest.mark.parametrize("gate_norm", ["softmax_selected", "softmax_all"])
@pytest.mark.parametrize("score_norm", ["l2", "l1", "linf"])
def test_aoe_output_matches_formula(score_norm: str, gate_norm: str) -> None:
    layer = make_aoe(score_norm, gate_norm)
    experts = layer.experts
    x = torch.randn(BATCH, SEQ, D_MODEL)

    out, _, _ = layer(x)

    x_TD = x.reshape(-1, D_MODEL)
    norms = brute_force_norms(layer, x_TD, score_norm)
    expected = torch.zeros_like(x_TD)
    for token in range(x_TD.shape[0]):
        chosen = top_experts(norms[token], TOP_K)
        pool = chosen if gate_norm == "softmax_selected" else range(NUM_EXPERTS)
        normaliser = sum(math.exp(norms[token][expert]) for expert in pool)
        for expert in chosen:
            gate = math.exp(norms[token][expert]) / normaliser
            xt = x_TD[token]
            hidden = F.silu(xt @ experts.w_down[expert] @ experts.w_up[expert]) * (xt @ experts.w_proj[expert])
            expected[token] += gate * (hidden @ experts.w_out[expert])
    assert_close(out.reshape(-1, D_MODEL), expected)


def test_aoe_reuses_cached_low_rank_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_aoe()
    experts = layer.experts
    low_rank_calls = 0
    caches = []
    matmul_weights = []               # weight of every grouped matmul
    swiglu_calls = []                 # (gate input rows, gate weight, group counts) of every expert SwiGLU
    original_low_rank_scores = experts.low_rank_scores
    original_grouped_mm = experts_module.grouped_mm
    original_swiglu = experts_module._GroupedSwiGLU

    def counting_low_rank_scores(x_TD, order):
        nonlocal low_rank_calls
        low_rank_calls += 1
        norms_TN, low_rank_TNL = original_low_rank_scores(x_TD, order)
        caches.append(low_rank_TNL)
        return norms_TN, low_rank_TNL

    def recording_grouped_mm(input_AK, weight_NKM, counts):
        matmul_weights.append(weight_NKM)
        return original_grouped_mm(input_AK, weight_NKM, counts)

    class RecordingSwiGLU:
        @staticmethod
        def apply(x_AD, gate_input_AK, w_gate, w_proj, w_out, counts):
            swiglu_calls.append((gate_input_AK, w_gate, counts))
            return original_swiglu.apply(x_AD, gate_input_AK, w_gate, w_proj, w_out, counts)

    monkeypatch.setattr(experts, "low_rank_scores", counting_low_rank_scores)
    monkeypatch.setattr(experts_module, "grouped_mm", recording_grouped_mm)
    monkeypatch.setattr(experts_module, "_GroupedSwiGLU", RecordingSwiGLU)
    captured = capture_dispatch(layer)
    x = torch.randn(BATCH, SEQ, D_MODEL)

    layer(x)

    assert low_rank_calls == 1
    assert captured["low_rank"] is caches[0]
    assert not any(weight is experts.w_down for weight in matmul_weights), "the dispatch recomputed x W_down"
    assert len(swiglu_calls) == 1
    up_input, gate_weight, counts = swiglu_calls[0]
    assert gate_weight is experts.w_up
    # The dispatch sorts stably by expert, so expert e's rows are its tokens in their original order.
    token_ids, expert_ids = captured["token_ids"], captured["expert_ids"]
    order = torch.argsort(expert_ids, stable=True)
    assert counts == torch.bincount(expert_ids, minlength=NUM_EXPERTS).tolist()
    assert torch.equal(up_input, caches[0][token_ids[order], expert_ids[order]])


def test_aoe_gradient_reaches_w_down_through_scores() -> None:
    layer = make_aoe()
    x = torch.randn(BATCH, SEQ, D_MODEL)
    out, aux, _ = layer(x)
    (out.sum() + aux["load_balance"]).backward()
    assert torch.count_nonzero(layer.experts.w_down.grad).item() > 0
    # An AoE layer has no router parameters.
    assert {name for name, _ in layer.named_parameters()} == {
        "experts.w_down", "experts.w_up", "experts.w_proj", "experts.w_out",
    }


def test_aoe_load_balance_uses_softmax_of_norms() -> None:
    layer = make_aoe()
    captured = capture_dispatch(layer)
    x = torch.randn(BATCH, SEQ, D_MODEL)

    _, aux, _ = layer(x)

    x_TD = x.reshape(-1, D_MODEL)
    probs = torch.softmax(torch.tensor(brute_force_norms(layer, x_TD, "l2")), dim=-1)
    f = torch.bincount(captured["expert_ids"], minlength=NUM_EXPERTS).float() / captured["expert_ids"].numel()
    expected = NUM_EXPERTS * torch.sum(f * probs.mean(dim=0))
    assert_close(aux["load_balance"].detach(), expected)
    assert "z_loss" not in aux


def make_router_moe(**overrides) -> RouterMoE:
    torch.manual_seed(0)
    config = FFNConfig(kind="moe", d_ffn=20, num_experts=NUM_EXPERTS, top_k=TOP_K, d_low=D_LOW, **overrides)
    layer = RouterMoE(D_MODEL, config)
    layer.experts.reset_parameters(std=0.3, out_std=0.3)
    return layer


def router_logits(layer: RouterMoE, x_TD: torch.Tensor) -> torch.Tensor:
    if layer.config.router == "linear":
        return x_TD @ layer.router.weight.t()
    first, _, last = layer.router
    return F.silu(x_TD @ first.weight.t()) @ last.weight.t()


@pytest.mark.parametrize("router", ["linear", "large"])
@pytest.mark.parametrize("factorized_gate", [False, True])
def test_router_moe_output_matches_formula(router: str, factorized_gate: bool) -> None:
    layer = make_router_moe(router=router, factorized_gate=factorized_gate)
    experts = layer.experts
    x = torch.randn(BATCH, SEQ, D_MODEL)

    out, aux, _ = layer(x)

    x_TD = x.reshape(-1, D_MODEL)
    logits = router_logits(layer, x_TD)
    expected = torch.zeros_like(x_TD)
    for token in range(x_TD.shape[0]):
        chosen = top_experts(logits[token].tolist(), TOP_K)
        normaliser = sum(math.exp(logits[token, expert].item()) for expert in chosen)
        for expert in chosen:
            gate = math.exp(logits[token, expert].item()) / normaliser
            xt = x_TD[token]
            w_gate = experts.w_down[expert] @ experts.w_up[expert] if factorized_gate else experts.w_gate[expert]
            hidden = F.silu(xt @ w_gate) * (xt @ experts.w_proj[expert])
            expected[token] += gate * (hidden @ experts.w_out[expert])
    assert_close(out.reshape(-1, D_MODEL), expected)
    assert_close(aux["z_loss"], losses.router_z_loss(logits))


def test_large_router_shape() -> None:
    layer = make_router_moe(router="large")
    first, _, last = layer.router
    assert first.weight.shape == (NUM_EXPERTS * D_LOW, D_MODEL)
    assert last.weight.shape == (NUM_EXPERTS, NUM_EXPERTS * D_LOW)


def test_router_logits_fp32_under_autocast() -> None:
    layer = make_router_moe().to(torch.bfloat16)
    x = torch.randn(BATCH * SEQ, D_MODEL, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, cache = layer.score(x)
    assert logits.dtype == torch.float32
    assert cache is None


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_routing_stats_counts_exact_with_padding(kind: str) -> None:
    layer = make_router_moe() if kind == "moe" else make_aoe()
    captured = capture_dispatch(layer)
    x = torch.randn(BATCH, SEQ, D_MODEL)
    token_mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    token_mask[1, 5:] = False

    _, _, stats = layer(x, token_mask)

    real = token_mask.reshape(-1).tolist()
    expected = [0] * NUM_EXPERTS
    for token, expert in zip(captured["token_ids"].tolist(), captured["expert_ids"].tolist()):
        if real[token]:
            expected[expert] += 1
    assert stats.expert_counts.dtype == torch.int64
    assert stats.expert_counts.tolist() == expected
    num_real = sum(real)
    assert sum(expected) == TOP_K * num_real
    assert stats.experts_per_token.item() == pytest.approx(TOP_K)
    assert_close(stats.load_entropy, losses.load_entropy(torch.tensor(expected)))


def test_routing_stats_mean_score_and_confidence() -> None:
    layer = make_aoe()
    x = torch.randn(BATCH, SEQ, D_MODEL)
    token_mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    token_mask[0, 7:] = False

    _, _, stats = layer(x, token_mask)

    x_real = x[token_mask]
    norms = torch.tensor(brute_force_norms(layer, x_real, "l2"))
    assert_close(stats.mean_score, norms.mean(dim=0))
    probs = torch.softmax(norms, dim=-1)
    assert_close(stats.confidence_entropy, -(probs * probs.log()).sum(dim=-1).mean())


def test_uniform_load_entropy_is_log_n() -> None:
    # Expert choice gives every expert the same number of tokens, so the load is exactly uniform.
    layer = make_aoe(selection="expert_choice", capacity_factor=2.0)
    x = torch.randn(BATCH, SEQ, D_MODEL)

    _, aux, stats = layer(x)

    capacity = math.ceil(BATCH * SEQ * 2.0 / NUM_EXPERTS)
    assert stats.expert_counts.tolist() == [capacity] * NUM_EXPERTS
    assert stats.load_entropy.item() == pytest.approx(math.log(NUM_EXPERTS), rel=1e-6)
    assert "load_balance" not in aux


def test_top_p_layer_returns_entropy_loss() -> None:
    layer = make_router_moe(selection="top_p", top_p=0.6)
    x = torch.randn(BATCH, SEQ, D_MODEL)

    _, aux, stats = layer(x)

    probs = torch.softmax(router_logits(layer, x.reshape(-1, D_MODEL)), dim=-1)
    assert_close(aux["entropy"], losses.confidence_entropy(probs))
    assert 1.0 <= stats.experts_per_token.item() <= NUM_EXPERTS


def test_build_sparse_ffn_rejects_dense() -> None:
    assert isinstance(build_sparse_ffn(D_MODEL, FFNConfig(kind="aoe", d_low=D_LOW)), AutonomyOfExperts)
    assert isinstance(build_sparse_ffn(D_MODEL, FFNConfig(kind="moe")), RouterMoE)
    with pytest.raises(ValueError, match="kind='dense'"):
        build_sparse_ffn(D_MODEL, FFNConfig(kind="dense"))
