"""pi0remote: run a robot policy on a remote GPU as if it were local.

>>> from pi0remote import connect
>>> with connect("tcp://gpu-box:8765") as client:          # doctest: +SKIP
...     reply = client.infer({"cam_high": image_chw_uint8, "state": joints_f32})
...     chunk = reply["action"]                              # (50, 14) float32

Nothing heavy is imported here: transports, the server, the simulator and optional backends load
only when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .client import AsyncPolicyClient, PolicyClient, aconnect, connect  # noqa: E402
from .errors import (  # noqa: E402
    AuthenticationError,
    CodecError,
    ConnectError,
    ConnectionLost,
    InvalidInputError,
    InvalidURL,
    MessageTooLarge,
    MissingDependency,
    Pi0RemoteError,
    ProtocolError,
    RemotePolicyError,
    ReplyLost,
    RequestTimeout,
    ServerError,
    TransportError,
    TransportMismatch,
    UnknownScheme,
    VersionMismatch,
)

__all__ = [
    "AsyncPolicyClient",
    "AuthenticationError",
    "CodecError",
    "ConnectError",
    "ConnectionLost",
    "InvalidInputError",
    "InvalidURL",
    "MessageTooLarge",
    "MissingDependency",
    "Pi0RemoteError",
    "PolicyClient",
    "ProtocolError",
    "RemotePolicyError",
    "ReplyLost",
    "RequestTimeout",
    "ServerError",
    "TransportError",
    "TransportMismatch",
    "UnknownScheme",
    "VersionMismatch",
    "__version__",
    "aconnect",
    "connect",
]
