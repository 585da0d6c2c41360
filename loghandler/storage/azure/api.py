"""
The Azure Blob Storage calls the Azure writer makes, on one container, as one
interface: :class:`IAppendBlobClient`.  Implemented on azure-storage-blob
(:class:`~loghandler.storage.azure.client.AzureBlobClient`) and in memory, with
Azure's rules and fault injection, for tests
(:class:`~loghandler.storage.azure.memory.MemoryAppendBlobs`).

Errors: an error answer raises :class:`~loghandler.interfaces.StorageError` with
Azure's status and error code (``AppendPositionConditionNotMet``,
``BlockCountExceedsLimit``, ``BlobNotFound``...), a 412 raises
:class:`~loghandler.interfaces.PreconditionFailed` (with the code kept), and no
answer raises ``StorageError`` with status 0.  Azure error codes:
https://learn.microsoft.com/rest/api/storageservices/blob-service-error-codes
"""

from __future__ import annotations

from typing import Optional

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

MiB = 1024 * 1024

#: Committed blocks an append blob may hold, shared by all its writers.
MAX_BLOCKS = 50_000
#: The largest append blob, bytes: 50,000 blocks of 4 MiB ("slightly more than
#: 195 GiB"), https://learn.microsoft.com/rest/api/storageservices/append-block
MAX_APPEND_BLOB_BYTES = MAX_BLOCKS * 4 * MiB
#: The largest append block, bytes (service version 2022-11-02 and later; 4 MiB
#: before).
MAX_BLOCK_BYTES = 100 * MiB

#: Error codes the writer acts on.
APPEND_POSITION_NOT_MET = "AppendPositionConditionNotMet"
MAX_SIZE_NOT_MET = "MaxBlobSizeConditionNotMet"
BLOCK_COUNT_EXCEEDED = "BlockCountExceedsLimit"
BLOB_NOT_FOUND = "BlobNotFound"
BLOB_EXISTS = "BlobAlreadyExists"


@attrs.frozen
class BlobState:
    """
    What Get Blob Properties tells of a blob.

    :ivar size: its length, bytes (the offset of the next append).
    :ivar blocks: committed blocks (append blobs; 0 for other types).
    :ivar blob_type: ``AppendBlob``, ``BlockBlob`` or ``PageBlob``.
    """

    size: int
    blocks: int
    blob_type: str = "AppendBlob"


@attrs.frozen
class Appended:
    """
    The answer to Append Block.

    :ivar offset: where the block landed (``x-ms-blob-append-offset``), bytes.
    :ivar blocks: committed blocks after it (``x-ms-blob-committed-block-count``).
    """

    offset: int
    blocks: int


class IAppendBlobClient(Interface):
    """
    Calls on append blobs of one container.  Every method returns a Deferred and
    errbacks as the module docstring says.
    """

    name = Attribute("A short name for logs: 'azure', 'memory-azure'.")
    container = Attribute("The container's name (str).")

    def check() -> "Deferred[None]":
        """Fires when the container answers with these credentials (a probe call)."""

    def properties(name: str) -> "Deferred[Optional[BlobState]]":
        """Get Blob Properties of blob ``name``; None when it does not exist."""

    def create(name: str, content_type: str) -> "Deferred[bool]":
        """
        Create Append Blob ``name``, only if it does not exist (``If-None-Match:
        *``), so that a writer never resets another's blob.

        :returns: True when created, False when it existed already.
        """

    def append(name: str, body: bytes, position: int, max_size: int) -> "Deferred[Appended]":
        """
        Append Block ``body`` (bytes, at most :data:`MAX_BLOCK_BYTES`) to ``name``,
        only if the blob is ``position`` bytes long (``x-ms-blob-condition-appendpos``)
        and stays within ``max_size`` bytes (``x-ms-blob-condition-maxsize``).

        :raises PreconditionFailed: (errback) code ``AppendPositionConditionNotMet``
            or ``MaxBlobSizeConditionNotMet``.
        :raises StorageError: ``BlockCountExceedsLimit`` (409), ``BlobNotFound``
            (404)...
        """

    def read(name: str, offset: int, length: int) -> "Deferred[bytes]":
        """
        Get Blob, the range ``offset`` .. ``offset + length - 1``: the bytes there,
        fewer (or none) when the blob is shorter.
        """

    def close() -> "Deferred[None]":
        """Release connections and threads; called once, after the flush."""
