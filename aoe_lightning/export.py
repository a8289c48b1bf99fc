"""Single-file model export: weights, model config and tokenizer, loadable without Lightning.

The file is a ``torch.save`` of a dict with the keys listed in ``EXPORT_KEYS``; ``docs/design.md`` describes
it. Evaluation loads this format only, so it does not depend on how training was parallelised.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aoe_lightning.models import ModelConfig, Transformer

EXPORT_FORMAT = "aoe-lightning-export"
EXPORT_FORMAT_VERSION = 1
EXPORT_KEYS = ("format", "format_version", "model_config", "state_dict", "tokenizer", "metadata")


class ExportError(ValueError):
    """An export file is missing, unreadable or not in this package's format."""


@dataclass
class LoadedExport:
    model: Transformer
    tokenizer: Any
    """A tokenizer following the protocol of ``aoe_lightning.data.tokenizer``."""
    config: ModelConfig
    metadata: dict[str, Any]


def save_export(
    path: str | Path,
    model_config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer_dict: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an export atomically: to a temporary file in the same folder, then renamed over ``path``.

    An existing file is replaced only with ``overwrite``, so a typo in the output path never destroys an
    earlier export. A failed write leaves the previous file untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"export {str(path)!r} already exists; pass --overwrite to replace it")
    if path.is_dir():
        raise IsADirectoryError(f"export path {str(path)!r} is a directory; give a file name such as model.pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "model_config": model_config.to_dict(),
        "state_dict": {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()},
        "tokenizer": tokenizer_dict,
        "metadata": dict(metadata or {}),
    }
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def read_export(path: str | Path) -> dict[str, Any]:
    """Read and check an export file's dict without building the model."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"export file {str(path)!r} not found; create one with `aoe export CKPT {path}`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise ExportError(f"export file {str(path)!r} could not be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ExportError(
            f"{str(path)!r} is not an aoe-lightning export; convert a training checkpoint with `aoe export CKPT OUT`"
        )
    if payload.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ExportError(
            f"{str(path)!r} has export format version {payload.get('format_version')!r}; "
            f"this package reads version {EXPORT_FORMAT_VERSION}"
        )
    missing = [key for key in EXPORT_KEYS if key not in payload]
    if missing:
        raise ExportError(f"export file {str(path)!r} lacks the keys {missing}")
    return payload


def load_export(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedExport:
    """Build the model from an export in eval mode, with its tokenizer and metadata."""
    from aoe_lightning.data.tokenizer import tokenizer_from_dict

    payload = read_export(path)
    config = ModelConfig.from_dict(payload["model_config"])
    model = Transformer(config)
    load_model_state(model, payload["state_dict"], source=str(path))
    model.to(device=device, dtype=dtype).eval()
    return LoadedExport(model, tokenizer_from_dict(payload["tokenizer"]), config, payload["metadata"])


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly, naming missing and unexpected keys and the file they came from."""
    result = model.load_state_dict(state_dict, strict=False)
    # A tied head appears under both names in some state dicts and under one in others.
    missing = [key for key in result.missing_keys if key != "lm_head.weight" or not _is_tied(model)]
    if missing or result.unexpected_keys:
        raise ExportError(
            f"weights in {source!r} do not match the model config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
        )


def _is_tied(model: nn.Module) -> bool:
    return isinstance(model, Transformer) and model.config.tie_embeddings
