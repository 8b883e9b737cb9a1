"""Subscribers and (with the dashboard issue) the dashboard.

Reads only the published protocol (:mod:`cryofastar.protocol`) and the metrics,
never the daemon's internals. :mod:`~cryofastar.monitoring.subscriber` is the reference
subscriber behind ``cryofastar-stream subscribe``;
:mod:`~cryofastar.monitoring.dashboard_process` runs the live dashboard
(:mod:`~cryofastar.monitoring.dashboard_server`) in this process or in a child process.
"""
