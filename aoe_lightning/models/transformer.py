"""Decoder-only transformer LM whose feed-forward is dense SwiGLU, a router MoE or Autonomy-of-Experts.

Shape legend: B batch, S sequence, P cached tokens, D d_model, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from aoe_lightning.models.attention import CausalSelfAttention, KVCache
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
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


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

    def forward(
        self,
        x_BSD: Tensor,
        token_mask_BS: Tensor | None = None,
        rotation: Tensor | None = None,
        past_kv: tuple[Tensor, Tensor] | None = None,
        attn_mask: Tensor | None = None,
        return_kv: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor], RoutingStats | None, tuple[Tensor, Tensor] | None]:
        """Return the new residual stream, the FFN's auxiliary losses and routing statistics, and (with
        ``return_kv``) the attention's keys and values of these tokens."""
        a_BSD, kv = self.attn(self.attn_norm(x_BSD), rotation, past_kv, attn_mask)
        x_BSD = x_BSD + a_BSD
        if isinstance(self.ffn, MoEBase):
            h_BSD, aux, stats = self.ffn(self.ffn_norm(x_BSD), token_mask_BS)
        else:
            h_BSD, aux, stats = self.ffn(self.ffn_norm(x_BSD)), {}, None
        return x_BSD + h_BSD, aux, stats, kv if return_kv else None


@dataclass
class ModelOutput:
    logits: Tensor | None
    """Next-token logits (B, S, V), or None when the model was called with ``head=False``."""
    hidden: Tensor
    """Final-norm hidden states (B, S, D), the input of ``lm_head``."""
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    """Unweighted auxiliary losses, each averaged over the MoE/AoE layers that produce it."""
    layer_stats: list[RoutingStats | None] = field(default_factory=list)
    """Routing statistics per block; None for dense blocks."""
    cache: KVCache | None = None
    """Keys and values of the cached and new tokens, when called with ``use_cache=True``."""


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

    def _rotation_and_mask(
        self, seq: int, padding_mask: Tensor | None, past: KVCache | None
    ) -> tuple[Tensor, Tensor | None]:
        """RoPE rotations of ``seq`` new tokens and, after a cache, their mask over cached and new tokens."""
        limit = self.config.max_seq_len
        attn = self.blocks[0].attn
        if past is None:
            if seq > limit:
                raise ValueError(f"sequence length {seq} exceeds max_seq_len={limit}")
            return attn.rotation(seq), None

        positions_BS = past.lengths_B[:, None] + torch.arange(seq, device=past.lengths_B.device)
        real_positions_BS = positions_BS if padding_mask is None else positions_BS.masked_fill(~padding_mask, 0)
        last = int(real_positions_BS.max())
        if last >= limit:
            raise ValueError(
                f"cached plus new tokens reach position {last}, beyond max_seq_len={limit}; "
                f"keep every row's cached and new tokens within {limit}"
            )
        # Padding may run past the window. Its outputs are never used, so any valid position will do.
        return attn.rotation(seq, positions_BS.clamp(max=limit - 1)), past.attention_mask(seq)

    def forward(
        self,
        idx_BS: Tensor,
        padding_mask: Tensor | None = None,
        *,
        past: KVCache | None = None,
        use_cache: bool = False,
        head: bool = True,
    ) -> ModelOutput:
        """Compute logits for token ids ``idx_BS``; ``padding_mask`` (B, S) is True at real tokens.

        With ``past``, the tokens continue the cached rows: row b starts at position ``past.lengths_B[b]``
        and attends to the cached tokens as well. ``use_cache`` returns the keys and values of the cached and
        new tokens in ``ModelOutput.cache``. ``head=False`` skips the vocabulary projection, for callers that
        need logits at a few positions only: they apply ``lm_head`` to those rows of ``out.hidden``.
        """
        batch, seq = idx_BS.shape
        rotation, attn_mask = self._rotation_and_mask(seq, padding_mask, past)
        x_BSD = self.embed(idx_BS)
        aux_sums: dict[str, Tensor] = {}
        aux_layers: dict[str, int] = {}
        layer_stats: list[RoutingStats | None] = []
        keys: list[Tensor] = []
        values: list[Tensor] = []
        for layer, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and past is None and not use_cache:
                x_BSD, aux, stats, _ = checkpoint(block, x_BSD, padding_mask, rotation, use_reentrant=False)
            else:
                past_kv = None if past is None else (past.keys[layer], past.values[layer])
                x_BSD, aux, stats, kv = block(x_BSD, padding_mask, rotation, past_kv, attn_mask, use_cache)
                if use_cache:
                    keys.append(kv[0])
                    values.append(kv[1])
            for name, value in aux.items():
                aux_sums[name] = aux_sums.get(name, 0.0) + value
                aux_layers[name] = aux_layers.get(name, 0) + 1
            layer_stats.append(stats)
        hidden_BSD = self.norm(x_BSD)
        logits_BSV = self.lm_head(hidden_BSD) if head else None
        aux_losses = {name: total / aux_layers[name] for name, total in aux_sums.items()}

        cache = None
        if use_cache:
            new_mask_BS = padding_mask if padding_mask is not None else idx_BS.new_ones(batch, seq, dtype=torch.bool)
            cache = KVCache(keys=keys, values=values, mask_BP=new_mask_BS, lengths_B=new_mask_BS.sum(1))
            if past is not None:
                cache = past.extend(cache)
        return ModelOutput(
            logits=logits_BSV, hidden=hidden_BSD, aux_losses=aux_losses, layer_stats=layer_stats, cache=cache
        )
