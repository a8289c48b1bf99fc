"""Sweep specs: a base ``aoe fit`` config plus the fields under study, resolved into one full config per point.

A spec file (see ``ablations/*.yaml``)::

    description: AoE d_low sweep against the router MoE   # free text, shown in the report
    base: ../configs/paper_small_aoe.yaml    # relative to the spec, else the repository, else the working directory
    baseline: moe-aux                        # point that the report compares against (default: the first)
    overrides:                               # dotted keys applied to every point
      trainer.max_steps: 2000
    seeds: [1, 2, 3]                         # optional: one run per seed (sets seed_everything)
    points:
      - name: moe-{load_balance_coef}        # name template: {leaf} or {dotted.key} of any field set below
        set: {model.ffn.kind: moe}           # fields shared by this entry
        grid:                                # optional: cartesian product of axes
          model.ffn.load_balance_coef: {aux: 0.01, noaux: 0.0}   # label -> value
      - name: aoe-dlow{d_low}-{load_balance_coef}
        grid:
          model.ffn.d_low: {fraction_of_d_model: [1/12, 1/6, 1/3, 2/3]}
          model.ffn.load_balance_coef: {aux: 0.01, noaux: 0.0}
    eval:
      suite: ../evals/core.yaml              # relative like ``base``
      limit: 500                             # items per task (null: all)
      batch_size: 16
      data_dir: null                         # local eval data (relative to the working directory);
                                             # default: $AOE_EVAL_DATA (see data_dir_env)
      heldout_max_chars: 200000              # size of the held-out text scored when no eval data is given
      enabled: true                          # false (or `eval: false`) trains and exports only

A top-level ``grid`` (with ``name`` and ``set``) is shorthand for a one-entry ``points`` list.

Axis values are a list (the label is the value itself), a mapping ``label: value``, or
``{fraction_of_d_model: [...]}`` for integer sizes given as fractions of the point's ``model.d_model``.
Fractions may be numbers or ``"a/b"`` strings. The size is the fraction times d_model rounded to the nearest
integer, with exact halves rounded up, so ``1/12, 1/6, 1/3, 2/3`` give 64, 128, 256, 512 at d_model 768.

Every resolved point differs from the base only in the overrides and its own fields. Names must be unique.
With more than one seed, ``-s<seed>`` is appended to each run's name, and the report groups runs by the name
without it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import itertools
import json
import math
import re
from copy import deepcopy
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

TOP_LEVEL_KEYS = ("description", "base", "baseline", "overrides", "seeds", "points", "grid", "name", "set", "eval")
ENTRY_KEYS = ("name", "set", "grid")
EVAL_KEYS = ("enabled", "suite", "limit", "batch_size", "data_dir", "data_dir_env", "heldout_max_chars")
DEFAULT_EVAL_DATA_ENV = "AOE_EVAL_DATA"
DEFAULT_HELDOUT_MAX_CHARS = 200_000
FRACTION_KEY = "fraction_of_d_model"

# Arguments of `aoe fit` that the runner sets per point; a spec may not sweep them.
RUNNER_KEYS = ("run_dir", "run_name", "tensorboard_dir", "ckpt_path", "overwrite", "config")
# Top-level `aoe fit` arguments a spec may set, besides the model/data/trainer sections.
FIT_TOP_LEVEL_KEYS = ("seed_everything", "checkpoint_every_n_steps", "keep_checkpoints", "fsdp", "sharded_checkpoint")
# LanguageModelModule arguments that are not ModelConfig fields.
MODULE_EXTRA_KEYS = ("optimizer", "activation_checkpointing", "log_expert_scalars")
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_.]+)\}")


class SpecError(ValueError):
    """A sweep spec is invalid; the message lists every problem."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"invalid sweep spec {str(path)!r}:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class EvalSettings:
    """How every point of a suite is scored after training."""

    enabled: bool = True
    suite: str | None = None           # absolute path of the eval suite YAML
    limit: int | None = None           # items per task; None scores all
    batch_size: int = 16
    data_dir: str | None = None        # local eval data folder from the spec (the runner may override it)
    data_dir_env: str = DEFAULT_EVAL_DATA_ENV
    heldout_max_chars: int = DEFAULT_HELDOUT_MAX_CHARS   # size cap of the held-out text for perplexity


