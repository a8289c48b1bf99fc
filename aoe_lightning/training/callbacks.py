"""Callbacks of ``aoe fit``: throughput and MFU, the expert-load heat map, and the run summary file."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from aoe_lightning.models.params import count_parameters, training_flops_per_token

log = logging.getLogger(__name__)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """Measure the FLOP/s of a square matmul on ``device``: the denominator of MFU on hardware without a
    published peak (CPUs) and a realistic one on GPUs. Takes well under a second."""
    if size is None:
        size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return 2 * size**3 * repeats / elapsed


def batch_tokens(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] * (batch.shape[1] - 1)
    if isinstance(batch, dict):
        return batch["input_ids"].numel()
    return batch[0].numel()


class ThroughputMonitor(L.Callback):
    """Log ``train/tokens_seen``, ``perf/tokens_per_s`` and ``perf/mfu`` (all ranks' tokens together).

    Tokens per second is measured over the batches between two logging steps, so it includes the optimizer
    step and data loading. MFU divides the model's training FLOPs (``training_flops_per_token``) by the
    measured matmul peak of one device times the number of devices.
    """

    def __init__(self) -> None:
        self.tokens_seen = 0
        self.peak_flops: float | None = None
        self._window_tokens = 0
        self._window_start: float | None = None
        self._run_tokens = 0
        self._run_seconds = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        self.peak_flops = measure_matmul_peak(pl_module.device, dtype)
        log.info("measured matmul peak on %s (%s): %.2f TFLOP/s", pl_module.device, dtype, self.peak_flops / 1e12)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = batch_tokens(batch) * trainer.world_size
        self.tokens_seen += tokens
        self._window_tokens += tokens
        pl_module.log("train/tokens_seen", float(self.tokens_seen))
        if (trainer.global_step % trainer.log_every_n_steps) != 0 or self._window_start is None:
            return
        seconds = time.perf_counter() - self._window_start
        if seconds <= 0:
            return
        tokens_per_s = self._window_tokens / seconds
        self._run_tokens += self._window_tokens
        self._run_seconds += seconds
        pl_module.log("perf/tokens_per_s", tokens_per_s)
        if self.peak_flops:
            flops = training_flops_per_token(pl_module.model_config, batch_seq_len(batch)) * tokens_per_s
            pl_module.log("perf/mfu", flops / (self.peak_flops * trainer.world_size))
        self._window_tokens = 0
        self._window_start = time.perf_counter()

    @property
    def mean_tokens_per_s(self) -> float | None:
        return self._run_tokens / self._run_seconds if self._run_seconds > 0 else None

    def state_dict(self) -> dict[str, Any]:
        # The timed tokens and seconds travel with the checkpoint, so that the mean throughput of a resumed run
        # covers every segment of it, not only the last.
        return {"tokens_seen": self.tokens_seen, "timed_tokens": self._run_tokens, "timed_seconds": self._run_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict["tokens_seen"])
        self._run_tokens = int(state_dict.get("timed_tokens", 0))
        self._run_seconds = float(state_dict.get("timed_seconds", 0.0))


def batch_seq_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[1] - 1
    if isinstance(batch, dict):
        return batch["input_ids"].shape[1]
    return batch[0].shape[1]


class ExpertLoadHeatmap(L.Callback):
    """After each validation, log a per-layer x per-expert token-load heat map to TensorBoard and write the
    matrix to ``expert_load.json`` in the run directory (the ablation report reads it)."""

    def __init__(self, output_dir: str | Path | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = getattr(pl_module, "val_expert_counts", None)
        if counts is None or trainer.sanity_checking:
            return
        counts = trainer.strategy.reduce(counts.float(), reduce_op="sum")
        self._write(trainer, counts.cpu())

    @rank_zero_only
    def _write(self, trainer: L.Trainer, counts: torch.Tensor) -> None:
        fractions = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            record = {"global_step": trainer.global_step, "load_fraction": fractions.tolist()}
            (self.output_dir / "expert_load.json").write_text(json.dumps(record))
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_figure"):
            return
        figure = render_load_heatmap(fractions)
        experiment.add_figure("moe/expert_load_heatmap", figure, global_step=trainer.global_step)


def render_load_heatmap(fractions: torch.Tensor, title: str = "expert load (fraction of a layer's tokens)"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, experts = fractions.shape
    figure, axis = plt.subplots(figsize=(1.0 + 0.5 * experts, 1.0 + 0.35 * layers))
    image = axis.imshow(fractions.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    axis.set_xlabel("expert")
    axis.set_ylabel("layer")
    axis.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure


class RunSummary(L.Callback):
    """Write ``summary.json`` in the run directory when fitting ends: final validation loss and perplexity,
    throughput, parameter counts and steps. The ablation report builds its table from these files."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self._start = time.perf_counter()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
        throughput = next((cb for cb in trainer.callbacks if isinstance(cb, ThroughputMonitor)), None)
        counts = count_parameters(pl_module.model_config)
        summary = {
            "global_step": trainer.global_step,
            "tokens_seen": throughput.tokens_seen if throughput else None,
            "tokens_per_s": throughput.mean_tokens_per_s if throughput else None,
            "val_loss": metrics.get("val/loss"),
            "val_ppl": metrics.get("val/ppl"),
            "train_loss": metrics.get("train/loss"),
            "total_params": counts.owned,
            "active_params": counts.active_embedding_once,
            "non_embedding_active_params": counts.non_embedding_active,
            "fit_seconds": time.perf_counter() - self._start,
            "model_config": pl_module.model_config.to_dict(),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
