"""Causal self-attention with rotary position embeddings and an optional cache of earlier keys and values.

Shape legend: B batch, S sequence (new tokens), P cached tokens, D d_model, H heads, Dh head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """Return the RoPE cosine and sine tables, each (max_seq_len, head_dim / 2), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the last dimension by the complex unit ``rotation``.

    ``rotation`` (complex64, last dimension head_dim / 2) broadcasts against ``x`` without its last dimension.
    The pairs are read in place as complex numbers, so one multiply computes
    (x[2i] cos - x[2i+1] sin, x[2i] sin + x[2i+1] cos) in fp32 for every pair. The result is contiguous
    whatever the strides of ``x``, which attention kernels prefer.
    """
    x_fp32 = x.float()
    if x_fp32.stride(-1) != 1 or x_fp32.storage_offset() % 2 or any(s % 2 for s in x_fp32.stride()[:-1]):
        x_fp32 = x_fp32.contiguous()
    pairs = torch.view_as_complex(x_fp32.unflatten(-1, (-1, 2)))
    rotated = (pairs * rotation).contiguous()
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


@dataclass
class KVCache:
    """Rotated keys and values of tokens already seen, one pair per block, for extending those sequences.

    Rows may contain padding anywhere. ``mask_BP`` marks the real tokens, and a row's next token sits at
    position ``lengths_B`` (its count of real tokens).
    """

    keys: list[Tensor]
    """Per block, (B, H, P, Dh)."""
    values: list[Tensor]
    """Per block, (B, H, P, Dh)."""
    mask_BP: Tensor
    """True at real tokens."""
    lengths_B: Tensor
    """Real tokens per row."""

    def select(self, rows_R: Tensor) -> KVCache:
        """Return the cache of rows ``rows_R`` (a row may repeat, as a prompt shared by several continuations).

        Trailing positions that are padding in every selected row are dropped, so later tokens do not
        attend over them.
        """
        mask_BP = self.mask_BP.index_select(0, rows_R)
        width = int(mask_BP.any(0).nonzero().max()) + 1 if mask_BP.any() else 0
        return KVCache(
            keys=[k.index_select(0, rows_R)[:, :, :width] for k in self.keys],
            values=[v.index_select(0, rows_R)[:, :, :width] for v in self.values],
            mask_BP=mask_BP[:, :width],
            lengths_B=self.lengths_B.index_select(0, rows_R),
        )

    def extend(self, new: KVCache) -> KVCache:
        """Return this cache followed, position by position, by the cache ``new`` of the same rows."""
        return KVCache(
            keys=[torch.cat((old, added), dim=2) for old, added in zip(self.keys, new.keys)],
            values=[torch.cat((old, added), dim=2) for old, added in zip(self.values, new.values)],
            mask_BP=torch.cat((self.mask_BP, new.mask_BP), dim=1),
            lengths_B=self.lengths_B + new.lengths_B,
        )

    def attention_mask(self, seq: int) -> Tensor:
        """Boolean mask (B, 1, S, P + S) for ``seq`` new tokens: every real cached token, then causal."""
        batch = self.mask_BP.shape[0]
        causal_SS = torch.ones(seq, seq, dtype=torch.bool, device=self.mask_BP.device).tril()
        return torch.cat(
            (self.mask_BP[:, None, None, :].expand(-1, 1, seq, -1), causal_SS.expand(batch, 1, seq, seq)), dim=-1
        )


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

    def rotation(self, seq: int, positions_BS: Tensor | None = None) -> Tensor:
        """RoPE rotations (S, Dh/2), or (B, 1, S, Dh/2) at explicit positions, as complex64.

        Built in fp32 from the tables, which a dtype cast of the module may have rounded to bf16.
        """
        cos, sin = self.rope_cos.float(), self.rope_sin.float()
        if positions_BS is None:
            cos, sin = cos[:seq], sin[:seq]
        else:
            cos, sin = cos[positions_BS], sin[positions_BS]
        rotation = torch.complex(cos, sin)
        return rotation if positions_BS is None else rotation[:, None]

    def forward(
        self,
        x_BSD: Tensor,
        rotation: Tensor | None = None,
        past_kv: tuple[Tensor, Tensor] | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend causally and return the output and this call's rotated keys and values, each (B, H, S, Dh).

        ``rotation`` comes from ``rotation()`` (default: positions 0..S-1). ``past_kv`` contains the keys and
        values (B, H, P, Dh) of earlier tokens, with ``attn_mask`` from ``KVCache.attention_mask``.
        """
        batch, seq, d_model = x_BSD.shape
        if rotation is None:
            rotation = self.rotation(seq)
        qkv_BS3HDh = self.qkv(x_BSD).view(batch, seq, 3, self.n_heads, self.head_dim)
        q_BHSDh, k_BHSDh = apply_rope(qkv_BS3HDh[:, :, :2].permute(2, 0, 3, 1, 4), rotation).unbind(0)
        v_BHSDh = qkv_BS3HDh[:, :, 2].transpose(1, 2)
        if past_kv is None:
            y_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh, is_causal=True)
        else:
            keys_BHKDh = torch.cat((past_kv[0], k_BHSDh), dim=2)
            values_BHKDh = torch.cat((past_kv[1], v_BHSDh), dim=2)
            y_BHSDh = F.scaled_dot_product_attention(q_BHSDh, keys_BHKDh, values_BHKDh, attn_mask=attn_mask)
        return self.out(y_BHSDh.transpose(1, 2).reshape(batch, seq, d_model)), (k_BHSDh, v_BHSDh)
