"""
Tests for recovery (:mod:`loghandler.storage.s3.recovery`) over the in-memory S3
(:class:`MemoryStore`) on a ``task.Clock``: a staged state is built by hand, as a
writer that died would leave it, and a pass must merge exactly the lines of the
newest part of each segment into the key, once, whatever crashes, and however many
recoverers run at once.
"""

from __future__ import annotations

import gzip
import random
from typing import Any, Optional

from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.interfaces import StorageError
from loghandler.retry import RetryLayer, StorageFault
from loghandler.storage.memory import STALL, MemoryStore, StoredObject
from loghandler.storage.s3.layout import PROBE_PREFIX, lease_key, staging_key
from loghandler.storage.s3.lease import Lease
from loghandler.storage.s3.merge import Merger
from loghandler.storage.s3.recovery import Recoverer, RecoveryReport, RecoveryService
from loghandler.threads import synchronously
from tests.helpers import message, noise, read_lines

KEY = "chat/2020-03-30/content_logs_2020-03-30_3"
PART = 1024
LEASE_S = 10.0


def invalid(operation: str) -> StorageError:
    """A 400 answer: the retry layer raises it at once (INVALID), as a crash would stop."""
    return StorageError(operation, 400, "InvalidRequest", "injected")


class RecoveryCase(SynchronousTestCase):
    """A memory S3, a retry layer, a merger, our own lease ("me") held for 40 s."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.s3 = MemoryStore(min_part_size=PART, now=self.clock.seconds)
        self.retry = RetryLayer(
            self.clock, attempt_timeout=10.0, backoff=Backoff(1.0, 4.0, uniform=lambda a, b: b)
        )
        self.merger = self.make_merger()
        self.recoverer, self.lease = self.make_recoverer("me")
        self.advance(40)
        self.s3.calls.clear()

    def make_merger(self) -> Merger:
        return Merger(
            self.s3,
            self.retry,
            PART,
            MemoryBudget(1 << 40),
            synchronously,
            conflict_backoff=Backoff(0.5, 2.0),
        )

    def make_lease(self, writer_id: str) -> Lease:
        """A started lease; stopped at cleanup."""
        lease = Lease(self.s3, self.retry, self.clock, writer_id, LEASE_S, lambda: None)
        lease.start()
        self.addCleanup(lease.stop)
        return lease

    def make_recoverer(self, writer_id: str, **kwargs: Any) -> tuple[Recoverer, Lease]:
        lease = self.make_lease(writer_id)
        recoverer = Recoverer(
            self.s3,
            self.retry,
            self.make_merger(),
            lease,
            writer_id,
            LEASE_S,
            DeferredSemaphore(2),
            **kwargs,
        )
        return recoverer, lease

    def advance(self, seconds: float, step: float = 0.5) -> None:
        target = self.clock.seconds() + seconds
        while self.clock.seconds() + step <= target + 1e-9:
            self.clock.advance(step)

    def run_until(self, d: "Deferred[Any]", seconds: float = 300.0) -> Any:
        """Advance the clock in small steps until ``d`` fired; its result."""
        while not d.called and seconds > 0:
            self.clock.advance(0.1)
            seconds -= 0.1
        return self.successResultOf(d)

    def recover(self, recoverer: Optional[Recoverer] = None) -> RecoveryReport:
        """One pass, run to its end."""
        d = ensureDeferred((recoverer or self.recoverer).recover_once())
        report: RecoveryReport = self.run_until(d)
        return report

    def create_upload(self, staging: str, writes: tuple[str, ...]) -> str:
        upload_id: str = self.successResultOf(self.s3.create_upload(staging, writes))
        return upload_id

    def upload_part(self, staging: str, upload_id: str, number: int, lines: list[bytes]) -> None:
        self.successResultOf(
            self.s3.upload_part(staging, upload_id, number, gzip.compress(b"".join(lines)))
        )

    def stage_dead(
        self,
        writer: str = "dead",
        key: str = KEY,
        sequence: int = 1,
        write_id: str = "w-1",
        first: int = 0,
    ) -> tuple[str, list[bytes]]:
        """
        A dead writer's staging upload: final segment parts (each >= PART) at 1 and
        11, checkpoints of the last segment at 21 and 22 (22 holds more lines).
        Returns the staging key and the lines a recovery must store: 1, 11, 22.
        """
        staging = staging_key(writer, key, sequence)
        upload_id = self.create_upload(staging, (write_id,))
        one, eleven, tail = noise(first, 20), noise(first + 20, 20), noise(first + 40, 10)
        self.upload_part(staging, upload_id, 1, one)
        self.upload_part(staging, upload_id, 11, eleven)
        self.upload_part(staging, upload_id, 21, tail[:4])
        self.upload_part(staging, upload_id, 22, tail)
        self.assertGreaterEqual(len(gzip.compress(b"".join(one))), PART)
        return staging, one + eleven + tail

    def stale_lease(self, writer: str, age: float) -> None:
        """A lease of ``writer`` last written ``age`` seconds ago by the store's clock."""
        self.s3.objects[lease_key(writer)] = StoredObject(
            b"{}", '"stale"', (), self.clock.seconds() - age
        )

    def stored(self, key: str = KEY) -> list[bytes]:
        return read_lines(self.s3.body(key))

    def leftovers(self) -> tuple[list[str], list[str]]:
        """Keys under _loghandler/ but live leases, and uploads still open."""
        live = {lease_key("me"), lease_key("r1"), lease_key("r2"), lease_key("live")}
        return (
            sorted(k for k in self.s3.objects if k.startswith("_loghandler/") and k not in live),
            sorted(u.key for u in self.s3.uploads.values()),
        )


