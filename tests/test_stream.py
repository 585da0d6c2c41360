"""
Tests for :mod:`loghandler.stream` and :mod:`loghandler.append`: one object's stream
on a ``task.Clock`` against the in-memory store, checking the bytes that land.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from loghandler.append import ROLLOVER_BYTES
from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.config import MiB
from loghandler.gzipframe import GzipPartEncoder
from loghandler.interfaces import ObjectInfo, StorageError
from loghandler.storage.memory import MemoryStore
from loghandler.stream import ObjectStream, StreamClosed
from tests.helpers import members, message, noise_line, read_lines

KEY = "chat/2020-03-30/content_logs_2020-03-30_3"
PART = 16 * 1024


@implementer(IPushProducer)
class RecordingProducer:
    """Records pause/resume calls."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def gzip_of(data: bytes) -> bytes:
    """Whole gzip member(s) holding ``data`` (a pre-existing object)."""
    encoder = GzipPartEncoder(1 << 30)
    encoder.write(data)
    return encoder.finish()


class StreamCase(SynchronousTestCase):
    """Builds a stream over a memory store whose part minimum is the stream's part size."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(min_part_size=PART, now=self.clock.seconds)
        self.budget = MemoryBudget(1 << 40)

    def stream(self, key: str = KEY, in_flight: int = 2) -> ObjectStream:
        return ObjectStream(
            key,
            self.store,
            self.clock,
            PART,
            in_flight,
            DeferredSemaphore(8),
            self.budget,
            backoff=Backoff(base=1.0, cap=8.0, uniform=lambda low, high: high),
        )

    def finish(self, stream: ObjectStream) -> None:
        """Close the stream and check that its completion fired."""
        done = stream.close()
        self.assertIsNone(self.successResultOf(done))

    def operations(self) -> list[str]:
        return [operation for operation, _ in self.store.calls]


class SmallObjectTests(StreamCase):
    """A stream whose data fit in one tail: PutObject, never multipart."""

    def test_new_key_put_if_none_match(self) -> None:
        """A new key is written with one PutObject and holds exactly the lines."""
        stream = self.stream()
        lines = [message(n).to_line() for n in range(1, 101)]
        for line in lines:
            stream.write(line)
        self.assertEqual(self.store.calls, [])
        self.finish(stream)
        self.assertEqual(self.operations(), ["HeadObject", "PutObject"])
        self.assertEqual(read_lines(self.store.body(KEY)), lines)
        self.assertEqual(self.budget.held, 0)

    def test_write_after_close_refused(self) -> None:
        """A closing stream refuses lines instead of dropping them silently."""
        stream = self.stream()
        stream.write(message(1).to_line())
        stream.close()
        self.assertRaises(StreamClosed, stream.write, message(2).to_line())

    def test_append_to_small_object(self) -> None:
        """An existing object under 5 MiB is read and rewritten with If-Match, base first."""
        base = [message(n).to_line() for n in range(1, 4)]
        self.successResultOf(self.store.put(KEY, gzip_of(b"".join(base))))
        stream = self.stream()
        new = [message(n).to_line() for n in range(4, 8)]
        for line in new:
            stream.write(line)
        self.finish(stream)
        self.assertEqual(self.operations()[-3:], ["HeadObject", "GetObject", "PutObject"])
        self.assertEqual(read_lines(self.store.body(KEY)), base + new)
        self.assertEqual(len(members(self.store.body(KEY))), 2)

    def test_append_to_large_object_copies_part_one(self) -> None:
        """An existing object of 5 MiB or more is copied in as part 1, then the tail."""
        base = noise_line(0, 12 * MiB)
        self.successResultOf(self.store.put(KEY, gzip_of(base)))
        self.assertGreaterEqual(len(self.store.body(KEY)), 5 * MiB)
        stream = self.stream()
        stream.write(message(1).to_line())
        self.finish(stream)
        self.assertEqual(
            self.operations()[-5:],
            [
                "HeadObject",
                "CreateMultipartUpload",
                "UploadPartCopy",
                "UploadPart",
                "CompleteMultipartUpload",
            ],
        )
        self.assertEqual(read_lines(self.store.body(KEY)), [base, message(1).to_line()])

    def test_conflict_on_put_starts_again(self) -> None:
        """
        Another writer creating the key between HEAD and PutObject gets 412; the stream
        starts again and appends after that writer's data.
        """
        other = message(99).to_line()
        self.store.before(
            "PutObject", lambda: self.store.objects.update({KEY: (gzip_of(other), '"other"')})
        )
        stream = self.stream()
        stream.write(message(1).to_line())
        with capturedLogs() as events:
            self.finish(stream)
        self.assertEqual(read_lines(self.store.body(KEY)), [other, message(1).to_line()])
        self.assertEqual(
            self.operations(),
            ["HeadObject", "PutObject", "HeadObject", "GetObject", "PutObject"],
        )
        self.assertTrue(
            any("another writer" in e.get("log_format", "") for e in events), events
        )

    def test_lost_answer_to_put_not_appended_twice(self) -> None:
        """
        A PutObject that landed but whose answer was lost is retried; HEAD shows the
        stream's own write ID, so the lines are stored once, not appended again.
        """
        self.store.lose_answer("PutObject")
        stream = self.stream()
        stream.write(message(1).to_line())
        done = stream.close()
        self.assertNoResult(done)
        self.clock.advance(1.0)
        self.successResultOf(done)
        self.assertEqual(read_lines(self.store.body(KEY)), [message(1).to_line()])
        self.assertEqual(
            self.operations(), ["HeadObject", "PutObject", "HeadObject"]
        )

    def test_lost_answer_to_append_not_appended_twice(self) -> None:
        """The same when the lost answer is a GetObject-and-rewrite append's PutObject."""
        base = message(0).to_line()
        self.successResultOf(self.store.put(KEY, gzip_of(base)))
        self.store.lose_answer("PutObject")
        stream = self.stream()
        stream.write(message(1).to_line())
        stream.close()
        self.clock.advance(1.0)
        self.assertEqual(read_lines(self.store.body(KEY)), [base, message(1).to_line()])

    def test_rollover_past_limit(self) -> None:
        """A key whose object is over the rollover size is continued as ``{key}.1``."""
        real_head = self.store.head

        def head(key: str) -> Deferred[Optional[ObjectInfo]]:
            if key == KEY:
                return Deferred.fromCoroutine(_value(ObjectInfo(ROLLOVER_BYTES + 1, '"big"')))
            return real_head(key)

        self.store.head = head  # type: ignore[method-assign]
        stream = self.stream()
        stream.write(message(1).to_line())
        self.finish(stream)
        self.assertEqual(read_lines(self.store.body(KEY + ".1")), [message(1).to_line()])
        self.assertNotIn(KEY, self.store.objects)


