"""The DVC remote's errors as one line: which remote, what is wrong, what to do.

DVC passes an S3 client's errors up as they are (``EndpointConnectionError`` with a traceback from
aiobotocore, ``ERROR: unexpected error - Unable to locate credentials``). An unreachable endpoint may come
back (transient: the flow's push task retries it); missing or refused credentials and a missing bucket do
not (deterministic: not retried).
"""

from __future__ import annotations


class RemoteUnavailable(RuntimeError):
    """The default DVC remote cannot be reached or refuses us; ``deterministic``: retrying will not help."""

    def __init__(self, message: str, deterministic: bool):
        super().__init__(message)
        self.deterministic = deterministic


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe(repo) -> str:
    """``remote 'shared' (s3://bucket/path at http://endpoint)`` for the default remote of ``repo``."""
    name = repo.config["core"].get("remote", "")
    conf = repo.config["remote"].get(name, {}) if name else {}
    endpoint = conf.get("endpointurl")
    return f"DVC remote {name!r} ({conf.get('url', '?')}{' at ' + endpoint if endpoint else ''})"


def explain(repo, exc: BaseException, doing: str) -> RemoteUnavailable | None:
    """A :class:`RemoteUnavailable` for an S3 error anywhere in ``exc``'s chain, else None."""
    try:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
    except ImportError:  # no S3 support installed: not an S3 remote
        return None
    where = describe(repo)
    for e in _chain(exc):
        if isinstance(e, NoCredentialsError) or "Unable to locate credentials" in str(e):
            return RemoteUnavailable(f"{doing} failed: no AWS credentials for the {where}: set AWS_ACCESS_KEY_ID "
                                     "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) where this runs", True)
        if isinstance(e, EndpointConnectionError):
            kept = " (the outputs stay in the local cache)" if doing.startswith("dvc push") else ""
            return RemoteUnavailable(f"{doing} failed: nothing answers at the {where}; start the store or fix "
                                     f"`dvc remote modify <name> endpointurl`, then run again{kept}", False)
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "404"):
                return RemoteUnavailable(f"{doing} failed: the bucket of the {where} does not exist: create it", True)
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
                return RemoteUnavailable(f"{doing} failed: the {where} refused the credentials ({code}): check "
                                         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and the bucket's policy", True)
    return None


def probe(repo, doing: str) -> None:
    """One request to the default remote before a transfer: its failure explained, instead of DVC's
    per-file errors and tracebacks followed by ``N files failed to download``."""
    remote = repo.cloud.get_remote()
    try:
        found = remote.fs.exists(remote.path)
        bucket = remote.path.split("/")[0]
        if not found and remote.fs.protocol in ("s3", "s3a") and not remote.fs.exists(bucket):
            raise RemoteUnavailable(f"{doing} failed: the bucket {bucket!r} of the {describe(repo)} does not exist: "
                                    "create it (aws s3 mb s3://" + bucket + ")", True)
    except RemoteUnavailable:
        raise
    except Exception as exc:
        explained = explain(repo, exc, doing)
        if explained is None:
            raise
        raise explained from None
