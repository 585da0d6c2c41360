"""
The store contract (:mod:`tests.store_contract`) against the in-memory backends on a
``task.Clock``: the S3 store (:class:`~loghandler.storage.s3.writer.S3ObjectStore`)
over the in-memory S3 (:class:`~loghandler.storage.memory.MemoryStore`, 1 KiB
minimum parts), and the Azure store
(:class:`~loghandler.storage.azure.writer.AzureObjectStore`) over the in-memory
container (:class:`~loghandler.storage.azure.memory.MemoryAppendBlobs`).  The same
tests run on moto and Azurite in
``tests/integration/test_store_contract_emulators.py``.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from loghandler.storage.azure.memory import MemoryAppendBlobs
from loghandler.storage.azure.writer import AzureObjectStore
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.writer import S3ObjectStore
from tests.store_contract import ObjectStoreContractMixin

#: The in-memory S3's smallest part, and the streams' part size on both backends.
PART_SIZE = 1024


class S3MemoryStoreContractTests(ObjectStoreContractMixin, TestCase):
    """The store contract for the S3 store over the in-memory S3."""

    part_size = PART_SIZE
    rollover_unsupported = (
        "the S3 store rolls over at 4 GiB (ROLLOVER_BYTES), too large for a test;"
        " it has no block limit to make small"
    )

    def setUp(self) -> None:
        self.clock = Clock()
        self.s3 = MemoryStore(min_part_size=PART_SIZE, now=self.clock.seconds)

    def make_store(self, **options: Any) -> S3ObjectStore:
        return S3ObjectStore(self.s3, self.clock, part_size=PART_SIZE, **options)

    async def read_object(self, key: str) -> bytes:
        return self.s3.body(key)

    async def object_keys(self, prefix: str) -> list[str]:
        return sorted(key for key in self.s3.objects if key.startswith(prefix))

    async def unfinished(self) -> list[str]:
        return sorted(f"{u.key} (upload {i})" for i, u in self.s3.uploads.items())


class AzureMemoryStoreContractTests(ObjectStoreContractMixin, TestCase):
    """The store contract for the Azure store over the in-memory container."""

    part_size = PART_SIZE

    def setUp(self) -> None:
        self.clock = Clock()
        self.azure = MemoryAppendBlobs()

    def make_store(self, **options: Any) -> AzureObjectStore:
        return AzureObjectStore(self.azure, self.clock, **options)

    async def read_object(self, key: str) -> bytes:
        return self.azure.body(key)

    async def object_keys(self, prefix: str) -> list[str]:
        return sorted(name for name in self.azure.blobs if name.startswith(prefix))

    async def content_type(self, key: str) -> Optional[str]:
        return self.azure.blobs[key].content_type
