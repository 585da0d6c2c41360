"""
The store contract (:mod:`tests.store_contract`) on the emulators, on the real
reactor: the S3 store (:class:`~loghandler.storage.s3.writer.S3ObjectStore`) through
the S3 HTTP client on moto, with S3's real 5 MiB minimum part; and the Azure store
(:class:`~loghandler.storage.azure.writer.AzureObjectStore`) through
azure-storage-blob on Azurite, built as ``loghandler.tap.make_azure_store`` builds it
from the daemon's settings.  The same tests run on the in-memory backends in
``tests/test_store_contract.py``.

Each emulator runs once per test process and is reset before each test; what the
stores wrote is read back with the emulator's own SDK (botocore,
azure-storage-blob), not through the code under test.  Each store has a client (and
connection pool or thread pool) of its own, as a process would.  Without moto or
Azurite these tests skip, and fail when ``CI`` is set.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from loghandler.config import MiB, from_environ
from loghandler.retry import RetryLayer
from loghandler.storage.azure.client import AzureBlobClient
from loghandler.storage.azure.settings import container_client
from loghandler.storage.azure.writer import AzureObjectStore
from loghandler.storage.s3.client import build_s3_client
from loghandler.storage.s3.credentials import aws_credentials
from loghandler.storage.s3.writer import S3ObjectStore
from tests.integration.azurite import shared_azurite
from tests.integration.moto import shared_moto
from tests.store_contract import ObjectStoreContractMixin

#: Calls at once of each Azure store (threads of its client's pool).
AZURE_CALLS = 4


class S3MotoStoreContractTests(ObjectStoreContractMixin, TestCase):
    """The store contract for the S3 store on moto (5 MiB parts, as moto enforces)."""

    clock = reactor
    part_size = 5 * MiB
    rollover_unsupported = (
        "the S3 store rolls over at 4 GiB (ROLLOVER_BYTES), too large for a test;"
        " it has no block limit to make small"
    )
    concurrent_completion_unsupported = (
        "moto does not enforce If-Match on CompleteMultipartUpload (README: several"
        " daemons on one bucket need a store that does), so two merges of 5 MiB or"
        " more racing at the same instant can overwrite each other there; they race"
        " on the memory S3 and in the model-based test"
    )

    def setUp(self) -> None:
        self.moto = shared_moto()
        self.moto.reset()
        self.s3 = self.moto.botocore_client()
        self.addCleanup(self.s3.close)

    def make_store(self, **options: Any) -> S3ObjectStore:
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        client = build_s3_client(
            reactor,
            bucket=self.moto.bucket,
            region=self.moto.region,
            endpoint_url=self.moto.endpoint_url,
            credentials=aws_credentials(self.moto.access_key, self.moto.secret_key),
            pool=pool,
        )
        store = S3ObjectStore(client, reactor, part_size=self.part_size, **options)
        self.addCleanup(store.close)
        return store

    async def read_object(self, key: str) -> bytes:
        answer = self.s3.get_object(Bucket=self.moto.bucket, Key=key)
        with answer["Body"] as body:
            data: bytes = body.read()
        return data

    async def object_keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.moto.bucket, Prefix=prefix
        )
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    async def content_type(self, key: str) -> Optional[str]:
        answer = self.s3.head_object(Bucket=self.moto.bucket, Key=key)
        content_type: str = answer["ContentType"]
        return content_type

    async def unfinished(self) -> list[str]:
        answer = self.s3.list_multipart_uploads(Bucket=self.moto.bucket)
        return sorted(
            f"{u['Key']} (upload {u['UploadId']})" for u in answer.get("Uploads", [])
        )


class AzureAzuriteStoreContractTests(ObjectStoreContractMixin, TestCase):
    """The store contract for the Azure store on Azurite."""

    clock = reactor
    part_size = 4096

    def setUp(self) -> None:
        self.azurite = shared_azurite()
        self.azurite.reset()
        self.service = self.azurite.blob_service_client()
        self.addCleanup(self.service.close)
        self.container = self.service.get_container_client(self.azurite.container)

    def make_store(self, **options: Any) -> AzureObjectStore:
        # As loghandler.tap.make_azure_store builds it, from the daemon's settings.
        config = from_environ(self.azurite.env())
        retry = RetryLayer(reactor)
        client = AzureBlobClient(
            container_client(config, AZURE_CALLS), reactor, AZURE_CALLS, retry.attempt_timeout
        )
        options.setdefault("max_blocks", config.azure_max_blocks)
        store = AzureObjectStore(client, reactor, retry=retry, call_slots=AZURE_CALLS, **options)
        self.addCleanup(store.close)
        return store

    async def read_object(self, key: str) -> bytes:
        data: bytes = self.container.download_blob(key).readall()
        return data

    async def object_keys(self, prefix: str) -> list[str]:
        return sorted(self.container.list_blob_names(name_starts_with=prefix or None))

    async def content_type(self, key: str) -> Optional[str]:
        properties = self.container.get_blob_client(key).get_blob_properties()
        content_type: Optional[str] = properties.content_settings.content_type
        return content_type