class PassTests(RecoveryCase):
    """One pass over hand-built staged states."""

    def test_recovers_newest_part_per_segment(self) -> None:
        """
        A dead writer (no lease): one pass completes its staging upload with parts 1,
        11 and 22, merges it into KEY (exactly those lines), deletes the staging
        object, and logs one info line.
        """
        staging, lines = self.stage_dead()
        self.s3.calls.clear()
        with capturedLogs() as events:
            report = self.recover()
        self.assertEqual(self.stored(), lines)
        self.assertEqual(self.leftovers(), ([], []))
        self.assertEqual(
            (report.writers, report.uploads_completed, report.objects_merged, report.skipped),
            (["dead"], 1, 1, None),
        )
        self.assertEqual(self.s3.objects[KEY].writes, ("w-1",))
        staging_calls = [op for op, key in self.s3.calls if key == staging]
        self.assertEqual(
            staging_calls,
            ["ListParts", "CompleteMultipartUpload", "HeadObject", "DeleteObject"],
        )
        summary = [e for e in events if e.get("log_namespace", "").endswith("Recoverer")]
        self.assertEqual(len(summary), 1)
        self.assertEqual(summary[0]["writers"], "dead")
        self.assertEqual(summary[0]["uploads_completed"], 1)

    def test_stale_lease_is_recovered(self) -> None:
        """
        A writer whose lease is over 3 x lease_s old: its lease is claimed first
        (replaced by an empty body If-Match the ETag listed), and deleted once all
        it staged is merged.
        """
        self.stale_lease("dead", 3 * LEASE_S + 15)
        stale_etag = self.s3.objects[lease_key("dead")].etag
        staging, lines = self.stage_dead()
        puts: list[tuple[bytes, object]] = []
        put = self.s3.put

        def recording(key: str, body: bytes, *args: Any, **kwargs: Any) -> Any:
            if key == lease_key("dead"):
                puts.append((body, kwargs.get("if_match")))
            return put(key, body, *args, **kwargs)

        self.s3.put = recording  # type: ignore[method-assign]
        report = self.recover()
        self.assertEqual(report.writers, ["dead"])
        self.assertEqual(self.stored(), lines)
        self.assertEqual(self.leftovers(), ([], []))
        self.assertEqual(puts, [(b"", stale_etag)])
        ops = [(op, key) for op, key in self.s3.calls]
        claim = ops.index(("PutObject", lease_key("dead")))
        self.assertLess(claim, ops.index(("ListParts", staging)))
        self.assertLess(
            ops.index(("ListParts", staging)), ops.index(("DeleteObject", lease_key("dead")))
        )

    def test_claim_fails_on_a_renewed_lease(self) -> None:
        """
        The writer renews its lease between the listing and the claim: the claim
        (If-Match the stale ETag) gets 412, and its data are left to it.
        """
        self.stale_lease("dead", 3 * LEASE_S + 15)
        self.stage_dead()

        def renew() -> None:
            # Just before the claim: the writer is back and renews.
            self.s3.store(lease_key("dead"), b'{"writer_id": "dead"}')

        self.s3.before("PutObject", renew)
        report = self.recover()
        self.assertEqual(report.writers, [])
        self.assertEqual(self.s3.objects[lease_key("dead")].body, b'{"writer_id": "dead"}')
        self.assertTrue(self.s3.uploads)
        self.assertNotIn(KEY, self.s3.objects)

    def test_live_writer_untouched(self) -> None:
        """A writer with a fresh lease: nothing of its data is touched."""
        self.make_lease("live")
        self.advance(LEASE_S)
        staging, _ = self.stage_dead("live")
        before = dict(self.s3.uploads)
        self.s3.calls.clear()
        report = self.recover()
        self.assertFalse(report.did_something)
        self.assertEqual(self.s3.uploads, before)
        self.assertFalse([c for c in self.s3.calls if c[1] == staging])
        self.assertNotIn(KEY, self.s3.objects)

    def test_lease_just_under_the_limit(self) -> None:
        """A lease exactly 3 x lease_s old (by our lease's LastModified) is not gone."""
        self.stale_lease("slow", 0)
        self.s3.objects[lease_key("slow")].last_modified = (
            self.s3.objects[lease_key("me")].last_modified - 3 * LEASE_S
        )
        self.stage_dead("slow")
        report = self.recover()
        self.assertEqual(report.writers, [])
        self.assertNotIn(KEY, self.s3.objects)

    def test_skips_itself(self) -> None:
        """The recoverer never takes its own staged data."""
        self.stage_dead("me")
        report = self.recover()
        self.assertEqual(report.writers, [])
        self.assertEqual(len(self.s3.uploads), 1)

    def test_skipped_while_lease_not_healthy(self) -> None:
        """Under 3 x lease_s of healthy lease: the pass lists nothing and says why."""
        recoverer, lease = self.make_recoverer("new")
        self.advance(3 * LEASE_S - 1)
        self.stage_dead()
        self.s3.calls.clear()
        report = self.recover(recoverer)
        self.assertIsNotNone(report.skipped)
        self.assertFalse([c for c in self.s3.calls if c[0] != "PutObject"])
        self.advance(1)
        self.assertEqual(self.recover(recoverer).writers, ["dead"])

    def test_empty_upload_aborted(self) -> None:
        """A staging upload without parts is aborted; nothing is written to the key."""
        self.create_upload(staging_key("dead", KEY, 1), ("w-1",))
        report = self.recover()
        self.assertEqual((report.uploads_aborted, report.objects_merged), (1, 0))
        self.assertEqual(self.leftovers(), ([], []))
        self.assertNotIn(KEY, self.s3.objects)

    def test_object_already_merged_is_deleted(self) -> None:
        """A staging object whose write ID KEY lists already is deleted, not merged again."""
        lines = [message(n).to_line() for n in range(5)]
        self.s3.store(KEY, gzip.compress(b"".join(lines)), ["w-0", "w-1"])
        staging = staging_key("dead", KEY, 1)
        self.s3.store(staging, gzip.compress(b"".join(lines[2:])), ["w-1"])
        etag = self.s3.objects[KEY].etag
        report = self.recover()
        self.assertEqual(report.objects_merged, 1)
        self.assertEqual(self.s3.objects[KEY].etag, etag)
        self.assertEqual(self.stored(), lines)
        self.assertEqual(self.leftovers(), ([], []))
        key_writes = [op for op, key in self.s3.calls if key == KEY and op != "HeadObject"]
        self.assertEqual(key_writes, [])

    def test_object_then_uploads_in_order(self) -> None:
        """
        A staging object and two staging uploads on one staging key, plus a second
        stream of the key: the staging object, then the uploads oldest first, one
        per pass (a late DeleteObject of another recoverer's merge of the previous
        object must not hit the next), then the next stream: each line once, in
        order, in three passes.
        """
        staging = staging_key("dead", KEY, 1)
        early = [message(n).to_line() for n in range(3)]
        self.s3.store(staging, gzip.compress(b"".join(early)), ["w-0"])
        _, first = self.stage_dead(write_id="w-1", first=100)
        self.clock.advance(1)
        upload_id = self.create_upload(staging, ("w-2",))
        later = noise(200, 5)
        self.upload_part(staging, upload_id, 1, later)
        _, second = self.stage_dead(sequence=2, write_id="w-3", first=300)
        reports = [self.recover() for _ in range(4)]
        self.assertEqual(self.stored(), early + first + later + second)
        self.assertEqual(
            [(r.uploads_completed, r.objects_merged) for r in reports],
            [(0, 1), (1, 1), (2, 2), (0, 0)],
        )
        self.assertEqual(self.leftovers(), ([], []))

    def test_several_writers_and_keys(self) -> None:
        """Two dead writers, two keys each: every line once."""
        other = KEY[:-1] + "4"
        expected: dict[str, list[bytes]] = {KEY: [], other: []}
        for n, writer in enumerate(["dead-a", "dead-b"]):
            for m, key in enumerate([KEY, other]):
                _, lines = self.stage_dead(
                    writer, key, write_id=f"w-{n}-{m}", first=1000 * (2 * n + m)
                )
                expected[key] += lines
        report = self.recover()
        self.assertEqual(sorted(report.writers), ["dead-a", "dead-b"])
        for key, lines in expected.items():
            self.assertEqual(sorted(self.stored(key)), sorted(lines))
        self.assertEqual(self.leftovers(), ([], []))

    def test_entity_too_small_left_and_logged(self) -> None:
        """
        An upload S3 refuses to complete (a segment's chosen part under the part
        size): an error naming the key, upload and parts; left; no loop.
        """
        staging = staging_key("dead", KEY, 1)
        upload_id = self.create_upload(staging, ("w-1",))
        self.upload_part(staging, upload_id, 1, [b"short\n"])
        self.upload_part(staging, upload_id, 11, [b"tail\n"])
        with capturedLogs() as events:
            report = self.recover()
        self.assertEqual(report.problems, 1)
        errors = [e for e in events if e["log_level"] is LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual((errors[0]["staging"], errors[0]["upload_id"]), (staging, upload_id))
        self.assertIn("1:", errors[0]["parts"])
        self.assertIn(upload_id, self.s3.uploads)
        self.assertEqual(self.s3.calls.count(("CompleteMultipartUpload", staging)), 1)

    def test_unparseable_staging_key_ignored_once(self) -> None:
        """A key under the staging prefix that is no staging key: warned about once."""
        self.s3.store("_loghandler/staging/x", b"junk")
        with capturedLogs() as events:
            self.recover()
            self.recover()
        warnings = [e for e in events if "not a staging key" in e["log_format"]]
        self.assertEqual(len(warnings), 1)
        self.assertIn("_loghandler/staging/x", self.s3.objects)

    def test_empty_pass_logs_nothing(self) -> None:
        """A pass that finds nothing to do logs nothing."""
        with capturedLogs() as events:
            report = self.recover()
        self.assertFalse(report.did_something)
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.info], [])


