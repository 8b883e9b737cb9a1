"""The geometric decoder's configuration and weights files (safetensors, config in the metadata)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from cryofastar.recon.io.atomic import atomic_path
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .geometric_decoder import GeometricDecoder
from .ray_encoder import RayEncoder
from .weights import WeightsError, read_metadata

__all__ = ["DEFAULT_DECODER_WEIGHTS", "GeometricConfig", "build_decoder", "load_decoder", "save_decoder"]

KIND = "geometric-decoder"
DEFAULT_DECODER_WEIGHTS = Path(__file__).resolve().parent / "weights" / "cryofastar-geometric.safetensors"
"""The shipped geometric decoder (training run 1, docs/model-card.md)."""


@dataclass(frozen=True)
class GeometricConfig:
    """Everything that fixes the decoder's tensors and its input grid.

    Attributes
    ----------
    box: int
        Model box in pixels (views are Fourier-cropped or padded to it).
    n_rays, n_radii: int
        Ray grid: ``L`` rays over a full turn, ``R`` radii.
    max_radius_fraction: float
        Outermost radius as a fraction of Nyquist.
    anchors: int
        ``K`` anchor views beside the reference at inference (training scores every view of
        a set against all the others). More anchors made the poses robust to wrong lines
        (bench/bench_geometric.py: 32 views at SNR 1, 8 anchors 25°, 16: 15°, 31: 11°).
    width, depth, kernel, features: int
        The ray encoder (:class:`~cryofastar.model.ray_encoder.RayEncoder`).
    """

    box: int = 64
    n_rays: int = 96
    n_radii: int = 24
    max_radius_fraction: float = 0.75
    anchors: int = 24
    width: int = 96
    depth: int = 3
    kernel: int = 5
    features: int = 48

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> GeometricConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise WeightsError(f"unknown geometric decoder settings {unknown}")
        return cls(**values)  # type: ignore[arg-type]


def build_decoder(config: GeometricConfig) -> GeometricDecoder:
    """A freshly initialised decoder of ``config``.

    Its forward pass matches each pair by its best ray pair ("hard"): on held-out sets of 32
    views at SNR 1 that gave 11-15° where the soft probabilities gave 19-31° (the soft
    probabilities blur the pair covariances). Training uses the logits, not the forward pass.
    """
    encoder = RayEncoder(config.n_radii, width=config.width, depth=config.depth, kernel=config.kernel,
                         features=config.features)
    return GeometricDecoder(encoder, config.n_rays, anchors=config.anchors, matching="hard")


def save_decoder(decoder: GeometricDecoder, config: GeometricConfig, path: str | os.PathLike[str],
                 metadata: dict[str, object] | None = None) -> None:
    """Write the decoder's parameters (float32), its config and JSON ``metadata`` atomically."""
    meta = {"kind": json.dumps(KIND), "config": json.dumps(asdict(config))}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in decoder.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_decoder(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[GeometricDecoder,
                                                                                              GeometricConfig]:
    """The decoder of a weights file, in eval mode, and its config.

    Raises
    ------
    WeightsError
        Missing or unreadable file, not a geometric decoder's, or tensors that do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    meta = read_metadata(path)
    if meta.get("kind") != KIND or "config" not in meta:
        raise WeightsError(f"{path}: not geometric decoder weights (kind {meta.get('kind')!r})")
    config = GeometricConfig.from_dict(meta["config"])  # type: ignore[arg-type]
    decoder = build_decoder(config)
    try:
        decoder.load_state_dict(load_file(str(path)))
    except (RuntimeError, SafetensorError) as exc:
        raise WeightsError(f"{path}: tensors do not fit the decoder ({str(exc).splitlines()[0]})") from None
    return decoder.to(device).eval(), config
