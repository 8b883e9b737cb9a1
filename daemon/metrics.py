"""Prometheus metrics of the daemon, served over HTTP at ``/metrics``.

Names follow Prometheus conventions: a ``cryofastar_`` prefix, ``_total`` for
counters, base units (seconds; the map resolution in **metres**, so 4.2 Å is
``4.2e-10``; multiply by 1e10 for Å). Each daemon owns its own registry, so several
can live in one process (tests) without clashing.

The metrics and their meaning are listed in docs/daemon.md ("Metrics"); a test
scrapes every one of them from a running daemon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from .metrics_server import MetricsServer

__all__ = ["DaemonMetrics", "serve_metrics"]

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class DaemonMetrics:
    """The daemon's metrics in their own registry."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.files_seen = Counter("cryofastar_files_seen", "Complete particle files given by the watcher.",
                                  registry=r)
        self.files_rejected = Counter("cryofastar_files_rejected", "Files rejected (see rejected.tsv).", registry=r)
        self.particles_ingested = Counter("cryofastar_particles_ingested", "Particles read from disk.", registry=r)
        self.particles_posed = Counter("cryofastar_particles_posed", "Particles posed by the network.", registry=r)
        self.particles_accumulated = Counter("cryofastar_particles_accumulated",
                                             "Particles inserted into the running map.", registry=r)
        self.particles_rejected = Counter("cryofastar_particles_rejected",
                                          "Particles dropped (NaN/Inf pixels or a failed batch).", registry=r)
        self.batches = Counter("cryofastar_batches", "Network forward passes run.", registry=r)
        self.particles_refined = Counter("cryofastar_particles_refined",
                                         "New particles whose poses were refined against the running map.", registry=r)
        self.particles_reposed = Counter("cryofastar_particles_reposed",
                                         "Particles already in the map re-posed against a newer map.", registry=r)
        self.maps_published = Counter("cryofastar_maps_published", "Maps written and published.", registry=r)
        self.latency = Histogram("cryofastar_stage_latency_seconds", "Wall time per item of a pipeline stage.",
                                 ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("cryofastar_queue_depth", "Items waiting in a pipeline queue.", ["queue"],
                                 registry=r)
        self.particles_in_map = Gauge("cryofastar_particles_in_map", "Particles in the running map.", registry=r)
        self.particles_excluded = Gauge("cryofastar_particles_excluded", "Particles taken out of the map as 2D junk "
                                        "(--exclude-junk; read and accounted for, not in the map).", registry=r)
        self.resolution = Gauge("cryofastar_map_resolution_meters",
                                "Gold-standard (half-map FSC 0.143) resolution of the running map, in metres.",
                                registry=r)
        self.resolution.set(math.nan)
        self.ab_initio_converged = Gauge("cryofastar_ab_initio_converged",
                                         "Verdict of the last map-only ab initio: 1 converged (two random starts "
                                         "agree), 0 not converged, NaN before any ran.", registry=r)
        self.ab_initio_converged.set(math.nan)
        self.pose_precision = Gauge("cryofastar_pose_precision_degrees",
                                    "Estimated median pose error of the refined particles, from their posterior "
                                    "angular spreads (degrees; NaN before any was refined).", registry=r)
        self.pose_precision.set(math.nan)
        # the 2D lane (daemon/classification_lane.py)
        self.classify_enabled = Gauge("cryofastar_classify_enabled", "1 while the 2D lane runs (or waits for "
                                      "particles), 0 when it is off (--no-classify) or disabled by a failure.",
                                      registry=r)
        self.classify_particles = Gauge("cryofastar_classify_particles", "Particles in the 2D classes.", registry=r)
        self.classify_alignments = Counter("cryofastar_classify_alignments", "2D alignments of particles (new and "
                                           "re-aligned).", registry=r)
        self.classify_rate = Gauge("cryofastar_classify_alignments_per_second",
                                   "2D alignments per second over the last 30 s.", registry=r)
        self.classify_waiting = Gauge("cryofastar_classify_waiting", "Particles read and waiting for the 2D lane "
                                      "(queued, known by location only, or held until the diameter is known).",
                                      registry=r)
        self.classify_failures = Counter("cryofastar_classify_failures", "Failures of the 2D lane (each disables it; "
                                         "the 3D lane goes on).", registry=r)
        self.classes_version = Gauge("cryofastar_classes_version", "Number of the last 2D class set published "
                                     "(0 before the first).", registry=r)
        self.classes_junk = Gauge("cryofastar_classes_junk", "Classes of the last class set flagged as junk.",
                                  registry=r)
        self.classes_updated = Gauge("cryofastar_classes_updated_timestamp_seconds", "Unix time of the last 2D "
                                     "class set published (NaN before the first).", registry=r)
        self.classes_updated.set(math.nan)

    def set_resolution_angstrom(self, angstrom: float) -> None:
        """Set the resolution gauge from Å (NaN while undefined)."""
        self.resolution.set(angstrom * 1e-10 if math.isfinite(angstrom) else math.nan)

    def stage_seconds(self) -> dict[str, tuple[int, float]]:
        """``{stage: (items, total seconds)}`` of every stage observed so far (the latency histogram's sums)."""
        counts: dict[str, int] = {}
        sums: dict[str, float] = {}
        for metric in self.latency.collect():
            for sample in metric.samples:
                if sample.name.endswith("_count"):
                    counts[sample.labels["stage"]] = int(sample.value)
                elif sample.name.endswith("_sum"):
                    sums[sample.labels["stage"]] = float(sample.value)
        return {stage: (counts.get(stage, 0), sums[stage]) for stage in sums}

    def total(self, name: str) -> float:
        """The value of counter ``cryofastar_<name>_total`` (e.g. ``total("batches")``)."""
        value = self.registry.get_sample_value(f"cryofastar_{name}_total")
        if value is None:
            raise KeyError(f"no counter cryofastar_{name}_total")
        return value


def serve_metrics(metrics: DaemonMetrics, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` from one thread with bounded connections (:mod:`.metrics_server`).

    Returns the server: ``server_port`` is the port bound; ``shutdown()`` then ``server_close()`` stop it.

    Raises
    ------
    OSError
        The port is in use (the message names it).
    """
    def render(accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)  # Prometheus text, or OpenMetrics if asked for
        return encoder(metrics.registry), content_type

    try:
        return MetricsServer(render, host, port)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc})") from None
