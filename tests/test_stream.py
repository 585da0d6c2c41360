"""
Tests for :mod:`loghandler.stream`: one object's stream on a ``task.Clock`` driving a
writer the test controls, checking the bytes handed over, backpressure, the memory
budget and what is reported lost.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from loghandler.budget import MemoryBudget
from loghandler.gzipframe import COMPRESSOR_BYTES
from loghandler.interfaces import Abandoned, Finished, IObjectWriter, StorageError
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


@implementer(IObjectWriter)
class ControlledWriter:
    """
    An IObjectWriter whose calls wait until the test answers them: each ``part`` and
    ``finish`` appends (body, Deferred) to :attr:`pending`.
    """

    def __init__(self, key: str = KEY, checkpoints_are_parts: bool = False) -> None:
        self.key = key
        self.full = False
        self.checkpoints_are_parts = checkpoints_are_parts
        self.pending: list[tuple[str, bytes, Deferred[object]]] = []
        self.stored: list[bytes] = []
        self.checkpoints: list[bytes] = []
        self.abandoned = False

    def checkpoint(self, body: bytes) -> "Deferred[bool]":
        d: Deferred[object] = Deferred(lambda _: None)
        self.pending.append(("checkpoint", body, d))
        return d  # type: ignore[return-value]

    def part(self, body: bytes) -> "Deferred[None]":
        d: Deferred[object] = Deferred(lambda _: None)
        self.pending.append(("part", body, d))
        return d  # type: ignore[return-value]

    def finish(
        self, tail: bytes, on_staged: Optional[Callable[[], None]] = None
    ) -> "Deferred[Finished]":
        d: Deferred[object] = Deferred(lambda _: None)
        self.pending.append(("finish", tail, d))
        return d  # type: ignore[return-value]

    def abandon(self) -> None:
        self.abandoned = True
        for _, _, d in self.pending:
            if not d.called:
                d.errback(Abandoned(self.key))

    def answer(self, count: Optional[int] = None) -> None:
        """Store and answer the first ``count`` pending calls (all by default)."""
        ready = self.pending if count is None else self.pending[:count]
        self.pending = [] if count is None else self.pending[count:]
        for kind, body, d in ready:
            if kind == "checkpoint":
                self.checkpoints.append(body)
                d.callback(True)
                continue
            self.stored.append(body)
            d.callback(None if kind == "part" else Finished("merged", key=self.key))

    def kinds(self) -> list[str]:
        """The kinds of the pending calls, in order."""
        return [kind for kind, _, _ in self.pending]


class StreamCase(SynchronousTestCase):
    """A stream over a ControlledWriter."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.budget = MemoryBudget(1 << 40)
        self.writer = ControlledWriter()

    def stream(self, in_flight: int = 2) -> ObjectStream:
        return ObjectStream(self.writer, self.clock, PART, in_flight, self.budget)


