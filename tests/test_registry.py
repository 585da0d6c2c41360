"""
Tests for :mod:`loghandler.registry`: routing by key, timer-driven (jittered)
completion, admission (budget, relief, backpressure, stopping), the flush, failure
isolation and the budget's accounting, on a ``task.Clock`` with the S3 writer over
the in-memory S3 (:class:`~loghandler.storage.memory.MemoryStore`).  Every test reads
the objects that landed back (gunzip, line by line).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet.defer import CancelledError, fail
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.gzipframe import COMPRESSOR_BYTES
from loghandler.interfaces import StorageError
from loghandler.keys import key_for
from loghandler.message import Message
from loghandler.registry import STREAM_OVERHEAD_BYTES, Busy, StreamRegistry, StreamSettings
from loghandler.retry import RetryLayer
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.merge import ROLLOVER_BYTES
from loghandler.storage.s3.writer import STAGING_PREFIX, S3ObjectStore
from tests.helpers import DAY_START_MS, MS_PER_DAY, members, message, read_lines

LIFETIME = 60.0
PART = 16 * 1024
KEY = key_for(message(1).timestamp, 3)


def noisy(n: int, client_id: int = 3, size: int = 500) -> Message:
    """A message of about ``2 * size`` bytes of random hex that compresses poorly."""
    return Message(os.urandom(size).hex(), n, client_id, DAY_START_MS)


def accept_all(registry: StreamRegistry, clock: Clock, messages: list[Message]) -> None:
    """
    Hand every message to ``registry`` as a client would: on Busy (503), wait a
    second and send it again.
    """
    for m in messages:
        for _ in range(1000):
            try:
                registry.accept(m)
                break
            except Busy:
                clock.advance(1)
        else:
            raise AssertionError("refused for 1000 s: %r" % (m,))


def formats(events: Sequence[Mapping[str, Any]]) -> list[str]:
    """The format strings of captured log events."""
    return [e.get("log_format") or "" for e in events]


class RegistryCase(SynchronousTestCase):
    """
    A registry with small parts over the S3 writer on a MemoryStore on a Clock.
    Retry waits are their upper bound (no randomness); rotation is not jittered
    unless a test injects ``uniform``.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.mem = MemoryStore(min_part_size=PART, now=self.clock.seconds)
        self.registry = self.make(budget=1 << 30)

    def make(
        self,
        budget: int,
        part_size: int = PART,
        uniform: Callable[[float, float], float] = lambda a, b: b,
        parts_in_flight: int = 2,
        checkpoint_s: float = 0.0,
        client_budget: Optional[int] = None,
        idle_s: float = 5.0,
        stage_bytes: int = 32 * 1024,
    ) -> StreamRegistry:
        """A new registry (and store) sharing one budget of ``budget`` bytes."""
        shared = MemoryBudget(budget)
        retry = RetryLayer(
            self.clock,
            backoff=Backoff(base=0.2, cap=30.0, uniform=lambda a, b: b),
            permanent_backoff=Backoff(base=5.0, cap=60.0, uniform=lambda a, b: b),
        )
        self.store = S3ObjectStore(self.mem, self.clock, shared, part_size=part_size, retry=retry)
        return StreamRegistry(
            self.store,
            self.clock,
            StreamSettings(
                part_size=part_size,
                lifetime_s=LIFETIME,
                parts_in_flight=parts_in_flight,
                budget_bytes=budget,
                checkpoint_s=checkpoint_s,
                client_budget_bytes=client_budget,
                idle_s=idle_s,
                stage_bytes=stage_bytes,
            ),
            shared,
            uniform=uniform,
        )

    def lines(self, key: str = KEY) -> list[bytes]:
        """The lines of the object ``key`` as it landed (gunzipped)."""
        return read_lines(self.mem.body(key))

    def fill_until_busy(self, registry: StreamRegistry) -> dict[int, list[bytes]]:
        """
        Send noisy messages for clients 3 and 4 until one is refused (Busy); the
        lines accepted, by client.
        """
        sent: dict[int, list[bytes]] = {3: [], 4: []}
        with self.assertRaises(Busy):
            for n in range(2, 100000):
                client = 3 if n % 3 else 4
                m = noisy(n, client, 200)
                registry.accept(m)
                sent[client].append(m.to_line())
        return sent

    def assertLanded(self, expected: dict[str, list[bytes]]) -> None:
        """
        Exactly the objects of ``expected`` landed with exactly its lines, and nothing
        is left staged (no staging object, no pending upload).
        """
        self.assertEqual(sorted(self.mem.objects), sorted(expected))
        for key, lines in expected.items():
            self.assertEqual(self.lines(key), lines, key)
        self.assertEqual(self.mem.uploads, {})

    def assertBudgetIsOverhead(self, registry: Optional[StreamRegistry] = None) -> None:
        """
        The budget holds exactly the open streams' overhead and unstored bytes: with no
        open stream, 0.
        """
        registry = registry or self.registry
        expected = sum(
            STREAM_OVERHEAD_BYTES + entry.stream.unstaged_bytes
            for entry in registry._open.values()
        )
        self.assertEqual(registry.budget.held, expected)


