"""
A writer's lease (DESIGN.md section 6): the object ``_loghandler/writers/{writer_id}``
(:func:`~loghandler.storage.s3.layout.lease_key`), rewritten every ``lease_s`` seconds
(``LEASE_S``) while the process runs and deleted after a clean stop.  A writer whose
lease is missing or older than 3 x ``lease_s`` by S3's own clock is gone: recovery
(:mod:`loghandler.storage.s3.recovery`) deletes its lease, then merges what it staged.

- The first write is ``If-None-Match: *``; each renewal is ``If-Match`` the ETag of
  our last landed write, and its body (JSON: writer ID, host, process ID, renewal
  number, a per-process nonce, local time) is unique, so that a write can be told to
  be ours.
- A lost answer is not a takeover: the retry layer sends the write again, which then
  answers 412 because the first attempt landed.  On a 412 the lease is read back
  (HEAD, then GET ``If-Match`` its ETag); when its body is the one we were writing,
  that ETag is adopted.  A 412 on any other body, or a 404 (S3 answers ``NoSuchKey``
  to ``If-Match`` on a missing key), means a recoverer deleted the lease: the lease
  is lost for good, ``on_taken_over`` is called once, and renewals stop.
- :meth:`Lease.held` tells writers whether they may stage: the last landed write was
  sent (local clock, when the attempt that landed started) less than 2 x ``lease_s``
  ago.  A recoverer judges the writer gone only after 3 x ``lease_s`` by S3's clock,
  so a staging upload started while the lease is held has ``lease_s`` of margin.

S3 API pages: PutObject (``If-Match``, ``If-None-Match``), HeadObject, GetObject,
DeleteObject; "Conditional requests"
(https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-requests.html).
"""

from __future__ import annotations

import enum
import json
import os
import socket
import uuid
from typing import Callable, Optional

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from loghandler.interfaces import Abandoned
from loghandler.retry import Fault, RetryLayer, StorageFault
from loghandler.storage.s3.api import IS3Client
from loghandler.storage.s3.layout import lease_key


class LeaseLost(Exception):
    """
    The lease is not held and never will be again: a recoverer took it over
    (deleted it), or it was stopped or released.  Nothing may be staged under it.
    """


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    LOST = "lost"
    STOPPED = "stopped"
    RELEASED = "released"


