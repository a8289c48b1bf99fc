"""``aoe fit``: a LightningCLI that trains one model into one run directory.

Run directory layout (``--run_dir``, default ``runs/<config file stem>``)::

    config.yaml            the resolved config, also logged as TensorBoard hyperparameters
    checkpoints/           periodic checkpoints and last.ckpt (a folder when FSDP saves sharded checkpoints)
    tensorboard/<name>/    event files, unless --tensorboard_dir points elsewhere
    expert_load.json       per-layer x per-expert load of the last validation (MoE / AoE)
    summary.json           final metrics, throughput and parameter counts, written when fitting ends

A directory that already contains a run is never reused unless ``--ckpt_path last`` resumes it or
``--overwrite true`` replaces it.
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from aoe_lightning.allocator import reuse_freed_memory
from aoe_lightning.data.datamodule import TokenShardDataModule
from aoe_lightning.training.fsdp import fsdp_strategy
from aoe_lightning.training.callbacks import ExpertLoadHeatmap, RunSummary, ThroughputMonitor
from aoe_lightning.training.module import LanguageModelModule

log = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "summary.json", "expert_load.json")
RUN_FOLDERS = ("checkpoints",)


class RunDirectoryError(RuntimeError):
    """The run directory contains an earlier run that the command would overwrite."""


class SaveRunConfig(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the run directory and log it as hyperparameters."""

    def __init__(self, parser, config, run_dir: str | Path = ".", **kwargs: Any) -> None:
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)
        self.run_dir = Path(run_dir)

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(text)
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"config": yaml.safe_load(text)})


class FitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=Optional[str], default=None,
                            help="Run directory (default: runs/<config file stem>).")
        parser.add_argument("--run_name", type=Optional[str], default=None,
                            help="TensorBoard run name (default: the run directory's name).")
        parser.add_argument("--tensorboard_dir", type=Optional[str], default=None,
                            help="TensorBoard log directory shared by several runs (default: RUN_DIR/tensorboard).")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="Resume from this checkpoint; 'last' resumes RUN_DIR/checkpoints/last.ckpt if it exists.")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="Delete the checkpoints, config and summary of an earlier run in RUN_DIR first.")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=500,
                            help="Save a periodic checkpoint every this many optimizer steps.")
        parser.add_argument("--keep_checkpoints", type=int, default=3,
                            help="Periodic checkpoints to keep (last.ckpt is always kept); -1 keeps all.")
        parser.add_argument("--fsdp", type=bool, default=False,
                            help="Shard the model with FSDP2 (Lightning's ModelParallelStrategy) over all devices.")
        parser.add_argument("--sharded_checkpoint", type=bool, default=True,
                            help="With --fsdp: save checkpoints as sharded folders (false: one gathered file).")
        parser.add_argument("--reuse_cpu_memory", type=bool, default=True,
                            help="On CPU with glibc: keep freed tensor memory in the process for the next step "
                                 "instead of faulting it in again (faster steps, resident memory stays at its peak).")

    def before_instantiate_classes(self) -> None:
        config = self.config
        run_dir = Path(config.run_dir or default_run_dir(config))
        config.run_dir = str(run_dir)
        config.run_name = config.run_name or run_dir.name
        config.tensorboard_dir = config.tensorboard_dir or str(run_dir / "tensorboard")
        if config.ckpt_path == "last":
            last = run_dir / "checkpoints" / "last.ckpt"
            if last.exists():
                config.ckpt_path = str(last)
            else:
                log.warning("no checkpoint at %s; starting %s from scratch", last, run_dir)
                config.ckpt_path = None
        if config.ckpt_path is None:
            prepare_run_dir(run_dir, overwrite=config.overwrite)
        elif not Path(config.ckpt_path).exists():
            raise FileNotFoundError(f"--ckpt_path {config.ckpt_path!r} not found; use 'last' to resume {run_dir}")
        self.save_config_kwargs["run_dir"] = run_dir
        self.save_config_kwargs["overwrite"] = True

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config
        run_dir = Path(config.run_dir)
        kwargs["default_root_dir"] = str(run_dir)
        kwargs["logger"] = TensorBoardLogger(save_dir=config.tensorboard_dir, name=config.run_name, version="")
        periodic = ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step={step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=config.checkpoint_every_n_steps,
            monitor="step",
            mode="max",
            save_top_k=config.keep_checkpoints,
            save_last=True,
        )
        callbacks = [periodic, ThroughputMonitor(), ExpertLoadHeatmap(run_dir), RunSummary(run_dir)]
        trainer_config = self._get(self.config_init, "trainer", default={})
        kwargs["callbacks"] = list(trainer_config.get("callbacks") or []) + callbacks
        if config.fsdp:
            kwargs["strategy"] = fsdp_strategy(sharded_checkpoint=config.sharded_checkpoint)
        return super().instantiate_trainer(**kwargs)


def default_run_dir(config) -> Path:
    config_files = config.get("config") or []
    if config_files:
        return Path("runs") / Path(str(config_files[-1])).stem
    return Path("runs") / "default"


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a fresh run over an earlier one, or remove the earlier run's files with ``overwrite``."""
    existing = [name for name in RUN_FILES + RUN_FOLDERS if (run_dir / name).exists()]
    if not existing:
        return
    if not overwrite:
        raise RunDirectoryError(
            f"run directory {str(run_dir)!r} already contains a run ({', '.join(existing)}); "
            "resume it with --ckpt_path last, choose another --run_dir, or pass --overwrite true"
        )
    for name in existing:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    tensorboard = run_dir / "tensorboard"
    if tensorboard.is_dir():
        shutil.rmtree(tensorboard)
    log.info("removed the earlier run in %s (--overwrite)", run_dir)


def run_fit(argv: list[str] | None = None, trainer_defaults: dict[str, Any] | None = None) -> FitCLI:
    """Parse ``aoe fit`` arguments, build the model, data and trainer, and fit; returns the CLI object.

    ``trainer_defaults`` adds Trainer arguments (e.g. extra callbacks) for programs that embed ``aoe fit``.
    """
    cli = FitCLI(
        LanguageModelModule,
        TokenShardDataModule,
        run=False,
        args=argv,
        save_config_callback=SaveRunConfig,
        trainer_defaults=trainer_defaults or {},
        parser_kwargs={"prog": "aoe fit", "description": "Train a dense, MoE or AoE language model."},
    )
    if cli.config.reuse_cpu_memory and cli.trainer.strategy.root_device.type == "cpu":
        reuse_freed_memory()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    return cli


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The `aoe` dispatcher passes the arguments after "fit" explicitly while sys.argv still contains them;
    # Lightning warns about that combination, but it is intended here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        run_fit(argv)
    except (RunDirectoryError, FileNotFoundError, ValueError) as exc:
        print(f"aoe fit: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