@dataclass(frozen=True)
class Point:
    """One resolved run of a sweep."""

    name: str                          # run name, unique within the suite
    group: str                         # name without the seed suffix; runs of one group are seeds of one point
    seed: int | None                   # seed_everything of this run, when the spec sweeps seeds
    fields: dict[str, Any]             # dotted key -> value, everything that differs from the base config
    labels: dict[str, str]             # dotted key -> label used in the name
    config: dict[str, Any]             # the full `aoe fit` config

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


@dataclass
class Sweep:
    """A resolved sweep spec."""

    path: Path
    stem: str
    description: str
    base_path: Path
    base_config: dict[str, Any]
    points: list[Point]
    baseline: str                      # group name of the baseline point
    eval: EvalSettings
    overrides: dict[str, Any] = field(default_factory=dict)

    def groups(self) -> list[str]:
        """Point groups in spec order."""
        return list(dict.fromkeys(point.group for point in self.points))

    def select(self, names: list[str]) -> list[Point]:
        """Return the points whose run or group name is in ``names``; ValueError names unknown ones."""
        known = {point.name for point in self.points} | {point.group for point in self.points}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise ValueError(f"--only names unknown points {unknown}; known: {sorted(known)}")
        return [point for point in self.points if point.name in names or point.group in names]


