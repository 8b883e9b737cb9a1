"""The wire protocol of the daemon's published stream (docs/protocol.md).

The contract between the publisher (:mod:`cryofastar.daemon.publisher`) and every
subscriber (:mod:`cryofastar.monitoring`): both depend on it, it depends on neither.
The messages and their encoding are in :mod:`~cryofastar.protocol.messages`.
"""

from .messages import (
    DTYPE,
    FSC_THRESHOLD,
    POSE_COLUMNS,
    PROTOCOL_VERSION,
    TOPICS,
    Message,
    PosesMessage,
    ProtocolError,
    StatusMessage,
    VolumeMessage,
    decode,
    encode,
)

__all__ = [
    "DTYPE",
    "FSC_THRESHOLD",
    "POSE_COLUMNS",
    "PROTOCOL_VERSION",
    "TOPICS",
    "Message",
    "PosesMessage",
    "ProtocolError",
    "StatusMessage",
    "VolumeMessage",
    "decode",
    "encode",
]