class FenceTests(RecoveryCase):
    """Who is judged gone, and what a writer judged gone finds."""

    def test_writer_starting_during_pass_not_gone(self) -> None:
        """
        A writer that writes its lease and stages just before the pass lists the
        staging area is not judged gone (the leases are listed after the staging
        area, and again before a claim).
        """

        def start_writer() -> None:
            self.s3.store(lease_key("new"), b"{}")
            self.stage_dead("new")

        self.s3.before("ListMultipartUploads", start_writer)
        report = self.recover()
        self.assertEqual(report.writers, [])
        self.assertIn(lease_key("new"), self.s3.objects)
        self.assertEqual(len(self.s3.uploads), 1)

    def test_writer_back_before_claim_is_left(self) -> None:
        """A writer whose lease is renewed between the listing and the claim is left."""
        self.stale_lease("slow", 100)
        self.stage_dead("slow")

        def renew() -> None:
            self.s3.store(lease_key("slow"), b"{}")

        # ListObjectsV2 calls: staging objects, leases, then the claim's leases.
        self.s3.before(
            "ListObjectsV2",
            lambda: self.s3.before(
                "ListObjectsV2", lambda: self.s3.before("ListObjectsV2", renew)
            ),
        )
        report = self.recover()
        self.assertEqual(report.writers, [])
        self.assertIn(lease_key("slow"), self.s3.objects)
        self.assertEqual(len(self.s3.uploads), 1)

    def test_writer_judged_gone_is_taken_over(self) -> None:
        """
        A writer that froze (its clock stopped) for over 3 x lease_s: recovery
        deletes its lease and merges its data; when it runs again its renewal finds
        the lease gone, it is taken over, and held() fails.
        """
        frozen = Clock()
        frozen.advance(self.clock.seconds())
        taken: list[None] = []
        lease = Lease(
            self.s3, RetryLayer(frozen), frozen, "frozen", LEASE_S, lambda: taken.append(None)
        )
        lease.start()
        self.addCleanup(lease.stop)
        _, lines = self.stage_dead("frozen")
        self.advance(3 * LEASE_S + 15)
        report = self.recover()
        self.assertEqual(report.writers, ["frozen"])
        self.assertEqual(self.stored(), lines)
        frozen.advance(LEASE_S)
        self.assertEqual(taken, [None])
        self.assertTrue(lease.lost)
        self.assertNotIn(lease_key("frozen"), self.s3.objects)

    def test_merge_holds_a_slot(self) -> None:
        """A merge waits for a free merge slot."""
        slots = DeferredSemaphore(1)
        recoverer = Recoverer(
            self.s3, self.retry, self.merger, self.lease, "me", LEASE_S, slots
        )
        self.successResultOf(slots.acquire())
        _, lines = self.stage_dead()
        d = ensureDeferred(recoverer.recover_once())
        self.assertNoResult(d)
        self.assertNotIn(("HeadObject", KEY), self.s3.calls)
        slots.release()
        self.run_until(d)
        self.assertEqual(self.stored(), lines)


