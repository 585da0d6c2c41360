"""
The stream of one object key (DESIGN.md sections 3-5): NDJSON lines in, gzip parts out
to an :class:`~loghandler.interfaces.IObjectStore`.

A stream is an ``IConsumer`` of lines.  It compresses them incrementally
(:class:`~loghandler.gzipframe.GzipPartEncoder`), uploads a part as soon as it holds
``part_size`` compressed bytes, keeps at most ``parts_in_flight`` parts in flight and
queues the rest; while parts wait in that queue it pauses its registered
``IPushProducer`` (backpressure), and resumes it once the queue drains.  :meth:`close`
completes the object by appending (:mod:`loghandler.append`).

Failed storage calls are retried with backoff, without end: the data stay in memory
meanwhile (bounded by the memory budget) until they are written or the stream is
abandoned at the shutdown deadline, which logs what was lost.
"""

from __future__ import annotations

import collections
import uuid
from typing import Any, Callable, Optional

from twisted.internet.defer import (
    Deferred,
    DeferredLock,
    DeferredSemaphore,
    ensureDeferred,
    succeed,
)
from twisted.internet.interfaces import IConsumer, IProducer, IPushProducer, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from loghandler.append import FIRST_DATA_PART, MultipartUpload, append_object, choose_target
from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.gzipframe import GzipPartEncoder
from loghandler.interfaces import IObjectStore, StorageError

#: S3's largest part number (https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html).
MAX_PART_NUMBER = 10_000

#: Waits between a stream's own retries of a failed storage call, in seconds.
STREAM_BACKOFF = Backoff(base=1.0, cap=60.0)


class StreamClosed(Exception):
    """A line was written to a stream that is completing."""


