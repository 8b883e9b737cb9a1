"""Poses from 2D classes: one decoder pass over the class averages, then each particle through its class.

Class averages are the views (issue 22): averaging 50-200 aligned particles lifts SNR 0.1
particles to SNR 1-10, where common lines are found. The steps, for the offline job and the
daemon alike:

1. **Which classes, in which order** (:func:`class_order`): non-empty classes by size, the
   classes not flagged junk first (the reference is the largest good class and the anchors
   the next ones), junk classes last, at most ``MAX_CLASS_VIEWS`` in one pass (the paper's
   128 views); a larger set is posed in further passes that share the reference and
   anchors.
2. **Class poses** (:func:`pose_classes`): the averages brought to the decoder's box
   (Fourier crop or pad, the field of view kept), on rays
   (:func:`~cryofastar.recon.fourier_rays.image_rays`), through the geometric decoder
   (:mod:`cryofastar.model.geometric_decoder`). Its relative rotation ``R_c = A_ref A_cᵀ``
   becomes the class's RELION matrix ``A_c = R_cᵀ`` in the reference class's frame (the
   map's frame), determined up to the mirror, which the map's hand carries.
3. **Do they hold?** (:meth:`ClassPoser.pose_particles`) The decoder poses the classes a second
   time from another reference and other anchors (:func:`second_start`: the classes at odd
   places first); the class poses are trusted only when the two starts agree up to one
   global rotation and hand (:func:`~cryofastar.recon.pose_alignment.pose_agreement`, the
   rule of ab initio's verdict, ``CLASS_AGREEMENT_DEGREES``). Measured on class averages of
   8 held-out procedural sessions (docs/model-card.md): with the shipped decoder the two
   starts agreed within 4° where the poses were right (median error 2-4°) and disagreed by
   27-91° where they were wrong (35-54°).
4. **Particle poses** (:func:`particle_poses`): a particle of class ``c`` with RELION's 2D
   angle ``psi`` is its class average transformed like a projection at ``(0, 0, psi)``
   (docs/conventions.md, "2D alignment"), so its pose is ``A = Rz(psi) @ A_c`` and its
   2D origin is its 3D origin.

The decoder is the shipped one (``model/weights/cryofastar-geometric.safetensors``, docs/model-card.md)
unless other weights are given, or the classical one on request: normalised correlation of raw rays,
each pair's best ray pair (:class:`~cryofastar.model.ray_encoder.ClassicalRayEncoder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryofastar.model.geometric_decoder import GeometricDecoder
from cryofastar.model.geometric_weights import DEFAULT_DECODER_WEIGHTS, GeometricConfig, load_decoder
from cryofastar.model.preprocess import to_model_box
from cryofastar.model.ray_encoder import ClassicalRayEncoder
from cryofastar.recon.euler import euler_to_matrix
from cryofastar.recon.fourier_rays import image_rays
from cryofastar.recon.pose_alignment import PoseAgreement, pose_agreement

from .policy import CLASS_AGREEMENT_DEGREES

__all__ = ["CLASSICAL_ANCHORS", "CLASS_WEIGHTS_HELP", "DEFAULT_DECODER_WEIGHTS", "MAX_CLASS_VIEWS",
           "MIN_AGREEMENT_CLASSES", "ClassPoser", "ClassPoses", "ClassViews", "check_class_weights", "class_order",
           "particle_poses", "second_start"]

MIN_AGREEMENT_CLASSES = 4
"""Fewer posed classes than this cannot be checked by two starts: the class poses are not trusted."""
MAX_CLASS_VIEWS = 128
"""Views in one decoder pass (reference and anchors included)."""
CLASSICAL_ANCHORS = 24
"""Anchors of the classical decoder: measured on class averages of SNR 0.1 sessions (docs/model-card.md),
more anchors made synchronisation robust to wrong lines (8: median 11 degrees, 24: 2.7 on one molecule)."""

CLASS_WEIGHTS_HELP = ("Geometric decoder for --poses-from classes: a weights file (cryofastar-stream train), shipped "
                      "(the shipped decoder) or classical (normalised correlation of rays, no parameters).")
"""The ``--class-weights`` option's help (``reconstruct`` and ``watch``)."""


