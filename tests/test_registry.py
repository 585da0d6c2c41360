"""
Tests for :mod:`loghandler.registry`: routing by key, timer-driven completion,
admission (budget, backpressure, stopping), the flush and failure isolation, on a
``task.Clock`` with the in-memory store.
"""

from __future__ import annotations

import os

from twisted.internet.defer import CancelledError, fail
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from loghandler.interfaces import StorageError
from loghandler.keys import key_for
from loghandler.message import Message
from loghandler.registry import STREAM_OVERHEAD_BYTES, Busy, StreamRegistry, StreamSettings
from loghandler.storage.memory import MemoryStore
from tests.helpers import DAY_START_MS, MS_PER_DAY, message, noise_line, read_lines

LIFETIME = 60.0


class RegistryCase(SynchronousTestCase):
    """A registry with small parts over a memory store on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(min_part_size=16 * 1024, now=self.clock.seconds)
        self.registry = self.make(budget=1 << 30)

    def make(self, budget: int, part_size: int = 16 * 1024) -> StreamRegistry:
        return StreamRegistry(
            self.store,
            self.clock,
            StreamSettings(part_size=part_size, lifetime_s=LIFETIME, budget_bytes=budget),
        )


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
        self.assertEqual(sorted(self.store.objects), sorted(sent))
        self.assertIn("chat/2020-03-31/content_logs_2020-03-31_2", self.store.objects)
        for key, lines in sent.items():
            self.assertEqual(read_lines(self.store.body(key)), lines)


class RotationTests(RegistryCase):
    """Streams complete on a reactor timer, not on the next message."""

    def test_completed_after_lifetime_without_new_message(self) -> None:
        """After QUEUE_TIMEOUT the object is complete although no message came."""
        self.registry.accept(message(1))
        key = key_for(message(1).timestamp, 3)
        self.clock.advance(LIFETIME - 1)
        self.assertNotIn(key, self.store.objects)
        self.clock.advance(1)
        self.assertEqual(read_lines(self.store.body(key)), [message(1).to_line()])
        self.assertEqual(self.registry.open_keys, [])

    def test_next_stream_appends(self) -> None:
        """A message after rotation opens a new stream that appends to the object."""
        self.registry.accept(message(1))
        self.clock.advance(LIFETIME)
        self.registry.accept(message(2))
        self.clock.advance(LIFETIME)
        key = key_for(message(1).timestamp, 3)
        self.assertEqual(
            read_lines(self.store.body(key)), [message(1).to_line(), message(2).to_line()]
        )


class AdmissionTests(RegistryCase):
    """When messages are refused with Busy (503)."""

    def test_budget(self) -> None:
        """Past the buffer budget new messages are refused; completing frees it."""
        self.registry = self.make(budget=STREAM_OVERHEAD_BYTES + 8 * 1024)
        self.store.hold("UploadPart")
        accepted = []
        with self.assertRaises(Busy) as caught:
            for n in range(1, 100000):
                m = Message(os.urandom(500).hex(), n, 3, DAY_START_MS)
                self.registry.accept(m)
                accepted.append(m.to_line())
        self.assertEqual(caught.exception.reason, "buffers are full")
        self.assertGreater(len(accepted), 10)
        self.assertGreaterEqual(self.registry.budget.held, self.registry.budget.limit)
        self.store.release()
        self.clock.advance(LIFETIME)
        self.assertEqual(self.registry.budget.held, 0)
        self.registry.accept(message(5000))
        key = key_for(DAY_START_MS, 3)
        self.assertEqual(read_lines(self.store.body(key)), accepted)

    def test_budget_spent_by_partial_parts_completes_largest(self) -> None:
        """
        When the budget is spent by objects each holding part of a part (nothing in
        flight), the one buffering most is completed early, so messages are taken
        again without waiting for rotation.
        """
        self.registry = self.make(budget=2 * STREAM_OVERHEAD_BYTES + 256 * 1024, part_size=1 << 20)
        sent: dict[int, list[bytes]] = {3: [], 4: []}
        with capturedLogs() as events:
            with self.assertRaises(Busy):
                for n in range(1, 100000):
                    client = 3 if n % 3 else 4
                    m = Message(os.urandom(200).hex(), n, client, DAY_START_MS)
                    self.registry.accept(m)
                    sent[client].append(m.to_line())
        self.assertEqual(
            [e["key"] for e in events if "completing {key} early" in e.get("log_format", "")],
            [key_for(DAY_START_MS, 3)],
        )
        self.assertEqual(read_lines(self.store.body(key_for(DAY_START_MS, 3))), sent[3])
        self.registry.accept(message(1, 3))

    def test_part_limit_completes_object(self) -> None:
        """A stream one part short of 10,000 parts is completed and a new one opened."""
        self.registry.accept(message(1))
        key = key_for(message(1).timestamp, 3)
        self.registry._open[key].stream._next_number = 10_000
        self.registry.accept(message(2))
        self.assertEqual(self.registry.open_keys, [])
        self.assertEqual(
            read_lines(self.store.body(key)), [message(1).to_line(), message(2).to_line()]
        )

    def test_stopping(self) -> None:
        """Once close_all started, messages are refused with 'server is stopping'."""
        self.registry.close_all()
        with self.assertRaises(Busy) as caught:
            self.registry.accept(message(1))
        self.assertEqual(caught.exception.reason, "server is stopping")

    def test_backed_up_key_refused_other_keys_taken(self) -> None:
        """While one key's parts wait for upload, its messages get Busy; others go on."""
        self.store.hold("UploadPart")

        stream_key = key_for(message(1).timestamp, 3)
        with self.assertRaises(Busy) as caught:
            for n in range(1, 100000):
                self.registry.accept(message(n))
                entry = self.registry._open[stream_key]
                entry.stream.write(noise_line(n, 2000))
        self.assertEqual(caught.exception.reason, "uploads for this object are backed up")
        self.registry.accept(message(1, client_id=4))
        self.store.release()
        self.registry.accept(message(2))


