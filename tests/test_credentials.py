"""Credentials: what is masked in records, the basic-auth settings that are refused, the exposed-bind warning."""

from __future__ import annotations

import logging

import pytest

from flows import credentials, mlflow_auth

ENV = {"MLFLOW_TRACKING_URI": "postgresql://ddpm:pg-Pass-1@db:5432/mlflow", "AWS_SECRET_ACCESS_KEY": "aws/Key+9",
       "PREFECT_API_AUTH_STRING": "team:pref-Pass-2", "MLFLOW_TRACKING_PASSWORD": "abc"}  # under 4: not masked


def test_scrub_masks_the_environments_secrets_and_any_urls_password():
    text = ("store postgresql://ddpm:pg-Pass-1@db:5432/mlflow; key aws/Key+9; header team:pref-Pass-2 and "
            "pref-Pass-2 alone; http://bob:hunter22@host:5000/#/runs; s3://bucket/path; abc")
    assert credentials.scrub(text, ENV) == (
        "store postgresql://ddpm:***@db:5432/mlflow; key ***; header *** and *** alone; http://bob:***@host:5000/#/runs; "
        "s3://bucket/path; abc")
    assert credentials.secrets(ENV) == ["team:pref-Pass-2", "pref-Pass-2", "aws/Key+9", "pg-Pass-1"]


def test_the_log_filter_masks_a_record_before_any_handler_writes_it(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("prefect.test_credentials")
    handler = Keep()
    logger.addHandler(handler)
    try:
        credentials.scrub_prefect_logs()
        credentials.scrub_prefect_logs()  # once per handler, however often a flow starts
        assert sum(isinstance(f, credentials._ScrubFilter) for f in handler.filters) == 1
        logger.warning("uploading with %s to %s", "aws/Key+9", "http://ddpm:pg-Pass-1@db/x")
    finally:
        logger.removeHandler(handler)
    assert records == ["uploading with *** to http://ddpm:***@db/x"]


def test_binding_beyond_loopback_without_authentication_warns(capsys):
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        credentials.warn_if_exposed(host, "the X server", False, "Use --auth.")
    credentials.warn_if_exposed("0.0.0.0", "the X server", True, "Use --auth.")
    assert capsys.readouterr().err == ""
    credentials.warn_if_exposed("0.0.0.0", "the X server", False, "Use --auth.")
    assert capsys.readouterr().err == ("warning: the X server listens on 0.0.0.0 without authentication: anyone who "
                                       "reaches this machine can read and change it. Use --auth.\n")


@pytest.mark.parametrize("password, expected", [
    (None, "--auth needs the admin's password in MLFLOW_AUTH_ADMIN_PASSWORD"),
    ("password1234", "MLFLOW_AUTH_ADMIN_PASSWORD is a default or too short"),
    ("short-pw", "MLFLOW_AUTH_ADMIN_PASSWORD is a default or too short"),
])
def test_the_admin_password_must_be_set_and_not_a_default(monkeypatch, password, expected):
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    if password:
        monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", password)
    with pytest.raises(mlflow_auth.AuthSetupError, match=f"^{expected}"):
        mlflow_auth.admin()


def test_the_auth_config_holds_no_password_and_the_users_file_is_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "a-long-admin-password")
    env = mlflow_auth.server_env(tmp_path)
    ini = (tmp_path / "basic_auth.ini").read_text()
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / "basic_auth.ini")
    assert "a-long-admin-password" not in ini and "default_permission = EDIT" in ini and "admin_username = admin" in ini
    assert (tmp_path / "flask_secret_key").stat().st_mode & 0o077 == 0  # the CSRF key: the owner's only
    assert mlflow_auth.server_env(tmp_path)["MLFLOW_FLASK_SERVER_SECRET_KEY"] == env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    users = tmp_path / "users.txt"
    users.write_text("# team\nalice:alice-password\n\nbob : bob-password\n")
    users.chmod(0o644)
    assert mlflow_auth.read_users(users) == {"alice": "alice-password", "bob": "bob-password"}
    assert f"{users} holds passwords and other users of this machine can read it" in capsys.readouterr().err
    for text, error in (("alice\n", "line 1: expected name:password"), ("x:short\n", "the password of 'x' is under 8")):
        users.write_text(text)
        with pytest.raises(mlflow_auth.AuthSetupError, match=error):
            mlflow_auth.read_users(users)
    with pytest.raises(mlflow_auth.AuthSetupError, match="cannot read the users file"):
        mlflow_auth.read_users(tmp_path / "missing.txt")
