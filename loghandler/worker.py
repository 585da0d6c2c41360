"""
One worker process of ``WORKERS`` (:mod:`loghandler.supervisor` starts them):
``python -m loghandler.worker NUMBER FAMILY``.

A worker is a whole loghandler (its own streams, writer ID, lease and recovery, and
its share of ``BUFFER_BUDGET_BYTES``) that accepts connections on the listening
socket the supervisor opened.  Its file descriptors:

- 0: from the supervisor, one JSON object per line: the whole server's readiness
  and liveness (``{"ready": ..., "live": ...}``, :func:`combine_health`), after each
  report of any worker, and its metrics (``{"metrics": ...}``,
  :func:`loghandler.exposition.combine`) every :data:`REPORT_INTERVAL_S`; end of file
  means the supervisor is gone: the worker stops (flushes) as on SIGTERM.
- 1: its log events, one JSON object per line (``twisted.logger`` JSON), which the
  supervisor republishes in its own log as ``[worker N]``.
- 2: anything written to stderr (a crash before logging started).
- 3: the listening socket (:data:`FD_LISTEN`), of address family ``FAMILY``.
- 4: to the supervisor, this worker's health (:func:`local_health`) and metrics
  (``"metrics"``: :func:`loghandler.exposition.samples_of`) every
  :data:`REPORT_INTERVAL_S`, one JSON object per line (:data:`FD_REPORTS`).

SIGTERM and SIGINT stop it once (a second signal changes nothing): the flush of
``SHUTDOWN_TIMEOUT_S``, then exit status 0, or 1 (:data:`EXIT_LOST`) when the flush
left acknowledged lines neither stored nor staged.  SIGHUP reloads ``AUTH_TOKENS_FILE``
(:func:`loghandler.auth.reload_on_sighup`); it never stops a worker.
"""

from __future__ import annotations

import copy
import io
import json
import os
import signal
import sys
from typing import Any, Callable, Optional, cast

from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import provider

from loghandler.admin import Probes, alive
from loghandler.exposition import render, samples_of
from loghandler.health import local_health
from loghandler.logs import jsonable

#: The inherited listening socket.
FD_LISTEN = 3
#: The pipe this worker's health reports go to.
FD_REPORTS = 4
#: Seconds between health reports to the supervisor.
REPORT_INTERVAL_S = 1.0
#: A combined health older than this many report intervals is not used.
STALE_AFTER_INTERVALS = 3


class SupervisorChannel(LineOnlyReceiver):
    """
    The worker's side of the pipes to the supervisor: reports this worker's health
    and metrics every :data:`REPORT_INTERVAL_S` and keeps the whole server's
    readiness, liveness and metrics it gets back, which the worker's probes answer
    (:meth:`probes`) while they are fresh.

    :param number: this worker's number (1 to ``WORKERS``).
    :param local: this worker's health (:func:`local_health` of its registry).
    :param clock: for the reports and the age of what the supervisor sent.
    :param supervisor_gone: called once when the supervisor's pipe closes.
    :param metrics: this worker's metrics (a ``CollectorRegistry``).
    """

    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024
    _log = Logger()

    def __init__(
        self,
        number: int,
        local: Callable[[], dict[str, Any]],
        clock: Any,
        supervisor_gone: Callable[[], None],
        metrics: Optional[Collector] = None,
    ) -> None:
        self.number = number
        self._local = local
        self._clock = clock
        self._supervisor_gone = supervisor_gone
        self._metrics = metrics if metrics is not None else CollectorRegistry()
        self._process = "worker-%d" % number
        # What the supervisor sent last, by kind ("ready", "live", "metrics"), with
        # the clock's seconds it came at.
        self._combined: dict[str, tuple[float, Any]] = {}
        self._reports = LoopingCall(self.report)
        self._reports.clock = clock

    def connectionMade(self) -> None:
        """Start reporting."""
        self._reports.start(REPORT_INTERVAL_S, now=True)

    def report(self) -> None:
        """Send this worker's health, with its pid and metrics."""
        report = dict(
            self._local(), pid=os.getpid(), metrics=samples_of(self._metrics, self._process)
        )
        self.sendLine(json.dumps(report).encode())

    def lineReceived(self, line: bytes) -> None:
        """What the supervisor combined: readiness and liveness, or metrics."""
        try:
            combined = json.loads(line)
            kinds = {kind: combined[kind] for kind in ("ready", "live", "metrics") if kind in combined}
        except (ValueError, TypeError):
            self._log.error(
                "unreadable line from the supervisor: {line!r}",
                line=line[:200],
                event="supervisor_line_unreadable",
            )
            return
        now = self._clock.seconds()
        for kind, value in kinds.items():
            self._combined[kind] = (now, value)

    def _fresh(self, kind: str) -> Optional[Any]:
        """What the supervisor sent of ``kind``, unless it is stale."""
        sent = self._combined.get(kind)
        if sent is None:
            return None
        if self._clock.seconds() - sent[0] > STALE_AFTER_INTERVALS * REPORT_INTERVAL_S:
            return None
        return sent[1]

    def health(self) -> dict[str, Any]:
        """
        What ``/readyz`` answers: the whole server's readiness while the
        supervisor's is fresh, with this worker's own reason when it is not ok itself
        (it is the one answering); this worker's own readiness otherwise.
        """
        local = self._local()
        combined = self._fresh("ready")
        if combined is None:
            return local
        combined = dict(combined)
        if local["status"] != "ok" and combined.get("status") == "ok":
            combined["status"] = "worker %d: %s" % (self.number, local["status"])
        return combined

    def liveness(self) -> dict[str, Any]:
        """
        What ``/livez`` answers: the whole server's liveness (a worker that stopped
        reporting is stuck) while fresh; else this worker's: alive, it answers.
        """
        combined = self._fresh("live")
        return dict(combined) if combined is not None else alive()

    def metrics(self) -> bytes:
        """
        What ``/metrics`` answers: all workers' metrics together while fresh; this
        worker's alone otherwise.
        """
        combined = self._fresh("metrics")
        if combined is None:
            combined = samples_of(self._metrics, self._process)
        return render(combined)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        """The supervisor is gone: stop."""
        if self._reports.running:
            self._reports.stop()
        self._supervisor_gone()


