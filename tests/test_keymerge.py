"""
Tests for one merger per key (:mod:`loghandler.storage.s3.keymerge`) and the batch
merge under it (:meth:`Merger.merge_batch`), over the in-memory S3 on a
``task.Clock``: several writers of one key, a lock held by someone else, a lost
answer, a merger that dies holding the lock, and recovery taking its queue over.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.interfaces import Finished
from loghandler.retry import RetryLayer
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.api import MAX_WRITES, newest_writes
from loghandler.storage.s3.keymerge import lock_holder
from loghandler.storage.s3.layout import (
    MERGING_PREFIX,
    QUEUE_PREFIX,
    StagingKey,
    merge_lock_key,
    parse_queue_key,
    queue_key,
    queue_prefix,
    staging_key,
)
from loghandler.storage.s3.lease import Lease
from loghandler.storage.s3.merge import MAX_BATCH, Merger, Staged
from loghandler.storage.s3.recovery import Recoverer
from loghandler.storage.s3.writer import S3ObjectStore
from loghandler.threads import synchronously
from tests.helpers import members, message, noise, read_lines
from tests.model_support import ProcessClient

KEY = "chat/2020-03-30/content_logs_2020-03-30_3"
PART = 1024
LEASE_S = 10.0


def gzip_of(lines: list[bytes]) -> bytes:
    """One gzip member holding ``lines``."""
    return gzip.compress(b"".join(lines))


class LayoutTests(SynchronousTestCase):
    """Queue markers and locks: keys made and parsed."""

    def test_queue_key_round_trip(self) -> None:
        """A marker names its staging key; other keys are not markers."""
        staging = StagingKey("w1", KEY, 3)
        self.assertEqual(queue_key(staging), QUEUE_PREFIX + KEY + "/w1/3")
        self.assertEqual(parse_queue_key(queue_key(staging)), staging)
        self.assertTrue(queue_key(staging).startswith(queue_prefix(KEY)))
        for bad in (QUEUE_PREFIX + "w1/3", QUEUE_PREFIX + KEY + "/w1/0", "chat/x/w/1"):
            self.assertIsNone(parse_queue_key(bad), bad)
        self.assertEqual(merge_lock_key(KEY), MERGING_PREFIX + KEY)

    def test_newest_writes_bounded(self) -> None:
        """At most MAX_WRITES IDs, and at most MAX_WRITES_BYTES joined: the newest."""
        short = tuple("%016x" % n for n in range(MAX_WRITES + 5))
        self.assertEqual(newest_writes(short), short[-MAX_WRITES:])
        long_ = tuple("%032x" % n for n in range(MAX_WRITES))
        kept = newest_writes(long_)
        self.assertEqual(kept, long_[-len(kept) :])
        self.assertLessEqual(len(",".join(kept)), 1900)
        self.assertGreaterEqual(MAX_WRITES, 3 * MAX_BATCH)

    def test_lock_holder(self) -> None:
        """The writer ID of a lock's body; none for another body."""
        self.assertEqual(lock_holder(b'{"writer_id": "w1", "nonce": "n"}'), "w1")
        self.assertIsNone(lock_holder(b""))
        self.assertIsNone(lock_holder(b"[]"))


