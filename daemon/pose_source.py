"""Where a session's poses come from: the CryoFastAR network, the map only, or the 2D classes.

``DaemonSettings.poses_from`` is what the user asked for. The *effective* source can
differ: when the shipped weights cannot be loaded (not installed, incompatible), a
``network`` session falls back to ``map-only`` (random poses until refinement starts,
then a streaming ab initio against the running map) with a warning. The daemon keeps
that effective value on its own (:attr:`Daemon.poses_from
<cryofastar.daemon.pipeline.Daemon.poses_from>`, the ``pose_source`` field of status
messages; their ``poses_from`` says where the map's poses come from in the current
refinement phase, :func:`~cryofastar.daemon.reporting.poses_now`); the settings object
stays as the user gave it. A ``classes`` session has no network either: random poses until
its 2D classes have settled, then class poses (:mod:`~cryofastar.engine.class_posing`).
"""

from __future__ import annotations

import logging

import torch
from cryofastar.model.weights import WeightsError, load_model

from .settings import DaemonSettings

__all__ = ["load_network"]

logger = logging.getLogger(__name__)


def load_network(settings: DaemonSettings, device: torch.device):  # noqa: ANN201 - (CryoFastAR | None, str)
    """The pose network of a session and the effective source of its poses.

    Parameters
    ----------
    settings: DaemonSettings
        The session's settings (not modified).
    device: torch.device
        Where the network runs.

    Returns
    -------
    tuple
        ``(model, poses_from)``: the network and ``"network"``; ``(None, "map-only")``
        when ``settings.poses_from`` is ``map-only`` or the shipped weights cannot be
        loaded (logged as a warning); ``(None, "classes")`` for ``classes``.

    Raises
    ------
    ValueError
        Weights the user named (``settings.weights``) cannot be loaded.
    """
    if settings.poses_from in ("map-only", "classes"):
        return None, settings.poses_from
    try:
        return load_model(settings.weights, device), "network"
    except WeightsError as exc:
        if settings.weights is not None:
            raise ValueError(str(exc)) from None  # weights the user named must load
        logger.warning("%s: the network is unavailable, poses come from the map only (--poses-from map-only)", exc)
        return None, "map-only"
