"""Transformer blocks: self-attention (with RoPE), cross-attention, MLP.

Shapes: tokens are `(batch, T, D)`; memories (keys/values of cross-attention) are
`(batch, M, D)`. Attention is ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rope import RotaryEmbedding2D

__all__ = ["CrossBlock", "SelfBlock"]


class Attention(nn.Module):
    """Multi-head attention.

    With ``rope``, queries and keys are rotated by their positions (self-attention:
    scores depend on relative position). With ``relative_values`` (cross-attention),
    scores stay content-only but each value is rotated by its key's position and the
    result rotated back by the query's: the output carries the *angular offset* between
    a token and the tokens it matched — for two views related by an in-plane rotation
    that offset is the rotation itself, and for a common line it is where the line sits
    in each view.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, rope: RotaryEmbedding2D | None = None,
                relative_values: RotaryEmbedding2D | None = None) -> torch.Tensor:
        """`(b, T, D)` queries attend to `(b, M, D)` memory (M a multiple of T) -> `(b, T, D)`."""
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.kv(memory).view(b, memory.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rope(q), rope(k)
        if relative_values is not None:
            v = relative_values(v)
        y = F.scaled_dot_product_attention(q, k, v)
        if relative_values is not None:
            y = relative_values(y, inverse=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Sequential):
    """Two-layer GELU MLP, `(..., D)` -> `(..., D)`."""

    def __init__(self, dim: int, ratio: int):
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class SelfBlock(nn.Module):
    """Pre-norm ViT block: self-attention with RoPE, then MLP (the encoder's block)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        """`(b, T, D)` -> `(b, T, D)`."""
        h = self.norm1(x)
        x = x + self.attn(h, h, rope)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Decoder block: self-attention (RoPE) within the view, cross-attention to a memory, MLP.

    As a *View Integration* block the reference view's tokens attend to all other
    views' tokens; as a *View Update* block each other view attends to the reference
    view only. Either way the cost grows linearly with the number of views.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2, self.norm_memory, self.norm3 = (nn.LayerNorm(dim) for _ in range(4))
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        """`(b, T, D)` tokens, `(b, M, D)` memory -> `(b, T, D)`."""
        h = self.norm1(x)
        x = x + self.self_attn(h, h, rope)
        x = x + self.cross_attn(self.norm2(x), self.norm_memory(memory), relative_values=rope)
        return x + self.mlp(self.norm3(x))