async def _value(value: object) -> object:
    return value


class MultipartTests(StreamCase):
    """A stream that fills parts: multipart upload, part numbers from 2, bounded in flight."""

    def test_parts_then_tail(self) -> None:
        """
        Parts go up as soon as they are full (numbered from 2, each at least the part
        size and whole gzip members); completion adds the tail as the last part.
        """
        stream = self.stream()
        lines = [noise_line(n) for n in range(600)]
        for line in lines:
            stream.write(line)
        uploads = [c for c in self.store.calls if c[0] == "UploadPart"]
        self.assertGreaterEqual(len(uploads), 3)
        (upload,) = self.store.uploads.values()
        numbers = sorted(upload.parts)
        self.assertEqual(numbers, list(range(2, 2 + len(numbers))))
        for body, _ in upload.parts.values():
            self.assertGreaterEqual(len(body), PART)
            members(body)
        self.finish(stream)
        self.assertEqual(read_lines(self.store.body(KEY)), lines)
        self.assertEqual(self.store.uploads, {})
        self.assertEqual(self.budget.held, 0)

    def test_parts_in_flight_bounded_and_backpressure(self) -> None:
        """
        With uploads held, only ``parts_in_flight`` parts are sent; the rest wait and
        the producer is paused until the queue drains.
        """
        producer = RecordingProducer()
        stream = self.stream(in_flight=2)
        stream.registerProducer(producer, True)
        self.store.hold("UploadPart")
        lines = [noise_line(n) for n in range(600)]
        for line in lines:
            stream.write(line)
        self.assertEqual(len(self.store.held), 2)
        self.assertTrue(stream.paused)
        self.assertEqual(producer.events, ["pause"])
        held_before = self.budget.held
        self.store.release()
        self.assertFalse(stream.paused)
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertLess(self.budget.held, held_before)
        self.finish(stream)
        self.assertEqual(read_lines(self.store.body(KEY)), lines)

    def test_failed_part_retried_with_backoff(self) -> None:
        """A part upload that fails is retried after the backoff delay, then lands."""
        self.store.fail("UploadPart", StorageError("UploadPart", 500, "InternalError"), times=2)
        stream = self.stream()
        lines: list[bytes] = []
        with capturedLogs() as events:
            while not self.store.calls:
                lines.append(noise_line(len(lines)))
                stream.write(lines[-1])
            self.assertEqual(self.operations().count("UploadPart"), 1)
            self.clock.advance(1.0)
            self.assertEqual(self.operations().count("UploadPart"), 2)
            self.clock.advance(2.0)
        self.assertEqual(self.operations().count("UploadPart"), 3)
        retries = [e for e in events if e.get("operation") == "UploadPart"]
        self.assertEqual([e["attempt"] for e in retries], [1, 2])
        self.finish(stream)
        self.assertEqual(read_lines(self.store.body(KEY)), lines)

    def test_append_multipart_to_small_object(self) -> None:
        """With parts uploaded and a small existing object, the last part is base + tail."""
        base = message(0).to_line()
        self.successResultOf(self.store.put(KEY, gzip_of(base)))
        stream = self.stream()
        lines = [noise_line(n) for n in range(300)]
        for line in lines:
            stream.write(line)
        self.finish(stream)
        stored = read_lines(self.store.body(KEY))
        at = stored.index(base)
        self.assertGreater(at, 0)
        self.assertEqual(stored[:at] + stored[at + 1 :], lines)

    def test_lost_answer_to_complete_not_appended_twice(self) -> None:
        """
        A CompleteMultipartUpload that landed but whose answer was lost: the retry
        finds the stream's write ID on the object and stops; no line is doubled.
        """
        base = message(0).to_line()
        self.successResultOf(self.store.put(KEY, gzip_of(base)))
        self.store.lose_answer("CompleteMultipartUpload")
        stream = self.stream()
        lines = [noise_line(n) for n in range(300)]
        for line in lines:
            stream.write(line)
        done = stream.close()
        self.clock.advance(1.0)
        self.successResultOf(done)
        stored = read_lines(self.store.body(KEY))
        self.assertEqual(sorted(stored), sorted(lines + [base]))
        self.assertEqual(self.operations().count("CompleteMultipartUpload"), 1)

    def test_conflict_on_complete_starts_again(self) -> None:
        """
        A 412 on CompleteMultipartUpload (another writer created the key) starts the
        protocol again; the result holds both writers' lines.
        """
        other = message(99).to_line()
        self.store.before(
            "CompleteMultipartUpload",
            lambda: self.store.objects.update({KEY: (gzip_of(other), '"other"')}),
        )
        stream = self.stream()
        lines = [noise_line(n) for n in range(300)]
        for line in lines:
            stream.write(line)
        self.finish(stream)
        self.assertEqual(sorted(read_lines(self.store.body(KEY))), sorted(lines + [other]))
        self.assertEqual(self.operations().count("CompleteMultipartUpload"), 2)

    def test_abandon_logs_what_was_lost(self) -> None:
        """Abandoning a completion (shutdown deadline) fires close() and logs the loss."""
        self.store.hold("PutObject")
        stream = self.stream()
        stream.write(message(1).to_line())
        done = stream.close()
        self.assertNoResult(done)
        with capturedLogs() as events:
            stream.abandon()
        self.successResultOf(done)
        lost = [e for e in events if "lost_bytes" in e]
        self.assertEqual(len(lost), 1)
        self.assertGreater(lost[0]["lost_bytes"], 0)
        self.assertEqual(lost[0]["lost_lines"], 1)
        self.assertEqual(lost[0]["reason"], " by the shutdown deadline")
        self.assertEqual(lost[0]["upload"], "no multipart upload was created")

    def test_abandon_during_connect_logs_what_was_lost(self) -> None:
        """
        A cancel that lands while the HTTP client connects fails with the client's
        ConnectingCancelledError, not CancelledError: the loss is reported all the
        same, with the lines not yet in uploaded parts, and no failure is logged.
        """
        from twisted.internet.error import ConnectingCancelledError

        def connecting(*args: object, **kwargs: object) -> Deferred[str]:
            return Deferred(lambda d: d.errback(ConnectingCancelledError(None)))

        stream = self.stream()
        lines = [noise_line(n) for n in range(300)]
        for line in lines:
            stream.write(line)
        (upload,) = self.store.uploads.values()
        in_parts = len(upload.parts)
        self.assertGreater(in_parts, 0)
        self.store.put = connecting  # type: ignore[method-assign]
        self.store.upload_part = connecting  # type: ignore[method-assign]
        done = stream.close()
        with capturedLogs() as events:
            stream.abandon()
        self.successResultOf(done)
        (lost,) = [e for e in events if "lost_lines" in e]
        self.assertGreater(lost["lost_lines"], 0)
        self.assertLess(lost["lost_lines"], len(lines))
        self.assertIn("keeps the %d parts uploaded" % in_parts, lost["upload"])
        self.assertFalse([e for e in events if e.get("log_failure")])