class KeyMergeCase(SynchronousTestCase):
    """A memory S3 and stores ("writers") over it, each with its own writer ID."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.s3 = MemoryStore(min_part_size=PART, now=self.clock.seconds)
        self.budget = MemoryBudget(1 << 40)

    def make_store(self, writer_id: str, client: Any = None) -> S3ObjectStore:
        retry = RetryLayer(
            self.clock, attempt_timeout=10.0, backoff=Backoff(0.5, 2.0, uniform=lambda a, b: b)
        )
        return S3ObjectStore(
            client or self.s3,
            self.clock,
            self.budget,
            part_size=PART,
            writer_id=writer_id,
            retry=retry,
        )

    def finish(self, store: S3ObjectStore, lines: list[bytes]) -> "Deferred[Finished]":
        """One stream of ``lines`` (one small tail), finished."""
        return store.open(KEY).finish(gzip_of(lines))

    def run_until(self, d: "Deferred[Any]", seconds: float = 300.0) -> Any:
        while not d.called and seconds > 0:
            self.clock.advance(0.1)
            seconds -= 0.1
        return self.successResultOf(d)

    def leftovers(self) -> list[str]:
        return sorted(k for k in self.s3.objects if k.startswith("_loghandler/")) + sorted(
            u.key for u in self.s3.uploads.values()
        )


class HandOffTests(KeyMergeCase):
    """Writers of one key hand their staging objects to the key's one merger."""

    def test_queued_while_the_lock_is_held(self) -> None:
        """
        While ``a`` merges (its merge's HEAD of the key is held), ``b`` and ``c``
        finish: their lock attempts get 412, they queue their staging objects and
        are done ("queued").  ``a``'s release is followed by a listing of the queue,
        so ``a`` takes the lock again and merges both in one merge: the key gets
        every line once, its metadata every write ID, and nothing is left under
        ``_loghandler/``.
        """
        a, b, c = (self.make_store(w) for w in ("a", "b", "c"))
        lines = {w: [message(n).to_line() for n in range(k, k + 5)] for w, k in (("a", 1), ("b", 10), ("c", 20))}
        self.s3.hold("HeadObject")
        finishing_a = self.finish(a, lines["a"])
        self.assertEqual([(h.operation, h.key) for h in self.s3.held], [("HeadObject", KEY)])
        held = self.s3.held.pop()
        self.s3.release()
        finished_b = self.successResultOf(self.finish(b, lines["b"]))
        finished_c = self.successResultOf(self.finish(c, lines["c"]))
        self.assertEqual(finished_b.outcome, "queued")
        self.assertEqual(finished_c.outcome, "queued")
        self.assertEqual(len(self.s3.list_objects(queue_prefix(KEY)).result), 2)
        calls = len(self.s3.calls)
        self.s3.held.append(held)
        self.s3.release()
        self.assertEqual(self.run_until(finishing_a), Finished("merged", key=KEY))
        self.assertEqual(
            sorted(read_lines(self.s3.body(KEY))), sorted(lines["a"] + lines["b"] + lines["c"])
        )
        self.assertEqual(len(self.s3.objects[KEY].writes), 3)
        self.assertEqual(self.leftovers(), [])
        # b's and c's objects went in one merge (one PutObject of the key).
        later = self.s3.calls[calls:]
        self.assertEqual(later.count(("PutObject", KEY)), 2)  # a's, then b's and c's
        self.assertEqual(later.count(("HeadObject", KEY)), 1)  # the held one counted before

    def test_one_merge_copies_the_base_once(self) -> None:
        """
        Over a key bigger than a part, the merger's batch of its own and 3 queued
        staging objects copies the key once (one UploadPartCopy of it), one
        CompleteMultipartUpload: not one merge per writer.
        """
        base = noise(1000, 40)
        self.s3.store(KEY, gzip_of(base))
        self.assertGreater(len(self.s3.body(KEY)), PART)
        stores = [self.make_store("w%d" % n) for n in range(4)]
        self.s3.hold("ListObjectsV2")  # the merger's first listing of the queue
        lines = [[message(100 * n + k).to_line() for k in range(1, 4)] for n in range(4)]
        first = self.finish(stores[0], lines[0])
        held = self.s3.held.pop()
        self.s3.release()
        for store, these in zip(stores[1:], lines[1:]):
            self.assertEqual(self.successResultOf(self.finish(store, these)).outcome, "queued")
        self.s3.calls.clear()
        self.s3.held.append(held)
        self.s3.release()
        self.assertEqual(self.run_until(first), Finished("merged", key=KEY))
        self.assertEqual(self.s3.calls.count(("UploadPartCopy", KEY)), 1)
        self.assertEqual(self.s3.calls.count(("CompleteMultipartUpload", KEY)), 1)
        stored = read_lines(self.s3.body(KEY))
        self.assertEqual(stored[: len(base)], base)
        self.assertEqual(sorted(stored[len(base) :]), sorted(sum(lines, [])))
        self.assertEqual(self.leftovers(), [])

    def test_released_before_the_marker_landed(self) -> None:
        """
        ``b``'s first lock attempt gets 412 while ``a`` holds the lock; ``a``
        releases and lists the queue before ``b``'s marker lands (no wake-up for
        ``b``).  ``b`` tries the lock once more after its marker: it takes it and
        merges its own object.
        """
        a, b = self.make_store("a"), self.make_store("b")
        self.s3.hold("DeleteObject")  # a's first delete: its staging object, after the merge
        finishing_a = self.finish(a, [message(1).to_line()])
        self.assertEqual([h.operation for h in self.s3.held], ["DeleteObject"])
        held = self.s3.held.pop()
        self.s3.release()
        marker = queue_key(StagingKey("b", KEY, 1))

        def a_finishes() -> None:
            self.s3.held.append(held)
            self.s3.release()

        # b's PutObjects: its staging object, the lock (412), its marker: a
        # finishes just before the marker lands.
        self.s3.before(
            "PutObject",
            lambda: self.s3.before("PutObject", lambda: self.s3.before("PutObject", a_finishes)),
        )
        finished_b = self.successResultOf(self.finish(b, [message(2).to_line()]))
        self.assertTrue(finishing_a.called)
        self.assertIn(("PutObject", marker), self.s3.calls)
        self.assertEqual(finished_b, Finished("merged", key=KEY))
        self.assertEqual(
            sorted(read_lines(self.s3.body(KEY))), [message(1).to_line(), message(2).to_line()]
        )
        self.assertEqual(self.leftovers(), [])

    def test_lost_answer_to_the_lock(self) -> None:
        """
        The lock's PutObject lands but its answer is lost: the retried attempt gets
        412, the lock is read back, holds our body: taken, and the merge goes on.
        """
        self.s3.lose_answer("PutObject", after=1)  # the staging put answers; the lock's not
        finished = self.run_until(self.finish(self.make_store("a"), [message(1).to_line()]))
        self.assertEqual(finished, Finished("merged", key=KEY))
        self.assertEqual(self.leftovers(), [])

    def test_staged_object_already_merged(self) -> None:
        """
        A queued staging object the key lists already (its merger died after the
        merge, before deleting it) is deleted, with its marker, not merged again.
        """
        lines = [message(1).to_line()]
        staging = staging_key("dead", KEY, 1)
        self.s3.store(KEY, gzip_of(lines), ["w-dead"])
        self.s3.store(staging, gzip_of(lines), ["w-dead"])
        self.s3.store(queue_key(StagingKey("dead", KEY, 1)), b"", ["w-dead"])
        finished = self.run_until(self.finish(self.make_store("a"), [message(2).to_line()]))
        self.assertEqual(finished, Finished("merged", key=KEY))
        self.assertEqual(read_lines(self.s3.body(KEY)), lines + [message(2).to_line()])
        self.assertEqual(self.leftovers(), [])


