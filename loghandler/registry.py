"""
Object key -> open :class:`~loghandler.stream.ObjectStream`: admission (the memory
budget, each client's share of it, per-key backpressure, stopping), rotation after
``QUEUE_TIMEOUT_MIN`` on a reactor timer, freeing the compressors of idle streams,
and :meth:`StreamRegistry.close_all` for the flush on stop (DESIGN.md section 4).
"""

from __future__ import annotations

import random
from typing import Callable, Optional

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from loghandler.budget import MemoryBudget, Share
from loghandler.gzipframe import COMPRESSOR_BYTES, STAGE_BYTES
from loghandler.interfaces import IObjectStore
from loghandler.keys import key_for
from loghandler.message import Message
from loghandler.metrics import Metrics
from loghandler.stream import ObjectStream

#: Memory an open stream holds besides what its encoder and parts hold (those are
#: counted as they change, the compressor's state included): the stream, its writer,
#: its timer and their Python objects: tracemalloc counts about 5 KiB a stream with
#: ``NO_UPLOAD=1`` and 6 KiB with the S3 writer (2,000 streams of one line each, the
#: lines left out); counted from open to completion.
STREAM_OVERHEAD_BYTES = 6 * 1024

#: Seconds without a line after which a stream's member is closed and its compressor
#: freed (a sweep every that many seconds: freed 5 to 10 s after the last line).
IDLE_S = 5.0

#: Above this share of the budget held, the idle sweep also compresses the staged
#: lines of idle streams into closed members (smaller in memory, less compressed).
COMPACT_ABOVE = 0.5


class Busy(Exception):
    """
    A message cannot be taken now; the client should retry (503 with Retry-After).

    :ivar reason: why, for the response body.
    :ivar retry_after: seconds to tell the client to wait.
    :ivar result: the ``loghandler_messages_total`` result it counts as: ``"busy"``
        (memory budget, client share, parts backed up), ``"unavailable"`` (storage
        not reached yet) or ``"stopping"``.
    """

    def __init__(self, reason: str, retry_after: int, result: str = "busy") -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.result = result


@attrs.frozen
class StreamSettings:
    """
    How streams are run.

    :ivar part_size: compressed bytes per part.
    :ivar lifetime_s: seconds after which a stream completes its object; each
        stream's timer is drawn in ``[0.9, 1] x lifetime_s`` so that pods started
        together do not merge the same keys in lockstep.
    :ivar parts_in_flight: parts one stream uploads at once.
    :ivar budget_bytes: bytes held in memory for all streams before 503.
    :ivar checkpoint_s: seconds between checkpoints of each stream that received
        lines (``CHECKPOINT_S``); 0 for none but those :meth:`Accepted.durable` asks.
    :ivar checkpoints_at_once: checkpoints one round starts at once (each holds a
        copy of its stream's part being filled, counted in the budget).
    :ivar client_budget_bytes: bytes one client's streams may hold before that
        client's messages get 503 (``CLIENT_BUDGET_BYTES``); None: no share.
    :ivar idle_s: seconds without a line after which a stream frees its compressor
        (0: never).
    :ivar stage_bytes: uncompressed bytes of a member held before it gets a
        compressor.
    """

    part_size: int
    lifetime_s: float
    parts_in_flight: int = 2
    budget_bytes: int = 256 * 1024 * 1024
    checkpoint_s: float = 0.0
    checkpoints_at_once: int = 4
    client_budget_bytes: Optional[int] = None
    idle_s: float = IDLE_S
    stage_bytes: int = STAGE_BYTES


@attrs.frozen
class Accepted:
    """
    A message taken by its stream.

    :ivar stream: the stream of its object.
    :ivar line: its line number in that stream, from 1.
    """

    stream: ObjectStream
    line: int

    def durable(self) -> "Deferred[bool]":
        """
        Fires with True once the message is in storage (a checkpoint, part or the
        tail holding it landed; a checkpoint is started for it at once, or as soon
        as the one in flight ends), or False if it never will be (its loss is
        logged).  Cancel it to stop waiting.
        """
        return self.stream.wait_durable(self.line)


@implementer(IPushProducer)
@attrs.define
class _KeyAdmission:
    """
    The producer a stream pauses while its parts wait for upload slots: messages for
    that key get 503 meanwhile, other keys go on.
    """

    paused: bool = False

    def pauseProducing(self) -> None:
        """Refuse messages for the key."""
        self.paused = True

    def resumeProducing(self) -> None:
        """Take messages for the key again."""
        self.paused = False

    def stopProducing(self) -> None:
        """Nothing to stop."""


