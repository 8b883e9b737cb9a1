"""RELION CTF parameters and their 2D CTF images (computed with torch-ctf).

Convention (docs/conventions.md, "CTF"): RELION's parameters — rlnDefocusU/V in
Å (positive = underfocus), rlnDefocusAngle in degrees (azimuth of the defocus-U
axis from +x), rlnVoltage in kV, rlnSphericalAberration in mm,
rlnAmplitudeContrast as a fraction, rlnPhaseShift in degrees, optional rlnCtfBfactor
(Å², envelope ``exp(-B |k|^2 / 4)``) and rlnCtfScalefactor. The CTF is RELION's
``-sin(chi)`` form, positive at low frequency for underfocus. torch-ctf
uses mean defocus and half the astigmatism in µm with the same angle and sign;
``tests/test_ctf.py`` checks it against RELION's formula.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch_ctf import calculate_ctf_2d, calculate_total_phase_shift

__all__ = ["CtfParams", "ctf_array", "ctf_at", "ctf_from_array", "ctf_rfft"]


@dataclass(frozen=True)
class CtfParams:
    """Per-particle CTF parameters, RELION units; every field a `(n,)` float64 tensor (the last two optional:
    ``None`` means RELION's default, no envelope and scale 1)."""

    defocus_u_angstrom: torch.Tensor
    defocus_v_angstrom: torch.Tensor
    defocus_angle_degrees: torch.Tensor
    voltage_kv: torch.Tensor
    spherical_aberration_mm: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift_degrees: torch.Tensor
    b_factor_angstrom2: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def __getitem__(self, index: torch.Tensor | slice) -> CtfParams:
        """Parameters of a subset of particles."""
        return CtfParams(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                            for f in fields(self)})

    def __len__(self) -> int:
        return int(self.defocus_u_angstrom.shape[0])

    @classmethod
    def cat(cls, parts: list[CtfParams]) -> CtfParams:
        """The parameters of several particle sets, one after the other."""
        out = {}
        for f in fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if all(v is None for v in values):
                out[f.name] = None
            else:  # a part without the optional field has RELION's default (B = 0, scale = 1)
                fill = 1.0 if f.name == "scale" else 0.0
                out[f.name] = torch.cat([torch.full((len(p),), fill, dtype=torch.float64) if v is None else v
                                         for p, v in zip(parts, values, strict=True)])
        return cls(**out)

    @classmethod
    def from_arrays(cls, **values: object) -> CtfParams:
        """Build from array-likes (float64 tensors, broadcast to a common length)."""
        def as_float64(v: object) -> torch.Tensor:
            if isinstance(v, torch.Tensor):
                return v.detach().to(torch.float64).reshape(-1)
            return torch.tensor(np.asarray(v, dtype=np.float64)).reshape(-1)  # copies

        tensors = {k: as_float64(v) for k, v in values.items() if v is not None}
        n = max(t.numel() for t in tensors.values())
        return cls(**{k: t.expand(n).clone() for k, t in tensors.items()})


def ctf_array(ctf: CtfParams | None, n: int) -> np.ndarray:
    """`(n, 9)` float64 parameters of ``n`` particles, one column per :class:`CtfParams` field in declaration
    order; NaN for an optional field not given, all NaN for no CTF (``ctf=None``)."""
    names = [f.name for f in fields(CtfParams)]
    out = np.full((n, len(names)), np.nan)
    if ctf is not None:
        for k, name in enumerate(names):
            value = getattr(ctf, name)
            if value is not None:
                out[:, k] = value.detach().double().numpy()
    return out


def ctf_from_array(array: np.ndarray) -> CtfParams | None:
    """Inverse of :func:`ctf_array` for rows that all have a CTF (``None`` when none has one, or no rows).

    An optional column (B-factor, scale) that is NaN everywhere is not given; NaN in some rows is RELION's
    default there (0 and 1).
    """
    if not len(array) or np.isnan(array[:, 0]).all():
        return None
    names = [f.name for f in fields(CtfParams)]
    values = {name: array[:, k] for k, name in enumerate(names[:7])}
    for k, (name, default) in enumerate((("b_factor_angstrom2", 0.0), ("scale", 1.0)), start=7):
        if not np.isnan(array[:, k]).all():
            values[name] = np.nan_to_num(array[:, k], nan=default)
    return CtfParams.from_arrays(**values)


