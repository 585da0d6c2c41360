"""
The stream of one object key (DESIGN.md sections 3-5): NDJSON lines in, gzip parts
out to an :class:`~loghandler.interfaces.IObjectWriter`.

A stream is an ``IConsumer`` of lines.  It compresses them incrementally
(:class:`~loghandler.gzipframe.GzipPartEncoder`), hands a part to its writer as soon
as it holds ``part_size`` compressed bytes, keeps at most ``parts_in_flight`` parts in
flight and queues the rest; while parts wait in that queue it pauses its registered
``IPushProducer`` (backpressure), and resumes it once the queue drains.  :meth:`close`
hands the tail to the writer, which stages it and merges the object.

Checkpoints (DESIGN.md section 6): :meth:`checkpoint` hands the writer the part
being filled as it stands (:meth:`GzipPartEncoder.snapshot`), one checkpoint at a
time.  A writer that replaces nothing (``checkpoints_are_parts``: an Azure append
blob) is instead handed the member closed at that moment, as a part of its own.
The stream counts how many of its lines are in storage (:attr:`durable_lines`:
lines of landed parts and checkpoints) and :meth:`wait_durable` tells a caller when
its line is (group commit: a waiting caller starts the next checkpoint as soon as
the one in flight ends).

Memory: a stream's encoder stages a quiet member's lines uncompressed and holds a
zlib compressor only for a member past its staging size;
:meth:`ObjectStream.release_idle` closes the member of a stream idle since a
cutoff, freeing that compressor (its part buffer stays).  Every byte the encoder
holds, the compressor's state included, is counted in the budget.

The stream knows no part numbers, conditions or retries: the writer stores every part
(retrying every failure) or is abandoned at the shutdown deadline, and the stream
counts what was stored and logs what was not.
"""

from __future__ import annotations

import collections
from typing import Any, Optional

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IConsumer, IProducer, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from loghandler.budget import MemoryBudget
from loghandler.gzipframe import STAGE_BYTES, GzipPartEncoder
from loghandler.interfaces import Abandoned, Finished, IObjectWriter
from loghandler.metrics import Metrics

#: Staged bytes below which a stream is not compacted: a member of fewer bytes
#: compresses much worse than the stream would (8 KiB of NDJSON: about 1.3x ``gzip -6``).
COMPACT_MIN_BYTES = 8 * 1024


class StreamClosed(Exception):
    """A line was written to a stream that is completing."""


