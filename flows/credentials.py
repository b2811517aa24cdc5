"""Credentials for the shared servers, read from the environment as MLflow and Prefect read them, and kept
out of everything the project records.

- An MLflow server started with ``ddpm mlflow-server --auth``: ``MLFLOW_TRACKING_USERNAME`` and
  ``MLFLOW_TRACKING_PASSWORD`` (or ``http://user:password@host`` in ``MLFLOW_TRACKING_URI``).
- A Prefect server started with ``PREFECT_SERVER_API_AUTH_STRING``: ``PREFECT_API_AUTH_STRING`` in the clients.
- S3: the usual ``AWS_*`` variables.

:func:`scrub` replaces every secret these variables hold, and the password part of any URL, with ``***``;
the project passes through it what it logs to MLflow, what reaches the Prefect logs (a filter on Prefect's
log handlers, :func:`scrub_prefect_logs`) and the flow report.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import re
import sys

from flows.tracking_outage import redacted

SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_ADMIN_PASSWORD",
                    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PREFECT_API_KEY", "PGPASSWORD")
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_BACKEND_STORE_URI", "PREFECT_API_URL")
AUTH_STRING_VARIABLES = ("PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<password>[^@/\s]+)@")
MASK = "***"


class CredentialsRefused(RuntimeError):
    """A server refused this client's credentials (HTTP 401/403): deterministic, retrying cannot help."""

    deterministic = True


def secrets(environ: dict | None = None) -> list[str]:
    """The secret values this environment holds, longest first (a secret inside another is masked too)."""
    env = os.environ if environ is None else environ
    found = {env[k] for k in SECRET_VARIABLES if env.get(k)}
    for k in AUTH_STRING_VARIABLES:
        if env.get(k):
            found.add(env[k])
            found.add(env[k].partition(":")[2])  # user:password: the password alone too
    for k in URI_VARIABLES:
        m = _USERINFO.search(env.get(k) or "")
        if m:
            found.add(m["password"])
    return sorted((s for s in found if len(s) >= 4), key=lambda s: (-len(s), s))  # shorter: would mask ordinary words


def scrub(text: str, environ: dict | None = None) -> str:
    """``text`` with the environment's secrets and any URL's password replaced by ``***``."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    for secret in secrets(environ):
        text = text.replace(secret, MASK)
    return text


class _ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def scrub_prefect_logs() -> None:
    """Every handler of Prefect's loggers (the console and the API handler that sends task and flow logs to
    the server) masks secrets before a record leaves this process."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
                                       if name.startswith("prefect")]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, _ScrubFilter) for f in handler.filters):
                handler.addFilter(_ScrubFilter())


# --- clients ---------------------------------------------------------------------------------------

def mlflow_auth(uri: str) -> tuple[str, str] | None:
    """Basic-auth credentials for the MLflow server at ``uri``: the environment's, else the URL's own."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return user, password
    m = _USERINFO.search(uri)
    return (m["user"], m["password"]) if m else None


def mlflow_user(uri: str) -> str | None:
    auth = mlflow_auth(uri)
    return auth[0] if auth else None


def prefect_setting(setting) -> str | None:
    """A Prefect setting's value, a secret (``SecretStr``) unwrapped."""
    value = setting.value()
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def prefect_headers() -> dict[str, str]:
    """The Authorization header Prefect's own client sends, for the project's direct probes of the API."""
    from prefect.settings import PREFECT_API_AUTH_STRING

    auth = prefect_setting(PREFECT_API_AUTH_STRING)
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


def mlflow_refusal(status: int, uri: str, doing: str) -> CredentialsRefused:
    """What to tell the user when the MLflow server at ``uri`` answers 401 or 403 to ``doing``."""
    where, user = redacted(uri), mlflow_user(uri)
    if status == 403:
        return CredentialsRefused(
            f"the MLflow server at {where} does not let user {user!r} {doing} (HTTP 403, permission denied): "
            "ask its admin for EDIT permission on the experiment and the registered model")
    if user:
        return CredentialsRefused(
            f"the MLflow server at {where} refused the credentials of user {user!r} while {doing} (HTTP 401): "
            "the password is wrong or has been changed, or the user does not exist; check "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return CredentialsRefused(
        f"the MLflow server at {where} asks for credentials (HTTP 401) while {doing}: set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server")


def prefect_refusal(api: str) -> CredentialsRefused:
    from prefect.settings import PREFECT_API_AUTH_STRING

    if prefect_setting(PREFECT_API_AUTH_STRING):
        return CredentialsRefused(
            f"the Prefect server at {redacted(api)} refused PREFECT_API_AUTH_STRING (HTTP 401): it does not match "
            "the server's PREFECT_SERVER_API_AUTH_STRING (user:password)")
    return CredentialsRefused(
        f"the Prefect server at {redacted(api)} asks for credentials (HTTP 401): set PREFECT_API_AUTH_STRING to "
        "its PREFECT_SERVER_API_AUTH_STRING (user:password)")


def refusal(exc: BaseException) -> CredentialsRefused | None:
    """A 401/403 from the MLflow or Prefect client, as :class:`CredentialsRefused`; None for anything else."""
    if isinstance(exc, CredentialsRefused):
        return exc
    response = getattr(exc, "response", None)  # httpx / Prefect's PrefectHTTPStatusError
    status = getattr(response, "status_code", None)
    if status in (401, 403):
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value()
        if api and str(response.url).startswith(api):
            return prefect_refusal(api)
    m = re.search(r"error code (401|403) != 200", str(exc))
    if m and type(exc).__name__ == "MlflowException":
        import mlflow

        return mlflow_refusal(int(m[1]), mlflow.get_tracking_uri(), "talking to it")
    return None


# --- servers ---------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, what: str, authenticated: bool, how: str) -> None:
    """A server bound beyond loopback without authentication: say so, last before it starts."""
    if not authenticated and not is_loopback(host):
        print(f"warning: {what} listens on {host} without authentication: anyone who reaches this machine can "
              f"read and change it. {how}", file=sys.stderr, flush=True)