def second_start(order: np.ndarray) -> np.ndarray:
    """The classes of ``order`` in another decoder order: those at odd places first (another reference, other
    anchors), then those at even places (module docstring, step 3)."""
    return np.concatenate([order[1::2], order[0::2]])


@dataclass(frozen=True)
class ClassPoses:
    """Every particle's pose through its class, and whether two decoder starts agree on the class poses.

    Attributes
    ----------
    rotations: torch.Tensor
        `(n, 3, 3)` float64 RELION matrices ``Rz(psi) A_c`` (NaN for a particle of a class not posed).
    classes_posed: int
        Classes the decoder posed.
    agreement: PoseAgreement | None
        The two starts' agreement over the posed classes (``None``: fewer than
        :data:`MIN_AGREEMENT_CLASSES`).
    """

    rotations: torch.Tensor
    classes_posed: int
    agreement: PoseAgreement | None

    @property
    def trusted(self) -> bool:
        """Whether two starts agree (module docstring, step 3)."""
        return self.agreement is not None and self.agreement.agree

    def as_dict(self) -> dict[str, object]:
        """The verdict for status messages and results: ``classes_posed``, ``agree``, ``agreement_degrees``."""
        a = self.agreement
        return {"classes_posed": self.classes_posed, "agree": self.trusted,
                "agreement_degrees": None if a is None else a.median_degrees}

    def summary(self) -> str:
        """One line, e.g. ``class poses trusted: two decoder starts agree (median 3.0°) on 48 classes``."""
        if self.agreement is None:
            return f"class poses not trusted: {self.classes_posed} classes are too few to check"
        verb = "agree" if self.trusted else "disagree"
        return (f"class poses {'' if self.trusted else 'NOT '}trusted: two decoder starts {verb} "
                f"(median {self.agreement.median_degrees:.1f}°) on {self.classes_posed} classes")


def check_class_weights(weights: str) -> None:
    """Raise ValueError (one line, naming the option) unless ``weights`` is shipped, classical or an existing file."""
    if weights not in ("shipped", "classical") and not Path(weights).is_file():
        raise ValueError(f"--class-weights {weights}: no such weights file (or say shipped or classical)")


def class_order(counts: torch.Tensor, junk: torch.Tensor) -> np.ndarray:
    """Non-empty classes, good before junk, each by decreasing size (stable: ties by class number).

    Parameters
    ----------
    counts: torch.Tensor
        `(K,)` class sizes (sum of membership weights).
    junk: torch.Tensor
        `(K,)` bool junk flags.

    Returns
    -------
    np.ndarray
        Class indices (0-based) in decoder order; empty classes are left out.
    """
    counts_np, junk_np = counts.double().cpu().numpy(), junk.bool().cpu().numpy()
    keys = np.lexsort((np.arange(len(counts_np)), -counts_np, junk_np))
    return keys[counts_np[keys] > 0]


