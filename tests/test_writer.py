"""
Tests for the S3 writer (:mod:`loghandler.storage.s3.writer`) and the merge
(:mod:`loghandler.storage.s3.merge`) over the in-memory S3 (:class:`MemoryStore`) on a
``task.Clock``: the bytes that land, the calls made, what is left in the bucket.

The ``Defect*`` classes are regression tests for the six defects of issue 5, each
reproducing the scenario that lost or doubled lines on the append protocol.
"""

from __future__ import annotations

import gzip
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectingCancelledError, DNSLookupError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.interfaces import Finished, IObjectStore, IObjectWriter, StorageError
from loghandler.registry import StreamRegistry, StreamSettings
from loghandler.retry import RetryLayer
from loghandler.storage import memory
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3 import merge
from loghandler.storage.s3.layout import merge_lock_key, queue_prefix
from loghandler.storage.s3.merge import single_member
from loghandler.storage.s3.writer import STAGING_PREFIX, S3ObjectStore, S3ObjectWriter
from tests.helpers import members, message, noise, read_lines

KEY = "chat/2020-03-30/content_logs_2020-03-30_3"
PART = 4096


def gzip_of(lines: list[bytes]) -> bytes:
    """One gzip member holding ``lines``."""
    return gzip.compress(b"".join(lines))