class StreamTests(StreamCase):
    """Lines in, whole-member parts and a tail out."""

    def test_controlled_writer_is_a_writer(self) -> None:
        """The test double provides IObjectWriter, so the stream sees the real seam."""
        self.assertTrue(verifyObject(IObjectWriter, self.writer))

    def test_parts_then_tail(self) -> None:
        """
        Parts go to the writer as soon as they are full (each at least the part size
        and whole gzip members); close hands over the tail; the joined bytes are
        exactly the lines, and the budget returns to 0.
        """
        stream = self.stream(in_flight=100)
        lines = [noise_line(n) for n in range(600)]
        for line in lines:
            stream.write(line)
        parts = [body for kind, body, _ in self.writer.pending]
        self.assertGreaterEqual(len(parts), 3)
        for body in parts:
            self.assertGreaterEqual(len(body), PART)
            members(body)
        self.writer.answer()
        done = stream.close()
        self.writer.answer()
        self.successResultOf(done)
        self.assertEqual(read_lines(b"".join(self.writer.stored)), lines)
        self.assertEqual(self.budget.held, 0)
        self.assertEqual(stream.stored_bytes, len(b"".join(self.writer.stored)))

    def test_write_after_close_refused(self) -> None:
        """A line written after close raises StreamClosed."""
        stream = self.stream()
        stream.close()
        self.assertRaises(StreamClosed, stream.write, message(1).to_line())

    def test_finish_waits_for_parts(self) -> None:
        """The tail goes to the writer only after every part was stored."""
        stream = self.stream()
        for n in range(300):
            stream.write(noise_line(n))
        kinds = [kind for kind, _, _ in self.writer.pending]
        self.assertNotIn("finish", kinds)
        stream.close()
        self.assertNotIn("finish", [kind for kind, _, _ in self.writer.pending])
        while self.writer.pending and self.writer.pending[0][0] == "part":
            self.writer.answer(1)
        self.assertEqual([kind for kind, _, _ in self.writer.pending], ["finish"])

    def test_parts_in_flight_bounded_and_backpressure(self) -> None:
        """
        Only ``parts_in_flight`` parts are handed over at once; the rest wait and the
        producer is paused until the queue drains.
        """
        producer = RecordingProducer()
        stream = self.stream(in_flight=2)
        stream.registerProducer(producer, True)
        lines = [noise_line(n) for n in range(600)]
        for line in lines:
            stream.write(line)
        self.assertEqual(len(self.writer.pending), 2)
        self.assertTrue(stream.paused)
        self.assertEqual(producer.events, ["pause"])
        held_before = self.budget.held
        while self.writer.pending:
            self.writer.answer(1)
        self.assertFalse(stream.paused)
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertLess(self.budget.held, held_before)
        done = stream.close()
        self.writer.answer()
        self.successResultOf(done)
        self.assertEqual(read_lines(b"".join(self.writer.stored)), lines)

    def test_must_finish_follows_writer(self) -> None:
        """The stream must finish when its writer is full (10,000 parts, rollover)."""
        stream = self.stream()
        self.assertFalse(stream.must_finish)
        self.writer.full = True
        self.assertTrue(stream.must_finish)


