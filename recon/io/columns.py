"""Names of the particle STAR columns this package adds to RELION's (all optional to readers).

One place for each, read and written by the offline job, the daemon and ``evaluate``.
"""

from __future__ import annotations

__all__ = ["CONFIDENCE_COLUMN", "NETWORK_COLUMNS", "SCORE_COLUMN", "SIMULATED_JUNK_COLUMN", "SPREAD_COLUMN"]

CONFIDENCE_COLUMN = "rlnCryofastarConfidence"
"""Per-particle mean network confidence (> 1, higher is surer; 0 without a network)."""
SCORE_COLUMN = "rlnCryofastarRefineScore"
"""Projection-matching score (normalised cross-correlation) of a refined particle; NaN if not refined."""
SPREAD_COLUMN = "rlnCryofastarAngularSpread"
"""Posterior angular spread (degrees) of a refined particle's orientation; NaN if not refined."""
NETWORK_COLUMNS = ("rlnCryofastarNetworkAngleRot", "rlnCryofastarNetworkAngleTilt", "rlnCryofastarNetworkAnglePsi",
                   "rlnCryofastarNetworkOriginXAngst", "rlnCryofastarNetworkOriginYAngst")
"""The network's own pose of each particle (before refinement), in RELION's units (degrees, Å)."""
SIMULATED_JUNK_COLUMN = "rlnCryofastarSimulatedJunk"
"""Truth of a simulated session (``simulate --junk``): 0 for a real particle, else the junk type (1 noise box,
2 carbon edge, 3 aggregate of two particles, 4 off-centre particle; ``recon.simulate.junk.JunkType``)."""
