"""LightningModule that pre-trains a dense, router-MoE or Autonomy-of-Experts transformer LM."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.text import Perplexity

from aoe_lightning.models import FFNConfig, ModelConfig, Transformer
from aoe_lightning.models.moe import RoutingStats
from aoe_lightning.training.optim import OptimizerConfig, build_optimizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class LanguageModelModule(L.LightningModule):
    """Next-token prediction with the MoE/AoE auxiliary losses added as one visible sum.

    The constructor arguments are the ``model:`` section of an ``aoe fit`` config: the ``ModelConfig`` fields,
    an ``ffn`` block and an ``optimizer`` block (``--model.ffn.d_low 128``, ``--model.optimizer.lr 3e-4``).
    """

    def __init__(
        self,
        vocab_size: int = 32000,
        n_layers: int = 12,
        n_heads: int = 12,
        d_model: int = 768,
        max_seq_len: int = 1024,
        tie_embeddings: bool = True,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        ffn: FFNConfig = FFNConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        activation_checkpointing: bool = False,
        log_expert_scalars: bool = True,
    ) -> None:
        """
        Args:
            vocab_size: rows of the token embedding; must be >= the tokenizer's vocabulary.
            n_layers: transformer blocks.
            n_heads: attention heads; must divide d_model.
            d_model: residual stream width.
            max_seq_len: longest sequence in tokens (RoPE table size).
            tie_embeddings: share the token embedding with the output head.
            rope_theta: RoPE base frequency.
            norm_eps: RMSNorm epsilon.
            init_std: standard deviation of the normal weight init.
            ffn: feed-forward block: dense, moe or aoe, with its selection and loss settings.
            optimizer: AdamW, schedule and gradient clipping settings.
            activation_checkpointing: recompute each block in the backward pass to save activation memory.
            log_expert_scalars: log per-layer routing scalars (entropies, loads, AoE norms per expert).
        """
        super().__init__()
        if isinstance(ffn, dict):
            ffn = FFNConfig(**ffn)
        if isinstance(optimizer, dict):
            optimizer = OptimizerConfig(**optimizer)
        self.model_config = ModelConfig(
            vocab_size=vocab_size,
            n_layers=n_layers,
            n_heads=n_heads,
            d_model=d_model,
            max_seq_len=max_seq_len,
            tie_embeddings=tie_embeddings,
            rope_theta=rope_theta,
            norm_eps=norm_eps,
            init_std=init_std,
            ffn=ffn,
        )
        errors = optimizer.validation_errors()
        if errors:
            raise ValueError("invalid optimizer config: " + "; ".join(errors))
        self.optimizer_config = optimizer
        # Plain dicts only: checkpoints are read back with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["ffn", "optimizer"])
        self.hparams["ffn"] = dataclasses.asdict(ffn)
        self.hparams["optimizer"] = dataclasses.asdict(optimizer)

        self.model = Transformer(self.model_config)
        self.model.activation_checkpointing = activation_checkpointing
        self.log_expert_scalars = log_expert_scalars
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self._val_expert_counts: Tensor | None = None

    # ----------------------------------------------------------------------------------------------- setup

    def configure_model(self) -> None:
        """Shard each block, then the root, with FSDP2 when running under ``ModelParallelStrategy``."""
        if self.device_mesh is None:
            return  # single process, DDP, or load_from_checkpoint
        from aoe_lightning.training.fsdp import shard_transformer

        shard_transformer(self.model, self.device_mesh)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            from aoe_lightning.data.tokenizer import check_vocab_fits

            check_vocab_fits(tokenizer.vocab_size, self.model_config.vocab_size)
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > self.model_config.max_seq_len:
            raise ValueError(
                f"data.seq_len={seq_len} exceeds model.max_seq_len={self.model_config.max_seq_len}; "
                "raise model.max_seq_len or lower data.seq_len"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        # With fp16 loss scaling, Lightning unscales the gradients before the clipping hook only for optimizers
        # that do not unscale inside their own step, which the fused AdamW does.
        fused = self.trainer.precision != "16-mixed"
        optimizer, scheduler = build_optimizer(self.model, self.optimizer_config, self.trainer.max_steps, fused=fused)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------------------- train / val

    def forward(self, idx: Tensor, padding_mask: Tensor | None = None):
        return self.model(idx, padding_mask)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = split_batch(batch)
        out = self.model(inputs, targets != IGNORE_INDEX)
        lm_loss = language_model_loss(out.logits, targets)

        ffn = self.model_config.ffn
        aux = out.aux_losses
        zero = lm_loss.new_zeros(())
        loss = (
            lm_loss
            + ffn.load_balance_coef * aux.get("load_balance", zero)
            + ffn.z_loss_coef * aux.get("z_loss", zero)
            + ffn.entropy_coef * aux.get("entropy", zero)
        )

        self.log("train/loss", lm_loss, prog_bar=True)
        self.log("train/ppl", torch.exp(lm_loss.detach().float()))
        self.log("train/loss_total", loss)
        for name, value in aux.items():
            self.log(f"train/aux/{name}", value)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self._log_routing(out.layer_stats, prefix="train")
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the global gradient norm here rather than through the Trainer, so that DDP, FSDP2 and a single
        device share one code path, and log the norm measured before clipping."""
        max_norm = self.optimizer_config.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm=max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = split_batch(batch)
        out = self.model(inputs, targets != IGNORE_INDEX)
        lm_loss = language_model_loss(out.logits, targets)
        self.val_perplexity.update(out.logits.float(), targets)
        self.log("val/loss", lm_loss, sync_dist=True, prog_bar=True)
        self._accumulate_val_counts(out.layer_stats)

    def on_validation_epoch_start(self) -> None:
        self._val_expert_counts = None

    def on_validation_epoch_end(self) -> None:
        self.log("val/ppl", self.val_perplexity.compute(), sync_dist=False)
        self.val_perplexity.reset()

    # ----------------------------------------------------------------------------------------- logging

    def _log_routing(self, layer_stats: list[RoutingStats | None], prefix: str) -> None:
        if not self.log_expert_scalars:
            return
        kind = self.model_config.ffn.kind
        for layer, stats in enumerate(layer_stats):
            if stats is None:
                continue
            tag = f"layer_{layer:02d}"
            counts = stats.expert_counts.float()
            mean_load = counts.mean().clamp(min=1e-9)
            self.log(f"moe/load_entropy/{tag}", stats.load_entropy)
            self.log(f"moe/confidence_entropy/{tag}", stats.confidence_entropy)
            self.log(f"moe/max_load/{tag}", counts.max() / mean_load)
            self.log(f"moe/dead_expert_fraction/{tag}", (counts == 0).float().mean())
            self.log(f"moe/experts_per_token/{tag}", stats.experts_per_token)
            if kind == "aoe":
                for expert, value in enumerate(stats.mean_score.tolist()):
                    self.log(f"aoe/mean_norm/{tag}/expert_{expert:02d}", value)

    def _accumulate_val_counts(self, layer_stats: list[RoutingStats | None]) -> None:
        rows = [stats.expert_counts for stats in layer_stats if stats is not None]
        if not rows:
            return
        counts = torch.stack(rows).detach()
        self._val_expert_counts = counts if self._val_expert_counts is None else self._val_expert_counts + counts

    @property
    def val_expert_counts(self) -> Tensor | None:
        """Per-layer x per-expert token counts summed over the last validation run (rank-local)."""
        return self._val_expert_counts

    # ----------------------------------------------------------------------------------------- checkpoint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the model config and the tokenizer, so that ``aoe export`` needs nothing but the checkpoint."""
        checkpoint["aoe_model_config"] = self.model_config.to_dict()
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            checkpoint["aoe_tokenizer"] = tokenizer.to_dict()


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """Return ``(inputs, targets)`` from a batch of windows (B, S+1), a pair, or a dict with ``input_ids``."""
    if isinstance(batch, Tensor):
        return batch[:, :-1], batch[:, 1:]
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"]
    inputs, targets = batch
    return inputs, targets


def language_model_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in fp32, skipping ``IGNORE_INDEX`` targets."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
