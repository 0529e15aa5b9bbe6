"""The lanyard workload client: exchange, cache, renew, release."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Union

import grpc

from ._proto import exchange_pb2 as pb
from ._proto import exchange_pb2_grpc as pb_grpc
from .credentials import Grant, ReleaseReceipt
from .errors import ApiError
from .tokens import TokenSourceLike, as_token_source

__all__ = ["RENEW_FALLBACK_REASONS", "Client", "GrantContext"]

log = logging.getLogger("lanyard_client")

#: Renew refusals after which the client exchanges again instead of failing: the grant
#: is gone (released, expired, revoked by an operator, unknown) or cannot be renewed
#: (a delegated grant).
RENEW_FALLBACK_REASONS = frozenset(
    {"GRANT_NOT_ACTIVE", "GRANT_NOT_FOUND", "GRANT_REVOKED", "DELEGATION_DENIED"}
)

Seconds = Union[int, float, timedelta]
#: A cache key: (destination, sorted scopes, requested TTL, audience).
_Key = tuple[str, tuple[str, ...], int, str]


def _seconds(value: Seconds) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _ttl_seconds(ttl: Seconds | None) -> int:
    if ttl is None:
        return 0
    secs = _seconds(ttl)
    if secs < 1 or secs != int(secs) or secs > 0xFFFFFFFF:
        raise ValueError(f"ttl must be a whole number of seconds >= 1, got {ttl!r}")
    return int(secs)


def _channel_target(target: str) -> tuple[str, bool]:
    """(gRPC target, whether the scheme asks for TLS)."""
    if target.startswith("http://"):
        return target[len("http://") :].rstrip("/"), False
    if target.startswith("https://"):
        return target[len("https://") :].rstrip("/"), True
    return target, False


@dataclass
class _Entry:
    grant: Grant
    ttl: int
    refresh_at: float


class Client:
    """A client of lanyard's workload API (``lanyard.v1.ExchangeService``).

    Args:
        target: lanyard's workload gRPC address: ``host:port``, ``http://host:port``
            (plaintext), ``https://host:port`` (TLS with the system roots) or any gRPC
            target such as ``unix:/path``.
        token_source: where the workload's platform token comes from (see
            :mod:`lanyard_client.tokens`), or a function returning it. Asked on every
            exchange, renew and release.
        refresh_margin: how long before expiry a cached credential is renewed; never
            more than half the credential's lifetime.
        timeout: deadline of each call, seconds.
        channel_credentials: TLS (or mTLS) credentials for the channel.
        channel: an existing channel to use instead (``target`` is then only a label).
        subject_token_type: RFC 8693 token type; empty means JWT.
        clock: the wall clock, seconds since the epoch (injected by tests).
    """

    def __init__(
        self,
        target: str,
        token_source: TokenSourceLike,
        *,
        refresh_margin: Seconds = 30,
        timeout: Seconds = 10,
        channel_credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        subject_token_type: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        from . import __version__

        self.target = target
        self.token_source = as_token_source(token_source)
        self.refresh_margin = _seconds(refresh_margin)
        if self.refresh_margin < 0:
            raise ValueError("refresh_margin must not be negative")
        self.timeout = _seconds(timeout)
        self.subject_token_type = subject_token_type
        self._clock = clock
        self._owns_channel = channel is None
        if channel is None:
            address, tls = _channel_target(target)
            options = [("grpc.primary_user_agent", f"lanyard-client-python/{__version__}")]
            if channel_credentials is None and tls:
                channel_credentials = grpc.ssl_channel_credentials()
            if channel_credentials is not None:
                channel = grpc.secure_channel(address, channel_credentials, options=options)
            else:
                channel = grpc.insecure_channel(address, options=options)
        self._channel = channel
        self._stub = pb_grpc.ExchangeServiceStub(channel)  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        self._cache: dict[_Key, _Entry] = {}
        self._key_locks: dict[_Key, threading.Lock] = {}

    def __repr__(self) -> str:
        return f"Client({self.target!r}, {self.token_source!r})"

    # === the cached credential ===

    def exchange(
        self,
        destination: str,
        scopes: Iterable[str] = (),
        ttl: Seconds | None = None,
        *,
        audience: str = "",
    ) -> Grant:
        """A credential for ``destination`` with ``scopes``, from the cache when it is
        not yet within ``refresh_margin`` of its expiry.

        A cached grant near expiry is renewed with a freshly read token (same grant ID,
        new credential); if lanyard says the grant is gone (released, expired, revoked),
        the client exchanges again. ``ttl`` (seconds or a ``timedelta``) is the requested
        lifetime; ``None`` means the destination's default.

        Raises:
            ApiError: lanyard refused (``.reason`` says why) or could not be reached.
            TokenSourceError: the platform token could not be read.
        """
        scope_key = tuple(sorted(set(scopes)))
        ttl_secs = _ttl_seconds(ttl)
        key = (destination, scope_key, ttl_secs, audience)
        with self._key_lock(key):
            with self._lock:
                entry = self._cache.get(key)
            now = self._clock()
            if entry is not None:
                if now < entry.refresh_at:
                    log.debug("cached grant %s for %s", entry.grant.grant_id, destination)
                    return entry.grant
                if now < entry.grant.expires_at.timestamp():
                    try:
                        grant = self._renew(entry.grant.grant_id, ttl_secs)
                    except ApiError as e:
                        if e.reason not in RENEW_FALLBACK_REASONS:
                            raise
                        log.info(
                            "renewing grant %s refused (%s); exchanging again",
                            entry.grant.grant_id,
                            e.reason,
                        )
                    else:
                        self._store(key, grant, ttl_secs, now)
                        return grant
                with self._lock:
                    self._cache.pop(key, None)
            grant = self._exchange(destination, scope_key, ttl_secs, audience)
            self._store(key, grant, ttl_secs, now)
            return grant

    def _store(self, key: _Key, grant: Grant, ttl: int, now: float) -> None:
        expires = grant.expires_at.timestamp()
        margin = min(self.refresh_margin, max(expires - now, 0) / 2)
        with self._lock:
            self._cache[key] = _Entry(grant=grant, ttl=ttl, refresh_at=expires - margin)

    def _key_lock(self, key: _Key) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _forget(self, grant_id: str) -> None:
        with self._lock:
            for key in [k for k, e in self._cache.items() if e.grant.grant_id == grant_id]:
                del self._cache[key]

    def cached(self) -> list[Grant]:
        """The grants in the cache (expired ones included until they are asked for)."""
        with self._lock:
            return [e.grant for e in self._cache.values()]

    # === explicit calls ===

    def renew(self, grant: Grant | str, ttl: Seconds | None = None) -> Grant:
        """Renew ``grant`` now with a freshly read token: a new credential for the same
        grant. The cache is updated if it holds the grant.

        Raises:
            ApiError: e.g. ``GRANT_NOT_ACTIVE`` (released or expired: exchange again).
            TokenSourceError: the platform token could not be read.
        """
        grant_id = grant if isinstance(grant, str) else grant.grant_id
        renewed = self._renew(grant_id, _ttl_seconds(ttl))
        now = self._clock()
        with self._lock:
            keys = [k for k, e in self._cache.items() if e.grant.grant_id == grant_id]
        for key in keys:
            self._store(key, renewed, key[2], now)
        return renewed

    def release(self, grant: Grant | str) -> ReleaseReceipt:
        """Release ``grant``: the task is done, lanyard revokes it now. It leaves the cache.

        Raises:
            ApiError: e.g. ``GRANT_NOT_ACTIVE`` when it was already released or expired.
            TokenSourceError: the platform token could not be read.
        """
        grant_id = grant if isinstance(grant, str) else grant.grant_id
        self._forget(grant_id)
        req = pb.ReleaseRequest(
            grant_id=grant_id,
            subject_token=self.token_source.token(),
            subject_token_type=self.subject_token_type,
        )
        receipt = ReleaseReceipt.from_proto(self._call(self._stub.Release, req))
        log.debug("released grant %s (%s)", grant_id, receipt.outcome or receipt.status)
        return receipt

    def release_all(self) -> list[ReleaseReceipt]:
        """Release every cached grant that has not expired. Every release is tried; the
        first error is raised after the others were attempted."""
        now = self._clock()
        with self._lock:
            live = {
                e.grant.grant_id
                for e in self._cache.values()
                if e.grant.expires_at.timestamp() > now
            }
            self._cache.clear()
        receipts: list[ReleaseReceipt] = []
        first: BaseException | None = None
        for grant_id in sorted(live):
            try:
                receipts.append(self.release(grant_id))
            except Exception as e:
                log.warning("releasing grant %s failed: %s", grant_id, e)
                first = first or e
        if first is not None:
            raise first
        return receipts

    def credential(
        self,
        destination: str,
        scopes: Iterable[str] = (),
        ttl: Seconds | None = None,
        *,
        audience: str = "",
    ) -> GrantContext:
        """A context manager holding a grant of its own (not shared with the cache),
        released when the block exits, however it exits::

            with client.credential("orders", scopes=["read"]) as grant:
                call_orders(grant.bearer.headers())
        """
        return GrantContext(self, destination, tuple(scopes), _ttl_seconds(ttl), audience)

    # === the wire ===

    def _exchange(
        self, destination: str, scopes: tuple[str, ...], ttl: int, audience: str
    ) -> Grant:
        req = pb.ExchangeRequest(
            subject_token=self.token_source.token(),
            subject_token_type=self.subject_token_type,
            destination=destination,
            scopes=list(scopes),
            requested_ttl_seconds=ttl,
            audience=audience,
        )
        grant = Grant.from_proto(self._call(self._stub.Exchange, req))
        log.debug(
            "exchanged for grant %s at %s, expires %s",
            grant.grant_id,
            destination,
            grant.expires_at.isoformat(),
        )
        return grant

    def _renew(self, grant_id: str, ttl: int) -> Grant:
        req = pb.RenewRequest(
            grant_id=grant_id,
            subject_token=self.token_source.token(),
            subject_token_type=self.subject_token_type,
            requested_ttl_seconds=ttl,
        )
        grant = Grant.from_proto(self._call(self._stub.Renew, req))
        log.debug("renewed grant %s, expires %s", grant_id, grant.expires_at.isoformat())
        return grant

    def _call(self, method: Callable[..., Any], req: object) -> Any:
        try:
            return method(req, timeout=self.timeout)
        except grpc.RpcError as e:
            raise ApiError.from_rpc_error(e) from None

    # === lifecycle ===

    def close(self) -> None:
        """Close the channel (if the client made it). Cached grants are not released;
        call :meth:`release_all` first for that."""
        with self._lock:
            self._cache.clear()
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class GrantContext:
    """``with client.credential(...) as grant:`` — exchange on entry, release on exit."""

    def __init__(
        self, client: Client, destination: str, scopes: tuple[str, ...], ttl: int, audience: str
    ) -> None:
        self._client = client
        self._args = (destination, tuple(sorted(set(scopes))), ttl, audience)
        self.grant: Grant | None = None
        self.receipt: ReleaseReceipt | None = None

    def __enter__(self) -> Grant:
        self.grant = self._client._exchange(*self._args)
        return self.grant

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        grant, self.grant = self.grant, None
        if grant is None:
            return
        try:
            self.receipt = self._client.release(grant)
        except Exception as release_error:
            if exc is None:
                raise
            # The block's own exception is the one the caller needs; the grant expires
            # at its expiry anyway.
            log.warning("releasing grant %s failed: %s", grant.grant_id, release_error)
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"releasing grant {grant.grant_id} failed: {release_error}")
