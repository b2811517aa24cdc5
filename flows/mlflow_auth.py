"""MLflow's basic-auth app for ``ddpm mlflow-server --auth``: its config file, the admin, the team's users.

MLflow reads the config from ``MLFLOW_AUTH_CONFIG_PATH`` and the admin from ``MLFLOW_AUTH_ADMIN_USERNAME`` /
``MLFLOW_AUTH_ADMIN_PASSWORD`` when it first creates its user store; this module writes a config without any
password in it, refuses a missing or well-known admin password, and creates (or re-keys) the users of a
``name:password`` file through the server's own REST API once it answers.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
import time
from pathlib import Path

import httpx

WELL_KNOWN = {"password", "password1234", "admin", "mlflow", "changeme"}  # MLflow 2's default admin password first
MIN_LENGTH = 12


class AuthSetupError(ValueError):
    """The authentication settings cannot be used as given (a deterministic error: exit 2)."""


def admin() -> tuple[str, str]:
    """The admin's name and password from the environment; refuses a missing, short or well-known one."""
    user = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
    if not password:
        raise AuthSetupError("--auth needs the admin's password in MLFLOW_AUTH_ADMIN_PASSWORD (MLflow creates the "
                             f"admin {user!r} with it at the first start; it is never written to a file)")
    if password.lower() in WELL_KNOWN or len(password) < MIN_LENGTH:
        raise AuthSetupError(f"MLFLOW_AUTH_ADMIN_PASSWORD is a default or too short (under {MIN_LENGTH} characters): "
                             "choose another, e.g. `openssl rand -base64 18`")
    return user, password


def write_config(state: Path, default_permission: str = "EDIT") -> Path:
    """``<state>/basic_auth.ini``: the user store ``<state>/basic_auth.db``, the admin's name, no password."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / "basic_auth.ini"
    path.write_text("[mlflow]\n"
                    f"default_permission = {default_permission}\n"
                    f"database_uri = sqlite:///{(state / 'basic_auth.db').resolve()}\n"
                    f"admin_username = {admin()[0]}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


def server_env(state: Path) -> dict[str, str]:
    """What ``mlflow server --app-name basic-auth`` needs in its environment: the config written here, and
    the Flask secret key for its CSRF tokens (``MLFLOW_FLASK_SERVER_SECRET_KEY``, else one generated once into
    ``<state>/flask_secret_key``, 0600, so a restart keeps the browsers' sessions valid)."""
    config = write_config(state)
    key = os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
    if not key:
        path = state / "flask_secret_key"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(32))
        key = path.read_text().strip()
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config.resolve()), "MLFLOW_FLASK_SERVER_SECRET_KEY": key}


def read_users(path: str | Path) -> dict[str, str]:
    """``name:password`` lines (``#`` comments, blank lines allowed) -> {name: password}."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise AuthSetupError(f"cannot read the users file {path}: {exc.strerror}") from None
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {path} holds passwords and other users of this machine can read it: chmod 600 {path}",
              file=sys.stderr, flush=True)
    users: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, password = line.partition(":")
        password = password.strip()  # spaces around the colon are layout, not password
        if not sep or not name.strip() or not password:
            raise AuthSetupError(f"{path}, line {n}: expected name:password")
        if len(password) < 8:
            raise AuthSetupError(f"{path}, line {n}: the password of {name.strip()!r} is under 8 characters")
        users[name.strip()] = password
    return users


def provision(url: str, users: dict[str, str], server, timeout_s: float = 120) -> None:
    """Create each user on the server at ``url`` (as the admin), or set its password if it exists;
    ``server``: its process (if it exits first, there is nothing to wait for)."""
    deadline = time.monotonic() + timeout_s
    while server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AuthSetupError(f"the MLflow server at {url} did not answer in {timeout_s:.0f} s: no user was created")
        time.sleep(1)
    else:
        return  # the server exited: its own error is above
    auth = admin()
    rest = f"{url}/api/2.0/mlflow/users"
    for name, password in users.items():
        reply = httpx.post(f"{rest}/create", json={"username": name, "password": password}, auth=auth, timeout=30)
        if reply.status_code == 401:
            raise AuthSetupError(f"the MLflow server at {url} refused the admin {auth[0]!r}: MLFLOW_AUTH_ADMIN_PASSWORD "
                                 "is not the admin's password in its user store (set at the store's first start; "
                                 "change it there with the update-password API)")
        if reply.status_code != 200 and "ALREADY_EXISTS" in reply.text:
            reply = httpx.patch(f"{rest}/update-password", json={"username": name, "password": password},
                                auth=auth, timeout=30)
        if reply.status_code != 200:
            raise AuthSetupError(f"creating the MLflow user {name!r} failed: HTTP {reply.status_code} {reply.text[:200]}")
    print(f"MLflow users ready: {', '.join(users)}", flush=True)
