"""The boto3 client and its errors as one line a user can act on.

Credentials, region and endpoint come from boto3's standard chain, so an admin's existing
configuration works as it is: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``~/.aws/credentials`` and ``~/.aws/config``, instance roles, and
``AWS_ENDPOINT_URL`` (or ``endpoint_url`` in the profile) for an S3-compatible store.
Requests that fail on the network or with a 5xx/throttling answer are retried by botocore
("standard" mode: up to 5 attempts, exponential backoff with jitter); every request here is
safe to repeat (a part upload, a ranged GET, an abort).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

#: botocore's attempts per request (the first included), network and 5xx errors.
ATTEMPTS = 5


def client(connections: int = 10) -> Any:
    """A new S3 client with room for ``connections`` requests at once."""
    return _factory()(connections)


@functools.cache
def _factory() -> Any:
    import boto3  # here: only s3:// names pay its import
    from botocore.config import Config

    # boto3 logs at INFO where it found credentials and the endpoint: not the user's news.
    for name in ("boto3", "botocore", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    session = boto3.session.Session()

    def make(connections: int) -> Any:
        cfg = Config(retries={"mode": "standard", "max_attempts": ATTEMPTS},
                     max_pool_connections=connections, connect_timeout=10, read_timeout=60,
                     tcp_keepalive=True)
        return session.client("s3", config=cfg)

    return make


def error_code(e: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of a botocore ClientError; ("", 0) for anything else."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_missing(e: BaseException) -> bool:
    code, status = error_code(e)
    return status == 404 or code in ("NoSuchKey", "NotFound", "404")


def describe(e: BaseException, what: str) -> str:
    """One line for the user: ``what`` (the object or bucket) and what went wrong."""
    from botocore import exceptions as bx

    code, status = error_code(e)
    if isinstance(e, bx.ClientError):
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken"):
            return (f"{what}: the store refused the credentials ({code}): check "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if code in ("AccessDenied", "Forbidden", "403") or status == 403:
            return (f"{what}: access denied: check the credentials (AWS_ACCESS_KEY_ID, "
                    "AWS_PROFILE) and what they may do in this bucket")
        if code == "NoSuchBucket":
            return f"{what}: the bucket does not exist"
        message = e.response.get("Error", {}).get("Message") or code or f"HTTP {status}"
        return f"{what}: {message} ({code or status})"
    if isinstance(e, bx.NoCredentialsError):
        return (f"{what}: no S3 credentials found: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (see ~/.aws/credentials)")
    if isinstance(e, bx.EndpointConnectionError):
        url = str(e.kwargs.get("endpoint_url", ""))
        scheme, _, rest = url.partition("://")
        return f"{what}: cannot reach the S3 endpoint {scheme}://{rest.split('/')[0]}"
    if isinstance(e, bx.ConnectionClosedError | bx.ReadTimeoutError | bx.ConnectTimeoutError):
        return f"{what}: the connection to the S3 endpoint failed ({e})"
    return f"{what}: {e}"
