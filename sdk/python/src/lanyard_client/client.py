"""The lanyard workload client: exchange, cache, renew, release."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Union

import grpc

from ._proto import exchange_pb2 as pb
from ._proto import exchange_pb2_grpc as pb_grpc
from .credentials import Grant, ReleaseReceipt
from .errors import ApiError, TokenSourceError, UnsupportedCredentialError
from .tokens import TokenSourceLike, as_token_source

__all__ = ["RELEASE_GONE_REASONS", "RENEW_FALLBACK_REASONS", "Client", "GrantContext"]

log = logging.getLogger("lanyard_client")

#: Renew refusals after which the client exchanges again instead of failing: the grant
#: is gone (released, expired, revoked by an operator, unknown) or cannot be renewed
#: (a delegated grant).
RENEW_FALLBACK_REASONS = frozenset(
    {"GRANT_NOT_ACTIVE", "GRANT_NOT_FOUND", "GRANT_REVOKED", "DELEGATION_DENIED"}
)

#: Release refusals that mean the grant is gone already: it leaves the cache.
RELEASE_GONE_REASONS = frozenset({"GRANT_NOT_ACTIVE", "GRANT_NOT_FOUND", "GRANT_REVOKED"})

#: Renew failures (lanyard was not reached, or could not answer in time) after which a
#: still-valid cached credential is returned.
_TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: Backoff between renew attempts while lanyard is unreachable (doubling), seconds.
RENEW_BACKOFF_MIN = 1.0
RENEW_BACKOFF_MAX = 30.0
#: The lifetime assumed when ``expires_at`` is not after the client's clock (clock skew)
#: and no TTL was requested, seconds.
MIN_LIFETIME = 60.0

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


def _scope_key(scopes: Iterable[str]) -> tuple[str, ...]:
    if isinstance(scopes, (str, bytes)):
        raise TypeError("scopes must be a list of scope names, not a single string")
    return tuple(sorted(set(scopes)))


def _channel_target(target: str) -> tuple[str, bool]:
    """(gRPC target, whether the scheme asks for TLS)."""
    if target.startswith("http://"):
        return target[len("http://") :].rstrip("/"), False
    if target.startswith("https://"):
        return target[len("https://") :].rstrip("/"), True
    return target, False


class _Secret:
    """A token that is redacted in ``repr()``: what a frame local holds while a request is
    built, so that a traceback rendered with its locals cannot show the token."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


@dataclass
class _Entry:
    grant: Grant
    ttl: int
    #: ``monotonic()`` times: when to renew, when the credential expires (by the
    #: lifetime measured at receipt), and the margin the entry was stored with.
    refresh_at: float
    expires_at: float
    margin: float
    #: After a renewal failed because lanyard was unreachable: no renew before this.
    retry_at: float = 0.0
    backoff: float = 0.0


