"""
Tests for the writer lease (:mod:`loghandler.storage.s3.lease`) over the in-memory S3
(:class:`MemoryStore`) on a ``task.Clock``: the writes and their conditions, lost
answers, takeovers, :meth:`Lease.held` and :attr:`Lease.healthy_for`, release.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from loghandler.backoff import Backoff
from loghandler.interfaces import StorageError
from loghandler.retry import RetryLayer
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.layout import lease_key
from loghandler.storage.s3.lease import Lease, LeaseLost

LEASE_S = 10.0
KEY = lease_key("w1")


def etag(body: bytes) -> str:
    """The ETag the memory store gives ``body``."""
    return '"%s"' % hashlib.md5(body).hexdigest()


class RecordingStore(MemoryStore):
    """A MemoryStore that also records the conditions of every PutObject."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: (key, if_match, if_none_match, body) of every PutObject, in order.
        self.puts: list[tuple[str, Optional[str], bool, bytes]] = []

    def put(
        self,
        key: str,
        body: bytes,
        if_match: Optional[str] = None,
        if_none_match: bool = False,
        writes: Sequence[str] = (),
    ) -> "Deferred[str]":
        """PutObject, recorded."""
        self.puts.append((key, if_match, if_none_match, body))
        return super().put(key, body, if_match, if_none_match, writes)


class LeaseCase(SynchronousTestCase):
    """A recording memory S3, a retry layer with fixed waits (1, 2, 4, 4... s), a lease."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.s3 = RecordingStore(now=self.clock.seconds)
        self.retry = RetryLayer(
            self.clock, attempt_timeout=5.0, backoff=Backoff(1.0, 4.0, uniform=lambda a, b: b)
        )
        self.taken_over: list[None] = []
        self.lease = Lease(
            self.s3,
            self.retry,
            self.clock,
            "w1",
            LEASE_S,
            lambda: self.taken_over.append(None),
            hostname="host",
            pid=42,
        )
        self.addCleanup(self.lease.stop)

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Advance the clock by ``seconds`` in steps."""
        target = self.clock.seconds() + seconds
        while self.clock.seconds() + step <= target + 1e-9:
            self.clock.advance(step)
        if self.clock.seconds() < target:
            self.clock.advance(target - self.clock.seconds())

    def lease_puts(self) -> list[tuple[str, Optional[str], bool, bytes]]:
        return [put for put in self.s3.puts if put[0] == KEY]


class WriteTests(LeaseCase):
    """The writes: conditions, bodies, timing."""

    def test_first_write_if_none_match(self) -> None:
        """start() writes the lease at once, If-None-Match: *, with a JSON body."""
        self.lease.start()
        [(key, if_match, if_none_match, body)] = self.s3.puts
        self.assertEqual((key, if_match, if_none_match), (KEY, None, True))
        self.assertEqual(self.s3.body(KEY), body)
        fields = json.loads(body)
        self.assertEqual(
            (fields["writer_id"], fields["host"], fields["pid"], fields["renewal"]),
            ("w1", "host", 42, 1),
        )
        self.assertEqual(self.lease.renewals, 1)

    def test_renewals_if_match_every_lease_s(self) -> None:
        """Every lease_s a renewal, If-Match the ETag of the previous write; bodies differ."""
        self.lease.start()
        self.advance(LEASE_S - 1)
        self.assertEqual(len(self.s3.puts), 1)
        self.advance(1)
        self.advance(LEASE_S)
        puts = self.lease_puts()
        self.assertEqual(len(puts), 3)
        etags = [etag(put[3]) for put in puts]
        self.assertEqual([(p[1], p[2]) for p in puts[1:]], [(etags[0], False), (etags[1], False)])
        self.assertEqual(len({p[3] for p in puts}), 3)
        self.assertEqual(self.s3.objects[KEY].etag, etags[2])
        self.assertEqual(self.s3.objects[KEY].last_modified, 2 * LEASE_S)
        self.assertEqual(self.taken_over, [])

    def test_lost_answer_on_renewal_is_not_a_takeover(self) -> None:
        """
        A renewal lands but its answer is lost: the retry gets 412, the lease is read
        back, its body is ours, and its ETag is adopted; renewals go on.
        """
        self.lease.start()
        self.s3.lose_answer("PutObject")
        with capturedLogs() as events:
            self.advance(LEASE_S + 2)
        self.assertEqual(self.taken_over, [])
        self.assertFalse([e for e in events if e["log_level"] is LogLevel.critical])
        self.assertTrue([e for e in events if "had landed" in e["log_format"]])
        ops = [op for op, key in self.s3.calls]
        self.assertEqual(
            ops, ["PutObject", "PutObject", "PutObject", "HeadObject", "GetObject"]
        )
        self.advance(LEASE_S)
        last = self.lease_puts()[-1]
        self.assertEqual(last[1], etag(self.lease_puts()[-2][3]))
        self.assertEqual(self.s3.body(KEY), last[3])
        self.assertEqual(self.lease.renewals, 3)
        self.assertEqual(self.taken_over, [])

    def test_lost_answer_on_first_write(self) -> None:
        """The first write's answer is lost: its retry (If-None-Match) gets 412; adopted."""
        self.s3.lose_answer("PutObject")
        self.lease.start()
        self.advance(2)
        self.assertEqual(self.taken_over, [])
        self.assertEqual(self.lease.renewals, 1)
        self.successResultOf(self.lease.held())

    def test_one_renewal_in_flight(self) -> None:
        """Ticks while a renewal is still in flight are skipped."""
        self.retry = RetryLayer(self.clock, attempt_timeout=120.0)
        self.lease = Lease(self.s3, self.retry, self.clock, "w1", LEASE_S, lambda: None)
        self.lease.start()
        self.s3.hold("PutObject")
        self.advance(3 * LEASE_S + 5)
        self.assertEqual(len(self.lease_puts()), 2)
        self.s3.release()
        self.assertEqual(self.lease.renewals, 2)
        self.advance(5)
        self.assertEqual(len(self.lease_puts()), 3)
        self.assertEqual(self.lease.renewals, 3)