class RoutingTests(RegistryCase):
    """Messages go to the object of their own UTC date and client."""

    def test_keys_by_date_and_client(self) -> None:
        """Two clients over two UTC dates give four objects, each with only its lines."""
        sent: dict[str, list[bytes]] = {}
        n = 0
        for day in (0, 1):
            for client in (1, 2):
                for offset in (0, MS_PER_DAY - 1):
                    n += 1
                    m = message(n, client, DAY_START_MS + day * MS_PER_DAY + offset)
                    self.registry.accept(m)
                    sent.setdefault(key_for(m.timestamp, client), []).append(m.to_line())
        self.assertEqual(len(self.registry.open_keys), 4)
        self.successResultOf(self.registry.close_all())
        self.assertIn("chat/2020-03-31/content_logs_2020-03-31_2", sent)
        self.assertLanded(sent)
        self.assertEqual(self.registry.budget.held, 0)


class RotationTests(RegistryCase):
    """Streams complete on a reactor timer, not on the next message."""

    def test_completed_after_lifetime_without_new_message(self) -> None:
        """After QUEUE_TIMEOUT the object is complete although no message came."""
        self.registry.accept(message(1))
        self.clock.advance(LIFETIME - 1)
        self.assertEqual(self.mem.objects, {})
        self.clock.advance(1)
        self.assertLanded({KEY: [message(1).to_line()]})
        self.assertEqual(self.registry.open_keys, [])
        self.assertEqual(self.registry.budget.held, 0)

    def test_next_stream_merges_after(self) -> None:
        """
        A message after rotation opens a new stream whose lines are merged after the
        object's: the object holds both streams' lines in order.
        """
        self.registry.accept(message(1))
        self.clock.advance(LIFETIME)
        self.registry.accept(message(2))
        self.clock.advance(LIFETIME)
        self.assertLanded({KEY: [message(1).to_line(), message(2).to_line()]})

    def test_jitter(self) -> None:
        """
        Each stream's timer is the lifetime times a fraction drawn from [0.9, 1]
        (QUEUE_TIMEOUT jitter), drawn anew for every stream, the next one of the same
        key included.
        """
        draws: list[tuple[float, float]] = []
        fractions = iter([0.9, 0.95, 1.0])

        def uniform(low: float, high: float) -> float:
            draws.append((low, high))
            return next(fractions)

        registry = self.make(budget=1 << 30, uniform=uniform)
        first, second = key_for(DAY_START_MS + 1000, 1), key_for(DAY_START_MS + 1000, 2)
        registry.accept(message(1, 1))
        registry.accept(message(2, 2))
        self.assertEqual(draws, [(0.9, 1.0), (0.9, 1.0)])
        self.clock.advance(53.9)
        self.assertEqual(registry.open_keys, [first, second])
        self.clock.advance(0.1)  # 54 s = 0.9 x 60
        self.assertEqual(registry.open_keys, [second])
        self.assertEqual(self.lines(first), [message(1, 1).to_line()])
        self.assertNotIn(second, self.mem.objects)
        registry.accept(message(3, 1))  # a new stream for the first key: a new draw
        self.assertEqual(len(draws), 3)
        self.clock.advance(2.9)
        self.assertNotIn(second, self.mem.objects)
        self.clock.advance(0.1)  # 57 s = 0.95 x 60
        self.assertEqual(self.lines(second), [message(2, 2).to_line()])
        self.assertEqual(registry.open_keys, [first])
        self.clock.advance(114 - 57 - 0.001)  # the third draw was 1.0: 54 + 60 = 114 s
        self.assertEqual(registry.open_keys, [first])
        self.clock.advance(0.001)
        self.assertLanded(
            {
                first: [message(1, 1).to_line(), message(3, 1).to_line()],
                second: [message(2, 2).to_line()],
            }
        )


