"""Token sources: where the workload's platform token (its proof of identity) comes from.

A token source is asked for a token on every exchange, renew and release, so a token
that its platform rotates (a Kubernetes projected token, a GitHub Actions OIDC token)
is always fresh. Sources never log or print the token, and their errors never contain
it.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, Union, runtime_checkable

from .errors import TokenSourceError

__all__ = [
    "DEFAULT_KUBERNETES_TOKEN_PATH",
    "CallableTokenSource",
    "EnvTokenSource",
    "FileTokenSource",
    "GitHubActionsTokenSource",
    "TokenSource",
    "as_token_source",
]

#: Where Kubernetes mounts a pod's service-account token. For lanyard, mount a projected
#: token with lanyard's audience at a path of your own and pass it to FileTokenSource.
DEFAULT_KUBERNETES_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"

#: Tokens larger than this are refused before they are sent (lanyard's own default
#: limit is far smaller; this only stops reading a wrong, huge file).
MAX_TOKEN_BYTES = 1 << 20


@runtime_checkable
class TokenSource(Protocol):
    """Anything with a ``token()`` method returning the current platform token."""

    def token(self) -> str:
        """The current token. Raises :class:`TokenSourceError` when there is none."""
        ...


def _checked(token: str, where: str) -> str:
    token = token.strip()
    if token and len(token.encode("utf-8")) <= MAX_TOKEN_BYTES:
        return token
    problem = "is empty" if not token else f"is larger than {MAX_TOKEN_BYTES} bytes"
    del token  # not a local of the frame in the traceback
    raise TokenSourceError(f"{where}: the token {problem}")


def _with_audience(url: str, audience: str) -> str:
    """``url`` with its query's ``audience`` replaced by ``audience`` (other parameters
    kept in order) and without a fragment."""
    parts = urllib.parse.urlsplit(url)
    query = [
        (k, v)
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if k != "audience"
    ]
    query.append(("audience", audience))
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, parts.path, urllib.parse.urlencode(query), "")
    )


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: following one would send the runner's request token (the
    Authorization header) to wherever the answer points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


class FileTokenSource:
    """A token read from a file on every use.

    Kubernetes rewrites projected service-account tokens before they expire, so the
    file is read each time a token is needed, never cached.
    """

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_KUBERNETES_TOKEN_PATH) -> None:
        self.path = Path(path)

    def token(self) -> str:
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_TOKEN_BYTES + 1)
        except OSError as e:
            raise TokenSourceError(
                f"reading the token file {self.path}: {e.strerror or e}"
            ) from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise TokenSourceError(f"the token file {self.path} is not UTF-8") from None
        return _checked(text, f"token file {self.path}")

    def __repr__(self) -> str:
        return f"FileTokenSource({str(self.path)!r})"


class EnvTokenSource:
    """A token read from an environment variable on every use."""

    def __init__(self, name: str = "LANYARD_TOKEN") -> None:
        self.name = name

    def token(self) -> str:
        value = os.environ.get(self.name)
        if value is None:
            raise TokenSourceError(f"the environment variable {self.name} is not set")
        return _checked(value, f"environment variable {self.name}")

    def __repr__(self) -> str:
        return f"EnvTokenSource({self.name!r})"


class GitHubActionsTokenSource:
    """A GitHub Actions OIDC token, requested from the runner on every use.

    The job needs ``permissions: id-token: write``, which makes the runner set
    ``ACTIONS_ID_TOKEN_REQUEST_URL`` and ``ACTIONS_ID_TOKEN_REQUEST_TOKEN``. The token is
    requested with ``GET $ACTIONS_ID_TOKEN_REQUEST_URL`` (its query kept, ``audience``
    set to ``audience``, any fragment dropped) and
    ``Authorization: bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN``; the answer is
    ``{"value": "<jwt>"}``. Redirects are refused: following one would send the request
    token to wherever it points. ``audience`` must be one of the audiences the lanyard issuer
    accepts.
    """

    URL_ENV = "ACTIONS_ID_TOKEN_REQUEST_URL"
    TOKEN_ENV = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"

    def __init__(self, audience: str = "lanyard", *, timeout: float = 10.0) -> None:
        self.audience = audience
        self.timeout = timeout

    def _request(self) -> urllib.request.Request:
        url = os.environ.get(self.URL_ENV)
        bearer = os.environ.get(self.TOKEN_ENV)
        if not url or not bearer:
            raise TokenSourceError(
                f"{self.URL_ENV} and {self.TOKEN_ENV} are not set: not in GitHub Actions, "
                "or the job lacks `permissions: id-token: write`"
            )
        full = _with_audience(url, self.audience)
        return urllib.request.Request(
            full,
            headers={"Authorization": f"bearer {bearer}", "Accept": "application/json"},
            method="GET",
        )

    def token(self) -> str:
        request = self._request()
        # The request URL carries no secret, but stay quiet about it anyway: the host is
        # enough to diagnose.
        host = urllib.parse.urlsplit(request.full_url).netloc
        try:
            with _NO_REDIRECTS.open(request, timeout=self.timeout) as resp:
                body = resp.read(MAX_TOKEN_BYTES + 1)
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                raise TokenSourceError(
                    f"the GitHub Actions token request to {host} was redirected "
                    f"(HTTP {e.code}); redirects are not followed"
                ) from None
            raise TokenSourceError(
                f"the GitHub Actions token request to {host} answered HTTP {e.code}"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TokenSourceError(
                f"the GitHub Actions token request to {host} failed: {reason}"
            ) from None
        try:
            value = json.loads(body).get("value")
        except (ValueError, AttributeError):
            value = None
        if not isinstance(value, str):
            raise TokenSourceError(
                f"the GitHub Actions token answer from {host} has no string `value`"
            )
        return _checked(value, "GitHub Actions token")

    def __repr__(self) -> str:
        return f"GitHubActionsTokenSource(audience={self.audience!r})"


class CallableTokenSource:
    """A token returned by a function, called on every use (e.g. a cloud SDK's)."""

    def __init__(self, fn: Callable[[], str]) -> None:
        self.fn = fn

    def token(self) -> str:
        failed: str | None = None
        try:
            value = self.fn()
        except TokenSourceError:
            raise
        except Exception as e:  # the function's own failure, named by type only
            failed = type(e).__name__
        if failed is not None:
            # Raised outside the handler and `from None`: the function's exception (whose
            # message or frames may hold the token) is neither chained nor the context.
            raise TokenSourceError(f"the token function failed: {failed}") from None
        if not isinstance(value, str):
            raise TokenSourceError(f"the token function returned {type(value).__name__}, not str")
        return _checked(value, "token function")

    def __repr__(self) -> str:
        return f"CallableTokenSource({getattr(self.fn, '__qualname__', self.fn)!r})"


TokenSourceLike = Union[TokenSource, Callable[[], str]]


def as_token_source(source: TokenSourceLike) -> TokenSource:
    """``source`` itself if it has ``token()``, else a callable wrapped as a source."""
    if isinstance(source, TokenSource):
        return source
    if callable(source):
        return CallableTokenSource(source)
    raise TypeError(f"not a token source: {type(source).__name__}")