def _portable(failure: Failure) -> Failure:
    """
    A copy of ``failure`` whose exception is its message: twisted.logger's JSON
    writes an exception object as ``{"unpersistable": true}``, which the supervisor
    would print in place of the message.
    """
    portable = copy.copy(failure)
    portable.value = failure.getErrorMessage()  # type: ignore[assignment]
    return portable


def preformatted(observer: ILogObserver) -> ILogObserver:
    """
    ``observer`` given each event with its text already formatted
    (``formatEvent``): twisted.logger's JSON keeps the fields but not their format
    specs (``{seconds:.3f}``), so the supervisor would print raw floats; a failure's
    exception goes as its message (:func:`_portable`).  Its named
    fields are made JSON values as :mod:`loghandler.logs` writes them (twisted.logger's
    JSON would write ``{"unpersistable": true}`` for an object), so that the
    supervisor's JSON log carries the same fields as a single process's.
    """

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        fields = {
            name: value if name.startswith("log_") else jsonable(value)
            for name, value in event.items()
        }
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            fields["log_failure"] = _portable(failure)
        elif "log_format" in event:
            text = formatEvent(event)
            fields["log_format"] = text.replace("{", "{{").replace("}", "}}")
        observer(fields)

    return cast(ILogObserver, observe)


def run(number: int, family: int) -> int:
    """
    Run worker ``number`` until it is stopped; its exit status.  The configuration
    comes from the environment the supervisor passed on (options included).
    """
    from twisted.internet import reactor as global_reactor, stdio
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    from loghandler.config import ConfigError, from_environ, worker_share
    from loghandler.service import STREAM_SERVICE_NAME
    from loghandler.stopping import EXIT_LOST
    from loghandler.tap import build_root

    reactor: Any = global_reactor
    log_file = io.open(1, "w", encoding="utf-8", closefd=False, errors="replace")
    globalLogBeginner.beginLoggingTo(
        [preformatted(jsonFileLogObserver(log_file, recordSeparator=""))],
        redirectStandardIO=False,
    )
    try:
        config = worker_share(from_environ(os.environ))
    except ConfigError as e:
        sys.stderr.write("loghandler: %s\n" % e)
        return 2
    stopping: list[bool] = []

    def stop() -> None:
        if not stopping:
            stopping.append(True)
            reactor.stop()

    holder: list[SupervisorChannel] = []
    probes = Probes(
        live=lambda: holder[0].liveness(),
        ready=lambda: holder[0].health(),
        metrics=lambda: holder[0].metrics(),
    )
    try:
        root = build_root(config, reactor, adopt=(FD_LISTEN, family), probes=probes)
    except ConfigError as e:
        sys.stderr.write("loghandler: %s\n" % e)
        return 2
    streams = root.getServiceNamed(STREAM_SERVICE_NAME)  # type: ignore[attr-defined]
    registry = streams.registry
    channel = SupervisorChannel(
        number,
        lambda: local_health(registry, config.ready_fail_after_s),
        reactor,
        stop,
        streams.metrics.registry,
    )
    holder.append(channel)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: reactor.callFromThread(stop))
    # SIGHUP never stops a worker (a supervisor that led its terminal's session and
    # dies sends it to its workers: they stop when its pipe closes, with a flush);
    # once the reactor runs it reloads AUTH_TOKENS_FILE (build_root).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)

    def start() -> None:
        root.privilegedStartService()
        root.startService()
        standard_io: Any = stdio.StandardIO
        standard_io(channel, stdin=0, stdout=FD_REPORTS, reactor=reactor)

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    # Flushed: a late second signal (a process-group kill) must not turn a clean
    # exit into death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    return EXIT_LOST if streams.lines_lost else 0


if __name__ == "__main__":
    sys.exit(run(int(sys.argv[1]), int(sys.argv[2])))
