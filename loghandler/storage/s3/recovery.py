"""
Recovery (DESIGN.md section 6): the staged data of writers that are gone are merged
into their keys, at start and every ``RECOVERY_INTERVAL_S`` seconds, by any process.

A pass (:meth:`Recoverer.recover_once`):

1. Runs only while our own lease has been renewed without a break for 3 x ``lease_s``
   (:attr:`Lease.healthy_for`): after an outage of S3, every live writer has had time
   to renew before anyone judges another gone.
2. Lists the staging uploads and objects (``_loghandler/staging/``), then the leases
   (``_loghandler/writers/``), in that order: a writer stages only while its lease
   is held, so a writer whose staged data are listed had a lease that the listing of
   leases, made after, shows unless it was deleted or went stale.  S3's clock: our
   own lease's LastModified stands for "now" (it was renewed within ``lease_s``, so
   this errs towards "not gone").  A writer is gone when it is not us and has no
   lease, or ``now - LastModified > 3 x lease_s``.
3. For each gone writer with staged data: list the leases again and, if the writer
   is still gone, claim it by deleting its lease before touching its data (a writer
   that comes back finds its lease gone and stops: the fence).  Then, per staging
   key, in key and sequence order: merge the staging object (HEAD for its write ID,
   then :meth:`Merger.merge`, holding a merge slot); then, oldest first, complete
   each staging upload (ListParts; none: abort; else CompleteMultipartUpload with
   the newest part of each segment, :func:`~loghandler.storage.s3.layout.newest_per_segment`)
   and merge the object it made before the next upload of the key (a second
   Complete would replace it).
4. Queues (:mod:`~loghandler.storage.s3.keymerge`): the merge locks of gone
   writers are deleted, and the keys whose queue markers are older than
   3 x ``lease_s`` and that no lock holds are drained (the lock taken, the queued
   staging objects merged in one batch): staging objects a live writer left to a
   merger that died, or that released the lock before seeing them.
5. Sweeps: merge uploads under ``chat/`` initiated more than ``stale_merge_upload_s``
   before S3's now are aborted (a live merge so aborted gets NoSuchUpload and is
   redone); the probes (``_loghandler/probe/``) of gone writers, older than
   3 x ``lease_s``, and the leases of gone writers without staged data are deleted.
   In the end nothing is left under ``_loghandler/`` but live writers' data.

Every step is safe to crash in: the next pass, by this or another process, finishes
it.  Several recoverers at once store each line once, by the merge's write IDs and
conditions; a NoSuchUpload or NoSuchKey (:data:`Fault.GONE`) at any step means that
someone else did it.  A request S3 refuses as malformed (:data:`Fault.INVALID`, such
as EntityTooSmall) is logged and its staging key left for the next pass.

S3 API pages: ListObjectsV2, ListMultipartUploads, ListParts, CompleteMultipartUpload,
AbortMultipartUpload, HeadObject, DeleteObject.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Optional

import attrs
from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from loghandler.interfaces import Abandoned
from loghandler.retry import Fault, RetryLayer, StorageFault
from loghandler.storage.s3.api import (
    CompletedPart,
    IS3Client,
    ListedObject,
    PendingUpload,
    StoredPart,
)
from loghandler.storage.s3.keymerge import KeyMerges
from loghandler.storage.s3.layout import (
    MERGING_PREFIX,
    PROBE_PREFIX,
    QUEUE_PREFIX,
    STAGING_PREFIX,
    WRITERS_PREFIX,
    StagingKey,
    lease_key,
    lease_writer,
    merge_lock_of,
    newest_per_segment,
    parse_queue_key,
    parse_staging_key,
    queue_key,
)
from loghandler.storage.s3.lease import Lease
from loghandler.storage.s3.merge import Merger, Staged, StagedDataGone

#: Where merge uploads live: the object keys readers use.
MERGE_PREFIX = "chat/"


@attrs.define
class RecoveryReport:
    """
    What one pass did.

    :ivar writers: the IDs of the gone writers whose staged data the pass took on.
    :ivar uploads_completed: staging uploads completed.
    :ivar objects_merged: staging objects merged into their keys (or found merged
        already, and deleted).
    :ivar garbage_deleted: leases of gone writers without staged data, and probe
        objects, deleted.
    :ivar uploads_aborted: empty staging uploads, stale merge uploads and probe
        uploads aborted.
    :ivar problems: staging keys or uploads left for the next pass after an error.
    :ivar skipped: why the pass did nothing, or None.
    """

    writers: list[str] = attrs.field(factory=list)
    uploads_completed: int = 0
    objects_merged: int = 0
    garbage_deleted: int = 0
    uploads_aborted: int = 0
    problems: int = 0
    skipped: Optional[str] = None

    @property
    def writers_recovered(self) -> int:
        """How many gone writers the pass took on."""
        return len(self.writers)

    @property
    def did_something(self) -> bool:
        """Whether anything was changed in the bucket or left after an error."""
        return bool(
            self.writers
            or self.uploads_completed
            or self.objects_merged
            or self.garbage_deleted
            or self.uploads_aborted
            or self.problems
        )


class _Outcome(enum.Enum):
    """What became of one staging upload in a pass."""

    #: A staging object may exist now (completed, by us or someone else): merge it.
    MERGE = "merge"
    #: Nothing to merge (aborted, or left after an error).
    NOTHING = "nothing"
    #: It has parts and waits for the next pass (see ``_recover_key``).
    LATER = "later"


@attrs.define
class _Staging:
    """One staging key of a gone writer: its object (if listed) and its uploads."""

    key: str
    parsed: StagingKey
    listed: Optional[ListedObject] = None
    uploads: list[PendingUpload] = attrs.field(factory=list)


class Recoverer:
    """
    Finishes what gone writers staged (see the module docstring).

    :param client: the bucket's calls.
    :param retry: the retry layer every call goes through.
    :param merger: merges staging objects into their keys.
    :param lease: our own lease (its :attr:`~Lease.healthy_for` gates every pass).
    :param writer_id: our own writer ID (never recovered).
    :param lease_s: ``LEASE_S``, seconds.
    :param merge_slots: merges at once, shared with the writers
        (``COMPLETIONS_IN_FLIGHT``).
    :param stale_merge_upload_s: a merge upload initiated longer ago than this, by
        S3's clock, is aborted by the sweep.
    :param key_merges: the keys' queues and merge locks (one on ``client``,
        ``retry`` and ``merger`` by default).
    """

    _log = Logger()

    def __init__(
        self,
        client: IS3Client,
        retry: RetryLayer,
        merger: Merger,
        lease: Lease,
        writer_id: str,
        lease_s: float,
        merge_slots: DeferredSemaphore,
        stale_merge_upload_s: float = 900.0,
        key_merges: Optional[KeyMerges] = None,
    ) -> None:
        #: The keys' queues and merge locks this recoverer drains.
        self.key_merges = key_merges or KeyMerges(client, retry, merger, writer_id)
        self._client = client
        self._retry = retry
        self._merger = merger
        self._lease = lease
        self.writer_id = writer_id
        self.lease_s = lease_s
        self._merge_slots = merge_slots
        self.stale_merge_upload_s = stale_merge_upload_s
        self._unparseable: set[str] = set()

    async def _call(
        self,
        operation: str,
        key: str,
        call: Callable[[], "Deferred[Any]"],
        cancelled: Callable[[], bool],
    ) -> Any:
        return await self._retry.call(operation, key, call, cancelled=cancelled)

    def healthy_in(self) -> Optional[float]:
        """
        Seconds until our lease will have been held long enough for a pass, if it
        is held from now on (0 when it is now), or None once it is lost for good.
        """
        if self._lease.lost:
            return None
        return max(0.0, 3 * self.lease_s - self._lease.healthy_for)

    def _healthy(self) -> Optional[str]:
        """None while our lease allows a pass, else why not."""
        healthy = self._lease.healthy_for
        if healthy < 3 * self.lease_s:
            return f"own lease held for {healthy:g} s only, under {3 * self.lease_s:g} s"
        return None

    async def recover_once(
        self, cancelled: Callable[[], bool] = lambda: False
    ) -> RecoveryReport:
        """
        One pass (see the module docstring).

        :param cancelled: tells whether the pass should stop (the service's stop).
        :returns: what the pass did, or why it was skipped.
        :raises Abandoned: cancelled, or the retry layer's deadline passed.
        :raises StorageFault: a listing refused as malformed.
        """
        report = RecoveryReport()
        report.skipped = self._healthy()
        if report.skipped is not None:
            return report
        staged = await self._list_staged(cancelled)
        now, leases = await self._list_leases(cancelled)
        if now is None:
            report.skipped = "own lease not listed"
            return report
        for writer in sorted(staged):
            if not self._gone(writer, now, leases):
                continue
            if cancelled():
                raise Abandoned("recovery stopped")
            report.skipped = self._healthy()
            if report.skipped is not None:
                break
            try:
                claimed = await self._claim(writer, cancelled)
            except StorageFault as e:
                report.problems += 1
                self._log.error(
                    "recovery: writer {writer} left for the next pass: {error}",
                    event="recovery_writer_deferred",
                    writer=writer,
                    error=str(e),
                )
                continue
            if not claimed:
                continue
            report.writers.append(writer)
            self._retry.metrics.recovered_writers.inc()
            items = sorted(
                staged[writer].values(), key=lambda s: (s.parsed.key, s.parsed.sequence)
            )
            waiting: set[str] = set()  # keys whose earlier streams wait for the next pass
            problems = report.problems
            for item in items:
                if cancelled():
                    raise Abandoned("recovery stopped")
                if item.parsed.key in waiting:
                    continue
                if not await self._recover_key(item, report, cancelled):
                    waiting.add(item.parsed.key)
            if not waiting and report.problems == problems:
                # All it staged is merged: its claim (tombstone) goes too.
                await self._delete(lease_key(writer), cancelled)
        if report.skipped is None:
            await self._drain_queues(report, cancelled)
            await self._sweep(set(staged), report, cancelled)
        if report.did_something:
            self._log.info(
                "recovery: writers {writers}: {uploads_completed} staging uploads completed,"
                " {objects_merged} staging objects merged, {uploads_aborted} uploads aborted,"
                " {garbage_deleted} leftovers deleted, {problems} left after errors",
                event="recovery_pass_done",
                writers=",".join(report.writers) or "-",
                uploads_completed=report.uploads_completed,
                objects_merged=report.objects_merged,
                uploads_aborted=report.uploads_aborted,
                garbage_deleted=report.garbage_deleted,
                problems=report.problems,
            )
        return report

    # -- who is gone ---------------------------------------------------------------

    async def _list_leases(
        self, cancelled: Callable[[], bool]
    ) -> tuple[Optional[float], dict[str, ListedObject]]:
        """
        The leases by writer ID, and S3's "now": our own lease's LastModified (None
        when our lease is not listed).
        """
        listed: list[ListedObject] = await self._call(
            "ListObjectsV2",
            WRITERS_PREFIX,
            lambda: self._client.list_objects(WRITERS_PREFIX),
            cancelled,
        )
        leases = {}
        for obj in listed:
            writer = lease_writer(obj.key)
            if writer is not None:
                leases[writer] = obj
        own = leases.get(self.writer_id)
        return (own.last_modified if own is not None else None), leases

    def _gone(self, writer: str, now: float, leases: dict[str, ListedObject]) -> bool:
        if writer == self.writer_id:
            return False
        lease = leases.get(writer)
        return (
            lease is None
            or lease.size == 0  # a recoverer's claim
            or now - lease.last_modified > 3 * self.lease_s
        )

    async def _list_staged(self, cancelled: Callable[[], bool]) -> dict[str, dict[str, _Staging]]:
        """Staging uploads and objects, by writer ID, then staging key."""
        uploads: list[PendingUpload] = await self._call(
            "ListMultipartUploads",
            STAGING_PREFIX,
            lambda: self._client.list_uploads(STAGING_PREFIX),
            cancelled,
        )
        objects: list[ListedObject] = await self._call(
            "ListObjectsV2",
            STAGING_PREFIX,
            lambda: self._client.list_objects(STAGING_PREFIX),
            cancelled,
        )
        staged: dict[str, dict[str, _Staging]] = {}

        def entry(key: str) -> Optional[_Staging]:
            parsed = parse_staging_key(key)
            if parsed is None:
                if key not in self._unparseable:
                    self._unparseable.add(key)
                    self._log.warn(
                        "recovery: ignoring {key}: not a staging key",
                        event="recovery_key_ignored",
                        key=key,
                    )
                return None
            keys = staged.setdefault(parsed.writer_id, {})
            return keys.setdefault(key, _Staging(key, parsed))

        for obj in objects:
            item = entry(obj.key)
            if item is not None:
                item.listed = obj
        for upload in uploads:
            item = entry(upload.key)
            if item is not None:
                item.uploads.append(upload)
        return staged

    async def _claim(self, writer: str, cancelled: Callable[[], bool]) -> bool:
        """
        List the leases again; if ``writer`` is still gone, claim it and return True.

        The claim is the fence: its lease is replaced by an empty body (a tombstone)
        only while it is the stale version listed (``If-Match`` its ETag).  A writer
        that renewed meanwhile changed the ETag, so the claim fails (412) and the
        writer keeps its data; a writer that renews after the claim gets 412 and
        finds a body that is not its own: it stops.  An unconditional delete would
        remove a lease renewed after the listing.
        """
        now, leases = await self._list_leases(cancelled)
        if now is None or not self._gone(writer, now, leases):
            self._log.info(
                "recovery: writer {writer} is back; its data are left to it",
                event="recovery_writer_back",
                writer=writer,
            )
            return False
        lease = leases.get(writer)
        if lease is None or lease.size == 0:
            return True  # no lease (its renewals fail) or claimed already
        return await self._tombstone(lease, cancelled)

    async def _tombstone(self, lease: ListedObject, cancelled: Callable[[], bool]) -> bool:
        """
        Replace ``lease`` (as listed) by an empty body, ``If-Match`` its ETag.

        :returns: True when the lease is now a tombstone (ours or another
            recoverer's) or missing; False when its writer renewed it.
        """
        key = lease.key
        try:
            await self._call(
                "PutObject",
                key,
                lambda: self._client.put(key, b"", if_match=lease.etag),
                cancelled,
            )
            return True
        except StorageFault as e:
            if e.fault not in (Fault.CONFLICT, Fault.GONE):
                raise
        info = await self._call("HeadObject", key, lambda: self._client.head(key), cancelled)
        if info is None or info.size == 0:
            return True
        self._log.info(
            "recovery: writer {writer} renewed its lease meanwhile; its data are left to it",
            event="recovery_writer_back",
            writer=lease_writer(key),
        )
        return False

    # -- one staging key -------------------------------------------------------------

    async def _recover_key(
        self, item: _Staging, report: RecoveryReport, cancelled: Callable[[], bool]
    ) -> bool:
        """
        The staging object, then the staging uploads (oldest first), of one staging
        key.  Once a staging object of the key was merged (or looked for), the key's
        next upload with parts waits for the next pass: another recoverer merging
        the same object may still send its final DeleteObject of the staging key,
        which would delete the object the next upload's completion makes.

        :returns: False when an upload waits for the next pass (then the later
            streams of the same key wait too, so that lines keep their order).
        """
        try:
            merged = False
            if item.listed is not None:
                await self._merge_staged(item, report, cancelled)
                merged = True
            for upload in sorted(item.uploads, key=lambda u: (u.initiated, u.upload_id)):
                outcome = await self._complete(upload, report, cancelled, may_complete=not merged)
                if outcome is _Outcome.LATER:
                    return False
                if outcome is _Outcome.MERGE:
                    await self._merge_staged(item, report, cancelled)
                    merged = True
        except StorageFault as e:
            report.problems += 1
            self._log.error(
                "recovery: {staging} left for the next pass: {error}",
                event="recovery_staging_deferred",
                staging=item.key,
                error=str(e),
            )
        return True

    async def _merge_staged(
        self, item: _Staging, report: RecoveryReport, cancelled: Callable[[], bool]
    ) -> None:
        """HEAD the staging object for its write ID, merge it (holding a merge slot)."""
        info = await self._call(
            "HeadObject", item.key, lambda: self._client.head(item.key), cancelled
        )
        if info is None:
            return  # merged and deleted by someone else
        if not info.writes:
            report.problems += 1
            self._log.error(
                "recovery: {staging} has no write ID in its metadata; left as it is",
                event="staging_without_write_id",
                staging=item.key,
            )
            return
        staged = Staged(item.key, info.size, info.etag, info.writes[-1])
        await self._merge_slots.acquire()
        try:
            await self._merger.merge(staged, item.parsed.key, cancelled)
        except StagedDataGone:
            # Deleted while we merged, and the key does not list its write ID.
            self._log.warn(
                "recovery: {staging} (write {write_id}) vanished before {key} listed it",
                event="staging_vanished",
                staging=item.key,
                write_id=staged.write_id,
                key=item.parsed.key,
            )
            return
        finally:
            self._merge_slots.release()
        report.objects_merged += 1
        # Its marker, if it was queued for the key's merger (who would find it gone).
        marker = queue_key(item.parsed)
        await self._call("DeleteObject", marker, lambda: self._client.delete(marker), cancelled)

    async def _complete(
        self,
        upload: PendingUpload,
        report: RecoveryReport,
        cancelled: Callable[[], bool],
        may_complete: bool = True,
    ) -> _Outcome:
        """
        Complete one staging upload with the newest part of each segment (when
        ``may_complete``), or abort it when it has no parts.
        """
        key, upload_id = upload.key, upload.upload_id
        try:
            parts: list[StoredPart] = await self._call(
                "ListParts", key, lambda: self._client.list_parts(key, upload_id), cancelled
            )
        except StorageFault as e:
            if e.fault is Fault.GONE:
                return _Outcome.MERGE  # completed or aborted by someone else: HEAD tells
            raise
        if not parts:
            try:
                await self._call(
                    "AbortMultipartUpload",
                    key,
                    lambda: self._client.abort_upload(key, upload_id),
                    cancelled,
                )
            except StorageFault as e:
                if e.fault is not Fault.GONE:
                    raise
                return _Outcome.MERGE
            report.uploads_aborted += 1
            return _Outcome.NOTHING
        if not may_complete:
            return _Outcome.LATER
        chosen = [
            CompletedPart(p.number, p.etag)
            for p in newest_per_segment(parts, lambda p: p.number)
        ]
        try:
            await self._call(
                "CompleteMultipartUpload",
                key,
                lambda: self._client.complete_upload(key, upload_id, chosen),
                cancelled,
            )
        except StorageFault as e:
            if e.fault is Fault.GONE:
                return _Outcome.MERGE  # a retried Complete that landed, or someone else's
            if e.fault is not Fault.INVALID:
                raise
            report.problems += 1
            self._log.error(
                "recovery: {staging} upload {upload_id} cannot be completed ({error});"
                " parts (number:bytes): {parts}; chosen: {chosen}; left as it is",
                event="recovery_upload_stuck",
                staging=key,
                upload_id=upload_id,
                error=str(e),
                parts=" ".join(f"{p.number}:{p.size}" for p in parts),
                chosen=" ".join(str(p.number) for p in chosen),
            )
            return _Outcome.NOTHING
        report.uploads_completed += 1
        return _Outcome.MERGE

    # -- queues of keys whose merger is gone ------------------------------------------

    async def _drain_queues(self, report: RecoveryReport, cancelled: Callable[[], bool]) -> None:
        """
        The merge locks of gone writers are deleted; then each key with a queue
        marker older than 3 x ``lease_s`` (by S3's clock; younger ones may have a
        merger about to take the lock) and no lock is drained
        (:meth:`KeyMerges.drain`), holding a merge slot.  Lists the leases anew,
        after the markers and locks, so that a lock is never judged a gone
        writer's on an older listing than the lock's.
        """
        markers: list[ListedObject] = await self._call(
            "ListObjectsV2", QUEUE_PREFIX, lambda: self._client.list_objects(QUEUE_PREFIX), cancelled
        )
        locks: list[ListedObject] = await self._call(
            "ListObjectsV2",
            MERGING_PREFIX,
            lambda: self._client.list_objects(MERGING_PREFIX),
            cancelled,
        )
        if not markers and not locks:
            return
        now, leases = await self._list_leases(cancelled)
        if now is None:
            return
        busy: set[str] = set()
        for listed in locks:
            key = merge_lock_of(listed.key)
            if key is None:
                continue
            holder = await self.key_merges.holder(listed.key, cancelled)
            if holder is None:
                continue  # released meanwhile
            if holder == self.writer_id or not self._gone(holder, now, leases):
                busy.add(key)
                continue
            self._log.info(
                "recovery: {lock} was held by writer {writer}, gone; deleted",
                event="recovery_lock_deleted",
                lock=listed.key,
                writer=holder or "-",
            )
            await self._delete(listed.key, cancelled)
            report.garbage_deleted += 1
        oldest: dict[str, float] = {}
        for listed in markers:
            parsed = parse_queue_key(listed.key)
            if parsed is not None:
                oldest[parsed.key] = min(oldest.get(parsed.key, listed.last_modified), listed.last_modified)
        for key, since in sorted(oldest.items()):
            if key in busy or now - since <= 3 * self.lease_s:
                continue
            if cancelled():
                raise Abandoned("recovery stopped")
            await self._merge_slots.acquire()
            try:
                merged = await self.key_merges.drain(key, cancelled)
            except StorageFault as e:
                report.problems += 1
                self._log.error(
                    "recovery: the queue of {key} left for the next pass: {error}",
                    event="recovery_queue_deferred",
                    key=key,
                    error=str(e),
                )
                continue
            finally:
                self._merge_slots.release()
            if merged is not None:
                report.objects_merged += len(merged.merged)

    # -- sweeps ----------------------------------------------------------------------

    async def _sweep(
        self, with_data: set[str], report: RecoveryReport, cancelled: Callable[[], bool]
    ) -> None:
        """
        Abort stale merge uploads; delete gone writers' probes and the leases of gone
        writers without staged data (``with_data``: writers that had staged data
        when the pass began).
        """
        now, leases = await self._list_leases(cancelled)
        if now is None:
            return
        merges: list[PendingUpload] = await self._call(
            "ListMultipartUploads",
            MERGE_PREFIX,
            lambda: self._client.list_uploads(MERGE_PREFIX),
            cancelled,
        )
        for upload in merges:
            if now - upload.initiated > self.stale_merge_upload_s:
                if await self._abort(upload, cancelled):
                    report.uploads_aborted += 1

        def stale_probe(key: str, since: float) -> bool:
            writer = key[len(PROBE_PREFIX) :]
            return (
                bool(writer)
                and "/" not in writer
                and self._gone(writer, now, leases)
                and now - since > 3 * self.lease_s
            )

        probes: list[PendingUpload] = await self._call(
            "ListMultipartUploads",
            PROBE_PREFIX,
            lambda: self._client.list_uploads(PROBE_PREFIX),
            cancelled,
        )
        for upload in probes:
            if stale_probe(upload.key, upload.initiated) and await self._abort(upload, cancelled):
                report.uploads_aborted += 1
        objects: list[ListedObject] = await self._call(
            "ListObjectsV2",
            PROBE_PREFIX,
            lambda: self._client.list_objects(PROBE_PREFIX),
            cancelled,
        )
        for obj in objects:
            if stale_probe(obj.key, obj.last_modified):
                await self._delete(obj.key, cancelled)
                report.garbage_deleted += 1
        for writer, lease in sorted(leases.items()):
            if writer not in with_data and self._gone(writer, now, leases):
                # Claimed first (unless a tombstone already): a lease renewed since
                # the listing is not deleted.
                if lease.size == 0 or await self._tombstone(lease, cancelled):
                    await self._delete(lease.key, cancelled)
                    report.garbage_deleted += 1

    async def _abort(self, upload: PendingUpload, cancelled: Callable[[], bool]) -> bool:
        """Abort an upload; False when it was gone already."""
        try:
            await self._call(
                "AbortMultipartUpload",
                upload.key,
                lambda: self._client.abort_upload(upload.key, upload.upload_id),
                cancelled,
            )
        except StorageFault as e:
            if e.fault is Fault.GONE:
                return False
            raise
        return True

    async def _delete(self, key: str, cancelled: Callable[[], bool]) -> None:
        await self._call("DeleteObject", key, lambda: self._client.delete(key), cancelled)


class RecoveryService(TimerService):
    """
    Runs :meth:`Recoverer.recover_once` when started and then every ``interval_s``
    seconds (``RECOVERY_INTERVAL_S``), never two passes at once (the timer waits for
    the pass).  A pass skipped because our own lease was not held long enough yet is
    run again as soon as it will have been (a new instance recovers a dead one about
    3 x ``lease_s`` after it starts, not one interval later); a tick of the timer
    that comes while that early pass runs waits for it and runs none.  A failed pass is
    logged and the next one runs as planned.  Stopping cancels the pass in flight;
    :meth:`stopService` fires once it ended.

    :param recoverer: what a pass runs.
    :param interval_s: seconds between the start of one pass and the next (a pass
        longer than that delays the next).
    :param clock: the timer's clock.
    :ivar last_report: the last pass's report, or None.
    """

    _log = Logger()

    def __init__(self, recoverer: Recoverer, interval_s: float, clock: IReactorTime) -> None:
        super().__init__(interval_s, self._run_pass)
        self.clock = clock
        self._recoverer = recoverer
        self._stopping = False
        self._pass: Optional[Deferred[RecoveryReport]] = None
        self._clock = clock
        self._early: Optional[IDelayedCall] = None
        self._waiters: list[Deferred[None]] = []  # ticks that came during the early pass
        self.last_report: Optional[RecoveryReport] = None

    def startService(self) -> None:
        """Start the timer; the first pass runs now."""
        self._stopping = False
        super().startService()

    def stopService(self) -> "Deferred[None]":
        """Stop the timer and cancel the pass in flight; fires once it ended."""
        self._stopping = True
        if self._early is not None and self._early.active():
            self._early.cancel()
        if self._pass is not None:
            self._pass.cancel()
        d: Deferred[None] = super().stopService()
        return d

    def _run_pass(self) -> "Deferred[None]":
        if self._pass is not None:
            # The early pass is still in flight (it outlasted the interval): the
            # timer's tick waits for it rather than running a second pass beside it.
            waiter: Deferred[None] = Deferred()
            self._waiters.append(waiter)
            return waiter
        d = ensureDeferred(self._recoverer.recover_once(lambda: self._stopping))
        self._pass = d
        return d.addCallbacks(self._passed, self._failed).addBoth(self._ended)

    def _passed(self, report: RecoveryReport) -> None:
        self.last_report = report
        wait = self._recoverer.healthy_in()
        if (
            report.skipped is not None
            and wait is not None
            and 0 < wait < self.step  # skipped for the health gate, not another reason
            and not self._stopping
            and (self._early is None or not self._early.active())
        ):
            self._early = self._clock.callLater(wait + 0.01, self._early_pass)

    def _early_pass(self) -> None:
        if self._pass is None and not self._stopping:
            self._run_pass()

    def _failed(self, failure: Failure) -> None:
        if failure.check(Abandoned, CancelledError):
            self._log.info(
                "recovery pass stopped ({error})",
                event="recovery_pass_stopped",
                error=str(failure.value),
            )
        else:
            self._log.failure(
                "recovery pass failed; the next pass goes on", failure, event="recovery_pass_failed"
            )

    def _ended(self, result: None) -> None:
        self._pass = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