class AdmissionTests(RegistryCase):
    """When messages are refused with Busy (503)."""

    def test_budget(self) -> None:
        """
        Past the buffer budget new messages are refused with "buffers are full"; once
        the held parts land, every accepted line is in the object, the budget is back
        to 0 and messages are taken again.
        """
        # The stream's compressor (it starts past the first 32 KiB) and 40 KiB.
        registry = self.make(budget=STREAM_OVERHEAD_BYTES + COMPRESSOR_BYTES + 40 * 1024)
        self.mem.hold("UploadPart")
        accepted = []
        with self.assertRaises(Busy) as caught:
            for n in range(1, 100000):
                m = noisy(n)
                registry.accept(m)
                accepted.append(m.to_line())
        self.assertEqual(caught.exception.reason, "buffers are full")
        self.assertGreater(len(accepted), 20)
        self.mem.release()
        self.clock.advance(LIFETIME)
        self.assertEqual(registry.budget.held, 0)
        self.assertLanded({KEY: accepted})
        registry.accept(message(5000))
        self.assertBudgetIsOverhead(registry)

    def test_budget_spent_by_partial_parts_completes_largest(self) -> None:
        """
        When the budget is spent by objects each holding part of a part (nothing in
        flight), the one buffering most is completed early, so messages are taken
        again without waiting for rotation.
        """
        registry = self.make(budget=2 * STREAM_OVERHEAD_BYTES + 256 * 1024, part_size=1 << 20)
        sent: dict[int, list[bytes]] = {3: [], 4: []}
        with capturedLogs() as events:
            with self.assertRaises(Busy):
                for n in range(1, 100000):
                    client = 3 if n % 3 else 4
                    m = noisy(n, client, 200)
                    registry.accept(m)
                    sent[client].append(m.to_line())
        self.assertEqual(
            [e["key"] for e in events if "completing {key} early" in (e.get("log_format") or "")],
            [KEY],
        )
        self.assertEqual(self.lines(KEY), sent[3])
        registry.accept(message(1, 3))
        self.assertBudgetIsOverhead(registry)

    def test_relief_while_another_stream_merges(self) -> None:
        """
        A completing stream whose data are already staged (its merge is waiting on
        storage) does not stop the relief: the open stream buffering most is
        completed early.
        """
        # The first stream's timer runs out first (0.9 x lifetime), the others' later.
        fractions = iter([0.9] + [1.0] * 10)
        registry = self.make(
            budget=3 * STREAM_OVERHEAD_BYTES + 256 * 1024,
            part_size=1 << 20,
            uniform=lambda a, b: next(fractions),
        )
        merging = key_for(DAY_START_MS, 5)
        first = noisy(1, 5)
        registry.accept(first)
        self.mem.hold("HeadObject")  # the merge's first call
        self.clock.advance(0.9 * LIFETIME)
        (held,) = self.mem.held
        self.assertEqual(held.key, merging)
        staged = [k for k in self.mem.objects if k.startswith(STAGING_PREFIX)]
        self.assertEqual(len(staged), 1, "the merging stream's data are staged")
        self.assertEqual(registry.completing, 1)
        with capturedLogs() as events:
            sent = self.fill_until_busy(registry)
        early = [e["key"] for e in events if "completing {key} early" in (e.get("log_format") or "")]
        self.assertEqual(early, [KEY])
        self.assertEqual(registry.open_keys, [key_for(DAY_START_MS, 4)])
        self.mem.release()
        self.successResultOf(registry.close_all())
        self.assertLanded(
            {
                merging: [first.to_line()],
                KEY: sent[3],
                key_for(DAY_START_MS, 4): sent[4],
            }
        )
        self.assertEqual(registry.budget.held, 0)

    def test_no_relief_while_a_completion_holds_unstored_bytes(self) -> None:
        """
        While a completing stream still holds bytes that are not stored (its staging
        write waits on storage), the relief completes nothing more: completing another
        stream would only add to the memory held.
        """
        fractions = iter([0.9] + [1.0] * 10)
        registry = self.make(
            budget=3 * STREAM_OVERHEAD_BYTES + 256 * 1024,
            part_size=1 << 20,
            uniform=lambda a, b: next(fractions),
        )
        completing = key_for(DAY_START_MS, 5)
        first = noisy(1, 5)
        registry.accept(first)
        self.mem.hold("PutObject")  # the staging write of a small stream
        self.clock.advance(0.9 * LIFETIME)
        self.assertEqual([h.operation for h in self.mem.held], ["PutObject"])
        with capturedLogs() as events:
            sent = self.fill_until_busy(registry)
            self.assertRaises(Busy, registry.accept, message(1, 6))
        self.assertFalse(any("early" in f for f in formats(events)), formats(events))
        self.assertEqual(registry.open_keys, [KEY, key_for(DAY_START_MS, 4)])
        self.mem.release()
        self.assertEqual(registry.completing, 0)
        self.successResultOf(registry.close_all())
        self.assertLanded(
            {
                completing: [first.to_line()],
                KEY: sent[3],
                key_for(DAY_START_MS, 4): sent[4],
            }
        )
        self.assertEqual(registry.budget.held, 0)

    def test_full_writer_completes_object(self) -> None:
        """
        When the writer can take no more (its staged bytes reached the rollover size,
        or one part number is left), the stream is completed at once and the next
        message opens a new one.
        """
        self.registry.accept(message(1))
        writer = self.registry._open[KEY].stream._writer
        writer.staged_bytes = ROLLOVER_BYTES  # type: ignore[attr-defined]
        with capturedLogs() as events:
            self.registry.accept(message(2))
        self.assertIn("{key}: the writer is full; completing the object early", formats(events))
        self.assertEqual(self.registry.open_keys, [])
        self.assertLanded({KEY: [message(1).to_line(), message(2).to_line()]})
        self.registry.accept(message(3))
        self.assertEqual(self.registry.open_keys, [KEY])

    def test_stopping(self) -> None:
        """Once close_all started, messages are refused with 'server is stopping'."""
        self.registry.close_all()
        with self.assertRaises(Busy) as caught:
            self.registry.accept(message(1))
        self.assertEqual(caught.exception.reason, "server is stopping")

    def test_backed_up_key_refused_other_keys_taken(self) -> None:
        """
        While one key's parts wait for upload, its messages get Busy; other keys go
        on; once the parts land the key takes messages again and nothing is lost.
        """
        self.mem.hold("UploadPart")
        sent = []
        with self.assertRaises(Busy) as caught:
            for n in range(1, 100000):
                m = noisy(n, size=1000)
                self.registry.accept(m)
                sent.append(m.to_line())
        self.assertEqual(caught.exception.reason, "uploads for this object are backed up")
        other = key_for(message(1).timestamp, 4)
        self.registry.accept(message(1, client_id=4))
        self.mem.release()
        self.registry.accept(message(2))
        sent.append(message(2).to_line())
        self.successResultOf(self.registry.close_all())
        self.assertLanded({KEY: sent, other: [message(1, client_id=4).to_line()]})


