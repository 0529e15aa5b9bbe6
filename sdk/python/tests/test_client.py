"""lanyard-client against the real lanyard binary (`serve --dev`, dev-api destination)."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import DevServer, FakeClock, eventually, patience

from lanyard_client import (
    ApiError,
    AwsCredentials,
    BearerToken,
    Client,
    DatabaseCredentials,
    EnvTokenSource,
    FileTokenSource,
    Revocability,
    TokenSourceError,
)

DEST = "dev-api"


class Counting:
    """A token source that counts how often it was asked."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def token(self) -> str:
        self.calls += 1
        return self.inner.token() if hasattr(self.inner, "token") else self.inner()


def claims(jwt: str) -> dict[str, Any]:
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def write_token(path: Path, token: str) -> None:
    path.write_text(token + "\n")


# === exchange and the typed credential ===


def test_exchange_returns_a_typed_bearer_credential(server: DevServer) -> None:
    token = server.mint(subject="py-agent", task="run-1")
    client = Client(server.target, lambda: token)
    before = time.time()
    grant = client.exchange(DEST, scopes=["read"], ttl=120)

    assert grant.grant_id.startswith("grt_")
    assert grant.destination == DEST
    assert grant.scopes == ("read",)
    assert grant.workload_id == "spiffe://lanyard.local/dev/py-agent"
    assert grant.task_id == "run-1"
    assert grant.revocability is Revocability.IMMEDIATE
    assert before + 110 <= grant.expires_at.timestamp() <= time.time() + 130
    assert grant.expires_at.tzinfo is not None

    bearer = grant.bearer
    assert isinstance(bearer, BearerToken)
    assert bearer.token_type == "Bearer"
    assert bearer.header == "authorization"
    assert bearer.headers() == {"authorization": f"Bearer {bearer.token}"}
    c = claims(bearer.token)
    assert c["sub"] == grant.workload_id
    assert c["aud"] == "https://dev-api.local"
    assert c["scope"] == "read"
    assert c["lanyard"]["grant_id"] == grant.grant_id
    with pytest.raises(TypeError):
        _ = grant.aws

    listed = server.grant(grant.grant_id)
    assert listed["status"] == "active"
    assert listed["workload_id"] == grant.workload_id
    client.close()


def test_second_exchange_is_served_from_the_cache(server: DevServer) -> None:
    token = server.mint()
    source = Counting(lambda: token)
    with Client(server.target, source) as client:
        first = client.exchange(DEST, scopes=["read", "write"])
        again = client.exchange(DEST, scopes=["write", "read", "read"])
        assert again is first
        assert source.calls == 1
        assert [g["id"] for g in server.grants()] == [first.grant_id]

        # Other scopes or another TTL are another credential.
        other = client.exchange(DEST, scopes=["read"])
        longer = client.exchange(DEST, scopes=["read"], ttl=600)
        assert len({first.grant_id, other.grant_id, longer.grant_id}) == 3
        assert len(server.grants()) == 3
        assert len(client.cached()) == 3


def test_concurrent_callers_share_one_exchange(server: DevServer) -> None:
    token = server.mint()
    callers = 8
    client: Client

    class Gated:
        """The first token read waits until every caller has asked for the key's lock,
        so the callers overlap for certain: all but one must wait for the exchange."""

        def __init__(self) -> None:
            self.calls = 0
            self.all_in = threading.Event()

        def token(self) -> str:
            self.calls += 1
            assert self.all_in.wait(patience()), "the callers did not overlap"
            return token

    source = Gated()
    client = Client(server.target, source)
    entered = 0
    entered_lock = threading.Lock()
    hold = client._key_locks.hold

    def counting_hold(key: Any) -> Any:
        nonlocal entered
        with entered_lock:
            entered += 1
            if entered == callers:
                source.all_in.set()
        return hold(key)

    client._key_locks.hold = counting_hold  # type: ignore[method-assign]
    start = threading.Barrier(callers)

    def call(_: int) -> Any:
        start.wait()
        return client.exchange(DEST, scopes=["read"])

    with ThreadPoolExecutor(max_workers=callers) as pool:
        grants = list(pool.map(call, range(callers)))
    assert entered == callers
    assert len({g.grant_id for g in grants}) == 1
    assert source.calls == 1
    assert len(server.grants()) == 1
    assert len(client._key_locks) == 0  # pruned once nobody holds them


# === renewal ===


