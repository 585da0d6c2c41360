"""
One merger per key (the scaling of DESIGN.md section 5 to many writers of a key):
a writer that staged its data queues them for the key and merges the key's whole
queue only when it takes the key's merge lock; a writer that finds the lock taken
leaves its staging object to the holder.

Why: each merge copies the key's whole object (UploadPartCopy) and lands only if
the key did not change meanwhile, so W writers that each merge their own staging
object at rotation or stop make W merges per window, and when they overlap each
conflict (412/409) aborts a merge that copied the whole key and starts it again:
up to W(W+1)/2 merges and copies of the key per window
(``bench/merge_scaling.py``).  With the lock, one merge per window (per
:data:`~loghandler.storage.s3.merge.MAX_BATCH` staging objects) copies the key
once, then each staging object once; the others pay a few requests each.

Hand-off (:meth:`KeyMerges.hand_off`), after the staging object S of key K is
complete:

1. Take K's merge lock ``_loghandler/merging/{K}``: PutObject ``If-None-Match: *``
   with a body unique to the attempt (a 412 to a retried attempt is read back: our
   own body means the first attempt landed, its answer lost).  Taken: go to 3.
2. Taken by someone else: PutObject the empty marker
   ``_loghandler/queue/{K}/{writer_id}/{n}`` (S's staging key, listed by K's
   prefix; :func:`~.layout.queue_key`), then try the lock once more.  Taken by
   someone else again: S stays queued, done.  (No wake-up is lost: the holder
   that made our second try fail releases after it, hence after our marker
   landed, and lists the queue after its release.)
3. Holding the lock: list K's markers, HEAD each staging object (a marker whose
   object is gone was merged: the marker is deleted), merge them and S in one
   batch (:meth:`~.merge.Merger.merge_batch`: the key's bytes once, then each
   object's), delete the objects, then their markers.
4. Release the lock (DeleteObject), then list K's markers again; if any, take the
   lock again and go back to 3 (at most :data:`ROUNDS` times).

Nothing here decides what is stored: the merge's conditions and write IDs do, as
for any writer (a holder that lost its lock, another merger, recovery merging a
gone writer's data at the same time are all safe).  The lock only keeps merges
from overlapping.  What a lock holder that dies or is cut at its deadline leaves
(its lock, queued objects) is taken on by recovery
(:mod:`~loghandler.storage.s3.recovery`): locks of gone writers are deleted, and
keys with markers older than 3 x ``LEASE_S`` and no lock are drained
(:meth:`KeyMerges.drain`).

S3 API pages: PutObject (``If-None-Match``), HeadObject, GetObject, DeleteObject,
ListObjectsV2.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from loghandler.interfaces import Finished
from loghandler.retry import Fault, RetryLayer, StorageFault
from loghandler.storage.s3.api import IS3Client, ListedObject
from loghandler.storage.s3.layout import (
    merge_lock_key,
    parse_queue_key,
    parse_staging_key,
    queue_key,
    queue_prefix,
    staging_key,
)
from loghandler.storage.s3.merge import Merged, Merger, Staged, StagedDataGone

#: Times a merger takes the lock again for markers that came while it held it.
ROUNDS = 3

_log = Logger()


def lock_holder(body: bytes) -> Optional[str]:
    """The writer ID in a merge lock's body, or None when it has none."""
    try:
        fields = json.loads(body)
    except ValueError:
        return None
    holder = fields.get("writer_id") if isinstance(fields, dict) else None
    return holder if isinstance(holder, str) and holder else None


