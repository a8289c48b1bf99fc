"""Config validation: every check names its field, and one error lists every bad field."""

from __future__ import annotations

import re

import pytest

from aoe_lightning.models.config import FFNConfig, ModelConfig, aoe_d_wide

BASE_MODEL = dict(vocab_size=100, n_layers=2, n_heads=4, d_model=64, max_seq_len=32)
BASE_FFN = dict(kind="moe", d_ffn=64, num_experts=4, top_k=2, d_low=16)

# (case id, model overrides, ffn overrides, expected fragment of the error message)
INVALID = [
    ("vocab_size", dict(vocab_size=0), {}, "vocab_size=0 must be >= 1"),
    ("n_layers", dict(n_layers=0), {}, "n_layers=0 must be >= 1"),
    ("n_heads", dict(n_heads=0), {}, "n_heads=0 must be >= 1"),
    ("d_model", dict(d_model=0), {}, "d_model=0 must be >= 1"),
    ("max_seq_len", dict(max_seq_len=-1), {}, "max_seq_len=-1 must be >= 1"),
    ("heads-divide-d_model", dict(d_model=66), {}, "d_model=66 must be divisible by n_heads=4"),
    ("odd-head-size", dict(d_model=60), {}, "head size d_model/n_heads=15 must be even for RoPE"),
    ("rope_theta", dict(rope_theta=0.0), {}, "rope_theta=0.0 must be > 0"),
    ("norm_eps", dict(norm_eps=-1e-5), {}, "norm_eps=-1e-05 must be > 0"),
    ("init_std", dict(init_std=0), {}, "init_std=0 must be > 0"),
    ("type-int", dict(d_model="64"), {}, "d_model='64' must be of type int"),
    ("type-int-not-float", dict(n_layers=2.0), {}, "n_layers=2.0 must be of type int"),
    ("type-int-not-bool", dict(n_heads=True), {}, "n_heads=True must be of type int"),
    ("type-bool", dict(tie_embeddings="yes"), {}, "tie_embeddings='yes' must be of type bool"),
    ("type-float", dict(rope_theta="1e4"), {}, "rope_theta='1e4' must be of type int or float"),
    ("unknown-key", dict(dropout=0.1), {}, "unknown key 'dropout'"),
    ("ffn-unknown-key", {}, dict(experts=8), "unknown key 'ffn.experts'"),
    ("ffn-kind", {}, dict(kind="sparse"), "ffn.kind='sparse' must be one of ('dense', 'moe', 'aoe')"),
    ("ffn-d_ffn", {}, dict(d_ffn=0), "ffn.d_ffn=0 must be >= 1"),
    ("ffn-num_experts", {}, dict(num_experts=0), "ffn.num_experts=0 must be >= 1"),
    ("ffn-top_k-too-large", {}, dict(top_k=5), "ffn.top_k=5 must be in [1, num_experts=4]"),
    ("ffn-top_k-zero", {}, dict(top_k=0), "ffn.top_k=0 must be in [1, num_experts=4]"),
    ("ffn-d_low", {}, dict(d_low=0), "ffn.d_low=0 must be >= 1"),
    ("ffn-d_low-not-low-rank", {}, dict(kind="aoe", d_low=64), "ffn.d_low=64 must be < d_model=64"),
    ("ffn-d_low-factorized-moe", {}, dict(factorized_gate=True, d_low=80), "ffn.d_low=80 must be < d_model=64"),
    ("ffn-d_wide", {}, dict(kind="aoe", d_wide=0), "ffn.d_wide=0 must be >= 1"),
    ("ffn-d_wide_multiple", {}, dict(d_wide_multiple=0), "ffn.d_wide_multiple=0 must be >= 1"),
    ("ffn-selection", {}, dict(selection="random"), "ffn.selection='random' must be one of"),
    ("ffn-top_p-zero", {}, dict(top_p=0.0), "ffn.top_p=0.0 must be in (0, 1]"),
    ("ffn-top_p-above-one", {}, dict(top_p=1.5), "ffn.top_p=1.5 must be in (0, 1]"),
    ("ffn-capacity-zero", {}, dict(capacity_factor=0.0), "ffn.capacity_factor=0.0 must be > 0"),
    (
        "ffn-capacity-above-experts",
        {},
        dict(selection="expert_choice", capacity_factor=5.0),
        "ffn.capacity_factor=5.0 must be in (0, num_experts=4]",
    ),
    ("ffn-gate_norm", {}, dict(gate_norm="softmax"), "ffn.gate_norm='softmax' must be one of"),
    ("ffn-score_norm", {}, dict(kind="aoe", score_norm="l3"), "ffn.score_norm='l3' must be one of"),
    ("ffn-router", {}, dict(router="mlp"), "ffn.router='mlp' must be one of"),
    ("ffn-aoe-large-router", {}, dict(kind="aoe", router="large"), "ffn.router='large' is a router-MoE option"),
    ("ffn-aoe-factorized-gate", {}, dict(kind="aoe", factorized_gate=True), "ffn.factorized_gate=True is a router-MoE option"),
    ("ffn-dense-factorized-gate", {}, dict(kind="dense", factorized_gate=True), "ffn.factorized_gate=True"),
    ("ffn-load_balance_coef", {}, dict(load_balance_coef=-0.01), "ffn.load_balance_coef=-0.01 must be >= 0"),
    ("ffn-z_loss_coef", {}, dict(z_loss_coef=-1.0), "ffn.z_loss_coef=-1.0 must be >= 0"),
    ("ffn-entropy_coef", {}, dict(entropy_coef=-1e-4), "ffn.entropy_coef=-0.0001 must be >= 0"),
    ("ffn-aoe-z-loss", {}, dict(kind="aoe", z_loss_coef=0.001), "ffn.z_loss_coef=0.001 needs router logits"),
    ("ffn-type-int", {}, dict(d_ffn="3072"), "ffn.d_ffn='3072' must be of type int"),
    ("ffn-type-optional-int", {}, dict(d_wide=3.5), "ffn.d_wide=3.5 must be of type int"),
    ("ffn-type-float", {}, dict(top_p="0.6"), "ffn.top_p='0.6' must be of type int or float"),
    ("ffn-type-bool", {}, dict(factorized_gate=1), "ffn.factorized_gate=1 must be of type bool"),
    ("ffn-type-str", {}, dict(kind=3), "ffn.kind=3 must be of type str"),
]


