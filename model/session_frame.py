"""One frame for a whole session: poses of any number of particles, 128 views at a time.

A forward pass holds at most ``views`` images (128), but a session has 100,000s of
particles, and a map needs all their poses in ONE frame and ONE hand. The design
(docs/session-frame.md):

1. **Fixed reference.** One particle, chosen once by confidence
   (:func:`cryofastar.model.reference.select_reference`), is view 0 of *every* pass.
   The network predicts every view relative to the reference, so every pass lands in
   the reference's frame; that frame *is* the map frame (the reference's RELION
   matrix is the identity, the others' are ``A_i = R_iᵀ``).
2. **Anchors fix the hand.** A molecule and its mirror give identical images, so each
   pass may come out in either hand. The ``anchors`` most confident particles of the
   first pass(es) are re-posed in every later pass; their rotations there are compared
   with their stored ones directly and mirrored (``J R J``, ``J = diag(1, 1, -1)``), and
   the pass is mirrored when that agrees better. The mean anchor disagreement (°) is
   reported per pass as a consistency check.
3. A pass is therefore ``[reference, anchors..., new particles...]``: ``views - 1 -
   anchors`` new particles per pass (119 with the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from cryofastar.recon.rotations import geodesic_degrees, mirror_rotations

from .kabsch import fpm_to_poses
from .network import CryoFastAR

__all__ = ["PoseBatch", "SessionFrame"]

@dataclass
class PoseBatch:
    """Poses of a batch of particles in the session frame.

    Attributes
    ----------
    rotations: torch.Tensor
        `(n, 3, 3)` float64 RELION matrices.
    origins_px: torch.Tensor
        `(n, 2)` float64 rlnOrigin (x, y) in model pixels (× model pixel size = Å).
    confidence: torch.Tensor
        `(n,)` float32 mean predicted confidence of each view (> 1; higher is surer).
    anchor_disagreement_degrees: torch.Tensor
        `(passes,)` mean geodesic disagreement of the anchors per pass (NaN where a pass
        had no anchors yet).
    mirrored: torch.Tensor
        `(passes,)` bool, passes that were mirrored to the session's hand.
    """

    rotations: torch.Tensor
    origins_px: torch.Tensor
    confidence: torch.Tensor
    anchor_disagreement_degrees: torch.Tensor
    mirrored: torch.Tensor


class SessionFrame:
    """Poses particles of one session into one frame (see module docstring).

    Parameters
    ----------
    model: CryoFastAR
        The network, in eval mode, on its device.
    reference: torch.Tensor
        `(b, b)` the session's reference particle at the model box.
    views: int
        Views per forward pass (reference and anchors included), >= 3.
    anchors: int
        Particles re-posed in every pass to fix the hand.
    sets_per_pass: int
        Sets stacked in one forward call (more is faster on a GPU).
    """

    def __init__(self, model: CryoFastAR, reference: torch.Tensor, views: int = 128, anchors: int = 8,
                 sets_per_pass: int = 1):
        if views < 3:
            raise ValueError(f"--views must be at least 3, got {views}")
        self.model = model
        self.views = views
        self.n_anchors = max(0, min(anchors, views - 2))
        self.sets_per_pass = sets_per_pass
        self.reference = reference.float().cpu()
        self.anchor_images = torch.empty(0, *reference.shape)
        self.anchor_rotations = torch.empty(0, 3, 3, dtype=torch.float64)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        """Everything needed to continue the session in the same frame and hand."""
        return {"reference": self.reference, "anchor_images": self.anchor_images,
                "anchor_rotations": self.anchor_rotations, "views": self.views, "anchors": self.n_anchors}

    @staticmethod
    def complete(state: dict) -> bool:
        """Whether a frame saved with :meth:`state_dict` has all its anchors (it no longer changes); ``{}``
        (no frame yet): False."""
        return bool(state) and len(state["anchor_rotations"]) >= int(state["anchors"])

    @classmethod
    def from_state_dict(cls, model: CryoFastAR, state: dict, sets_per_pass: int = 1) -> SessionFrame:
        """Rebuild a frame saved with :meth:`state_dict`."""
        frame = cls(model, state["reference"], int(state["views"]), int(state["anchors"]), sets_per_pass)
        frame.anchor_images, frame.anchor_rotations = state["anchor_images"], state["anchor_rotations"]
        return frame

    @torch.no_grad()
    def _forward(self, sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpm, confidence = self.model(sets.to(self.device))
        x0, box = self.model.planar_coordinates, self.model.config.box
        rel, origins = fpm_to_poses(fpm.float(), confidence.float(), x0, box)
        return rel.cpu(), origins.cpu(), confidence.float().mean(dim=(-2, -1)).cpu()

    def pose(self, images: torch.Tensor) -> PoseBatch:
        """Pose `(n, b, b)` model-box images (any n) in the session frame."""
        n = images.shape[0]
        rotations = torch.empty(n, 3, 3, dtype=torch.float64)
        origins = torch.empty(n, 2, dtype=torch.float64)
        confidence = torch.empty(n)
        disagreement, mirrored = [], []
        start = 0
        if self.anchor_rotations.shape[0] < self.n_anchors and n > 0:
            # bootstrap pass: no anchors yet; its most confident particles become them
            take = min(n, self.views - 1)
            rel, orig, conf = self._forward(torch.cat([self.reference[None], images[:take].float()])[None])
            rotations[:take], origins[:take], confidence[:take] = rel[0, 1:].transpose(-1, -2), orig[0, 1:], conf[0, 1:]
            best = conf[0, 1:].argsort(descending=True)[: self.n_anchors - self.anchor_rotations.shape[0]]
            self.anchor_images = torch.cat([self.anchor_images, images[:take][best].float()])
            self.anchor_rotations = torch.cat([self.anchor_rotations, rel[0, 1:][best]])
            disagreement.append(float("nan"))
            mirrored.append(False)
            start = take
        per_pass = self.views - 1 - self.anchor_rotations.shape[0]
        a = self.anchor_rotations.shape[0]
        while start < n:
            chunks, bounds = [], []
            for _ in range(self.sets_per_pass):
                if start >= n:
                    break
                stop = min(n, start + per_pass)
                chunks.append(images[start:stop].float())
                bounds.append((start, stop))
                start = stop
            # sets of one forward call must have equal length: group by chunk size
            for size in sorted({b - a_ for a_, b in bounds}, reverse=True):
                group = [i for i, (lo, hi) in enumerate(bounds) if hi - lo == size]
                sets = torch.stack([torch.cat([self.reference[None], self.anchor_images, chunks[i]]) for i in group])
                rel, orig, conf = self._forward(sets)
                if a:
                    direct = geodesic_degrees(rel[:, 1 : 1 + a], self.anchor_rotations).mean(-1)
                    flipped = geodesic_degrees(mirror_rotations(rel[:, 1 : 1 + a]), self.anchor_rotations).mean(-1)
                    flip = flipped < direct
                    rel = torch.where(flip[:, None, None, None], mirror_rotations(rel), rel)
                    disagreement.extend(torch.minimum(direct, flipped).tolist())
                    mirrored.extend(flip.tolist())
                else:
                    disagreement.extend([float("nan")] * len(group))
                    mirrored.extend([False] * len(group))
                for k, i in enumerate(group):
                    lo, hi = bounds[i]
                    rotations[lo:hi] = rel[k, 1 + a :].transpose(-1, -2)
                    origins[lo:hi] = orig[k, 1 + a :]
                    confidence[lo:hi] = conf[k, 1 + a :]
        return PoseBatch(rotations, origins, confidence, torch.tensor(disagreement, dtype=torch.float64),
                         torch.tensor(mirrored, dtype=torch.bool))
