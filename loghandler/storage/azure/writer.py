"""
The Azure side of the writer seam (DESIGN.md sections 5-7): :class:`AzureObjectStore`
opens an :class:`AzureObjectWriter` per stream, which appends the stream's data to
the **append blob** of its key, ``chat/{date}/content_logs_{date}_{client_id}``.

Azure has no multipart upload and cannot replace data: every part, every checkpoint
(``checkpoints_are_parts``: the stream closes its gzip member at a checkpoint and
hands it over as a part) and the tail is one **block**, appended one at a time, in
order.  Every block is whole gzip members, so the blob is valid gzip after every
append, and what is appended stays: there is nothing staged and nothing to recover.

Exactly once, with several writers on one blob (Append Block,
https://learn.microsoft.com/rest/api/storageservices/append-block):

1. The first gzip header of every block carries an extra field (RFC 1952 section
   2.3.1.1, subfield ``Lh``) with this process's writer ID and the block's sequence
   number, so that no two blocks anywhere are alike.
2. Each append carries ``x-ms-blob-condition-appendpos``: the blob's length as this
   writer last saw it.  Every attempt of a block (the retry layer tries again after
   a timeout or a lost answer) carries the same position, so at most one lands.
3. A 412 ``AppendPositionConditionNotMet`` (or any other refusal) is resolved by
   reading the blob back at that position: the block's header there means an
   earlier attempt landed (its answer was lost), and the block is done; anything
   else is another writer's block, which stays there for good (the blob only grows),
   so no attempt at that position can land any more: the writer reads the blob's
   length (Get Blob Properties) and appends there.

The blob is created with ``If-None-Match: *`` (two writers never reset each other's
blob), Content-Type ``application/gzip``.  Before a blob reaches ``max_blocks``
committed blocks (50,000, a limit all writers of the blob share) or
``max_blob_bytes``, the writer rolls over to ``{key}.1``, then ``{key}.2``... (the
names S3's rollover uses, :func:`~loghandler.keys.rollover_key`): when its own count
says so, or when the service refuses (409 ``BlockCountExceedsLimit``, 412
``MaxBlobSizeConditionNotMet``).  A blob that is not an append blob is skipped the
same way, and so is one that does not start with a gzip header (another program's
data: appending gzip after it would make the blob unreadable).  A blob deleted from
outside (404 ``BlobNotFound``) is created again; what it held is gone.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any, Callable, Optional

from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    DeferredSemaphore,
    ensureDeferred,
    fail,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from loghandler.gzipframe import with_extra_field
from loghandler.interfaces import Abandoned, Finished, IObjectStore, IObjectWriter
from loghandler.keys import rollover_key
from loghandler.retry import Fault, RetryLayer, StorageFault
from loghandler.storage.azure.api import (
    APPEND_POSITION_NOT_MET,
    MAX_APPEND_BLOB_BYTES,
    MAX_BLOCKS,
    IAppendBlobClient,
)

__all__ = ["BLOCK_SUBFIELD", "AzureObjectStore", "AzureObjectWriter", "block_id"]

#: The gzip extra subfield (SI1 SI2) that names a block: ``Lh``.
BLOCK_SUBFIELD = b"Lh"
#: Content-Type of the blobs.
CONTENT_TYPE = "application/gzip"


def block_id(writer_id: str, sequence: int) -> bytes:
    """
    The 24 bytes that name a block: the writer ID (32 hex digits, as 16 bytes) and
    the block's sequence number in the process (8 bytes, big-endian).
    """
    return bytes.fromhex(writer_id) + sequence.to_bytes(8, "big")


@implementer(IObjectStore)
class AzureObjectStore:
    """
    An :class:`~loghandler.interfaces.IObjectStore` on one Azure Blob Storage
    container.

    :param client: the container's calls (``AzureBlobClient``, or
        ``MemoryAppendBlobs`` in tests).
    :param clock: for retries and timeouts.
    :param writer_id: this process's writer ID, 32 hex digits (random by default).
    :param retry: the retry layer (one for the store).
    :param call_slots: storage calls at once across all writers (each takes a
        thread of the client's pool).
    :param max_blocks: committed blocks after which a blob rolls over (Azure's
        limit, 50,000; smaller in tests).
    :param max_blob_bytes: bytes after which a blob rolls over (Azure's limit,
        about 195 GiB).
    """

    _log = Logger()

    def __init__(
        self,
        client: IAppendBlobClient,
        clock: IReactorTime,
        *,
        writer_id: Optional[str] = None,
        retry: Optional[RetryLayer] = None,
        call_slots: int = 16,
        max_blocks: int = MAX_BLOCKS,
        max_blob_bytes: int = MAX_APPEND_BLOB_BYTES,
    ) -> None:
        self.client = client
        self.clock = clock
        self.writer_id = writer_id or uuid.uuid4().hex
        self.retry = retry or RetryLayer(clock)
        self.call_slots = DeferredSemaphore(call_slots)
        self.max_blocks = max_blocks
        self.max_blob_bytes = max_blob_bytes
        self.name = client.name
        self._sequence = itertools.count(1)
        # key -> the rollover generation its writers start at (0: the key itself)
        self._generations: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<AzureObjectStore {self.client!r} writer {self.writer_id}>"

    @property
    def problem(self) -> Optional[str]:
        """Why storage fails for good, or None (see :class:`RetryLayer`)."""
        return self.retry.problem

    @property
    def failing(self) -> Optional[tuple[float, str]]:
        """``(since, reason)`` while storage calls fail, else None (``IObjectStore``)."""
        return self.retry.failing

    def open(self, key: str) -> "AzureObjectWriter":
        """A writer for the next stream of ``key``; sends nothing yet."""
        return AzureObjectWriter(self, key, self._generations.get(key, 0))

    def next_block_id(self) -> bytes:
        """The name of a block never appended before (:func:`block_id`)."""
        return block_id(self.writer_id, next(self._sequence))

    def rolled_over(self, key: str, generation: int) -> None:
        """Writers of ``key`` opened from now on start at ``generation``."""
        if generation > self._generations.get(key, 0):
            self._generations[key] = generation

    def check(self) -> "Deferred[None]":
        """The client's check of the container, one attempt."""
        return self.client.check()

    def stopping(self, deadline: float) -> None:
        """Wake sleeping retries; nothing is tried past ``deadline`` (clock seconds)."""
        self.retry.stopping(deadline)

    def close(self) -> "Deferred[None]":
        """Close the client (its connections and thread pool)."""
        return self.client.close()


@implementer(IObjectWriter)
class AzureObjectWriter:
    """
    One stream's appends (see the module docstring).

    :ivar key: the object key.
    :ivar blobs: the blobs this writer appended to, in order (the key, then its
        rollovers).
    :ivar blocks_appended: blocks this writer appended.
    """

    _log = Logger()
    #: A checkpoint is a part: the blob keeps every byte and replaces nothing.
    checkpoints_are_parts = True
    #: Rollover is the writer's own business: it never makes the stream finish.
    full = False

    def __init__(self, store: AzureObjectStore, key: str, generation: int) -> None:
        self._store = store
        self._client = store.client
        self._retry = store.retry
        self.key = key
        self._generation = generation
        self._blob: Optional[str] = None  # the blob appended to, once its length is known
        self._length = 0  # its length as last seen: the next append's position
        self._blocks = 0  # its committed blocks as last seen
        self.blobs: list[str] = []
        self.blocks_appended = 0
        self._in_order = DeferredLock()
        self._active: set[Deferred[Any]] = set()
        self._abandoned = False

    def _track(self, d: "Deferred[Any]") -> "Deferred[Any]":
        self._active.add(d)
        d.addBoth(self._untrack, d)
        return d

    def _untrack(self, result: object, d: "Deferred[Any]") -> object:
        self._active.discard(d)
        return result

    async def _call(self, operation: str, name: str, call: Callable[[], "Deferred[Any]"]) -> Any:
        return await self._retry.call(
            operation,
            name,
            call,
            slots=self._store.call_slots,
            cancelled=lambda: self._abandoned,
        )

    # -- IObjectWriter -------------------------------------------------------------

    def part(self, body: bytes) -> "Deferred[None]":
        """
        Append ``body`` (whole gzip members, at most 100 MiB) as one block, after
        every block handed over before.
        """
        if self._abandoned:
            return fail(Abandoned(self.key))
        return self._track(ensureDeferred(self._append_in_order(body)))

    def checkpoint(self, body: bytes) -> "Deferred[bool]":
        """
        Not used (``checkpoints_are_parts``): the stream hands checkpoints to
        :meth:`part`.  Stores nothing.

        :returns: a Deferred firing with False.
        """
        return succeed(False)

    def finish(
        self, tail: bytes, on_staged: Optional[Callable[[], None]] = None
    ) -> "Deferred[Finished]":
        """
        Append ``tail`` after every block handed over before (the last append is
        the completion), then call ``on_staged``.

        :returns: a Deferred firing with ``Finished("merged", key)``, ``key`` the
            last blob appended to, or ``Finished("empty")`` when this writer
            appended nothing.
        """
        if self._abandoned:
            return fail(Abandoned(self.key))
        return self._track(ensureDeferred(self._finish(tail, on_staged)))

    async def _finish(self, tail: bytes, on_staged: Optional[Callable[[], None]]) -> Finished:
        if tail:
            await self._append_in_order(tail)
        else:
            await self._in_order.acquire()  # after every block handed over before
            self._in_order.release()
        if on_staged is not None:
            on_staged()
        if not self.blobs:
            return Finished("empty")
        return Finished("merged", key=self.blobs[-1])

    def abandon(self) -> None:
        """Cancel every call in flight (a block sent may still land)."""
        self._abandoned = True
        for d in list(self._active):
            d.cancel()

    # -- appends ---------------------------------------------------------------------

    async def _append_in_order(self, body: bytes) -> None:
        await self._in_order.acquire()
        try:
            if self._abandoned:
                raise Abandoned(self.key)
            await self._append(body)
        finally:
            self._in_order.release()

    async def _append(self, body: bytes) -> None:
        block = with_extra_field(body, BLOCK_SUBFIELD, self._store.next_block_id())
        header = block[: len(block) - len(body) + 10]  # the header up to its extra field
        max_size = self._store.max_blob_bytes
        while True:
            if self._blob is None:
                await self._open_blob()
            name, position = self._blob, self._length
            assert name is not None
            if (
                self._blocks >= self._store.max_blocks
                or position + len(block) > max_size
            ):
                self._roll_over(name, "full")
                continue
            try:
                appended = await self._call(
                    "AppendBlock",
                    name,
                    lambda: self._client.append(name, block, position, max_size),
                )
            except StorageFault as e:
                if e.fault not in (Fault.CONFLICT, Fault.GONE):
                    raise
                # Refused: maybe because an earlier attempt of this block landed at
                # this position (its answer lost), whatever the code says.
                if await self._landed(name, position, header):
                    self._appended(name, position + len(block), None)
                    return
                self._refused(name, e)
                continue
            self._appended(name, appended.offset + len(block), appended.blocks)
            return

    def _appended(self, name: str, length: int, blocks: Optional[int]) -> None:
        self._length = length
        self._blocks = self._blocks + 1 if blocks is None else blocks
        self.blocks_appended += 1
        self._retry.metrics.blocks_appended.inc()
        if not self.blobs or self.blobs[-1] != name:
            self.blobs.append(name)

    async def _landed(self, name: str, position: int, header: bytes) -> bool:
        """Whether the block whose header is ``header`` is at ``position`` of ``name``."""
        try:
            found = await self._call(
                "GetBlob", name, lambda: self._client.read(name, position, len(header))
            )
        except StorageFault as e:
            if e.fault is Fault.GONE:
                return False
            raise
        if found == header:
            self._log.info(
                "{key}: block at {position} of {blob} was ours: an earlier attempt"
                " landed and its answer was lost",
                event="block_landed_already",
                key=self.key,
                position=position,
                blob=name,
            )
            return True
        return False

    def _refused(self, name: str, error: StorageFault) -> None:
        """An append of a block that is not in the blob was refused: act on the code."""
        code = getattr(error.error, "code", "")
        if code == APPEND_POSITION_NOT_MET:
            self._blob = None  # another writer appended: read the new length
        elif error.fault is Fault.GONE:
            self._log.error(
                "{key}: blob {blob} was deleted by someone else ({code}); what it held"
                " is gone; creating it again",
                event="blob_deleted",
                key=self.key,
                blob=name,
                code=code,
            )
            self._blob = None
        else:  # BlockCountExceedsLimit, MaxBlobSizeConditionNotMet, InvalidBlobType...
            self._roll_over(name, f"{getattr(error.error, 'status', '')} {code}".strip())

    def _roll_over(self, name: str, reason: str, log: bool = True) -> None:
        self._generation += 1
        self._store.rolled_over(self.key, self._generation)
        self._blob = None
        if log:
            self._log.info(
                "{key}: {blob} takes no more blocks ({reason}); going on in {next_blob}",
                event="blob_rollover",
                key=self.key,
                blob=name,
                reason=reason,
                next_blob=rollover_key(self.key, self._generation),
            )

    async def _open_blob(self) -> None:
        """
        Find the blob to append to: the current generation's, created when missing,
        skipped when full, not an append blob, or not gzip (another program's);
        learn its length.  One log line for the blobs skipped.
        """
        skipped: list[str] = []
        while True:
            name = rollover_key(self.key, self._generation)
            state = await self._call(
                "GetBlobProperties", name, lambda: self._client.properties(name)
            )
            reason = ""
            if state is None:
                created = await self._call(
                    "CreateAppendBlob", name, lambda: self._client.create(name, CONTENT_TYPE)
                )
                if not created:
                    continue  # another writer (or a lost answer) created it: read it
                self._blob, self._length, self._blocks = name, 0, 0
            elif state.blob_type != "AppendBlob":
                reason = f"a {state.blob_type}, not an append blob"
            elif state.blocks >= self._store.max_blocks or state.size >= self._store.max_blob_bytes:
                reason = "full"
            elif state.size and name not in self.blobs and not await self._is_gzip(name):
                reason = "not gzip: another program's"
            else:
                self._blob, self._length, self._blocks = name, state.size, state.blocks
            if reason:
                skipped.append(f"{name} ({reason})")
                self._roll_over(name, reason, log=False)
                continue
            if skipped:
                self._log.info(
                    "{key}: skipped {count} blobs that take no more blocks: {skipped};"
                    " appending to {blob}",
                    event="blobs_skipped",
                    key=self.key,
                    count=len(skipped),
                    skipped=", ".join(
                        skipped if len(skipped) <= 4 else skipped[:2] + ["..."] + skipped[-2:]
                    ),
                    blob=name,
                )
            return

    async def _is_gzip(self, name: str) -> bool:
        """
        Whether blob ``name`` starts with a gzip member header (RFC 1952 2.3.1):
        asked once per writer and blob, before its first append there.
        """
        try:
            start = await self._call("GetBlob", name, lambda: self._client.read(name, 0, 3))
        except StorageFault as e:
            if e.fault is Fault.GONE:
                return True  # deleted meanwhile: the next look creates it again
            raise
        return bool(start == b"\x1f\x8b\x08" or not start)