class BatchTests(KeyMergeCase):
    """Merger.merge_batch on its own."""

    def make_merger(self) -> Merger:
        retry = RetryLayer(self.clock, backoff=Backoff(0.5, 2.0, uniform=lambda a, b: b))
        return Merger(self.s3, retry, PART, self.budget, synchronously)

    def staged(self, n: int, lines: list[bytes]) -> Staged:
        key = staging_key("w%d" % n, KEY, 1)
        etag = self.s3.store(key, gzip_of(lines), ["id-%d" % n])
        return Staged(key, len(self.s3.body(key)), etag, "id-%d" % n)

    def test_more_than_a_batch(self) -> None:
        """MAX_BATCH + 3 staging objects: two merges, every line once, whole members."""
        merger = self.make_merger()
        lines = [[message(10 * n + k).to_line() for k in range(3)] for n in range(MAX_BATCH + 3)]
        batch = [self.staged(n, these) for n, these in enumerate(lines)]
        merged = self.run_until(ensureDeferred(merger.merge_batch(batch, KEY)))
        self.assertEqual(len(merged.merged), len(batch))
        self.assertEqual(read_lines(self.s3.body(KEY)), sum(lines, []))
        members(self.s3.body(KEY))
        self.assertEqual(self.s3.calls.count(("HeadObject", KEY)), 2)
        self.assertEqual(self.leftovers(), [])

    def test_conflict_redoes_the_whole_batch(self) -> None:
        """A 409 on the batch's Complete: the batch is merged again, once."""
        merger = self.make_merger()
        base = [message(n).to_line() for n in range(500, 600)]
        self.s3.store(KEY, gzip_of(base))
        batch = [self.staged(n, [message(n).to_line()]) for n in range(3)]
        self.s3.conflict()
        merged = self.run_until(ensureDeferred(merger.merge_batch(batch, KEY)))
        self.assertEqual(len(merged.merged), 3)
        self.assertEqual(read_lines(self.s3.body(KEY)), base + [message(n).to_line() for n in range(3)])