class AbandonTests(StreamCase):
    """The shutdown deadline: what was not stored is reported, memory released."""

    def test_abandon_reports_lost_and_frees_budget(self) -> None:
        """
        Abandoning with parts in flight and the tail unstored fires close(), logs the
        lines and gzip bytes not stored, and returns the budget to 0.
        """
        stream = self.stream()
        lines = [noise_line(n) for n in range(300)]
        for line in lines:
            stream.write(line)
        self.writer.answer(1)
        stored_lines = len(read_lines(b"".join(self.writer.stored)))
        done = stream.close()
        with capturedLogs() as events:
            stream.abandon()
        self.successResultOf(done)
        (lost,) = [e for e in events if "lost_lines" in e]
        self.assertEqual(lost["lost_lines"], len(lines) - stored_lines)
        self.assertGreater(lost["lost_bytes"], 0)
        self.assertEqual(lost["reason"], " by the shutdown deadline")
        self.assertTrue(self.writer.abandoned)
        self.assertEqual(self.budget.held, 0)
        self.assertFalse([e for e in events if e.get("log_failure")])

    def test_staged_outcome_logged(self) -> None:
        """A finish that ends staged (not merged) is logged as such, nothing lost."""
        stream = self.stream()
        stream.write(message(1).to_line())
        done = stream.close()
        (_, _, d) = self.writer.pending[0]
        with capturedLogs() as events:
            d.callback(Finished("staged", staged_key="_loghandler/staging/w/k/1"))
        self.successResultOf(done)
        self.assertEqual(
            [e["staged_key"] for e in events if "staged_key" in e], ["_loghandler/staging/w/k/1"]
        )
        self.assertFalse([e for e in events if "lost_lines" in e])
        self.assertEqual(self.budget.held, 0)

    def test_failed_finish_reports_loss(self) -> None:
        """A finish that fails (not abandoned) logs the failure and the lines lost."""
        stream = self.stream()
        stream.write(message(1).to_line())
        done = stream.close()
        (_, _, d) = self.writer.pending[0]
        with capturedLogs() as events:
            d.errback(RuntimeError("boom"))
        self.successResultOf(done)
        self.assertEqual([e["lost_lines"] for e in events if "lost_lines" in e], [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.budget.held, 0)


class CheckpointTests(StreamCase):
    """Checkpoints: the part being filled, as it stands, without cutting the member."""

    def test_checkpoint_is_whole_and_object_unchanged(self) -> None:
        """
        Each checkpoint decompresses whole to every line since the last part; the
        parts and tail are byte for byte those of a stream without checkpoints.
        """
        lines = [noise_line(n) for n in range(700)]
        plain_writer = ControlledWriter()
        plain = ObjectStream(plain_writer, self.clock, PART, 100, MemoryBudget(1 << 40))
        stream = self.stream(in_flight=100)
        for n, line in enumerate(lines):
            plain.write(line)
            stream.write(line)
            if n % 37 == 0:
                taken = len(self.writer.checkpoints)
                stream.checkpoint()
                self.writer.answer()
                plain_writer.answer()
                stored = read_lines(b"".join(self.writer.stored))
                if len(self.writer.checkpoints) == taken:  # a part was just cut
                    self.assertEqual(stored, lines[: n + 1])
                    continue
                self.assertEqual(
                    stored + read_lines(self.writer.checkpoints[-1]), lines[: n + 1]
                )
        self.assertGreater(len(self.writer.checkpoints), 5)
        self.assertGreaterEqual(len(self.writer.stored), 3)
        for s_, w in ((stream, self.writer), (plain, plain_writer)):
            done = s_.close()
            w.answer()
            self.successResultOf(done)
        self.assertEqual(self.writer.stored, plain_writer.stored)
        self.assertEqual(read_lines(b"".join(self.writer.stored)), lines)
        self.assertEqual(self.budget.held, 0)

    def test_idle_stream_uploads_nothing(self) -> None:
        """No lines since the last checkpoint (or part): no checkpoint."""
        stream = self.stream()
        stream.checkpoint()
        self.assertEqual(self.writer.pending, [])
        stream.write(message(1).to_line())
        stream.checkpoint()
        self.writer.answer()
        stream.checkpoint()
        self.assertEqual(self.writer.pending, [])
        self.assertEqual(len(self.writer.checkpoints), 1)

    def test_budget_counts_checkpoint_copy(self) -> None:
        """The copy a checkpoint in flight holds is in the budget until it ends."""
        stream = self.stream()
        stream.write(message(1).to_line())
        before = self.budget.held
        stream.checkpoint()
        ((_, body, _),) = self.writer.pending
        self.assertEqual(self.budget.held, before + len(body))
        self.assertEqual(stream.unstaged_bytes, before + len(body))
        self.writer.answer()
        self.assertEqual(self.budget.held, before)

    def test_group_commit(self) -> None:
        """
        One checkpoint at a time; lines waiting for durability while one is in
        flight start the next as soon as it ends, and each waiter fires once its
        line is in a landed checkpoint.
        """
        stream = self.stream()
        stream.write(message(1).to_line())
        first = stream.wait_durable(1)
        self.assertEqual(self.writer.kinds(), ["checkpoint"])
        stream.write(message(2).to_line())
        stream.write(message(3).to_line())
        second = stream.wait_durable(2)
        third = stream.wait_durable(3)
        self.assertEqual(self.writer.kinds(), ["checkpoint"])  # waits for the first
        self.assertNoResult(first)
        self.writer.answer(1)
        self.assertTrue(self.successResultOf(first))
        self.assertNoResult(second)
        self.assertEqual(self.writer.kinds(), ["checkpoint"])  # started at once
        self.writer.answer(1)
        self.assertTrue(self.successResultOf(second))
        self.assertTrue(self.successResultOf(third))
        self.assertEqual(len(read_lines(self.writer.checkpoints[-1])), 3)
        self.assertEqual(self.writer.pending, [])
        self.assertTrue(self.successResultOf(stream.wait_durable(3)))

    def test_durable_by_part_and_by_tail(self) -> None:
        """A line in a stored part, or in the staged tail, is durable."""
        stream = self.stream(in_flight=100)
        for n in range(200):
            stream.write(noise_line(n))
        in_part = stream.wait_durable(1)
        in_tail = stream.wait_durable(200)
        while self.writer.kinds()[:1] == ["part"]:
            self.writer.answer(1)
        self.assertTrue(self.successResultOf(in_part))
        self.assertNoResult(in_tail)
        self.writer.answer()  # the checkpoint wait_durable started
        self.assertTrue(self.successResultOf(in_tail))

    def test_no_checkpoint_while_parts_queued(self) -> None:
        """
        While parts wait in the stream's queue, a checkpoint waits too (it must
        follow them), and starts once the queue drains.
        """
        stream = self.stream(in_flight=1)
        stream.registerProducer(RecordingProducer(), True)
        for n in range(900):
            stream.write(noise_line(n))
        self.assertTrue(stream.paused)
        stream.checkpoint()
        self.assertNotIn("checkpoint", self.writer.kinds())
        while "checkpoint" not in self.writer.kinds():
            self.assertEqual(self.writer.kinds(), ["part"])
            self.writer.answer(1)
        # Handed over after the last queued part (the writer stores them in order).
        self.assertFalse(stream.paused)
        self.assertEqual(self.writer.kinds(), ["part", "checkpoint"])

    def test_waiters_told_when_lines_lost(self) -> None:
        """Abandoned before the line was stored: its waiter fires with False."""
        stream = self.stream()
        stream.write(message(1).to_line())
        waiter = stream.wait_durable(1)
        done = stream.close()
        with capturedLogs():
            stream.abandon()
        self.successResultOf(done)
        self.assertFalse(self.successResultOf(waiter))
        self.assertEqual(self.budget.held, 0)

    def test_cancelled_wait(self) -> None:
        """Cancelling a wait removes it; the checkpoint goes on."""
        stream = self.stream()
        stream.write(message(1).to_line())
        waiter = stream.wait_durable(1)
        waiter.cancel()
        self.failureResultOf(waiter)
        self.writer.answer()
        self.assertEqual(stream.durable_lines, 1)

    def test_loss_report_counts_checkpointed_lines_as_staged(self) -> None:
        """
        Abandoned after a checkpoint landed: only the lines after it are reported
        lost; those before are staged for recovery.
        """
        stream = self.stream()
        for n in range(1, 6):
            stream.write(message(n).to_line())
        stream.checkpoint()
        self.writer.answer()
        stream.write(message(6).to_line())
        done = stream.close()
        with capturedLogs() as events:
            stream.abandon()
        self.successResultOf(done)
        (lost,) = [e for e in events if "lost_lines" in e]
        self.assertEqual(lost["lost_lines"], 1)
        self.assertIn("5 lines before them are staged", lost["checkpointed"])

    def test_abandoned_checkpoint_not_logged_as_failure(self) -> None:
        """
        A checkpoint that fails with Abandoned (the writer was taken over, or the
        deadline) is not logged as a failure: the lease and the completion report it.
        """
        stream = self.stream()
        stream.write(message(1).to_line())
        stream.checkpoint()
        ((_, _, d),) = self.writer.pending
        with capturedLogs() as events:
            d.errback(Abandoned(KEY))
        self.assertEqual([e for e in events if e.get("log_failure")], [])
        self.assertEqual(self.flushLoggedErrors(Abandoned), [])


class AppendCheckpointTests(StreamCase):
    """
    Checkpoints for a writer that replaces nothing (``checkpoints_are_parts``, an
    Azure append blob): the member is closed and handed over as a part.
    """

    def setUp(self) -> None:
        super().setUp()
        self.writer = ControlledWriter(checkpoints_are_parts=True)

    def test_checkpoint_hands_closed_member_as_part(self) -> None:
        """
        Each checkpoint is a part of whole members holding exactly the lines since
        the last one; every line is stored once, in order, and counted durable when
        its part landed.
        """
        lines = [noise_line(n) for n in range(700)]
        stream = self.stream(in_flight=4)
        for n, line in enumerate(lines):
            stream.write(line)
            if n % 37 == 36:
                before = len(self.writer.pending)
                stream.checkpoint()
                self.assertEqual(self.writer.kinds()[before:], ["part"])
                self.assertLess(stream.durable_lines, n + 1)
                self.writer.answer()
                self.assertEqual(stream.durable_lines, n + 1)
                self.assertEqual(read_lines(b"".join(self.writer.stored)), lines[: n + 1])
        self.assertEqual(self.writer.checkpoints, [])  # checkpoint() never used
        done = stream.close()
        self.writer.answer()
        self.successResultOf(done)
        self.assertEqual(read_lines(b"".join(self.writer.stored)), lines)
        self.assertGreater(stream.checkpoints, 15)
        self.assertGreater(len(members(b"".join(self.writer.stored))), 18)
        self.assertEqual(self.budget.held, 0)

    def test_one_checkpoint_in_flight_and_close_waits_for_it(self) -> None:
        """
        A second checkpoint waits for the first; closing meanwhile does not cancel
        it (its lines are not in the tail) and the tail follows it.
        """
        stream = self.stream()
        stream.write(message(1).to_line())
        stream.checkpoint()
        stream.write(message(2).to_line())
        stream.checkpoint()
        self.assertEqual(self.writer.kinds(), ["part"])
        done = stream.close()
        self.assertEqual(self.writer.kinds(), ["part"])
        self.writer.answer()  # the checkpoint, then the tail is handed over
        self.assertEqual(self.writer.kinds(), ["finish"])
        self.writer.answer()
        self.successResultOf(done)
        self.assertEqual(
            read_lines(b"".join(self.writer.stored)),
            [message(1).to_line(), message(2).to_line()],
        )

    def test_wait_durable_cuts_a_checkpoint(self) -> None:
        """Group commit: a waiter starts a checkpoint; the next one after it lands."""
        stream = self.stream()
        stream.write(message(1).to_line())
        first = stream.wait_durable(1)
        stream.write(message(2).to_line())
        second = stream.wait_durable(2)
        self.assertEqual(self.writer.kinds(), ["part"])
        self.writer.answer()
        self.assertTrue(self.successResultOf(first))
        self.assertNoResult(second)
        self.assertEqual(self.writer.kinds(), ["part"])
        self.writer.answer()
        self.assertTrue(self.successResultOf(second))

    def test_failed_checkpoint_reports_lines_lost(self) -> None:
        """
        A checkpoint and tail abandoned at the deadline: their lines are reported
        lost, the waiter answered False, the memory released.
        """
        stream = self.stream()
        stream.write(message(1).to_line())
        waiter = stream.wait_durable(1)
        stream.write(message(2).to_line())
        done = stream.close()
        with capturedLogs() as events:
            stream.abandon()
        self.successResultOf(done)
        self.assertFalse(self.successResultOf(waiter))
        lost = [e for e in events if "not stored" in e.get("log_format", "")]
        self.assertEqual([e["lost_lines"] for e in lost], [2])
        self.assertEqual(self.budget.held, 0)


class LostPartTests(StreamCase):
    """
    A part the writer gives up (the deadline, an error it does not retry): its lines
    are lost and answered so; lines stored after it are answered durable one by one,
    and durable_lines (a prefix) stops before the gap.
    """

    def test_gap_answers_each_line(self) -> None:
        self.writer = ControlledWriter(checkpoints_are_parts=True)
        stream = self.stream()
        stream.write(message(1).to_line())
        first = stream.wait_durable(1)  # checkpoint 1: line 1
        stream.write(message(2).to_line())
        second = stream.wait_durable(2)  # waits for checkpoint 1, then checkpoint 2
        (_, _, d) = self.writer.pending.pop(0)
        d.errback(StorageError("AppendBlock", 400, "InvalidHeaderValue"))
        self.assertFalse(self.successResultOf(first))
        self.assertEqual(self.writer.kinds(), ["part"])  # checkpoint 2 went out
        self.writer.answer()
        self.assertTrue(self.successResultOf(second))
        self.assertEqual(stream.durable_lines, 0)
        self.assertFalse(self.successResultOf(stream.wait_durable(1)))
        self.assertTrue(self.successResultOf(stream.wait_durable(2)))
        with capturedLogs() as events:
            done = stream.close()
            self.writer.answer()
            self.successResultOf(done)
        lost = [e for e in events if e.get("lost_lines") is not None]
        self.assertEqual([(e["lost_lines"], e["parts"]) for e in lost], [(1, 1)])
        self.assertEqual(self.budget.held, 0)
        self.assertEqual(len(self.flushLoggedErrors(StorageError)), 1)

    def test_abandoned_part_then_empty_tail_is_not_durable(self) -> None:
        """
        The model-based test's case (a durable wait, the checkpoint abandoned at
        the deadline, then the flush's empty tail succeeds without a call): the
        line was answered durable and counted in durable_lines before the fix.
        """
        self.writer = ControlledWriter(checkpoints_are_parts=True)
        stream = self.stream()
        stream.write(message(1).to_line())
        waiter = stream.wait_durable(1)
        done = stream.close()
        (_, _, d) = self.writer.pending.pop(0)
        d.errback(Abandoned(KEY))
        self.assertEqual(self.writer.kinds(), ["finish"])
        self.writer.answer()  # the empty tail
        self.successResultOf(done)
        self.assertFalse(self.successResultOf(waiter))
        self.assertEqual(stream.durable_lines, 0)


class IdleTests(StreamCase):
    """release_idle: a quiet stream closes its member and frees its compressor."""

    def test_release_idle_frees_compressor_and_later_lines_land(self) -> None:
        """
        A stream holding a compressor counts it in the budget; release_idle with a
        cutoff before its last line keeps it, with a cutoff at or after frees it
        (the budget drops by it, less the member's trailer); later lines land after
        it: the tail is two whole members holding every line, and the budget ends
        at 0.
        """
        stream = ObjectStream(self.writer, self.clock, PART, 2, self.budget, stage_bytes=1024)
        first = [noise_line(n, size=100) for n in range(10)]
        for line in first:
            stream.write(line)
        self.assertTrue(stream.holds_compressor)
        self.assertEqual(self.budget.held, stream.unstaged_bytes)
        self.assertGreater(self.budget.held, COMPRESSOR_BYTES)
        self.clock.advance(5)
        self.assertFalse(stream.release_idle(self.clock.seconds() - 6))
        self.assertTrue(stream.holds_compressor)
        self.assertTrue(stream.release_idle(self.clock.seconds() - 5))
        self.assertFalse(stream.holds_compressor)
        self.assertFalse(stream.release_idle(self.clock.seconds()))  # nothing left to free
        self.assertEqual(self.budget.held, stream.unstaged_bytes)
        self.assertLess(self.budget.held, 4096)
        later = [message(n).to_line() for n in range(3)]
        for line in later:
            stream.write(line)
        self.assertFalse(stream.holds_compressor)  # staged: under 1 KiB
        done = stream.close()
        self.writer.answer()
        self.successResultOf(done)
        (tail,) = self.writer.stored
        self.assertEqual(members(tail), [b"".join(first), b"".join(later)])
        self.assertEqual(self.budget.held, 0)
