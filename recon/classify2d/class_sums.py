"""The class sums: what every particle added to each class, per half set, removable exactly.

A particle assigned to class ``k`` with in-plane rotation ``psi``, displacement ``d``
(pixels) and weight ``w`` adds, at each frequency ``q`` of the class's rfft grid,

    num[h, k, q] += w * CTF(A q) * X(A q) * exp(+2 pi i (A q).d / B)
    den[h, k, q] += w * CTF(A q)^2

where ``A = A(psi)`` is the 2x2 block of RELION's Euler matrix of ``(0, 0, psi)``, ``X``
the particle's spectrum (read off its padded spectrum, :mod:`.fourier_sampling`) and
``h`` its half set. So the class average ``num / den`` is the particle turned and
re-centred into the class's frame and CTF-corrected (Wiener), the model of
:mod:`.inplane_search` read backwards. The CTF is evaluated exactly at the turned
frequencies ``A q`` (:func:`~cryofastar.recon.ctf.ctf_at`). The sums are float64/complex128,
so removing a contribution (the same call with ``sign=-1``) restores them to rounding
(~1e-12 relative), which is what lets older particles be re-assigned as the classes
sharpen. Only frequencies within Nyquist (``|q| <= B / 2``) are summed.

Layout: the rfft grid of :func:`~cryofastar.recon.fourier.rfft2_centered`
(`(B, B // 2 + 1)`, DC at index 0, phase origin at the box centre ``B // 2``).
"""

from __future__ import annotations

import math

import torch

from ..ctf import CtfParams, ctf_at
from ..fourier import irfft2_centered, rfft_frequencies_2d
from .fourier_sampling import PaddedSpectra, sample_spectra

__all__ = ["ClassSums", "rotated_frequencies"]


def rotated_frequencies(box: int, psi_degrees: torch.Tensor) -> torch.Tensor:
    """`(m, B, B//2+1, 2)` the frequencies ``A(psi) q`` (Fourier pixels) of every rfft point ``q`` of the class grid."""
    q = rfft_frequencies_2d(box, dtype=torch.float64) * box  # (B, H, 2) in Fourier pixels
    psi = torch.deg2rad(psi_degrees.to(torch.float64))
    c, s = torch.cos(psi)[:, None, None], torch.sin(psi)[:, None, None]
    qx, qy = q[..., 0], q[..., 1]
    return torch.stack([c * qx + s * qy, -s * qx + c * qy], -1)


