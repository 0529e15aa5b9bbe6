"""Token sources: files re-read on every use, env vars, callables, and GitHub Actions
against a local HTTP server that speaks the runner's token protocol."""

from __future__ import annotations

import json
import threading
import traceback
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import DevServer, FakeClock

from lanyard_client import (
    DEFAULT_KUBERNETES_TOKEN_PATH,
    CallableTokenSource,
    Client,
    EnvTokenSource,
    FileTokenSource,
    GitHubActionsTokenSource,
    TokenSourceError,
)
from lanyard_client.tokens import MAX_TOKEN_BYTES, as_token_source

REQUEST_TOKEN = "runner-request-token-secret"


# === files, env, callables ===


def test_file_source_reads_the_file_on_every_use(tmp_path: Path) -> None:
    path = tmp_path / "token"
    source = FileTokenSource(path)
    path.write_text("first.token.value\n")
    assert source.token() == "first.token.value"
    path.write_text("second.token.value")
    assert source.token() == "second.token.value"
    # Kubernetes swaps the file through a symlink (..data); follow it like kubelet does.
    target = tmp_path / "rotated"
    target.write_text("third.token.value")
    path.unlink()
    path.symlink_to(target)
    assert source.token() == "third.token.value"


def test_file_source_errors_name_the_file_not_the_token(tmp_path: Path) -> None:
    with pytest.raises(TokenSourceError, match="nope"):
        FileTokenSource(tmp_path / "nope").token()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(TokenSourceError, match="empty"):
        FileTokenSource(empty).token()


def test_file_source_defaults_to_the_kubernetes_path() -> None:
    assert str(FileTokenSource().path) == DEFAULT_KUBERNETES_TOKEN_PATH
    assert DEFAULT_KUBERNETES_TOKEN_PATH == "/var/run/secrets/kubernetes.io/serviceaccount/token"


def test_env_source_reads_the_variable_on_every_use(monkeypatch: pytest.MonkeyPatch) -> None:
    source = EnvTokenSource("LANYARD_TEST_TOKEN")
    monkeypatch.delenv("LANYARD_TEST_TOKEN", raising=False)
    with pytest.raises(TokenSourceError, match="LANYARD_TEST_TOKEN"):
        source.token()
    monkeypatch.setenv("LANYARD_TEST_TOKEN", "a.b.c")
    assert source.token() == "a.b.c"
    monkeypatch.setenv("LANYARD_TEST_TOKEN", "d.e.f")
    assert source.token() == "d.e.f"


def test_callable_source() -> None:
    calls = []

    def fn() -> str:
        calls.append(1)
        return f"tok.{len(calls)}.x"

    source = as_token_source(fn)
    assert source.token() == "tok.1.x"
    assert source.token() == "tok.2.x"
    with pytest.raises(TokenSourceError, match="int"):
        CallableTokenSource(lambda: 42).token()  # type: ignore[arg-type,return-value]

    def broken() -> str:
        raise RuntimeError("secret-looking detail")

    with pytest.raises(TokenSourceError, match="RuntimeError") as err:
        CallableTokenSource(broken).token()
    assert "secret-looking" not in str(err.value)


# === GitHub Actions ===


