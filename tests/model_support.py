"""
The pieces of the model-based test (:mod:`tests.test_model`): processes that write
into one shared :class:`MemoryStore`, each on its own clock, that can be killed at
any instant as SIGKILL would kill them.

- :class:`ProcessClock`: a ``task.Clock`` that stops running calls, even in the middle
  of an ``advance``, once its process is dead.
- :class:`ProcessClient`: a process's connection to the shared store.  While the
  process lives it passes every call and every answer through; once it is cut, new
  calls never answer and the answers of calls in flight are dropped, while the calls
  already sent still land in the store (a stalled one when it is released).
- :class:`Process`: one daemon as ``tap.make_store`` and ``service.build_service``
  wire it: a retry layer, a :class:`Lease`, an :class:`S3ObjectStore`, a
  :class:`StreamRegistry` with checkpoints, a :class:`Recoverer` run every
  ``RECOVERY_INTERVAL_S`` by a :class:`RecoveryService`.  It can also be paused
  (SIGSTOP: its clock stops, answers wait, then time jumps) or cut off from
  storage for a while (its calls fail without landing).
- :class:`World`: the master time, which advances the store's clock and every live
  process's clock together.
"""

from __future__ import annotations

import random
import sys
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.registry import STREAM_OVERHEAD_BYTES, Accepted, StreamRegistry, StreamSettings
from loghandler.retry import RetryLayer
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.api import IS3Client
from loghandler.storage.s3.lease import Lease
from loghandler.storage.s3.recovery import Recoverer, RecoveryService
from loghandler.storage.s3.writer import S3ObjectStore

#: The part size (and the store's part minimum) in the model: small, so that parts,
#: copies and ranges all happen with a few lines.
PART = 1024
LIFETIME_S = 6.0
CHECKPOINT_S = 2.0
LEASE_S = 1.0
RECOVERY_INTERVAL_S = 1.0
#: Merge uploads under ``chat/`` older than this are aborted by recovery's sweep.
STALE_MERGE_UPLOAD_S = 30.0
ATTEMPT_TIMEOUT_S = 5.0
#: The master clock moves in steps of this many seconds.
TICK_S = 0.25
#: Asks for the lease one process may make in one tick before it is deemed to spin.
SPIN_LIMIT = 10_000


def _of_killed_process(traceback: Any) -> bool:
    """Whether a traceback runs through the code of a killed process."""
    while traceback is not None:
        local = traceback.tb_frame.f_locals
        for value in (local.get("self"), local.get("client")):
            for client in (value, getattr(value, "client", None), getattr(value, "_client", None)):
                if isinstance(client, ProcessClient) and client.cut:
                    return True
        traceback = traceback.tb_next
    return False


