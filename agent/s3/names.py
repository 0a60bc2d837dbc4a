"""``s3://BUCKET/KEY`` names."""

from __future__ import annotations

import re
from typing import NamedTuple

from agent.errors import InvalidArgument
from agent.s3 import SCHEME

# S3's bucket naming rules, loosely (3-63 characters of lower-case letters, digits, dots
# and hyphens): what other stores accept is theirs to refuse.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,62}")


class S3Name(NamedTuple):
    bucket: str
    key: str  # for a prefix: "" or ending in "/"

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def child(self, name: str) -> S3Name:
        """The object ``name`` under this prefix."""
        return S3Name(self.bucket, self.key + name)


def parse_object(name: str) -> S3Name:
    """``s3://BUCKET/KEY`` naming one object (InvalidArgument otherwise)."""
    parsed = _parse(name)
    if not parsed.key or parsed.key.endswith("/"):
        raise InvalidArgument(f"{name}: an s3:// archive needs an object name after the "
                              "bucket, as in s3://BUCKET/PREFIX/NAME.arc")
    return parsed


def parse_prefix(name: str) -> S3Name:
    """``s3://BUCKET[/PREFIX]``: the key prefix gets its trailing ``/``."""
    parsed = _parse(name)
    key = parsed.key
    if key and not key.endswith("/"):
        key += "/"
    return S3Name(parsed.bucket, key)


def _parse(name: str) -> S3Name:
    if not name.startswith(SCHEME):
        raise InvalidArgument(f"{name}: not an s3:// name")
    bucket, _, key = name[len(SCHEME):].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidArgument(f"{name}: {bucket!r} is not a bucket name")
    if key.startswith("/") or "//" in key:
        raise InvalidArgument(f"{name}: empty path segments in the object name")
    return S3Name(bucket, key)
