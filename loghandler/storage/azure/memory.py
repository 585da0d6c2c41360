"""
:class:`MemoryAppendBlobs`: an in-memory :class:`~loghandler.storage.azure.api.IAppendBlobClient`
with Azure's rules for append blobs, the reference the unit tests, the model-based
test and the store contract suite use:

- Create Append Blob with ``If-None-Match: *`` on an existing blob: refused (409
  ``BlobAlreadyExists``), which :meth:`~MemoryAppendBlobs.create` answers False;
- Append Block with a stale ``appendpos``: 412 ``AppendPositionConditionNotMet``;
  past ``maxsize``: 412 ``MaxBlobSizeConditionNotMet``; beyond ``max_blocks``
  committed blocks: 409 ``BlockCountExceedsLimit``; to a missing blob: 404
  ``BlobNotFound``; to a block blob: 409 ``InvalidBlobType``;
- blocks land whole or not at all (appends are atomic across writers).

Fault injection as :class:`~loghandler.storage.scripted.ScriptedCalls` gives it, per
operation (``GetBlobProperties``, ``CreateAppendBlob``, ``AppendBlock``, ``GetBlob``).
"""

from __future__ import annotations

from typing import Optional

import attrs
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from loghandler.interfaces import PreconditionFailed, StorageError
from loghandler.storage.azure.api import (
    APPEND_POSITION_NOT_MET,
    BLOB_NOT_FOUND,
    BLOCK_COUNT_EXCEEDED,
    MAX_BLOCK_BYTES,
    MAX_BLOCKS,
    MAX_SIZE_NOT_MET,
    Appended,
    BlobState,
    IAppendBlobClient,
)
from loghandler.storage.scripted import ScriptedCalls


@attrs.define
class MemoryBlob:
    """
    One blob.

    :ivar body: its bytes.
    :ivar blocks: the length of each committed block, in order.
    :ivar blob_type: ``AppendBlob`` (or ``BlockBlob``, put there by a test).
    :ivar content_type: its Content-Type.
    """

    body: bytes = b""
    blocks: list[int] = attrs.field(factory=list)
    blob_type: str = "AppendBlob"
    content_type: str = ""


@implementer(IAppendBlobClient)
class MemoryAppendBlobs(ScriptedCalls):
    """
    One container in a dict.

    :param max_blocks: committed blocks per blob (Azure: 50,000).
    :ivar blobs: name -> :class:`MemoryBlob`.
    """

    name = "memory-azure"
    container = "memory"

    def __init__(self, max_blocks: int = MAX_BLOCKS) -> None:
        super().__init__()
        self.max_blocks = max_blocks
        self.blobs: dict[str, MemoryBlob] = {}
        #: What :meth:`check` fails with (None: it answers).
        self.check_error: Optional[BaseException] = None

    def __repr__(self) -> str:
        return "<MemoryAppendBlobs>"

    # -- test controls -------------------------------------------------------------

    def body(self, name: str) -> bytes:
        """The bytes of blob ``name`` (KeyError if missing)."""
        return self.blobs[name].body

    def append_now(self, name: str, body: bytes) -> None:
        """Append ``body`` to ``name`` at once (creating it), as another writer would."""
        blob = self.blobs.setdefault(name, MemoryBlob())
        blob.body += body
        blob.blocks.append(len(body))

    # -- IAppendBlobClient ---------------------------------------------------------

    def check(self) -> Deferred[None]:
        def run() -> None:
            if self.check_error is not None:
                raise self.check_error

        return self._call("GetContainerProperties", "", run)

    def properties(self, name: str) -> Deferred[Optional[BlobState]]:
        def run() -> Optional[BlobState]:
            blob = self.blobs.get(name)
            if blob is None:
                return None
            return BlobState(len(blob.body), len(blob.blocks), blob.blob_type)

        return self._call("GetBlobProperties", name, run)

    def create(self, name: str, content_type: str) -> Deferred[bool]:
        def run() -> bool:
            if name in self.blobs:  # If-None-Match: * (409 BlobAlreadyExists)
                return False
            self.blobs[name] = MemoryBlob(content_type=content_type)
            return True

        return self._call("CreateAppendBlob", name, run)

    def append(self, name: str, body: bytes, position: int, max_size: int) -> Deferred[Appended]:
        def run() -> Appended:
            blob = self.blobs.get(name)
            if blob is None:
                raise StorageError("AppendBlock", 404, BLOB_NOT_FOUND, name)
            if blob.blob_type != "AppendBlob":
                raise StorageError("AppendBlock", 409, "InvalidBlobType", name)
            if len(body) > MAX_BLOCK_BYTES:
                raise StorageError("AppendBlock", 413, "RequestBodyTooLarge", name)
            if len(blob.body) + len(body) > max_size:
                raise PreconditionFailed("AppendBlock", name, code=MAX_SIZE_NOT_MET)
            if len(blob.body) != position:
                raise PreconditionFailed(
                    "AppendBlock", f"{name} is {len(blob.body)} bytes", APPEND_POSITION_NOT_MET
                )
            if len(blob.blocks) >= self.max_blocks:
                raise StorageError("AppendBlock", 409, BLOCK_COUNT_EXCEEDED, name)
            blob.body += body
            blob.blocks.append(len(body))
            return Appended(position, len(blob.blocks))

        return self._call("AppendBlock", name, run)

    def read(self, name: str, offset: int, length: int) -> Deferred[bytes]:
        def run() -> bytes:
            blob = self.blobs.get(name)
            if blob is None:
                raise StorageError("GetBlob", 404, BLOB_NOT_FOUND, name)
            return blob.body[offset : offset + length]

        return self._call("GetBlob", name, run)

    def close(self) -> Deferred[None]:
        return succeed(None)