def test_grant_near_expiry_is_renewed_with_a_fresh_token(
    server: DevServer, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    write_token(path, server.mint())
    source = Counting(FileTokenSource(path))
    # A long TTL and a large margin: renewal is due 600 - 200 = 400 s after receipt on
    # the fake monotonic clock, whatever the real time the server took.
    client = Client(server.target, source, refresh_margin=200, monotonic=clock)

    first = client.exchange(DEST, scopes=["read"], ttl=600)
    clock.advance(399)
    assert client.exchange(DEST, scopes=["read"], ttl=600) is first
    assert source.calls == 1

    # lanyard's expiry has whole seconds: let its clock pass the first grant's second so
    # that the renewed expiry is strictly later (a condition polled, not a fixed sleep).
    issued = int(first.expires_at.timestamp()) - 600
    eventually("lanyard's clock to pass a second", lambda: time.time() >= issued + 1 or None)

    # The platform rotated the token; inside the margin the client renews with the new one.
    write_token(path, server.mint())
    clock.advance(2)
    renewed = client.exchange(DEST, scopes=["read"], ttl=600)
    assert source.calls == 2
    assert renewed.grant_id == first.grant_id
    assert renewed.bearer.token != first.bearer.token
    assert renewed.expires_at > first.expires_at

    listed = server.grant(first.grant_id)
    assert listed["status"] == "active"
    assert listed["renew_count"] == 1
    assert len(server.grants()) == 1
    # The renewed credential is cached in turn.
    clock.advance(100)
    assert client.exchange(DEST, scopes=["read"], ttl=600) is renewed
    assert source.calls == 2


def test_renew_reads_the_token_file_again(
    server: DevServer, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    write_token(path, server.mint(task="run-1"))
    client = Client(server.target, FileTokenSource(path), refresh_margin=60, monotonic=clock)
    grant = client.exchange(DEST, ttl=300)

    # The file now proves another task: the renew carries it, and lanyard refuses it.
    write_token(path, server.mint(task="run-2"))
    clock.set(grant.expires_at.timestamp() - 50)
    with pytest.raises(ApiError) as err:
        client.exchange(DEST, ttl=300)
    assert err.value.reason == "GRANT_MISMATCH"
    assert server.grant(grant.grant_id)["renew_count"] == 0


def test_expired_grant_is_replaced_by_a_new_exchange(server: DevServer, clock: FakeClock) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token, monotonic=clock)
    first = client.exchange(DEST, ttl=60)
    clock.set(first.expires_at.timestamp() + 1)
    second = client.exchange(DEST, ttl=60)
    assert second.grant_id != first.grant_id
    assert server.grant(first.grant_id)["renew_count"] == 0
    assert len(server.grants()) == 2


def test_renew_of_a_released_grant_falls_back_to_exchange(
    server: DevServer, clock: FakeClock
) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token, refresh_margin=30, monotonic=clock)
    first = client.exchange(DEST, ttl=120)
    # Someone else (another process of the same workload) released it.
    Client(server.target, lambda: token).release(first.grant_id)
    assert server.grant(first.grant_id)["status"] == "released"

    clock.set(first.expires_at.timestamp() - 20)
    second = client.exchange(DEST, ttl=120)
    assert second.grant_id != first.grant_id
    assert server.grant(second.grant_id)["status"] == "active"


def test_explicit_renew_updates_the_cache(server: DevServer) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token)
    first = client.exchange(DEST, ttl=60)
    renewed = client.renew(first, ttl=60)
    assert renewed.grant_id == first.grant_id
    assert client.exchange(DEST, ttl=60) is renewed
    assert server.grant(first.grant_id)["renew_count"] == 1


# === release ===


def test_release_returns_a_receipt_and_leaves_the_cache(server: DevServer) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token)
    grant = client.exchange(DEST)
    receipt = client.release(grant)
    assert receipt.grant_id == grant.grant_id
    assert receipt.status == "released"
    assert receipt.outcome == "revoked"
    assert server.grant(grant.grant_id)["status"] == "released"

    assert client.exchange(DEST).grant_id != grant.grant_id
    with pytest.raises(ApiError) as err:
        client.release(grant)
    assert err.value.reason == "GRANT_NOT_ACTIVE"
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_release_all_releases_every_cached_grant(server: DevServer) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token)
    a = client.exchange(DEST, scopes=["read"])
    b = client.exchange(DEST, scopes=["write"])
    receipts = client.release_all()
    assert sorted(r.grant_id for r in receipts) == sorted([a.grant_id, b.grant_id])
    assert {g["status"] for g in server.grants()} == {"released"}
    assert client.cached() == []


def test_context_manager_releases_on_exit(server: DevServer) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token)
    cached = client.exchange(DEST, scopes=["read"])
    ctx = client.credential(DEST, scopes=["read"], ttl=60)
    with ctx as grant:
        assert grant.grant_id != cached.grant_id  # a grant of its own
        assert server.grant(grant.grant_id)["status"] == "active"
    assert server.grant(grant.grant_id)["status"] == "released"
    assert ctx.receipt is not None and ctx.receipt.status == "released"
    # The cached grant is untouched.
    assert server.grant(cached.grant_id)["status"] == "active"
    assert client.exchange(DEST, scopes=["read"]) is cached


