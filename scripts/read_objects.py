"""
Read what loghandler stored (``scripts/read-objects``): with no argument, the keys
and sizes in the bucket (on Azure: the blobs' names, sizes and committed blocks);
with a key, its NDJSON lines, decompressed (all gzip members).

Connection settings come from ``.dev/emulator.env`` (written by
``scripts/dev-server``), else from the environment.  With ``STORAGE=azure`` there,
the blobs of ``AZURE_CONTAINER`` are read with azure-storage-blob (``AZURE_ACC``,
``AZURE_KEY``, ``AZURE_BLOB_ENDPOINT``); otherwise the objects of S3's
``AWS_BUCKET`` (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY``,
``AWS_ACCESS_SECRET``).
"""

from __future__ import annotations

import gzip
import os
import sys
from typing import Any, Mapping, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_FILE = os.path.join(ROOT, ".dev", "emulator.env")


def settings(path: str = ENV_FILE, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The emulator's settings from ``path`` when it exists, else the environment's."""
    if not os.path.exists(path):
        return dict(os.environ if environ is None else environ)
    with open(path) as f:
        return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)


def is_azure(env: Mapping[str, str]) -> bool:
    """Whether the settings point at Azure Blob Storage (``STORAGE=azure``)."""
    return env.get("STORAGE", "aws").strip().lower() == "azure"


def main(argv: list[str]) -> int:
    """List or print; exits with a message when the storage cannot be reached."""
    env = settings()
    try:
        return azure_main(env, argv) if is_azure(env) else s3_main(env, argv)
    except BrokenPipeError:
        # The reader (head, less) went away.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# -- S3 ------------------------------------------------------------------------------


def s3_main(env: Mapping[str, str], argv: list[str]) -> int:
    """List the bucket or print objects; exits when it cannot be reached."""
    import botocore.exceptions
    import botocore.session

    if "AWS_BUCKET" not in env:
        sys.exit("no .dev/emulator.env and no AWS_BUCKET: start scripts/dev-server first")
    s3 = botocore.session.get_session().create_client(
        "s3",
        region_name=env.get("AWS_REGION", "us-east-1"),
        endpoint_url=env.get("AWS_ENDPOINT_URL"),
        aws_access_key_id=env.get("AWS_ACCESS_KEY"),
        aws_secret_access_key=env.get("AWS_ACCESS_SECRET"),
    )
    try:
        return s3_show(s3, env["AWS_BUCKET"], argv)
    except botocore.exceptions.EndpointConnectionError:
        sys.exit("the emulator at %s is not running: start scripts/dev-server" % env.get("AWS_ENDPOINT_URL"))
    except s3.exceptions.NoSuchKey:
        sys.exit("no such object; scripts/read-objects lists them")


def s3_show(s3: Any, bucket: str, argv: list[str]) -> int:
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


# -- Azure Blob Storage ----------------------------------------------------------------


def azure_main(env: Mapping[str, str], argv: list[str]) -> int:
    """List the container or print blobs; exits when it cannot be reached."""
    from azure.core.exceptions import ResourceNotFoundError, ServiceRequestError
    from azure.storage.blob import ContainerClient

    if "AZURE_CONTAINER" not in env or "AZURE_ACC" not in env:
        sys.exit("no AZURE_ACC or AZURE_CONTAINER in the settings: start scripts/dev-server --azure first")
    endpoint = env.get("AZURE_BLOB_ENDPOINT") or "https://%s.blob.core.windows.net" % env["AZURE_ACC"]
    credential = {"account_name": env["AZURE_ACC"], "account_key": env.get("AZURE_KEY", "")}
    container = ContainerClient(endpoint, env["AZURE_CONTAINER"], credential=credential,
                                retry_total=0, connection_timeout=5)
    try:
        with container:
            return azure_show(container, argv)
    except ServiceRequestError:
        sys.exit("the emulator at %s is not running: start scripts/dev-server --azure" % endpoint)
    except ResourceNotFoundError as e:
        if getattr(e, "error_code", None) == "ContainerNotFound":
            sys.exit("no container %s at %s" % (env["AZURE_CONTAINER"], endpoint))
        sys.exit("no such blob; scripts/read-objects lists them")


def azure_show(container: Any, argv: list[str]) -> int:
    """List the container's blobs, or write the blobs' decompressed lines to stdout."""
    if not argv:
        found = False
        for item in container.list_blobs():
            found = True
            blocks = container.get_blob_client(item.name).get_blob_properties().append_blob_committed_block_count
            print("%10d  %6s blocks  %s" % (item.size, "-" if blocks is None else blocks, item.name))
        if not found:
            print("(no blobs yet: a blob appears at its stream's first checkpoint)")
        return 0
    for name in argv:
        body = container.download_blob(name).readall()
        sys.stdout.buffer.write(gzip.decompress(body))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
