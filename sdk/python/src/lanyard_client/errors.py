"""Errors of lanyard-client. None of them ever carries token or credential text."""

from __future__ import annotations

import grpc

__all__ = [
    "ERROR_DOMAIN",
    "REASON_METADATA_KEY",
    "ApiError",
    "LanyardError",
    "TokenSourceError",
    "UnsupportedCredentialError",
]

#: ``google.rpc.ErrorInfo.domain`` of lanyard's errors.
ERROR_DOMAIN = "lanyard.dev"
#: The metadata key that repeats the reason.
REASON_METADATA_KEY = "lanyard-reason"
#: The metadata key with the request ID lanyard's log lines carry.
REQUEST_ID_METADATA_KEY = "x-request-id"


class LanyardError(Exception):
    """Base class of every error this package raises."""


class TokenSourceError(LanyardError):
    """The platform token could not be read (missing file, unset variable, failed request)."""


class UnsupportedCredentialError(LanyardError):
    """lanyard issued a credential of a kind this client does not know (a newer server):
    the client released the grant. Upgrade lanyard-client.

    Attributes:
        kind: the credential's kind as lanyard named it (``None`` when it had none).
        grant_id: the released grant, when known.
    """

    def __init__(self, kind: str | None, grant_id: str | None = None) -> None:
        self.kind = kind
        self.grant_id = grant_id
        text = f"lanyard answered with a credential kind this client does not know ({kind!r})"
        if grant_id:
            text += f"; grant {grant_id} was released"
        super().__init__(text)


class ApiError(LanyardError):
    """lanyard refused or failed a call, or could not be reached.

    Attributes:
        reason: the stable reason code (``"DESTINATION_UNKNOWN"``, ``"TOKEN_EXPIRED"``,
            ... see docs/api.md), or ``None`` when the error did not come from lanyard
            (e.g. ``UNAVAILABLE`` because nothing listens, or a deadline passed).
        code: the gRPC status code.
        message: lanyard's message (written for the caller; never token text).
        request_id: the ``x-request-id`` lanyard answered with, to find its log lines.
    """

    def __init__(
        self,
        reason: str | None,
        message: str,
        code: grpc.StatusCode,
        request_id: str | None = None,
    ) -> None:
        self.reason = reason
        self.message = message
        self.code = code
        self.request_id = request_id
        super().__init__(str(self))

    def __str__(self) -> str:
        head = self.reason or self.code.name
        text = f"{head}: {self.message}" if self.message else head
        if self.request_id:
            text += f" (request {self.request_id})"
        return text

    def __repr__(self) -> str:
        return (
            f"ApiError(reason={self.reason!r}, code={self.code.name}, "
            f"message={self.message!r}, request_id={self.request_id!r})"
        )

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ApiError:
        """The reason from the ``google.rpc.ErrorInfo`` detail (domain ``lanyard.dev``),
        else from the ``lanyard-reason`` metadata key."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = err.details() if hasattr(err, "details") else ""
        reason = _reason_from_details(err)
        metadata = _metadata(err)
        if reason is None:
            reason = metadata.get(REASON_METADATA_KEY) or None
        return cls(reason, message or "", code, metadata.get(REQUEST_ID_METADATA_KEY) or None)


def _metadata(err: grpc.RpcError) -> dict[str, str]:
    out: dict[str, str] = {}
    for getter in ("initial_metadata", "trailing_metadata"):
        fn = getattr(err, getter, None)
        try:
            pairs = fn() if fn is not None else None
        except Exception:
            pairs = None
        for key, value in pairs or ():
            if isinstance(value, str):
                out.setdefault(key, value)
    return out


def _reason_from_details(err: grpc.RpcError) -> str | None:
    # Imported lazily: grpcio-status pulls in googleapis-common-protos.
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]  # the raised RpcError is also the Call
    except (ValueError, AttributeError):
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN and info.reason:
                return str(info.reason)
    return None
