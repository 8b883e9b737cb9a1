"""The training curriculum: stages from easy to hard, each gated on validation error.

Following the paper (few views -> many, SNR 10 -> 0.1, CTF off -> on) and what was
learnt on small budgets (a network trained straight on full SO(3) learns nothing), the
pose distribution also grows: in-plane rotations only, then views within a cone, then
all of SO(3). Noise comes in only once clean error is low.

A stage ends when the validation median geodesic error falls below its ``gate_degrees``
(checked every validation) after at least ``min_steps`` steps, or after ``max_steps``
steps whatever the error (so a run always reaches the last stage's settings); the last
stage runs until the step budget is spent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["CURRICULUM", "Stage"]


@dataclass(frozen=True)
class Stage:
    """One curriculum stage.

    Attributes
    ----------
    name: str
        Short label for logs.
    poses: str
        ``"inplane"`` (views differ by in-plane rotation only), ``"cone"`` (tilts within
        ``cone_degrees`` of a common direction, any in-plane angle) or ``"full"`` (SO(3)-uniform).
    views: int
        Views per set (reference included); >= 3 because two views share one common
        line and cannot fix their relative angle.
    snr_min, snr_max: float | None
        SNR drawn log-uniformly per set in [snr_min, snr_max]; ``None`` = noise-free.
    ctf_probability: float
        Fraction of sets simulated with a CTF.
    max_shift_px: float
        Largest particle displacement per axis, in model pixels.
    cone_degrees: float
        Half-angle of the cone for ``poses == "cone"``.
    gate_degrees: float
        Validation median geodesic error (°) that ends the stage.
    min_steps, max_steps: int
        Bounds on the stage's length in optimiser steps.
    """

    name: str
    poses: str
    views: int
    snr_min: float | None = None
    snr_max: float | None = None
    ctf_probability: float = 0.0
    max_shift_px: float = 0.0
    cone_degrees: float = 30.0
    gate_degrees: float = 10.0
    min_steps: int = 200
    max_steps: int = 100_000

    def to_dict(self) -> dict[str, object]:
        """Plain dict for logs and checkpoints."""
        return asdict(self)


CURRICULUM: tuple[Stage, ...] = (
    Stage("inplane-clean", "inplane", views=4, gate_degrees=8.0, min_steps=200, max_steps=3_000),
    Stage("inplane-shift", "inplane", views=6, max_shift_px=3.0, gate_degrees=8.0, min_steps=200, max_steps=3_000),
    Stage("cone30-clean", "cone", views=8, max_shift_px=3.0, cone_degrees=30.0, gate_degrees=12.0,
          min_steps=300, max_steps=6_000),
    Stage("full-clean", "full", views=8, max_shift_px=4.0, gate_degrees=15.0, min_steps=500, max_steps=20_000),
    Stage("full-snr10-1", "full", views=16, snr_min=1.0, snr_max=10.0, max_shift_px=4.0, ctf_probability=0.3,
          gate_degrees=20.0, min_steps=500, max_steps=40_000),
    Stage("full-snr1-0.1", "full", views=32, snr_min=0.1, snr_max=1.0, max_shift_px=4.0, ctf_probability=0.5,
          gate_degrees=0.0, min_steps=500),
)
"""The default curriculum (the same on CPU and GPU; the GPU only gets further along it)."""
