"""Clock skew, secrets in tracebacks, release/renew races, outages, renewals that do not
extend, release failures and unknown credential kinds (against the real lanyard; faults
are injected by wrapping the client's gRPC stub methods)."""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import DevServer, FakeClock, patience

from lanyard_client import (
    ApiError,
    Client,
    FileTokenSource,
    LanyardError,
    UnsupportedCredentialError,
)

DEST = "dev-api"


class Counting:
    def __init__(self, token: Callable[[], str]) -> None:
        self.inner = token
        self.calls = 0

    def token(self) -> str:
        self.calls += 1
        return self.inner()


class FakeRpcError(grpc.RpcError):
    """What a failed call raises when lanyard was not reached."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "injected"

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()


def fragments(jwt: str) -> list[str]:
    """The parts of a JWT unique to it (the header is shared)."""
    return [p for p in jwt.split(".")[1:] if p]


# === 1. clock skew ===


@pytest.mark.parametrize("skew", [3600, -3600])
def test_cache_timing_survives_a_skewed_client_clock(
    server: DevServer, clock: FakeClock, skew: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lanyard_client")
    token = server.mint()
    source = Counting(lambda: token)
    client = Client(
        server.target,
        source,
        refresh_margin=30,
        clock=lambda: time.time() + skew,
        monotonic=clock,
    )
    first = client.exchange(DEST, ttl=120)
    if skew > 0:
        assert "clocks disagree" in caplog.text
    # Cached (a clock 1 h ahead used to see it as expired and exchange every time) ...
    clock.advance(80)
    assert client.exchange(DEST, ttl=120) is first
    assert source.calls == 1
    # ... and renewed inside the margin (a clock 1 h behind used to wait an hour).
    clock.advance(15)
    renewed = client.exchange(DEST, ttl=120)
    assert renewed.grant_id == first.grant_id
    assert server.grant(first.grant_id)["renew_count"] == 1
    # release_all lets lanyard decide what is expired: it releases the live grant.
    receipts = client.release_all()
    assert [r.grant_id for r in receipts] == [first.grant_id]
    assert server.grant(first.grant_id)["status"] == "released"


# === 2. the token stays out of traceback locals ===


def render(e: BaseException) -> str:
    return "".join(traceback.TracebackException.from_exception(e, capture_locals=True).format())


def test_subject_token_is_not_in_traceback_locals(server: DevServer, tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(server.mint())  # no local of this frame holds the token
    client = Client(server.target, FileTokenSource(path))
    grant = client.exchange(DEST)

    errors: list[BaseException] = []
    for call in (
        lambda: client.exchange("no-such-api"),
        lambda: client.renew("grt_00000000000000000000000000000000"),
        lambda: client.release("grt_00000000000000000000000000000000"),
    ):
        with pytest.raises(ApiError) as err:
            call()
        errors.append(err.value)
    unreachable = Client("127.0.0.1:1", FileTokenSource(path), timeout=5)
    with pytest.raises(ApiError) as err:
        unreachable.exchange(DEST)
    errors.append(err.value)

    # Rendered before this frame reads the token (its locals are rendered too).
    texts = [render(e) for e in errors]
    for e in errors:
        assert e.__context__ is None and e.__cause__ is None
    secret = fragments(path.read_text().strip()) + fragments(grant.bearer.token)
    for text in texts:
        assert "self = Client(" in text  # the locals were rendered
        for fragment in secret:
            assert fragment not in text


def test_unknown_credential_kind_does_not_show_the_credential_in_locals(
    server: DevServer,
) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token)
    real = client._stub.Exchange
    seen: list[Any] = []

    def exchange_without_kind(req: Any, **kw: Any) -> Any:
        resp = real(req, **kw)
        seen.append((resp.grant_id, resp.credential.bearer.token))
        resp.ClearField("credential")  # as if a newer lanyard sent a new kind
        return resp

    client._stub.Exchange = exchange_without_kind
    with pytest.raises(UnsupportedCredentialError) as err:
        client.exchange(DEST)
    grant_id, _ = seen[0]
    # 9. a LanyardError; the grant it cannot use is released.
    assert isinstance(err.value, LanyardError)
    assert err.value.grant_id == grant_id
    assert server.grant(grant_id)["status"] == "released"
    assert client.cached() == []
    assert err.value.__context__ is None


# === 4. release vs a concurrent renewal ===


def test_release_is_not_undone_by_a_concurrent_renewal(server: DevServer, clock: FakeClock) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token, refresh_margin=30, monotonic=clock)
    grant = client.exchange(DEST, ttl=120)

    renewed_on_server = threading.Event()
    go_on = threading.Event()
    real = client._stub.Renew

    def renew_then_pause(req: Any, **kw: Any) -> Any:
        resp = real(req, **kw)
        renewed_on_server.set()
        assert go_on.wait(patience())
        return resp

    client._stub.Renew = renew_then_pause
    clock.advance(100)
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(client.exchange(DEST, ttl=120)))
    t.start()
    assert renewed_on_server.wait(patience())
    client.release(grant)  # while the renewal is between the call and the cache
    go_on.set()
    t.join(patience())
    assert result and result[0].grant_id == grant.grant_id
    assert server.grant(grant.grant_id)["status"] == "released"
    # The renewal did not write the released grant back.
    assert client.cached() == []


# === 5. short outages ===


def test_renew_during_an_outage_returns_the_valid_cached_credential(
    server: DevServer, clock: FakeClock
) -> None:
    token = server.mint()
    source = Counting(lambda: token)
    client = Client(server.target, source, refresh_margin=30, timeout=5, monotonic=clock)
    grant = client.exchange(DEST, ttl=120)
    server.stop()

    clock.advance(95)  # inside the margin, 25 s of validity left
    assert client.exchange(DEST, ttl=120) is grant
    assert source.calls == 2  # it tried
    # Backing off: no renew attempt before the backoff passed.
    assert client.exchange(DEST, ttl=120) is grant
    assert source.calls == 2
    clock.advance(1.5)
    assert client.exchange(DEST, ttl=120) is grant
    assert source.calls == 3
    clock.advance(1)  # the backoff doubled to 2 s
    assert client.exchange(DEST, ttl=120) is grant
    assert source.calls == 3
    # Once the cached credential expired, the outage is the caller's error.
    clock.advance(30)
    with pytest.raises(ApiError) as err:
        client.exchange(DEST, ttl=120)
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# === 6. a renewal that does not extend the expiry ===


def test_renewal_that_does_not_extend_exchanges_anew_and_releases_the_old(
    server: DevServer, clock: FakeClock
) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token, refresh_margin=30, monotonic=clock)
    first = client.exchange(DEST, ttl=120)
    real = client._stub.Renew

    def renew_at_max_lifetime(req: Any, **kw: Any) -> Any:
        resp = real(req, **kw)
        resp.expires_at.seconds = int(time.time()) + 5  # the grant's hard limit
        return resp

    client._stub.Renew = renew_at_max_lifetime
    clock.advance(100)
    second = client.exchange(DEST, ttl=120)
    assert second.grant_id != first.grant_id
    assert server.grant(first.grant_id)["status"] == "released"
    assert server.grant(second.grant_id)["status"] == "active"
    assert [g.grant_id for g in client.cached()] == [second.grant_id]


# === 7. leaving `with Client(...)` releases ===


def test_client_context_manager_releases_the_cache_on_exit(server: DevServer) -> None:
    token = server.mint()
    with Client(server.target, lambda: token) as client:
        a = client.exchange(DEST, scopes=["read"])
        b = client.exchange(DEST, scopes=["write"])
    assert server.grant(a.grant_id)["status"] == "released"
    assert server.grant(b.grant_id)["status"] == "released"


def test_client_context_manager_exit_is_best_effort(server: DevServer) -> None:
    token = server.mint()
    with Client(server.target, lambda: token, timeout=5) as client:
        client.exchange(DEST)
        server.stop()
    # No exception: the release failed quietly and the channel was closed.


# === 8. a failed release stays cached for release_all ===


def test_failed_release_is_retried_by_release_all(server: DevServer) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token)
    grant = client.exchange(DEST)
    real = client._stub.Release
    failures = [FakeRpcError(grpc.StatusCode.UNAVAILABLE)]

    def flaky_release(req: Any, **kw: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(req, **kw)

    client._stub.Release = flaky_release
    with pytest.raises(ApiError) as err:
        client.release_all()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert [g.grant_id for g in client.cached()] == [grant.grant_id]
    assert server.grant(grant.grant_id)["status"] == "active"

    receipts = client.release_all()
    assert [r.grant_id for r in receipts] == [grant.grant_id]
    assert server.grant(grant.grant_id)["status"] == "released"
    assert client.cached() == []


def test_release_all_drops_grants_lanyard_reports_gone(server: DevServer) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token)
    grant = client.exchange(DEST)
    Client(server.target, lambda: token).release(grant.grant_id)  # released elsewhere
    assert client.release_all() == []
    assert client.cached() == []


# === 11. scopes as a string ===


def test_scopes_given_as_a_string_are_refused(server: DevServer) -> None:
    client = Client(server.target, lambda: "unused")
    with pytest.raises(TypeError, match="scopes"):
        client.exchange(DEST, scopes="read")
    with pytest.raises(TypeError, match="scopes"):
        client.credential(DEST, scopes="read")