@implementer(IConsumer)
class ObjectStream:
    """
    One object key's compressor, part queue and multipart upload.

    :param key: the object key.
    :param store: where parts go.
    :param clock: for retry waits.
    :param part_size: compressed bytes per part.
    :param parts_in_flight: parts uploaded at once by this stream.
    :param upload_slots: caps part uploads across all streams.
    :param budget: counts the bytes this stream holds.
    """

    _log = Logger()

    def __init__(
        self,
        key: str,
        store: IObjectStore,
        clock: IReactorTime,
        part_size: int,
        parts_in_flight: int,
        upload_slots: DeferredSemaphore,
        budget: MemoryBudget,
        backoff: Backoff = STREAM_BACKOFF,
    ) -> None:
        self.key = key
        self._store = store
        self._clock = clock
        self._encoder = GzipPartEncoder(part_size)
        self._parts_in_flight = parts_in_flight
        self._slots = upload_slots
        self._budget = budget
        self._backoff = backoff
        # (part number, body, lines in it) of the parts waiting for an upload slot.
        self._queue: collections.deque[tuple[int, bytes, int]] = collections.deque()
        self._upload: Optional[MultipartUpload] = None
        self._next_number = FIRST_DATA_PART
        self._write_id = uuid.uuid4().hex
        # The part uploads in flight.
        self._part_uploads: set[Deferred[None]] = set()
        self._upload_lock = DeferredLock()
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
        self._unstored_bytes = 0
        self.raw_bytes = 0
        self.stored_bytes = 0
        self.started = clock.seconds()

    @property
    def paused(self) -> bool:
        """Whether parts are waiting for an upload slot (the producer is paused)."""
        return self._paused

    @property
    def buffered_bytes(self) -> int:
        """Compressed bytes held for the part being filled."""
        return self._encoder.buffered_bytes

    @property
    def parts_exhausted(self) -> bool:
        """
        Whether the upload is one part short of S3's 10,000-part limit: the stream must
        be completed now (its tail takes the last number).
        """
        return self._next_number >= MAX_PART_NUMBER

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
        before = self._encoder.buffered_bytes
        part = self._encoder.write(data)
        self.lines += 1
        self.raw_bytes += len(data)
        if part is None:
            self._budget.change(self._encoder.buffered_bytes - before)
        else:
            self._budget.change(len(part) - before)
            self._queue.append((self._next_number, part, self.lines - self._lines_cut))
            self._lines_cut = self.lines
            self._unstored_bytes += len(part)
            self._next_number += 1
            self._pump()

    # uploads

    def _pump(self) -> None:
        while self._queue and len(self._part_uploads) < self._parts_in_flight:
            number, body, lines = self._queue.popleft()
            d = ensureDeferred(self._upload_part(number, body, lines))
            self._part_uploads.add(d)
            d.addErrback(self._log_failure, "uploading a part")
            d.addBoth(self._part_done, d)
        if self._queue and not self._paused and self._producer is not None:
            self._paused = True
            self._producer.pauseProducing()
        elif not self._queue and self._paused:
            self._paused = False
            if self._producer is not None:
                self._producer.resumeProducing()

    def _part_done(self, result: object, upload: Deferred[None]) -> None:
        self._part_uploads.discard(upload)
        self._pump()
        if not self._queue and not self._part_uploads:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    async def _upload_part(self, number: int, body: bytes, lines: int) -> None:
        upload = await self._retrying("CreateMultipartUpload", self._ensure_upload)
        etag = await self._retrying(
            "UploadPart",
            lambda: self._slots.run(
                self._store.upload_part, upload.key, upload.upload_id, number, body
            ),
        )
        upload.parts[number] = etag
        self.stored_bytes += len(body)
        self._unstored_bytes -= len(body)
        self._lines_stored += lines
        self._budget.change(-len(body))

    async def _ensure_upload(self) -> MultipartUpload:
        await self._upload_lock.acquire()
        try:
            if self._upload is None:
                target, _ = await choose_target(self._store, self.key)
                upload_id = await self._store.create_upload(target, self._write_id)
                self._upload = MultipartUpload(target, upload_id)
                self._log.info(
                    "{key}: multipart upload {upload_id} created", key=target, upload_id=upload_id
                )
            return self._upload
        finally:
            self._upload_lock.release()

    async def _retrying(
        self, operation: str, call: Callable[[], Any]
    ) -> Any:
        attempt = 0
        while True:
            try:
                return await call()
            except StorageError as e:
                delay = self._backoff.delay(attempt)
                self._log.warn(
                    "{key}: {operation} failed ({error}); retry {attempt} in {delay:.1f} s",
                    key=self.key,
                    operation=operation,
                    error=str(e),
                    attempt=attempt + 1,
                    delay=delay,
                )
                attempt += 1
                await deferLater(self._clock, delay, lambda: None)

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
        append the tail (DESIGN.md section 5).  Calling it again waits for the same
        completion.

        :returns: a Deferred that fires with None once the object is complete, or once
            the stream gave up (logged with what was lost).  It never errbacks.
        """
        if self._finishing is None:
            held = self._encoder.buffered_bytes
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
        """Give up a completion in progress (the shutdown deadline passed)."""
        if self._finishing is not None and not self._done:
            self._abandoned = True
            for upload in list(self._part_uploads):
                upload.cancel()
            self._finishing.cancel()

    async def _finish(self, tail: bytes) -> None:
        try:
            await self._idle()
            if self._upload is not None:
                self._upload.next_number = self._next_number
            written = await self._retrying(
                "append",
                lambda: ensureDeferred(
                    append_object(self._store, self.key, self._upload, tail, self._write_id)
                ),
            )
            self.stored_bytes += len(tail)
            self._unstored_bytes -= len(tail)
            self._lines_stored = self.lines
            self._log.info(
                "{key}: completed as {written}: {lines} lines, {raw_bytes} bytes"
                " -> {stored_bytes} gzip bytes in {seconds:.1f} s",
                key=self.key,
                written=written,
                lines=self.lines,
                raw_bytes=self.raw_bytes,
                stored_bytes=self.stored_bytes,
                seconds=self._clock.seconds() - self.started,
            )
        except Exception:
            if not self._abandoned:
                self._log.failure("{key}: completion failed", key=self.key)
            # Cancelling may surface as CancelledError or as the HTTP client's own
            # error (ConnectingCancelledError during a connect): both are the deadline.
            self._log.error(
                "{key}: not completed{reason}: {lost_lines} lines ({lost_bytes} gzip bytes)"
                " not stored; {upload}",
                key=self.key,
                reason=" by the shutdown deadline" if self._abandoned else "",
                lost_lines=self.lines - self._lines_stored,
                lost_bytes=self._unstored_bytes,
                upload=(
                    "multipart upload %s keeps the %d parts uploaded"
                    % (self._upload.upload_id, len(self._upload.parts))
                    if self._upload
                    else "no multipart upload was created"
                ),
            )
        finally:
            self._budget.change(-len(tail))
            self._done = True
            waiters, self._done_waiters = self._done_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _log_failure(self, failure: Any, doing: str) -> None:
        if not self._abandoned:  # else the completion reports what was lost
            self._log.failure("{key}: failed {doing}", failure, key=self.key, doing=doing)

