"""``aoe export CKPT OUT``: convert any training checkpoint into the single-file export that evaluation loads.

Accepted checkpoints: a Lightning ``.ckpt`` file (single device, DDP, or FSDP with gathered state), and a
sharded FSDP2 checkpoint folder (a ``torch.distributed.checkpoint`` folder with Lightning's ``meta.pt``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from aoe_lightning import __version__
from aoe_lightning.export import ExportError, save_export
from aoe_lightning.models import ModelConfig

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."
METADATA_FILENAME = "meta.pt"


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return the checkpoint's non-tensor entries and the full (unsharded) LightningModule state dict."""
    if path.is_dir():
        return _read_sharded(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {str(path)!r} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files and foreign formats raise many types
        raise ExportError(f"checkpoint {str(path)!r} could not be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ExportError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict' entry)")
    return checkpoint, checkpoint["state_dict"]


def _read_sharded(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    metadata_file = path / METADATA_FILENAME
    if not (path / ".metadata").is_file() or not metadata_file.is_file():
        raise ExportError(
            f"{str(path)!r} is a folder but not a sharded checkpoint (expected .metadata and {METADATA_FILENAME})"
        )
    checkpoint = torch.load(metadata_file, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as scratch:
        consolidated = Path(scratch) / "consolidated.pt"
        dcp_to_torch_save(path, consolidated)
        state = torch.load(consolidated, map_location="cpu", weights_only=True)
    return checkpoint, state["state_dict"]


def model_state_dict(module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the LightningModule's ``model.`` prefix and drop metric states."""
    return {name[len(MODEL_PREFIX):]: tensor for name, tensor in module_state.items() if name.startswith(MODEL_PREFIX)}


def export_checkpoint(checkpoint_path: str | Path, output_path: str | Path, overwrite: bool = False) -> Path:
    checkpoint_path = Path(checkpoint_path)
    checkpoint, module_state = read_checkpoint(checkpoint_path)
    if "aoe_model_config" not in checkpoint:
        raise ExportError(f"checkpoint {str(checkpoint_path)!r} has no model config; was it written by `aoe fit`?")
    if "aoe_tokenizer" not in checkpoint:
        raise ExportError(
            f"checkpoint {str(checkpoint_path)!r} has no tokenizer; it was saved without a datamodule"
        )
    config = ModelConfig.from_dict(checkpoint["aoe_model_config"])
    state = model_state_dict(module_state)
    if not state:
        raise ExportError(f"checkpoint {str(checkpoint_path)!r} contains no 'model.*' weights")
    metadata = {
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        "source_checkpoint": str(checkpoint_path.resolve()),
        "aoe_lightning_version": __version__,
    }
    return save_export(output_path, config, state, checkpoint["aoe_tokenizer"], metadata, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aoe export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .ckpt file or a sharded checkpoint folder (e.g. RUN_DIR/checkpoints/last.ckpt)")
    parser.add_argument("output", help="export file to write, e.g. RUN_DIR/model.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite)
    except (ExportError, FileExistsError, IsADirectoryError, ValueError) as exc:
        print(f"aoe export: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