class ClassSums:
    """Numerators and CTF-squared denominators of ``K`` classes, per half set.

    Parameters
    ----------
    n_classes: int
        ``K``.
    box: int
        Particle side ``B`` in pixels.
    apix: float
        Pixel size in Å.

    Attributes
    ----------
    num: torch.Tensor
        `(2, K, B, B//2+1)` complex128.
    den: torch.Tensor
        `(2, K, B, B//2+1)` float64.
    """

    def __init__(self, n_classes: int, box: int, apix: float) -> None:
        self.box = box
        self.apix = float(apix)
        shape = (2, n_classes, box, box // 2 + 1)
        self.num = torch.zeros(shape, dtype=torch.complex128)
        self.den = torch.zeros(shape, dtype=torch.float64)
        self.mass = torch.zeros(2, n_classes, dtype=torch.float64)
        q = rfft_frequencies_2d(box, dtype=torch.float64) * box
        self.inside = q.norm(dim=-1) <= box / 2  # (B, H) within Nyquist
        self.radius = q.norm(dim=-1)
        self.ring = self.radius.round().long().clamp(max=box // 2)  # (B, H) ring index 0 .. B//2
        self._ring_count = torch.bincount(self.ring.flatten(), minlength=box // 2 + 1).to(torch.float64)

    @property
    def n_classes(self) -> int:
        return int(self.num.shape[1])

    def contributions(self, spectra: PaddedSpectra, present: torch.Tensor, ctf: CtfParams | None,
                      psi_degrees: torch.Tensor, shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The numerator and denominator terms (module docstring), unweighted, of one pose per spectrum.

        Parameters
        ----------
        spectra: PaddedSpectra
            `n` particles' padded spectra.
        present: torch.Tensor
            `(n,)` bool: the spectra that contribute (``m`` of them; only those are sampled).
        ctf: CtfParams | None
            `(m,)` CTF of each contributing particle, or ``None``.
        psi_degrees, shifts: torch.Tensor
            `(n,)` rotations (degrees) and `(n, 2)` displacements ``d`` (pixels, x, y) of every spectrum.

        Returns
        -------
        tuple[torch.Tensor, torch.Tensor]
            `(m, B, B//2+1)` complex128 numerator terms and float64 denominator terms.
        """
        box = self.box
        which = None if bool(present.all()) else torch.nonzero(present)[:, 0]
        freq = rotated_frequencies(box, psi_degrees if which is None else psi_degrees[which])  # (m, B, H, 2)
        m = freq.shape[0]
        values = sample_spectra(spectra, freq.reshape(m, -1, 2).to(torch.float32), which).reshape(m, box, -1)
        values = values.to(torch.complex128)
        phase = (2 * math.pi / box) * torch.einsum("nbhc,nc->nbh", freq, shifts[present].to(torch.float64))
        values = values * torch.polar(torch.ones_like(phase), phase)
        if ctf is None:
            weight = torch.ones(values.shape, dtype=torch.float64)
        else:  # float64 throughout, so that a removal cancels its addition whatever the batch
            weight = ctf_at(ctf, freq / (box * self.apix), dtype=torch.float64)
        inside = self.inside.to(torch.float64)
        return values * weight * inside, weight.square() * inside

    def add(self, classes: torch.Tensor, halves: torch.Tensor, weights: torch.Tensor,
            terms: tuple[torch.Tensor, torch.Tensor], sign: float = 1.0) -> None:
        """Add (``sign=1``) or remove (``sign=-1``) weighted terms.

        Parameters
        ----------
        classes: torch.Tensor
            `(m,)` int64 class index ``0 .. K-1`` of each term.
        halves: torch.Tensor
            `(m,)` int64 half set, 1 or 2.
        weights: torch.Tensor
            `(m,)` membership weights.
        terms: tuple[torch.Tensor, torch.Tensor]
            From :meth:`contributions`.
        sign: float
            1 to add, -1 to remove.
        """
        num, den = terms
        w = (sign * weights.to(torch.float64))[:, None, None]
        slot = (halves.long() - 1) * self.n_classes + classes.long()
        self.num.view(-1, *self.num.shape[2:]).index_add_(0, slot, num * w)
        self.den.view(-1, *self.den.shape[2:]).index_add_(0, slot, den * w)
        self.mass.view(-1).index_add_(0, slot, w[:, 0, 0])

    def tensors(self) -> list[torch.Tensor]:
        """``num``, ``den`` and ``mass``: everything the sums hold (what an all-reduce adds, what zeroing empties)."""
        return [self.num, self.den, self.mass]

    def shift_classes(self, shifts: torch.Tensor) -> None:
        """Move each class's content by `(K, 2)` pixels (x, y) (a phase ramp; exact)."""
        q = rfft_frequencies_2d(self.box, dtype=torch.float64) * self.box
        phase = -(2 * math.pi / self.box) * (q[None] * shifts.to(torch.float64)[:, None, None, :]).sum(-1)
        self.num *= torch.polar(torch.ones_like(phase), phase)[None]

    def counts(self) -> torch.Tensor:
        """`(K,)` float64 sum of the membership weights in each class (both half sets)."""
        return self.mass.sum(0)

    def wiener(self, ssnr: torch.Tensor | None = None, half: int | None = None) -> torch.Tensor:
        """`(K, B, B//2+1)` complex128 CTF-corrected class spectra ``num / (den + den_ring / ssnr)``.

        Parameters
        ----------
        ssnr: torch.Tensor | None
            `(K, B//2+1)` spectral SNR of each class per ring (index = rounded radius);
            ``None``: a plain ratio with a floor of 1e-3 of the ring mean (no regulariser).
        half: int | None
            1 or 2 for one half set's average; ``None`` for both together.
        """
        if half is None:
            num, den = self.num.sum(0), self.den.sum(0)
        else:
            num, den = self.num[half - 1], self.den[half - 1]
        ring_mean = self.ring_mean(den)[:, self.ring]  # (K, B, H)
        if ssnr is None:
            floor = 1e-3 * ring_mean + 1e-12
        else:
            floor = ring_mean / ssnr.clamp(min=1e-6)[:, self.ring] + 1e-12
        return torch.where(self.inside, num / (den + floor), 0)

    def ring_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`(m, B, B//2+1)` values on the rfft grid -> `(m, B//2+1)` their sums per ring (rounded radius)."""
        flat = values.reshape(values.shape[0], -1)
        return torch.zeros(values.shape[0], self.box // 2 + 1, dtype=flat.dtype).index_add_(
            1, self.ring.flatten(), flat)

    def ring_mean(self, values: torch.Tensor) -> torch.Tensor:
        """`(m, B, B//2+1)` real values on the rfft grid -> `(m, B//2+1)` float64 their means per ring."""
        return self.ring_sum(values.to(torch.float64)) / self._ring_count

    def images(self, spectra: torch.Tensor) -> torch.Tensor:
        """`(K, B, B)` float32 real-space images of class spectra (centre ``B // 2``)."""
        return irfft2_centered(spectra, self.box).to(torch.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"num": self.num.clone(), "den": self.den.clone(), "mass": self.mass.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["num"].shape != self.num.shape:
            raise ValueError(f"class sums of shape {tuple(state['num'].shape)} do not fit {tuple(self.num.shape)}")
        self.num = state["num"].to(torch.complex128).clone()
        self.den = state["den"].to(torch.float64).clone()
        self.mass = state["mass"].to(torch.float64).clone()
