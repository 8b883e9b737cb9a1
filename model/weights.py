"""Shipped weights: safetensors files with the model config in their metadata.

The default weights live in ``model/weights/`` (installed as package data) and are
what the CLI and the daemon load unless ``--weights PATH`` says otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from cryofastar.recon.io.atomic import atomic_path
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .network import CryoFastAR, ModelConfig

__all__ = ["DEFAULT_WEIGHTS", "WeightsError", "load_model", "read_metadata", "save_weights", "warm_start"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "cryofastar-small.safetensors"


class WeightsError(ValueError):
    """A weights file is missing, unreadable or does not fit the network."""


def save_weights(model: CryoFastAR, path: str | os.PathLike[str], metadata: dict[str, object] | None = None) -> None:
    """Write ``model``'s parameters and config (plus JSON-serialisable ``metadata``) atomically."""
    meta = {"config": json.dumps(model.config.to_dict())}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """The decoded metadata of a weights file (``config`` and whatever training stored)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors weights file ({exc})") from None
    return {k: json.loads(v) for k, v in raw.items()}


def load_model(path: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu") -> CryoFastAR:
    """Build the network from a weights file (default: the shipped weights), in eval mode.

    Raises
    ------
    WeightsError
        The file is missing, unreadable, has no config, or its tensors do not fit.
    """
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    meta = read_metadata(path)
    if "config" not in meta:
        raise WeightsError(f"{path}: no model config in the metadata; not a cryofastar weights file")
    model = CryoFastAR(ModelConfig.from_dict(meta["config"]))  # type: ignore[arg-type]
    try:
        model.load_state_dict(load_file(str(path)))
    except (RuntimeError, SafetensorError) as exc:
        raise WeightsError(f"{path}: tensors do not fit the network ({str(exc).splitlines()[0]})") from None
    return model.to(device).eval()


def warm_start(model: CryoFastAR, path: str | os.PathLike[str]) -> list[str]:
    """Copy into ``model`` every tensor of a weights file whose name and shape match.

    Used to go on training from weights of a slightly different network (e.g. one that
    gained a layer): matching tensors are copied, the rest keep their initialisation.

    Returns
    -------
    names: list[str]
        The model's tensors that were *not* copied (left at their initialisation).

    Raises
    ------
    WeightsError
        The file is missing or unreadable, or no tensor matches at all.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    read_metadata(path)  # a clear error for a file that is not safetensors
    source = load_file(str(path))
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise WeightsError(f"{path}: no tensor fits this network; not weights of a related model")
    model.load_state_dict(matched, strict=False)
    return sorted(k for k in own if k not in matched)
