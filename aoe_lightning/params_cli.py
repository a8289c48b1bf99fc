"""``aoe params``: parameter counts of a model config, without building the model."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from aoe_lightning.models.config import ModelConfig
from aoe_lightning.models.params import format_parameter_table

MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}


def load_model_config(path: str | Path) -> ModelConfig:
    """Read the ``model:`` section of an ``aoe fit`` config (or a bare model config) into a ``ModelConfig``.

    Keys of the ``model:`` section that configure training rather than the architecture (the optimizer,
    activation checkpointing) are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"config file {str(path)!r} must be a YAML mapping, got {type(document).__name__}")
    section = document.get("model", document)
    if isinstance(section, dict) and "init_args" in section:
        section = section["init_args"]
    if not isinstance(section, dict):
        raise ValueError(f"config file {str(path)!r}: 'model' must be a mapping of model fields")
    return ModelConfig.from_dict({key: value for key, value in section.items() if key in MODEL_KEYS})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aoe params", description=__doc__)
    parser.add_argument("--config", required=True, nargs="+", help="aoe fit config(s) or bare model config(s), YAML")
    args = parser.parse_args(argv)
    for index, path in enumerate(args.config):
        try:
            config = load_model_config(path)
        except (OSError, ValueError) as exc:
            print(f"aoe params: {exc}", file=sys.stderr)
            return 2
        if index:
            print()
        print(f"{path}: {config.n_layers} layers, d_model {config.d_model}, vocab {config.vocab_size}")
        print(format_parameter_table(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