def _quiet_killed(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """
    ``sys.unraisablehook`` without the reports of killed processes' coroutines.

    A killed process's coroutines wait forever for answers that never come.  When
    they are garbage-collected (during the test run or at its end), Python closes
    them, and one suspended in a merge (whose ``except BaseException`` awaits an
    abort) or in the bucket probe (whose ``finally`` awaits) waits again: Python
    reports "coroutine ignored GeneratorExit" on stderr.  A killed process is never
    collected, and its cut client sends nothing, so these reports are noise.
    """

    def unraisable(report: Any) -> None:
        if not (
            isinstance(report.exc_value, RuntimeError)
            and "coroutine ignored GeneratorExit" in str(report.exc_value)
            and _of_killed_process(report.exc_traceback)
        ):
            hook(report)

    return unraisable


sys.unraisablehook = _quiet_killed(sys.unraisablehook)


class ProcessClock(Clock):
    """A process's clock: once :attr:`frozen`, no call of it runs again."""

    frozen = False

    def advance(self, amount: float) -> None:
        """``Clock.advance``, stopping as soon as the process is dead."""
        if self.frozen:
            return
        self.rightNow += amount
        self._sortCalls()
        while not self.frozen and self.calls and self.calls[0].getTime() <= self.seconds():
            call = self.calls.pop(0)
            call.called = 1
            call.func(*call.args, **call.kw)
            self._sortCalls()


@implementer(IS3Client)
class ProcessClient:
    """
    One process's calls to the shared store (see the module docstring).

    :ivar cut: whether the process is dead.
    :ivar latency: seconds (on ``clock``) between a call's landing and its answer
        reaching the process; 0: at once.
    """

    def __init__(self, s3: MemoryStore, clock: Optional[Clock] = None) -> None:
        self._s3 = s3
        self.name = s3.name
        self.cut = False
        self.clock = clock
        self.latency = 0.0
        #: While set, calls fail at once without landing (a network partition).
        self.partitioned = False
        #: While set, answers wait in :attr:`_queued` (the process is paused).
        self.paused = False
        self._queued: list[tuple[Deferred[Any], Any]] = []

    def deliver_queued(self) -> None:
        """The answers that came while the process was paused, in order."""
        queued, self._queued = self._queued, []
        for answer, result in queued:
            self._deliver(answer, result)

    def _deliver(self, answer: "Deferred[Any]", result: Any) -> None:
        # A cancelled caller (timed out) or a dead process gets nothing; the call
        # landed, or lands on release, either way.
        if self.cut or answer.called:
            return
        if isinstance(result, Failure):
            answer.errback(result)
        else:
            answer.callback(result)

    def __repr__(self) -> str:
        return f"<ProcessClient {'cut' if self.cut else 'live'}>"

    def _send(
        self, call: Callable[..., "Deferred[Any]"], *args: Any, **kwargs: Any
    ) -> "Deferred[Any]":
        """Send one call (see the class docstring); its answer as this process sees it."""
        answer: Deferred[Any] = Deferred()
        if self.cut:
            return answer  # never answers
        if self.partitioned:
            answer.errback(ConnectionRefusedError("partitioned"))
            return answer
        sent = call(*args, **kwargs)

        def arrived(result: Any) -> None:
            if self.paused:
                self._queued.append((answer, result))
            else:
                self._deliver(answer, result)

        def landed(result: Any) -> None:
            if self.latency > 0 and self.clock is not None:
                self.clock.callLater(self.latency, arrived, result)
            else:
                arrived(result)

        sent.addBoth(landed)
        return answer

    def head(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """HeadObject."""
        return self._send(self._s3.head, *args, **kwargs)

    def get(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """GetObject."""
        return self._send(self._s3.get, *args, **kwargs)

    def put(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """PutObject."""
        return self._send(self._s3.put, *args, **kwargs)

    def create_upload(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """CreateMultipartUpload."""
        return self._send(self._s3.create_upload, *args, **kwargs)

    def upload_part(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """UploadPart."""
        return self._send(self._s3.upload_part, *args, **kwargs)

    def upload_part_copy(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """UploadPartCopy."""
        return self._send(self._s3.upload_part_copy, *args, **kwargs)

    def complete_upload(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """CompleteMultipartUpload."""
        return self._send(self._s3.complete_upload, *args, **kwargs)

    def abort_upload(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """AbortMultipartUpload."""
        return self._send(self._s3.abort_upload, *args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """DeleteObject."""
        return self._send(self._s3.delete, *args, **kwargs)

    def list_uploads(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """ListMultipartUploads."""
        return self._send(self._s3.list_uploads, *args, **kwargs)

    def list_parts(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """ListParts."""
        return self._send(self._s3.list_parts, *args, **kwargs)

    def list_objects(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        """ListObjectsV2."""
        return self._send(self._s3.list_objects, *args, **kwargs)

    def versioning(self) -> "Deferred[Any]":
        """GetBucketVersioning."""
        return self._send(self._s3.versioning)

    def check(self) -> "Deferred[Any]":
        """HeadBucket."""
        return self._send(self._s3.check)

    def close(self) -> "Deferred[Any]":
        """Nothing to close (the store is shared)."""
        return self._send(self._s3.close)


class Process:
    """
    One daemon process on the shared store (see the module docstring), started at
    the master time ``now``: its store is checked (which starts the lease), the
    checkpoints and the recovery service run on its own clock.

    :param name: its writer ID.
    :param on_taken_over: called with the process when its lease was taken over
        (production exits at once: the caller kills it).
    :ivar alive: False once killed.
    :ivar flushed: True once its flush on stop ended while it was alive.
    :ivar closed: True once its store closed after the flush (lease released).
    :ivar accepted: (Accepted, line) of every message it took, in order.
    """

    def __init__(
        self,
        name: str,
        s3: MemoryStore,
        now: float,
        rng: random.Random,
        on_taken_over: Callable[["Process"], None],
        latency: float = 0.0,
    ) -> None:
        self.name = name
        self.clock = ProcessClock()
        self.clock.rightNow = now
        self.client = ProcessClient(s3, self.clock)
        self.client.latency = latency
        self.budget = MemoryBudget(1 << 30)
        self.retry = RetryLayer(
            self.clock,
            attempt_timeout=ATTEMPT_TIMEOUT_S,
            backoff=Backoff(0.1, 2.0, uniform=rng.uniform),
            # From the example's generator too, so that hypothesis can replay it.
            permanent_backoff=Backoff(5.0, 60.0, uniform=rng.uniform),
        )
        self.lease = Lease(
            self.client,
            self.retry,
            self.clock,
            name,
            LEASE_S,
            lambda: on_taken_over(self),
            hostname="model",
            pid=0,
        )
        self.store = S3ObjectStore(
            self.client,
            self.clock,
            self.budget,
            part_size=PART,
            writer_id=name,
            retry=self.retry,
            lease=self.lease,
        )
        self.registry = StreamRegistry(
            self.store,
            self.clock,
            StreamSettings(
                part_size=PART,
                lifetime_s=LIFETIME_S,
                checkpoint_s=CHECKPOINT_S,
            ),
            self.budget,
            uniform=rng.uniform,
        )
        self.recoverer = Recoverer(
            self.client,
            self.retry,
            self.store.merger,
            self.lease,
            name,
            LEASE_S,
            self.store.merge_slots,
            stale_merge_upload_s=STALE_MERGE_UPLOAD_S,
        )
        self.recovery = RecoveryService(self.recoverer, RECOVERY_INTERVAL_S, self.clock)
        # A loop that never yields would hang the test: staging writes ask for the
        # lease each time round, so too many asks in one tick end it, and say so.
        self._lease_held = self.store.lease_held
        self.store.lease_held = self._count_lease_held
        self._asks = 0
        #: Set when the process spun (see ``_count_lease_held``).
        self.spun = False
        self.alive = True
        #: Until when (master seconds) the process is paused or cut off, if it is.
        self.paused_until: Optional[float] = None
        self.partitioned_until: Optional[float] = None
        self._owed = 0.0  # seconds its clock has yet to move by when it resumes
        self._answers_first = False
        self._stop_pending: Optional[tuple[float, Callable[[Process], None]]] = None
        self.flushed = False
        #: The lines it knew to be in storage when its flush ended.
        self.durable_at_stop: set[bytes] = set()
        self.closed = False
        self.accepted: list[tuple[Accepted, bytes]] = []
        # As StreamService.startService, then the background services.
        self.registry.ready = False
        self.registry.start_checkpoints()
        self.store.check().addCallback(self._ready)
        self.recovery.startService()

    def __repr__(self) -> str:
        return f"<Process {self.name} {'alive' if self.alive else 'dead'}>"

    def _ready(self, result: None) -> None:
        self.registry.ready = True

    def _count_lease_held(self) -> "Deferred[None]":
        self._asks += 1
        if self._asks > SPIN_LIMIT:
            self.spun = True
            raise RuntimeError(f"{self.name} spins: {self._asks} asks for the lease in a tick")
        return self._lease_held()

    def tick(self, now: float, step: float) -> None:
        """The master time moved by ``step`` to ``now``: so does this process's clock."""
        self._asks = 0
        if self.partitioned_until is not None and now >= self.partitioned_until - 1e-9:
            self.partitioned_until = None
            self.client.partitioned = False
        if self.paused_until is None:
            self.clock.advance(step)
            return
        self._owed += step
        if now >= self.paused_until - 1e-9:
            self._resume()

    def pause(self, until: float, answers_first: bool) -> None:
        """
        SIGSTOP (or a long GC pause) until the master time ``until``: the clock stops,
        answers wait.  On resume the clock jumps by the time missed, and the waiting
        answers are read before the timers run when ``answers_first``, else after.
        """
        if self.paused_until is None:
            self.paused_until = until
            self._answers_first = answers_first
            self.client.paused = True

    def _resume(self) -> None:
        owed, self._owed = self._owed, 0.0
        self.paused_until = None
        self.client.paused = False
        if self._answers_first:
            # The clock reads the new time at once; the timers due run after.
            self.clock.rightNow += owed
            self.client.deliver_queued()
            self.clock.advance(0)
        else:
            self.clock.advance(owed)
            self.client.deliver_queued()
        if self._stop_pending is not None:  # SIGTERM came while stopped
            deadline_s, done = self._stop_pending
            self._stop_pending = None
            self.stop(deadline_s, done)

    def partition(self, until: float) -> None:
        """Its calls fail at once, without landing, until the master time ``until``."""
        self.partitioned_until = until
        self.client.partitioned = True

    def kill(self) -> None:
        """SIGKILL: the process's memory is gone; what it sent still lands."""
        self.alive = False
        self.client.cut = True
        self.clock.frozen = True

    def durable(self) -> set[bytes]:
        """The lines it took that it knows to be in storage (a part, checkpoint or tail)."""
        return {
            line
            for accepted, line in self.accepted
            if accepted.line <= accepted.stream.durable_lines
        }

    def stop(self, deadline_s: float, done: Callable[["Process"], None]) -> None:
        """
        As the root service's stop: the recovery service stops, then the flush with
        a deadline ``deadline_s`` from now (cut there); ``done(self)`` once it ended
        while the process lives, then the store closes (which releases the lease).
        """
        if self.paused_until is not None:
            self._stop_pending = (deadline_s, done)
            return
        self.recovery.stopService()
        self.store.stopping(self.clock.seconds() + deadline_s)

        def flushed(result: object) -> None:
            # A takeover fails the staging writes waiting for the lease (which ends
            # the flush) just before it kills the process: that is no clean stop.
            if self.alive and not self.lease.lost:
                self.flushed = True
                self.durable_at_stop = self.durable()
                done(self)
                self.store.close().addBoth(self._closed)

        # As StreamService.stopService: the flush is cut at the deadline.
        self.registry.close_all().addTimeout(deadline_s, self.clock).addBoth(flushed)

    def _closed(self, result: object) -> None:
        self.closed = True

    def held_bytes(self) -> int:
        """What the budget must show: stream overheads, unstored bytes, merges."""
        streams = [e.stream for e in self.registry._open.values()] + list(
            self.registry._closing
        )
        return (
            len(streams) * STREAM_OVERHEAD_BYTES
            + sum(stream.unstaged_bytes for stream in streams)
            + self.store.merger.holding
        )


class World:
    """
    The master time: the shared store's clock, and the processes, whose clocks move
    with it while they live.

    :ivar now: master seconds.
    :ivar processes: every process started, in order.
    """

    def __init__(self, min_part_size: int = PART) -> None:
        #: The latency of the processes started from now on (ProcessClient.latency).
        self.latency = 0.0
        self.now = 0.0
        self.s3 = MemoryStore(min_part_size=min_part_size, now=lambda: self.now)
        self.processes: list[Process] = []

    @property
    def live(self) -> list[Process]:
        """The processes alive, in start order."""
        return [p for p in self.processes if p.alive]

    def spawn(
        self,
        name: str,
        rng: random.Random,
        on_taken_over: Callable[[Process], None],
    ) -> Process:
        """Start a process now."""
        process = Process(name, self.s3, self.now, rng, on_taken_over, self.latency)
        self.processes.append(process)
        return process

    def advance(self, seconds: float, tick: float = TICK_S) -> None:
        """Time passes for the store and for every live process, ``tick`` at a time."""
        while seconds > 1e-9:
            step = min(tick, seconds)
            self.now += step
            for process in self.live:
                process.tick(self.now, step)
            seconds -= step

    def run_until(self, done: Callable[[], bool], limit_s: float, tick: float = TICK_S) -> float:
        """
        Advance until ``done()`` (checked before each tick) or ``limit_s`` passed.

        :returns: the master time when ``done()`` first held.
        :raises AssertionError: it did not within ``limit_s``.
        """
        end = self.now + limit_s
        while not done():
            assert self.now < end - 1e-9, "not done within %g s" % limit_s
            self.advance(tick, tick)
        return self.now
