"""Particle views simulated directly as Fourier rays (the common-line network's input), without a projection.

The real-space path to a view's rays is :func:`~cryofastar.recon.simulate.particles.simulate_particles`
(projection by a central slice of the 2x padded map, shift, CTF on a field twice the box, noise)
followed by :func:`~cryofastar.recon.fourier_rays.image_rays` (centred 2D DFT, bilinear samples on
rays). This module goes from the map's 3D transform to the rays, in the same convention and scale
(docs/conventions.md, "Fourier rays"): a view at RELION matrix ``A`` has, at image frequency
``k = (kx, ky)`` (frequency pixels of the box ``B``), the value of the map's unnormalised 3D DFT at
``A.T @ (kx, ky, 0)`` (Fourier slice theorem, :mod:`cryofastar.recon.euler`; unnormalised DFTs on
both sides, phase origins at the centres ``B // 2``, no other factor).

:class:`RayVolume` holds the map's transform once (zero-padded to ``2B``, divided beforehand by the
trilinear kernel's sinc^2 as torch-fourier-slice does, the Hermitian half ``kx >= 0`` kept) and
samples it at any 3D frequencies. Two ways to make the rays (``sampling``):

``"grid"`` (default): what the real path gives, without its projection.
    The view's central slice is sampled on the image's ``rfft2`` grid (``B (B/2 + 1)`` points) and
    shifted there (phase ramp); a CTF is applied as ``simulate_particles`` applies it (inverse DFT,
    zero-padded to ``2B``, times the CTF, boxed out: the signal the CTF moves out of the box is
    lost), and the grid is sampled on the rays bilinearly as ``image_rays`` does. Correlation with
    ``image_rays(simulate_particles(...))`` 0.9999+ with or without shifts and CTF (box 48), the
    amplitude within 0.3 %: what differs is the real path's cropping of its ``2B`` projection (the
    trilinear interpolation's ghosts outside the box are cropped there, folded in here). The view's
    power for the SNR comes from the same grid (Parseval), or from the boxed-out image with a CTF.
``"rays"``: the continuous transform at the ray points.
    The transform is sampled trilinearly at ``A.T @ (r cos t, r sin t, 0)`` themselves, times the
    phase ramp and the CTF at those frequencies (a CTF on a periodic box: no signal lost out of it).
    ``image_rays``' bilinear interpolation between Fourier pixels is absent, so these rays are
    5-8 % stronger than ``image_rays`` of the image (more for a particle off centre) and correlate
    ~0.998 with them, ~0.97-0.99 with a CTF (whose oscillations the interpolation blurs). With
    ``snr`` the power still needs the ``"grid"`` samples.

Noise (both ways) is the bilinear ray sampling of the DFT of a real white Gaussian image of std
``sigma`` (``rfft2`` of an ``(n, B, B)`` draw, the samples ``image_rays`` takes): the statistics of
``image_rays`` of a noisy image exactly, variance ``B^2 sigma^2`` per Fourier pixel reduced and
correlated between neighbouring ray points by the interpolation. The phase origin of that DFT is left
at the corner: a circular shift leaves white noise's distribution unchanged.

The map's constant background (the mean of its 4-voxel outer shell, taken off before padding as
torch-fourier-slice does) is added back at the image DFT's DC (``"grid"``), where the real path has
it; rays exclude DC but their innermost radii weigh it bilinearly.

Conventions: RELION matrices ``A`` `(..., 3, 3)` (map frame -> view frame); a displacement ``d``
pixels (x, y) moves the particle by ``+d`` (values times ``exp(-2 pi i k.d / B)``, the sign of
:func:`~cryofastar.recon.fourier.phase_shift_rfft2`), recorded as origins ``-d * apix`` Å; SNR as in
``simulate_particles``: ``mean over views of var(clean image over the box) / sigma^2`` (unbiased
variance), one sigma per set of views. Even boxes only. Everything runs on the maps' device, float32;
the random draws on the generator's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch_ctf import calculate_total_phase_shift

from ..ctf import CtfParams
from ..fourier_rays import ray_angles, ray_radii
from .particles import CtfRange

__all__ = ["RayViews", "RayVolume", "simulate_ray_sets", "simulate_ray_views"]

Sampling = Literal["grid", "rays"]


class RayVolume:
    """The 3D transform of one map, or of ``S`` maps of one box, ready for sampling.

    Parameters
    ----------
    volume: torch.Tensor
        `(B, B, B)` map [z, y, x] (or `(S, B, B, B)` maps), centre ``B // 2``, ``B`` even. The
        transform lives on ``volume.device``, float32.

    Attributes
    ----------
    box: int
        ``B``.
    planes: torch.Tensor
        `(S, 2, 2B, 2B, B + 1)` float32: real and imaginary parts of the unnormalised centred
        DFT of the map zero-padded to ``2B`` (divided beforehand by the trilinear kernel's sinc^2),
        [kz, ky, kx] with ``kz, ky`` from ``-B`` (index 0) and ``kx >= 0`` from index 0, in
        frequency pixels of the padded box: the ``grid_sample`` input.
    background: torch.Tensor
        `(S,)` float32: the mean of each map's 4-voxel outer shell, taken off before padding.
    """

    def __init__(self, volume: torch.Tensor):
        if volume.dim() == 3:
            volume = volume[None]
        if volume.dim() != 4 or not volume.shape[-1] == volume.shape[-2] == volume.shape[-3]:
            raise ValueError(f"volume must be (B, B, B) or (S, B, B, B), got {tuple(volume.shape)}")
        box = volume.shape[-1]
        if box % 2 or box < 10:
            raise ValueError(f"the box must be even and at least 10, got {box}")
        if not volume.is_floating_point():
            raise ValueError(f"volume must be real floating point, got {volume.dtype}")
        volume = volume.to(torch.float32)
        self.box = box
        interior = volume[:, 4:-4, 4:-4, 4:-4]
        shell = (volume.sum((-3, -2, -1)) - interior.sum((-3, -2, -1))) / (box**3 - (box - 8) ** 3)
        self.background = shell
        # Trilinear interpolation on the padded grid (size N) multiplies real space by
        # sinc^2(x / N) per axis, x from the centre: divide it out first (only the box is nonzero).
        n_pad = 2 * box
        x = torch.arange(box, device=volume.device, dtype=torch.float32) - box // 2
        s = torch.sinc(x / n_pad) ** 2
        corrected = (volume - shell[:, None, None, None]) / (s[:, None, None] * s[:, None] * s)
        lo = box // 2  # pad so the centre B//2 lands on N//2 = B
        padded = F.pad(corrected, (lo, n_pad - box - lo) * 3)
        spectrum = torch.fft.rfftn(torch.fft.ifftshift(padded, dim=(-3, -2, -1)), dim=(-3, -2, -1))
        spectrum = torch.fft.fftshift(spectrum, dim=(-3, -2))  # (S, N, N, N//2+1), DC at [N//2, N//2, 0]
        self.planes = torch.view_as_real(spectrum).permute(0, 4, 1, 2, 3).contiguous()

    @classmethod
    def stack(cls, volumes: Sequence[RayVolume]) -> RayVolume:
        """One :class:`RayVolume` of ``S`` maps from several of one box (sampled in one call)."""
        if not volumes:
            raise ValueError("no volumes to stack")
        boxes = {v.box for v in volumes}
        if len(boxes) != 1:
            raise ValueError(f"volumes to stack must share one box, got {sorted(boxes)}")
        out = cls.__new__(cls)
        out.box = volumes[0].box
        out.planes = torch.cat([v.planes for v in volumes])
        out.background = torch.cat([v.background for v in volumes])
        return out

    def __len__(self) -> int:
        return int(self.planes.shape[0])

    @property
    def device(self) -> torch.device:
        return self.planes.device

    def sample(self, points: torch.Tensor) -> torch.Tensor:
        """The maps' unnormalised 3D DFTs at arbitrary frequencies, trilinear on the 2x padded grid.

        Parameters
        ----------
        points: torch.Tensor
            `(S, ..., 3)` frequencies (kx, ky, kz) in frequency pixels of the box ``B`` (cycles per
            box), one set per map; any `(..., 3)` for a single map. Beyond ``|k| = B`` on an axis
            (the padded grid's Nyquist) the value is 0.

        Returns
        -------
        values: torch.Tensor
            `points.shape[:-1]` complex64: ``sum_voxels map * exp(-2 pi i k.(x - c) / B)``, ``c``
            the map centre. Hermitian: ``value(-k) = conj(value(k))`` exactly.
        """
        if points.shape[-1] != 3 or (len(self) > 1 and (points.dim() < 3 or points.shape[0] != len(self))):
            raise ValueError(f"points must be ({len(self)}, ..., 3), got {tuple(points.shape)}")
        shape = points.shape[:-1]
        # padded-grid coordinates (2 k), read at -k where kx < 0 (the half kept), normalised for
        # align_corners=True: index i of a side of m samples at -1 + 2 i / (m - 1)
        n_pad = 2 * self.box
        q = points.reshape(len(self), -1, 1, 1, 3).to(device=self.device, dtype=torch.float32)
        sign = 1.0 - 2.0 * (q[..., :1] < 0).float()
        scale = q.new_tensor([4.0 / self.box, 4.0 / (n_pad - 1), 4.0 / (n_pad - 1)])
        bias = q.new_tensor([-1.0, 2.0 * self.box / (n_pad - 1) - 1.0, 2.0 * self.box / (n_pad - 1) - 1.0])
        grid = torch.addcmul(bias, q, sign * scale)
        out = F.grid_sample(self.planes, grid, mode="bilinear", align_corners=True).reshape(len(self), 2, -1)
        return torch.complex(out[:, 0], out[:, 1] * sign.reshape(len(self), -1)).reshape(shape)


@dataclass
class RayViews:
    """Simulated views as rays, and the truth that made them.

    Leading dimensions ``...`` are ``()`` from :func:`simulate_ray_views` and ``(S,)`` from
    :func:`simulate_ray_sets`; ``V`` views per set, ``L`` rays, ``R`` radii.

    Attributes
    ----------
    rays: torch.Tensor
        `(..., V, L, R)` complex64 noisy rays, the convention and scale of ``image_rays``.
    clean: torch.Tensor
        `(..., V, L, R)` complex64 the same without noise.
    rotations: torch.Tensor
        `(..., V, 3, 3)` float64 RELION matrices.
    displacements_px: torch.Tensor
        `(..., V, 2)` float64 (x, y) displacement of each particle in pixels.
    origins_angstrom: torch.Tensor
        `(..., V, 2)` float64 rlnOriginX/YAngst ``= -displacement * apix``.
    ctf: CtfParams | None
        Parameters of the ``prod(...) * V`` views, set by set (row ``s * V + v``), or ``None``.
    noise_sigma: torch.Tensor
        `(...)` float64 real-space noise std per set (0 without noise).
    """

    rays: torch.Tensor
    clean: torch.Tensor
    rotations: torch.Tensor
    displacements_px: torch.Tensor
    origins_angstrom: torch.Tensor
    ctf: CtfParams | None
    noise_sigma: torch.Tensor


def simulate_ray_views(
    ray_volume: RayVolume,
    rotations: torch.Tensor,
    n_rays: int,
    n_radii: int,
    max_radius_fraction: float,
    apix: float,
    generator: torch.Generator,
    shifts_px: torch.Tensor | None = None,
    max_shift_px: float = 0.0,
    ctf: CtfParams | CtfRange | None = None,
    snr: float | None = None,
    noise_sigma: float | None = None,
    sampling: Sampling = "grid",
) -> RayViews:
    """Simulate ``V`` views of one map as rays (see the module docstring).

    Parameters
    ----------
    ray_volume: RayVolume
        One map's transform (``len(ray_volume) == 1``); everything runs on its device.
    rotations: torch.Tensor
        `(V, 3, 3)` RELION matrices of the views.
    n_rays, n_radii: int
        ``L`` rays over a full turn, ``R`` radii per ray (:func:`~cryofastar.recon.fourier_rays.image_rays`).
    max_radius_fraction: float
        Outermost radius as a fraction of Nyquist, in (0, 1].
    apix: float
        Pixel size in Å (for the CTF and the origins).
    generator: torch.Generator
        Randomness (shifts, CTF from a range, noise); draws happen on its device.
    shifts_px: torch.Tensor | None
        `(V, 2)` displacements (x, y) in pixels; ``None`` draws them uniform in
        ``[-max_shift_px, max_shift_px]`` per axis (none when that is 0).
    max_shift_px: float
        See ``shifts_px``.
    ctf: CtfParams | CtfRange | None
        Per-view CTF parameters (length ``V``), a range to draw them from (a CPU generator), or
        ``None`` for no CTF.
    snr: float | None
        Signal-to-noise ratio as in ``simulate_particles``; ``None`` (or infinite) for noise-free
        unless ``noise_sigma`` is given.
    noise_sigma: float | None
        Real-space noise std, used instead of ``snr``.
    sampling: str
        ``"grid"`` (reproduce ``image_rays`` of the image) or ``"rays"`` (sample the ray points).

    Returns
    -------
    RayViews
        Without leading set dimension: ``rays`` `(V, L, R)`, ``noise_sigma`` a 0-d tensor.
    """
    if len(ray_volume) != 1:
        raise ValueError(f"simulate_ray_views takes one map, got {len(ray_volume)}: use simulate_ray_sets")
    if rotations.dim() != 3 or rotations.shape[-2:] != (3, 3):
        raise ValueError(f"rotations must be (V, 3, 3), got {tuple(rotations.shape)}")
    out = simulate_ray_sets(
        ray_volume, rotations[None], n_rays, n_radii, max_radius_fraction, apix, generator,
        shifts_px=None if shifts_px is None else shifts_px[None], max_shift_px=max_shift_px, ctf=ctf,
        snr=snr, noise_sigma=noise_sigma, sampling=sampling,
    )
    return RayViews(**{f.name: _first(getattr(out, f.name)) for f in fields(RayViews)})


def simulate_ray_sets(
    volumes: RayVolume | Sequence[RayVolume],
    rotations: torch.Tensor,
    n_rays: int,
    n_radii: int,
    max_radius_fraction: float,
    apix: float | Sequence[float] | torch.Tensor,
    generator: torch.Generator,
    shifts_px: torch.Tensor | None = None,
    max_shift_px: float = 0.0,
    ctf: CtfParams | CtfRange | None = None,
    snr: float | Sequence[float] | torch.Tensor | None = None,
    noise_sigma: float | Sequence[float] | torch.Tensor | None = None,
    sampling: Sampling = "grid",
) -> RayViews:
    """Simulate ``S`` sets of ``V`` views, set ``s`` of map ``s``, all views at once.

    Parameters
    ----------
    volumes: RayVolume | Sequence[RayVolume]
        ``S`` maps of one box: a stacked :class:`RayVolume` (one ``grid_sample`` call for all) or a
        sequence (one call per map, no copy of the transforms). Everything runs on their device.
    rotations: torch.Tensor
        `(S, V, 3, 3)` RELION matrices.
    n_rays, n_radii, max_radius_fraction:
        As in :func:`simulate_ray_views`.
    apix: float | Sequence[float] | torch.Tensor
        Pixel size in Å, one or `(S,)` (one per map).
    generator: torch.Generator
        Randomness; draws happen on its device.
    shifts_px: torch.Tensor | None
        `(S, V, 2)` displacements in pixels, or ``None`` (drawn, see ``max_shift_px``).
    max_shift_px: float
        Displacements drawn uniform in ``[-max_shift_px, max_shift_px]`` per axis when ``shifts_px`` is ``None``.
    ctf: CtfParams | CtfRange | None
        ``S * V`` parameter sets (row ``s * V + v``), a range to draw them from, or ``None``.
    snr: float | Sequence[float] | torch.Tensor | None
        One or `(S,)` signal-to-noise ratios; each set gets the sigma of its own mean clean variance.
    noise_sigma: float | Sequence[float] | torch.Tensor | None
        One or `(S,)` real-space noise stds, used instead of ``snr``.
    sampling: str
        ``"grid"`` or ``"rays"`` (module docstring).

    Returns
    -------
    RayViews
        With leading dimension ``S``.
    """
    stacked = volumes if isinstance(volumes, RayVolume) else None
    parts = [volumes] if stacked is not None else list(volumes)
    if not parts or any(not isinstance(v, RayVolume) for v in parts):
        raise ValueError("volumes must be a RayVolume or a non-empty sequence of them")
    n_maps = len(stacked) if stacked is not None else sum(len(v) for v in parts)
    box, device = parts[0].box, parts[0].device
    if any(v.box != box for v in parts):
        raise ValueError(f"all volumes must share one box, got {sorted({v.box for v in parts})}")
    if rotations.dim() != 4 or rotations.shape[0] != n_maps or rotations.shape[-2:] != (3, 3):
        raise ValueError(f"rotations must be ({n_maps}, V, 3, 3), got {tuple(rotations.shape)}")
    if not 0 < max_radius_fraction <= 1:
        raise ValueError(f"max_radius_fraction must be in (0, 1], got {max_radius_fraction}")
    if n_rays < 1 or n_radii < 1:
        raise ValueError(f"n_rays and n_radii must be positive, got {n_rays}, {n_radii}")
    if sampling not in ("grid", "rays"):
        raise ValueError(f"sampling must be 'grid' or 'rays', got {sampling!r}")
    n_views = rotations.shape[1]
    n = n_maps * n_views
    apix_t = _per_set(apix, n_maps, "apix")
    if apix_t is None or not bool((apix_t > 0).all()):
        raise ValueError(f"apix must be positive, got {apix}")
    sigma = _per_set(noise_sigma, n_maps, "noise_sigma")
    if sigma is not None and not bool((sigma >= 0).all()):
        raise ValueError(f"noise_sigma must be non-negative, got {noise_sigma}")
    snr_t = _per_set(snr, n_maps, "snr")
    if sigma is None and snr_t is not None:
        if not bool((snr_t > 0).all()):
            raise ValueError(f"SNR must be positive, got {snr}")
        if not bool(torch.isfinite(snr_t).all()):
            if bool(torch.isfinite(snr_t).any()):
                raise ValueError("snr must be finite for every set or for none")
            snr_t = None

    truth_device = rotations.device
    rotations = rotations.to(torch.float64)
    if shifts_px is None:
        shifts_px = torch.zeros(n_maps, n_views, 2, dtype=torch.float64)
        if max_shift_px > 0:
            shifts_px = (torch.rand(n_maps, n_views, 2, generator=generator, dtype=torch.float64,
                                    device=generator.device) * 2 - 1) * max_shift_px
    elif shifts_px.shape != (n_maps, n_views, 2):
        raise ValueError(f"shifts_px must be ({n_maps}, {n_views}, 2), got {tuple(shifts_px.shape)}")
    shifts_px = shifts_px.to(device=truth_device, dtype=torch.float64)
    params = ctf.sample(n, generator) if isinstance(ctf, CtfRange) else ctf
    if params is not None and len(params) != n:
        raise ValueError(f"ctf must hold {n} parameter sets, got {len(params)}")

    rot = rotations.to(device=device, dtype=torch.float32)
    shifts = shifts_px.to(device=device, dtype=torch.float32).reshape(n, 2)
    shifted = bool((shifts_px != 0).any())
    box_angstrom = (box * apix_t).repeat_interleave(n_views).to(device)  # (n,) float64
    ctf_poly = None if params is None else _CtfPolynomial(params, box_angstrom)

    def slice_values(k2: torch.Tensor, offset_px: float = 0.0) -> torch.Tensor:
        """`(P, 2)` view-frame frequencies -> `(n, P)` transform values at ``A.T @ (kx, ky, 0)``, the
        particle displaced by its shift plus ``offset_px`` on both axes."""
        points = k2 @ rot[:, :, :2, :]  # (S, V, P, 3)
        if stacked is not None:
            values = stacked.sample(points.reshape(n_maps, -1, 3))
        else:
            values = torch.cat([v.sample(p.reshape(len(v), -1, 3))
                                for v, p in zip(parts, points.split([len(v) for v in parts]), strict=True)])
        values = values.reshape(n, -1)
        if shifted or offset_px:  # the particle moves by +d: exp(-2 pi i k.d / B)
            angle = ((shifts + offset_px) @ k2.T) * (-2 * math.pi / box)
            values = values * torch.polar(torch.ones_like(angle), angle)
        return values

    # The view's DFT on the image's rfft2 grid: needed by "grid", and for the power (SNR) by both.
    spectrum = clean_images = None
    if sampling == "grid" or (sigma is None and snr_t is not None):
        grid_k = _grid_frequencies(box, device)
        # with a CTF the image is needed: moved by B/2, the plain inverse DFT puts its centre at B/2
        spectrum = slice_values(grid_k, 0.0 if ctf_poly is None else box // 2)
        # the map's constant background, added back as the real path does: the image DFT's DC only
        background = torch.cat([v.background for v in parts]).to(device).repeat_interleave(n_views)
        spectrum[:, 0] += background * float(box) ** 3
        spectrum = spectrum.reshape(n, box, box // 2 + 1)
        if ctf_poly is not None:
            clean_images = _boxed_ctf(torch.fft.irfft2(spectrum, s=(box, box)), ctf_poly)
            spectrum = torch.fft.rfft2(clean_images) * _centre_phase(box, device)
    if sigma is None:
        if snr_t is None:
            sigma = torch.zeros(n_maps, dtype=torch.float64)
        else:  # simulate_particles: mean over views of the (unbiased) variance over the box
            if clean_images is not None:
                variance = clean_images.var(dim=(-2, -1))
            else:  # Parseval: sum over the full grid of |F|^2 = B^2 sum of squares; DC left out
                weights = _grid_weights(box, device)
                variance = (spectrum.abs().square() * weights).sum((-2, -1)) / (float(box) ** 2 * (box**2 - 1))
            sigma = (variance.reshape(n_maps, n_views).double().mean(-1).cpu() / snr_t).sqrt()
    noisy = bool((sigma > 0).any())

    ray_k = _half_ray_points(n_rays, n_radii, box, max_radius_fraction, device)  # (Lh, R, 2)
    bilinear = _Bilinear(ray_k.reshape(-1, 2), box)
    noise = None
    if noisy:  # the DFT of a white real image (its phase origin at the corner: the same distribution)
        draw = torch.randn(n, box, box, generator=generator, device=generator.device).to(device)
        noise = torch.fft.rfft2(draw * sigma.to(device=device, dtype=torch.float32).repeat_interleave(n_views)
                                [:, None, None])
    if sampling == "grid":
        sampled = bilinear(spectrum) if noise is None else bilinear(spectrum, noise)
        clean_half, noise_half = sampled[:, 0], None if noise is None else sampled[:, 1]
    else:
        flat = ray_k.reshape(-1, 2)
        clean_half = slice_values(flat)
        if ctf_poly is not None:
            clean_half = clean_half * ctf_poly(flat, 1.0)
        noise_half = None if noise is None else bilinear(noise)[:, 0]
    half = (n, *ray_k.shape[:2])
    clean = _full_turn(clean_half.reshape(half), n_rays)
    rays = clean if noise_half is None else clean + _full_turn(noise_half.reshape(half), n_rays)
    lead = (n_maps, n_views)
    return RayViews(
        rays=rays.reshape(*lead, n_rays, n_radii), clean=clean.reshape(*lead, n_rays, n_radii),
        rotations=rotations, displacements_px=shifts_px,
        origins_angstrom=-shifts_px * apix_t.to(truth_device)[:, None, None],
        ctf=params, noise_sigma=sigma,
    )


class _CtfPolynomial:
    """Per-view CTFs at many frequencies, fast: ``-sin(chi)`` with ``chi = k^2 (a D(theta) + b k^2) + c``.

    The coefficients ``a, b, c`` of each view are read off torch-ctf's phase (the function
    :func:`~cryofastar.recon.ctf.ctf_at` calls) at three probe points in float64, so the CTF is the
    same as ``ctf_at``'s; the astigmatic defocus ``D(theta)`` is ``ctf_at``'s. Then float32, a few
    operations per frequency (``ctf_at`` costs some 20 in float64).

    Parameters
    ----------
    params: CtfParams
        ``n`` views' parameters.
    box_angstrom: torch.Tensor
        `(n,)` float64 each view's box side ``B * apix`` in Å, on the device to compute on.
    """

    def __init__(self, params: CtfParams, box_angstrom: torch.Tensor):
        device = box_angstrom.device

        def per(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=torch.float64)

        probes = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64, device=device)
        phase = calculate_total_phase_shift(  # defocus (µm) and k^2 (1/Å^2) at the probes, (n, 3)
            defocus_um=probes[:, 0], voltage_kv=per(params.voltage_kv)[:, None],
            spherical_aberration_mm=per(params.spherical_aberration_mm)[:, None],
            phase_shift_degrees=per(params.phase_shift_degrees)[:, None],
            amplitude_contrast_fraction=per(params.amplitude_contrast)[:, None],
            fftfreq_grid_angstrom_squared=probes[:, 1],
        )
        c, b = phase[:, 0], phase[:, 1] - phase[:, 0]
        a = (phase[:, 2] - phase[:, 1]) / 1e4  # per Å of defocus
        inverse_area = 1.0 / box_angstrom.to(torch.float64) ** 2  # k^2 in 1/Å^2 per (frequency pixel)^2
        u, v = per(params.defocus_u_angstrom), per(params.defocus_v_angstrom)
        angle = 2 * torch.deg2rad(per(params.defocus_angle_degrees))
        half = (u - v) / 2
        # a D(theta) k^2 = a k^2 (mean + half cos 2(theta - angle)), with k^2 cos 2 theta = kx^2 - ky^2
        # and k^2 sin 2 theta = 2 kx ky: linear in (kx^2 + ky^2, kx^2 - ky^2, 2 kx ky)
        scale = a * inverse_area
        self.mean, self.cos, self.sin = scale * (u + v) / 2, scale * half * angle.cos(), scale * half * angle.sin()
        self.quartic, self.constant = b * inverse_area**2, c
        self.b_factor = None
        if params.b_factor_angstrom2 is not None:  # exp(-B k^2 / 4)
            self.b_factor = -per(params.b_factor_angstrom2) / 4 * inverse_area
        self.scale = None if params.scale is None else per(params.scale)

    def __call__(self, k2: torch.Tensor, box_scale: float) -> torch.Tensor:
        """`(n, P)` float32 CTF at `(P, 2)` frequencies (kx, ky) in frequency pixels of a box of
        ``box_scale`` times the views' box."""
        kx, ky = k2[:, 0].double() / box_scale, k2[:, 1].double() / box_scale
        kk = kx.square() + ky.square()
        basis = torch.stack([kk, kx.square() - ky.square(), 2 * kx * ky, kk.square()]).float()  # (4, P)
        coefficients = torch.stack([self.mean, self.cos, self.sin, self.quartic], -1).float()  # (n, 4)
        chi = torch.addmm(self.constant.float()[:, None], coefficients, basis)
        ctf = -torch.sin(chi)
        if self.b_factor is not None:
            ctf = ctf * torch.exp(self.b_factor.float()[:, None] * kk.float())
        if self.scale is not None:
            ctf = ctf * self.scale.float()[:, None]
        return ctf


def _boxed_ctf(images: torch.Tensor, ctf: _CtfPolynomial) -> torch.Tensor:
    """The CTF as ``simulate_particles`` applies it: on a field twice the box, then boxed out.

    The image is zero-padded at the end of each axis rather than around it: the CTF acts by a
    circular convolution on the ``2B`` field, so the window comes back out at the same place.

    Parameters
    ----------
    images: torch.Tensor
        `(n, B, B)` real images [y, x].
    ctf: _CtfPolynomial
        The views' CTFs.

    Returns
    -------
    torch.Tensor
        `(n, B, B)` float32 images with the CTF, the signal it moves out of the box lost.
    """
    box = images.shape[-1]
    big = 2 * box
    field = torch.fft.rfft2(images, s=(big, big))
    field = field * ctf(_grid_frequencies(big, images.device), 2.0).reshape(-1, big, box + 1)
    return torch.fft.irfft2(field, s=(big, big))[:, :box, :box]


def _centre_phase(box: int, device: torch.device) -> torch.Tensor:
    """`(B, B/2 + 1)` ``(-1)^(kx + ky)``: takes a plain ``rfft2`` to the phase origin at the centre ``B/2``."""
    k = _grid_frequencies(box, device).to(torch.int64).sum(-1).reshape(box, box // 2 + 1)
    return 1.0 - 2.0 * (k % 2).float()


class _Bilinear:
    """Bilinear samples of ``rfft2`` grids at fixed frequencies, as ``image_rays`` samples the full grid.

    A frequency with ``kx < 0`` is read at ``-k`` and conjugated; rows are periodic (``ky = +B/2`` is the
    DFT's ``-B/2``, where ``image_rays`` would read zero beyond the grid: only radii above ``B/2 - 1``).

    Parameters
    ----------
    points: torch.Tensor
        `(P, 2)` (kx, ky) in frequency pixels, ``|k| <= B/2``.
    box: int
        Image side ``B``.
    """

    def __init__(self, points: torch.Tensor, box: int):
        self.sign = 1.0 - 2.0 * (points[:, 0] < 0).float()  # (P,)
        q = points * self.sign[:, None]
        # planes: rows ky = -B/2 .. B/2 (B + 1), columns kx = 0 .. B/2; align_corners=True
        self.grid = torch.stack([q[:, 0] * (4.0 / box) - 1.0, q[:, 1] * (2.0 / box)], -1)[None, None]
        self.rows = torch.arange(-(box // 2), box // 2 + 1, device=points.device) % box

    def __call__(self, *grids: torch.Tensor) -> torch.Tensor:
        """``m`` `(n, B, B/2 + 1)` complex grids (rows in FFT order) -> `(n, m, P)` complex64."""
        n, m = grids[0].shape[0], len(grids)
        stacked = torch.stack(grids, -1)[:, self.rows]  # (n, B + 1, B/2 + 1, m)
        planes = torch.view_as_real(stacked).reshape(*stacked.shape[:3], 2 * m).permute(0, 3, 1, 2)
        out = F.grid_sample(planes, self.grid.expand(n, -1, -1, -1), mode="bilinear", align_corners=True)
        out = out.reshape(n, m, 2, -1)
        return torch.complex(out[:, :, 0], out[:, :, 1] * self.sign)


def _per_set(value: float | Sequence[float] | torch.Tensor | None, n_maps: int, name: str) -> torch.Tensor | None:
    """A scalar or one value per set -> `(S,)` float64 on the CPU (``None`` stays ``None``)."""
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() == 1:
        return t.expand(n_maps).clone()
    if t.numel() != n_maps:
        raise ValueError(f"{name} must be one value or {n_maps}, got {t.numel()}")
    return t


def _grid_frequencies(box: int, device: torch.device) -> torch.Tensor:
    """`(B (B/2 + 1), 2)` float32 (kx, ky) in frequency pixels of an image's ``rfft2`` grid, row-major
    [ky, kx], ``ky`` in FFT order (``0 .. B/2 - 1, -B/2 .. -1``), ``kx = 0 .. B/2``."""
    ky = torch.fft.fftfreq(box, 1.0 / box, device=device)
    kx = torch.arange(box // 2 + 1, device=device, dtype=torch.float32)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    return torch.stack([gx, gy], -1).reshape(-1, 2)


def _grid_weights(box: int, device: torch.device) -> torch.Tensor:
    """`(B, B/2 + 1)` multiplicity of each ``rfft2`` frequency in the full grid (1 on the ``kx = 0``
    and ``kx = B/2`` columns, 2 elsewhere), 0 at DC."""
    w = torch.full((box, box // 2 + 1), 2.0, device=device)
    w[:, 0] = w[:, -1] = 1.0
    w[0, 0] = 0.0
    return w


def _half_ray_points(n_rays: int, n_radii: int, box: int, max_radius_fraction: float,
                     device: torch.device) -> torch.Tensor:
    """`(Lh, R, 2)` float32 (kx, ky) of rays ``0 .. Lh - 1``, ``Lh = L/2`` for even ``L`` (the rest are
    conjugates, :func:`_full_turn`) else ``L``."""
    n_half = n_rays // 2 if n_rays % 2 == 0 else n_rays
    theta = ray_angles(n_rays, device, torch.float64)[:n_half]
    radii = ray_radii(n_radii, box, max_radius_fraction, device, torch.float64)
    points = torch.stack([radii * theta.cos()[:, None], radii * theta.sin()[:, None]], -1)
    return points.to(torch.float32)


def _full_turn(half: torch.Tensor, n_rays: int) -> torch.Tensor:
    """`(n, Lh, R)` -> `(n, L, R)`: for even ``L``, ray ``l + L/2`` is the conjugate of ray ``l``."""
    return torch.cat([half, half.conj().resolve_conj()], 1) if n_rays % 2 == 0 else half


def _first(value: object) -> object:
    """A :class:`RayViews` field of one set: the set dimension dropped (CTF parameters as they are)."""
    return value[0] if isinstance(value, torch.Tensor) else value
