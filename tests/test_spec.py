"""Sweep spec resolution: points differ from the base only in swept fields; bad specs name every bad key."""

from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from aoe_lightning.ablation.spec import (
    SpecError,
    d_model_fraction,
    get_dotted,
    load_sweep,
    render_name,
)

from sweep_base import tiny_sweep_base

REPO = Path(__file__).resolve().parents[1]

BASE = tiny_sweep_base(d_model=48)


def flatten(config, prefix=""):
    items = {}
    for key, value in config.items():
        if isinstance(value, dict):
            items.update(flatten(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def write_spec(tmp_path, spec, base=BASE):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **spec}, sort_keys=False))
    return path


def test_points_differ_only_in_swept_fields(tmp_path):
    path = write_spec(tmp_path, {
        "overrides": {"trainer.max_steps": 3},
        "points": [
            {"name": "moe-{load_balance_coef}",
             "grid": {"model.ffn.load_balance_coef": {"aux": 0.01, "noaux": 0.0}}},
            {"name": "aoe-dlow{d_low}-{load_balance_coef}", "set": {"model.ffn.kind": "aoe"},
             "grid": {"model.ffn.d_low": {"fraction_of_d_model": ["1/3", "2/3"]},
                      "model.ffn.load_balance_coef": {"aux": 0.01, "noaux": 0.0}}},
        ],
    })
    sweep = load_sweep(path)
    names = [point.name for point in sweep.points]
    assert names == ["moe-aux", "moe-noaux", "aoe-dlow16-aux", "aoe-dlow16-noaux",
                     "aoe-dlow32-aux", "aoe-dlow32-noaux"]
    base = flatten(BASE)
    for point in sweep.points:
        resolved = flatten(point.config)
        changed = {key for key in set(base) | set(resolved) if base.get(key) != resolved.get(key)}
        allowed = set(point.fields) | {"trainer.max_steps"}
        assert changed <= allowed, point.name
        for key, value in point.fields.items():
            assert get_dotted(point.config, key) == value
        assert point.config["trainer"]["max_steps"] == 3
    assert sweep.baseline == "moe-aux"


def test_fraction_rounding_rule():
    fractions = [Fraction(1, 12), Fraction(1, 6), Fraction(1, 3), Fraction(2, 3)]
    assert [d_model_fraction(f, 768) for f in fractions] == [64, 128, 256, 512]
    # 128/12 = 10.67, 128/6 = 21.33, 128/3 = 42.67, 256/3 = 85.33: nearest integer.
    assert [d_model_fraction(f, 128) for f in fractions] == [11, 21, 43, 85]
    # Exact halves round up: 0.5 * 3 = 1.5 -> 2, 0.5 * 5 = 2.5 -> 3.
    assert d_model_fraction(Fraction(1, 2), 3) == 2
    assert d_model_fraction(Fraction(1, 2), 5) == 3
    # Decimal fractions from YAML are read exactly: 0.083 * 768 = 63.744 -> 64.
    assert d_model_fraction(Fraction("0.083"), 768) == 64


def test_seeds_become_runs_of_one_group(tmp_path):
    path = write_spec(tmp_path, {"seeds": [1, 2], "points": [{"name": "moe"}, {"name": "aoe",
                                                                               "set": {"model.ffn.kind": "aoe", "model.ffn.d_low": 16}}]})
    sweep = load_sweep(path)
    assert [p.name for p in sweep.points] == ["moe-s1", "moe-s2", "aoe-s1", "aoe-s2"]
    assert [p.group for p in sweep.points] == ["moe", "moe", "aoe", "aoe"]
    assert [p.config["seed_everything"] for p in sweep.points] == [1, 2, 1, 2]
    assert sweep.groups() == ["moe", "aoe"]
    assert len({p.config_hash for p in sweep.points}) == 4


def test_single_seed_keeps_plain_names(tmp_path):
    sweep = load_sweep(write_spec(tmp_path, {"seeds": [5], "points": [{"name": "moe"}]}))
    assert sweep.points[0].name == "moe"
    assert sweep.points[0].config["seed_everything"] == 5