def config_hash(config: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """Return a 12-hex-digit SHA-256 of a config (and optional extra settings), independent of key order."""
    payload = json.dumps({"config": config, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


def d_model_fraction(fraction: Fraction, d_model: int) -> int:
    """Round ``fraction * d_model`` to the nearest integer, exact halves up."""
    return math.floor(fraction * d_model + Fraction(1, 2))


def get_dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def has_dotted(config: dict[str, Any], key: str) -> bool:
    try:
        get_dotted(config, key)
    except KeyError:
        return False
    return True


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def load_sweep(path: str | Path, repo_root: str | Path | None = None) -> Sweep:
    """Read, resolve and validate a sweep spec; SpecError lists every problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {str(path)!r} does not exist; see ablations/ for examples")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise SpecError(path, [f"the spec must be a mapping of keys ({', '.join(TOP_LEVEL_KEYS)}), got {type(raw).__name__}"])
    return resolve_sweep(raw, path, repo_root)


def resolve_sweep(raw: dict[str, Any], path: Path, repo_root: str | Path | None = None) -> Sweep:
    """Resolve a parsed spec (``path`` locates relative files); SpecError lists every problem."""
    problems: list[str] = []
    problems += [f"unknown top-level key {key!r} (valid keys: {', '.join(TOP_LEVEL_KEYS)})"
                 for key in raw if key not in TOP_LEVEL_KEYS]

    base_path = None
    base_config: dict[str, Any] = {}
    if not isinstance(raw.get("base"), str):
        problems.append(f"'base' must be the path of an `aoe fit` config, got {raw.get('base')!r}")
    else:
        base_path = locate_file(raw["base"], path, repo_root)
        if base_path is None:
            problems.append(f"base config {raw['base']!r} not found next to the spec, in the repository or in the "
                            "working directory")
        else:
            base_config = yaml.safe_load(base_path.read_text(encoding="utf-8")) or {}
            if not isinstance(base_config, dict):
                problems.append(f"base config {str(base_path)!r} is not a mapping")
                base_config = {}
    if problems and not base_config:
        raise SpecError(path, problems)

    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        problems.append(f"'overrides' must be a mapping of dotted keys to values, got {overrides!r}")
        overrides = {}
    problems += [f"overrides: {problem}" for key in overrides for problem in key_problems(key, base_config)]

    seeds = raw.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        problems.append(f"'seeds' must be a non-empty list of integers, got {seeds!r}")
        seeds = None
    elif seeds is not None and len(set(seeds)) != len(seeds):
        problems.append(f"'seeds' lists a seed twice: {seeds}")

    entries = _entries(raw, problems)
    evaluation = _eval_settings(raw.get("eval"), path, repo_root, problems)

    points: list[Point] = []
    for number, entry in enumerate(entries):
        points += _resolve_entry(entry, number, base_config, overrides, seeds, problems)

    names = [point.name for point in points]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"point names {duplicates} occur more than once; make the name templates include every "
                        "field that differs")
    for point in points:
        problems += [f"point {point.name!r}: {problem}" for problem in validate_fit_config(point.config)]

    groups = list(dict.fromkeys(point.group for point in points))
    baseline = raw.get("baseline")
    if baseline is None:
        baseline = groups[0] if groups else ""
    elif baseline not in groups:
        problems.append(f"baseline {baseline!r} is not a point name; points: {groups}")
    if not points and not any("points" in p or "grid" in p for p in problems):
        problems.append("the spec defines no points; add 'points' or 'grid'")
    if problems:
        raise SpecError(path, problems)
    return Sweep(path=path, stem=path.stem, description=str(raw.get("description") or ""),
                 base_path=base_path, base_config=base_config, points=points, baseline=baseline,
                 eval=evaluation, overrides=dict(overrides))


def locate_file(value: str, spec_path: Path, repo_root: str | Path | None) -> Path | None:
    """Find a path given in a spec: absolute, next to the spec, under ``repo_root``, or in the working directory."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    roots = [spec_path.parent] + ([Path(repo_root)] if repo_root else []) + [Path.cwd()]
    for root in roots:
        if (root / candidate).is_file():
            return (root / candidate).resolve()
    return None


def _entries(raw: dict[str, Any], problems: list[str]) -> list[dict[str, Any]]:
    shorthand = {key: raw[key] for key in ("grid", "name", "set") if key in raw}
    points = raw.get("points")
    if points is not None and shorthand:
        problems.append(f"use either 'points' or a top-level {sorted(shorthand)}, not both")
        return []
    if points is None:
        return [shorthand] if shorthand else []
    if not isinstance(points, list):
        problems.append(f"'points' must be a list of entries with name/set/grid, got {type(points).__name__}")
        return []
    entries = []
    for number, entry in enumerate(points):
        if not isinstance(entry, dict):
            problems.append(f"points[{number}] must be a mapping with keys {ENTRY_KEYS}, got {entry!r}")
            continue
        unknown = [key for key in entry if key not in ENTRY_KEYS]
        if unknown:
            problems.append(f"points[{number}]: unknown keys {unknown} (valid keys: {', '.join(ENTRY_KEYS)})")
        entries.append(entry)
    return entries


def _resolve_entry(entry: dict[str, Any], number: int, base: dict[str, Any], overrides: dict[str, Any],
                   seeds: list[int] | None, problems: list[str]) -> list[Point]:
    where = f"points[{number}]"
    fixed = entry.get("set") or {}
    grid = entry.get("grid") or {}
    template = entry.get("name")
    if not isinstance(fixed, dict) or not isinstance(grid, dict):
        problems.append(f"{where}: 'set' and 'grid' must be mappings of dotted keys")
        return []
    if not isinstance(template, str) or not template:
        problems.append(f"{where}: 'name' must be a non-empty name or template such as 'aoe-dlow{{d_low}}'")
        return []
    bad_keys = False
    for key in list(fixed) + list(grid):
        key_errors = key_problems(key, base)
        problems += [f"{where}: {problem}" for problem in key_errors]
        bad_keys = bad_keys or bool(key_errors)
    if bad_keys:
        return []

    axes: list[tuple[str, list[tuple[str, Any]]]] = []
    for key, values in grid.items():
        options = _axis_options(key, values, where, problems)
        if options is None:
            return []
        axes.append((key, options))

    points = []
    for combination in itertools.product(*(options for _, options in axes)):
        config = deepcopy(base)
        fields: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for key, value in list(overrides.items()) + list(fixed.items()):
            set_dotted(config, key, deepcopy(value))
        for key, value in fixed.items():
            fields[key] = value
            labels[key] = format_label(value)
        for (key, _), (label, value) in zip(axes, combination):
            if isinstance(value, _Fraction):
                d_model = get_dotted(config, "model.d_model") if has_dotted(config, "model.d_model") else None
                if not isinstance(d_model, int):
                    problems.append(f"{where}: {key} uses {FRACTION_KEY} but the config has no integer model.d_model")
                    return []
                value = d_model_fraction(value.fraction, d_model)
                label = str(value)
            set_dotted(config, key, value)
            fields[key] = value
            labels[key] = label
        try:
            group = render_name(template, labels)
        except KeyError as err:
            problems.append(f"{where}: name template {template!r} uses {{{err.args[0]}}}, which is not a field "
                            f"of this entry; available: {sorted(_placeholders(labels))}")
            return []
        for seed in seeds or [None]:
            run_config = deepcopy(config)
            run_fields = dict(fields)
            if seed is not None:
                run_config["seed_everything"] = seed
                run_fields["seed_everything"] = seed
            name = group if seed is None or len(seeds) == 1 else f"{group}-s{seed}"
            points.append(Point(name=name, group=group, seed=seed, fields=run_fields, labels=labels,
                                config=run_config))
    return points


@dataclass(frozen=True)
class _Fraction:
    fraction: Fraction


def _axis_options(key: str, values: Any, where: str, problems: list[str]) -> list[tuple[str, Any]] | None:
    """Return (label, value) pairs of one axis, or None after recording a problem."""
    if isinstance(values, list) and values:
        return [(format_label(value), value) for value in values]
    if isinstance(values, dict) and set(values) == {FRACTION_KEY}:
        fractions = values[FRACTION_KEY]
        if not isinstance(fractions, list) or not fractions:
            problems.append(f"{where}: grid {key}: {FRACTION_KEY} must be a non-empty list, got {fractions!r}")
            return None
        options = []
        for item in fractions:
            try:
                fraction = Fraction(str(item))
            except (ValueError, ZeroDivisionError):
                problems.append(f"{where}: grid {key}: {FRACTION_KEY} value {item!r} is not a number or 'a/b'")
                return None
            if not 0 < fraction:
                problems.append(f"{where}: grid {key}: {FRACTION_KEY} value {item!r} must be > 0")
                return None
            options.append((str(item), _Fraction(fraction)))
        return options
    if isinstance(values, dict) and values:
        return [(str(label), value) for label, value in values.items()]
    problems.append(f"{where}: grid {key} must be a non-empty list, a mapping label -> value, or "
                    f"{{{FRACTION_KEY}: [...]}}, got {values!r}")
    return None


def format_label(value: Any) -> str:
    """Short text of a value for run names: 0.01 -> '0.01', True -> 'true'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _placeholders(labels: dict[str, str]) -> dict[str, str]:
    names = dict(labels)
    leaves: dict[str, list[str]] = {}
    for key in labels:
        leaves.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    for leaf, keys in leaves.items():
        if len(keys) == 1:
            names.setdefault(leaf, labels[keys[0]])
    return names


def render_name(template: str, labels: dict[str, str]) -> str:
    """Fill ``{leaf}`` / ``{dotted.key}`` placeholders with field labels; KeyError names an unknown placeholder."""
    names = _placeholders(labels)

    def substitute(match: re.Match) -> str:
        if match.group(1) not in names:
            raise KeyError(match.group(1))
        return names[match.group(1)]

    return _PLACEHOLDER.sub(substitute, template)


# ---------------------------------------------------------------------------------------------
# Key and value validation


def _section_fields() -> dict[str, tuple[str, ...]]:
    """Settable leaf names per config section, from the classes that consume them."""
    from aoe_lightning.models.config import FFNConfig, ModelConfig
    from aoe_lightning.training.optim import OptimizerConfig

    model = tuple(f.name for f in dataclasses.fields(ModelConfig)) + MODULE_EXTRA_KEYS
    sections = {
        "model": model,
        "model.ffn": tuple(f.name for f in dataclasses.fields(FFNConfig)),
        "model.optimizer": tuple(f.name for f in dataclasses.fields(OptimizerConfig)),
        "": FIT_TOP_LEVEL_KEYS + ("model", "data", "trainer"),
    }
    sections["data"] = _signature_names("aoe_lightning.data.datamodule", "TokenShardDataModule")
    sections["trainer"] = _signature_names("lightning.pytorch", "Trainer")
    return sections


def _signature_names(module: str, name: str) -> tuple[str, ...]:
    import importlib

    cls = getattr(importlib.import_module(module), name)
    return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")


_SECTIONS: dict[str, tuple[str, ...]] | None = None


def key_problems(key: Any, base: dict[str, Any]) -> list[str]:
    """List why a dotted key cannot be set: runner-owned, or neither in the base config nor a known field."""
    global _SECTIONS
    if not isinstance(key, str) or not key:
        return [f"key {key!r} must be a dotted config key such as 'model.ffn.d_low'"]
    if key.split(".")[0] in RUNNER_KEYS:
        return [f"{key!r} is set by the runner for each point and cannot be swept"]
    if has_dotted(base, key):
        return []
    parent, _, leaf = key.rpartition(".")
    if _SECTIONS is None:
        _SECTIONS = _section_fields()
    known = _SECTIONS.get(parent)
    if known is None:
        return [f"key {key!r} does not exist in the base config and {parent!r} is not a config section "
                f"with known fields ({', '.join(s or '<top level>' for s in _SECTIONS)})"]
    if leaf not in known:
        close = difflib.get_close_matches(leaf, known, n=1)
        if close:
            suggestion = f"{parent}.{close[0]}" if parent else close[0]
            return [f"key {key!r} does not exist in the base config and {leaf!r} is not a field of "
                    f"{parent or 'the top level'}; did you mean {suggestion!r}?"]
        return [f"key {key!r} does not exist in the base config and {leaf!r} is not a field of "
                f"{parent or 'the top level'} (valid: {', '.join(sorted(known))})"]
    return []


def validate_fit_config(config: dict[str, Any]) -> list[str]:
    """List every problem of a resolved point's model and optimizer settings."""
    from aoe_lightning.models.config import ModelConfig
    from aoe_lightning.training.optim import OptimizerConfig

    model = config.get("model")
    if not isinstance(model, dict):
        return [f"'model' must be a mapping, got {model!r}"]
    model_values = {key: value for key, value in model.items() if key not in MODULE_EXTRA_KEYS}
    problems = []
    try:
        ModelConfig.from_dict(model_values)
    except (ValueError, TypeError) as err:
        problems.append(str(err))
    optimizer = model.get("optimizer") or {}
    try:
        problems += [f"invalid optimizer config: {e}" for e in OptimizerConfig(**optimizer).validation_errors()]
    except TypeError as err:
        problems.append(f"invalid optimizer config: {err}")
    seed = config.get("seed_everything")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        problems.append(f"seed_everything={seed!r} must be an integer")
    return problems


def _eval_settings(raw: Any, spec_path: Path, repo_root: str | Path | None, problems: list[str]) -> EvalSettings:
    if raw is None or raw is False:
        return EvalSettings(enabled=raw is None)
    if not isinstance(raw, dict):
        problems.append(f"'eval' must be a mapping with keys {EVAL_KEYS}, got {raw!r}")
        return EvalSettings()
    problems += [f"eval: unknown key {key!r} (valid keys: {', '.join(EVAL_KEYS)})" for key in raw if key not in EVAL_KEYS]
    suite = raw.get("suite")
    suite_path = None
    if suite is not None:
        located = locate_file(str(suite), spec_path, repo_root)
        if located is None:
            problems.append(f"eval.suite {suite!r} not found next to the spec, in the repository or in the "
                            "working directory")
        else:
            suite_path = str(located)
    limit = raw.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        problems.append(f"eval.limit={limit!r} must be a positive integer or null")
    batch_size = raw.get("batch_size", 16)
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"eval.batch_size={batch_size!r} must be a positive integer")
        batch_size = 16
    max_chars = raw.get("heldout_max_chars", DEFAULT_HELDOUT_MAX_CHARS)
    if not isinstance(max_chars, int) or max_chars < 1:
        problems.append(f"eval.heldout_max_chars={max_chars!r} must be a positive integer")
        max_chars = DEFAULT_HELDOUT_MAX_CHARS
    data_dir = raw.get("data_dir")
    if data_dir is not None:
        data_dir = str(Path(data_dir).expanduser() if Path(data_dir).is_absolute() else Path(data_dir))
    return EvalSettings(enabled=bool(raw.get("enabled", True)), suite=suite_path,
                        limit=limit if isinstance(limit, int) else None, batch_size=batch_size, data_dir=data_dir,
                        data_dir_env=str(raw.get("data_dir_env") or DEFAULT_EVAL_DATA_ENV),
                        heldout_max_chars=max_chars)