class WriterCase(SynchronousTestCase):
    """A memory S3, a store over it, helpers to write a whole stream."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.s3 = MemoryStore(min_part_size=PART, now=self.clock.seconds)
        self.budget = MemoryBudget(1 << 40)
        self.store = self.make_store()

    def make_store(self, **kwargs: Any) -> S3ObjectStore:
        kwargs.setdefault(
            "retry", RetryLayer(self.clock, attempt_timeout=10.0, backoff=Backoff(1.0, 8.0))
        )
        return S3ObjectStore(self.s3, self.clock, self.budget, part_size=PART, **kwargs)

    def write(self, lines: list[bytes], store: S3ObjectStore | None = None) -> Deferred[Finished]:
        """Open a writer, hand it ``lines`` in parts of PART and a tail; finish."""
        writer = (store or self.store).open(KEY)
        return self.write_to(writer, lines)

    def write_to(self, writer: S3ObjectWriter, lines: list[bytes]) -> Deferred[Finished]:
        data = gzip_of(lines)
        # Whole-member parts: cut the lines into groups whose gzip reaches PART.
        group: list[bytes] = []
        for line in lines:
            group.append(line)
            body = gzip_of(group)
            if len(body) >= PART:
                writer.part(body)
                group = []
        self.assertTrue(data)
        return writer.finish(gzip_of(group) if group else b"")

    def run_until(self, d: Deferred[Any], seconds: float = 600.0) -> Any:
        """Advance the clock in small steps until ``d`` fired; its result."""
        step = 0.1
        while not d.called and seconds > 0:
            self.clock.advance(step)
            seconds -= step
        return self.successResultOf(d)

    def stored(self, key: str = KEY) -> list[bytes]:
        return read_lines(self.s3.body(key))

    def leftovers(self) -> tuple[list[str], list[str]]:
        """Keys under _loghandler/ and uploads still open."""
        return (
            [k for k in self.s3.objects if k.startswith("_loghandler/")],
            [u.key for u in self.s3.uploads.values()],
        )


class StagingTests(WriterCase):
    """Stage, then merge: the calls and the bytes."""

    def test_provides_interfaces(self) -> None:
        """The store and its writers provide the seam's interfaces."""
        self.assertTrue(verifyObject(IObjectStore, self.store))
        self.assertTrue(verifyObject(IObjectWriter, self.store.open(KEY)))

    def test_small_stream_new_key(self) -> None:
        """
        A stream that is one small tail: PutObject of the staging object; the key's
        merge lock taken (PutObject If-None-Match), its queue listed (empty); HEAD,
        GET, PutObject If-None-Match of the key, delete the staging object; the
        lock released and the queue listed again: 9 requests.
        """
        lines = [message(n).to_line() for n in range(1, 50)]
        finished = self.run_until(self.write(lines))
        self.assertEqual(finished, Finished("merged", key=KEY))
        self.assertEqual(self.stored(), lines)
        staging = self.s3.calls[0][1]
        lock, queue = merge_lock_key(KEY), queue_prefix(KEY)
        self.assertEqual(
            self.s3.calls,
            [
                ("PutObject", staging),
                ("PutObject", lock),
                ("ListObjectsV2", queue),
                ("HeadObject", KEY),
                ("GetObject", staging),
                ("PutObject", KEY),
                ("DeleteObject", staging),
                ("DeleteObject", lock),
                ("ListObjectsV2", queue),
            ],
        )
        self.assertEqual(self.leftovers(), ([], []))
        self.assertEqual(len(self.s3.objects[KEY].writes), 1)

    def test_staging_key(self) -> None:
        """Staging keys carry the writer ID, the key and the stream's number."""
        store = self.make_store(writer_id="w1")
        self.assertEqual(store.open(KEY).staging_key, STAGING_PREFIX + "w1/" + KEY + "/1")
        self.assertEqual(store.open(KEY).staging_key, STAGING_PREFIX + "w1/" + KEY + "/2")

    def test_idle_stream_uploads_nothing(self) -> None:
        """A writer finished with nothing sends no request."""
        finished = self.run_until(self.store.open(KEY).finish(b""))
        self.assertEqual(finished, Finished("empty"))
        self.assertEqual(self.s3.calls, [])

    def test_small_into_small_is_one_member(self) -> None:
        """Key and staging object both small: the result is one re-compressed member."""
        base = [message(n).to_line() for n in range(1, 20)]
        self.s3.store(KEY, gzip_of(base[:10]) + gzip_of(base[10:]), ["old"])
        new = [message(n).to_line() for n in range(20, 40)]
        self.run_until(self.write(new))
        self.assertEqual(self.stored(), base + new)
        self.assertEqual(len(members(self.s3.body(KEY))), 1)
        self.assertEqual(self.s3.objects[KEY].writes[0], "old")

    def test_multipart_stream_into_large_key_copies(self) -> None:
        """
        A large key and a multipart staging object: the merge copies both by
        UploadPartCopy (no GET of either) and completes with If-Match.
        """
        base = noise(0, 60)
        self.s3.store(KEY, gzip_of(base))
        self.assertGreaterEqual(len(self.s3.body(KEY)), PART)
        new = noise(100, 80)
        self.run_until(self.write(new))
        self.assertEqual(self.stored(), base + new)
        merge_calls = [op for op, key in self.s3.calls if key == KEY]
        self.assertEqual(
            merge_calls,
            ["HeadObject", "CreateMultipartUpload", "UploadPartCopy", "UploadPartCopy",
             "CompleteMultipartUpload"],
        )
        self.assertEqual(self.leftovers(), ([], []))

    def test_small_key_large_staged(self) -> None:
        """
        A small key and a large staging object: part 1 is the key plus the start of
        the staging object (ranged GETs), the rest is copied as a range.
        """
        base = [message(1).to_line()]
        self.s3.store(KEY, gzip_of(base))
        new = noise(100, 120)
        self.run_until(self.write(new))
        self.assertEqual(self.stored(), base + new)
        ops = [op for op, _ in self.s3.calls]
        self.assertIn("UploadPartCopy", ops)
        self.assertEqual(ops.count("GetObject"), 2)

    def test_rollover(self) -> None:
        """A key over the rollover size takes no merge: the data go to ``{key}.1``."""
        self.patch(merge, "ROLLOVER_BYTES", PART)
        base = noise(0, 60)
        self.s3.store(KEY, gzip_of(base))
        new = [message(1).to_line()]
        finished = self.run_until(self.write(new))
        self.assertEqual(finished.key, KEY + ".1")
        self.assertEqual(self.stored(KEY), base)
        self.assertEqual(self.stored(KEY + ".1"), new)

    def test_versioned_bucket_warns(self) -> None:
        """check() warns when the bucket is versioned, naming the lifecycle rule."""
        self.s3.versioning_status = "Enabled"
        with capturedLogs() as events:
            self.successResultOf(self.store.check())
        self.assertTrue(
            [e for e in events if "NoncurrentVersionExpiration" in e["log_format"]]
        )

    def test_single_member(self) -> None:
        """single_member joins members into one; one member is returned as it is."""
        one = gzip_of([b"a\n"])
        self.assertIs(single_member([one]), one)
        joined = single_member([one, gzip_of([b"b\n"]) + gzip_of([b"c\n"])])
        self.assertEqual(len(members(joined)), 1)
        self.assertEqual(gzip.decompress(joined), b"a\nb\nc\n")


