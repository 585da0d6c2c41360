"""Shared test helpers: messages, lines and reading gzip objects back."""

from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import Any

from loghandler.message import Message

#: 2020-03-30T00:00:00Z in Unix epoch milliseconds.
DAY_START_MS = 1585526400000
MS_PER_DAY = 86_400_000


def message(n: int, client_id: int = 3, timestamp: int = DAY_START_MS + 1000) -> Message:
    """A valid message numbered ``n`` (its content_id)."""
    return Message("message %d" % n, n, client_id, timestamp)


def noise_line(n: int, size: int = 200) -> bytes:
    """An NDJSON line of about ``size`` bytes that compresses poorly."""
    text = os.urandom(size // 2).hex()
    return b'{"text":"%s","content_id":%d,"client_id":3,"timestamp":%d}\n' % (
        text.encode(),
        n,
        DAY_START_MS,
    )


def noise(first: int, count: int) -> list[bytes]:
    """``count`` poorly compressible lines numbered from ``first``."""
    return [noise_line(n) for n in range(first, first + count)]


def members(data: bytes) -> list[bytes]:
    """
    Split gzip data into its decompressed members.

    :raises AssertionError: the data end inside a member or hold trailing garbage.
    """
    out = []
    while data:
        d = zlib.decompressobj(31)
        out.append(d.decompress(data))
        if not d.eof:
            raise AssertionError("truncated gzip member")
        data = d.unused_data
    return out


def read_lines(data: bytes) -> list[bytes]:
    """The NDJSON lines of a gzip object, checking that it is whole gzip members."""
    members(data)
    text = gzip.decompress(data)
    assert text.endswith(b"\n") or not text
    return text.splitlines(keepends=True)


def decode_lines(data: bytes) -> list[dict]:
    """The parsed JSON objects of a gzip NDJSON object."""
    return [json.loads(line) for line in read_lines(data)]


def bucket_objects(s3: Any, bucket: str) -> dict[str, bytes]:
    """
    The objects of ``bucket`` outside ``_loghandler/`` (staging, leases), by key,
    read with the botocore S3 client ``s3`` (one listing page: up to 1,000).
    """
    listing = s3.list_objects_v2(Bucket=bucket)
    return {
        o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in listing.get("Contents", [])
        if not o["Key"].startswith("_loghandler/")
    }
