"""Fixtures: the real ``lanyard`` binary as ``serve --dev`` on loopback, per test.

Each test that asks for ``server`` gets its own lanyard with its own data directory
(under pytest's ``tmp_path``), started on ephemeral 127.0.0.1 ports. Readiness is the
ready line lanyard prints, then ``/readyz``, both polled against a deadline
(``LANYARD_TEST_PATIENCE_SECS``, default 30). When a test fails, the server's log is
printed with the failure.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[3]
T = TypeVar("T")


def patience() -> float:
    return float(os.environ.get("LANYARD_TEST_PATIENCE_SECS", "30"))


def eventually(what: str, f: Callable[[], T | None], timeout: float | None = None) -> T:
    """Poll ``f`` until it returns something other than ``None``; fail after the deadline."""
    deadline = time.monotonic() + (patience() if timeout is None else timeout)
    while True:
        value = f()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        time.sleep(0.02)  # the poll interval, not a wait for anything in particular


def lanyard_binary() -> Path:
    path = Path(os.environ.get("LANYARD_BIN") or REPO / "target" / "debug" / "lanyard")
    if not path.is_file():
        pytest.fail(
            f"{path} not found: build it with `cargo build -p lanyard-cli` (or set LANYARD_BIN)"
        )
    return path


def clean_env() -> dict[str, str]:
    """The environment without LANYARD_* (the server must not depend on the caller's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANYARD_")}
    # Loopback only, whatever proxy the machine has configured.
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


class FakeClock:
    """A wall clock that moves only when told (for the client's expiry arithmetic)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, when: float) -> None:
        """Jump to ``when`` (e.g. relative to a grant's expiry, which the server's real
        clock set, so that the test does not depend on how long the server took)."""
        self.now = when


class DevServer:
    """A running ``lanyard serve --dev``."""

    def __init__(self, root: Path) -> None:
        self.bin = lanyard_binary()
        self.data_dir = root / "data"
        self.admin_socket = self.data_dir / "admin.sock"
        self.log_path = root / "lanyard.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                str(self.bin),
                "serve",
                "--dev",
                "--data-dir",
                str(self.data_dir),
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--admin-socket",
                str(self.admin_socket),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=clean_env(),
            text=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:
            # Keeps reading after the ready line so the child never blocks on a full pipe.
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, name="lanyard-stdout", daemon=True).start()
        ready = self._wait_ready_line(lines)
        fields = dict(part.split("=", 1) for part in ready.split(" admin=")[0].split())
        self.grpc_addr = fields["grpc"]
        self.http = f"http://{fields['http']}"
        self.target = f"http://{self.grpc_addr}"
        eventually("lanyard /readyz", self._readyz)

    def _wait_ready_line(self, lines: queue.Queue[str | None]) -> str:
        deadline = time.monotonic() + patience()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                pytest.fail(f"lanyard printed no ready line within {patience()}s:\n{self.log()}")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait()
                pytest.fail(f"lanyard exited ({code}) before it was ready:\n{self.log()}")
            if line.startswith("lanyard ready "):
                return line[len("lanyard ready ") :].strip()

    def _readyz(self) -> bool | None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.http}/readyz", timeout=2) as resp:
                return True if resp.status == 200 else None
        except OSError:
            return None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cli(self, *args: str) -> str:
        """Run the lanyard CLI; its stdout. Fails the test when it fails."""
        out = subprocess.run(
            [str(self.bin), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=patience(),
        )
        if out.returncode != 0:
            pytest.fail(
                f"lanyard {' '.join(args[:3])} ... failed ({out.returncode}):\n{out.stderr}"
            )
        return out.stdout

    def mint(self, subject: str = "py-agent", task: str | None = "run-1", ttl: int = 600) -> str:
        """A dev workload token (`lanyard dev token`)."""
        args = [
            "dev",
            "token",
            "--data-dir",
            str(self.data_dir),
            "--subject",
            subject,
            "--ttl",
            str(ttl),
        ]
        if task is not None:
            args += ["--task", task]
        return self.cli(*args).strip()

    def grants(self) -> list[dict[str, Any]]:
        """Every grant, as `lanyard grants list --output json` over the admin socket."""
        doc = json.loads(
            self.cli("--output", "json", "grants", "list", "--admin-socket", str(self.admin_socket))
        )
        return list(doc["grants"])

    def grant(self, grant_id: str) -> dict[str, Any]:
        for g in self.grants():
            if g["id"] == grant_id:
                return g
        pytest.fail(f"grant {grant_id} is not listed")

    def stop(self) -> int | None:
        """SIGTERM, then wait; SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DevServer]:
    s = DevServer(tmp_path)
    try:
        yield s
    finally:
        code = s.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(f"---- lanyard log ({s.log_path}) ----\n{s.log()}\n---- end ----")
        elif code not in (0, None):
            print(f"lanyard exited with {code} after SIGTERM; log at {s.log_path}")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # gRPC and urllib honour proxy variables; these tests talk to 127.0.0.1 only.
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    for name in (
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "grpc_proxy",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
