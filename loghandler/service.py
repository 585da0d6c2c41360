"""
The service tree and the flush on stop (DESIGN.md section 4).

One root ``MultiService``: the stream service first, then the store's background
services (recovery), the HTTP listener last.
``MultiService.stopService`` stops children in reverse order (listener first) and
twistd runs it as a before-shutdown reactor trigger, waiting for its Deferred: the
stream service refuses new messages (503), completes every object in parallel and
returns when all are done or ``SHUTDOWN_TIMEOUT_S`` has passed.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from loghandler.admin import Probes, add_probes, local_probes, make_admin_site
from loghandler.auth import TokenFile
from loghandler.budget import MemoryBudget
from loghandler.config import Config
from loghandler.interfaces import IObjectStore
from loghandler.listen import admin_listener, listener
from loghandler.message import Limits
from loghandler.metrics import Metrics
from loghandler.registry import StreamRegistry, StreamSettings
from loghandler.web import make_site

#: The name of the :class:`StreamService` in the root service.
STREAM_SERVICE_NAME = "streams"

#: The name of the ``ADMIN_PORT`` listener's service in the root service.
ADMIN_SERVICE_NAME = "admin"

#: Seconds the store's check at start may take before it counts as failed (and is
#: tried again): a connection that neither answers nor fails (a resolver that never
#: calls back, packets dropped) must not keep the server refusing without a word.
CHECK_TIMEOUT_S = 30.0

#: Seconds between checks of a store that could not be reached at start.
CHECK_INTERVAL_S = 5.0


class StreamService(Service):
    """
    Owns the :class:`StreamRegistry`.  On start, checks the store (HeadBucket) and
    keeps the registry refusing messages (503) until that succeeds, retrying every
    :data:`CHECK_INTERVAL_S`: a wrong bucket or credentials never acknowledge a
    message that cannot be stored.  On stop, completes every object within the
    deadline, then closes the store's connections.

    :param registry: the streams.
    :param store: the ``IObjectStore`` the streams write to.
    :param clock: for the deadline.
    :param shutdown_timeout_s: seconds the flush may take.
    :param metrics: the process's metrics (the flush's duration is set on it); the
        registry's by default.
    :ivar metrics: the process's metrics: serve ``metrics.registry``.
    """

    _log = Logger()

    def __init__(
        self,
        registry: StreamRegistry,
        store: IObjectStore,
        clock: IReactorTime,
        shutdown_timeout_s: float,
        metrics: Optional[Metrics] = None,
    ):
        self.metrics = metrics if metrics is not None else registry.metrics
        self.registry = registry
        self._store = store
        self._clock = clock
        self._timeout = shutdown_timeout_s
        self._next_check: Optional[IDelayedCall] = None
        self._waiting: list[Deferred[None]] = []
        self._stopping = False
        self._flushed = False

    def startService(self) -> None:
        """Refuse messages until the store answers; start the checkpoints."""
        Service.startService(self)
        self.registry.ready = False
        self.registry.start_checkpoints()
        self._check()

    def _check(self) -> None:
        self._next_check = None

        def reachable(_: object) -> None:
            self.registry.ready = True
            self.registry.unreachable = None
            self._log.info(
                "storage {store} reachable; taking messages",
                event="storage_reachable",
                store=self._store,
            )

        def unreachable(failure: Failure) -> None:
            error = (
                "no answer in %g s" % CHECK_TIMEOUT_S
                if failure.check(TimeoutError)
                else failure.getErrorMessage()
            )
            self.registry.unreachable = error
            self._log.error(
                "storage {store} not reachable ({error}); answering 503 until it is,"
                " next check in {delay} s",
                event="storage_unreachable",
                store=self._store,
                error=error,
                delay=CHECK_INTERVAL_S,
            )
            if self.running:
                self._next_check = self._clock.callLater(CHECK_INTERVAL_S, self._check)

        checking = self._store.check()
        checking.addTimeout(CHECK_TIMEOUT_S, self._clock)
        checking.addCallbacks(reachable, unreachable)

    #: After the stop: the accepted lines the flush neither stored nor staged
    #: (:meth:`StreamRegistry.lines_lost`); the process then exits with status 1.
    lines_lost = 0

    def stopService(self) -> Deferred[None]:
        """Refuse new messages and complete all objects; never errbacks."""
        Service.stopService(self)
        self._stopping = True
        if self._next_check is not None:
            self._next_check.cancel()
            self._next_check = None
        started = self._clock.seconds()
        self._store.stopping(started + self._timeout)
        flushing = self.registry.close_all()
        flushing.addTimeout(self._timeout, self._clock)

        def done(result: object) -> "Deferred[None]":
            seconds = self._clock.seconds() - started
            self.metrics.last_flush_seconds.set(seconds)
            self.lines_lost = self.registry.lines_lost()
            # The retry layer gives up at the same deadline, so a flush cut short
            # may end by itself at that instant rather than time out.
            if (
                isinstance(result, Failure) and result.check(TimeoutError)
            ) or seconds >= self._timeout:
                self._log.error(
                    "flush on stop passed its deadline of {timeout} s; see the errors above"
                    " for what was not stored",
                    event="flush_deadline_passed",
                    timeout=self._timeout,
                )
            elif isinstance(result, Failure):
                self._log.failure("flush on stop failed", result, event="flush_failed")
            else:
                self._log.info(
                    "flush on stop done in {seconds:.3f} s", event="flush_done", seconds=seconds
                )
            return self._store.close()

        stopped = flushing.addBoth(done).addErrback(
            lambda failure: self._log.failure(
                "closing the store failed", failure, event="store_close_failed"
            )
        )
        stopped.addBoth(self._stopped)
        return stopped

    def _stopped(self, result: object) -> object:
        self._flushed = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        return result

    def flushed(self) -> "Deferred[None]":
        """
        Fires once the stop's flush (and the store's close) is done: at once if it
        is, or if this service never started.
        """
        if self._flushed or not (self.running or self._waiting or self._stopping):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d


class AfterFlush(Service):
    """
    Runs ``inner`` (a listener) with the root service, but stops it only once the
    ``streams`` service's flush is done: ``MultiService`` calls every child's
    ``stopService`` at once, so the ``ADMIN_PORT`` listener would close as the flush
    begins, and the probes (``/readyz`` 503 ``stopping``, ``/livez``) and metrics
    would go unanswered through it.
    """

    def __init__(self, inner: Service, streams: StreamService) -> None:
        self._inner = inner
        self._streams = streams

    def privilegedStartService(self) -> None:
        """Listen (before twistd drops privileges)."""
        Service.privilegedStartService(self)
        self._inner.privilegedStartService()

    def startService(self) -> None:
        """Listen, if not yet."""
        Service.startService(self)
        self._inner.startService()

    def stopService(self) -> "Deferred[None]":
        """Stop listening once the flush is done."""
        Service.stopService(self)
        return self._streams.flushed().addCallback(lambda _: self._inner.stopService())


def build_service(
    config: Config,
    store: IObjectStore,
    reactor: IReactorTime,
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    budget: Optional[MemoryBudget] = None,
    background: Sequence[IService] = (),
    adopt: Optional[tuple[int, int]] = None,
    probes: Optional[Probes] = None,
    metrics: Optional[Metrics] = None,
    auth: Optional[TokenFile] = None,
) -> MultiService:
    """
    The root service for ``config`` writing to ``store`` (an ``IObjectStore``).

    :param reactor: the reactor (clock and listener).
    :param now_ms: the wall clock in Unix epoch milliseconds, for the timestamp window.
    :param budget: the memory budget the store's merges also count in; by default
        a new one of ``BUFFER_BUDGET_BYTES``.
    :param background: services of the store (recovery), started after the stream
        service and stopped before its flush.
    :param adopt: ``(fd, family)`` of a listening socket inherited from the
        supervisor (a worker of ``WORKERS``), served through the same ``LISTEN``
        (or ``ADDR``/``PORT``) endpoint string (:func:`loghandler.listen.listener`).
    :param probes: what the probes and metrics answer in place of this process's
        own state (a worker of ``WORKERS``: the whole server's); given, the
        ``ADMIN_PORT`` listener is not this process's to open (the supervisor's).
    :param metrics: the process's metrics, which the store given counts on too
        (:func:`loghandler.tap.build_root` makes one for both); by default a new
        one.  The stream service (named :data:`STREAM_SERVICE_NAME`) holds it as
        ``metrics``.
    :param auth: ``AUTH_TOKENS_FILE``'s credentials, for ``POST /log``; started and
        stopped (its looks for changes) with the root.
    """
    if metrics is None:
        metrics = Metrics()
    registry = StreamRegistry(
        store,
        reactor,
        StreamSettings(
            part_size=config.part_size,
            lifetime_s=config.queue_timeout_s,
            parts_in_flight=config.parts_in_flight,
            budget_bytes=config.buffer_budget_bytes,
            checkpoint_s=config.checkpoint_s,
            client_budget_bytes=config.client_budget_bytes,
        ),
        budget,
        metrics=metrics,
    )
    limits = Limits(
        max_client_id=config.max_client_id,
        max_age_ms=int(config.timestamp_max_age_s * 1000),
        max_ahead_ms=int(config.timestamp_max_ahead_s * 1000),
    )
    site = make_site(
        registry,
        limits,
        now_ms,
        config.max_body_bytes,
        config.access_log,
        durable_timeout_s=config.durable_timeout_s if config.ack == "durable" else None,
        clock=reactor,
        batch_max_bytes=config.batch_max_bytes,
        batch_max_lines=config.batch_max_lines,
        metrics=metrics,
        auth=auth,
        request_timeout_s=config.request_timeout_s,
        max_connections=config.max_connections,
    )
    root = MultiService()
    streams = StreamService(registry, store, reactor, config.shutdown_timeout_s, metrics)
    streams.setName(STREAM_SERVICE_NAME)
    admin_here = probes is None and config.admin_port is not None
    if probes is None:
        probes = local_probes(registry, config.ready_fail_after_s, metrics.registry)
    if config.admin_port is None:
        add_probes(site.resource, probes, site)
    elif admin_here:
        # Stopped after the flush: the probes answer (/readyz: stopping) during it.
        admin = AfterFlush(admin_listener(config, reactor, make_admin_site(probes)), streams)
        admin.setName(ADMIN_SERVICE_NAME)
        admin.setServiceParent(root)
    streams.setServiceParent(root)
    for service in background:
        service.setServiceParent(root)
    if auth is not None:
        auth.setServiceParent(root)
    listener(config, reactor, site, adopt).setServiceParent(root)
    return root