class SweepTests(RecoveryCase):
    """What the sweep removes and what it leaves."""

    def test_stale_merge_uploads_aborted(self) -> None:
        """Merge uploads under chat/ initiated over the limit ago are aborted; fresh ones kept."""
        recoverer, _ = self.make_recoverer("r1", stale_merge_upload_s=100.0)
        self.create_upload(KEY, ("m-1",))
        self.advance(50)
        fresh = self.create_upload(KEY + ".1", ("m-2",))
        self.advance(60)
        report = self.recover(recoverer)
        self.assertEqual(report.uploads_aborted, 1)
        self.assertEqual(list(self.s3.uploads), [fresh])

    def test_gone_writers_probes_and_leases_deleted(self) -> None:
        """
        Probes and leases of gone writers go; a live writer's probe and lease, and a
        gone writer's probe younger than 3 x lease_s, stay.
        """
        self.make_lease("live")
        self.s3.store(PROBE_PREFIX + "live", b"probe")
        self.s3.store(PROBE_PREFIX + "dead", b"probe")
        self.create_upload(PROBE_PREFIX + "dead", ())
        self.stale_lease("dead", 100)
        self.advance(3 * LEASE_S + 15)
        self.s3.store(PROBE_PREFIX + "starting", b"probe")
        report = self.recover()
        self.assertEqual((report.garbage_deleted, report.uploads_aborted), (2, 1))
        self.assertEqual(
            sorted(k for k in self.s3.objects if k.startswith("_loghandler/")),
            sorted(
                [
                    lease_key("live"),
                    lease_key("me"),
                    PROBE_PREFIX + "live",
                    PROBE_PREFIX + "starting",
                ]
            ),
        )
        self.assertEqual(self.s3.uploads, {})