def test_top_level_grid_shorthand(tmp_path):
    sweep = load_sweep(write_spec(tmp_path, {"name": "k{top_k}", "grid": {"model.ffn.top_k": [1, 2]}}))
    assert [p.name for p in sweep.points] == ["k1", "k2"]


def test_bad_spec_lists_every_problem(tmp_path):
    path = write_spec(tmp_path, {
        "colour": "blue",
        "points": [
            {"name": "a", "grid": {"model.ffn.d_lowest": [1, 2]}},
            {"name": "b", "set": {"model.ffn.top_k": 9}},
            {"name": "c", "set": {"model.optimizer.weight_decay": -1.0}},
            {"name": "d", "set": {"run_dir": "x"}},
        ],
    })
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    message = str(info.value)
    assert "'colour'" in message
    assert "'model.ffn.d_lowest'" in message
    assert "top_k=9" in message
    assert "point 'b'" in message
    assert "optimizer.weight_decay=-1.0" in message
    assert "point 'c'" in message
    assert "'run_dir' is set by the runner" in message
    assert len(info.value.problems) == 5


def test_misspelt_key_gets_suggestion(tmp_path):
    path = write_spec(tmp_path, {"points": [{"name": "a", "set": {"trainer.max_step": 10}},
                                            {"name": "b", "set": {"model.ffn.zzz": 1}}]})
    with pytest.raises(SpecError) as info:
        load_sweep(path)
    first, second = info.value.problems
    assert "did you mean 'trainer.max_steps'?" in first
    assert "did you mean" not in second
    assert "(valid: " in second


def test_unknown_placeholder_is_named(tmp_path):
    path = write_spec(tmp_path, {"points": [{"name": "moe-{d_low}", "grid": {"model.ffn.top_k": [1, 2]}}]})
    with pytest.raises(SpecError, match=r"\{d_low\}"):
        load_sweep(path)


def test_duplicate_names_rejected(tmp_path):
    path = write_spec(tmp_path, {"points": [{"name": "same", "grid": {"model.ffn.top_k": [1, 2]}}]})
    with pytest.raises(SpecError, match="more than once"):
        load_sweep(path)


def test_unknown_baseline_rejected(tmp_path):
    path = write_spec(tmp_path, {"baseline": "nope", "points": [{"name": "moe"}]})
    with pytest.raises(SpecError, match="baseline 'nope'"):
        load_sweep(path)


def test_known_field_absent_from_base_is_allowed(tmp_path):
    sweep = load_sweep(write_spec(tmp_path, {"points": [{"name": "fact",
                                                         "set": {"model.ffn.factorized_gate": True,
                                                                 "model.ffn.d_low": 16}}]}))
    assert sweep.points[0].config["model"]["ffn"]["factorized_gate"] is True


def test_render_name_dotted_and_leaf():
    labels = {"model.ffn.d_low": "64", "model.ffn.load_balance_coef": "aux"}
    assert render_name("aoe-{d_low}-{model.ffn.load_balance_coef}", labels) == "aoe-64-aux"
    with pytest.raises(KeyError):
        render_name("{top_k}", labels)


@pytest.mark.parametrize("stem, count", [("rank", 10), ("topk", 6), ("paper_table2", 12),
                                         ("paper_table3", 4), ("smoke", 3), ("rank_cpu", 10)])
def test_shipped_specs_resolve(stem, count):
    sweep = load_sweep(REPO / "ablations" / f"{stem}.yaml", repo_root=REPO)
    assert len(sweep.points) == count
    assert sweep.eval.suite is not None and Path(sweep.eval.suite).is_file()


def test_rank_spec_d_low_values():
    sweep = load_sweep(REPO / "ablations" / "rank.yaml", repo_root=REPO)
    d_lows = sorted({p.fields["model.ffn.d_low"] for p in sweep.points if "model.ffn.d_low" in p.fields})
    assert d_lows == [64, 128, 256, 512]
    assert {p.name for p in sweep.points} >= {"moe-aux", "moe-noaux", "aoe-dlow128-aux", "aoe-dlow512-noaux"}