@dataclass(frozen=True)
class ClassViews:
    """A 2D class set and its particles' 2D alignment: what class poses are made from.

    The offline job builds it from ``classify_source``; the daemon's 2D lane hands it to the
    3D lane once its classes have settled
    (:meth:`~cryofastar.daemon.classification_lane.ClassificationLane.class_views`).

    Attributes
    ----------
    averages: torch.Tensor
        `(K, B, B)` class averages [class, y, x], centre ``B // 2``, the particles' field of view.
    counts: torch.Tensor
        `(K,)` class sizes (sum of membership weights).
    junk: torch.Tensor
        `(K,)` bool junk flags.
    classes: np.ndarray
        `(n,)` int64 0-based class of each particle.
    psi_degrees: np.ndarray
        `(n,)` RELION 2D ``rlnAnglePsi`` of each particle (degrees).
    origins_angstrom: np.ndarray
        `(n, 2)` float64 RELION 2D ``rlnOriginX/YAngst`` of each particle (Å).
    stacks: np.ndarray | None
        `(n,)` str: the particles' stacks as the session's pose table names them (daemon; ``None`` offline,
        where particles are rows of the source).
    indices: np.ndarray | None
        `(n,)` int64 1-based index of each particle in its stack (with ``stacks``).
    version: int
        The class set (the daemon's ``classes`` message version; 0 offline).
    """

    averages: torch.Tensor
    counts: torch.Tensor
    junk: torch.Tensor
    classes: np.ndarray
    psi_degrees: np.ndarray
    origins_angstrom: np.ndarray
    stacks: np.ndarray | None = None
    indices: np.ndarray | None = None
    version: int = 0

    def __post_init__(self) -> None:
        n, k = len(self.classes), len(self.averages)
        if not len(self.psi_degrees) == len(self.origins_angstrom) == n:
            raise ValueError(f"class views of unequal lengths: {n} classes, {len(self.psi_degrees)} angles, "
                             f"{len(self.origins_angstrom)} origins")
        if self.stacks is not None and not (self.indices is not None and len(self.stacks) == len(self.indices) == n):
            raise ValueError("class views name their particles by stack and index, both of every particle")
        if not len(self.counts) == len(self.junk) == k:
            raise ValueError(f"{k} class averages but {len(self.counts)} counts and {len(self.junk)} junk flags")

    @classmethod
    def from_columns(cls, averages: torch.Tensor, counts: torch.Tensor, junk: torch.Tensor,
                     columns: dict[str, np.ndarray], stacks: np.ndarray | None = None,
                     indices: np.ndarray | None = None, version: int = 0) -> ClassViews:
        """From RELION Class2D particle columns (:func:`~cryofastar.recon.classify2d.particle_columns`:
        1-based ``rlnClassNumber``, ``rlnAnglePsi``, ``rlnOriginX/YAngst``); the other fields as above."""
        origins = np.stack([columns["rlnOriginXAngst"], columns["rlnOriginYAngst"]], -1).astype(np.float64)
        return cls(averages, counts, junk, np.asarray(columns["rlnClassNumber"], np.int64) - 1,
                   np.asarray(columns["rlnAnglePsi"], np.float64), origins, stacks, indices, version)