class RunnerTokenServer:
    """The runner's ID-token endpoint on 127.0.0.1: answers `{"value": <token>}` to a GET
    with the right bearer, and records what it was asked."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.status = 200
        self.body: bytes | None = None
        self.redirect: str | None = None
        self.requests: list[tuple[str, dict[str, list[str]], str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(parts.query)
                auth = self.headers.get("Authorization")
                outer.requests.append((parts.path, query, auth))
                if outer.redirect is not None and parts.path != outer.redirect:
                    self.send_response(302)
                    self.send_header("Location", f"{outer.url}{outer.redirect}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif auth != f"bearer {REQUEST_TOKEN}":
                    self._answer(401, b'{"message": "bad token"}')
                elif outer.status != 200:
                    self._answer(outer.status, b"{}")
                elif outer.body is not None:
                    self._answer(200, outer.body)
                else:
                    self._answer(200, json.dumps({"value": outer.value, "count": 1}).encode())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> Iterator[RunnerTokenServer]:
    r = RunnerTokenServer()
    # What the runner sets: a URL that already has a query string, and a request token.
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", f"{r.url}/_apis/token?api-version=2.0")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", REQUEST_TOKEN)
    try:
        yield r
    finally:
        r.close()


def test_github_actions_source_exchanges_against_lanyard(
    server: DevServer, runner: RunnerTokenServer, clock: FakeClock
) -> None:
    runner.value = server.mint(subject="gha-job", task="run-42")
    client = Client(server.target, GitHubActionsTokenSource(audience="lanyard"), monotonic=clock)
    grant = client.exchange("dev-api", scopes=["read"], ttl=60)
    assert grant.workload_id == "spiffe://lanyard.local/dev/gha-job"
    assert grant.task_id == "run-42"

    path, query, auth = runner.requests[0]
    assert path == "/_apis/token"
    assert query == {"api-version": ["2.0"], "audience": ["lanyard"]}
    assert auth == f"bearer {REQUEST_TOKEN}"

    # Renewal asks the runner again (fresh proof).
    runner.value = server.mint(subject="gha-job", task="run-42")
    clock.set(grant.expires_at.timestamp() - 10)
    renewed = client.exchange("dev-api", scopes=["read"], ttl=60)
    assert renewed.grant_id == grant.grant_id
    assert len(runner.requests) == 2
    assert server.grant(grant.grant_id)["renew_count"] == 1


def test_github_actions_source_url_without_query_and_audience_encoding(
    runner: RunnerTokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", f"{runner.url}/token")
    runner.value = "h.p.s"
    assert GitHubActionsTokenSource(audience="https://lanyard.example/ a&b").token() == "h.p.s"
    _, query, _ = runner.requests[0]
    assert query == {"audience": ["https://lanyard.example/ a&b"]}


def test_github_actions_source_errors(
    runner: RunnerTokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = GitHubActionsTokenSource()

    runner.status = 500
    with pytest.raises(TokenSourceError, match="HTTP 500") as err:
        source.token()
    assert REQUEST_TOKEN not in str(err.value)

    runner.status = 200
    runner.body = b'{"count": 0}'
    with pytest.raises(TokenSourceError, match="value"):
        source.token()
    runner.body = b"not json"
    with pytest.raises(TokenSourceError, match="value"):
        source.token()

    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "wrong-request-token")
    runner.body = None
    runner.value = "h.p.s"
    with pytest.raises(TokenSourceError, match="HTTP 401") as err:
        source.token()
    assert "wrong-request-token" not in str(err.value)

    monkeypatch.delenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    with pytest.raises(TokenSourceError, match="id-token: write"):
        source.token()


def test_github_actions_source_replaces_the_audience_and_drops_the_fragment(
    runner: RunnerTokenServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        f"{runner.url}/_apis/token?api-version=2.0&audience=someone-else&x=a%26b#frag",
    )
    runner.value = "h.p.s"
    assert GitHubActionsTokenSource(audience="lanyard").token() == "h.p.s"
    path, query, _ = runner.requests[0]
    assert path == "/_apis/token"
    assert query == {"api-version": ["2.0"], "x": ["a&b"], "audience": ["lanyard"]}


def test_github_actions_source_refuses_redirects(runner: RunnerTokenServer) -> None:
    runner.value = "h.p.s"
    runner.redirect = "/elsewhere"
    with pytest.raises(TokenSourceError, match="redirect") as err:
        GitHubActionsTokenSource().token()
    assert REQUEST_TOKEN not in str(err.value)
    # The redirect was not followed: the request token went nowhere else.
    assert [path for path, _, _ in runner.requests] == ["/_apis/token"]


def test_file_source_strips_a_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_bytes(b"\xef\xbb\xbfbom.token.value\r\n")
    assert FileTokenSource(path).token() == "bom.token.value"


def test_callable_source_does_not_chain_the_functions_exception() -> None:
    def leaky() -> str:
        raise RuntimeError("token=secret-token-text")

    with pytest.raises(TokenSourceError) as err:
        CallableTokenSource(leaky).token()
    assert err.value.__cause__ is None
    assert err.value.__context__ is None
    rendered = "".join(
        traceback.TracebackException.from_exception(err.value, capture_locals=True).format()
    )
    assert "secret-token-text" not in rendered


def test_token_source_error_through_the_client_carries_no_token_locals(
    tmp_path: Path,
) -> None:
    path = tmp_path / "token"
    path.write_text("x" * (MAX_TOKEN_BYTES + 10))  # too large: refused, not sent
    client = Client("127.0.0.1:1", FileTokenSource(path))
    with pytest.raises(TokenSourceError, match="larger") as err:
        client.exchange("dev-api")
    rendered = "".join(
        traceback.TracebackException.from_exception(err.value, capture_locals=True).format()
    )
    assert "x" * 100 not in rendered