class KeyMerges:
    """
    The queues and merge locks of keys (see the module docstring).

    :param client: the bucket's calls.
    :param retry: the retry layer every call goes through.
    :param merger: merges staging objects into keys.
    :param writer_id: written into the locks this process takes.
    """

    def __init__(self, client: IS3Client, retry: RetryLayer, merger: Merger, writer_id: str) -> None:
        self._client = client
        self._retry = retry
        self._merger = merger
        self.writer_id = writer_id
        #: The keys whose merge lock this process holds (or is releasing).
        self.holding: set[str] = set()

    async def _call(
        self, operation: str, key: str, call: Callable[[], "Deferred[Any]"], cancelled: Callable[[], bool]
    ) -> Any:
        return await self._retry.call(operation, key, call, cancelled=cancelled)

    async def hand_off(
        self, staged: Staged, key: str, cancelled: Callable[[], bool] = lambda: False
    ) -> Finished:
        """
        Merge ``staged`` (a complete staging object of ``key``) with the key's queue
        if this writer takes the key's lock, else queue it for the holder (steps
        1-4 of the module docstring).

        :returns: ``Finished("merged", target)`` when this call merged it (or found
            it merged), else ``Finished("queued", staged_key=...)``: the lock
            holder, or recovery, merges it.
        :raises StagedDataGone: it was deleted and the key does not list it.
        :raises Abandoned: the deadline passed; what is not merged stays staged.
        :raises StorageFault: a request S3 refuses as malformed.
        """
        parsed = parse_staging_key(staged.key)
        if parsed is None:  # not a staging key: cannot be queued; merged alone
            target = await self._merger.merge(staged, key, cancelled)
            return Finished("merged", key=target)
        held = await self._acquire(key, cancelled)
        if not held:
            marker = queue_key(parsed)
            await self._call(
                "PutObject",
                marker,
                lambda: self._client.put(marker, b"", writes=(staged.write_id,)),
                cancelled,
            )
            # Once more: the holder may have released it before our marker landed
            # (and listed the queue without it).  Taken now, it holds our marker:
            # its holder lists the queue again after releasing it.
            held = await self._acquire(key, cancelled)
        if held:
            merged = await self._drain_held(key, cancelled, staged)
            if any(s.key == staged.key for s in merged.vanished):
                raise StagedDataGone(staged.key)
            if any(s.key == staged.key for s in merged.merged):
                return Finished("merged", key=merged.target)
        _log.info(
            "{key}: {staged} queued for the key's merger",
            event="merge_queued",
            key=key,
            staged=staged.key,
        )
        return Finished("queued", staged_key=staged.key)

    async def drain(
        self, key: str, cancelled: Callable[[], bool] = lambda: False
    ) -> Optional[Merged]:
        """
        Take ``key``'s merge lock and merge its queue (steps 3-4 of the module
        docstring).

        :returns: what was merged, or None when another writer holds the lock.
        :raises Abandoned: the deadline passed (the lock stays until recovery
            deletes it, once this writer is gone).
        """
        if not await self._acquire(key, cancelled):
            return None
        return await self._drain_held(key, cancelled)

    async def _drain_held(
        self, key: str, cancelled: Callable[[], bool], own: Optional[Staged] = None
    ) -> Merged:
        """
        Holding ``key``'s lock: merge its queue (and ``own``), release the lock, and
        again while markers are listed after the release (at most :data:`ROUNDS`
        times, and while the lock can be taken).
        """
        total = Merged(key)
        for round_ in range(ROUNDS):
            try:
                merged = await self._merge_queue(key, cancelled, own if round_ == 0 else None)
            except Exception:  # the deadline included; not GeneratorExit (a dropped coroutine)
                await self._release(key)
                raise
            await self._release(key)
            total.target = merged.target
            total.merged.extend(merged.merged)
            total.vanished.extend(merged.vanished)
            prefix = queue_prefix(key)
            markers: list[ListedObject] = await self._call(
                "ListObjectsV2", prefix, lambda: self._client.list_objects(prefix), cancelled
            )
            if not markers or round_ == ROUNDS - 1 or not await self._acquire(key, cancelled):
                break
        return total

    async def _merge_queue(
        self, key: str, cancelled: Callable[[], bool], own: Optional[Staged]
    ) -> Merged:
        """Merge every staging object queued for ``key`` (and ``own``); delete their markers."""
        prefix = queue_prefix(key)
        markers: list[ListedObject] = await self._call(
            "ListObjectsV2", prefix, lambda: self._client.list_objects(prefix), cancelled
        )
        queued: dict[str, tuple[tuple[str, int], Staged, Optional[str]]] = {}
        if own is not None:
            parsed = parse_staging_key(own.key)
            assert parsed is not None
            queued[own.key] = ((parsed.writer_id, parsed.sequence), own, None)
        for listed in markers:
            parsed = parse_queue_key(listed.key)
            if parsed is None or parsed.key != key:
                continue  # another key's marker under this one's prefix: not ours
            staging = staging_key(parsed.writer_id, key, parsed.sequence)
            order = (parsed.writer_id, parsed.sequence)
            if staging in queued:
                queued[staging] = (order, queued[staging][1], listed.key)
                continue
            info = await self._call(
                "HeadObject", staging, lambda: self._client.head(staging), cancelled
            )
            if info is None:  # merged (and deleted) already, by us or another
                await self._delete(listed.key, cancelled)
                continue
            if not info.writes:
                _log.error(
                    "{staging} has no write ID in its metadata; left as it is",
                    event="staging_without_write_id",
                    staging=staging,
                )
                continue
            staged = Staged(staging, info.size, info.etag, info.writes[-1])
            queued[staging] = (order, staged, listed.key)
        batch = sorted(queued.values(), key=lambda q: q[0])  # each writer's streams in order
        merged = await self._merger.merge_batch([s for _, s, _ in batch], key, cancelled)
        for s in merged.merged + merged.vanished:
            marker = queued[s.key][2]
            if marker is not None:
                await self._delete(marker, cancelled)
        for s in merged.vanished:
            _log.warn(
                "{staging} (write {write_id}) vanished before {key} listed it",
                event="staging_vanished",
                staging=s.key,
                write_id=s.write_id,
                key=key,
            )
        return merged

    async def _delete(self, key: str, cancelled: Callable[[], bool]) -> None:
        await self._call("DeleteObject", key, lambda: self._client.delete(key), cancelled)

    async def _acquire(self, key: str, cancelled: Callable[[], bool]) -> bool:
        """
        Take ``key``'s merge lock.  A 412 (or 409) to the first attempt means it is
        taken; to a later one (an earlier attempt's answer was lost) the lock is
        read back: our own body means taken by us, another's not, none (released
        meanwhile) try again, a few times.
        """
        lock = merge_lock_key(key)
        for _ in range(3):
            body = json.dumps(
                {"writer_id": self.writer_id, "nonce": uuid.uuid4().hex}, sort_keys=True
            ).encode()
            attempts = 0

            def put() -> "Deferred[str]":
                nonlocal attempts
                attempts += 1
                return self._client.put(lock, body, if_none_match=True)

            try:
                await self._call("PutObject", lock, put, cancelled)
                self.holding.add(key)
                return True
            except StorageFault as e:
                if e.fault is not Fault.CONFLICT:
                    raise
            if attempts == 1:
                return False
            current = await self._read(lock, cancelled)
            if current is not None:
                if current == body:
                    self.holding.add(key)
                return current == body
        return False

    async def _read(self, lock: str, cancelled: Callable[[], bool]) -> Optional[bytes]:
        """A lock's body, or None when it is missing (or replaced while read)."""
        info = await self._call("HeadObject", lock, lambda: self._client.head(lock), cancelled)
        if info is None:
            return None
        try:
            body: bytes = await self._call(
                "GetObject", lock, lambda: self._client.get(lock, info.etag), cancelled
            )
        except StorageFault as e:
            if e.fault in (Fault.CONFLICT, Fault.GONE):
                return None
            raise
        return body

    async def holder(
        self, lock: str, cancelled: Callable[[], bool] = lambda: False
    ) -> Optional[str]:
        """The writer ID holding the merge lock ``lock``, "" for a body without one,
        None when there is no lock."""
        body = await self._read(lock, cancelled)
        if body is None:
            return None
        return lock_holder(body) or ""

    async def _release(self, key: str) -> None:
        """
        Delete ``key``'s lock (through the deadline: the holder is then gone soon,
        and recovery deletes it).  Unconditional: should the lock be another's by
        now (ours was deleted as a gone writer's), two merges may overlap, which
        the merge's conditions make safe.
        """
        lock = merge_lock_key(key)
        try:
            await self._retry.call("DeleteObject", lock, lambda: self._client.delete(lock))
        except Exception as e:
            _log.warn(
                "{lock}: merge lock not released ({error})",
                event="merge_lock_not_released",
                lock=lock,
                error=str(e),
            )
        finally:
            self.holding.discard(key)
