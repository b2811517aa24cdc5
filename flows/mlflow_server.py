"""A shared MLflow tracking server: ``mlflow server`` on PostgreSQL, its artifacts proxied (``make mlflow-server``).

Without ``--backend-store-uri`` it starts a PostgreSQL of its own (Debian's ``postgresql`` package): data in
``.mlflow-server/postgres``, listening on 127.0.0.1 only, the database ``mlflow``. Artifacts go to
``--artifacts-destination`` (a folder, default ``.mlflow-server/artifacts``, or ``s3://bucket/path`` with the
usual AWS variables and ``MLFLOW_S3_ENDPOINT_URL`` for MinIO or another S3-compatible store); clients reach
them through the server (``mlflow-artifacts:/``), so they need no storage credentials of their own.
Every backend is checked before the server starts, so a wrong address or password is one clear line.

With ``--auth`` it runs MLflow's basic-auth app: the admin is ``MLFLOW_AUTH_ADMIN_USERNAME`` (default
``admin``) with ``MLFLOW_AUTH_ADMIN_PASSWORD`` (required, never written to a file), the user store is
``<state>/basic_auth.db``, and ``--users FILE`` (``name:password`` lines) creates or updates users once the
server answers. Users get EDIT on every experiment and model (a team logs runs and registers versions in one
experiment); clients set ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit

from flows.credentials import warn_if_exposed
from flows.tracking_outage import redacted

STATE = Path(".mlflow-server")


class BackendUnavailable(RuntimeError):
    """The server's database or artifact store cannot be used as given."""


# --- PostgreSQL ------------------------------------------------------------------------------------

def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise BackendUnavailable(f"PostgreSQL's {name} is not installed: `apt-get install postgresql` (Debian), "
                                 "or give --backend-store-uri postgresql://USER:PASSWORD@HOST:PORT/DB of a running one")
    return found


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """initdb and pg_ctl refuse to run as root: as root, run them as the package's ``postgres`` user."""
    if os.geteuid() != 0:
        return cmd
    # root's PATH may lack the sbin folders (`env -i PATH=/usr/bin:/bin`, cron): look there too
    runuser = shutil.which("runuser") or next((p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(p)),
                                              None)
    if runuser is None:
        raise BackendUnavailable("PostgreSQL's tools refuse to run as root and runuser (util-linux) is not installed "
                                 "to run them as the user postgres: run `ddpm mlflow-server` as another user, or give "
                                 "--backend-store-uri postgresql://USER:PASSWORD@HOST:PORT/DB of a running PostgreSQL")
    return [runuser, "-u", "postgres", "--", *cmd]


def _closed_to_others(path: Path) -> Path | None:
    """The first folder above ``path`` that another user (``postgres``) cannot enter, if any."""
    for parent in path.resolve().parents:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            return parent
    return None


def postgres_data(state: Path) -> Path:
    """Where the local PostgreSQL keeps its data: ``<state>/postgres``; as root, when a folder above it is
    closed to the ``postgres`` user (root's home is), under the package's own /var/lib/postgresql instead."""
    data = (state / "postgres").resolve()
    if os.geteuid() != 0 or _closed_to_others(data) is None:
        return data
    import hashlib

    key = hashlib.sha256(str(data).encode()).hexdigest()[:12]
    return Path("/var/lib/postgresql/ddpm") / key


def _password_file(data: Path) -> Path:
    """The generated password of the local PostgreSQL's ``postgres`` user, beside its data folder (0600)."""
    return data.with_name(data.name + ".password")


