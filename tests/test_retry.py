"""
Tests for :mod:`loghandler.retry`: how each failure is classified, what is retried,
waits with jitter, the deadline, and what is logged and reported.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from loghandler.backoff import Backoff
from loghandler.interfaces import Abandoned, PreconditionFailed, StorageError
from loghandler.retry import STOPPING_MAX_WAIT_S, Fault, RetryLayer, StorageFault, classify

CASES: list[tuple[BaseException, Fault]] = [
    (ConnectionRefusedError(), Fault.TRANSIENT),
    (DNSLookupError("s3"), Fault.TRANSIENT),
    (ResponseNeverReceived([]), Fault.TRANSIENT),
    (RuntimeError("nobody expected this"), Fault.TRANSIENT),
    (StorageError("UploadPart", 500, "InternalError"), Fault.TRANSIENT),
    (StorageError("UploadPart", 503, "SlowDown"), Fault.TRANSIENT),
    (StorageError("CompleteMultipartUpload", 200, "InternalError"), Fault.TRANSIENT),
    (StorageError("UploadPart", 400, "RequestTimeout"), Fault.TRANSIENT),
    (StorageError("PutObject", 403, "AccessDenied"), Fault.PERMANENT),
    (StorageError("PutObject", 404, "NoSuchBucket"), Fault.PERMANENT),
    (StorageError("PutObject", 400, "AuthorizationHeaderMalformed"), Fault.PERMANENT),
    (StorageError("PutObject", 400, "KMS.NotFoundException"), Fault.PERMANENT),
    (StorageError("CreateMultipartUpload", 400, "KMS.DisabledException"), Fault.PERMANENT),
    (StorageError("PutObject", 400, "KMS.KMSInvalidStateException"), Fault.PERMANENT),
    (PreconditionFailed("PutObject"), Fault.CONFLICT),
    (StorageError("CompleteMultipartUpload", 409, "ConditionalRequestConflict"), Fault.CONFLICT),
    (StorageError("UploadPart", 404, "NoSuchUpload"), Fault.GONE),
    (StorageError("GetObject", 404, "NoSuchKey"), Fault.GONE),
    (StorageError("CompleteMultipartUpload", 400, "EntityTooSmall"), Fault.INVALID),
    (StorageError("CompleteMultipartUpload", 400, "InvalidPart"), Fault.INVALID),
]


class ClassifyTests(SynchronousTestCase):
    """Every failure gets one class."""

    def test_table(self) -> None:
        """Each error of the table is classified as the table says."""
        for error, fault in CASES:
            self.assertEqual((error, classify(error)), (error, fault))


class Calls:
    """A call that fails with the given errors first, then answers ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.count = 0

    def __call__(self) -> "Deferred[str]":
        self.count += 1
        if self.errors:
            return fail(self.errors.pop(0))
        return succeed("ok")