class CrashTests(RecoveryCase):
    """A pass stopped at any step; the next passes finish, each line once."""

    OPERATIONS = [
        "ListMultipartUploads",
        "ListObjectsV2",
        "DeleteObject",
        "ListParts",
        "CompleteMultipartUpload",
        "HeadObject",
        "CreateMultipartUpload",
        "UploadPartCopy",
        "UploadPart",
        "GetObject",
        "AbortMultipartUpload",
    ]

    def stage(self) -> list[bytes]:
        """A stale lease, a multipart staging upload, a small staging object."""
        self.stale_lease("dead", 100)
        _, lines = self.stage_dead()
        small = [message(n).to_line() for n in range(3)]
        self.s3.store(staging_key("dead", KEY, 2), gzip.compress(b"".join(small)), ["w-2"])
        return lines + small

    def test_crash_at_every_call(self) -> None:
        """
        For every call of every operation a clean pass makes: that call fails as a
        crash would stop the pass there; the next passes store each line once and
        leave nothing under _loghandler/ but live leases.
        """
        lines = self.stage()
        self.recover()
        self.assertEqual(self.stored(), lines)
        clean = list(self.s3.calls)
        tried = 0
        for operation in self.OPERATIONS:
            for index in range(sum(1 for op, _ in clean if op == operation)):
                with self.subTest(operation=operation, index=index):
                    self.setUp()
                    lines = self.stage()
                    self.s3.fail(operation, invalid(operation), after=index)
                    d = ensureDeferred(self.recoverer.recover_once())
                    self.run_until_called(d)
                    self.recover()
                    self.recover()
                    # Each line once; a crash may change the order of two streams.
                    where = f"{operation} call {index}"
                    self.assertEqual(sorted(self.stored()), sorted(lines), where)
                    self.assertEqual(self.leftovers(), ([], []), where)
                    tried += 1
        self.assertGreater(tried, 20)

    def run_until_called(self, d: "Deferred[Any]") -> None:
        """Advance until ``d`` fired; a failure is consumed."""
        while not d.called:
            self.clock.advance(0.1)
        d.addErrback(lambda f: None)

    def test_cancelled_mid_merge(self) -> None:
        """A pass cancelled while a merge copy stalls; the copy lands late; once."""
        lines = self.stage()
        self.s3.hold("UploadPartCopy")
        d = ensureDeferred(self.recoverer.recover_once())
        self.assertTrue(self.s3.held)
        d.cancel()
        self.failureResultOf(d)
        self.s3.release()
        self.recover()
        self.assertEqual(self.stored(), lines)
        self.assertEqual(self.leftovers(), ([], []))


