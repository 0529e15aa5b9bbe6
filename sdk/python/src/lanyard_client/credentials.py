"""What an exchange returns: a grant and its typed credential.

Secret fields (tokens, keys, passwords) are left out of ``repr()`` and ``str()``, so a
credential can be logged or shown in a traceback without leaking; read the attribute
itself to use it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Union

from ._proto import exchange_pb2 as pb
from .errors import UnsupportedCredentialError

__all__ = [
    "AwsCredentials",
    "BearerToken",
    "Credential",
    "DatabaseCredentials",
    "Grant",
    "ReleaseReceipt",
    "Revocability",
]


@dataclass(frozen=True)
class BearerToken:
    """A bearer token, presented as ``<header>: <token_type> <token>``."""

    token: str = field(repr=False)
    token_type: str = "Bearer"
    issued_token_type: str = ""
    #: The HTTP header to present it in, lowercase (e.g. ``"authorization"``).
    header: str = "authorization"

    def header_value(self) -> str:
        """``"<token_type> <token>"``: the value of :attr:`header`."""
        return f"{self.token_type} {self.token}"

    def headers(self) -> dict[str, str]:
        """``{header: header_value}``, ready for an HTTP client."""
        return {self.header: self.header_value()}


@dataclass(frozen=True)
class AwsCredentials:
    """Temporary AWS credentials (``aws-sts`` destinations)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    region: str = ""


@dataclass(frozen=True)
class DatabaseCredentials:
    """A database login (``postgres`` destinations)."""

    host: str
    port: int
    database: str
    username: str
    password: str = field(repr=False)


Credential = Union[BearerToken, AwsCredentials, DatabaseCredentials]


class Revocability(enum.Enum):
    """How early the credential can be revoked at its destination."""

    UNSPECIFIED = "unspecified"
    #: The destination confirms revocation or checks lanyard on each use.
    IMMEDIATE = "immediate"
    #: It lives until ``expires_at``.
    AT_EXPIRY = "at_expiry"
    #: Blocked by a deny rule that takes time to propagate.
    EVENTUAL = "eventual"


_REVOCABILITY = {
    pb.REVOCABILITY_IMMEDIATE: Revocability.IMMEDIATE,
    pb.REVOCABILITY_AT_EXPIRY: Revocability.AT_EXPIRY,
    pb.REVOCABILITY_EVENTUAL: Revocability.EVENTUAL,
}


@dataclass(frozen=True)
class Grant:
    """A credential for one destination and the grant that records it."""

    grant_id: str
    destination: str
    credential: Credential
    #: When the credential stops working (UTC).
    expires_at: datetime
    scopes: tuple[str, ...] = ()
    #: The workload ID lanyard derived from the token (a SPIFFE ID).
    workload_id: str = ""
    task_id: str | None = None
    revocability: Revocability = Revocability.UNSPECIFIED

    @property
    def bearer(self) -> BearerToken:
        """The credential as a :class:`BearerToken`; ``TypeError`` if it is another kind."""
        if not isinstance(self.credential, BearerToken):
            raise self._wrong_kind(BearerToken)
        return self.credential

    @property
    def aws(self) -> AwsCredentials:
        """The credential as :class:`AwsCredentials`; ``TypeError`` otherwise."""
        if not isinstance(self.credential, AwsCredentials):
            raise self._wrong_kind(AwsCredentials)
        return self.credential

    @property
    def database(self) -> DatabaseCredentials:
        """The credential as :class:`DatabaseCredentials`; ``TypeError`` otherwise."""
        if not isinstance(self.credential, DatabaseCredentials):
            raise self._wrong_kind(DatabaseCredentials)
        return self.credential

    def _wrong_kind(self, kind: type) -> TypeError:
        return TypeError(
            f"grant {self.grant_id} holds {type(self.credential).__name__}, not {kind.__name__}"
        )

    @classmethod
    def from_proto(cls, resp: pb.ExchangeResponse) -> Grant:
        """Convert an ``ExchangeResponse``. :class:`UnsupportedCredentialError` when it
        holds no credential of a kind this client knows."""
        return cls(
            grant_id=resp.grant_id,
            destination=resp.destination,
            credential=_credential(resp.credential),
            expires_at=_datetime(resp.expires_at),
            scopes=tuple(resp.scopes),
            workload_id=resp.workload_id,
            task_id=resp.task_id or None,
            revocability=_REVOCABILITY.get(resp.revocability, Revocability.UNSPECIFIED),
        )


@dataclass(frozen=True)
class ReleaseReceipt:
    """What a release achieved."""

    grant_id: str
    #: The grant's status after the call (``"released"``).
    status: str
    #: ``"revoked"``, ``"blocked"``, ``"expires_at"`` or ``"failed"`` (see ``detail``).
    outcome: str = ""
    detail: str = ""
    #: For ``"expires_at"`` and ``"blocked"``: when the credential stops working by itself.
    expires_at: datetime | None = None

    @classmethod
    def from_proto(cls, resp: pb.ReleaseResponse) -> ReleaseReceipt:
        r = resp.receipt
        return cls(
            grant_id=resp.grant_id,
            status=resp.status,
            outcome=r.outcome,
            detail=r.detail,
            expires_at=_datetime(r.expires_at) if r.HasField("expires_at") else None,
        )


def _datetime(ts: object) -> datetime:
    seconds = getattr(ts, "seconds", 0)
    nanos = getattr(ts, "nanos", 0)
    return datetime.fromtimestamp(seconds + nanos / 1e9, tz=timezone.utc)


def _credential(c: pb.Credential) -> Credential:
    kind = c.WhichOneof("kind")
    if kind == "bearer":
        return BearerToken(
            token=c.bearer.token,
            token_type=c.bearer.token_type or "Bearer",
            issued_token_type=c.bearer.issued_token_type,
            header=c.bearer.header or "authorization",
        )
    if kind == "aws":
        return AwsCredentials(
            access_key_id=c.aws.access_key_id,
            secret_access_key=c.aws.secret_access_key,
            session_token=c.aws.session_token,
            region=c.aws.region,
        )
    if kind == "database":
        return DatabaseCredentials(
            host=c.database.host,
            port=c.database.port,
            database=c.database.database,
            username=c.database.username,
            password=c.database.password,
        )
    raise UnsupportedCredentialError(kind)
