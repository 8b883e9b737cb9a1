"""Starting poses from elsewhere (a network, class averages) confirmed by one random start of ab initio.

Poses that come from outside the map (a learned decoder's class poses, a network's
per-particle poses) can be wrong in a self-consistent way: two starts of the same decoder
agree, the map they make matches its own particles, and local refinement keeps them. The
map-only ab initio's convergence verdict has no such blind spot, because its starts share
nothing (:class:`~cryofastar.recon.ab_initio.AbInitioVerdict`). :func:`confirm_poses`
applies that verdict to the outside poses: one random start of the seed stage on the
same particles, and the two pose sets must agree up to one global rotation, the hand and
a cyclic symmetry (:func:`~cryofastar.recon.pose_alignment.pose_agreement`, ab initio's
own rule and tolerance). A random start can itself settle wrong, so a disagreement does
not say which of the two is right: callers fall back to the full map-only ab initio.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..ctf import CtfParams
from ..pose_alignment import pose_agreement
from .offline import _Run
from .settings import AbInitioSettings
from .soft_poses import SoftPoses

__all__ = ["PoseConfirmation", "confirm_poses"]


@dataclass
class PoseConfirmation:
    """Whether one random start of ab initio found the same structure as the poses given.

    Attributes
    ----------
    agree: bool
        The random start's poses agree with the given ones (ab initio's rule).
    median_degrees: float
        Median angle between the two pose sets after the global alignment (degrees).
    symmetry_order: int
        The cyclic symmetry the agreement needed (1: none).
    particles: int
        Particles the random start ran on.
    seconds: float
        Wall time of the check.
    """

    agree: bool
    median_degrees: float
    symmetry_order: int
    particles: int
    seconds: float

    def as_dict(self) -> dict[str, object]:
        """Plain JSON-able dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs."""
        symmetric = f", up to C{self.symmetry_order}" if self.symmetry_order > 1 else ""
        return (f"a random ab initio start on {self.particles} particles {'agrees' if self.agree else 'DISAGREES'} "
                f"with them (median {self.median_degrees:.1f}°{symmetric}; {self.seconds:.0f} s)")


def confirm_poses(images: torch.Tensor, half_sets: torch.Tensor, apix: float, rotations: torch.Tensor,
                  ctf: CtfParams | None = None, settings: AbInitioSettings | None = None, seed: int = 0,
                  device: torch.device | str = "cpu",
                  callback: Callable[[str, SoftPoses, torch.Tensor], None] | None = None) -> PoseConfirmation:
    """Run one random start of ab initio's seed stage on these particles and compare it with ``rotations``.

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` particles [y, x], centre ``B // 2`` (the seed set: ``n`` of the order of
        ``settings.seed_particles``; all of them are used).
    half_sets: torch.Tensor
        `(n,)` 1 or 2.
    apix: float
        Pixel size of ``images`` (Å).
    rotations: torch.Tensor
        `(n, 3, 3)` RELION matrices (map -> particle frame) to confirm.
    ctf: CtfParams | None
        Per-particle CTF, or ``None``.
    settings: AbInitioSettings | None
        Ab initio's settings (seed passes, agreement tolerance; the diameter is measured when not given).
    seed: int
        Seed of the random start.
    device: torch.device | str
        Where to compute.
    callback: Callable | None
        Called after every pass as :func:`~cryofastar.recon.ab_initio.run_ab_initio`'s (what it raises ends
        the run: a caller's way to stop it).
    """
    n = images.shape[0]
    if images.ndim != 3 or n == 0:
        raise ValueError(f"images must be (n, B, B) with n > 0, got {tuple(images.shape)}")
    if rotations.shape != (n, 3, 3):
        raise ValueError(f"rotations must be ({n}, 3, 3), got {tuple(rotations.shape)}")
    t0 = time.perf_counter()
    run = _Run(images, torch.as_tensor(half_sets).long().cpu(), ctf, settings or AbInitioSettings(), seed, callback)
    everyone = torch.arange(n)
    run.settings = run.with_diameter(everyone, apix)
    _, _, poses = run.seed_start(everyone, run.settings.seed_passes, apix, device, restart=0)
    agreement = pose_agreement(rotations.to(torch.float64).cpu(), poses.rotations, run.settings.agreement_degrees)
    return PoseConfirmation(agree=bool(agreement.agree), median_degrees=float(agreement.median_degrees),
                            symmetry_order=int(agreement.order), particles=n, seconds=time.perf_counter() - t0)
