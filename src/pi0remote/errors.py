"""One exception tree for everything pi0remote raises.

::

    Pi0RemoteError
    ├── TransportError              the connection could not be made or was lost
    │   ├── ConnectError            connect failed after the bounded retries
    │   │   └── MissingDependency   the URL's transport needs an extra that is not installed
    │   ├── ConnectionLost          the peer went away mid-call
    │   │   ├── ReplyLost           ... after the request was sent: it may have run, so it is not resent
    │   │   └── RequestNotDelivered ... and the peer provably never got the whole request: resent once
    │   └── RequestTimeout          no reply within the per-call timeout
    ├── ProtocolError               bytes that do not follow docs/protocol.md
    │   ├── CodecError              payload that is not valid pi0remote msgpack
    │   ├── MessageTooLarge         a message over the size limit
    │   ├── VersionMismatch         client and server speak different protocol versions
    │   └── TransportMismatch       the server speaks another transport (an HTTP port for tcp://, ...)
    ├── InvalidURL                  a URL connect() cannot use (also a ValueError)
    │   └── UnknownScheme           a scheme no transport serves
    ├── AuthenticationError         missing or wrong token
    ├── InvalidInputError           an observation that does not match the policy's input spec
    ├── RemotePolicyError           the policy raised; carries the server's message, never a traceback
    │   └── PolicyTimeout           the policy call passed the server's deadline (--policy-timeout)
    └── ServerError                 anything else the server reports

Errors cross the wire as ``{"type": CODE, "message": str}`` where CODE is the ``code`` attribute of
one of these classes; :func:`from_wire` turns them back into the same class on the client.
Transport libraries' own exceptions are translated at the edge with ``raise ... from exc``.
"""

from __future__ import annotations


class Pi0RemoteError(Exception):
    """Root of every exception pi0remote raises."""

    code = "error"


class TransportError(Pi0RemoteError):
    code = "transport"


class ConnectError(TransportError):
    code = "connect"


class ConnectionLost(TransportError):
    code = "connection_lost"


class ReplyLost(ConnectionLost):
    """The connection dropped after the request was sent: the server may have run it.

    The client never sends such a request again on its own (a policy with memory would see it twice);
    the next call opens a fresh connection.
    """

    code = "reply_lost"


class RequestNotDelivered(ConnectionLost):
    """The connection dropped and the peer provably never received the whole request (QUIC: none of it was
    acknowledged), so the client sends it once more on a fresh connection."""

    code = "not_delivered"


class MissingDependency(ConnectError, ImportError):
    """A transport whose optional dependency is not installed; the message names the extra."""

    code = "missing_dependency"


class RequestTimeout(TransportError):
    code = "timeout"


class ProtocolError(Pi0RemoteError):
    code = "protocol"


class CodecError(ProtocolError):
    code = "codec"


class MessageTooLarge(ProtocolError):
    code = "too_large"


class VersionMismatch(ProtocolError):
    code = "version"


class TransportMismatch(ProtocolError):
    """The peer answered in another transport's bytes; the message names the URL that likely works."""

    code = "transport_mismatch"


class InvalidURL(Pi0RemoteError, ValueError):
    code = "invalid_url"


class UnknownScheme(InvalidURL):
    code = "unknown_scheme"


class AuthenticationError(Pi0RemoteError):
    code = "auth"


class InvalidInputError(Pi0RemoteError):
    code = "invalid_input"


class RemotePolicyError(Pi0RemoteError):
    code = "policy"


class PolicyTimeout(RemotePolicyError):
    code = "policy_timeout"


class ServerError(Pi0RemoteError):
    code = "server"


_BY_CODE: dict[str, type[Pi0RemoteError]] = {
    cls.code: cls
    for cls in (
        Pi0RemoteError,
        TransportError,
        ConnectError,
        ConnectionLost,
        ReplyLost,
        RequestNotDelivered,
        MissingDependency,
        RequestTimeout,
        ProtocolError,
        CodecError,
        MessageTooLarge,
        VersionMismatch,
        TransportMismatch,
        InvalidURL,
        UnknownScheme,
        AuthenticationError,
        InvalidInputError,
        RemotePolicyError,
        PolicyTimeout,
        ServerError,
    )
}


def to_wire(exc: BaseException) -> dict[str, str]:
    """The error body sent to a client: a code and a message, no traceback."""
    if isinstance(exc, Pi0RemoteError):
        return {"type": exc.code, "message": str(exc)}
    # A policy's own exception: name its class, keep its message, drop the traceback.
    return {"type": RemotePolicyError.code, "message": f"{type(exc).__name__}: {exc}"}


def from_wire(body: object) -> Pi0RemoteError:
    """Rebuild the typed exception a server sent."""
    if not isinstance(body, dict):
        return ServerError(f"malformed error reply: {body!r:.200}")
    code = body.get("type")
    message = body.get("message", "")
    cls = _BY_CODE.get(code if isinstance(code, str) else "", ServerError)
    return cls(f"server: {message}")
