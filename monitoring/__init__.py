"""Metrics, subscribers and the dashboard; reads only the published protocol and metrics.

(Lands with the daemon and dashboard issues; this package is empty until then.)
"""