def ctf_rfft(params: CtfParams, box: int, apix: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """CTF of each particle on the rfft grid of a ``box x box`` image.

    Parameters
    ----------
    params: CtfParams
        `n` particles' parameters.
    box: int
        Image side in pixels (the padded side when images are padded: the
        frequency spacing is ``1 / (box * apix)`` 1/Å).
    apix: float
        Pixel size in Å.
    device: torch.device | str
        Where to compute.

    Returns
    -------
    ctf: torch.Tensor
        `(n, box, box // 2 + 1)` float32, DC at index 0 (layout of
        :func:`~cryofastar.recon.fourier.rfft2_centered`).
    """
    def as_dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.float32)

    defocus_um = as_dev((params.defocus_u_angstrom + params.defocus_v_angstrom) / 2e4)
    astigmatism_um = as_dev((params.defocus_u_angstrom - params.defocus_v_angstrom) / 2e4)
    # torch-ctf takes the square root of the astigmatism: where V > U (RELION allows it) the
    # same CTF is U and V swapped, the axis turned by 90°
    angle = as_dev(params.defocus_angle_degrees) + 90.0 * (astigmatism_um < 0)
    ctf = calculate_ctf_2d(
        defocus=defocus_um,
        astigmatism=astigmatism_um.abs(),
        astigmatism_angle=angle,
        voltage=as_dev(params.voltage_kv),
        spherical_aberration=as_dev(params.spherical_aberration_mm),
        amplitude_contrast=as_dev(params.amplitude_contrast),
        phase_shift=as_dev(params.phase_shift_degrees),
        pixel_size=float(apix),
        image_shape=(box, box),
        rfft=True,
        fftshift=False,
    )
    ctf = ctf.reshape(len(params), box, box // 2 + 1).to(torch.float32)
    if params.b_factor_angstrom2 is not None:  # RELION: times exp(-B |k|^2 / 4), |k| in 1/Å
        ky = torch.fft.fftfreq(box, d=float(apix), device=ctf.device)
        kx = torch.fft.rfftfreq(box, d=float(apix), device=ctf.device)
        k2 = ky[:, None] ** 2 + kx[None, :] ** 2
        ctf = ctf * torch.exp(-as_dev(params.b_factor_angstrom2)[:, None, None] / 4 * k2)
    if params.scale is not None:
        ctf = ctf * as_dev(params.scale)[:, None, None]
    return ctf


def ctf_at(params: CtfParams, frequencies: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CTF of each particle at arbitrary frequencies (the same values as :func:`ctf_rfft` on its grid).

    RELION's defocus at the frequency's azimuth ``theta`` (from +x) is
    ``(U + V) / 2 + (U - V) / 2 * cos(2 (theta - rlnDefocusAngle))``; the phase is torch-ctf's.

    Parameters
    ----------
    params: CtfParams
        `n` particles' parameters.
    frequencies: torch.Tensor
        `(n, ..., 2)` (kx, ky) in 1/Å, one set per particle (``expand`` a shared set: no copy).
    dtype: torch.dtype
        Of the result (computed in float64 either way).

    Returns
    -------
    torch.Tensor
        `(n, ...)` CTF values.
    """
    f = frequencies.to(torch.float64)
    n = len(params)
    if f.ndim < 2 or f.shape[0] != n or f.shape[-1] != 2:
        raise ValueError(f"frequencies must be ({n}, ..., 2) for {n} particles, got {tuple(f.shape)}")
    extra = (1,) * (f.ndim - 2)

    def per(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64).reshape(n, *extra)

    fx, fy = f[..., 0], f[..., 1]
    k2 = fx.square() + fy.square()
    # cos(2 (theta - a)) = cos(2 theta) cos(2 a) + sin(2 theta) sin(2 a), without an angle per frequency
    inverse = torch.where(k2 > 0, 1 / k2.clamp(min=1e-300), 0)
    cos2, sin2 = (fx.square() - fy.square()) * inverse, 2 * fx * fy * inverse
    a = 2 * torch.deg2rad(per(params.defocus_angle_degrees))
    mean = (per(params.defocus_u_angstrom) + per(params.defocus_v_angstrom)) / 2
    half_astig = (per(params.defocus_u_angstrom) - per(params.defocus_v_angstrom)) / 2
    defocus = mean + half_astig * (cos2 * torch.cos(a) + sin2 * torch.sin(a))
    phase = calculate_total_phase_shift(
        defocus_um=defocus / 1e4,
        voltage_kv=per(params.voltage_kv),
        spherical_aberration_mm=per(params.spherical_aberration_mm),
        phase_shift_degrees=per(params.phase_shift_degrees),
        amplitude_contrast_fraction=per(params.amplitude_contrast),
        fftfreq_grid_angstrom_squared=k2,
    )
    ctf = -torch.sin(phase)
    if params.b_factor_angstrom2 is not None:
        ctf = ctf * torch.exp(-per(params.b_factor_angstrom2) / 4 * k2)
    if params.scale is not None:
        ctf = ctf * per(params.scale)
    return ctf.to(dtype)
