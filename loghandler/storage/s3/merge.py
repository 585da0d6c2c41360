"""
Merge staging objects into their key (DESIGN.md section 5, step 3): the key's bytes,
then each staging object's, written as one new version of the key under a condition
on the version it replaces, so that nothing another writer merged meanwhile is
overwritten and nothing is merged twice.  :meth:`Merger.merge` takes one staging
object; :meth:`Merger.merge_batch` several (up to :data:`MAX_BATCH` in one merge, so
that the key is copied once for all of them: the key's merger,
:mod:`~loghandler.storage.s3.keymerge`).  Below, S stands for all of them.

1. HEAD the key K (and its rollovers ``{K}.1``, ``{K}.2``..., while one is over
   :data:`ROLLOVER_BYTES`).  When one lists the staging object's write ID, the merge
   landed (an earlier attempt whose answer was lost): done.
2. Both K and the staging object S under the part size: GET both, decompress, and
   PutObject one re-compressed gzip member (small objects stay one member) with
   ``If-Match`` K's ETag (``If-None-Match: *`` when K is missing), metadata: K's write
   IDs plus S's, newest last, at most 16.
3. Else: CreateMultipartUpload on K with that metadata (after the HEAD, since S3 sets
   metadata at creation), then parts: pieces of at least the part size by
   UploadPartCopy (``x-amz-copy-source-if-match``, ranges of at most 5 GiB), shorter
   pieces by ranged GETs joined and uploaded by UploadPart, so that every part but
   the last reaches the part size; CompleteMultipartUpload with the same condition.
4. 412 or 409 (another writer got there first) or NoSuchUpload (a Complete that did
   land, or an upload S3 discarded): abort the merge upload and start again at 1,
   after a jittered wait.  The merge needs only S, never memory, so it can be
   redone any number of times, by this process or by recovery.

The merge holds at most one part (``part_size`` bytes) plus the small objects of
step 2 in memory, counted in the memory budget.

S3 API pages: HeadObject, GetObject, PutObject, CreateMultipartUpload, UploadPart,
UploadPartCopy, CompleteMultipartUpload, AbortMultipartUpload; "Conditional requests"
(https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-requests.html).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Optional, Sequence

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.config import S3_MAX_PART_SIZE, GiB
from loghandler.keys import rollover_key
from loghandler.retry import Fault, RetryLayer, StorageFault
from loghandler.storage.s3.api import (
    MAX_WRITES,
    CompletedPart,
    IS3Client,
    ObjectInfo,
    newest_writes,
)
from loghandler.threads import DeferToThread

#: A key over this many bytes takes no more merges: they go to ``{key}.1``, ... (a
#: copied part holds at most 5 GiB; the margin covers other writers' merges).
ROLLOVER_BYTES = 4 * GiB

#: Staging objects one merge takes at most: a third of the write IDs a key lists,
#: so that those of the merge before are still listed after it (a merger that
#: died before deleting them leaves them to the next, who must see them listed).
MAX_BATCH = MAX_WRITES // 3

#: Waits before a merge is redone after a conflict, in seconds.
CONFLICT_BACKOFF = Backoff(base=0.05, cap=5.0)

_GZIP_WBITS = 16 + zlib.MAX_WBITS

_log = Logger()


class StagedDataGone(Exception):
    """
    The staging object to merge is missing and the key does not list its write ID:
    someone deleted it.  Nothing is left to merge.
    """


@attrs.frozen
class Staged:
    """
    A staging object to merge.

    :ivar key: its key, under ``_loghandler/staging/``.
    :ivar size: its length in bytes.
    :ivar etag: its ETag.
    :ivar write_id: its write ID (the last entry of its metadata).
    """

    key: str
    size: int
    etag: str
    write_id: str


def single_member(bodies: Sequence[bytes]) -> bytes:
    """
    The gzip data of ``bodies`` (each whole gzip members, RFC 1952) decompressed and
    compressed again as one member, level 6.  One body that is already one member is
    returned as it is.
    """
    out = zlib.compressobj(6, zlib.DEFLATED, _GZIP_WBITS)
    chunks = []
    members = 0
    for body in bodies:
        data = body
        while data:
            d = zlib.decompressobj(_GZIP_WBITS)
            chunks.append(out.compress(d.decompress(data)))
            members += 1
            data = d.unused_data
    if len(bodies) == 1 and members == 1:
        return bodies[0]
    chunks.append(out.flush(zlib.Z_FINISH))
    return b"".join(chunks)


@attrs.define
class Merged:
    """
    What :meth:`Merger.merge_batch` did.

    :ivar target: the key merged into last (the key or a rollover).
    :ivar merged: the staging objects that are in the key (or a rollover) now, and
        deleted.
    :ivar vanished: those that were gone, and not listed: someone deleted them.
    """

    target: str
    merged: list[Staged] = attrs.field(factory=list)
    vanished: list[Staged] = attrs.field(factory=list)


@attrs.define
class Merger:
    """
    Merges staging objects into keys.

    :ivar client: the S3 calls.
    :ivar retry: the retry layer.
    :ivar part_size: the smallest part, bytes (S3: 5 MiB); also the size under which
        objects are merged by re-compression.
    :ivar budget: counts the bytes a merge holds.
    :ivar defer_to_thread: runs CPU work (re-compression) off the reactor thread.
    :ivar conflict_backoff: waits before a merge is redone.
    """

    client: IS3Client
    retry: RetryLayer
    part_size: int
    budget: MemoryBudget
    defer_to_thread: DeferToThread
    conflict_backoff: Backoff = CONFLICT_BACKOFF
    #: Bytes merges hold in memory now (also counted in ``budget``).
    holding: int = 0

    def _hold(self, size: int) -> None:
        self.holding += size
        self.budget.change(size)

    async def merge(
        self, staged: Staged, key: str, cancelled: Callable[[], bool] = lambda: False
    ) -> str:
        """
        Merge ``staged`` into ``key`` (or its rollover), then delete it.

        :returns: the key merged into.
        :raises StagedDataGone: see there.
        :raises StorageFault: INVALID (a request S3 refuses as malformed).
        :raises Abandoned: the deadline passed; ``staged`` stays for recovery.
        """
        result = await self.merge_batch([staged], key, cancelled)
        if result.vanished:
            raise StagedDataGone(staged.key)
        return result.target

    async def merge_batch(
        self,
        batch: Sequence[Staged],
        key: str,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> "Merged":
        """
        Merge the staging objects ``batch`` (of one key, in this order) into ``key``
        (or its rollover), :data:`MAX_BATCH` at a time, each taking one HEAD, one
        merge of the key's bytes and theirs, and a DeleteObject of each; then the
        next ones.  Those the key (or a rollover) lists already are deleted first,
        before any merge could push their write IDs out of the key's list.

        :returns: what became of them.
        :raises StorageFault: INVALID (a request S3 refuses as malformed).
        :raises Abandoned: the deadline passed; what is not merged stays staged.
        """
        pending = list(batch)
        result = Merged(key)
        conflicts = 0
        while pending:
            target, info, listed = await self._target(key, cancelled)
            result.target = target
            landed = [s for s in pending if s.write_id in listed]
            for s in landed:
                _log.info(
                    "{key}: the merge of {staged} had landed already",
                    event="merge_landed_already",
                    key=target,
                    staged=s.key,
                )
                await self._delete(s, result, cancelled)
            pending = [s for s in pending if s.write_id not in listed]
            if not pending:
                break
            chunk = pending[:MAX_BATCH]
            try:
                await self._merge_once(chunk, target, info, cancelled)
            except StorageFault as e:
                if e.fault is Fault.INVALID:
                    raise
                if e.fault is Fault.GONE and e.operation in ("GetObject", "UploadPartCopy"):
                    for s in await self._vanished(chunk, target, cancelled):
                        pending.remove(s)
                        result.vanished.append(s)
                _log.info(
                    "{key}: merging {staged} again: {operation} answered {fault}",
                    event="merge_retried",
                    key=target,
                    staged=", ".join(s.key for s in chunk),
                    operation=e.operation,
                    fault=e.fault.value,
                )
                await self.retry.wait(self.conflict_backoff.delay(conflicts))
                conflicts += 1
                continue
            for s in chunk:
                await self._delete(s, result, cancelled)
            pending = pending[len(chunk) :]
        return result

    async def _delete(self, staged: Staged, result: "Merged", cancelled: Callable[[], bool]) -> None:
        """Delete a staging object the key lists; count it merged."""
        await self._call(
            "DeleteObject", staged.key, lambda: self.client.delete(staged.key), cancelled
        )
        result.merged.append(staged)
        self.retry.metrics.merged_staging_objects.inc()

    async def _vanished(
        self, batch: Sequence[Staged], target: str, cancelled: Callable[[], bool]
    ) -> list[Staged]:
        """
        After a NoSuchKey: the staging objects of ``batch`` that are gone (not just
        K changed) and that ``target`` does not list: someone deleted them.
        """
        missing = []
        for s in batch:
            info = await self._call("HeadObject", s.key, lambda: self.client.head(s.key), cancelled)
            if info is None:
                missing.append(s)
        if not missing:
            return []
        latest = await self._call("HeadObject", target, lambda: self.client.head(target), cancelled)
        return [s for s in missing if latest is None or s.write_id not in latest.writes]

    async def _call(
        self, operation: str, key: str, call: Callable[[], "Deferred[Any]"], cancelled: Callable[[], bool]
    ) -> Any:
        return await self.retry.call(operation, key, call, cancelled=cancelled)

    async def _target(
        self, key: str, cancelled: Callable[[], bool]
    ) -> tuple[str, Optional[ObjectInfo], frozenset[str]]:
        """
        The key that takes the merge: ``key`` or the first rollover not over
        :data:`ROLLOVER_BYTES` (or missing), its HEAD, and the write IDs listed by
        it and the full generations before it.
        """
        generation = 0
        listed: set[str] = set()
        while True:
            target = rollover_key(key, generation)
            info = await self._call("HeadObject", target, lambda: self.client.head(target), cancelled)
            if info is not None:
                listed.update(info.writes)
            if info is None or info.size <= ROLLOVER_BYTES:
                return target, info, frozenset(listed)
            generation += 1

    async def _merge_once(
        self,
        batch: Sequence[Staged],
        target: str,
        info: Optional[ObjectInfo],
        cancelled: Callable[[], bool],
    ) -> None:
        """One attempt of steps 2-3; a StorageFault means: start again at the HEAD."""
        writes = newest_writes((info.writes if info else ()) + tuple(s.write_id for s in batch))
        condition: dict[str, Any] = (
            {"if_none_match": True} if info is None else {"if_match": info.etag}
        )
        staged_bytes = sum(s.size for s in batch)
        if staged_bytes < self.part_size and (info is None or info.size < self.part_size):
            await self._merge_small(batch, target, info, writes, condition, cancelled)
            return
        attempts = 0

        def create() -> "Deferred[str]":
            nonlocal attempts
            attempts += 1
            return self.client.create_upload(target, writes)

        upload_id = await self._call("CreateMultipartUpload", target, create, cancelled)
        if attempts > 1:
            await self._abort_others(target, upload_id, cancelled)
        sources: list[tuple[str, str, int]] = []
        if info is not None and info.size:
            sources.append((target, info.etag, info.size))
        sources.extend((s.key, s.etag, s.size) for s in batch)
        try:
            parts = await self._upload_pieces(sources, target, upload_id, cancelled)
            await self._call(
                "CompleteMultipartUpload",
                target,
                lambda: self.client.complete_upload(target, upload_id, parts, **condition),
                cancelled,
            )
        except Exception:  # CancelledError included; not GeneratorExit (a dropped coroutine)
            await self._abort(target, upload_id)
            raise
        self.retry.metrics.merges.labels(method="copy").inc()
        _log.info(
            "{key}: merged {staged} ({size} bytes) by {method}",
            event="merged",
            method="multipart upload",
            key=target,
            staged=", ".join(s.key for s in batch),
            size=staged_bytes,
        )

    async def _abort_others(
        self, key: str, upload_id: str, cancelled: Callable[[], bool]
    ) -> None:
        """
        After a CreateMultipartUpload that had to be retried (an earlier attempt may
        have created an upload whose ID never reached us), abort every other upload
        on ``key``.  Merge uploads on a key are never precious: one of another
        writer's merges that is aborted gets NoSuchUpload and redoes its merge.
        """
        pending = await self._call(
            "ListMultipartUploads", key, lambda: self.client.list_uploads(key), cancelled
        )
        for other in pending:
            if other.key == key and other.upload_id != upload_id:
                _log.info(
                    "{key}: aborting upload {upload_id}, perhaps left by a retried create",
                    event="merge_upload_aborted",
                    key=key,
                    upload_id=other.upload_id,
                )
                await self._abort(key, other.upload_id)

    async def _abort(self, key: str, upload_id: str) -> None:
        """Abort a merge upload that will not complete; gone already is fine."""
        try:
            await self.retry.call(
                "AbortMultipartUpload", key, lambda: self.client.abort_upload(key, upload_id)
            )
        except StorageFault as e:
            if e.fault is not Fault.GONE:
                _log.warn(
                    "{key}: could not abort merge upload {upload_id}: {error}",
                    event="merge_upload_not_aborted",
                    key=key,
                    upload_id=upload_id,
                    error=str(e),
                )
        except Exception as e:  # the deadline: listed for recovery by its key
            _log.warn(
                "{key}: merge upload {upload_id} not aborted ({error})",
                event="merge_upload_not_aborted",
                key=key,
                upload_id=upload_id,
                error=str(e),
            )

    async def _merge_small(
        self,
        batch: Sequence[Staged],
        target: str,
        info: Optional[ObjectInfo],
        writes: tuple[str, ...],
        condition: dict[str, Any],
        cancelled: Callable[[], bool],
    ) -> None:
        held = sum(s.size for s in batch) + (info.size if info else 0)
        self._hold(held)
        try:
            bodies = []
            if info is not None:
                etag = info.etag
                bodies.append(
                    await self._call(
                        "GetObject", target, lambda: self.client.get(target, etag), cancelled
                    )
                )
            for s in batch:
                bodies.append(
                    await self._call(
                        "GetObject", s.key, lambda: self.client.get(s.key, s.etag), cancelled
                    )
                )
            body = await self.defer_to_thread(single_member, bodies)
            del bodies
            await self._call(
                "PutObject",
                target,
                lambda: self.client.put(target, body, writes=writes, **condition),
                cancelled,
            )
        finally:
            self._hold(-held)
        self.retry.metrics.merges.labels(method="put").inc()
        _log.info(
            "{key}: merged {staged} ({size} bytes) by {method}",
            event="merged",
            method="PutObject",
            key=target,
            staged=", ".join(s.key for s in batch),
            size=held - (info.size if info else 0),
        )

    async def _upload_pieces(
        self,
        sources: Sequence[tuple[str, str, int]],
        target: str,
        upload_id: str,
        cancelled: Callable[[], bool],
    ) -> list[CompletedPart]:
        """
        Upload the bytes of ``sources`` (key, ETag, size: K's, then each staging
        object's) as parts of the merge upload; every part but the last at least
        ``part_size``.
        """
        parts: list[CompletedPart] = []
        pending: list[tuple[str, str, int, int]] = []  # (key, etag, start, end) to GET
        pending_bytes = 0

        async def flush() -> None:
            nonlocal pending, pending_bytes
            number = len(parts) + 1
            self._hold(pending_bytes)
            try:
                chunks = []
                for key, etag, start, end in pending:
                    chunks.append(
                        await self._call(
                            "GetObject",
                            key,
                            lambda: self.client.get(key, etag, (start, end)),
                            cancelled,
                        )
                    )
                body = b"".join(chunks)
                del chunks
                etag_ = await self._call(
                    "UploadPart",
                    target,
                    lambda: self.client.upload_part(target, upload_id, number, body),
                    cancelled,
                )
            finally:
                self._hold(-pending_bytes)
            parts.append(CompletedPart(number, etag_))
            pending, pending_bytes = [], 0

        for index, (key, etag, size) in enumerate(sources):
            last_source = index == len(sources) - 1
            position = 0
            if pending_bytes:
                take = min(size, self.part_size - pending_bytes)
                pending.append((key, etag, 0, take))
                pending_bytes += take
                position = take
                if pending_bytes >= self.part_size:
                    await flush()
            while position < size:
                left = size - position
                if left >= self.part_size or (last_source and not pending_bytes):
                    chunk = min(left, S3_MAX_PART_SIZE)
                    if 0 < left - chunk < self.part_size:
                        chunk = left - self.part_size
                    number = len(parts) + 1
                    start, end = position, position + chunk
                    whole = start == 0 and end == size
                    copied = await self._call(
                        "UploadPartCopy",
                        target,
                        lambda: self.client.upload_part_copy(
                            target, upload_id, number, key, etag, None if whole else (start, end)
                        ),
                        cancelled,
                    )
                    parts.append(CompletedPart(number, copied))
                    position = end
                else:
                    pending.append((key, etag, position, size))
                    pending_bytes += left
                    position = size
        if pending:
            await flush()
        return parts