class BatchTests(RegistryCase):
    """accept_batch: every check first, then every message, or none."""

    def test_all_taken_in_order(self) -> None:
        """Each message goes to its key's stream; the Accepted line numbers count up."""
        other = key_for(message(1).timestamp, 4)
        batch = [message(1), message(2, client_id=4), message(3)]
        accepted = self.registry.accept_batch(batch)
        self.assertEqual([a.line for a in accepted], [1, 1, 2])
        self.assertIs(accepted[0].stream, accepted[2].stream)
        self.successResultOf(self.registry.close_all())
        self.assertLanded(
            {KEY: [message(1).to_line(), message(3).to_line()], other: [batch[1].to_line()]}
        )

    def test_budget_left_too_small(self) -> None:
        """
        A batch needing more than the budget left (its lines and a new stream's
        overhead) is refused whole, though the budget is not spent; it fits once there
        is room.
        """
        batch = [message(n) for n in range(1, 4)]
        needed = STREAM_OVERHEAD_BYTES + sum(len(m.to_line()) for m in batch)
        registry = self.make(budget=needed + 100)
        registry.budget.change(101)
        with self.assertRaises(Busy) as caught:
            registry.accept_batch(batch)
        self.assertEqual(caught.exception.reason, "buffers are too full for this batch")
        self.assertEqual((registry.open_keys, registry.budget.held), ([], 101))
        registry.budget.change(-1)
        self.assertEqual(len(registry.accept_batch(batch)), 3)
        registry.budget.change(-100)
        self.successResultOf(registry.close_all())
        self.assertLanded({KEY: [m.to_line() for m in batch]})

    def test_backed_up_key_refuses_all(self) -> None:
        """One line for a backed-up key: Busy, and no other line of the batch is taken."""
        self.registry.accept(message(1))
        self.registry._open[KEY].admission.pauseProducing()
        with self.assertRaises(Busy) as caught:
            self.registry.accept_batch([message(2, client_id=4), message(3)])
        self.assertEqual(caught.exception.reason, "uploads for this object are backed up")
        self.assertEqual(self.registry.open_keys, [KEY])
        self.assertEqual(self.registry._open[KEY].stream.lines, 1)

    def test_stopping(self) -> None:
        """While stopping, a batch is refused with 'server is stopping'."""
        self.registry.close_all()
        with self.assertRaises(Busy) as caught:
            self.registry.accept_batch([message(1)])
        self.assertEqual(caught.exception.reason, "server is stopping")


class FlushTests(RegistryCase):
    """close_all completes everything in parallel and is bounded by cancellation."""

    def test_parallel(self) -> None:
        """All objects' staging writes are in flight at once, not one after another."""
        for client in (1, 2, 3):
            self.registry.accept(message(client, client))
        self.mem.hold("PutObject")
        done = self.registry.close_all()
        self.assertEqual(len(self.mem.held), 3)
        self.assertNoResult(done)
        self.mem.release()
        self.successResultOf(done)
        self.assertLanded(
            {
                key_for(message(c).timestamp, c): [message(c, c).to_line()]
                for c in (1, 2, 3)
            }
        )

    def test_waits_for_rotated_streams(self) -> None:
        """A stream already completing at stop time is waited for too."""
        self.registry.accept(message(1))
        self.mem.hold("PutObject")
        self.clock.advance(LIFETIME)
        done = self.registry.close_all()
        self.assertNoResult(done)
        self.mem.release()
        self.successResultOf(done)
        self.assertLanded({KEY: [message(1).to_line()]})

    def test_cancel_abandons(self) -> None:
        """
        Cancelling the flush (the deadline) abandons the completions; a stream whose
        data were never stored logs its key and the lines lost, and the budget is
        back to 0.
        """
        self.registry.accept(message(1))
        self.registry.accept(message(2))
        self.mem.hold("PutObject")
        done = self.registry.close_all()
        with capturedLogs() as events:
            done.cancel()
        self.failureResultOf(done, CancelledError)
        (lost,) = [e for e in events if "lost_bytes" in e]
        self.assertEqual((lost["key"], lost["lost_lines"]), (KEY, 2))
        self.assertIn("by the shutdown deadline", lost["reason"])
        self.assertEqual(self.registry.budget.held, 0)
        self.assertEqual(self.mem.objects, {})

    def test_cancel_while_merging_leaves_data_staged(self) -> None:
        """
        Cancelling the flush while a merge waits on storage leaves the data staged:
        the stream logs where they wait for recovery, nothing is reported lost, and
        the staging object holds every line.
        """
        self.registry.accept(message(1))
        self.registry.accept(message(2))
        self.mem.hold("HeadObject")
        done = self.registry.close_all()
        with capturedLogs() as events:
            done.cancel()
        self.failureResultOf(done, CancelledError)
        self.assertFalse([e for e in events if "lost_bytes" in e])
        (staged,) = [e for e in events if "staged_key" in e]
        self.assertEqual(staged["key"], KEY)
        self.assertTrue(staged["staged_key"].startswith(STAGING_PREFIX), staged)
        self.assertEqual(list(self.mem.objects), [staged["staged_key"]])
        self.assertEqual(
            self.lines(staged["staged_key"]), [message(1).to_line(), message(2).to_line()]
        )
        self.assertEqual(self.registry.budget.held, 0)