class DefectUnexpectedErrorTests(WriterCase):
    """Defect 1: a part failing with an error other than StorageError was skipped."""

    def test_part_failing_unexpectedly_is_retried(self) -> None:
        """
        UploadPart failing with a DNS error, a cancelled connect and a RuntimeError is
        retried; the object has every line, no gap, and the budget is back to 0.
        """
        registry = StreamRegistry(
            self.store, self.clock, StreamSettings(part_size=PART, lifetime_s=60), self.budget
        )
        self.s3.fail("UploadPart", DNSLookupError("s3"))
        self.s3.fail("UploadPart", ConnectingCancelledError(None))
        self.s3.fail("UploadPart", RuntimeError("credential refresh failed"))
        lines = noise(0, 200)
        for n, line in enumerate(lines):
            registry.accept(_message_for(line, n))
        done = registry.close_all()
        self.run_until(done)
        self.assertEqual(len(self.stored()), len(lines))
        self.assertEqual(self.budget.held, 0)
        self.assertEqual(self.leftovers(), ([], []))
        self.flushLoggedErrors(RuntimeError)


def _message_for(line: bytes, n: int) -> Any:
    """A Message whose canonical line is ``line``'s text with content_id n + 1."""
    import json

    from loghandler.message import Message

    value = json.loads(line)
    return Message(value["text"], n + 1, 3, value["timestamp"])


class DefectLostAnswerThenOtherWriterTests(WriterCase):
    """Defect 2: a lost answer, then another writer's merge, doubled the tail."""

    def test_landed_merge_found_behind_another(self) -> None:
        """
        Our merge PutObject lands but its answer is lost; another writer merges into
        the key before our retry; the retry (412) finds our write ID in the key's
        list (not only as the latest) and merges nothing again.
        """
        ours = [message(n).to_line() for n in range(1, 10)]
        theirs = [message(n).to_line() for n in range(100, 110)]
        other = self.make_store(writer_id="other")
        self.s3.lose_answer("PutObject", after=1)  # the staging put passes; the merge's answer is lost
        d = self.write(ours)
        self.assertFalse(d.called)  # waiting to retry
        self.run_until(self.write(theirs, other))
        self.run_until(d)
        stored = self.stored()
        self.assertEqual(sorted(stored), sorted(ours + theirs))
        self.assertEqual(self.leftovers(), ([], []))


class DefectLeftUploadsTests(WriterCase):
    """Defect 3: a retried append left its old multipart upload behind."""

    def test_conflict_on_merge_complete_leaves_no_upload(self) -> None:
        """409 on the merge's Complete (S3 discards it) and a 412: merged once, no upload left."""
        base = noise(0, 60)
        self.s3.store(KEY, gzip_of(base))
        self.s3.conflict()
        new = noise(100, 80)
        other = [message(7).to_line()]
        self.s3.before(
            "CompleteMultipartUpload",
            lambda: self.s3.before(
                "CompleteMultipartUpload", lambda: self.s3.store(KEY, gzip_of(base + other))
            ),
        )
        self.run_until(self.write(new))
        self.assertEqual(self.stored(), base + other + new)
        self.assertEqual(self.leftovers(), ([], []))

    def test_retried_create_aborts_extra_upload(self) -> None:
        """A CreateMultipartUpload whose answer was lost: the extra upload is aborted."""
        self.s3.lose_answer("CreateMultipartUpload")
        lines = noise(0, 120)
        self.run_until(self.write(lines))
        self.assertEqual(self.stored(), lines)
        self.assertEqual(self.leftovers(), ([], []))
        self.assertIn("AbortMultipartUpload", [op for op, _ in self.s3.calls])


