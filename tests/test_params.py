"""Parameter counts: Eq. 5 widths, AoE/MoE parity, counts against built models, and the configs/paper_*.yaml presets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from aoe_lightning import cli
from aoe_lightning.models.config import FFNConfig, ModelConfig, aoe_d_wide
from aoe_lightning.models.params import count_parameters, expert_parameters
from aoe_lightning.models.transformer import Transformer
from aoe_lightning.params_cli import load_model_config

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def test_eq5_paper_widths() -> None:
    assert aoe_d_wide(768, 3072, 256) == 3840
    assert aoe_d_wide(1280, 5120, 400) == 6470


@pytest.mark.parametrize(
    "d_model, d_ffn, d_low, multiple",
    [(768, 3072, 256, 64), (768, 3072, 256, 7), (1280, 5120, 400, 64), (768, 3072, 100, 1), (768, 3072, 100, 128)],
)
def test_eq5_rounds_up_to_multiple(d_model: int, d_ffn: int, d_low: int, multiple: int) -> None:
    exact = (3 * d_model * d_ffn - d_low * d_model) / (d_low + 2 * d_model)
    width = aoe_d_wide(d_model, d_ffn, d_low, multiple)
    assert width % multiple == 0
    assert exact <= width < exact + multiple + 1
    assert width == math.ceil(math.ceil(exact) / multiple) * multiple


def test_eq5_rejects_oversized_d_low() -> None:
    with pytest.raises(ValueError, match="d_low=9999"):
        aoe_d_wide(16, 4, 9999)


def moe_expert_size(d_model: int, d_ffn: int) -> int:
    return 3 * d_model * d_ffn


def aoe_expert_size(d_model: int, d_low: int, d_wide: int) -> int:
    return d_model * d_low + d_low * d_wide + 2 * d_model * d_wide


def test_aoe_expert_size_matches_moe() -> None:
    d_model, d_ffn = 768, 3072
    target = moe_expert_size(d_model, d_ffn)
    for d_low in range(64, 513):
        d_wide = aoe_d_wide(d_model, d_ffn, d_low)
        size = aoe_expert_size(d_model, d_low, d_wide)
        assert size >= target, f"d_low={d_low}: rounding up must not shrink the expert"
        assert abs(size - target) / target < 0.005, f"d_low={d_low}, d_wide={d_wide}"


def paper_small(kind: str, d_low: int = 256) -> ModelConfig:
    ffn = FFNConfig(kind=kind, d_ffn=3072, num_experts=8, top_k=2, d_low=d_low)
    return ModelConfig(vocab_size=32000, n_layers=12, n_heads=12, d_model=768, ffn=ffn)


def test_aoe_model_size_matches_moe() -> None:
    moe = count_parameters(paper_small("moe"))
    for d_low in range(64, 513, 8):
        config = paper_small("aoe", d_low)
        aoe = count_parameters(config)
        assert expert_parameters(config) == aoe_expert_size(768, d_low, config.d_expert)
        for field in ("total_embedding_once", "active_embedding_twice", "non_embedding_total"):
            got, expected = getattr(aoe, field), getattr(moe, field)
            assert abs(got - expected) / expected < 0.005, f"d_low={d_low}: {field} {got} vs {expected}"


def tiny_config(kind: str, tie: bool, router: str = "linear", factorized_gate: bool = False, **ffn) -> ModelConfig:
    ffn_config = FFNConfig(
        kind=kind, d_ffn=40, num_experts=4, top_k=2, d_low=6, router=router, factorized_gate=factorized_gate, **ffn
    )
    return ModelConfig(vocab_size=50, n_layers=2, n_heads=4, d_model=32, max_seq_len=16, tie_embeddings=tie, ffn=ffn_config)


VARIANTS = {
    "dense": dict(kind="dense"),
    "moe-linear": dict(kind="moe"),
    "moe-large-router": dict(kind="moe", router="large"),
    "moe-factorized-gate": dict(kind="moe", factorized_gate=True),
    "aoe": dict(kind="aoe"),
    "aoe-explicit-width": dict(kind="aoe", d_wide=30),
    "aoe-width-multiple": dict(kind="aoe", d_wide_multiple=16),
}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_owned_count_equals_model_parameters(variant: str, tie: bool) -> None:
    config = tiny_config(tie=tie, **VARIANTS[variant])
    model = Transformer(config)
    counts = count_parameters(config)

    assert counts.owned == sum(p.numel() for p in model.parameters())
    assert counts.embedding == model.embed.weight.numel()


@pytest.mark.parametrize("variant", ["dense", "moe-linear", "moe-large-router", "moe-factorized-gate", "aoe"])
def test_active_count_from_model(variant: str) -> None:
    config = tiny_config(tie=True, **VARIANTS[variant])
    model = Transformer(config)
    counts = count_parameters(config)

    expert_params = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    other_params = sum(p.numel() for name, p in model.named_parameters() if ".experts." not in name)
    num_experts = config.ffn.num_experts if config.ffn.is_sparse else 1
    per_token = config.ffn.top_k if config.ffn.is_sparse else 1
    active = other_params + expert_params // num_experts * per_token
    assert counts.active_embedding_once == active
    assert counts.active_embedding_twice == active + config.vocab_size * config.d_model
    if config.ffn.kind == "aoe":
        w_down = model.blocks[0].ffn.experts.w_down
        assert counts.selection_overhead == config.n_layers * (4 - 2) * w_down[0].numel()
    else:
        assert counts.selection_overhead == 0


PRESETS = [
    ("paper_small_moe.yaml", 732e6, 247e6, 0.01),
    ("paper_small_aoe.yaml", 732e6, 247e6, 0.01),
    ("paper_large_moe.yaml", 4e9, 1.18e9, 0.02),
    ("paper_large_aoe.yaml", 4e9, 1.18e9, 0.02),
]


@pytest.mark.parametrize("name, total, active, tolerance", PRESETS, ids=[p[0] for p in PRESETS])
def test_paper_preset_sizes(name: str, total: float, active: float, tolerance: float) -> None:
    counts = count_parameters(load_model_config(CONFIGS_DIR / name))
    assert abs(counts.total_embedding_once - total) / total < tolerance
    assert abs(counts.active_embedding_twice - active) / active < tolerance


@pytest.mark.parametrize("name", [p[0] for p in PRESETS])
def test_params_command_prints_counts(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = CONFIGS_DIR / name
    config = load_model_config(path)
    counts = count_parameters(config)

    assert cli.main(["params", "--config", str(path)]) == 0

    out = capsys.readouterr().out
    assert f"{counts.total_embedding_once:,}" in out
    assert f"{counts.active_embedding_twice:,}" in out
    assert f"width {config.d_expert}" in out
    expected_width = {"paper_small_aoe.yaml": 3840, "paper_large_aoe.yaml": 6470}.get(name)
    if expected_width is not None:
        assert config.d_expert == expected_width


def test_params_command_reports_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.yaml"
    assert cli.main(["params", "--config", str(missing)]) == 2
    assert "absent.yaml" in capsys.readouterr().err


def test_params_command_reports_invalid_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_model: 64\n  n_heads: 4\n  ffn:\n    kind: moe\n    top_k: 9\n")
    assert cli.main(["params", "--config", str(path)]) == 2
    assert "ffn.top_k=9" in capsys.readouterr().err
