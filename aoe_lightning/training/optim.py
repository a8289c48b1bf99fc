"""AdamW with decoupled weight decay on matrices only, and a linear warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    """AdamW and schedule settings.

    Betas, weight decay, clipping and learning rates default to the recipe of Autonomy-of-Experts Models
    (Lv et al., 2025). The warm-up default is shortened from the paper's 4800 steps to 100 for small runs.
    """

    lr: float = 2e-4
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 1.28e-5
    """Floor that the cosine decay ends at and stays at afterwards."""
    warmup_steps: int = 100
    """Optimizer steps of linear warm-up from 0 to ``lr``."""
    decay_steps: int | None = None
    """Optimizer step at which the cosine reaches ``min_lr``; ``None`` uses ``trainer.max_steps``."""
    weight_decay: float = 0.1
    """Decoupled weight decay on weight matrices; norms (and biases, if any) are not decayed."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping (the norm is still logged)."""

    def validation_errors(self) -> list[str]:
        errors = []
        if self.lr <= 0:
            errors.append(f"optimizer.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            errors.append(f"optimizer.min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        if self.warmup_steps < 0:
            errors.append(f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            errors.append(f"optimizer.decay_steps={self.decay_steps} must be > warmup_steps={self.warmup_steps}")
        if self.weight_decay < 0:
            errors.append(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            errors.append(f"optimizer.betas={self.betas} must be two values in [0, 1)")
        if self.grad_clip < 0:
            errors.append(f"optimizer.grad_clip={self.grad_clip} must be >= 0")
        return errors


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (matrices and embeddings) and an undecayed one (vectors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(groups: list[dict], fused: bool = True, **kwargs) -> torch.optim.AdamW:
    """Build AdamW, with PyTorch's fused kernel if ``fused`` and every parameter lives on the CPU or a CUDA device.

    The default implementation runs about ten tensor operations per parameter, and the fused one updates each
    parameter in one pass. On a 2-vCPU machine, the update of 3.4M parameters took 0.9 ms instead of 4.7 ms.
    """
    devices = {param.device.type for group in groups for param in group["params"]}
    return torch.optim.AdamW(groups, fused=fused and devices <= {"cpu", "cuda"}, **kwargs)


def warmup_cosine_factor(step: int, warmup_steps: int, decay_steps: int, lr: float, min_lr: float) -> float:
    """Return the learning-rate multiplier (of ``lr``) at optimizer step ``step``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr / lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return (min_lr + (lr - min_lr) * cosine) / lr


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, max_steps: int, fused: bool = True
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    decay_steps = config.decay_steps or max_steps
    if decay_steps is None or decay_steps <= 0:
        raise ValueError(
            "the cosine schedule needs a length: set trainer.max_steps or model.optimizer.decay_steps"
        )
    groups = parameter_groups(model, config.weight_decay)
    optimizer = adamw(groups, fused=fused, lr=config.lr, betas=tuple(config.betas), eps=config.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine_factor(step, config.warmup_steps, decay_steps, config.lr, config.min_lr),
    )
    return optimizer, scheduler
