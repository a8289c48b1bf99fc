"""Causal self-attention with rotary position embeddings.

Shape legend: B batch, S sequence, D d_model, H heads, Dh head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """Return the RoPE cosine and sine tables, each (max_seq_len, head_dim / 2), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x_BHSDh: Tensor, cos_SDh2: Tensor, sin_SDh2: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of each head by the position's angle."""
    seq = x_BHSDh.shape[-2]
    x_pairs = x_BHSDh.float().unflatten(-1, (-1, 2))
    x_even, x_odd = x_pairs[..., 0], x_pairs[..., 1]
    cos, sin = cos_SDh2[:seq], sin_SDh2[:seq]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).to(x_BHSDh.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, max_seq_len: int, rope_theta: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        cos, sin = rope_tables(self.head_dim, max_seq_len, rope_theta)
        # Non-persistent: the tables are recomputed from the config, so checkpoints stay free of them.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        batch, seq, d_model = x_BSD.shape
        qkv_BS3HDh = self.qkv(x_BSD).view(batch, seq, 3, self.n_heads, self.head_dim)
        q_BHSDh, k_BHSDh, v_BHSDh = qkv_BS3HDh.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHSDh = apply_rope(q_BHSDh, self.rope_cos, self.rope_sin)
        k_BHSDh = apply_rope(k_BHSDh, self.rope_cos, self.rope_sin)
        y_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh, is_causal=True)
        return self.out(y_BHSDh.transpose(1, 2).reshape(batch, seq, d_model))
