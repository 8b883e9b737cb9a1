"""2D rotary position embeddings (RoPE) on the network's token grid.

Tokens sit on a grid of (angle position ``p``, radial band ``b``). Half of every
attention head's channels rotate with ``p`` and half with ``b``. The angle axis is
**cyclic**: its frequencies are whole multiples of ``2 pi / period`` (``period`` = the
number of angle positions in a full turn), so the attention score between two tokens
depends on their angular offset modulo a full turn, as an in-plane rotation requires.
"""

from __future__ import annotations

import math

import torch

__all__ = ["RotaryEmbedding2D"]


class RotaryEmbedding2D(torch.nn.Module):
    """Precomputed cos/sin tables for a fixed token grid.

    Parameters
    ----------
    head_dim: int
        Channels per attention head (divisible by 4).
    angle_positions: torch.Tensor
        `(T,)` angle index of each token (0 .. period/2 - 1 for lines over half a turn).
    band_positions: torch.Tensor
        `(T,)` radial band index of each token.
    period: int
        Angle positions in a full turn.
    """

    def __init__(self, head_dim: int, angle_positions: torch.Tensor, band_positions: torch.Tensor, period: int):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim must be divisible by 4, got {head_dim}")
        quarter = head_dim // 4
        angle_freq = (2 * math.pi / period) * torch.arange(1, quarter + 1, dtype=torch.float32)
        band_freq = 1.0 / (10.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
        phases = torch.cat([angle_positions.float()[:, None] * angle_freq,
                            band_positions.float()[:, None] * band_freq], -1)
        self.register_buffer("cos", torch.cos(phases).repeat_interleave(2, -1), persistent=False)  # (T, head_dim)
        self.register_buffer("sin", torch.sin(phases).repeat_interleave(2, -1), persistent=False)

    def forward(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate `(..., k T, head_dim)` vectors by their tokens' positions (``-position`` if ``inverse``).

        The token axis may hold ``k`` whole grids one after the other (the tokens of
        several views), each rotated by the same table.
        """
        repeats = x.shape[-2] // self.cos.shape[0]
        cos = self.cos.to(x.dtype).repeat(repeats, 1)
        sin = self.sin.to(x.dtype).repeat(repeats, 1)
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
        return x * cos - rotated * sin if inverse else x * cos + rotated * sin
