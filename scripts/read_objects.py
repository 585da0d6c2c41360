"""
Read what loghandler stored (``scripts/read-objects``): with no argument, the keys
and sizes in the bucket; with a key, its NDJSON lines, decompressed (all gzip
members).  Connection settings come from ``.dev/emulator.env`` (written by
``scripts/dev-server``), else from the environment (``AWS_ENDPOINT_URL``,
``AWS_BUCKET``, ``AWS_REGION``, ``AWS_ACCESS_KEY``, ``AWS_ACCESS_SECRET``).
"""

from __future__ import annotations

import gzip
import os
import sys

from typing import Any

import botocore.exceptions
import botocore.session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings() -> dict[str, str]:
    """The emulator's settings, or the environment's."""
    values = dict(os.environ)
    path = os.path.join(ROOT, ".dev", "emulator.env")
    if os.path.exists(path):
        with open(path) as f:
            values.update(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    return values


def main(argv: list[str]) -> int:
    """List or print; 1 when the bucket cannot be reached."""
    env = settings()
    if "AWS_BUCKET" not in env:
        sys.exit("no .dev/emulator.env and no AWS_BUCKET: start scripts/dev-server first")
    s3 = botocore.session.get_session().create_client(
        "s3",
        region_name=env.get("AWS_REGION", "us-east-1"),
        endpoint_url=env.get("AWS_ENDPOINT_URL"),
        aws_access_key_id=env.get("AWS_ACCESS_KEY"),
        aws_secret_access_key=env.get("AWS_ACCESS_SECRET"),
    )
    bucket = env["AWS_BUCKET"]
    try:
        return show(s3, bucket, argv)
    except botocore.exceptions.EndpointConnectionError:
        sys.exit("the emulator at %s is not running: start scripts/dev-server" % env.get("AWS_ENDPOINT_URL"))
    except s3.exceptions.NoSuchKey:
        sys.exit("no such object; scripts/read-objects lists them")
    except BrokenPipeError:
        # The reader (head, less) went away.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def show(s3: Any, bucket: str, argv: list[str]) -> int:
    """List the bucket, or write the keys' decompressed lines to stdout."""
    if not argv:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        found = False
        for page in pages:
            for item in page.get("Contents", []):
                found = True
                print("%10d  %s" % (item["Size"], item["Key"]))
        if not found:
            print("(no objects yet: an object appears once its stream is completed)")
        return 0
    for key in argv:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        sys.stdout.buffer.write(gzip.decompress(body))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