class IsolationTests(RegistryCase):
    """One object's trouble never stops the others."""

    def test_failing_key_does_not_block_others(self) -> None:
        """
        With every write for one key refused (403), the other keys complete; the
        failing one keeps its data, is retried, and lands once storage takes it.
        """
        bad = key_for(message(1).timestamp, 1)
        real_put = self.mem.put
        refused = []

        def put(key, body, **conditions):  # type: ignore[no-untyped-def]
            if bad in key:
                refused.append(key)
                return fail(StorageError("PutObject", 403, "AccessDenied"))
            return real_put(key, body, **conditions)

        self.mem.put = put  # type: ignore[method-assign, assignment]
        for client in (1, 2, 3):
            self.registry.accept(message(client, client))
        with capturedLogs() as events:
            self.clock.advance(LIFETIME)
        self.assertEqual(len(refused), 1)
        self.assertEqual(
            sorted(self.mem.objects), sorted(key_for(message(c).timestamp, c) for c in (2, 3))
        )
        self.assertTrue([e for e in events if "until this is fixed" in (e.get("log_format") or "")])
        self.registry.accept(message(10, 2))
        self.clock.advance(120)
        self.assertGreater(len(refused), 1, "retried")
        self.mem.put = real_put  # type: ignore[method-assign]
        self.clock.advance(120)
        self.assertLanded(
            {
                bad: [message(1, 1).to_line()],
                key_for(message(2).timestamp, 2): [message(2, 2).to_line(), message(10, 2).to_line()],
                key_for(message(3).timestamp, 3): [message(3, 3).to_line()],
            }
        )
        self.assertIsNone(self.store.problem)
        self.assertEqual(self.registry.budget.held, 0)

    def test_exception_in_stream_completes_it(self) -> None:
        """An exception inside a stream's write completes that stream and is raised."""
        self.registry.accept(message(1))
        stream = self.registry._open[KEY].stream

        def broken(data: bytes) -> None:
            raise RuntimeError("broken compressor")

        stream._encoder.write = broken  # type: ignore[method-assign]
        with capturedLogs() as events:
            self.assertRaises(RuntimeError, self.registry.accept, message(2))
        self.assertEqual(self.lines(), [message(1).to_line()])
        self.assertTrue(any(e.get("log_failure") for e in events))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.registry.accept(message(3))
        self.assertEqual(self.registry.open_keys, [KEY])

    def _unexpected_part_failure(self, error: Exception) -> None:
        sent = [noisy(n) for n in range(1, 200)]
        self.mem.fail("UploadPart", error, times=2)
        with capturedLogs() as events:
            accept_all(self.registry, self.clock, sent)
            self.clock.pump([0.1] * 10)  # the retries' waits (0.2 s, 0.4 s)
            self.successResultOf(self.registry.close_all())
        self.assertGreaterEqual(
            [op for op, _ in self.mem.calls].count("UploadPart"), 5, "several parts"
        )
        self.assertLanded({KEY: [m.to_line() for m in sent]})
        unexpected = [e for e in events if "unexpected error" in (e.get("log_format") or "")]
        self.assertEqual(len(unexpected), 1, "logged once per exception type")
        self.assertEqual(unexpected[0]["error_type"], type(error).__name__)
        self.assertEqual(self.registry.budget.held, 0)
        self.assertEqual(len(self.flushLoggedErrors(type(error))), 1)

    def test_unexpected_runtime_error_in_part_is_retried(self) -> None:
        """
        A part upload failing with an exception type nobody expects (RuntimeError) is
        retried, not skipped: every line lands, in order, with no gap.
        """
        self._unexpected_part_failure(RuntimeError("boom"))

    def test_unexpected_key_error_in_part_is_retried(self) -> None:
        """The same for a KeyError out of the client."""
        self._unexpected_part_failure(KeyError("etag"))


class StagingTests(RegistryCase):
    """Parts handed to the writer before its staging upload exists."""

    def test_parts_wait_for_the_staging_upload(self) -> None:
        """
        Parts cut while CreateMultipartUpload is still on its way (an S3 answer takes
        time) all wait for that one upload and land in it: every line, in order.
        """
        self.mem.hold("CreateMultipartUpload")
        sent = [noisy(n) for n in range(1, 100)]  # two parts and a tail
        with capturedLogs() as events:
            for m in sent:
                self.registry.accept(m)
            self.assertEqual([h.operation for h in self.mem.held], ["CreateMultipartUpload"])
            self.assertEqual(self.registry._open[KEY].stream.stored_bytes, 0)
            self.mem.release()
            self.successResultOf(self.registry.close_all())
        self.assertLanded({KEY: [m.to_line() for m in sent]})
        self.assertEqual(
            [e for e in events if e["log_level"] in (LogLevel.warn, LogLevel.error)],
            [],
            "no call failed or was retried",
        )
        staging = self.mem.calls[0][1]
        self.assertTrue(staging.startswith(STAGING_PREFIX), staging)
        self.assertEqual(
            [op for op, key in self.mem.calls if key == staging],
            ["CreateMultipartUpload"] + ["UploadPart"] * 3 + ["CompleteMultipartUpload", "DeleteObject"],
            "each part (two and the tail) sent once, into the one staging upload",
        )