class DefectNoSuchUploadTests(WriterCase):
    """Defect 4: NoSuchUpload was retried forever."""

    def test_lost_answer_to_staging_complete(self) -> None:
        """The staging Complete lands, its answer is lost: the retry's NoSuchUpload is
        resolved by HEAD (our write ID), and the merge goes on."""
        self.s3.lose_answer("CompleteMultipartUpload")
        lines = noise(0, 120)
        self.run_until(self.write(lines), seconds=60)
        self.assertEqual(self.stored(), lines)
        self.assertEqual(self.leftovers(), ([], []))

    def test_staging_upload_aborted_from_outside(self) -> None:
        """
        The staging upload is aborted by someone else: the writer says which parts
        were lost, goes on in a new upload and finishes (no endless retry).
        """
        writer = self.store.open(KEY)
        first = noise(0, 60)
        self.successResultOf(writer.part(gzip_of(first)))
        (upload_id,) = list(self.s3.uploads)
        self.successResultOf(self.s3.abort_upload(writer.staging_key, upload_id))
        rest = noise(100, 60)
        with capturedLogs() as events:
            writer.part(gzip_of(rest))
            d = writer.finish(gzip_of([message(1).to_line()]))
            self.run_until(d, seconds=60)
        self.assertEqual(self.stored(), rest + [message(1).to_line()])
        self.assertTrue([e for e in events if e.get("upload_id") == upload_id and "lost" in e])


class ReplacedUploadTests(WriterCase):
    """A staging upload taken from outside (completed and merged by recovery)."""

    def test_replacement_has_new_write_id_and_key(self) -> None:
        """
        Recovery completed the stream's upload and merged it into the key; the
        stream goes on in a new upload, on a new staging key with a new write ID,
        so its later lines are merged too (not taken for the merge that landed).
        """
        writer = self.store.open(KEY)
        first = noise(0, 60)
        self.successResultOf(writer.part(gzip_of(first)))
        old_key, old_write = writer.staging_key, writer.write_id
        ((upload_id, upload),) = list(self.s3.uploads.items())
        # What recovery does: complete the upload, merge it, delete the staging object.
        from loghandler.storage.s3.api import CompletedPart

        number = sorted(upload.parts)[0]
        self.successResultOf(
            self.s3.complete_upload(
                old_key, upload_id, [CompletedPart(number, upload.parts[number][1])]
            )
        )
        self.s3.store(KEY, self.s3.body(old_key), writes=(old_write,))
        self.successResultOf(self.s3.delete(old_key))
        rest = noise(100, 60)
        with capturedLogs():
            writer.part(gzip_of(rest))
            finished = self.run_until(writer.finish(gzip_of([message(1).to_line()])))
        self.assertEqual(finished, Finished("merged", key=KEY))
        self.assertNotEqual((writer.staging_key, writer.write_id), (old_key, old_write))
        self.assertEqual(self.stored(), first + rest + [message(1).to_line()])


class CheckAfterCloseTests(WriterCase):
    """The bucket check's answer after the store closed."""

    def test_no_lease_after_close(self) -> None:
        """
        A store stopped before its HeadBucket answered (a slow store at start, then
        SIGTERM): when the answer comes, the lease, released by the close, is not
        started again (it raised "started twice", logged, and would have written
        a lease nobody renews).  (Found by the model with slow answers.)
        """
        from loghandler.storage.s3.lease import Lease

        retry = RetryLayer(self.clock, attempt_timeout=10.0, backoff=Backoff(1.0, 8.0))
        lease = Lease(self.s3, retry, self.clock, "w1", 10.0, lambda: None)
        store = self.make_store(writer_id="w1", retry=retry, lease=lease)
        self.s3.hold("HeadBucket")
        checked = store.check()
        self.successResultOf(store.close())
        self.s3.release()
        self.successResultOf(checked)
        self.assertNotIn("_loghandler/writers/w1", self.s3.objects)
        self.assertEqual(self.flushLoggedErrors(), [])