def test_base_config_is_valid() -> None:
    config = ModelConfig.from_dict({**BASE_MODEL, "ffn": BASE_FFN})
    assert config.validation_errors() == []
    assert config.head_dim == 16


@pytest.mark.parametrize("model, ffn, fragment", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_from_dict_names_invalid_field(model: dict, ffn: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as error:
        ModelConfig.from_dict({**BASE_MODEL, **model, "ffn": {**BASE_FFN, **ffn}})
    message = str(error.value)
    assert message.startswith("invalid model config: ")
    assert fragment in message
    assert "ffn.ffn." not in message


@pytest.mark.parametrize(
    "model, ffn, fragment",
    [case[1:] for case in INVALID if "unknown" not in case[0]],
    ids=[case[0] for case in INVALID if "unknown" not in case[0]],
)
def test_constructor_rejects_invalid_field(model: dict, ffn: dict, fragment: str) -> None:
    # FFNConfig validates itself without d_model (so without the "ffn." prefix); ModelConfig adds both.
    with pytest.raises(ValueError, match=re.escape(fragment.removeprefix("ffn."))):
        ModelConfig(**{**BASE_MODEL, **model}, ffn={**BASE_FFN, **ffn})


def test_one_error_lists_every_bad_field() -> None:
    values = {
        **BASE_MODEL,
        "d_model": 66,
        "rope_theta": 0.0,
        "ffn": {**BASE_FFN, "top_k": 9, "gate_norm": "max", "load_balance_coef": -1.0},
    }
    with pytest.raises(ValueError) as error:
        ModelConfig.from_dict(values)
    message = str(error.value)
    for fragment in (
        "d_model=66 must be divisible by n_heads=4",
        "rope_theta=0.0 must be > 0",
        "ffn.top_k=9 must be in [1, num_experts=4]",
        "ffn.gate_norm='max' must be one of",
        "ffn.load_balance_coef=-1.0 must be >= 0",
    ):
        assert fragment in message


def test_type_errors_listed_with_ffn_errors() -> None:
    with pytest.raises(ValueError) as error:
        ModelConfig.from_dict({**BASE_MODEL, "d_model": "64", "ffn": {**BASE_FFN, "top_k": 9}})
    message = str(error.value)
    assert "d_model='64' must be of type int" in message
    assert "ffn.top_k=9 must be in [1, num_experts=4]" in message


def test_every_unknown_key_listed() -> None:
    with pytest.raises(ValueError) as error:
        ModelConfig.from_dict({**BASE_MODEL, "dropout": 0.1, "layers": 3, "ffn": {**BASE_FFN, "experts": 8}})
    message = str(error.value)
    for key in ("'dropout'", "'layers'", "'ffn.experts'"):
        assert f"unknown key {key}" in message


def test_ffn_must_be_mapping() -> None:
    with pytest.raises(ValueError, match="ffn='moe' must be a mapping"):
        ModelConfig.from_dict({**BASE_MODEL, "ffn": "moe"})


def test_ffn_config_error_has_no_prefix() -> None:
    with pytest.raises(ValueError, match=re.escape("invalid FFN config: top_k=9 must be in [1, num_experts=8]")):
        FFNConfig(top_k=9)


def test_to_dict_round_trip() -> None:
    config = ModelConfig.from_dict(
        {**BASE_MODEL, "tie_embeddings": False, "ffn": {**BASE_FFN, "kind": "aoe", "d_wide_multiple": 8}}
    )
    values = config.to_dict()
    assert isinstance(values["ffn"], dict)
    assert ModelConfig.from_dict(values) == config


def test_ffn_dict_becomes_ffn_config() -> None:
    config = ModelConfig(**BASE_MODEL, ffn=dict(BASE_FFN))
    assert isinstance(config.ffn, FFNConfig)
    assert config.ffn.num_experts == 4


def test_expert_width_per_kind() -> None:
    assert ModelConfig(**BASE_MODEL, ffn=FFNConfig(kind="dense", d_ffn=96)).d_expert == 96
    assert ModelConfig(**BASE_MODEL, ffn=FFNConfig(**BASE_FFN)).d_expert == 64
    aoe = ModelConfig(**BASE_MODEL, ffn=FFNConfig(**{**BASE_FFN, "kind": "aoe"}))
    assert aoe.d_expert == aoe_d_wide(64, 64, 16)
    explicit = ModelConfig(**BASE_MODEL, ffn=FFNConfig(**{**BASE_FFN, "kind": "aoe", "d_wide": 77}))
    assert explicit.d_expert == 77
    factorized = ModelConfig(**BASE_MODEL, ffn=FFNConfig(**{**BASE_FFN, "factorized_gate": True, "d_wide_multiple": 32}))
    assert factorized.d_expert == aoe_d_wide(64, 64, 16, 32)
    assert FFNConfig(kind="aoe").is_factorized
    assert not FFNConfig(kind="moe").is_factorized