class BudgetTests(RegistryCase):
    """The budget holds exactly what the open streams hold, and 0 once all are done."""

    def test_back_to_overhead_then_zero(self) -> None:
        """
        While some streams are open and others completed, the budget holds exactly
        the open ones' overhead and unstored bytes; after the flush, 0.
        """
        fractions = iter([0.9, 1.0, 1.0])
        registry = self.make(budget=1 << 30, uniform=lambda a, b: next(fractions))
        for n in range(1, 60):
            registry.accept(noisy(n, 1 + n % 3))
        self.assertBudgetIsOverhead(registry)
        self.clock.advance(0.9 * LIFETIME)
        self.assertEqual(len(registry.open_keys), 2)
        self.assertEqual(registry.completing, 0)
        self.assertBudgetIsOverhead(registry)
        self.successResultOf(registry.close_all())
        self.assertEqual(registry.budget.held, 0)

    def test_zero_after_transient_failures(self) -> None:
        """Parts and merges that failed and were retried leave nothing counted."""
        self.mem.fail("UploadPart", StorageError("UploadPart", 503, "SlowDown"), times=3)
        self.mem.fail("CompleteMultipartUpload", StorageError("CompleteMultipartUpload", 500), times=2)
        self.mem.lose_answer("PutObject")
        sent = [noisy(n) for n in range(1, 100)]
        accept_all(self.registry, self.clock, sent)
        self.clock.pump([0.1] * 50)
        self.assertBudgetIsOverhead()
        done = self.registry.close_all()
        self.clock.pump([0.1] * 50)
        self.successResultOf(done)
        self.assertLanded({KEY: [m.to_line() for m in sent]})
        self.assertEqual(self.registry.budget.held, 0)

    def test_zero_after_failed_completion(self) -> None:
        """
        A completion that fails for good (storage refuses the request as invalid)
        logs what was not stored and frees its memory: the budget is back to 0.
        """
        self.mem.fail("PutObject", StorageError("PutObject", 400, "InvalidArgument"))
        self.registry.accept(message(1))
        with capturedLogs() as events:
            self.successResultOf(self.registry.close_all())
        (lost,) = [e for e in events if "lost_bytes" in e]
        self.assertEqual((lost["key"], lost["lost_lines"]), (KEY, 1))
        self.assertEqual(self.registry.budget.held, 0)
        self.flushLoggedErrors()

    def test_zero_after_abandoning_parts_in_flight(self) -> None:
        """
        Abandoning streams whose parts and merges are in flight (held) leaves the
        budget at 0, the merge's own bytes included.
        """
        for n in range(1, 100):
            self.registry.accept(noisy(n, 1))
        self.mem.hold("UploadPart")
        for n in range(100, 140):
            self.registry.accept(noisy(n, 1))
        self.registry.accept(noisy(1, 2))
        self.mem.hold("GetObject")  # the small merge of client 2 holds its bytes
        done = self.registry.close_all()
        self.assertEqual(
            sorted({h.operation for h in self.mem.held}), ["GetObject", "UploadPart"]
        )
        self.assertGreater(self.registry.budget.held, 0)
        with capturedLogs():
            done.cancel()
        self.failureResultOf(done, CancelledError)
        self.assertEqual(self.registry.budget.held, 0)
        self.mem.release()
        self.assertEqual(self.registry.budget.held, 0)