def _init_cluster(data: Path) -> None:
    """``initdb`` with password authentication (scram-sha-256) for every connection, local ones too: the
    port is on loopback, but other users of this machine could reach it."""
    import secrets

    data.mkdir(parents=True, exist_ok=True)
    pw = _password_file(data)
    pw.write_text(secrets.token_urlsafe(24) + "\n")
    pw.chmod(0o600)
    if os.geteuid() == 0:
        closed = _closed_to_others(data)
        if closed is not None:
            raise BackendUnavailable(f"PostgreSQL runs as the user postgres, who cannot enter {closed}: "
                                     f"give --pg-data a folder it can reach")
        for path in (data, pw):
            shutil.chown(path, "postgres", "postgres")
        data.chmod(0o700)
    subprocess.run(_as_postgres_user([_pg_bin("initdb"), "-D", str(data), "-A", "scram-sha-256", "-U", "postgres",
                                      f"--pwfile={pw}"]), check=True, capture_output=True, text=True)


def start_local_postgres(data: Path, port: int) -> tuple[str, bool]:
    """Initialise (once) and start (unless it runs) a PostgreSQL in ``data`` on 127.0.0.1:``port``; returns
    the URI of its ``mlflow`` database (with the generated password) and whether this call started it."""
    data = data.resolve()
    if not (data / "PG_VERSION").exists():
        _init_cluster(data)
    pg_ctl = [_pg_bin("pg_ctl"), "-D", str(data)]
    started = subprocess.run(_as_postgres_user([*pg_ctl, "status"]), capture_output=True).returncode != 0
    if started:
        log = data / "server.log"
        options = f"-p {port} -k {shlex.quote(str(data))} -c listen_addresses=127.0.0.1"
        out = subprocess.run(_as_postgres_user([*pg_ctl, "-l", str(log), "-w", "-t", "60", "-o", options, "start"]),
                             capture_output=True, text=True)
        if out.returncode != 0:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise BackendUnavailable(f"the local PostgreSQL in {data} did not start on 127.0.0.1:{port} "
                                     f"({(out.stderr or out.stdout).strip()}); its log ends:\n{tail}")
    pw = _password_file(data)
    secret = f":{quote(pw.read_text().strip(), safe='')}" if pw.exists() else ""
    base = f"postgresql://postgres{secret}@127.0.0.1:{port}"
    try:
        _create_database(f"{base}/postgres", "mlflow")
    except BaseException:
        if started:
            stop_local_postgres(data)
        raise
    return f"{base}/mlflow", started


def stop_local_postgres(data: Path) -> None:
    subprocess.run(_as_postgres_user([_pg_bin("pg_ctl"), "-D", str(data.resolve()), "-m", "fast", "-w", "stop"]),
                   capture_output=True, text=True)


