"""cryofastar-stream: live cryo-EM reconstruction beside the microscope.

Subpackages: :mod:`cryofastar.recon` (Fourier reconstruction core, RELION I/O,
simulator), :mod:`cryofastar.model` (network and pose solver),
:mod:`cryofastar.daemon` (the streaming pipeline), :mod:`cryofastar.monitoring`
(metrics, subscribers, dashboard).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cryofastar-stream")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "uninstalled"

__all__ = ["__version__"]