class ConcurrencyTests(RecoveryCase):
    """Several recoverers at once: each line once."""

    def two(self) -> tuple[Recoverer, Recoverer]:
        r1, _ = self.make_recoverer("r1")
        r2, _ = self.make_recoverer("r2")
        self.advance(3 * LEASE_S + 5)
        return r1, r2

    def test_two_recoverers_interleaved(self) -> None:
        """
        Both complete the same staging upload (one gets NoSuchUpload), both merge the
        staging object (one Complete gets 412, then finds its write ID): once.
        """
        r1, r2 = self.two()
        _, lines = self.stage_dead()
        self.s3.hold("CompleteMultipartUpload")
        d1 = ensureDeferred(r1.recover_once())
        d2 = ensureDeferred(r2.recover_once())
        self.assertEqual(len(self.s3.held), 2)
        self.s3.release(1)
        self.s3.release(1)
        self.assertEqual([h.operation for h in self.s3.held], ["CompleteMultipartUpload"] * 2)
        self.s3.release()
        self.run_until(d1)
        self.run_until(d2)
        self.assertEqual(self.stored(), lines)
        self.assertEqual(self.leftovers(), ([], []))

    def test_random_interleavings(self) -> None:
        """
        Two recoverers, three dead streams, the first with a second staging upload
        on its staging key (as a writer that replaced an upload aborted under it
        leaves); calls stall at random and land in random order (stalled calls
        time out and are retried meanwhile); then passes until nothing is left:
        every line once.  (Before uploads of one staging key were completed one per
        pass, some seeds lost the second upload to a late DeleteObject.)
        """
        for seed in range(40):
            self.setUp()
            r1, r2 = self.two()
            expected: list[bytes] = []
            for sequence in (1, 2, 3):
                _, lines = self.stage_dead(
                    sequence=sequence, write_id=f"w-{sequence}", first=100 * sequence
                )
                expected += lines
            self.clock.advance(1)
            staging = staging_key("dead", KEY, 1)
            upload_id = self.create_upload(staging, ("w-1b",))
            extra = noise(1000, 30)
            self.upload_part(staging, upload_id, 1, extra)
            expected += extra
            rng = random.Random(seed)
            self.s3.chaos = lambda op: (
                STALL if op != "PutObject" and rng.random() < 0.3 else None
            )
            d1 = ensureDeferred(r1.recover_once())
            d2 = ensureDeferred(r2.recover_once())
            steps = 0
            while not (d1.called and d2.called) and steps < 20000:
                steps += 1
                if self.s3.held and rng.random() < 0.5:
                    self.s3.held.insert(0, self.s3.held.pop(rng.randrange(len(self.s3.held))))
                    self.s3.release(1)
                else:
                    self.clock.advance(0.5)
            self.assertTrue(d1.called and d2.called, f"seed {seed}")
            self.s3.chaos = None
            self.s3.release()
            for d in (d1, d2):
                d.addErrback(lambda f: None)
            for _ in range(3):
                self.recover()
            self.assertEqual(sorted(self.stored()), sorted(expected), f"seed {seed}")
            self.assertEqual(self.leftovers(), ([], []), f"seed {seed}")


