"""Pose a particle set: the network's recipe, and the random start of map-only sessions.

The recipe of the network (docs/session-frame.md), written once for the offline job, the
daemon and the benchmarks:

1. images at the input box ``B`` (pixel size ``apix`` Å) are Fourier-cropped to the
   model box ``b`` (:func:`~cryofastar.model.preprocess.to_model_box`; the field of view
   is kept, so the model's pixel size is ``apix * B / b``);
2. the session reference is the most confident of the candidates
   (:func:`~cryofastar.model.reference.select_reference`), chosen once;
3. every image is posed in the reference's frame, ``views`` per forward pass
   (:class:`~cryofastar.model.session_frame.SessionFrame`, anchors fix the hand);
4. shifts come back in Å (rlnOriginX/YAngst), rotations as RELION matrices ``A``.

:class:`RandomPoser` gives SO(3)-uniform rotations and zero shifts behind the same
interface: the start of a map-only session, which refinement replaces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from cryofastar.model.network import CryoFastAR
from cryofastar.model.preprocess import model_pixel_size, to_model_box
from cryofastar.model.reference import select_reference
from cryofastar.model.session_frame import SessionFrame
from cryofastar.model.weights import load_model
from cryofastar.recon.rotations import random_rotations

logger = logging.getLogger(__name__)

__all__ = ["NetworkPoser", "Poses", "RandomPoser", "sets_per_pass"]


def sets_per_pass(device: torch.device) -> int:
    """Passes stacked in one forward call: 4 on a GPU (faster), 1 on a CPU (measured no gain)."""
    return 4 if device.type == "cuda" else 1


@dataclass
class Poses:
    """Poses of `n` particles in the session frame.

    Attributes
    ----------
    rotations: torch.Tensor
        `(n, 3, 3)` float64 RELION matrices ``A`` (map frame -> particle frame).
    origins_angstrom: torch.Tensor
        `(n, 2)` float64 rlnOriginX/YAngst (Å).
    confidence: torch.Tensor
        `(n,)` float32 mean network confidence (> 1, higher is surer; 0 without a network).
    anchor_disagreement_degrees: torch.Tensor
        `(passes,)` mean anchor disagreement per forward pass (NaN before anchors exist; empty
        without a network).
    mirrored: torch.Tensor
        `(passes,)` bool, passes mirrored to the session's hand.
    """

    rotations: torch.Tensor
    origins_angstrom: torch.Tensor
    confidence: torch.Tensor
    anchor_disagreement_degrees: torch.Tensor
    mirrored: torch.Tensor

    def __len__(self) -> int:
        return int(self.rotations.shape[0])


class NetworkPoser:
    """The CryoFastAR network's posing recipe for one session (module docstring).

    Parameters
    ----------
    model: CryoFastAR
        The network, in eval mode, on its device.
    views: int
        Views per forward pass, the reference and anchors included (>= 3).
    anchors: int
        Anchor particles re-posed in every pass.
    frame_state: dict | None
        :meth:`state_dict` of an earlier poser of the same session (a resumed session keeps
        its reference, anchors and hand); ``None``: the reference is chosen by
        :meth:`choose_reference`.
    """

    def __init__(self, model: CryoFastAR, views: int = 128, anchors: int = 8, frame_state: dict | None = None) -> None:
        self.model = model
        self.views, self.anchors = views, anchors
        self._sets = sets_per_pass(next(model.parameters()).device)
        self.frame: SessionFrame | None = None
        if frame_state is not None:
            self.frame = SessionFrame.from_state_dict(model, frame_state, sets_per_pass=self._sets)

    @classmethod
    def load(cls, weights: Path | None, device: torch.device, views: int = 128, anchors: int = 8,
             frame_state: dict | None = None) -> NetworkPoser:
        """A poser with the network loaded from ``weights`` (``None``: the shipped weights) on ``device``."""
        return cls(load_model(weights, device), views, anchors, frame_state)

    @property
    def model_box(self) -> int:
        """The network's box ``b`` (px)."""
        return int(self.model.config.box)

    @property
    def has_reference(self) -> bool:
        """Whether the session reference is chosen."""
        return self.frame is not None

    def choose_reference(self, candidates: torch.Tensor) -> int:
        """Choose the session reference among `(K, B, B)` candidate images (input box); return its index.

        With a single candidate, that one.
        """
        small = to_model_box(candidates, self.model_box)
        best, _ = select_reference(self.model, small) if len(small) >= 2 else (0, None)
        self.frame = SessionFrame(self.model, small[best], views=self.views, anchors=self.anchors,
                                  sets_per_pass=self._sets)
        logger.info("session reference chosen among %d particles by confidence", len(small))
        return int(best)

    def pose(self, images: torch.Tensor, apix: float) -> Poses:
        """Poses of `(n, B, B)` images at the input box, pixel size ``apix`` Å, in the session frame.

        The session reference must be chosen first (:meth:`choose_reference`, or a ``frame_state``).
        """
        if self.frame is None:
            raise RuntimeError("no session reference yet: choose_reference() comes before pose()")
        batch = self.frame.pose(to_model_box(images, self.model_box))
        apix_model = model_pixel_size(images.shape[-1], apix, self.model_box)
        return Poses(batch.rotations, batch.origins_px * apix_model, batch.confidence,
                     batch.anchor_disagreement_degrees, batch.mirrored)

    def adopt_frame(self, frame_state: dict) -> None:
        """Pose in a frame another poser chose (its :meth:`state_dict`; another rank of the session)."""
        self.frame = SessionFrame.from_state_dict(self.model, frame_state, sets_per_pass=self._sets)

    @property
    def frame_complete(self) -> bool:
        """Whether the frame is chosen and has all its anchors (it no longer changes)."""
        return SessionFrame.complete(self.state_dict())

    def state_dict(self) -> dict:
        """The session frame (reference, anchors, hand): ``{}`` before the reference is chosen."""
        return {} if self.frame is None else self.frame.state_dict()


class RandomPoser:
    """SO(3)-uniform rotations and zero shifts: the poses of a map-only session until refinement replaces them.

    Parameters
    ----------
    seed: int
        Seed of the rotations (the same session draws the same ones).
    """

    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def pose(self, images: torch.Tensor, apix: float) -> Poses:  # noqa: ARG002 - same interface as NetworkPoser
        """Random poses of `(n, B, B)` images."""
        n = len(images)
        return Poses(random_rotations(n, self._generator), torch.zeros(n, 2, dtype=torch.float64), torch.zeros(n),
                     torch.empty(0), torch.zeros(0, dtype=torch.bool))