class TakenOverTests(WriterCase):
    """A writer whose staging upload vanished because recovery took it over."""

    def make_leased(self) -> tuple[S3ObjectStore, list[None]]:
        from loghandler.storage.s3.lease import Lease

        taken: list[None] = []
        retry = RetryLayer(self.clock, attempt_timeout=10.0, backoff=Backoff(1.0, 8.0))
        lease = Lease(self.s3, retry, self.clock, "w1", 10.0, lambda: taken.append(None))
        store = self.make_store(writer_id="w1", retry=retry, lease=lease)
        self.successResultOf(store.check())
        self.addCleanup(lease.stop)
        return store, taken

    def test_vanished_upload_and_lease_claimed(self) -> None:
        """
        NoSuchUpload on the staging upload while the lease is a recoverer's claim:
        the writer is taken over and stages nothing again (its segment would store
        twice what the recoverer merged).
        """
        store, taken = self.make_leased()
        writer = store.open(KEY)
        self.successResultOf(writer.checkpoint(gzip_of(noise(0, 5))))
        (upload_id,) = list(self.s3.uploads)
        # What a recoverer does: claim the lease, complete and merge the upload.
        self.s3.store("_loghandler/writers/w1", b"")
        self.successResultOf(self.s3.abort_upload(writer.staging_key, upload_id))
        with capturedLogs():
            d = writer.checkpoint(gzip_of(noise(0, 8)))
            self.run_until_failed(d)
        self.assertEqual(taken, [None])
        self.assertEqual(self.s3.uploads, {})
        creates = [
            key for op, key in self.s3.calls if op == "CreateMultipartUpload" and "staging" in key
        ]
        self.assertEqual(creates, [writer.staging_key])

    def test_vanished_upload_lease_still_ours(self) -> None:
        """
        NoSuchUpload while the lease is still ours (an operator aborted the upload):
        the stream goes on in a new upload.
        """
        store, taken = self.make_leased()
        writer = store.open(KEY)
        self.successResultOf(writer.checkpoint(gzip_of(noise(0, 5))))
        (upload_id,) = list(self.s3.uploads)
        self.successResultOf(self.s3.abort_upload(writer.staging_key, upload_id))
        with capturedLogs():
            self.assertTrue(self.run_until(writer.checkpoint(gzip_of(noise(0, 8)))))
        self.assertEqual(taken, [])
        self.assertEqual(len(self.s3.uploads), 1)

    def run_until_failed(self, d: Deferred[Any]) -> None:
        for _ in range(1000):
            if d.called:
                break
            self.clock.advance(0.1)
        self.failureResultOf(d)


class DefectStopAndJitterTests(WriterCase):
    """Defect 5: stop did not wake sleeping retries; conflicts retried in lockstep."""

    def test_stop_wakes_sleeping_retry(self) -> None:
        """A part waiting 50 s to be retried is retried at once when the flush starts."""
        store = self.make_store(
            retry=RetryLayer(self.clock, backoff=Backoff(100.0, 100.0, uniform=lambda a, b: 50.0))
        )
        self.s3.fail("PutObject", StorageError("PutObject", 503, "SlowDown"))
        d = store.open(KEY).finish(gzip_of([message(1).to_line()]))
        self.clock.advance(1)
        self.assertFalse(d.called)
        store.stopping(self.clock.seconds() + 25)
        self.run_until(d, seconds=1)
        self.assertEqual(self.stored(), [message(1).to_line()])

    def test_abandoned_while_merge_waits_is_staged_not_a_failure(self) -> None:
        """
        Abandoned at the deadline while the merge waits to retry: the data stay
        staged (Finished "staged"), and nothing is logged as a failure.
        """
        store = self.make_store(
            retry=RetryLayer(self.clock, backoff=Backoff(100.0, 100.0, uniform=lambda a, b: 50.0))
        )
        self.s3.fail("HeadObject", StorageError("HeadObject", 503, "SlowDown"))
        writer = store.open(KEY)
        d = writer.finish(gzip_of([message(1).to_line()]))
        self.clock.advance(1)
        with capturedLogs() as events:
            writer.abandon()
        self.assertEqual(self.successResultOf(d).outcome, "staged")
        self.assertEqual([e for e in events if e.get("log_failure")], [])

    def test_conflict_retry_waits_with_jitter(self) -> None:
        """After a 412 the merge waits a jittered delay before redoing."""
        draws: list[tuple[float, float]] = []

        def uniform(low: float, high: float) -> float:
            draws.append((low, high))
            return high / 2

        self.store.merger.conflict_backoff = Backoff(0.5, 5.0, uniform=uniform)
        self.s3.before("PutObject", lambda: None)
        other = [message(9).to_line()]
        self.s3.before(
            "HeadObject", lambda: self.s3.before("GetObject", lambda: self.s3.store(KEY, gzip_of(other)))
        )
        self.run_until(self.write([message(1).to_line()]))
        self.assertEqual(draws, [(0.0, 0.5)])
        self.assertEqual(sorted(self.stored()), sorted(other + [message(1).to_line()]))