class Lease:
    """
    One process's lease (see the module docstring).

    :param client: the bucket's calls.
    :param retry: the retry layer every call goes through.
    :param clock: the local clock, for renewals and :meth:`held`.
    :param writer_id: this process's writer ID.
    :param lease_s: seconds between renewals (``LEASE_S``).
    :param on_taken_over: called once when a recoverer took the lease over.
    :param hostname: written into the lease body; the machine's name by default.
    :param pid: written into the lease body; this process's ID by default.
    :ivar key: the lease's key.
    :ivar renewals: writes that landed (the first included).
    """

    _log = Logger()

    def __init__(
        self,
        client: IS3Client,
        retry: RetryLayer,
        clock: IReactorTime,
        writer_id: str,
        lease_s: float,
        on_taken_over: Callable[[], None],
        hostname: Optional[str] = None,
        pid: Optional[int] = None,
    ) -> None:
        self._client = client
        self._retry = retry
        self._clock = clock
        self.writer_id = writer_id
        self.lease_s = lease_s
        self._on_taken_over = on_taken_over
        self._hostname = socket.gethostname() if hostname is None else hostname
        self._pid = os.getpid() if pid is None else pid
        self._nonce = uuid.uuid4().hex
        self.key = lease_key(writer_id)
        self._state = _State.NEW
        self._loop: Optional[LoopingCall] = None
        self._in_flight: Optional[Deferred[None]] = None
        self._waiters: list[Deferred[None]] = []
        # ETag of our last landed write, and when (local clock) its attempt started.
        self._etag: Optional[str] = None
        self._sent: Optional[float] = None
        # When the current run of renewals without a gap began (local clock).
        self._healthy_since: Optional[float] = None
        self._counter = 0
        self.renewals = 0

    def __repr__(self) -> str:
        return f"<Lease {self.key} {self._state.value}>"

    # -- the state writers and recovery read -------------------------------------

    @property
    def lost(self) -> bool:
        """Whether a recoverer took the lease over."""
        return self._state is _State.LOST

    def _fresh(self) -> bool:
        return (
            self._state is not _State.LOST
            and self._state is not _State.RELEASED
            and self._sent is not None
            and self._clock.seconds() - self._sent < 2 * self.lease_s
        )

    @property
    def healthy_for(self) -> float:
        """
        Seconds (local clock) since which the lease has been held without a break:
        since the sending of the first write of the current run of writes that each
        landed less than 2 x ``lease_s`` after the previous one was sent.  0 while
        the lease is not held.
        """
        if not self._fresh() or self._healthy_since is None:
            return 0.0
        return self._clock.seconds() - self._healthy_since

    def held(self) -> "Deferred[None]":
        """
        Fires (with None) once the lease is held: at once when the last landed write
        was sent less than 2 x ``lease_s`` ago, else when a write lands that makes
        it so.  Writers call this before every staging upload.

        :raises LeaseLost: (errback) taken over, released, or stopped while not held;
            also for callers still waiting when that happens.  Cancelling the
            Deferred only stops the wait.
        """
        if self._fresh():
            return succeed(None)
        if self._state in (_State.LOST, _State.STOPPED, _State.RELEASED):
            return fail(LeaseLost(f"{self.key}: {self._state.value}"))

        def cancel(d: "Deferred[None]") -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        waiter: Deferred[None] = Deferred(cancel)
        self._waiters.append(waiter)
        return waiter

    # -- running -------------------------------------------------------------------

    def start(self) -> None:
        """
        Write the lease now (``If-None-Match: *``), then renew it every ``lease_s``
        seconds.  A tick while a renewal is still being retried is skipped.
        """
        if self._state is not _State.NEW:
            raise RuntimeError(f"{self!r} started twice")
        self._state = _State.RUNNING
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self.lease_s, now=True).addErrback(
            lambda f: self._log.failure(
                "{key}: lease renewals stopped", f, event="lease_renewals_stopped", key=self.key
            )
        )

    def stop(self) -> None:
        """
        Stop renewing, without deleting the lease (as a crash would).  A renewal in
        flight is cancelled; :meth:`held` fires from now on only while the last
        landed write is fresh, else errbacks with :class:`LeaseLost`.
        """
        self._halt(_State.STOPPED)

    def release(self) -> "Deferred[None]":
        """
        After the flush on a clean stop: stop renewing and delete the lease (one call
        through the retry layer, so other processes may recover what stayed staged
        at once).  Never errbacks: a failure is logged, and the lease then expires.
        """
        # Lost: recovery claimed it.  New: never started, so never written (the store
        # was not reached at start): nothing to delete, and trying would hold the
        # stop for SHUTDOWN_TIMEOUT_S against a store that does not answer.
        nothing_to_delete = self._state in (_State.LOST, _State.NEW)
        self._halt(_State.RELEASED)
        if nothing_to_delete:
            return succeed(None)
        d = ensureDeferred(
            self._retry.call("DeleteObject", self.key, lambda: self._client.delete(self.key))
        )

        def failed(failure: Failure) -> None:
            self._log.warn(
                "{key}: lease not deleted ({error}); it expires in {expiry:g} s",
                event="lease_not_deleted",
                key=self.key,
                error=str(failure.value),
                expiry=3 * self.lease_s,
            )

        def deleted(result: object) -> None:
            self._log.info("{key}: lease released", event="lease_released", key=self.key)

        return d.addCallbacks(deleted, failed)

    def _halt(self, state: _State, cancel: bool = True) -> None:
        """
        Stop renewing (cancelling the renewal in flight unless ``cancel`` is false:
        it is the caller); fail the waiters.  LOST stays LOST.
        """
        if self._state is not _State.LOST:
            self._state = state
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if cancel and self._in_flight is not None:
            self._in_flight.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(LeaseLost(f"{self.key}: {self._state.value}"))

    def _cancelled(self) -> bool:
        return self._state is not _State.RUNNING

    def _tick(self) -> None:
        if self._state is not _State.RUNNING or self._in_flight is not None:
            return
        d = ensureDeferred(self._renew())
        self._in_flight = d
        d.addErrback(self._renewal_failed)
        d.addBoth(self._settled)

    def _settled(self, result: object) -> None:
        self._in_flight = None

    def _renewal_failed(self, failure: Failure) -> None:
        if failure.check(Abandoned, CancelledError):
            if self._state is _State.RUNNING:
                self._log.info(
                    "{key}: lease renewal abandoned ({error})",
                    event="lease_renewal_abandoned",
                    key=self.key,
                    error=str(failure.value),
                )
            return
        self._log.error(
            "{key}: lease renewal failed ({error}); trying again in {lease_s:g} s",
            event="lease_renewal_failed",
            key=self.key,
            error=str(failure.value),
            lease_s=self.lease_s,
        )

    def _body(self, counter: int) -> bytes:
        """The JSON body of write number ``counter``: unique to this write."""
        return json.dumps(
            {
                "writer_id": self.writer_id,
                "host": self._hostname,
                "pid": self._pid,
                "renewal": counter,
                "nonce": self._nonce,
                "time": self._clock.seconds(),
            },
            sort_keys=True,
        ).encode()

    async def _renew(self) -> None:
        """One write of the lease, retried; a 412 or 404 is checked as above."""
        self._counter += 1
        body = self._body(self._counter)
        etag = self._etag
        started: list[float] = []

        def attempt() -> "Deferred[str]":
            started.append(self._clock.seconds())
            if etag is None:
                return self._client.put(self.key, body, if_none_match=True)
            return self._client.put(self.key, body, if_match=etag)

        landed: Optional[str]
        try:
            landed = await self._retry.call(
                "PutObject", self.key, attempt, cancelled=self._cancelled
            )
            sent = started[-1]
        except StorageFault as e:
            if e.fault is Fault.CONFLICT:
                landed = await self._ours(body)
            elif e.fault is Fault.GONE:
                landed = None
            else:
                raise
            # Which attempt landed is unknown: the first one is the safe guess.
            sent = started[0]
            if landed is None:
                self._taken_over(e)
                return
            self._log.info(
                "{key}: lease write {counter} had landed (its answer was lost)",
                event="lease_write_landed",
                key=self.key,
                counter=self._counter,
            )
        if self._state is not _State.RUNNING:
            return
        self._landed(landed, sent)

    async def _read(self) -> Optional[tuple[str, bytes]]:
        """
        The lease's ETag and body (HEAD, then GET ``If-Match`` that ETag), or None
        when it is missing, or changed or deleted between the two.
        """
        info = await self._retry.call(
            "HeadObject", self.key, lambda: self._client.head(self.key), cancelled=self._cancelled
        )
        if info is None:
            return None
        etag = info.etag
        try:
            body: bytes = await self._retry.call(
                "GetObject",
                self.key,
                lambda: self._client.get(self.key, etag),
                cancelled=self._cancelled,
            )
        except StorageFault as e:
            if e.fault in (Fault.CONFLICT, Fault.GONE):
                return None  # changed or deleted since the HEAD: not by us
            raise
        return etag, body

    async def _ours(self, body: bytes) -> Optional[str]:
        """The lease's ETag when its body is ``body``, else None (also when missing)."""
        current = await self._read()
        return current[0] if current is not None and current[1] == body else None

    async def confirm(self) -> bool:
        """
        Whether the lease is still ours, read from S3 now: a writer whose staging
        upload vanished asks, since a recoverer that took the writer over completes
        its uploads.  When it is not ours (missing, or another body: a recoverer's
        claim), the lease is taken over (``on_taken_over`` is called) and False is
        returned.

        :raises Abandoned: the deadline passed first.
        """
        if self._state is not _State.RUNNING:
            return False
        current = await self._read()
        ours = current is not None and self._written_by_us(current[1])
        if not ours:
            self._taken_over(Exception("the lease is not this writer's any more"))
        return ours

    def _written_by_us(self, body: bytes) -> bool:
        """Whether ``body`` is one of this process's lease writes (its nonce)."""
        try:
            fields = json.loads(body)
        except ValueError:
            return False
        return (
            isinstance(fields, dict)
            and fields.get("writer_id") == self.writer_id
            and fields.get("nonce") == self._nonce
        )

    def _landed(self, etag: str, sent: float) -> None:
        now = self._clock.seconds()
        if self._sent is None or now - self._sent >= 2 * self.lease_s:
            if self._sent is not None:
                self._log.warn(
                    "{key}: lease renewed after {gap:.1f} s without one",
                    event="lease_renewed_late",
                    key=self.key,
                    gap=now - self._sent,
                )
            self._healthy_since = sent
        self._etag = etag
        self._sent = sent
        self.renewals += 1
        if self._fresh():
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _taken_over(self, error: BaseException) -> None:
        if self._state is not _State.RUNNING:
            return
        self._log.critical(
            "{key}: the lease was taken over ({error}): a recoverer judged this writer"
            " gone and recovers what it staged; this process stages nothing more",
            event="lease_taken_over",
            key=self.key,
            error=str(error),
        )
        self._halt(_State.LOST, cancel=False)
        try:
            self._on_taken_over()
        except Exception:
            self._log.failure(
                "{key}: on_taken_over failed", event="lease_taken_over_failed", key=self.key
            )