class ClassPoser:
    """Poses of class averages by the geometric decoder (module docstring, step 2).

    Parameters
    ----------
    decoder: GeometricDecoder
        The decoder (learned or classical).
    config: GeometricConfig
        Its box and ray grid.
    """

    def __init__(self, decoder: GeometricDecoder, config: GeometricConfig):
        self.decoder, self.config = decoder.eval(), config

    @classmethod
    def load(cls, weights: Path | str = "shipped", device: torch.device | str = "cpu") -> ClassPoser:
        """The decoder ``weights`` names: ``"shipped"`` (:data:`DEFAULT_DECODER_WEIGHTS`), ``"classical"``
        (no parameters) or a weights file of ``cryofastar-stream train``.

        Raises
        ------
        WeightsError
            The file is missing, unreadable or not a geometric decoder's.
        """
        if str(weights) == "classical":
            config = GeometricConfig(anchors=CLASSICAL_ANCHORS)
            decoder = GeometricDecoder(ClassicalRayEncoder(), config.n_rays, anchors=config.anchors,
                                       matching="hard")
            return cls(decoder.to(device), config)
        decoder, config = load_decoder(DEFAULT_DECODER_WEIGHTS if str(weights) == "shipped" else weights, device)
        return cls(decoder, config)

    @torch.no_grad()
    def pose_classes(self, averages: torch.Tensor, order: np.ndarray) -> torch.Tensor:
        """RELION matrices of the classes in ``order`` (module docstring, step 2).

        Parameters
        ----------
        averages: torch.Tensor
            `(K, B, B)` class averages [class, y, x], centre ``B // 2``.
        order: np.ndarray
            Classes to pose, reference first (:func:`class_order`); at least 2.

        Returns
        -------
        torch.Tensor
            `(K, 3, 3)` float64 matrices ``A_c`` in the reference class's frame; NaN for the
            classes not in ``order``.
        """
        if len(order) < 2:
            raise ValueError(f"class poses need at least 2 non-empty classes, got {len(order)}")
        c = self.config
        device = next(iter(self.decoder.buffers())).device
        views = to_model_box(averages[torch.as_tensor(order)].float(), c.box).to(device)
        rays = image_rays(views, c.n_rays, c.n_radii, c.max_radius_fraction)
        noise = _noise_scale(views)
        partners = min(c.anchors + 1, len(order))
        relative = torch.empty(len(order), 3, 3, dtype=torch.float64, device=device)
        first = self.decoder(rays[:MAX_CLASS_VIEWS], noise[:MAX_CLASS_VIEWS])
        relative[:MAX_CLASS_VIEWS] = first.rotations
        # further passes share the reference and anchors, whose rotations depend only on their own pairs:
        # every pass synchronises them identically, so all passes are in one frame and hand
        for start in range(MAX_CLASS_VIEWS, len(order), MAX_CLASS_VIEWS - partners):
            rows = torch.cat([torch.arange(partners), torch.arange(start, min(len(order), start + MAX_CLASS_VIEWS
                                                                              - partners))])
            relative[rows[partners:]] = self.decoder(rays[rows], noise[rows]).rotations[partners:]
        matrices = torch.full((len(averages), 3, 3), float("nan"), dtype=torch.float64)
        matrices[torch.as_tensor(order)] = relative.transpose(-1, -2).cpu()
        return matrices


    def pose_particles(self, views: ClassViews) -> ClassPoses:
        """Every particle's pose through its class, with the two starts' verdict (module docstring, steps 1-4)."""
        order = class_order(views.counts, views.junk)
        class_matrices = self.pose_classes(views.averages, order)
        agreement = None
        if len(order) >= MIN_AGREEMENT_CLASSES:
            again = self.pose_classes(views.averages, second_start(order))
            posed = torch.as_tensor(order)
            agreement = pose_agreement(class_matrices[posed], again[posed], CLASS_AGREEMENT_DEGREES)
        return ClassPoses(particle_poses(class_matrices, views.classes, views.psi_degrees), len(order), agreement)


def _noise_scale(views: torch.Tensor) -> torch.Tensor:
    """`(V,)` the noise level the learned encoder scales by: ``B`` times each average's own standard deviation.

    A class average has no noise to measure (Wiener-filtered, masked): its whole spread stands in for
    the noise, an overestimate by ``sqrt(1 + SNR)``. Chosen on class averages of validation-seed
    sessions (SNR 0.1, CTF): median class-pose error 3.0-3.4° for this and for 0.25-2x it, 5.6° for the
    spread outside the particle (about nothing), 6.0° for the classical decoder.
    """
    return views.flatten(1).std(dim=-1).clamp_min(1e-12) * views.shape[-1]


def particle_poses(class_matrices: torch.Tensor, classes: np.ndarray, psi_degrees: np.ndarray) -> torch.Tensor:
    """`(n, 3, 3)` float64 RELION matrices ``Rz(psi) @ A_c`` of particles (module docstring, step 3).

    Parameters
    ----------
    class_matrices: torch.Tensor
        `(K, 3, 3)` class poses (:meth:`ClassPoser.pose_classes`).
    classes: np.ndarray
        `(n,)` 0-based class of each particle.
    psi_degrees: np.ndarray
        `(n,)` RELION 2D ``rlnAnglePsi`` of each particle.
    """
    psi = torch.from_numpy(np.array(psi_degrees, dtype=np.float64))  # a copy: inputs may be read-only
    inplane = euler_to_matrix(torch.zeros_like(psi), torch.zeros_like(psi), psi)
    return inplane @ class_matrices[torch.from_numpy(np.array(classes, dtype=np.int64))]