class _KeyLocks:
    """One lock per cache key, dropped when no caller holds or waits for it."""

    def __init__(self, guard: threading.Lock) -> None:
        self._guard = guard
        self._locks: dict[_Key, list[Any]] = {}  # key -> [lock, users]

    @contextmanager
    def hold(self, key: _Key) -> Iterator[None]:
        with self._guard:
            slot = self._locks.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:
                yield
        finally:
            with self._guard:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._locks[key]

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)


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
        clock: the wall clock, seconds since the epoch. Read once when a credential
            arrives, to turn lanyard's ``expires_at`` into a lifetime.
        monotonic: the clock all cache timing runs on (``time.monotonic``); tests
            inject both clocks.

    Cache timing does not depend on the client's wall clock agreeing with lanyard's:
    the lifetime is ``expires_at - clock()`` at receipt (at most the requested TTL) and
    counts down on ``monotonic``. If that lifetime is not positive (the client's clock is
    ahead of lanyard's by more than the lifetime), a warning is logged and the requested
    TTL (or :data:`MIN_LIFETIME`) is used instead.
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
        monotonic: Callable[[], float] = time.monotonic,
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
        self._monotonic = monotonic
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
        self._key_locks = _KeyLocks(self._lock)

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
        the client exchanges again. If lanyard cannot be reached (``UNAVAILABLE``,
        ``DEADLINE_EXCEEDED``) while the cached credential is still valid, the cached
        one is returned and renewal is retried after a backoff. If a renewal does not
        push the expiry out of the margin (the grant reached its maximum lifetime), the
        client exchanges anew and releases the old grant. ``ttl`` (seconds or a
        ``timedelta``) is the requested lifetime; ``None`` means the destination's
        default.

        Raises:
            ApiError: lanyard refused (``.reason`` says why) or could not be reached.
            TokenSourceError: the platform token could not be read.
            UnsupportedCredentialError: lanyard answered with a credential kind this
                client does not know (the grant was released).
        """
        scope_key = _scope_key(scopes)
        ttl_secs = _ttl_seconds(ttl)
        key = (destination, scope_key, ttl_secs, audience)
        with self._key_locks.hold(key):
            with self._lock:
                entry = self._cache.get(key)
            now = self._monotonic()
            stale: str | None = None
            if entry is not None:
                if now < entry.refresh_at or (now < entry.retry_at and now < entry.expires_at):
                    log.debug("cached grant %s for %s", entry.grant.grant_id, destination)
                    return entry.grant
                if now < entry.expires_at:
                    renewed, release_old = self._renew_cached(key, entry, ttl_secs)
                    if renewed is not None:
                        return renewed
                    if release_old:
                        stale = entry.grant.grant_id
                with self._lock:
                    if self._cache.get(key) is entry:
                        del self._cache[key]
            grant = self._exchange(destination, scope_key, ttl_secs, audience)
            self._store(key, grant, ttl_secs)
        if stale is not None:
            self._release_quietly(stale)
        return grant

    def _renew_cached(self, key: _Key, entry: _Entry, ttl: int) -> tuple[Grant | None, bool]:
        """Renew ``entry``'s grant: (the renewed grant or the cached one when lanyard is
        out of reach for now, False), or (None, whether to release the old grant) when
        the caller must exchange anew."""
        grant_id = entry.grant.grant_id
        try:
            grant = self._renew(grant_id, ttl)
        except ApiError as e:
            if e.code in _TRANSIENT_CODES:
                backoff = min(max(entry.backoff * 2, RENEW_BACKOFF_MIN), RENEW_BACKOFF_MAX)
                with self._lock:
                    entry.backoff = backoff
                    entry.retry_at = self._monotonic() + backoff
                log.warning(
                    "renewing grant %s failed (%s); using the cached credential, next try in %.0fs",
                    grant_id,
                    e.code.name,
                    backoff,
                )
                return entry.grant, False
            if e.reason not in RENEW_FALLBACK_REASONS:
                raise
            log.info("renewing grant %s refused (%s); exchanging again", grant_id, e.reason)
            # DELEGATION_DENIED: the grant is live but cannot be renewed; it expires.
            return None, False
        stored = self._store(key, grant, ttl, expected=grant_id)
        if stored is not None and stored.expires_at - self._monotonic() < entry.margin:
            log.info(
                "renewing grant %s did not extend it past the refresh margin; exchanging again",
                grant_id,
            )
            return None, True
        return grant, False

    def _lifetime(self, grant: Grant, ttl: int) -> float:
        """Seconds the credential is valid from now, by lanyard's ``expires_at`` and the
        client's wall clock, at most ``ttl``; ``ttl`` (or MIN_LIFETIME) on skew."""
        lifetime = grant.expires_at.timestamp() - self._clock()
        if lifetime <= 0:
            fallback = float(ttl) if ttl > 0 else MIN_LIFETIME
            log.warning(
                "grant %s expires at %s, which is not after this machine's clock: the "
                "clocks disagree; assuming a lifetime of %.0fs",
                grant.grant_id,
                grant.expires_at.isoformat(),
                fallback,
            )
            return fallback
        return min(lifetime, float(ttl)) if ttl > 0 else lifetime

    def _store(
        self, key: _Key, grant: Grant, ttl: int, *, expected: str | None = None
    ) -> _Entry | None:
        """Cache ``grant`` under ``key``. With ``expected``, only if the key still holds
        that grant ID (a concurrent release must not be undone); the entry, or None."""
        lifetime = self._lifetime(grant, ttl)
        now = self._monotonic()
        margin = min(self.refresh_margin, lifetime / 2)
        entry = _Entry(
            grant=grant,
            ttl=ttl,
            refresh_at=now + lifetime - margin,
            expires_at=now + lifetime,
            margin=margin,
        )
        with self._lock:
            if expected is not None:
                current = self._cache.get(key)
                if current is None or current.grant.grant_id != expected:
                    log.debug("grant %s left the cache while it was renewed", expected)
                    return None
            self._cache[key] = entry
        return entry

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
        grant. The cache is updated if it (still) holds the grant.

        Raises:
            ApiError: e.g. ``GRANT_NOT_ACTIVE`` (released or expired: exchange again).
            TokenSourceError: the platform token could not be read.
        """
        grant_id = grant if isinstance(grant, str) else grant.grant_id
        renewed = self._renew(grant_id, _ttl_seconds(ttl))
        with self._lock:
            keys = [k for k, e in self._cache.items() if e.grant.grant_id == grant_id]
        for key in keys:
            self._store(key, renewed, key[2], expected=grant_id)
        return renewed

    def release(self, grant: Grant | str) -> ReleaseReceipt:
        """Release ``grant``: the task is done, lanyard revokes it now. It leaves the
        cache when the release succeeds or lanyard says the grant is gone already
        (``GRANT_NOT_ACTIVE``, ``GRANT_NOT_FOUND``, ``GRANT_REVOKED``); after any other
        failure it stays cached, so that :meth:`release_all` tries again.

        Raises:
            ApiError: e.g. ``GRANT_NOT_ACTIVE`` when it was already released or expired.
            TokenSourceError: the platform token could not be read.
        """
        grant_id = grant if isinstance(grant, str) else grant.grant_id
        try:
            resp = self._call(self._stub.Release, pb.ReleaseRequest, grant_id=grant_id)
        except ApiError as e:
            if e.reason in RELEASE_GONE_REASONS:
                self._forget(grant_id)
            raise
        self._forget(grant_id)
        receipt = ReleaseReceipt.from_proto(resp)
        log.debug("released grant %s (%s)", grant_id, receipt.outcome or receipt.status)
        return receipt

    def release_all(self) -> list[ReleaseReceipt]:
        """Release every cached grant. lanyard decides which are still live: grants it
        reports gone (expired, released, revoked) leave the cache without a receipt.
        Every release is tried; the first other error is raised after the others were
        attempted, and those grants stay cached for another ``release_all``."""
        with self._lock:
            ids = sorted({e.grant.grant_id for e in self._cache.values()})
        receipts: list[ReleaseReceipt] = []
        first: BaseException | None = None
        for grant_id in ids:
            try:
                receipts.append(self.release(grant_id))
            except ApiError as e:
                if e.reason in RELEASE_GONE_REASONS:
                    log.debug("grant %s was gone already (%s)", grant_id, e.reason)
                    continue
                log.warning("releasing grant %s failed: %s", grant_id, e)
                first = first or e
            except Exception as e:
                log.warning("releasing grant %s failed: %s", grant_id, e)
                first = first or e
        if first is not None:
            raise first
        return receipts

    def _release_quietly(self, grant_id: str) -> None:
        try:
            self.release(grant_id)
        except Exception as e:
            log.warning("releasing grant %s failed: %s", grant_id, e)

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
        return GrantContext(self, destination, _scope_key(scopes), _ttl_seconds(ttl), audience)

    # === the wire ===

    def _exchange(
        self, destination: str, scopes: tuple[str, ...], ttl: int, audience: str
    ) -> Grant:
        # The response (which holds the credential) is never a local of this frame.
        grant = self._grant(
            self._call(
                self._stub.Exchange,
                pb.ExchangeRequest,
                destination=destination,
                scopes=list(scopes),
                requested_ttl_seconds=ttl,
                audience=audience,
            )
        )
        log.debug(
            "exchanged for grant %s at %s, expires %s",
            grant.grant_id,
            destination,
            grant.expires_at.isoformat(),
        )
        return grant

    def _renew(self, grant_id: str, ttl: int) -> Grant:
        grant = self._grant(
            self._call(
                self._stub.Renew, pb.RenewRequest, grant_id=grant_id, requested_ttl_seconds=ttl
            )
        )
        log.debug("renewed grant %s, expires %s", grant_id, grant.expires_at.isoformat())
        return grant

    def _grant(self, resp: Any) -> Grant:
        """``resp`` as a Grant; a grant holding a credential of an unknown kind is
        released and UnsupportedCredentialError raised (without the response, which
        holds the credential, in any frame of its traceback)."""
        try:
            return Grant.from_proto(resp)
        except UnsupportedCredentialError as e:
            kind = e.kind
        grant_id = resp.grant_id
        del resp
        self._release_quietly(grant_id)
        raise UnsupportedCredentialError(kind, grant_id)

    def _call(self, method: Callable[..., Any], request_type: Any, **fields: Any) -> Any:
        """Read the token and make the call. The request (which carries the token) exists
        only as an argument of ``method``: no frame of ours holds it, and the gRPC error
        (whose frames do) is neither raised nor chained."""
        token = self._token()
        try:
            return method(
                request_type(
                    subject_token=token.reveal(),
                    subject_token_type=self.subject_token_type,
                    **fields,
                ),
                timeout=self.timeout,
            )
        except grpc.RpcError as e:
            error = ApiError.from_rpc_error(e)
        raise error

    def _token(self) -> _Secret:
        """The token, wrapped. A TokenSourceError is raised without the source's frames
        (whose locals may hold token text) and without a chained exception."""
        try:
            return _Secret(self.token_source.token())
        except TokenSourceError as e:
            error = TokenSourceError(str(e))
        raise error

    # === lifecycle ===

    def close(self) -> None:
        """Close the channel (if the client made it). Cached grants are not released;
        call :meth:`release_all` first for that (``with Client(...)`` does)."""
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
        try:
            self.release_all()
        except Exception as e:  # best effort: the grants expire by themselves
            log.warning("releasing the cached grants on exit failed: %s", e)
        finally:
            self.close()


class GrantContext:
    """``with client.credential(...) as grant:`` — exchange on entry, release on exit."""

    def __init__(
        self, client: Client, destination: str, scopes: tuple[str, ...], ttl: int, audience: str
    ) -> None:
        self._client = client
        self._args = (destination, scopes, ttl, audience)
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