class RetryLayerTests(SynchronousTestCase):
    """What the layer retries, how long it waits, when it stops."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.draws: list[tuple[float, float]] = []

        def uniform(low: float, high: float) -> float:
            self.draws.append((low, high))
            return high

        self.layer = RetryLayer(
            self.clock,
            attempt_timeout=30.0,
            backoff=Backoff(1.0, 8.0, uniform=uniform),
            permanent_backoff=Backoff(5.0, 60.0, uniform=uniform),
        )

    def start(self, call: Any, **kwargs: Any) -> "Deferred[Any]":
        return ensureDeferred(self.layer.call("PutObject", "k", call, **kwargs))

    def test_transient_retried_with_full_jitter(self) -> None:
        """Transient failures wait uniform(0, min(cap, base * 2**n)) and try again."""
        call = Calls(StorageError("PutObject", 503, "SlowDown"), ConnectionRefusedError())
        d = self.start(call)
        self.assertEqual(call.count, 1)
        self.clock.advance(1.0)
        self.assertEqual(call.count, 2)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(self.draws, [(0.0, 1.0), (0.0, 2.0)])
        self.assertEqual(self.layer.retries, {"PutObject": 2})

    def test_caller_handles_conflict_gone_invalid(self) -> None:
        """CONFLICT, GONE and INVALID are raised at once as StorageFault."""
        for error, fault in [
            (PreconditionFailed("PutObject"), Fault.CONFLICT),
            (StorageError("PutObject", 404, "NoSuchUpload"), Fault.GONE),
            (StorageError("PutObject", 400, "InvalidPart"), Fault.INVALID),
        ]:
            failure = self.failureResultOf(self.start(Calls(error)), StorageFault)
            self.assertIs(failure.value.fault, fault)
            self.assertIs(failure.value.error, error)

    def test_unexpected_logged_once_and_retried(self) -> None:
        """An exception of an unknown type is retried and logged with its traceback once."""
        call = Calls(KeyError("x"), KeyError("y"))
        with capturedLogs() as events:
            d = self.start(call)
            self.clock.pump([1.0] * 10)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(len([e for e in events if e.get("log_failure")]), 1)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_permanent_reported_once_then_cleared(self) -> None:
        """
        403 sets ``problem`` and logs one error however often it repeats; retried
        slowly; success clears the problem.
        """
        denied = StorageError("PutObject", 403, "AccessDenied")
        with capturedLogs() as events:
            d = self.start(Calls(denied, denied, denied))
            self.assertEqual(self.layer.problem, "PutObject fails: 403 AccessDenied")
            self.clock.advance(5.0)
            self.clock.advance(10.0)
            self.assertFalse(d.called)
            self.clock.advance(20.0)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertIsNone(self.layer.problem)
        self.assertEqual(len([e for e in events if e["log_level"].name == "error"]), 1)

    def test_problem_cleared_only_by_its_operation(self) -> None:
        """
        While PutObject is refused (403), other operations succeeding leave the
        problem set and log nothing again; a PutObject that succeeds clears it.
        """
        denied = StorageError("PutObject", 403, "AccessDenied")
        with capturedLogs() as events:
            d = self.start(Calls(denied, denied))
            ok = ensureDeferred(self.layer.call("HeadObject", "k", Calls()))
            self.assertEqual(self.successResultOf(ok), "ok")
            self.assertEqual(self.layer.problem, "PutObject fails: 403 AccessDenied")
            self.clock.pump([5.0, 10.0])
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertIsNone(self.layer.problem)
        self.assertEqual(len([e for e in events if e["log_level"].name == "error"]), 1)

    def test_attempt_timeout(self) -> None:
        """An attempt that never answers is cancelled after attempt_timeout and retried."""
        answers: list[Deferred[str]] = [Deferred(), succeed("ok")]  # type: ignore[list-item]
        d = self.start(lambda: answers.pop(0))
        self.clock.advance(30.0)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(d), "ok")

    def test_stopping_wakes_and_caps(self) -> None:
        """
        The flush wakes a sleeping retry at once; an attempt's timeout is capped at
        the deadline, after which the call raises Abandoned.
        """
        never: Deferred[str] = Deferred()
        calls = [fail(StorageError("PutObject", 503, "SlowDown")), never]
        d = self.start(lambda: calls.pop(0))
        self.assertEqual(len(calls), 1)
        self.layer.stopping(self.clock.seconds() + 5.0)
        self.assertEqual(len(calls), 0)  # woken: the second attempt runs now
        self.clock.advance(5.0)
        self.failureResultOf(d, Abandoned)

    def test_waits_short_while_stopping(self) -> None:
        """
        During the flush a failure drawn to wait 8 s waits at most
        STOPPING_MAX_WAIT_S: storage that comes back before the deadline is used at
        once, not after the deadline.
        """
        self.layer.stopping(self.clock.seconds() + 20.0)
        refused = ConnectionRefusedError()
        call = Calls(*[refused] * 10)
        d = self.start(call)
        self.clock.pump([STOPPING_MAX_WAIT_S] * 10)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(call.count, 11)
        self.assertLess(self.clock.seconds(), 20.0)

    def test_cancelled_by_caller(self) -> None:
        """A caller that gives up gets Abandoned, not a retry."""
        d = self.start(lambda: Deferred())
        d.cancel()
        self.failureResultOf(d, Abandoned)


class DeadlinePassedTests(SynchronousTestCase):
    """Times computed once the shutdown deadline has passed."""

    def test_wait_and_timeout_never_negative(self) -> None:
        """
        An attempt that fails just after the deadline: the wait logged ("retry 1
        in -0.00 s" before) and the next attempt's timeout are 0, never negative.
        """
        clock = Clock()
        layer = RetryLayer(clock, attempt_timeout=10.0, backoff=Backoff(1.0, 8.0))
        layer.stopping(clock.seconds() + 1.0)
        clock.advance(1.5)
        self.assertEqual(layer._capped(5.0), 0.0)
        self.assertEqual(layer.attempt_timeout(), 0.0)