@implementer(IConsumer)
class ObjectStream:
    """
    One object key's compressor, part queue and writer.

    :param writer: stores the parts and finally the object (opened for this stream).
    :param clock: for the stream's age.
    :param part_size: compressed bytes per part.
    :param parts_in_flight: parts handed to the writer at once.
    :param budget: counts the bytes this stream holds.
    :param stage_bytes: uncompressed bytes of a member held before it gets a
        compressor (:data:`~loghandler.gzipframe.STAGE_BYTES`).
    :param metrics: counts parts, checkpoints, bytes stored, completions and lines
        lost; a new one by default.
    """

    _log = Logger()

    def __init__(
        self,
        writer: IObjectWriter,
        clock: IReactorTime,
        part_size: int,
        parts_in_flight: int,
        budget: MemoryBudget,
        stage_bytes: int = STAGE_BYTES,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self.key: str = writer.key
        self._metrics = metrics if metrics is not None else Metrics()
        self._writer = writer
        self._clock = clock
        self._encoder = GzipPartEncoder(part_size, stage_bytes=stage_bytes)
        self._parts_in_flight = parts_in_flight
        self._budget = budget
        # (body, lines in it) of the parts waiting to be handed to the writer.
        self._queue: collections.deque[tuple[bytes, int]] = collections.deque()
        self._lines_handed = 0  # lines in the parts handed to the writer
        self._part_uploads: set[Deferred[None]] = set()
        self._idle_waiters: list[Deferred[None]] = []
        self._producer: Optional[IPushProducer] = None
        self._paused = False
        self._finishing: Optional[Deferred[None]] = None
        self._done_waiters: list[Deferred[None]] = []
        self._done = False
        self._abandoned = False
        self.lines = 0
        self._lines_cut = 0
        self._lines_stored = 0
        # (first, last) line numbers of the parts the writer gave up.  After such a
        # gap durable_lines (a prefix) stops; waiters are answered line by line.
        self._lost: list[tuple[int, int]] = []
        self._lost_lines = 0
        self._given_up = 0  # lines the completion gave up, once done
        self._unstored_bytes = 0
        self.raw_bytes = 0
        self.stored_bytes = 0
        self.started = clock.seconds()
        #: When the last line was written (the clock's seconds).
        self.last_write = self.started
        #: Lines (the first ones, in order) known to be in storage.
        self.durable_lines = 0
        self._durable_waiters: collections.deque[tuple[int, Deferred[bool]]] = (
            collections.deque()
        )
        self._checkpoint_in_flight: Optional[Deferred[None]] = None
        self._checkpoint_wanted = False
        self._snapshot_lines = 0  # lines covered by the newest checkpoint handed over
        self._checkpoint_bytes = 0
        self.checkpoints = 0
        # Lines up to this one are stored or given up (see _now_durable).
        self._settled = 0
        # (line number, clock seconds) of the first line written after each point
        # where lines are handed to storage together (a part cut, a checkpoint),
        # those not settled yet: the first one's time is that of the oldest line
        # not in storage.  A line opens a new one when _mark_next is set.
        self._marks: list[tuple[int, float]] = []
        self._mark_next = True
        self._closed_at: Optional[float] = None

    @property
    def unsettled_lines(self) -> int:
        """
        Accepted lines neither stored nor staged: once the completion is done, the
        lines it gave up (lost); before, the lines not yet in storage (what would be
        lost if the process ended now).
        """
        if self._done:
            return self._given_up
        return self.lines - max(self.durable_lines, self._lines_stored)

    @property
    def paused(self) -> bool:
        """Whether parts are waiting to be handed to the writer (producer paused)."""
        return self._paused

    @property
    def buffered_bytes(self) -> int:
        """Compressed bytes held for the part being filled."""
        return self._encoder.buffered_bytes

    @property
    def filling_bytes(self) -> int:
        """
        Bytes held for the part being filled: compressed, staged, and the
        compressor while one is held (what completing the stream now frees once
        its tail is stored).
        """
        return self._encoder.memory_bytes

    @property
    def staged_bytes(self) -> int:
        """Uncompressed bytes of the member being filled not compressed yet."""
        return self._encoder.staged_bytes

    @property
    def holds_compressor(self) -> bool:
        """Whether the stream holds a live zlib compressor (its member is open)."""
        return self._encoder.holds_compressor

    @property
    def unstaged_bytes(self) -> int:
        """
        Bytes held in memory for lines the writer has not stored yet: compressed
        bytes, lines staged uncompressed, the compressor while one is held, and the
        copy a checkpoint in flight holds.  This is what the stream counts in its
        budget.
        """
        return self._unstored_bytes + self._encoder.memory_bytes + self._checkpoint_bytes

    @property
    def must_finish(self) -> bool:
        """Whether the writer can take no more parts: the stream must complete now."""
        return bool(self._writer.full)

    # IConsumer

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """Register the push producer that :meth:`write` calls come from."""
        if not (streaming and IPushProducer.providedBy(producer)):
            raise ValueError("ObjectStream takes only streaming (push) producers")
        self._producer = producer

    def unregisterProducer(self) -> None:
        """Forget the producer."""
        self._producer = None

    def write(self, data: bytes) -> None:
        """
        Add NDJSON lines (bytes, each ending in ``\\n``) to the object.

        :raises StreamClosed: the stream is completing.
        """
        if self._finishing is not None:
            raise StreamClosed(self.key)
        encoder = self._encoder
        before = encoder.memory_bytes
        part = encoder.write(data)
        self.lines += 1
        self.raw_bytes += len(data)
        self.last_write = self._clock.seconds()
        if self._mark_next:
            self._marks.append((self.lines, self.last_write))
            self._mark_next = False
        if part is None:
            self._budget.change(encoder.memory_bytes - before)
        else:
            self._budget.change(len(part) + encoder.memory_bytes - before)
            self._queue.append((part, self.lines - self._lines_cut))
            self._lines_cut = self.lines
            self._mark_next = True
            self._unstored_bytes += len(part)
            self._pump()

    def release_idle(self, cutoff: float, compact: bool = False) -> bool:
        """
        If no line came since ``cutoff`` (the clock's seconds) and the stream holds
        a compressor, close its member and free the compressor; its compressed
        bytes stay in the part being filled (whole members, DESIGN.md section 3),
        and the next line starts a new member.  With ``compact`` (memory running
        short), staged lines of at least :data:`COMPACT_MIN_BYTES` are compressed
        into a closed member too.

        :returns: whether memory was freed.
        """
        encoder = self._encoder
        if (
            not (
                encoder.holds_compressor
                or (compact and encoder.staged_bytes >= COMPACT_MIN_BYTES)
            )
            or self.last_write > cutoff
            or self._finishing is not None
        ):
            return False
        before = encoder.memory_bytes
        if compact and encoder.staged_bytes >= COMPACT_MIN_BYTES:
            encoder.compact()
        else:
            encoder.release_compressor()
        self._budget.change(encoder.memory_bytes - before)
        return True

    # uploads

    def _pump(self) -> None:
        while self._queue and len(self._part_uploads) < self._parts_in_flight:
            body, lines = self._queue.popleft()
            self._lines_handed += lines
            last = self._lines_handed
            d = self._writer.part(body)
            self._part_uploads.add(d)
            d.addCallback(self._count_part)
            d.addCallbacks(
                self._part_stored,
                self._part_lost,
                callbackArgs=(len(body), lines),
                errbackArgs=(lines, last),
            )
            d.addErrback(self._log_failure, "storing a part")
            d.addBoth(self._part_done, d)
        if self._queue and not self._paused and self._producer is not None:
            self._paused = True
            self._producer.pauseProducing()
        elif not self._queue and self._paused:
            self._paused = False
            if self._producer is not None:
                self._producer.resumeProducing()

    def _count_part(self, result: None) -> None:
        if not self._done:
            self._metrics.parts.inc()

    def _part_stored(self, result: None, size: int, lines: int) -> None:
        if self._done:  # an answer after the stream gave up: already released
            return
        self._metrics.stored_bytes.inc(size)
        self.stored_bytes += size
        self._unstored_bytes -= size
        self._lines_stored += lines
        self._budget.change(-size)
        # The writer stores a stream's uploads in order: every line before is stored
        # or given up (then it is in self._lost).
        self._now_durable(self._lines_stored + self._lost_lines)

    def _part_lost(self, failure: Failure, lines: int, last: int) -> Failure:
        """
        The writer gave up the part of lines ``last - lines + 1`` .. ``last`` (the
        deadline, or an error it does not retry): they are lost; their waiters are
        answered False, and :attr:`durable_lines` stops before them.
        """
        if not self._done:
            self._lost.append((last - lines + 1, last))
            self._lost_lines += lines
            self._now_durable(last)
        return failure

    # checkpoints and durability

    def checkpoint(self) -> "Deferred[None]":
        """
        Hand the writer the part being filled as it stands, if lines came since the
        last checkpoint and none is in flight (else one follows as soon as the one
        in flight ends).  Does nothing once the stream completes.

        :returns: a Deferred that fires (with None, never an error) when the
            checkpoint started now ends; at once when none started.
        """
        if self._finishing is not None or self._abandoned:
            return succeed(None)
        if self._checkpoint_in_flight is not None or self._queue:
            self._checkpoint_wanted = True
            return succeed(None)
        self._checkpoint_wanted = False
        if self.lines <= max(self._snapshot_lines, self._lines_cut):
            return succeed(None)  # nothing new since the last checkpoint or part
        if self._writer.checkpoints_are_parts:
            return self._checkpoint_as_part()
        body = self._encoder.snapshot()
        if not body:
            return succeed(None)
        covered = self.lines
        self._snapshot_lines = covered
        self._mark_next = True
        self._checkpoint_bytes = len(body)
        self._budget.change(len(body))
        ended: Deferred[None] = Deferred()
        d: Deferred[bool] = self._writer.checkpoint(body)
        done = d.addCallback(self._checkpoint_landed, covered, len(body))
        done.addErrback(self._log_failure, "storing a checkpoint")
        self._checkpoint_in_flight = done
        done.addBoth(self._checkpoint_done)
        done.addBoth(lambda _: ended.callback(None))  # at once if it already ended
        return ended

    def _checkpoint_as_part(self) -> "Deferred[None]":
        """
        Close the member being filled and hand it to the writer as a part: its
        lines are in storage once that part is, and the next part starts a new
        member (the writer keeps every byte, so a snapshot would store them twice).
        """
        held = self._encoder.memory_bytes
        body = self._encoder.finish()
        self._budget.change(len(body) - held)
        lines = self.lines - self._lines_cut
        self._lines_cut = self.lines
        self._mark_next = True
        self._unstored_bytes += len(body)
        self._lines_handed += lines  # the queue is empty: this part is the next
        last = self._lines_handed
        ended: Deferred[None] = Deferred()
        d = self._writer.part(body)
        self._part_uploads.add(d)
        d.addCallback(self._count_checkpoint)  # counted before the waiters hear of it
        d.addCallbacks(
            self._part_stored,
            self._part_lost,
            callbackArgs=(len(body), lines),
            errbackArgs=(lines, last),
        )
        d.addErrback(self._log_failure, "storing a checkpoint")
        d.addBoth(self._part_done, d)
        self._checkpoint_in_flight = d
        d.addBoth(self._checkpoint_done)
        d.addBoth(lambda _: ended.callback(None))
        return ended

    def _count_checkpoint(self, result: None) -> None:
        if not self._done:
            self.checkpoints += 1
            self._metrics.checkpoints.inc()

    def _checkpoint_landed(self, landed: bool, covered: int, size: int) -> None:
        if landed and not self._done:
            self.checkpoints += 1
            self._metrics.checkpoints.inc()
            self._metrics.checkpoint_bytes.inc(size)
            self._now_durable(covered)

    def _checkpoint_done(self, result: object) -> None:
        self._budget.change(-self._checkpoint_bytes)
        self._checkpoint_bytes = 0
        self._checkpoint_in_flight = None
        if self._checkpoint_wanted:
            self.checkpoint()

    def _now_durable(self, lines: int) -> None:
        """Lines up to ``lines`` are stored, but those of parts given up."""
        if not self._lost and lines > self.durable_lines:
            self.durable_lines = lines
        if lines > self._settled:
            self._settled = lines
            marks = self._marks
            while len(marks) > 1 and marks[1][0] <= lines + 1:
                del marks[0]
        waiters = self._durable_waiters
        while waiters and waiters[0][0] <= lines:
            line, waiter = waiters.popleft()
            waiter.callback(not self._is_lost(line))

    @property
    def oldest_unstored_at(self) -> Optional[float]:
        """
        When (the clock's seconds) the oldest line not yet in storage was written,
        or None when every line is stored (or given up: those are counted lost).
        """
        if self._done or self._settled >= self.lines or not self._marks:
            return None
        return self._marks[0][1]

    def _is_lost(self, line: int) -> bool:
        return any(first <= line <= last for first, last in self._lost)

    def wait_durable(self, line: int) -> "Deferred[bool]":
        """
        Wait until line number ``line`` (from 1, as counted by :attr:`lines`) is in
        storage, starting a checkpoint for it when none is in flight.

        :returns: a Deferred firing with True once it is, or False once it never
            will be (the stream gave up; the loss is logged).  Cancelling it stops
            the wait, not the checkpoint.
        """
        if line <= self.durable_lines:
            return succeed(True)
        if line <= self._lines_stored + self._lost_lines:  # its part ended: stored or lost
            return succeed(not self._is_lost(line))
        if self._done:
            return succeed(False)

        def cancel(d: Deferred[bool]) -> None:
            try:
                self._durable_waiters.remove(entry)
            except ValueError:
                pass

        waiter: Deferred[bool] = Deferred(cancel)
        entry = (line, waiter)
        self._durable_waiters.append(entry)
        self.checkpoint()
        return waiter

    def _part_done(self, result: object, upload: Deferred[None]) -> None:
        self._part_uploads.discard(upload)
        if not self._abandoned:
            self._pump()
            if self._checkpoint_wanted and not self._queue:
                self.checkpoint()
        if not self._queue and not self._part_uploads:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _idle(self) -> Deferred[None]:
        if not self._queue and not self._part_uploads:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    # completion

    def close(self) -> Deferred[None]:
        """
        Stop taking lines and complete the object: wait for the parts in flight, then
        hand the tail to the writer, which stages it and merges the object.  Calling
        it again waits for the same completion.

        :returns: a Deferred that fires with None once the object is complete, staged
            for recovery, or given up (logged with what was lost).  It never errbacks.
        """
        if self._finishing is None:
            self._closed_at = self._clock.seconds()
            self._mark_next = True
            held = self._encoder.memory_bytes
            tail = self._encoder.finish()
            self._budget.change(len(tail) - held)
            self._unstored_bytes += len(tail)
            self._finishing = ensureDeferred(self._finish(tail))
        waiter: Deferred[None] = Deferred()
        if self._done:
            waiter.callback(None)
        else:
            self._done_waiters.append(waiter)
        return waiter

    def abandon(self) -> None:
        """
        Give up (the shutdown deadline passed): the writer cancels what it is doing;
        what it staged stays staged, what it had not is reported lost.
        """
        if self._done or self._abandoned:
            return
        self._abandoned = True
        self._writer.abandon()
        if self._finishing is not None:
            self._finishing.cancel()

    async def _finish(self, tail: bytes) -> None:
        try:
            await self._idle()
            if self._abandoned:
                raise Abandoned(self.key)
            staged: list[bool] = []

            def on_staged() -> None:
                if not staged:
                    staged.append(True)
                    self._part_stored(None, len(tail), self.lines - self._lines_cut)
                    self._now_durable(self.lines)

            finished: Finished = await self._writer.finish(tail, on_staged)
            on_staged()
            self._report(finished)
            self._completed("lost" if self._lost_lines else finished.outcome, self._lost_lines)
            if self._lost_lines:
                self._log.error(
                    "{key}: not stored: {lost_lines} lines ({lost_bytes} gzip bytes) of"
                    " {parts} parts the writer gave up (see above); the other lines are",
                    event="lines_lost",
                    key=self.key,
                    lost_lines=self._lost_lines,
                    lost_bytes=self._unstored_bytes,
                    parts=len(self._lost),
                )
        except Exception as e:
            if isinstance(e, Abandoned):  # the deadline, seen first by the writer
                self._abandoned = True
            if not self._abandoned:
                self._log.failure(
                    "{key}: completion failed", event="completion_failed", key=self.key
                )
            durable = max(self.durable_lines, self._lines_stored)
            self._completed("staged" if self.lines == durable else "lost", self.lines - durable)
            reason = " by the shutdown deadline" if self._abandoned else ""
            if self.lines == durable:
                self._log.warn(
                    "{key}: not completed{reason}; nothing lost: its {lines} lines are"
                    " staged, for recovery",
                    event="object_left_staged",
                    key=self.key,
                    reason=reason,
                    lines=self.lines,
                )
                return
            self._log.error(
                "{key}: not stored{reason}: {lost_lines} lines ({lost_bytes} gzip bytes)"
                "{checkpointed}",
                event="lines_lost",
                key=self.key,
                reason=reason,
                lost_lines=self.lines - durable,
                lost_bytes=self._unstored_bytes,
                checkpointed=(
                    "; %d lines before them are staged (checkpoints), for recovery"
                    % (durable - self._lines_stored)
                    if durable > self._lines_stored
                    else ""
                ),
            )
        finally:
            # What was never stored frees its memory too.
            self._budget.change(-self._unstored_bytes)
            self._unstored_bytes = 0
            self._done = True
            while self._durable_waiters:  # their lines were not stored
                self._durable_waiters.popleft()[1].callback(False)
            waiters, self._done_waiters = self._done_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _completed(self, outcome: str, lost: int) -> None:
        """
        Count the completion (``outcome``: a :class:`Finished` outcome, or
        ``"lost"``), its duration, and the ``lost`` lines: the one place that counts
        lines lost, where the completion decides and logs what was not stored.
        """
        self._given_up = lost
        metrics = self._metrics
        metrics.completions.labels(outcome=outcome).inc()
        if self._closed_at is not None:
            metrics.completion_seconds.observe(self._clock.seconds() - self._closed_at)
        if lost:
            metrics.lines_lost.inc(lost)

    def _report(self, finished: Finished) -> None:
        fields: dict[str, Any] = dict(
            key=self.key,
            lines=self.lines,
            raw_bytes=self.raw_bytes,
            stored_bytes=self.stored_bytes,
            seconds=self._clock.seconds() - self.started,
        )
        if finished.outcome == "merged":
            self._log.info(
                "{key}: completed into {target}: {lines} lines, {raw_bytes} bytes"
                " -> {stored_bytes} gzip bytes in {seconds:.1f} s",
                event="object_completed",
                target=finished.key,
                **fields,
            )
        elif finished.outcome == "staged":
            self._log.warn(
                "{key}: {lines} lines ({stored_bytes} gzip bytes) stored in {staged_key},"
                " not yet merged; recovery merges them",
                event="object_staged",
                staged_key=finished.staged_key,
                **fields,
            )

    def _log_failure(self, failure: Failure, doing: str) -> None:
        # Abandoned (the deadline, or the writer taken over by recovery): the
        # completion reports what was lost, and a takeover is logged by the lease.
        if not self._abandoned and not failure.check(Abandoned):
            self._log.failure(
                "{key}: failed {doing}", failure, event="stream_failed", key=self.key, doing=doing
            )
