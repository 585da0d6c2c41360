"""
The S3 side of the writer seam (DESIGN.md sections 5 and 7): :class:`S3ObjectStore`
opens an :class:`S3ObjectWriter` per stream, which

1. stages: writes the stream's parts into a multipart upload on its own staging key,
   ``_loghandler/staging/{writer_id}/{key}/{n}`` (nobody else writes there, so no
   conditions are needed), one upload at a time, in order.  Each part is a
   *segment*; checkpoints upload the segment being filled as it stands, in place of
   its previous upload, so that a hard crash loses at most what came since the last
   checkpoint (DESIGN.md section 6; part numbers as in
   :mod:`~loghandler.storage.s3.layout`).  The upload is created by the first part
   or checkpoint; every staging call waits until the process holds its lease;
2. completes the staging upload at finish (or, when the whole stream is one small
   tail, PutObjects it), giving the staging object S;
3. hands S to the key's merger (:mod:`loghandler.storage.s3.keymerge`): queues it,
   and merges the key's whole queue (:mod:`loghandler.storage.s3.merge`) when it
   takes the key's merge lock, else leaves it to the lock's holder; at most
   ``completions_in_flight`` hand-offs at once.

Every call goes through the one retry layer (:mod:`loghandler.retry`); no failure of
any kind skips a part.  A staging upload aborted from outside (NoSuchUpload on a
part) is replaced by a new one, and the parts that were in it are reported lost.  A
CreateMultipartUpload that had to be retried may have created more than one upload:
the extra ones are aborted.  What cannot be merged before the shutdown deadline
stays staged, for recovery.

An upload attempt of a checkpoint that ends without an answer may land later, with
data older than what follows: its part number is not used again for the segment.

S3 API pages: CreateMultipartUpload, UploadPart, CompleteMultipartUpload, PutObject,
ListMultipartUploads, AbortMultipartUpload, HeadObject, GetBucketVersioning.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Optional

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    DeferredSemaphore,
    ensureDeferred,
    succeed,
)
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from loghandler.budget import MemoryBudget
from loghandler.config import S3_MIN_PART_SIZE
from loghandler.interfaces import (
    Abandoned,
    Finished,
    IObjectStore,
    IObjectWriter,
    StorageError,
)
from loghandler.retry import Fault, RetryLayer, StorageFault
from loghandler.storage.s3.api import CompletedPart, IS3Client
from loghandler.storage.s3.bucket_checks import check_bucket
from loghandler.storage.s3.keymerge import KeyMerges
from loghandler.storage.s3.layout import (
    MAX_PART_NUMBER,
    MAX_SEGMENTS,
    STAGING_PREFIX,
    segment_numbers,
    staging_key,
)
from loghandler.storage.s3.lease import Lease
from loghandler.storage.s3.merge import ROLLOVER_BYTES, Merger, Staged
from loghandler.threads import DeferToThread, synchronously

__all__ = ["MAX_PART_NUMBER", "STAGING_PREFIX", "S3ObjectStore", "S3ObjectWriter"]


#: Staging calls at once while streams finish (tails, and the completions of their
#: staging uploads): at stop every stream finishes at once, and thousands of keys'
#: requests sent together overwhelm the store (measured against moto: 3,000 keys
#: at once got 490 answers never received, and those tails missed the deadline).
#: 64 calls of 30-50 ms each on S3 send about 1,500 tails a second.
FINISH_CALLS_AT_ONCE = 64


def new_write_id() -> str:
    """
    A staging object's write ID: 16 random hex digits (64 bits), so that a key's
    metadata holds :data:`~loghandler.storage.s3.api.MAX_WRITES` of them (three
    merges of :data:`~loghandler.storage.s3.merge.MAX_BATCH`) within S3's 2 KB.
    """
    return uuid.uuid4().hex[:16]


def _always_held() -> "Deferred[None]":
    return succeed(None)


@implementer(IObjectStore)
class S3ObjectStore:
    """
    An :class:`~loghandler.interfaces.IObjectStore` on one S3 bucket.

    :param client: the bucket's calls (``S3Client``, or ``MemoryStore`` in tests).
    :param clock: for retries and timeouts.
    :param budget: counts the bytes merges hold; a private one by default.
    :param part_size: S3's smallest part for all but the last (5 MiB), bytes.
    :param upload_slots: part uploads at once across all writers.
    :param completions_in_flight: merges at once (``COMPLETIONS_IN_FLIGHT``).
    :param writer_id: this process's writer ID (random hex by default).
    :param retry: the retry layer (one for the store).
    :param defer_to_thread: runs CPU work (re-compression) off the reactor thread.
    :param lease: this process's lease (its writer ID must be ``writer_id``):
        started once the bucket answered, released (deleted) by :meth:`close`, and
        every staging write waits until it is held
        (:meth:`~loghandler.storage.s3.lease.Lease.held`), so that recovery never
        takes the data of a writer that still writes.  None: no lease, staging
        writes never wait (tests).
    """

    _log = Logger()

    def __init__(
        self,
        client: IS3Client,
        clock: IReactorTime,
        budget: Optional[MemoryBudget] = None,
        *,
        part_size: int = S3_MIN_PART_SIZE,
        upload_slots: int = 8,
        completions_in_flight: int = 4,
        writer_id: Optional[str] = None,
        retry: Optional[RetryLayer] = None,
        defer_to_thread: DeferToThread = synchronously,
        lease: Optional[Lease] = None,
    ) -> None:
        self.client = client
        self.lease = lease
        self._lease_started = False
        self._closed = False
        self.lease_held: Callable[[], "Deferred[None]"] = (
            lease.held if lease is not None else _always_held
        )
        self.clock = clock
        self.writer_id = writer_id or uuid.uuid4().hex
        self.retry = retry or RetryLayer(clock)
        self.part_size = part_size
        self.upload_slots = DeferredSemaphore(upload_slots)
        #: Slots of the finishing calls (:data:`FINISH_CALLS_AT_ONCE`), apart from the
        #: part uploads', so that a tail never waits behind parts that stall.
        self.finish_slots = DeferredSemaphore(FINISH_CALLS_AT_ONCE)
        self.merge_slots = DeferredSemaphore(completions_in_flight)
        self.merger = Merger(
            client, self.retry, part_size, budget or MemoryBudget(2**62), defer_to_thread
        )
        self.key_merges = KeyMerges(client, self.retry, self.merger, self.writer_id)
        self._sequence: dict[str, int] = {}
        self.name = client.name

    def __repr__(self) -> str:
        return f"<S3ObjectStore {self.client!r} writer {self.writer_id}>"

    @property
    def problem(self) -> Optional[str]:
        """Why storage fails for good, or None (see :class:`RetryLayer`)."""
        return self.retry.problem

    @property
    def failing(self) -> Optional[tuple[float, str]]:
        """``(since, reason)`` while storage calls fail, else None (``IObjectStore``)."""
        return self.retry.failing

    def open(self, key: str) -> "S3ObjectWriter":
        """A writer for the next stream of ``key``; sends nothing yet."""
        return S3ObjectWriter(self, key, self.next_staging_key(key))

    def next_staging_key(self, key: str) -> str:
        """A staging key of this writer for ``key`` that was never used."""
        sequence = self._sequence.get(key, 0) + 1
        self._sequence[key] = sequence
        return staging_key(self.writer_id, key, sequence)

    def check(self) -> "Deferred[None]":
        """
        HeadBucket (one attempt); then, in the background, the bucket checks of
        :mod:`loghandler.storage.s3.bucket_checks` (versioning, conditional
        CompleteMultipartUpload), which warn in the log.
        """

        def checked(result: None) -> None:
            # Not after close: the answer may come after a stop (the lease was
            # released; starting it again would write a lease nobody renews).
            if self.lease is not None and not self._lease_started and not self._closed:
                self._lease_started = True
                self.lease.start()
            ensureDeferred(check_bucket(self.client, self.writer_id))

        return self.client.check().addCallback(checked)

    def stopping(self, deadline: float) -> None:
        """Wake sleeping retries; nothing is tried past ``deadline`` (clock seconds)."""
        self.retry.stopping(deadline)

    def close(self) -> "Deferred[None]":
        """
        Release the lease (so that others merge at once what stayed staged), then
        close the client's connections.
        """
        self._closed = True
        if self.lease is None:
            return self.client.close()
        return self.lease.release().addBoth(lambda _: self.client.close())


@implementer(IObjectWriter)
class S3ObjectWriter:
    """
    One stream's staging upload and its merge (see the module docstring).

    :ivar key: the object key.
    :ivar staging_key: where the stream's data are staged.
    :ivar write_id: the staging object's write ID, carried into the key's metadata.
    """

    _log = Logger()
    #: A checkpoint replaces the segment's previous upload (a snapshot, not a part).
    checkpoints_are_parts = False

    def __init__(self, store: S3ObjectStore, key: str, staging_key: str) -> None:
        self._store = store
        self._client = store.client
        self._retry = store.retry
        self.key = key
        self.staging_key = staging_key
        self.write_id = new_write_id()
        self._upload_id: Optional[str] = None
        self._creating: Optional[list[Deferred[str]]] = None
        # Uploads go one at a time, in the order they were handed over, so that the
        # staging upload always holds whole segments then one segment being filled.
        self._uploads_in_order = DeferredLock()
        self._finals = 0  # final uploads handed over (segments closed)
        self._segment = 1  # the segment being filled
        self._number = 1  # the part number its next upload uses
        self._checkpoints_exhausted = False
        self._checkpoints_pending: set[Deferred[bool]] = set()
        self._finishing = False
        # segment -> (part number, ETag, size) of its newest landed upload
        self._parts: dict[int, tuple[int, str, int]] = {}
        self._active: set[Deferred[Any]] = set()
        self._abandoned = False
        self._staged: Optional[Staged] = None
        self.staged_bytes = 0

    @property
    def full(self) -> bool:
        """
        Whether the stream must finish now: one segment is left for the tail, or
        the staged bytes reached the rollover size.
        """
        return self._finals >= MAX_SEGMENTS - 1 or self.staged_bytes >= ROLLOVER_BYTES

    def _cancelled(self) -> bool:
        return self._abandoned

    def _track(self, d: "Deferred[Any]") -> "Deferred[Any]":
        self._active.add(d)
        d.addBoth(self._untrack, d)
        return d

    def _untrack(self, result: object, d: "Deferred[Any]") -> object:
        self._active.discard(d)
        return result

    async def _call(
        self,
        operation: str,
        call: Callable[[], "Deferred[Any]"],
        slots: Optional[DeferredSemaphore] = None,
        cancelled: Optional[Callable[[], bool]] = None,
    ) -> Any:
        await self._store.lease_held()  # no staging write without the lease
        result = await self._retry.call(
            operation, self.staging_key, call, slots=slots, cancelled=cancelled or self._cancelled
        )
        # An answer counts only while the lease is held when it comes: one that
        # comes late (a stalled request) may have landed after a recoverer claimed
        # this writer and listed its parts.  held() fires at once while the last
        # renewal is fresh, else once a renewal lands (which proves no claim came
        # first: a claim is a compare-and-swap on the lease), or fails if it was.
        await self._store.lease_held()
        return result

    # -- IObjectWriter -------------------------------------------------------------

    def part(self, body: bytes) -> "Deferred[None]":
        """
        Upload ``body`` as the final upload of the segment being filled (replacing
        its checkpoints); the next upload starts the next segment.
        """
        if self._abandoned:
            return Deferred.fromCoroutine(_raise(Abandoned(self.key)))
        self._finals += 1
        self.staged_bytes += len(body)
        return self._track(ensureDeferred(self._upload_in_order(body, final=True)))

    def checkpoint(self, body: bytes) -> "Deferred[bool]":
        """
        Upload ``body`` (the segment being filled as it stands, whole gzip members)
        in place of the segment's previous upload.

        :returns: a Deferred firing with True once it landed, or False when the
            segment has no part number left for checkpoints (see
            :mod:`~loghandler.storage.s3.layout`): then only its final upload
            stores its lines.
        """
        if self._abandoned:
            return Deferred.fromCoroutine(_raise(Abandoned(self.key)))
        if self._finishing:
            return succeed(False)
        d = ensureDeferred(self._checkpoint(body))
        self._checkpoints_pending.add(d)
        d.addBoth(self._checkpoint_ended, d)
        return self._track(d)

    def _checkpoint_ended(self, result: object, d: "Deferred[bool]") -> object:
        self._checkpoints_pending.discard(d)
        return result

    async def _checkpoint(self, body: bytes) -> bool:
        try:
            return await self._upload_in_order(body, final=False)
        except (CancelledError, Abandoned):
            if self._finishing and not self._abandoned:
                return False  # superseded by the tail
            raise

    async def _upload_in_order(self, body: bytes, final: bool) -> bool:
        await self._uploads_in_order.acquire()
        try:
            if self._abandoned:
                raise Abandoned(self.key)
            if not final and self._checkpoints_exhausted:
                return False
            landed = await self._upload(body, final)
            if final:
                self._segment += 1
                self._number = segment_numbers(self._segment)[0]
                self._checkpoints_exhausted = False
            return landed
        finally:
            self._uploads_in_order.release()

    async def _upload(self, body: bytes, final: bool) -> bool:
        segment = self._segment
        numbers = segment_numbers(segment)

        def out_of_numbers() -> bool:
            # The last number of the range is kept for the final upload.
            return not final and self._number >= numbers[-1]

        def attempt(upload_id: str) -> "Deferred[str]":
            number = self._number
            d = self._client.upload_part(self.staging_key, upload_id, number, body)
            if not final:
                d.addErrback(self._attempt_failed, number)
            return d

        while True:
            if out_of_numbers():
                self._checkpoints_exhausted = True
                self._log.warn(
                    "{key}: no part number left for checkpoints of segment {segment};"
                    " its lines are stored with its final upload",
                    event="checkpoints_exhausted",
                    key=self.key,
                    segment=segment,
                )
                return False
            upload_id = await self._ensure_upload()
            try:
                etag = await self._call(
                    "UploadPart",
                    lambda: attempt(upload_id),
                    # The tail takes a finish slot, not an upload slot: at stop
                    # every stream's tail goes out, not behind parts that stall.
                    self._store.finish_slots
                    if self._finishing and final
                    else self._store.upload_slots,
                    cancelled=lambda: self._abandoned
                    or out_of_numbers()
                    or (not final and self._finishing),
                )
            except Abandoned:
                if self._abandoned or not out_of_numbers():
                    raise  # the writer's abandon, the deadline, or superseded by the tail
                continue  # out of numbers: the loop's first check says so
            except StorageFault as e:
                if e.fault is Fault.GONE:
                    await self._upload_vanished(upload_id)
                    continue
                raise
            self._parts[segment] = (self._number, etag, len(body))
            return True

    def _attempt_failed(self, failure: Failure, number: int) -> Failure:
        """
        A checkpoint's attempt failed: if it may still land later (no answer came),
        its number holds older data from now on, and the segment moves on to the
        next number of its range.
        """
        if self._number == number and (
            failure.value is None or _may_have_landed(failure.value)
        ):
            self._number = number + 1
        return failure

    async def _upload_vanished(self, upload_id: str) -> None:
        """
        NoSuchUpload on the staging upload.  With a lease, the likely cause is a
        recoverer that judged this writer gone (while its lease lapsed) and took its
        uploads: the lease is read to make sure (:meth:`Lease.confirm`), and when it
        is not ours any more nothing is staged again (that would store twice what
        the recoverer merged): :class:`Abandoned`, and the process is taken over.
        Else someone aborted the upload: :meth:`_replace_upload`.
        """
        lease = self._store.lease
        if lease is not None and not await lease.confirm():
            self._abandoned = True
            raise Abandoned(f"{self.key}: this writer was taken over")
        self._replace_upload(upload_id)

    def _replace_upload(self, upload_id: str) -> None:
        """
        The staging upload was aborted (or completed) from outside: its parts are
        lost to this stream.  The stream goes on in a new upload on a new staging
        key with a new write ID, so that it is never mistaken for the old one (which
        a recoverer may have merged) nor overwrites what it made of it.
        """
        if self._upload_id != upload_id:
            return
        lost = sum(size for _, _, size in self._parts.values())
        old_key = self.staging_key
        self.staging_key = self._store.next_staging_key(self.key)
        self.write_id = new_write_id()
        self._log.error(
            "{key}: staging upload {upload_id} of {old_key} was aborted by someone else:"
            " {parts} parts ({lost} gzip bytes) in it are lost; going on in a new upload"
            " on {staging_key}",
            event="staging_upload_lost",
            key=self.key,
            upload_id=upload_id,
            old_key=old_key,
            staging_key=self.staging_key,
            parts=len(self._parts),
            lost=lost,
        )
        self._upload_id = None
        self._parts.clear()

    async def _ensure_upload(self) -> str:
        if self._upload_id is not None:
            return self._upload_id
        # Parts that come while the upload is being created wait for the same
        # creation; cancelling one of them does not cancel it.
        waiter: Deferred[str] = Deferred()
        if self._creating is not None:
            self._creating.append(waiter)
        else:
            self._creating = [waiter]
            ensureDeferred(self._create_upload()).addBoth(self._created)
        upload_id: str = await waiter
        return upload_id

    def _created(self, result: Any) -> None:
        waiters, self._creating = self._creating or [], None
        if not isinstance(result, Failure):
            self._upload_id = result
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _create_upload(self) -> str:
        attempts = 0

        def create() -> "Deferred[str]":
            nonlocal attempts
            attempts += 1
            return self._client.create_upload(self.staging_key, (self.write_id,))

        upload_id: str = await self._call("CreateMultipartUpload", create)
        if attempts > 1:
            # An attempt whose answer was lost may have created an upload too.
            pending = await self._call(
                "ListMultipartUploads", lambda: self._client.list_uploads(self.staging_key)
            )
            for extra in pending:
                if extra.key == self.staging_key and extra.upload_id != upload_id:
                    await self._abort(extra.upload_id)
        return upload_id

    async def _abort(self, upload_id: str) -> None:
        try:
            await self._call(
                "AbortMultipartUpload",
                lambda: self._client.abort_upload(self.staging_key, upload_id),
            )
        except StorageFault as e:
            if e.fault is not Fault.GONE:
                raise

    def finish(
        self, tail: bytes, on_staged: Optional[Callable[[], None]] = None
    ) -> "Deferred[Finished]":
        """
        Stage ``tail`` after the parts, complete the staging object (then call
        ``on_staged``), merge it.  A checkpoint still in flight is cancelled: the
        tail holds its lines and must not wait behind it (a stalled attempt would
        hold the tail until the shutdown deadline).
        """
        self._finishing = True
        for pending in list(self._checkpoints_pending):
            pending.cancel()
        result: Deferred[Finished] = Deferred()

        def done(outcome: Any) -> None:
            if isinstance(outcome, Failure) and self._staged is not None:
                if not outcome.check(Abandoned, CancelledError):  # the deadline
                    self._log.failure(
                        "{key}: merge failed", outcome, event="merge_failed", key=self.key
                    )
                outcome = Finished("staged", staged_key=self._staged.key)
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        self._track(ensureDeferred(self._finish(tail, on_staged))).addBoth(done)
        return result

    async def _finish(self, tail: bytes, on_staged: Optional[Callable[[], None]]) -> Finished:
        if self._abandoned:
            raise Abandoned(self.key)
        # After every upload handed over before (checkpoints included).
        await self._uploads_in_order.acquire()
        self._uploads_in_order.release()
        if self._upload_id is None and not self._parts and self._creating is None:
            if not tail:
                return Finished("empty")
            etag = await self._call(
                "PutObject",
                lambda: self._client.put(self.staging_key, tail, writes=(self.write_id,)),
                self._store.finish_slots,  # as the tail of an upload (see _upload)
            )
            self._staged = Staged(self.staging_key, len(tail), etag, self.write_id)
        else:
            if tail:
                await self.part(tail)
            await self._complete_staging()
        staged = self._staged
        assert staged is not None
        if on_staged is not None:
            on_staged()
        metrics = self._retry.metrics
        metrics.staged_awaiting_merge.inc()
        metrics.staged_awaiting_merge_bytes.inc(staged.size)
        try:
            await self._store.merge_slots.acquire()
            try:
                return await self._store.key_merges.hand_off(staged, self.key, self._cancelled)
            finally:
                self._store.merge_slots.release()
        finally:
            metrics.staged_awaiting_merge.dec()
            metrics.staged_awaiting_merge_bytes.dec(staged.size)

    async def _complete_staging(self) -> None:
        while True:
            upload_id = await self._ensure_upload()
            segments = sorted(self._parts)
            if segments != list(range(1, self._segment)):
                # A replaced upload lost parts: complete with what it holds.
                self._log.warn(
                    "{key}: completing staging upload {upload_id} with segments {segments}",
                    event="staging_upload_completing",
                    key=self.key,
                    upload_id=upload_id,
                    segments=segments,
                )
            parts = [CompletedPart(*self._parts[n][:2]) for n in segments]
            size = sum(self._parts[n][2] for n in segments)
            try:
                etag = await self._call(
                    "CompleteMultipartUpload",
                    lambda: self._client.complete_upload(self.staging_key, upload_id, parts),
                    self._store.finish_slots,
                )
            except StorageFault as e:
                if e.fault is not Fault.GONE:
                    raise
                # NoSuchUpload: an attempt whose answer was lost completed it, or
                # someone aborted it.
                info = await self._call("HeadObject", lambda: self._client.head(self.staging_key))
                if info is not None and self.write_id in info.writes:
                    self._staged = Staged(self.staging_key, info.size, info.etag, self.write_id)
                    return
                await self._upload_vanished(upload_id)
                raise
            self._staged = Staged(self.staging_key, size, etag, self.write_id)
            return

    def abandon(self) -> None:
        """Cancel every call in flight; staged data stay for recovery."""
        self._abandoned = True
        for d in list(self._active):
            d.cancel()


async def _raise(error: Exception) -> Any:
    raise error


def _may_have_landed(error: BaseException) -> bool:
    """
    Whether a failed call may still have its effect, now or later: True unless an
    answer came (an HTTP error status) or the connection was never made.
    """
    if isinstance(error, StorageFault):
        error = error.error
    if isinstance(error, StorageError):
        return error.status == 0
    return not isinstance(error, (ConnectionRefusedError, DNSLookupError))

