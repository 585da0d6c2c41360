"""
The pieces of the Azure model-based test (:mod:`tests.test_model_azure`): processes
that append into one shared :class:`MemoryAppendBlobs`, each on its own clock, built
on :mod:`tests.model_support` (the S3 model's :class:`ProcessClock`,
:class:`ProcessClient`, :class:`Process` and :class:`World`):

- :class:`AzureProcessClient`: a process's connection to the shared container, an
  :class:`IAppendBlobClient` with :class:`ProcessClient`'s semantics (once cut, calls
  never answer and answers are dropped, while calls already sent still land;
  partitioned, calls fail unlanded; paused, answers wait).  It also counts the calls
  of its process in one tick: a writer that loops without yielding (every call
  answered at once by the fake) would hang the test, so past :data:`SPIN_LIMIT` the
  process is marked :attr:`~AzureProcess.spun` and its calls fail.
- :class:`AzureProcess`: one daemon as ``tap.make_azure_store`` and
  ``service.build_service`` wire it, minus what Azure does not need (no lease, no
  recovery: appended blocks are final): a retry layer, an
  :class:`AzureObjectStore` and a :class:`StreamRegistry` with checkpoints.  Killed,
  paused and partitioned as :class:`Process` is (those methods are :class:`Process`'s).
- :class:`AzureWorld`: :class:`World` on a :class:`MemoryAppendBlobs`.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, fail
from zope.interface import implementer_only

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.registry import STREAM_OVERHEAD_BYTES, StreamRegistry, StreamSettings
from loghandler.retry import RetryLayer
from loghandler.storage.azure.api import MAX_APPEND_BLOB_BYTES, IAppendBlobClient
from loghandler.storage.azure.memory import MemoryAppendBlobs
from loghandler.storage.azure.writer import AzureObjectStore
from tests.model_support import Process, ProcessClient, ProcessClock, World

#: Compressed bytes per part: about ten noisy lines.
PART = 1024
LIFETIME_S = 6.0
CHECKPOINT_S = 2.0
#: Short, so that stalled appends are given up and tried again often.
ATTEMPT_TIMEOUT_S = 2.0
#: Blocks after which the writers roll a blob over: small, so rollovers are common.
MAX_BLOCKS = 6
#: Calls one process may send in one tick before it is deemed to spin.
SPIN_LIMIT = 5_000


class Spinning(Exception):
    """A process sent more than :data:`SPIN_LIMIT` calls in one tick."""


@implementer_only(IAppendBlobClient)
class AzureProcessClient(ProcessClient):
    """
    One process's calls to the shared container (see the module docstring).

    :ivar sent: calls sent since the process's clock last moved.
    :ivar spun: whether it ever sent more than :data:`SPIN_LIMIT` in one tick.
    """

    def __init__(self, blobs: MemoryAppendBlobs) -> None:
        super().__init__(blobs)  # type: ignore[arg-type]
        self._blobs = blobs
        self.container = blobs.container
        self.sent = 0
        self.spun = False
        #: Called when the process is first seen to spin.
        self.on_spin: Callable[[], None] = lambda: None

    def _spinning(self) -> None:
        self.spun = True

    def __repr__(self) -> str:
        return f"<AzureProcessClient {'cut' if self.cut else 'live'}>"

    def _send(
        self, call: Callable[..., "Deferred[Any]"], *args: Any, **kwargs: Any
    ) -> "Deferred[Any]":
        self.sent += 1
        if self.sent > SPIN_LIMIT:
            if not self.spun:
                self.spun = True
                self.on_spin()
            return fail(Spinning(f"{self.sent} calls in one tick"))
        return super()._send(call, *args, **kwargs)

    def check(self) -> "Deferred[Any]":
        """Get Container Properties."""
        return self._send(self._blobs.check)

    def properties(self, *args: Any) -> "Deferred[Any]":
        """Get Blob Properties."""
        return self._send(self._blobs.properties, *args)

    def create(self, *args: Any) -> "Deferred[Any]":
        """Create Append Blob."""
        return self._send(self._blobs.create, *args)

    def append(self, *args: Any) -> "Deferred[Any]":
        """Append Block."""
        return self._send(self._blobs.append, *args)

    def read(self, *args: Any) -> "Deferred[Any]":
        """Get Blob (a range)."""
        return self._send(self._blobs.read, *args)

    def close(self) -> "Deferred[Any]":
        """Nothing to close (the container is shared)."""
        return self._send(self._blobs.close)


class AzureProcess(Process):
    """
    One daemon process on the shared container, started at the master time ``now``
    (see the module docstring).  :meth:`tick`, :meth:`pause`, :meth:`partition`,
    :meth:`kill` and :meth:`durable` are :class:`Process`'s; ``Process.__init__`` is
    not called, as it builds the S3 store, its lease and recovery: this one sets
    the same attributes.

    :param name: a short name for messages.
    :param writer_id: the store's writer ID, 32 hex digits.
    :param max_blocks: the store's rollover threshold, blocks.
    :param max_blob_bytes: the store's rollover threshold, bytes.
    :param budget_bytes: the memory budget (past it, 503 and the fullest stream
        completes early).
    :ivar timed_out: whether its flush on stop was cut by its deadline (timed out,
        or ended by itself at the deadline, when the retry layer gives up).
    """

    client: AzureProcessClient
    store: AzureObjectStore  # type: ignore[assignment]

    def __init__(
        self,
        name: str,
        writer_id: str,
        blobs: MemoryAppendBlobs,
        now: float,
        rng: random.Random,
        max_blocks: int = MAX_BLOCKS,
        max_blob_bytes: int = MAX_APPEND_BLOB_BYTES,
        budget_bytes: int = 1 << 30,
    ) -> None:
        self.name = name
        self.clock = ProcessClock()
        self.clock.rightNow = now
        self.client = AzureProcessClient(blobs)
        self.client.on_spin = self._spinning
        self.budget = MemoryBudget(budget_bytes)
        self.retry = RetryLayer(
            self.clock,
            attempt_timeout=ATTEMPT_TIMEOUT_S,
            backoff=Backoff(0.1, 2.0, uniform=rng.uniform),
            permanent_backoff=Backoff(5.0, 60.0, uniform=rng.uniform),
        )
        self.store = AzureObjectStore(
            self.client,  # type: ignore[arg-type]  # (mypy-zope misses implementer_only)
            self.clock,
            writer_id=writer_id,
            retry=self.retry,
            max_blocks=max_blocks,
            max_blob_bytes=max_blob_bytes,
        )
        self.registry = StreamRegistry(
            self.store,
            self.clock,
            StreamSettings(part_size=PART, lifetime_s=LIFETIME_S, checkpoint_s=CHECKPOINT_S),
            self.budget,
            uniform=rng.uniform,
        )
        # What Process's methods read.
        self._asks = 0
        #: Whether the process ever looped without yielding (see :data:`SPIN_LIMIT`).
        self.spun = False
        self.alive = True
        self.paused_until: Optional[float] = None
        self.partitioned_until: Optional[float] = None
        self._owed = 0.0
        self._answers_first = False
        self._stop_pending: Optional[tuple[float, Callable[[Process], None]]] = None
        self.flushed = False
        self.durable_at_stop: set[bytes] = set()
        self.closed = False
        self.accepted = []
        self.timed_out = False
        self._deadline: Optional[float] = None
        # As StreamService.startService.
        self.registry.ready = False
        self.registry.start_checkpoints()
        self.store.check().addCallback(self._ready)

    def _spinning(self) -> None:
        self.spun = True

    def __repr__(self) -> str:
        return f"<AzureProcess {self.name} {'alive' if self.alive else 'dead'}>"

    def tick(self, now: float, step: float) -> None:
        """``Process.tick``; the spin count starts again."""
        self.client.sent = 0
        super().tick(now, step)

    def stop(self, deadline_s: float, done: Callable[[Process], None]) -> None:
        """
        As the root service's stop: the flush with a deadline ``deadline_s`` from now
        (cut there), then the store closes; ``done(self)`` once the flush ended while
        the process lives (:attr:`durable_at_stop` set then).
        """
        if self.paused_until is not None:
            self._stop_pending = (deadline_s, done)
            return
        started = self.clock.seconds()
        self._deadline = started + deadline_s
        self.store.stopping(self._deadline)

        def flushed(result: object) -> None:
            if not self.alive:
                return
            self.flushed = True
            # As StreamService.stopService: the retry layer gives up at the same
            # deadline, so a flush cut short may end by itself at that instant.
            self.timed_out = (
                result is not None or self.clock.seconds() - started >= deadline_s - 1e-9
            )
            self.durable_at_stop = self.durable()
            self.store.close().addBoth(self._closed)
            done(self)

        self.registry.close_all().addTimeout(deadline_s, self.clock).addBoth(flushed)

    def held_bytes(self) -> int:
        """What the budget must show: stream overheads and unstored bytes."""
        streams = [e.stream for e in self.registry._open.values()] + list(
            self.registry._closing
        )
        return len(streams) * STREAM_OVERHEAD_BYTES + sum(s.unstaged_bytes for s in streams)


class AzureWorld(World):
    """
    :class:`World` on one shared :class:`MemoryAppendBlobs` (``service_max_blocks``:
    the service's block limit per blob).

    :ivar blobs: the container.
    """

    def __init__(self, service_max_blocks: int = MAX_BLOCKS) -> None:
        self.now = 0.0
        self.blobs = MemoryAppendBlobs(max_blocks=service_max_blocks)
        self.processes: list[Process] = []

    def spawn_azure(
        self, name: str, writer_id: str, rng: random.Random, **store: Any
    ) -> AzureProcess:
        """Start a process now (``store``: ``max_blocks``, ``max_blob_bytes``, ``budget_bytes``)."""
        process = AzureProcess(name, writer_id, self.blobs, self.now, rng, **store)
        self.processes.append(process)
        return process
