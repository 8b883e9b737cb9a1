"""The wire protocol of the daemon's published stream (docs/protocol.md).

The contract between the publisher (:mod:`cryofastar.daemon.publisher`) and every
subscriber (:mod:`cryofastar.monitoring`): both depend on it, it depends on neither.
The messages and their encoding are in :mod:`~cryofastar.protocol.messages`.
"""

from . import messages
from .messages import *  # noqa: F403 - the package's names are its one module's

__all__ = messages.__all__
