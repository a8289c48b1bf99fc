"""Decoder-only transformer LM whose feed-forward is dense SwiGLU, a router MoE or Autonomy-of-Experts.

Shape legend: B batch, S sequence, D d_model, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from aoe_lightning.models.attention import CausalSelfAttention
from aoe_lightning.models.config import ModelConfig
from aoe_lightning.models.experts import GroupedExperts
from aoe_lightning.models.moe import MoEBase, RoutingStats, build_sparse_ffn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32: the mean of squares of bf16 activations underflows for small values.
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """Dense feed-forward ``(SiLU(x W_g) * (x W_p)) W_o``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_proj = nn.Linear(d_model, hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(F.silu(self.w_gate(x)) * self.w_proj(x))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads, config.max_seq_len, config.rope_theta)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        if config.ffn.is_sparse:
            self.ffn: nn.Module = build_sparse_ffn(config.d_model, config.ffn)
        else:
            self.ffn = SwiGLU(config.d_model, config.ffn.d_ffn)

    def forward(self, x_BSD: Tensor, token_mask_BS: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], RoutingStats | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        if isinstance(self.ffn, MoEBase):
            h_BSD, aux, stats = self.ffn(self.ffn_norm(x_BSD), token_mask_BS)
        else:
            h_BSD, aux, stats = self.ffn(self.ffn_norm(x_BSD)), {}, None
        return x_BSD + h_BSD, aux, stats


@dataclass
class ModelOutput:
    logits: Tensor
    """Next-token logits (B, S, V)."""
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    """Unweighted auxiliary losses, each averaged over the MoE/AoE layers that produce it."""
    layer_stats: list[RoutingStats | None] = field(default_factory=list)
    """Routing statistics per block; None for dense blocks."""


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw weights from N(0, init_std); residual output projections (attention ``out``, FFN ``w_out``)
        use ``init_std / sqrt(2 n_layers)`` as in GPT-2, so the residual stream does not grow with depth."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, GroupedExperts):
                module.reset_parameters(std, out_std)
            elif isinstance(module, nn.Linear):
                is_output = name.endswith("attn.out") or name.endswith("ffn.w_out")
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_output else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, idx_BS: Tensor, padding_mask: Tensor | None = None) -> ModelOutput:
        """Compute logits for token ids ``idx_BS``; ``padding_mask`` (B, S) is True at real tokens."""
        seq = idx_BS.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds max_seq_len={self.config.max_seq_len}")
        x_BSD = self.embed(idx_BS)
        aux_sums: dict[str, Tensor] = {}
        aux_layers: dict[str, int] = {}
        layer_stats: list[RoutingStats | None] = []
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x_BSD, aux, stats = checkpoint(block, x_BSD, padding_mask, use_reentrant=False)
            else:
                x_BSD, aux, stats = block(x_BSD, padding_mask)
            for name, value in aux.items():
                aux_sums[name] = aux_sums.get(name, 0.0) + value
                aux_layers[name] = aux_layers.get(name, 0) + 1
            layer_stats.append(stats)
        logits_BSV = self.lm_head(self.norm(x_BSD))
        aux_losses = {name: total / aux_layers[name] for name, total in aux_sums.items()}
        return ModelOutput(logits=logits_BSV, aux_losses=aux_losses, layer_stats=layer_stats)