class ServiceTests(RecoveryCase):
    """RecoveryService: timing, one pass at a time, failures, stop."""

    def service(self) -> RecoveryService:
        service = RecoveryService(self.recoverer, 30.0, self.clock)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def passes(self) -> int:
        return self.s3.calls.count(("ListMultipartUploads", "_loghandler/staging/"))

    def test_runs_at_start_and_every_interval(self) -> None:
        """A pass at start, then every 30 s."""
        self.service()
        self.assertEqual(self.passes(), 1)
        self.advance(29.5)
        self.assertEqual(self.passes(), 1)
        self.advance(30.5)
        self.assertEqual(self.passes(), 3)

    def test_one_pass_at_a_time(self) -> None:
        """A pass that stalls delays the next one; no second pass starts meanwhile."""
        self.stage_dead()
        self.s3.hold("ListParts")
        self.service()
        self.advance(100)
        self.assertEqual(self.passes(), 1)
        self.s3.release()
        self.advance(20)
        self.assertGreaterEqual(self.passes(), 2)
        self.assertIn(KEY, self.s3.objects)

    def test_failure_logged_and_next_pass_runs(self) -> None:
        """A pass that fails is logged; the next one runs and recovers."""
        _, lines = self.stage_dead()
        self.s3.fail("ListMultipartUploads", invalid("ListMultipartUploads"))
        with capturedLogs() as events:
            service = self.service()
        self.assertTrue([e for e in events if e.get("log_failure") is not None])
        self.assertEqual(len(self.flushLoggedErrors(StorageFault)), 1)
        self.assertTrue(service.running)
        self.advance(30)
        self.assertEqual(self.stored(), lines)
        self.assertEqual(service.last_report and service.last_report.writers, ["dead"])

    def test_stop_cancels_pass_in_flight(self) -> None:
        """stopService cancels a stalled pass and fires; no pass runs after."""
        self.stage_dead()
        self.s3.hold("ListParts")
        service = self.service()
        d = service.stopService()
        self.successResultOf(d)
        self.s3.release()
        calls = len(self.s3.calls)
        self.advance(100)
        self.assertEqual(
            [c for c in self.s3.calls[calls:] if c[0] != "PutObject"], []
        )

    def test_early_pass_and_timer_never_overlap(self) -> None:
        """
        The early pass (run as soon as our own lease is healthy) is still in flight
        when the timer's next tick comes: the tick waits for it, and no second pass
        runs alongside (under load, a new instance's early pass outlasted
        ``RECOVERY_INTERVAL_S`` and a second pass merged the same staging objects
        at the same time, answered conflict and found them merged).
        """
        _, lines = self.stage_dead()
        recoverer, lease = self.make_recoverer("new")
        interval = 3 * LEASE_S / 2.5  # ticks at 0, 12, 24 (skipped), 36
        service = RecoveryService(recoverer, interval, self.clock)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        self.advance(2 * interval + 0.5)  # the tick at 24 s plans the early pass at 30 s
        self.s3.hold("ListParts")
        self.advance(3 * interval)  # the early pass at 30 s stalls; ticks at 36, 48, 60
        self.assertEqual(self.passes(), 1)
        self.s3.release()
        self.advance(2 * interval)
        self.assertEqual(self.stored(), lines)
        self.assertEqual(service.last_report and service.last_report.writers, [])
        self.assertGreaterEqual(self.passes(), 2)  # the timer goes on after it

    def test_pass_as_soon_as_own_lease_is_healthy(self) -> None:
        """
        A new instance's first pass is skipped (its lease is not held for 3 x
        LEASE_S yet); the next runs as soon as it is, not a whole interval later.
        """
        _, lines = self.stage_dead()
        recoverer, lease = self.make_recoverer("new")
        service = RecoveryService(recoverer, 120.0, self.clock)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        assert service.last_report is not None
        self.assertIsNotNone(service.last_report.skipped)
        self.advance(3 * LEASE_S + 1)
        self.assertEqual(self.stored(), lines)
        self.assertEqual(service.last_report.writers, ["dead"])
