"""
The HTTP listener's connections: a whole-request read deadline
(``REQUEST_TIMEOUT_S``), the idle timeout of kept-alive connections, and a cap on
open connections (``MAX_CONNECTIONS``).

One sweep a second over the open connections checks both timeouts, instead of a
timer per connection that twisted.web cancels and starts again for every request
and pushes back on every read (so that a client sending one byte a minute kept its
connection forever).  A connection records only when the first byte of its current
request came (one clock read per request); the sweep cuts it once that is
``REQUEST_TIMEOUT_S`` ago and the request is still not whole: 408 with a JSON body
when an answer can still be written, else the connection is closed.

At ``MAX_CONNECTIONS`` open connections the listening socket is no longer read:
new connections wait in the kernel's listen backlog (and past it the kernel drops
their SYNs, which clients retry) until one closes, as HAProxy's ``maxconn`` and
Go's ``LimitListener`` do, so that a flood of slow clients delays the others
instead of resetting them.  Connections accepted in the same turn past the cap are
closed at once.  That is logged at most once a minute; the 408s are logged as
every 4xx is (:class:`~loghandler.rejections.RejectionLog`).
"""

from __future__ import annotations

import resource
from typing import Any, Callable, Optional, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: Seconds a kept-alive connection may sit idle between requests (twisted.web's own).
IDLE_TIMEOUT_S = 60.0
#: Seconds between two sweeps over the open connections.
SWEEP_INTERVAL_S = 1.0
#: Seconds a cut connection may take to close (its answer unread) before it is aborted.
ABORT_AFTER_S = 15.0
#: Seconds between two log lines of the cap.
LOG_INTERVAL_S = 60.0
#: File descriptors of a process kept for other uses than client connections
#: (storage connections, threads' pipes, logs) when ``MAX_CONNECTIONS`` is derived.
FD_RESERVE = 256
#: The most connections per process ``MAX_CONNECTIONS`` is derived as.
MAX_DERIVED = 10_000
#: The fewest.
MIN_DERIVED = 64


def default_max_connections(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
) -> int:
    """
    ``MAX_CONNECTIONS`` of one process when unset: ``RLIMIT_NOFILE``'s soft limit
    minus :data:`FD_RESERVE`, from :data:`MIN_DERIVED` to :data:`MAX_DERIVED`
    (1024 descriptors, Debian's and systemd's usual soft limit, give 768).
    """
    soft, _ = getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return MAX_DERIVED
    return max(MIN_DERIVED, min(MAX_DERIVED, soft - FD_RESERVE))


class Guarded(Protocol):
    """What :class:`ConnectionGuard` needs of a connection (a ``LogChannel``)."""

    #: When the first byte of the request being read came (the clock's seconds).
    reading_since: Optional[float]
    #: When the sweep first saw it idle, between requests.
    idle_since: Optional[float]
    #: When it was cut, if it was.
    cut_at: Optional[float]
    _handlingRequest: bool

    def cut_request(self, timeout_s: float) -> None: ...

    def cut_idle(self) -> None: ...

    def abort(self) -> None: ...


class _Throttle:
    """
    Paces a log line of an event that may come in floods: the first at once, then
    at most one per :data:`LOG_INTERVAL_S`, with the count since the last line.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._count = 0
        self._last = -LOG_INTERVAL_S

    def add(self) -> None:
        """One more event."""
        self._count += 1

    def due(self) -> int:
        """The events to report now (then counted from 0), or 0: not yet, or none."""
        now = self._clock.seconds()
        if not self._count or now - self._last < LOG_INTERVAL_S:
            return 0
        count, self._count, self._last = self._count, 0, now
        return count


class ConnectionGuard:
    """
    The connection limits of one listener (one process: a worker of ``WORKERS``
    takes its share of ``MAX_CONNECTIONS``).

    :param clock: for the sweep and the timestamps.
    :param request_timeout_s: ``REQUEST_TIMEOUT_S``: seconds from the first byte
        of a request to its last; 0 for no deadline.
    :param max_connections: ``MAX_CONNECTIONS``: the most open connections.
    :param idle_timeout_s: seconds a connection may be idle between requests.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        request_timeout_s: float,
        max_connections: int,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.clock = clock
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.connections: set[Guarded] = set()
        self._port: Any = None
        self.paused = False
        self._sweeps = LoopingCall(self.sweep)
        self._sweeps.clock = clock
        self._full = _Throttle(clock)

    def listening(self, port: Any) -> None:
        """The listening port (a ``tcp.Port``) to stop reading while at the cap."""
        self._port = port

    def start(self) -> None:
        """Start the sweeps (the site started listening)."""
        if not self._sweeps.running:
            self._sweeps.start(SWEEP_INTERVAL_S, now=False)

    def stop(self) -> None:
        """Stop the sweeps (the site stopped listening)."""
        if self._sweeps.running:
            self._sweeps.stop()

    def admit(self) -> bool:
        """Whether a new connection may open (one accepted past the cap is closed)."""
        return len(self.connections) < self.max_connections

    def opened(self, connection: Guarded) -> None:
        """A connection opened: count it; at the cap, stop accepting."""
        self.connections.add(connection)
        connection.idle_since = self.clock.seconds()
        if len(self.connections) >= self.max_connections and not self.paused:
            self.paused = True
            if self._port is not None:
                self._port.stopReading()
            self._full.add()
            self._report()

    def closed(self, connection: Guarded) -> None:
        """A connection closed: below the cap again, accept again."""
        self.connections.discard(connection)
        if self.paused and len(self.connections) < self.max_connections:
            self.paused = False
            if self._port is not None:
                self._port.startReading()

    def sweep(self) -> None:
        """
        Cut the connections whose request is older than ``REQUEST_TIMEOUT_S`` and
        close those idle for ``IDLE_TIMEOUT_S``; abort the ones cut
        :data:`ABORT_AFTER_S` ago that are still open.
        """
        now = self.clock.seconds()
        timeout = self.request_timeout_s
        for connection in list(self.connections):
            if connection.cut_at is not None:
                if now - connection.cut_at >= ABORT_AFTER_S:
                    connection.abort()
            elif connection._handlingRequest:  # answering: no deadline (ACK=durable)
                connection.idle_since = None
            elif (since := connection.reading_since) is not None:
                if timeout and now - since >= timeout:
                    connection.cut_at = now
                    connection.cut_request(timeout)
            elif connection.idle_since is None:
                connection.idle_since = now
            elif now - connection.idle_since >= self.idle_timeout_s:
                connection.cut_at = now
                connection.cut_idle()
        self._report()

    def _report(self) -> None:
        """Log the times the cap was reached, at most once a minute."""
        count = self._full.due()
        if count:
            self._log.warn(
                "MAX_CONNECTIONS: {limit} connections open; new ones wait in the listen"
                " backlog until one closes ({count} time(s) since the last report)",
                event="max_connections",
                count=count,
                limit=self.max_connections,
            )