class CheckpointRoundTests(RegistryCase):
    """Every CHECKPOINT_S, each stream that received lines checkpoints."""

    def staged(self) -> dict[str, list[bytes]]:
        """Object key -> the lines its staging upload holds now."""
        out = {}
        for upload in self.mem.uploads.values():
            key = upload.key[len(STAGING_PREFIX) :].split("/", 1)[1].rsplit("/", 1)[0]
            out[key] = read_lines(b"".join(b for _, (b, _) in sorted(upload.parts.items())))
        return out

    def test_rounds(self) -> None:
        """
        Nothing before the first round; then a checkpoint per stream with new lines;
        an idle stream uploads nothing; the rounds stop at close_all.
        """
        registry = self.make(budget=1 << 30, checkpoint_s=5.0)
        registry.start_checkpoints()
        other = key_for(message(1).timestamp, 4)
        a = [message(n) for n in range(1, 4)]
        b = [message(n, client_id=4) for n in range(4, 6)]
        accept_all(registry, self.clock, a + b)
        self.clock.advance(4.9)
        self.assertEqual(self.mem.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(
            self.staged(), {KEY: [m.to_line() for m in a], other: [m.to_line() for m in b]}
        )
        calls = len(self.mem.calls)
        self.clock.advance(5.0)  # nothing new: nothing sent
        self.assertEqual(len(self.mem.calls), calls)
        registry.accept(message(9))
        self.clock.advance(5.0)
        self.assertEqual(
            [op for op, _ in self.mem.calls[calls:]], ["UploadPart"]
        )
        self.assertEqual(self.staged()[KEY], [m.to_line() for m in a] + [message(9).to_line()])
        self.successResultOf(registry.close_all())
        calls = len(self.mem.calls)
        self.clock.advance(50.0)
        self.assertEqual(len(self.mem.calls), calls)
        self.assertEqual(self.lines(), [m.to_line() for m in a] + [message(9).to_line()])

    def test_accepted_durable(self) -> None:
        """accept() tells where the line went; durable() fires once it is stored."""
        registry = self.make(budget=1 << 30)
        accepted = registry.accept(message(1))
        self.assertEqual(accepted.line, 1)
        self.assertTrue(self.successResultOf(accepted.durable()))
        self.assertEqual(self.staged(), {KEY: [message(1).to_line()]})

    def test_round_over_many_streams_does_not_recurse(self) -> None:
        """
        A round over thousands of streams whose checkpoints end at once (the memory
        store answers at once; idle streams start none) completes without nesting
        a call per stream (a chain of Deferreds hit Python's recursion limit with
        about 500 keys).
        """
        registry = self.make(budget=1 << 34, checkpoint_s=5.0)
        days = [DAY_START_MS + n * MS_PER_DAY for n in range(3000)]
        for n, day in enumerate(days, 1):
            registry.accept(message(n, client_id=1, timestamp=day))
        self.successResultOf(registry.checkpoint_all())
        self.assertEqual(sum(1 for u in self.mem.uploads.values() if u.parts), 3000)
        # The first streams' checkpoints wait for storage; the others are idle and
        # wait behind them for a slot, then end at once, one after the other.
        for n, day in enumerate(days[:4], 5000):
            registry.accept(message(n, client_id=1, timestamp=day))
        self.mem.hold("UploadPart")
        d = registry.checkpoint_all()
        self.assertNoResult(d)
        self.mem.release()
        self.successResultOf(d)


class IdleTests(RegistryCase):
    """
    A stream that received no line for ``idle_s`` closes its member and frees its
    compressor (counted in the budget while held); its part buffer stays, and its
    later lines start a new member of the same object.
    """

    def test_idle_key_frees_compressor_and_later_lines_land(self) -> None:
        """
        A busy key holds a compressor (COMPRESSOR_BYTES in the budget); idle for
        5 s, it is freed and the budget drops by it; later lines are staged, the
        next checkpoint uploads the part as two whole members holding every line,
        and the object lands with every line, valid gzip.
        """
        registry = self.make(budget=1 << 30, part_size=1 << 20, checkpoint_s=10.0)
        registry.start_checkpoints()
        first = [noisy(n) for n in range(1, 80)]  # about 80 KB: past the staging size
        for m in first:
            registry.accept(m)
        (entry,) = registry._open.values()
        stream = entry.stream
        self.assertTrue(stream.holds_compressor)
        self.assertBudgetIsOverhead(registry)
        held = registry.budget.held
        self.assertGreater(held, STREAM_OVERHEAD_BYTES + COMPRESSOR_BYTES)
        self.clock.advance(4.9)
        self.assertEqual(registry.release_idle(), 0)  # 4.9 s: not idle yet
        self.assertTrue(stream.holds_compressor)
        self.clock.advance(0.1)  # the sweep at 5 s
        self.assertFalse(stream.holds_compressor)
        self.assertBudgetIsOverhead(registry)
        # Freed: the compressor, less the member's last block and trailer.
        self.assertLess(held - COMPRESSOR_BYTES, registry.budget.held)
        self.assertLess(registry.budget.held, held - COMPRESSOR_BYTES // 2)
        later = [message(n) for n in range(1000, 1003)]
        for m in later:
            registry.accept(m)
        self.assertFalse(stream.holds_compressor)
        self.assertBudgetIsOverhead(registry)
        self.clock.advance(5.0)  # the checkpoint at 10 s
        (upload,) = self.mem.uploads.values()
        (body, _), = upload.parts.values()
        expected = [m.to_line() for m in first + later]
        self.assertEqual(
            [len(member.splitlines()) for member in members(body)], [len(first), len(later)]
        )
        self.assertEqual(read_lines(body), expected)
        self.clock.advance(LIFETIME)
        self.assertLanded({KEY: expected})
        self.assertEqual(registry.budget.held, 0)
        self.successResultOf(registry.close_all())

    def test_quiet_keys_hold_no_compressor(self) -> None:
        """
        Many keys with one short line each hold no compressor: the budget holds
        their overhead and their lines, not 256 KiB each.
        """
        registry = self.make(budget=1 << 30)
        for client in range(1, 201):
            registry.accept(message(client, client_id=client))
        self.assertEqual(len(registry.open_keys), 200)
        self.assertFalse(any(e.stream.holds_compressor for e in registry._open.values()))
        self.assertBudgetIsOverhead(registry)
        self.assertLess(registry.budget.held, 200 * (STREAM_OVERHEAD_BYTES + 1024))
        self.successResultOf(registry.close_all())
        self.assertEqual(registry.budget.held, 0)

    def test_compacts_staged_lines_when_memory_runs_short(self) -> None:
        """
        With more than half the budget held, the idle sweep also compresses idle
        streams' staged lines (of at least 8 KiB) into closed members: the budget
        drops, and the lines still land, whole gzip; under half, staged lines stay
        staged.
        """
        budget = 45 * (STREAM_OVERHEAD_BYTES + 9400)  # a 9.3 KB line a stream
        registry = self.make(budget=budget)
        registry.start_checkpoints()
        sent = {client: [noisy(client, client, 4600)] for client in range(1, 21)}
        for messages in sent.values():
            registry.accept(messages[0])
        self.clock.advance(5.0)
        staged = registry.budget.held
        self.assertLess(staged, budget / 2)
        self.assertTrue(all(e.stream.staged_bytes for e in registry._open.values()))
        for client in range(21, 31):  # past half the budget
            m = noisy(client, client, 4600)
            sent[client] = [m]
            registry.accept(m)
        self.assertGreater(registry.budget.held, budget / 2)
        before = registry.budget.held
        self.clock.advance(5.0)  # the sweep: clients 1-20 idle for 10 s, 21-30 for 5 s
        self.assertEqual(sum(1 for e in registry._open.values() if e.stream.staged_bytes), 0)
        self.assertLess(registry.budget.held, before)
        self.assertBudgetIsOverhead(registry)
        self.successResultOf(registry.close_all())
        self.assertLanded(
            {key_for(DAY_START_MS, c): [m.to_line() for m in ms] for c, ms in sent.items()}
        )

    def test_off(self) -> None:
        """idle_s=0: no sweep; a busy key keeps its compressor until its part is cut."""
        registry = self.make(budget=1 << 30, part_size=1 << 20, idle_s=0)
        registry.start_checkpoints()
        for n in range(1, 80):
            registry.accept(noisy(n))
        self.clock.advance(LIFETIME / 2)
        (entry,) = registry._open.values()
        self.assertTrue(entry.stream.holds_compressor)


class ClientShareTests(RegistryCase):
    """
    ``client_budget_bytes``: each client's streams count in a share of their own,
    so a busy client is refused at its share while other clients are taken.
    """

    def test_busy_client_refused_at_its_share_others_taken(self) -> None:
        """
        Client 3, with its parts held by storage, is refused with "this client's
        buffers are full" once it holds its share (its object is completed early
        once; its next one, opened meanwhile, cannot be while the first holds
        unstored parts); client 4 is still taken, the global budget is not spent;
        once storage answers every line lands and the shares are gone.
        """
        share = STREAM_OVERHEAD_BYTES + COMPRESSOR_BYTES + 40 * 1024
        registry = self.make(budget=1 << 30, client_budget=share, stage_bytes=0)
        self.mem.hold("UploadPart")
        busy: list[bytes] = []
        refused = []
        for n in range(1, 1000):
            m = noisy(n, 3)
            try:
                registry.accept(m)
            except Busy as e:
                refused.append((n, e.reason))
                if len(refused) == 3:
                    break
            else:
                busy.append(m.to_line())
        self.assertEqual({reason for _, reason in refused}, {"this client's buffers are full"})
        self.assertEqual(refused[-1][0] - refused[0][0], 3, "at most one taken in between")
        self.assertGreaterEqual(registry.shares[3].held, share)
        self.assertFalse(registry.budget.exhausted)
        quiet = [message(n, client_id=4) for n in range(1, 20)]
        for m in quiet:
            registry.accept(m)
        self.assertRaises(Busy, registry.accept, noisy(10**6, 3))
        self.assertEqual(
            registry.budget.held, registry.shares[3].held + registry.shares[4].held
        )
        self.mem.release()
        self.clock.advance(LIFETIME)
        self.assertLanded(
            {KEY: busy, key_for(DAY_START_MS, 4): [m.to_line() for m in quiet]}
        )
        self.assertEqual((registry.budget.held, registry.shares), (0, {}))

    def test_batch_over_its_share_refused_whole(self) -> None:
        """
        A batch that does not fit in its client's share left is refused whole
        (nothing written), though the global budget has room; another client's
        batch is taken.
        """
        registry = self.make(budget=1 << 30, client_budget=STREAM_OVERHEAD_BYTES + 8 * 1024)
        batch = [message(n, client_id=3) for n in range(1, 300)]  # about 20 KB
        with self.assertRaises(Busy) as caught:
            registry.accept_batch(batch)
        self.assertEqual(
            caught.exception.reason, "this client's buffers are too full for this batch"
        )
        self.assertEqual((registry.open_keys, registry.budget.held), ([], 0))
        registry.accept_batch([message(n, client_id=4) for n in range(1, 30)])
        self.assertEqual(registry.open_keys, [key_for(DAY_START_MS, 4)])

    def test_relief_completes_the_clients_fullest_object(self) -> None:
        """
        A client whose share is spent by objects each holding part of a part (two
        dates, nothing in flight) gets its fullest object completed early, not
        another client's.
        """
        registry = self.make(
            budget=1 << 30,
            part_size=1 << 20,
            client_budget=2 * STREAM_OVERHEAD_BYTES + 24 * 1024,
        )
        registry.accept(noisy(1, 4))
        with capturedLogs() as events:
            with self.assertRaises(Busy):
                for n in range(1, 1000):
                    day = DAY_START_MS + (n % 2) * MS_PER_DAY
                    registry.accept(Message(os.urandom(500).hex(), n, 3, day))
        early = [e["key"] for e in events if "completing {key} early" in (e.get("log_format") or "")]
        self.assertEqual(len(early), 1)
        self.assertTrue(early[0].endswith("_3"), early)
        self.assertIn(key_for(DAY_START_MS, 4), registry.open_keys)