class DefectCompletionMemoryTests(WriterCase):
    """Defect 6: completion memory was outside the budget and unbounded at stop."""

    def test_merges_bounded_and_counted(self) -> None:
        """
        With COMPLETIONS_IN_FLIGHT 1 only one merge runs at once, and the bytes it
        holds (the GETs of key and staging object) are in the budget meanwhile.
        """
        store = self.make_store(completions_in_flight=1)
        self.s3.hold("PutObject")
        keys = ["chat/2020-03-30/content_logs_2020-03-30_%d" % n for n in (1, 2, 3)]
        writers = [store.open(k) for k in keys]
        finishing = [w.finish(gzip_of([message(n).to_line()])) for n, w in enumerate(writers)]
        self.s3.release()  # the staging puts land; each merge's PutObject is held
        self.s3.hold("PutObject")
        self.assertEqual(len([h for h in self.s3.held if h.key in keys]), 0)
        self.s3.release()
        self.assertEqual(len(self.s3.held), 0)
        for d in finishing:
            self.run_until(d)
        heads = [k for op, k in self.s3.calls if op == "HeadObject"]
        self.assertEqual(heads, keys)
        self.assertEqual(self.budget.held, 0)

    def test_merge_holds_budget(self) -> None:
        """While a merge waits on its PutObject, the budget counts what it holds."""
        base = [message(1).to_line()]
        self.s3.store(KEY, gzip_of(base))
        # The merge's PutObject (after its GETs) is held.
        self.s3.before("GetObject", lambda: self.s3.hold("PutObject"))
        d = self.write([message(2).to_line()])
        self.assertEqual([h.key for h in self.s3.held], [KEY])
        held = self.store.merger.holding
        self.assertGreater(held, 0)
        self.assertEqual(self.budget.held, held)
        self.s3.release()
        self.run_until(d)
        self.assertEqual(self.budget.held, 0)