def _create_database(admin_uri: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_uri, connect_timeout=10, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')


def check_postgres_driver() -> None:
    try:
        import psycopg  # noqa: F401  (what SQLAlchemy 2.1, under MLflow, uses for postgresql:// URIs)
    except ImportError:
        raise BackendUnavailable("MLflow needs psycopg for postgresql:// stores: pip install -e '.[server]'") from None


def check_postgres(uri: str, timeout_s: int = 10) -> None:
    """Connect once: an unreachable server, a refused password or a missing database is one line."""
    check_postgres_driver()
    import psycopg
    parts = urlsplit(uri)
    where = f"{parts.hostname}:{parts.port or 5432}"
    try:
        psycopg.connect(re.sub(r"^postgresql\+\w+://", "postgresql://", uri), connect_timeout=timeout_s).close()
    except psycopg.Error as exc:
        text = " ".join(str(exc).split())
        if "password authentication failed" in text or "no password supplied" in text or 'role "' in text:
            why = f"PostgreSQL at {where} refused the credentials of user {parts.username!r}"
            fix = "fix the user and password in --backend-store-uri"
        elif "does not exist" in text:
            why = f"PostgreSQL at {where} has no database {parts.path.lstrip('/')!r}"
            fix = "create it (createdb) or fix the database name"
        else:
            why = f"no PostgreSQL answers at {where}"
            fix = "start it, or fix the host and port in --backend-store-uri"
        raise BackendUnavailable(f"{why} ({text}); {fix}. Store: {redacted(uri)}") from None


# --- S3 --------------------------------------------------------------------------------------------

def check_s3(url: str) -> None:
    """The bucket of ``s3://bucket/path`` answers with the AWS credentials of this environment (and
    MLFLOW_S3_ENDPOINT_URL, or AWS_ENDPOINT_URL, for a store other than AWS)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    bucket = urlsplit(url).netloc
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"S3 bucket {bucket!r}" + (f" at {endpoint}" if endpoint else "")
    try:
        boto3.client("s3", endpoint_url=endpoint).head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise BackendUnavailable(f"no AWS credentials for the {where}: set AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
    except EndpointConnectionError:
        raise BackendUnavailable(f"nothing answers at {endpoint or 'the AWS endpoint'} for the {where}: start the "
                                 "store or fix MLFLOW_S3_ENDPOINT_URL") from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise BackendUnavailable(f"the {where} does not exist: create it (aws s3 mb s3://{bucket})") from None
        raise BackendUnavailable(f"the {where} refused access ({code}): check AWS_ACCESS_KEY_ID and "
                                 "AWS_SECRET_ACCESS_KEY and the bucket's policy") from None
    except BotoCoreError as exc:
        raise BackendUnavailable(f"the {where} cannot be used: {exc}") from None


# --- the server ------------------------------------------------------------------------------------

def serve(host: str = "127.0.0.1", port: int = 5000, backend_store_uri: str | None = None,
          artifacts_destination: str | None = None, pg_port: int = 5433, pg_data: str | None = None,
          allowed_hosts: str | None = None, state: Path = STATE, auth: bool = False,
          users_file: str | None = None) -> int:
    """Check the backends, then run ``mlflow server`` in the foreground until Ctrl+C; a PostgreSQL this
    command started is stopped with it. ``auth``: MLflow's basic-auth app (flows/mlflow_auth.py)."""
    from flows import mlflow_auth
    from flows.serve import check_port_free, server_env

    check_port_free(host, port, "the MLflow tracking server")
    if users_file and not auth:
        raise mlflow_auth.AuthSetupError("--users needs --auth")
    users = mlflow_auth.read_users(users_file) if users_file else {}
    auth_env = mlflow_auth.server_env(state) if auth else {}
    artifacts = artifacts_destination or str((state / "artifacts").resolve())
    if artifacts.startswith("s3://"):
        check_s3(artifacts)
    data = Path(pg_data) if pg_data else postgres_data(state)
    started = False
    if backend_store_uri is None:
        check_postgres_driver()
        print(f"PostgreSQL for MLflow: data in {data}, on 127.0.0.1:{pg_port}", flush=True)
        backend_store_uri, started = start_local_postgres(data, pg_port)
    try:
        if backend_store_uri.startswith("postgresql"):
            check_postgres(backend_store_uri)
        # The store's URI (its password) in the environment, not on a command line `ps` shows
        env = {**server_env(), "MLFLOW_BACKEND_STORE_URI": backend_store_uri, **auth_env}
        cmd = [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", artifacts, "--serve-artifacts",
               "--host", host, "--port", str(port), "--workers", "1"]
        if allowed_hosts:
            cmd += ["--allowed-hosts", allowed_hosts]
        if auth:
            cmd += ["--app-name", "basic-auth"]
        reach = socket.gethostname() if host in ("0.0.0.0", "::") else host
        login = (" and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (a user of this server)" if auth else "")
        print(f"MLflow tracking server on http://{host}:{port}: runs in {redacted(backend_store_uri)}, artifacts "
              f"in {artifacts}{', basic-auth users in ' + str(state / 'basic_auth.db') if auth else ''}; clients: "
              f"export MLFLOW_TRACKING_URI=http://{reach}:{port}{login}; Ctrl+C stops", flush=True)
        warn_if_exposed(host, "the MLflow tracking server", auth,
                        "Start it with --auth (make mlflow-server MLFLOW_AUTH=1) and MLFLOW_AUTH_ADMIN_PASSWORD set.")
        proc = subprocess.Popen(cmd, env=env)
        try:
            if users:
                mlflow_auth.provision(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", users, proc)
            return proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    finally:
        if started:
            stop_local_postgres(data)