@attrs.define
class _Open:
    stream: ObjectStream
    admission: _KeyAdmission
    timer: IDelayedCall
    share: MemoryBudget


class StreamRegistry:
    """
    The open streams, one per object key.

    :param store: the object store.
    :param clock: the reactor's clock.
    :param settings: how streams are run.
    :param budget: the memory budget, shared with the store's merges; by default a
        new one of ``settings.budget_bytes``.
    :param uniform: draws a float in ``[a, b]`` (rotation jitter); injectable for tests.
    :param metrics: where the streams count (buffered bytes, open streams, lines
        stored and lost, the age of the oldest line not in storage); a new one by
        default.
    """

    _log = Logger()

    def __init__(
        self,
        store: IObjectStore,
        clock: IReactorTime,
        settings: StreamSettings,
        budget: Optional[MemoryBudget] = None,
        uniform: Callable[[float, float], float] = random.uniform,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._settings = settings
        self._uniform = uniform
        self.budget = budget if budget is not None else MemoryBudget(settings.budget_bytes)
        self._open: dict[str, _Open] = {}
        self._closing: dict[ObjectStream, MemoryBudget] = {}
        #: client_id -> its share of the budget, while it has streams.
        self.shares: dict[int, Share] = {}
        self.stopping = False
        self._flushed: list[ObjectStream] = []
        #: False until the store was found reachable (set by the stream service).
        self.ready = True
        #: Why the store's last check at start failed, while not ready (for /readyz).
        self.unreachable: Optional[str] = None
        self._checkpoints = LoopingCall(self.checkpoint_all)
        self._checkpoints.clock = clock
        self._idle_sweep = LoopingCall(self.release_idle)
        self._idle_sweep.clock = clock
        self.metrics = metrics if metrics is not None else Metrics()
        self._observe(self.metrics)

    def _observe(self, metrics: Metrics) -> None:
        """Have ``metrics``' gauges read this registry's state when collected."""
        metrics.buffered_bytes.set_function(lambda: self.budget.held)
        metrics.buffer_budget_bytes.set_function(lambda: self.budget.limit)
        metrics.open_streams.set_function(lambda: len(self._open))
        metrics.completing_streams.set_function(lambda: len(self._closing))
        metrics.oldest_unstored_line_age.set_function(self.oldest_unstored_age)
        metrics.storage_failing.set_function(lambda: 0 if self.storage_problem is None else 1)

    def oldest_unstored_age(self) -> float:
        """
        Seconds since the oldest line not yet in storage was written, over the open
        and completing streams; 0 when every line is stored.
        """
        oldest: Optional[float] = None
        for stream in [entry.stream for entry in self._open.values()] + list(self._closing):
            since = stream.oldest_unstored_at
            if since is not None and (oldest is None or since < oldest):
                oldest = since
        return 0.0 if oldest is None else max(0.0, self._clock.seconds() - oldest)

    @property
    def open_keys(self) -> list[str]:
        """The keys with an open stream, sorted."""
        return sorted(self._open)

    @property
    def storage_problem(self) -> Optional[str]:
        """Why storage fails until an operator acts, or None (the store's ``problem``)."""
        problem: Optional[str] = self._store.problem
        return problem

    def seconds(self) -> float:
        """The registry's clock, in seconds."""
        return self._clock.seconds()

    @property
    def storage_failing(self) -> Optional[tuple[float, str]]:
        """
        ``(since, reason)`` while the store's calls fail with none succeeding (clock
        seconds, the last failure), else None (the store's ``failing``).
        """
        failing: Optional[tuple[float, str]] = getattr(self._store, "failing", None)
        return failing

    @property
    def completing(self) -> int:
        """How many streams are completing their objects."""
        return len(self._closing)

    def accept(self, message: Message) -> Accepted:
        """
        Add a validated message to its object's stream, opening the stream if needed.

        :returns: where it went, to wait until it is in storage.

        :raises Busy: the server is stopping, the storage was not reached yet, the
            memory budget is spent, or the key's parts are backed up.
        """
        self._check_admission()
        client_id = message.client_id
        share = self.shares.get(client_id)
        if share is not None and share.held >= share.limit:
            self._relieve(share)
            raise Busy("this client's buffers are full", 1)
        key = key_for(message.timestamp, client_id)
        entry = self._open.get(key)
        if entry is not None and entry.admission.paused:
            raise Busy("uploads for this object are backed up", 1)
        return self._write(key, message.to_line(), client_id)

    def accept_batch(self, messages: list[Message]) -> list[Accepted]:
        """
        Add validated messages, all or none: every check :meth:`accept` makes is made
        for the whole batch first, then all are written.  The budget must have room
        for the lines uncompressed (more than they will hold once compressed), for
        each stream the batch opens and each compressor it starts, in the global
        budget and in each client's share.

        :returns: where each message went, in order.

        :raises Busy: as :meth:`accept`, or the batch does not fit in the budget
            left; nothing was accepted.
        """
        self._check_admission()
        lines = [(key_for(m.timestamp, m.client_id), m.to_line(), m.client_id) for m in messages]
        per_key: dict[str, tuple[int, int]] = {}  # key -> (bytes, client_id)
        for key, line, client_id in lines:
            size, _ = per_key.get(key, (0, client_id))
            per_key[key] = (size + len(line), client_id)
        needed = 0
        per_client: dict[int, int] = {}
        for key, (size, client_id) in per_key.items():
            entry = self._open.get(key)
            if entry is None:
                size += STREAM_OVERHEAD_BYTES
                if size >= self._settings.stage_bytes:
                    size += COMPRESSOR_BYTES
            elif entry.admission.paused:
                raise Busy("uploads for this object are backed up", 1)
            elif (
                not entry.stream.holds_compressor
                and entry.stream.staged_bytes + size >= self._settings.stage_bytes
            ):
                size += COMPRESSOR_BYTES
            needed += size
            per_client[client_id] = per_client.get(client_id, 0) + size
        if self.budget.held + needed > self.budget.limit:
            raise Busy("buffers are too full for this batch", 1)
        limit = self._settings.client_budget_bytes
        if limit is not None:
            for client_id, size in per_client.items():
                share = self.shares.get(client_id)
                if (share.held if share is not None else 0) + size > limit:
                    raise Busy("this client's buffers are too full for this batch", 1)
        return [self._write(key, line, client_id) for key, line, client_id in lines]

    def _check_admission(self) -> None:
        """
        :raises Busy: the server is stopping, the storage was not reached yet, or
            the memory budget is spent (then the fullest stream completes early).
        """
        if self.stopping:
            raise Busy("server is stopping", 5, "stopping")
        if not self.ready:
            raise Busy("storage is not reachable yet", 5, "unavailable")
        if self.budget.exhausted:
            self._relieve(None)
            raise Busy("buffers are full", 1)

    def _write(self, key: str, line: bytes, client_id: int) -> Accepted:
        """Write one line to the key's stream, opening it if needed."""
        entry = self._open.get(key)
        if entry is None:
            entry = self._open[key] = self._start(key, client_id)
        stream = entry.stream
        try:
            stream.write(line)
        except Exception:
            self._log.failure("{key}: stream failed; completing it", event="stream_failed", key=key)
            self._complete(key)
            raise
        accepted = Accepted(stream, stream.lines)
        if stream.must_finish:
            self._log.info(
                "{key}: the writer is full; completing the object early",
                event="object_full",
                key=key,
            )
            self._complete(key)
        return accepted

    def start_checkpoints(self) -> None:
        """
        Checkpoint every stream every ``checkpoint_s`` (when it is not 0), and free
        the compressors of streams idle for ``idle_s`` (when it is not 0) every
        ``idle_s``, until stop.
        """
        if self._settings.checkpoint_s > 0 and not self._checkpoints.running:
            self._checkpoints.start(self._settings.checkpoint_s, now=False)
        if self._settings.idle_s > 0 and not self._idle_sweep.running:
            self._idle_sweep.start(self._settings.idle_s, now=False)

    def release_idle(self) -> int:
        """
        Close the member and free the compressor of each open stream that received
        no line for ``idle_s`` seconds (its part buffer stays; its next line starts a
        new member).  With more than :data:`COMPACT_ABOVE` of the budget held, their
        staged lines are compressed into closed members too.

        :returns: how many streams freed memory.
        """
        cutoff = self._clock.seconds() - self._settings.idle_s
        compact = self.budget.held > COMPACT_ABOVE * self.budget.limit
        freed = 0
        for entry in self._open.values():
            if entry.stream.release_idle(cutoff, compact):
                freed += 1
        return freed

    def checkpoint_all(self) -> "Deferred[None]":
        """
        One round: a checkpoint of each open stream that received lines since its
        last one, ``checkpoints_at_once`` at a time.  A loop, not a chain of
        Deferreds: checkpoints that end at once (idle streams) do not nest calls,
        however many streams there are.

        :returns: a Deferred firing when the round's checkpoints ended.
        """
        streams = iter([entry.stream for entry in self._open.values()])
        round_done: Deferred[None] = Deferred()
        running = 0

        def start_more() -> None:
            nonlocal running
            while running < self._settings.checkpoints_at_once:
                stream = next(streams, None)
                if stream is None:
                    if running == 0 and not round_done.called:
                        round_done.callback(None)
                    return
                ended = stream.checkpoint()
                if not ended.called:
                    running += 1
                    ended.addBoth(one_ended)

        def one_ended(result: object) -> None:
            nonlocal running
            running -= 1
            start_more()

        start_more()
        return round_done

    def _relieve(self, share: Optional[MemoryBudget]) -> None:
        """
        With the budget (or a client's ``share`` of it) spent and no completing
        object (of that client) still holding unstored data in memory, complete the
        open object (of that client) that holds the most: many objects each holding
        part of a part would otherwise refuse every message until they rotate.  A
        completion that is merging (its data already stored) does not block this.
        """
        if any(
            stream.unstaged_bytes
            for stream, owner in self._closing.items()
            if share is None or owner is share
        ):
            return
        keys = [k for k, e in self._open.items() if share is None or e.share is share]
        if not keys:
            return
        key = max(keys, key=lambda k: self._open[k].stream.filling_bytes)
        budget = self.budget if share is None else share
        self._log.warn(
            "{whose} are full ({held} of {limit} bytes); completing {key} early",
            event="buffers_full",
            whose="buffers" if share is None else "this client's buffers",
            held=budget.held,
            limit=budget.limit,
            key=key,
        )
        self._complete(key)

    def _start(self, key: str, client_id: int) -> _Open:
        settings = self._settings
        share: MemoryBudget = self.budget
        if settings.client_budget_bytes is not None:
            client = self.shares.get(client_id)
            if client is None:
                client = self.shares[client_id] = Share(
                    settings.client_budget_bytes, self.budget, client_id
                )
            client.streams += 1
            share = client
        stream = ObjectStream(
            self._store.open(key),
            self._clock,
            settings.part_size,
            settings.parts_in_flight,
            share,
            settings.stage_bytes,
            self.metrics,
        )
        admission = _KeyAdmission()
        stream.registerProducer(admission, True)
        share.change(STREAM_OVERHEAD_BYTES)
        lifetime = settings.lifetime_s * self._uniform(0.9, 1.0)
        timer = self._clock.callLater(lifetime, self._complete, key)
        return _Open(stream, admission, timer, share)

    def _complete(self, key: str) -> Optional[Deferred[None]]:
        """Take the key's stream out of service and complete its object."""
        entry = self._open.pop(key, None)
        if entry is None:
            return None
        if entry.timer.active():
            entry.timer.cancel()
        stream = entry.stream
        self._closing[stream] = entry.share
        done = stream.close()
        done.addCallback(self._closed, stream)
        return done

    def _closed(self, result: None, stream: ObjectStream) -> None:
        share = self._closing.pop(stream)
        share.change(-STREAM_OVERHEAD_BYTES)
        if isinstance(share, Share):
            share.streams -= 1
            if not share.streams:
                del self.shares[share.client_id]

    def lines_lost(self) -> int:
        """
        After :meth:`close_all`: the accepted lines of the objects it completed that
        are neither stored nor staged (of those still completing, every line not
        yet in storage); 0 before.
        """
        return sum(stream.unsettled_lines for stream in self._flushed)

    def close_all(self) -> Deferred[object]:
        """
        Refuse new messages and complete every stream, in parallel: the open ones and
        those already completing.

        :returns: a Deferred that fires when all are done; cancelling it abandons the
            completions still running (each logs what it could not store).
        """
        self.stopping = True
        if self._checkpoints.running:
            self._checkpoints.stop()
        if self._idle_sweep.running:
            self._idle_sweep.stop()
        self._log.info(
            "completing {count} objects",
            event="flush_started",
            count=len(self._open) + len(self._closing),
        )
        for key in list(self._open):
            self._complete(key)
        streams = self._flushed = list(self._closing)

        abandoned = []

        def abandon(d: Deferred[object]) -> None:
            abandoned.append(True)
            for stream in streams:
                stream.abandon()

        def all_done(outcome: object) -> None:
            if abandoned:
                result.errback(CancelledError("flush abandoned"))
            else:
                result.callback(None)

        result: Deferred[object] = Deferred(abandon)
        DeferredList([stream.close() for stream in streams]).addCallback(all_done)
        return result