class TakeoverTests(LeaseCase):
    """A recoverer deleted the lease: on_taken_over once, renewals stop."""

    def assert_taken_over(self, events: list[dict[str, Any]]) -> None:
        self.assertEqual(self.taken_over, [None])
        critical = [e for e in events if e["log_level"] is LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertEqual(critical[0]["key"], KEY)
        self.assertTrue(self.lease.lost)
        puts = len(self.s3.puts)
        self.advance(5 * LEASE_S)
        self.assertEqual(len(self.s3.puts), puts)
        self.assertEqual(self.taken_over, [None])
        self.failureResultOf(self.lease.held(), LeaseLost)
        self.assertEqual(self.lease.healthy_for, 0.0)

    def test_deleted_412(self) -> None:
        """The lease deleted; If-Match answers 412 (as the memory store does)."""
        self.lease.start()
        self.advance(5)
        del self.s3.objects[KEY]
        with capturedLogs() as events:
            self.advance(5)
        self.assert_taken_over(list(events))
        self.assertNotIn(KEY, self.s3.objects)

    def test_deleted_404(self) -> None:
        """The lease deleted; If-Match answers 404 NoSuchKey (as S3 does)."""
        self.lease.start()
        del self.s3.objects[KEY]
        self.s3.fail("PutObject", StorageError("PutObject", 404, "NoSuchKey", KEY))
        with capturedLogs() as events:
            self.advance(LEASE_S)
        self.assert_taken_over(list(events))

    def test_replaced_by_another_body(self) -> None:
        """A 412 and the lease holds a body that is not ours: taken over."""
        self.lease.start()
        self.s3.store(KEY, b'{"writer_id": "someone else"}')
        with capturedLogs() as events:
            self.advance(LEASE_S)
        self.assert_taken_over(list(events))
        self.assertEqual(self.s3.body(KEY), b'{"writer_id": "someone else"}')

    def test_waiting_held_fails(self) -> None:
        """A held() waiting when the lease is taken over errbacks with LeaseLost."""
        self.lease.start()
        self.s3.fail("PutObject", StorageError("PutObject", 503, "SlowDown"), times=10)
        self.advance(2 * LEASE_S + 1)
        waiting = self.lease.held()
        self.assertNoResult(waiting)
        del self.s3.objects[KEY]
        self.advance(3 * LEASE_S)
        self.failureResultOf(waiting, LeaseLost)
        self.assertEqual(self.taken_over, [None])

    def test_release_after_takeover_deletes_nothing(self) -> None:
        """release() after a takeover sends nothing."""
        self.lease.start()
        del self.s3.objects[KEY]
        self.advance(LEASE_S)
        calls = len(self.s3.calls)
        self.successResultOf(self.lease.release())
        self.assertEqual(len(self.s3.calls), calls)


class NeverStartedTests(LeaseCase):
    def test_release_of_a_lease_never_started_deletes_nothing(self) -> None:
        """
        The store was never reached at start, so the lease was never written:
        release() sends nothing and fires at once (it retried a DeleteObject until
        the shutdown deadline before, found by the fresh tester: 25 s to stop).
        """
        self.s3.fail("DeleteObject", StorageError("DeleteObject", 404, "NoSuchBucket"), times=100)
        self.successResultOf(self.lease.release())
        self.assertEqual(self.s3.calls, [])


class HeldTests(LeaseCase):
    """held() and healthy_for."""

    def test_waits_for_first_write(self) -> None:
        """Before the first write lands, held() waits; it fires when it lands."""
        self.s3.hold("PutObject")
        self.lease.start()
        waiting = self.lease.held()
        self.assertNoResult(waiting)
        self.s3.release()
        self.successResultOf(waiting)

    def test_fresh_fires_at_once(self) -> None:
        """Less than 2 x lease_s after the last landed write was sent: at once."""
        self.lease.start()
        self.successResultOf(self.lease.held())
        self.s3.fail("PutObject", StorageError("PutObject", 503, "SlowDown"), times=100)
        self.advance(2 * LEASE_S - 0.5)
        self.successResultOf(self.lease.held())

    def test_outage_waits_until_a_renewal_lands(self) -> None:
        """
        Renewals fail from lease_s on (10 attempts: at 10, 11, 13, 17, 21, ... 41 s);
        from 2 x lease_s held() waits, and fires when the 11th attempt lands (45 s).
        """
        self.lease.start()
        self.s3.fail("PutObject", StorageError("PutObject", 503, "SlowDown"), times=10)
        self.advance(2 * LEASE_S)
        waiting = self.lease.held()
        self.assertNoResult(waiting)
        self.assertEqual(self.lease.healthy_for, 0.0)
        self.advance(24.5)
        self.assertNoResult(waiting)
        self.advance(0.5)
        self.successResultOf(waiting)
        self.assertEqual(self.lease.renewals, 2)
        self.successResultOf(self.lease.held())

    def test_stalled_renewal_adopted_then_next_one(self) -> None:
        """
        A renewal that stalls (attempts time out, the store lands them all at once
        later): the last attempt answers 412, the write is adopted as sent when the
        first attempt started, which is too old, so held() waits for the next tick.
        """
        self.lease.start()
        self.s3.hold("PutObject")
        self.advance(LEASE_S + 20)
        waiting = self.lease.held()
        self.assertNoResult(waiting)
        self.s3.release()
        self.assertEqual(self.taken_over, [])
        self.assertNoResult(waiting)
        self.advance(LEASE_S)
        self.successResultOf(waiting)

    def test_healthy_for(self) -> None:
        """healthy_for grows while renewals land; a gap over 2 x lease_s resets it."""
        self.assertEqual(self.lease.healthy_for, 0.0)
        self.lease.start()
        self.advance(35)
        self.assertEqual(self.lease.healthy_for, 35.0)
        self.s3.fail("PutObject", StorageError("PutObject", 503, "SlowDown"), times=10)
        self.advance(20)
        self.assertEqual(self.lease.healthy_for, 0.0)
        self.advance(60)
        # The 11th attempt landed at 40 + 35 = 75 s, sent then.
        self.assertEqual(self.clock.seconds(), 115.0)
        self.assertEqual(self.lease.healthy_for, 40.0)

    def test_short_gap_keeps_health(self) -> None:
        """A renewal that lands late but within 2 x lease_s keeps healthy_for growing."""
        self.lease.start()
        self.advance(5)
        self.s3.fail("PutObject", StorageError("PutObject", 503, "SlowDown"), times=2)
        self.advance(30)
        self.assertEqual(self.lease.healthy_for, 35.0)


class StopTests(LeaseCase):
    """release() and stop()."""

    def test_release_deletes(self) -> None:
        """release() stops the renewals and deletes the lease."""
        self.lease.start()
        self.advance(LEASE_S)
        with capturedLogs() as events:
            self.successResultOf(self.lease.release())
        self.assertNotIn(KEY, self.s3.objects)
        self.assertEqual(self.s3.calls[-1], ("DeleteObject", KEY))
        self.assertTrue([e for e in events if "released" in e["log_format"]])
        calls = len(self.s3.calls)
        self.advance(3 * LEASE_S)
        self.assertEqual(len(self.s3.calls), calls)
        self.failureResultOf(self.lease.held(), LeaseLost)
        self.assertEqual(self.taken_over, [])

    def test_release_retries_then_logs(self) -> None:
        """A DeleteObject refused for good is logged; release() still fires."""
        self.lease.start()
        self.s3.fail("DeleteObject", StorageError("DeleteObject", 400, "InvalidRequest"))
        with capturedLogs() as events:
            self.successResultOf(self.lease.release())
        self.assertIn(KEY, self.s3.objects)
        self.assertTrue([e for e in events if "not deleted" in e["log_format"]])

    def test_release_cancels_renewal_in_flight(self) -> None:
        """A renewal being retried when release() is called is given up."""
        self.lease.start()
        self.s3.fail("PutObject", StorageError("PutObject", 503, "SlowDown"), times=100)
        self.advance(LEASE_S + 0.5)
        self.successResultOf(self.lease.release())
        self.assertNotIn(KEY, self.s3.objects)
        puts = len(self.s3.puts)
        self.advance(60)
        self.assertEqual(len(self.s3.puts), puts)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_keeps_lease(self) -> None:
        """stop() stops the renewals and leaves the lease (a crash)."""
        self.lease.start()
        self.lease.stop()
        self.advance(5 * LEASE_S)
        self.assertEqual([op for op, _ in self.s3.calls], ["PutObject"])
        self.assertIn(KEY, self.s3.objects)
        self.failureResultOf(self.lease.held(), LeaseLost)