@pytest.mark.parametrize("exc", [RuntimeError("task failed"), KeyboardInterrupt()])
def test_context_manager_releases_when_the_block_raises(
    server: DevServer, exc: BaseException
) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token)
    seen = []
    with pytest.raises(type(exc)), client.credential(DEST) as grant:
        seen.append(grant.grant_id)
        raise exc
    assert server.grant(seen[0])["status"] == "released"


def test_context_manager_keeps_the_block_error_when_release_fails(server: DevServer) -> None:
    tokens = iter([server.mint(), "not-a-jwt"])
    client = Client(server.target, lambda: next(tokens))
    with pytest.raises(ValueError) as err, client.credential(DEST):
        raise ValueError("the block's own error")
    assert "the block's own error" in str(err.value)
    assert any("releasing grant" in n for n in getattr(err.value, "__notes__", []))


# === errors ===


def test_unknown_destination_raises_destination_unknown(server: DevServer) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token)
    with pytest.raises(ApiError) as err:
        client.exchange("no-such-api")
    e = err.value
    assert e.reason == "DESTINATION_UNKNOWN"
    assert e.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-api" in e.message
    assert e.request_id
    assert str(e).startswith("DESTINATION_UNKNOWN: ")


def test_malformed_token_raises_token_malformed(server: DevServer) -> None:
    client = Client(server.target, lambda: "not-a-jwt")
    with pytest.raises(ApiError) as err:
        client.exchange(DEST)
    assert err.value.reason == "TOKEN_MALFORMED"
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_scope_the_destination_does_not_offer_raises_scope_not_allowed(server: DevServer) -> None:
    token = server.mint()
    client = Client(server.target, lambda: token)
    with pytest.raises(ApiError) as err:
        client.exchange(DEST, scopes=["admin"])
    assert err.value.reason == "SCOPE_NOT_ALLOWED"
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert server.grants() == []


def test_unreachable_server_raises_unavailable_without_a_reason() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now.
    client = Client(f"127.0.0.1:{port}", lambda: "x.y.z", timeout=5)
    with pytest.raises(ApiError) as err:
        client.exchange(DEST)
    assert err.value.reason is None
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_token_source_errors_stop_before_the_call(server: DevServer, tmp_path: Path) -> None:
    client = Client(server.target, FileTokenSource(tmp_path / "missing"))
    with pytest.raises(TokenSourceError, match="missing"):
        client.exchange(DEST)
    assert server.grants() == []


# === token sources against the server ===


def test_env_token_source(server: DevServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_LANYARD_TOKEN", server.mint(subject="from-env"))
    grant = Client(server.target, EnvTokenSource("MY_LANYARD_TOKEN")).exchange(DEST)
    assert grant.workload_id == "spiffe://lanyard.local/dev/from-env"


# === secrets stay out of reprs and logs ===


def test_secrets_never_in_repr_str_or_logs(
    server: DevServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lanyard_client")
    subject = server.mint()
    client = Client(server.target, lambda: subject, monotonic=clock)
    grant = client.exchange(DEST, ttl=60)
    clock.set(grant.expires_at.timestamp() - 10)
    renewed = client.exchange(DEST, ttl=60)
    with client.credential(DEST) as scoped:
        pass
    with pytest.raises(ApiError) as err:
        client.exchange("no-such-api")
    client.release(renewed)

    secrets = [subject, grant.bearer.token, renewed.bearer.token, scoped.bearer.token]
    # Every part of a JWT that is unique to it (the header is shared).
    fragments = [part for s in secrets for part in s.split(".")[1:]]
    shown = "\n".join(
        [
            caplog.text,
            repr(grant),
            str(grant),
            repr(renewed),
            repr(scoped.credential),
            repr(client),
            str(err.value),
            repr(err.value),
        ]
    )
    assert "grant" in caplog.text  # the client did log
    for fragment in fragments:
        assert fragment not in shown

    aws = AwsCredentials("AKIAEXAMPLE", "aws-secret-key", "aws-session-token", "eu-west-1")
    db = DatabaseCredentials("db.internal", 5432, "orders", "lanyard_g1", "db-password")
    for text in (repr(aws), str(aws), repr(db), str(db)):
        for secret in ("aws-secret-key", "aws-session-token", "db-password"):
            assert secret not in text
    assert "AKIAEXAMPLE" in repr(aws) and "lanyard_g1" in repr(db)