class CheckpointTests(WriterCase):
    """Checkpoints into the staging upload: numbers, replacement, stale attempts."""

    def upload_numbers(self) -> list[int]:
        return [n for n in self.part_calls]

    def setUp(self) -> None:
        super().setUp()
        self.part_calls: list[int] = []
        upload_part = self.s3.upload_part

        def recording(key: str, upload_id: str, number: int, body: bytes) -> Deferred[str]:
            self.part_calls.append(number)
            return upload_part(key, upload_id, number, body)

        self.s3.upload_part = recording  # type: ignore[method-assign]

    def staged_lines(self, writer: S3ObjectWriter) -> list[bytes]:
        """What recovery would complete now: the newest part of each segment."""
        ((upload_id, upload),) = self.s3.uploads.items()
        from loghandler.storage.s3.layout import newest_per_segment

        numbers = newest_per_segment(sorted(upload.parts), lambda n: n)
        return read_lines(b"".join(upload.parts[n][0] for n in numbers))

    def test_checkpoints_replace_then_final(self) -> None:
        """
        Checkpoints of segment 1 replace each other at part 1; its final upload
        replaces them; segment 2 uses 11; completion lists 1 and 11 and the key
        holds each line once.
        """
        lines = noise(0, 60)
        first, second = gzip_of(lines[:20]), gzip_of(lines[:40])
        writer = self.store.open(KEY)
        self.assertTrue(self.successResultOf(writer.checkpoint(gzip_of(lines[:5]))))
        self.assertTrue(self.successResultOf(writer.checkpoint(first)))
        self.assertEqual(self.staged_lines(writer), lines[:20])
        self.successResultOf(writer.part(second))
        self.assertEqual(self.staged_lines(writer), lines[:40])
        self.assertTrue(self.successResultOf(writer.checkpoint(gzip_of(lines[40:50]))))
        self.assertEqual(self.staged_lines(writer), lines[:50])
        finished = self.run_until(writer.finish(gzip_of(lines[40:])))
        self.assertEqual(finished, Finished("merged", key=KEY))
        self.assertEqual(self.part_calls, [1, 1, 1, 11, 11])
        self.assertEqual(self.stored(), lines)
        self.assertEqual(self.leftovers(), ([], []))

    def test_stale_checkpoint_attempt_lands_late(self) -> None:
        """
        A checkpoint attempt that times out may land later with older data: the
        segment moves on to the next number, so the late landing is superseded
        and the key holds the final data once.
        """
        lines = noise(0, 60)
        writer = self.store.open(KEY)
        self.successResultOf(writer.checkpoint(gzip_of(lines[:5])))  # creates the upload
        self.s3.hold("UploadPart")
        d = writer.checkpoint(gzip_of(lines[:10]))
        self.clock.advance(11.0)  # the attempt times out
        self.s3._holding.clear()  # the retry goes through; the first stays held
        self.run_until(d)
        self.assertEqual(self.part_calls, [1, 1, 2])
        self.s3.release()  # the stale attempt lands at 1, behind 2
        self.assertEqual(self.staged_lines(writer), lines[:10])
        self.run_until(writer.part(gzip_of(lines[:45])))
        finished = self.run_until(writer.finish(gzip_of(lines[45:])))
        self.assertEqual(finished, Finished("merged", key=KEY))
        self.assertEqual(self.part_calls, [1, 1, 2, 2, 11])
        self.assertEqual(self.stored(), lines)

    def test_error_answer_keeps_number(self) -> None:
        """An attempt answered with an error never landed: the number is kept."""
        writer = self.store.open(KEY)
        self.s3.fail("UploadPart", StorageError("UploadPart", 503, "SlowDown"))
        self.run_until(writer.checkpoint(gzip_of(noise(0, 5))))
        self.assertEqual(self.part_calls, [1, 1])

    def test_numbers_exhausted(self) -> None:
        """
        Nine lost answers use up the checkpoint numbers of a segment: the next
        checkpoint is refused (False); the final upload keeps the tenth.
        """
        lines = noise(0, 30)
        writer = self.store.open(KEY)
        self.s3.lose_answer("UploadPart", times=9)
        with capturedLogs() as events:
            landed = self.run_until(writer.checkpoint(gzip_of(lines[:10])))
        self.assertFalse(landed)
        self.assertTrue([e for e in events if "no part number left" in e["log_format"]])
        self.assertFalse(self.run_until(writer.checkpoint(gzip_of(lines[:12]))))
        finished = self.run_until(writer.finish(gzip_of(lines)))
        self.assertEqual(finished, Finished("merged", key=KEY))
        self.assertEqual(self.part_calls, list(range(1, 10)) + [10])
        self.assertEqual(self.stored(), lines)

    def test_uploads_wait_for_the_lease(self) -> None:
        """
        No staging call is made before the lease is held: the lease is written
        once the bucket answered, then the staging upload goes on; close deletes
        the lease.
        """
        from loghandler.storage.s3.lease import Lease

        retry = RetryLayer(self.clock, attempt_timeout=10.0, backoff=Backoff(1.0, 8.0))
        lease = Lease(self.s3, retry, self.clock, "w1", 10.0, lambda: None)
        store = self.make_store(writer_id="w1", retry=retry, lease=lease)
        writer = store.open(KEY)
        d = writer.checkpoint(gzip_of(noise(0, 5)))
        self.assertEqual(self.s3.calls, [])
        self.successResultOf(store.check())
        self.assertTrue(self.successResultOf(d))
        ops = [
            (op, key.split("/")[1])
            for op, key in self.s3.calls
            if key.startswith(("_loghandler/writers/", "_loghandler/staging/"))
        ]
        self.assertEqual(
            ops,
            [
                ("PutObject", "writers"),
                ("CreateMultipartUpload", "staging"),
                ("UploadPart", "staging"),
            ],
        )
        self.successResultOf(store.close())
        self.assertNotIn("_loghandler/writers/w1", self.s3.objects)

    def test_finish_supersedes_stalled_checkpoint(self) -> None:
        """
        finish() does not wait behind a checkpoint whose attempt stalls: the
        checkpoint is cancelled (False), the tail goes to the next number at once,
        and the stalled attempt, landing later, is superseded.
        """
        lines = noise(0, 30)
        writer = self.store.open(KEY)
        self.successResultOf(writer.checkpoint(gzip_of(lines[:5])))
        self.s3.hold("UploadPart")
        checkpoint = writer.checkpoint(gzip_of(lines[:10]))
        self.assertEqual(len(self.s3.held), 1)
        self.s3._holding.clear()
        finished = writer.finish(gzip_of(lines))
        self.assertFalse(self.successResultOf(checkpoint))
        self.assertEqual(self.part_calls, [1, 1, 2])
        self.assertEqual(self.run_until(finished), Finished("merged", key=KEY))
        self.s3.release()  # the stalled attempt lands in no upload
        self.assertEqual(self.stored(), lines)

    def test_tail_takes_no_upload_slot(self) -> None:
        """
        With every upload slot held by a stalled upload of another stream, a tail
        still goes out at once (at stop, each stream's tail is one request that
        must not wait behind others).
        """
        store = self.make_store(upload_slots=1)
        lines = noise(0, 60)
        other, writer = store.open(KEY + "x"), store.open(KEY)
        self.successResultOf(writer.checkpoint(gzip_of(lines[:5])))
        self.s3.hold("UploadPart")
        other.checkpoint(gzip_of(lines[:3]))  # holds the only slot
        self.s3._holding.clear()
        finished = writer.finish(gzip_of(lines))
        self.assertEqual(self.run_until(finished, 5.0), Finished("merged", key=KEY))
        self.assertEqual(self.stored(), lines)

    def test_uploads_in_order(self) -> None:
        """
        A checkpoint handed over after a part waits until the part landed (no
        upload of segment 2 before segment 1's final upload).
        """
        lines = noise(0, 40)
        writer = self.store.open(KEY)
        self.successResultOf(writer.checkpoint(gzip_of(lines[:5])))
        self.s3.hold("UploadPart")
        part = writer.part(gzip_of(lines[:20]))
        checkpoint = writer.checkpoint(gzip_of(lines[20:25]))
        self.assertEqual([h.operation for h in self.s3.held], ["UploadPart"])
        self.s3.release()
        self.successResultOf(part)
        self.successResultOf(checkpoint)
        self.assertEqual(self.part_calls, [1, 1, 11])


