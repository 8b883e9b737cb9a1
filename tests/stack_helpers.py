"""Helpers of the RELION file tests (tests/test_mrc.py, tests/test_star.py): recognisable image stacks
(imported by the tests; ``pythonpath = ["tests"]`` in pyproject.toml)."""

from __future__ import annotations

import numpy as np
import torch

BOX = 16
N_PER_STACK = 5


def stack_images(seed: int, n: int = N_PER_STACK, box: int = BOX) -> torch.Tensor:
    """`(n, box, box)` float32 images; image k (0-based) has constant offset 100 * k so it is recognisable."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, box, box)).astype(np.float32)
    data += 100.0 * np.arange(n, dtype=np.float32)[:, None, None]
    return torch.from_numpy(data)