class RecoveredQueueTests(KeyMergeCase):
    """A merger that dies holding the lock: recovery frees the lock and drains the queue."""

    def test_merger_dies_holding_the_lock(self) -> None:
        """
        ``a`` takes the lock and dies in its merge (its lease stops, the lock
        stays); ``b`` finds the lock taken and queues.  Once ``a``'s lease is older
        than 3 x LEASE_S, ``r``'s recovery pass deletes ``a``'s lock (a gone
        writer's), drains the key's queue (``b``'s marker is old enough) and
        finishes what ``a`` staged (its staging object, no marker): every line once,
        nothing left but ``b``'s and ``r``'s leases.
        """
        retry = RetryLayer(self.clock, backoff=Backoff(0.5, 2.0, uniform=lambda a, b: b))
        leases = {}
        for w in ("a", "b", "r"):
            leases[w] = Lease(self.s3, retry, self.clock, w, LEASE_S, lambda: None)
            leases[w].start()
            self.addCleanup(leases[w].stop)
        a_client = ProcessClient(self.s3)
        a = self.make_store("a", a_client)
        b = self.make_store("b")
        self.s3.before("HeadObject", lambda: setattr(a_client, "cut", True))
        self.finish(a, [message(1).to_line()])  # dies: its merge's HEAD never answers
        leases["a"].stop()
        self.assertEqual(
            lock_holder(self.s3.body(merge_lock_key(KEY))), "a", "a's lock stays"
        )
        self.assertEqual(
            self.successResultOf(self.finish(b, [message(2).to_line()])).outcome, "queued"
        )
        merger = Merger(self.s3, retry, PART, self.budget, synchronously)
        recoverer = Recoverer(
            self.s3, retry, merger, leases["r"], "r", LEASE_S, DeferredSemaphore(2)
        )
        for _ in range(45):
            self.clock.advance(1)
        report = self.run_until(ensureDeferred(recoverer.recover_once()))
        self.assertEqual(report.writers, ["a"], report)
        self.assertEqual(
            sorted(read_lines(self.s3.body(KEY))), [message(1).to_line(), message(2).to_line()]
        )
        self.assertEqual(
            self.leftovers(), ["_loghandler/writers/b", "_loghandler/writers/r"]
        )
        self.assertEqual(json.loads(self.s3.body("_loghandler/writers/r"))["writer_id"], "r")


class WriteIdTests(SynchronousTestCase):
    """Write IDs are short enough for a key to list three batches of them."""

    def test_three_batches_fit(self) -> None:
        """
        3 x MAX_BATCH new write IDs (16 hex digits) are all kept by newest_writes,
        also after the 16 longer IDs an earlier version may have left in a key.
        """
        from loghandler.storage.s3.writer import new_write_id

        ids = tuple(new_write_id() for _ in range(3 * MAX_BATCH))
        self.assertEqual({len(i) for i in ids}, {16})
        self.assertEqual(newest_writes(ids), ids)
        old = tuple("%032x" % n for n in range(16))
        self.assertEqual(newest_writes(old + ids)[-len(ids) :], ids)
