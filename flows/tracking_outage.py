"""A tracking server that does not answer, told apart from MLflow's other errors.

MLflow's HTTP client retries a refused connection, a timeout or a 5xx (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``); once it gives up it raises ``MlflowException("API request to ...
failed with exception ... Max retries exceeded ...")`` with the ``requests`` error as its context. That is
an outage: the work done so far is kept and a later run can finish the job. Every other MLflow error (a
param conflict, a permission refused) is the caller's to report.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

_OUTAGE_TEXT = ("Max retries exceeded", "Connection refused", "Failed to establish a new connection",
                "Read timed out", "too many 5")


class TrackingUnavailable(RuntimeError):
    """The tracking server stopped answering; retrying later can succeed (not a deterministic failure)."""


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the server did not answer."""
    import requests

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        if type(exc).__name__ == "MlflowException" and any(t in str(exc) for t in _OUTAGE_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def redacted(uri: str) -> str:
    """``uri`` with any password replaced: ``postgresql://user:***@host/db``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The exception's first line, shortened: MLflow's messages repeat the whole urllib3 chain."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
