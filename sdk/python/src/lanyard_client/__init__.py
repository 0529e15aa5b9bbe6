"""lanyard-client: exchange a workload's platform token for a short-lived credential.

    from lanyard_client import Client, FileTokenSource

    client = Client("http://127.0.0.1:7600", FileTokenSource("/var/run/secrets/tokens/lanyard"))
    grant = client.exchange("orders-api", scopes=["orders:read"])
    requests.get(url, headers=grant.bearer.headers())

See the package README and docs/clients.md in the lanyard repository.
"""

from importlib.metadata import PackageNotFoundError, version

from .client import RELEASE_GONE_REASONS, RENEW_FALLBACK_REASONS, Client, GrantContext
from .credentials import (
    AwsCredentials,
    BearerToken,
    Credential,
    DatabaseCredentials,
    Grant,
    ReleaseReceipt,
    Revocability,
)
from .errors import (
    ERROR_DOMAIN,
    REASON_METADATA_KEY,
    ApiError,
    LanyardError,
    TokenSourceError,
    UnsupportedCredentialError,
)
from .tokens import (
    DEFAULT_KUBERNETES_TOKEN_PATH,
    CallableTokenSource,
    EnvTokenSource,
    FileTokenSource,
    GitHubActionsTokenSource,
    TokenSource,
)

try:
    __version__ = version("lanyard-client")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

__all__ = [
    "DEFAULT_KUBERNETES_TOKEN_PATH",
    "ERROR_DOMAIN",
    "REASON_METADATA_KEY",
    "RELEASE_GONE_REASONS",
    "RENEW_FALLBACK_REASONS",
    "ApiError",
    "AwsCredentials",
    "BearerToken",
    "CallableTokenSource",
    "Client",
    "Credential",
    "DatabaseCredentials",
    "EnvTokenSource",
    "FileTokenSource",
    "GitHubActionsTokenSource",
    "Grant",
    "GrantContext",
    "LanyardError",
    "ReleaseReceipt",
    "Revocability",
    "TokenSource",
    "TokenSourceError",
    "UnsupportedCredentialError",
]