class MemoryModelTests(SynchronousTestCase):
    """The faults the memory S3 models, as the writer sees them."""

    def test_lost_answer_is_response_never_received(self) -> None:
        """A lost answer fails like treq does when the connection drops."""
        from twisted.web.client import ResponseNeverReceived

        s3 = MemoryStore()
        s3.lose_answer("PutObject")
        self.failureResultOf(s3.put("k", b"x"), ResponseNeverReceived)
        self.assertEqual(s3.body("k"), b"x")
        self.assertIs(memory.LOST, memory.LOST)


class FinishConcurrencyTests(WriterCase):
    """At stop every stream finishes at once: the store gets a bounded number of calls."""

    def test_tails_at_most_finish_calls_at_once(self) -> None:
        """
        150 streams of one small tail each finish together (as at SIGTERM): at most
        FINISH_CALLS_AT_ONCE staging PutObjects are in flight at any moment (3,000
        at once overwhelmed moto: answers never came and tails missed the
        deadline); every stream's line is stored once.
        """
        from loghandler.storage.s3.writer import FINISH_CALLS_AT_ONCE

        held: list[tuple[Deferred[Any], Any, tuple[Any, ...], dict[str, Any]]] = []
        most = [0]
        real_put = self.s3.put

        def slow_put(*args: Any, **kwargs: Any) -> Deferred[Any]:
            if not str(args[0]).startswith(STAGING_PREFIX):
                return real_put(*args, **kwargs)
            d: Deferred[Any] = Deferred()
            held.append((d, real_put, args, kwargs))
            most[0] = max(most[0], len(held))
            return d

        self.patch(self.s3, "put", slow_put)
        finishing = []
        for n in range(150):
            writer = self.store.open("chat/2020-03-30/content_logs_2020-03-30_%d" % (n + 1))
            finishing.append(writer.finish(gzip_of([message(n).to_line()])))
        while held:
            self.assertLessEqual(len(held), FINISH_CALLS_AT_ONCE)
            d, put, args, kwargs = held.pop(0)
            put(*args, **kwargs).chainDeferred(d)
            self.clock.advance(0)
        self.assertEqual(most[0], FINISH_CALLS_AT_ONCE)
        for d in finishing:
            self.assertEqual(self.run_until(d).outcome, "merged")
        for n in range(150):
            key = "chat/2020-03-30/content_logs_2020-03-30_%d" % (n + 1)
            self.assertEqual(self.stored(key), [message(n).to_line()])