class FlushTests(RegistryCase):
    """close_all completes everything in parallel and is bounded by cancellation."""

    def test_parallel(self) -> None:
        """All objects' final writes are in flight at once, not one after another."""
        for client in (1, 2, 3):
            self.registry.accept(message(client, client))
        self.store.hold("PutObject")
        done = self.registry.close_all()
        self.assertEqual(len(self.store.held), 3)
        self.assertNoResult(done)
        self.store.release()
        self.successResultOf(done)
        self.assertEqual(len(self.store.objects), 3)

    def test_waits_for_rotated_streams(self) -> None:
        """A stream already completing at stop time is waited for too."""
        self.registry.accept(message(1))
        self.store.hold("PutObject")
        self.clock.advance(LIFETIME)
        done = self.registry.close_all()
        self.assertNoResult(done)
        self.store.release()
        self.successResultOf(done)
        self.assertEqual(len(self.store.objects), 1)

    def test_cancel_abandons(self) -> None:
        """Cancelling the flush (deadline) abandons the completions and logs the loss."""
        self.registry.accept(message(1))
        self.store.hold("PutObject")
        done = self.registry.close_all()
        with capturedLogs() as events:
            done.cancel()
        self.failureResultOf(done, CancelledError)
        self.assertTrue(any("lost_bytes" in e for e in events))


class IsolationTests(RegistryCase):
    """One object's trouble never stops the others."""

    def test_failing_key_does_not_block_others(self) -> None:
        """
        With every PutObject for one key failing, the other keys complete and the
        failing one keeps its data and retries.
        """
        bad = key_for(message(1).timestamp, 1)
        real_put = self.store.put

        def put(key, body, **conditions):  # type: ignore[no-untyped-def]
            if key == bad:
                return fail(StorageError("PutObject", 403, "AccessDenied"))
            return real_put(key, body, **conditions)

        self.store.put = put  # type: ignore[method-assign]
        for client in (1, 2, 3):
            self.registry.accept(message(client, client))
        self.clock.advance(LIFETIME)
        self.assertEqual(len(self.store.objects), 2)
        self.assertNotIn(bad, self.store.objects)
        self.registry.accept(message(10, 2))
        self.store.put = real_put  # type: ignore[method-assign]
        self.clock.advance(120)
        self.assertEqual(read_lines(self.store.body(bad)), [message(1, 1).to_line()])

    def test_exception_in_stream_completes_it(self) -> None:
        """An exception inside a stream's write completes that stream and is raised."""
        self.registry.accept(message(1))
        key = key_for(message(1).timestamp, 3)
        stream = self.registry._open[key].stream

        def broken(data: bytes) -> None:
            raise RuntimeError("broken compressor")

        stream._encoder.write = broken  # type: ignore[method-assign]
        with capturedLogs() as events:
            self.assertRaises(RuntimeError, self.registry.accept, message(2))
        self.assertEqual(read_lines(self.store.body(key)), [message(1).to_line()])
        self.assertTrue(any(e.get("log_failure") for e in events))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.registry.accept(message(3))
        self.assertEqual(self.registry.open_keys, [key])
