"""
``WORKERS`` above 1: the supervisor process.  ``twistd loghandler`` opens the
listening socket of ``LISTEN`` (or ``ADDR``/``PORT``) itself
(:func:`loghandler.listen.open_shared`) and starts that many worker processes
(:mod:`loghandler.worker`, each a whole loghandler with its own streams, writer ID and
share of the budget) that accept on it (``IReactorSocket.adoptStreamPort``, with TLS
for ``ssl:``); the
kernel hands each new connection to one of them.  Workers are started fresh
(``spawnProcess`` of ``python -m loghandler.worker``), never forked from a process
that already built a reactor.

The supervisor:

- restarts a worker that exits while the server runs, after 1, 2, 4 ... up to
  :data:`RESTART_CAP_S` seconds (back to 1 s once a worker ran
  :data:`STABLE_AFTER_S`), and logs why; what the dead worker staged is merged by
  another worker's recovery once its lease lapses (DESIGN.md section 6);
- republishes the workers' log events in its own log (``[worker N]``, and a
  ``worker`` field in JSON logs: :mod:`loghandler.logs`);
- combines the workers' health reports (:func:`combine_health`) and metrics
  (:func:`loghandler.exposition.combine`) and hands the result to every worker, so
  that ``/readyz``, ``/livez`` and ``/metrics`` on the shared port answer for all;
  with ``ADMIN_PORT`` it serves them itself, on that port;
- passes SIGHUP on to every worker (each reloads ``AUTH_TOKENS_FILE``);
- on stop (SIGTERM, SIGINT), sends each worker SIGTERM and returns only once every
  worker has flushed and exited, or kills the ones still running
  :data:`KILL_GRACE_S` seconds after ``SHUTDOWN_TIMEOUT_S``; it exits with status
  1 when a worker's flush lost lines (its exit status 1) or a worker did not
  finish its flush (killed, died), else dies by the stop signal, as twistd does.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from typing import Any, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from loghandler.admin import Probes, make_admin_site
from loghandler.config import Config, ConfigError
from loghandler.exposition import combine, cumulative, render, samples_of
from loghandler.health import LIVE_STALE_S, combine_health, combine_liveness
from loghandler.listen import (
    LISTEN_BACKLOG,
    ListenerService,
    ListeningSocket,
    admin_listener,
    listen_on,
    open_shared,
)
from loghandler.metrics import GAUGES_COMBINED_BY_MAX
from loghandler.stopping import EXIT_LOST, StopSignals
from loghandler.worker import FD_LISTEN, FD_REPORTS, REPORT_INTERVAL_S

#: Seconds before the first restart of a worker that exited; doubled each time it
#: exits again without having run :data:`STABLE_AFTER_S`.
RESTART_BASE_S = 1.0
#: The longest wait before a restart.
RESTART_CAP_S = 30.0
#: A worker that ran this long restarts after :data:`RESTART_BASE_S` again.
STABLE_AFTER_S = 60.0
#: Seconds after ``SHUTDOWN_TIMEOUT_S`` that a worker still running is killed.
KILL_GRACE_S = 5.0
#: Exit status of a worker that refused its configuration (as ``twistd loghandler``).
EXIT_CONFIG = 2


class _Lines:
    """Splits a byte stream into lines; keeps an unfinished line for later."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        return [line for line in lines if line]


class WorkerProcess(ProcessProtocol):
    """
    The supervisor's side of one worker: its log events, its stderr, its health
    reports, and its end.

    :param supervisor: told of reports and of the worker's end.
    :param number: the worker's number, 1 to ``WORKERS``.
    """

    _log = Logger()

    def __init__(self, supervisor: "WorkerSupervisor", number: int) -> None:
        self.supervisor = supervisor
        self.number = number
        self.reported = False
        self.pid: Optional[int] = None
        self._streams = {1: _Lines(), 2: _Lines(), FD_REPORTS: _Lines()}

    def connectionMade(self) -> None:
        """Keep the process ID for the logs (the transport forgets it at the end)."""
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Log events (1), stderr (2) or health reports (:data:`FD_REPORTS`)."""
        lines = self._streams.get(childFD)
        if lines is None:
            return
        for line in lines.feed(data):
            if childFD == 1:
                self._republish(line)
            elif childFD == 2:
                self._log.error(
                    "worker {worker}: {line}",
                    event="worker_stderr",
                    worker=self.number,
                    line=line.decode("utf-8", "replace"),
                )
            else:
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                self.reported = True
                self.supervisor.reported(self.number, report)

    def _republish(self, line: bytes) -> None:
        try:
            event = eventFromJSON(line.decode("utf-8", "replace"))
        except ValueError:
            self._log.info(
                "worker {worker}: {line}", event="worker_output", worker=self.number, line=line
            )
            return
        event["log_system"] = "worker %d" % self.number
        event["worker"] = self.number
        event.setdefault("log_time", time.time())
        globalLogPublisher(event)

    def send(self, line: bytes) -> None:
        """Write one line to the worker's stdin."""
        if self.transport is not None:
            self.transport.write(line + b"\n")

    def processEnded(self, reason: Failure) -> None:
        """Tell the supervisor."""
        self.supervisor.ended(self, reason)


def describe_exit(reason: Failure) -> str:
    """``exit status 1`` or ``killed by signal 9`` from a ``processEnded`` reason."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exit status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return "killed by signal %d" % value.signal
        return "exit status %s" % value.exitCode
    return str(value)


class WorkerSupervisor(Service):
    """
    Starts, restarts and stops ``config.workers`` worker processes on one
    listening socket.

    :param config: the whole server's configuration (``WORKERS``, ``LISTEN`` or
        ``ADDR`` and ``PORT``, ``SHUTDOWN_TIMEOUT_S``).
    :param reactor: an ``IReactorProcess`` and ``IReactorTime``.
    :param environ: the workers' environment: the variables, options included.
    :param executable: the Python interpreter that runs the workers.
    """

    _log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        environ: Mapping[str, str],
        executable: str = sys.executable,
    ) -> None:
        self._config = config
        self._reactor = reactor
        self._environ = dict(environ)
        self._executable = executable
        self._listening: Optional[ListeningSocket] = None
        self._socket: Optional[socket.socket] = None
        self._workers: dict[int, WorkerProcess] = {}
        self._started_at: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._reports: dict[int, dict[str, Any]] = {}
        # Each running worker's last metrics (samples_of) and when it last reported.
        self._samples: dict[int, list[Any]] = {}
        self._reported_at: dict[int, float] = {}
        # The counters and histograms of workers that ended (exposition.cumulative).
        self._retired: list[Any] = []
        self._metrics = CollectorRegistry()
        ProcessCollector(registry=self._metrics)
        self._workers_running = Gauge(
            "loghandler_workers_running",
            "Worker processes running (WORKERS).",
            registry=self._metrics,
        )
        self._worker_restarts = Counter(
            "loghandler_worker_restarts_total",
            "Worker processes that ended unexpectedly and were restarted.",
            registry=self._metrics,
        )
        self._metrics_broadcast = LoopingCall(self._broadcast_metrics)
        self._metrics_broadcast.clock = reactor
        self._admin: Optional[ListenerService] = None
        self._stopping = False
        #: Workers whose stop lost lines: exit status 1, killed, died.
        self.workers_lost = 0
        self._all_ended: Optional[Deferred[None]] = None
        self._kill: Optional[IDelayedCall] = None

    @property
    def port(self) -> int:
        """The TCP port listened on (``PORT``, or the one chosen for ``PORT=0``)."""
        assert self._socket is not None
        return int(self._socket.getsockname()[1])

    @property
    def pids(self) -> dict[int, Optional[int]]:
        """Each running worker's process ID, by worker number."""
        return {number: worker.pid for number, worker in self._workers.items()}

    def privilegedStartService(self) -> None:
        """
        Open the listening socket of ``LISTEN`` (or ``ADDR``/``PORT``) before twistd
        drops privileges (:func:`loghandler.listen.open_shared`); a string or socket
        refused is one line on stderr and exit status 2.
        """
        try:
            self._listening = open_shared(listen_on(self._config, LISTEN_BACKLOG))
        except ConfigError as e:
            sys.stderr.write("loghandler: %s\n" % e)
            raise SystemExit(EXIT_CONFIG) from None
        self._socket = self._listening.socket
        if self._config.admin_port is not None and self._admin is None:
            try:
                admin = admin_listener(self._config, self._reactor, make_admin_site(self.probes()))
            except ConfigError as e:
                sys.stderr.write("loghandler: %s\n" % e)
                raise SystemExit(EXIT_CONFIG) from None
            admin.privilegedStartService()  # one line and exit 2 when it cannot listen
            self._admin = admin
        Service.privilegedStartService(self)

    def startService(self) -> None:
        """Start every worker."""
        if self._socket is None:
            self.privilegedStartService()
        Service.startService(self)
        self._reactor.callWhenRunning(self._stop_once_on_signals)
        self._log.info(
            "loghandler supervisor on {where}: {workers} workers, each with"
            " BUFFER_BUDGET_BYTES / {workers} = {share} bytes",
            event="supervisor_started",
            where=self._config.listen or "%s:%d" % (self._config.addr, self.port),
            workers=self._config.workers,
            share=self._config.buffer_budget_bytes // self._config.workers,
        )
        if self._admin is not None:
            self._admin.startService()
        for number in range(1, self._config.workers + 1):
            self._start(number)
        self._metrics_broadcast.start(REPORT_INTERVAL_S, now=False)

    def _stop_once_on_signals(self) -> None:
        """
        SIGTERM and SIGINT stop the server once; a second signal (systemd and a
        shell both signalling, Ctrl-C twice) changes nothing, where twistd's own
        handlers would log ReactorNotRunning; the exit status is 1 when a worker
        lost lines (:class:`~loghandler.stopping.StopSignals`).  SIGHUP is passed
        on to the workers, which reload ``AUTH_TOKENS_FILE``; it stops nothing (a
        closed terminal).
        """
        StopSignals(
            self._reactor,
            lambda: self.workers_lost,
            "worker(s) lost acknowledged lines in their flush, or did not finish it",
        ).install()
        signal.signal(signal.SIGHUP, lambda *_: self._reactor.callFromThread(self._hangup))

    def _hangup(self) -> None:
        """SIGHUP: each worker reloads ``AUTH_TOKENS_FILE`` (it stops nothing)."""
        self._log.info(
            "SIGHUP: passed on to the workers (they reload AUTH_TOKENS_FILE)", event="sighup"
        )
        for worker in self._workers.values():
            self._signal(worker, "HUP")

    def _start(self, number: int) -> None:
        self._restarts.pop(number, None)
        assert self._socket is not None
        worker = WorkerProcess(self, number)
        args = [
            self._executable,
            "-m",
            "loghandler.worker",
            str(number),
            str(int(self._socket.family)),
        ]
        self._reactor.spawnProcess(
            worker,
            self._executable,
            args,
            env=self._environ,
            childFDs={0: "w", 1: "r", 2: "r", FD_LISTEN: self._socket.fileno(), FD_REPORTS: "r"},
        )
        self._workers[number] = worker
        self._started_at[number] = self._reactor.seconds()
        self._log.info(
            "worker {worker} started, pid {pid}", event="worker_started", worker=number, pid=worker.pid
        )

    def reported(self, number: int, report: dict[str, Any]) -> None:
        """A worker's health report: combine and hand the result to every worker."""
        if self._workers.get(number) is None:
            return
        samples = report.pop("metrics", None)
        if isinstance(samples, list):
            self._samples[number] = samples
        self._reports[number] = report
        self._reported_at[number] = self._reactor.seconds()
        self._broadcast()

    def health(self) -> dict[str, Any]:
        """The whole server's readiness (:func:`combine_health`)."""
        now = self._reactor.seconds()
        silent = {number: now - at for number, at in self._reported_at.items()}
        return combine_health(self._reports, self._config.workers, self._stopping, silent)

    def liveness(self) -> dict[str, Any]:
        """
        The whole server's liveness (:func:`combine_liveness`): not alive once a
        running worker sent no report for :data:`LIVE_STALE_S` (it is stuck).
        """
        now = self._reactor.seconds()
        silent = {
            number: now - self._reported_at.get(number, self._started_at[number])
            for number in self._workers
        }
        return combine_liveness(silent, LIVE_STALE_S)

    def metrics(self) -> list[Any]:
        """The whole server's metrics: the supervisor's and every worker's, combined."""
        self._workers_running.set(len(self._workers))
        own = samples_of(self._metrics, "supervisor")
        sets = [own, self._retired, *self._samples.values()]
        return combine(sets, GAUGES_COMBINED_BY_MAX)

    def probes(self) -> Probes:
        """What the ``ADMIN_PORT`` listener answers: the whole server's state."""
        return Probes(
            live=self.liveness, ready=self.health, metrics=lambda: render(self.metrics())
        )

    def _broadcast(self) -> None:
        self._send_to_workers({"ready": self.health(), "live": self.liveness()})

    def _broadcast_metrics(self) -> None:
        if self._workers:
            self._send_to_workers({"metrics": self.metrics()})

    def _send_to_workers(self, message: dict[str, Any]) -> None:
        """``message`` as one JSON line to every running worker."""
        line = json.dumps(message).encode()
        for worker in self._workers.values():
            worker.send(line)

    def ended(self, worker: WorkerProcess, reason: Failure) -> None:
        """A worker's process ended: restart it, or count it out when stopping."""
        number = worker.number
        if self._workers.get(number) is not worker:
            return
        del self._workers[number]
        self._reports.pop(number, None)
        self._reported_at.pop(number, None)
        ended_samples = self._samples.pop(number, None)
        if ended_samples is not None:
            self._retired = combine([self._retired, cumulative(ended_samples)])
        ran = self._reactor.seconds() - self._started_at.pop(number)
        how = describe_exit(reason)
        if self._stopping:
            if isinstance(reason.value, ProcessDone):
                self._log.info(
                    "worker {worker} stopped ({how})", event="worker_stopped", worker=number, how=how
                )
            elif (
                isinstance(reason.value, ProcessTerminated)
                and reason.value.exitCode == EXIT_LOST
            ):
                self.workers_lost += 1
                self._log.error(
                    "worker {worker} (pid {pid}) stopped ({how}): its flush lost acknowledged"
                    " lines (its errors are above)",
                    event="worker_lost_lines",
                    worker=number,
                    pid=worker.pid,
                    how=how,
                )
            else:
                self.workers_lost += 1
                self._log.error(
                    "worker {worker} (pid {pid}) ended during the stop ({how}) before"
                    " its flush was done: what it had not staged is lost, what it"
                    " staged is recovered once its lease lapses",
                    event="worker_died_while_stopping",
                    worker=number,
                    pid=worker.pid,
                    how=how,
                )
            self._broadcast()
            self._check_all_ended()
            return
        if (
            isinstance(reason.value, ProcessTerminated)
            and reason.value.exitCode == EXIT_CONFIG
            and not worker.reported
        ):
            self._log.critical(
                "worker {worker} refused the configuration ({how}; its error is above);"
                " stopping",
                event="worker_refused_configuration",
                worker=number,
                how=how,
            )
            self._reactor.stop()
            return
        self._worker_restarts.inc()
        failures = 0 if ran >= STABLE_AFTER_S else self._failures.get(number, 0) + 1
        self._failures[number] = failures
        delay = min(RESTART_CAP_S, RESTART_BASE_S * 2 ** max(0, failures - 1))
        self._log.error(
            "worker {worker} (pid {pid}) ended unexpectedly ({how}) after {ran:.1f} s;"
            " restarting it in {delay:g} s (what it staged is recovered once its lease"
            " lapses)",
            event="worker_died",
            worker=number,
            pid=worker.pid,
            how=how,
            ran=ran,
            delay=delay,
        )
        self._broadcast()
        self._restarts[number] = self._reactor.callLater(delay, self._start, number)

    def stopService(self) -> Deferred[None]:
        """SIGTERM every worker; fires once all exited (killed past the deadline)."""
        Service.stopService(self)
        self._stopping = True
        for restart in self._restarts.values():
            restart.cancel()
        self._restarts.clear()
        self._broadcast()
        self._all_ended = Deferred()
        for number, worker in self._workers.items():
            self._signal(worker, "TERM")
        self._kill = self._reactor.callLater(
            self._config.shutdown_timeout_s + KILL_GRACE_S, self._kill_remaining
        )
        ended = self._all_ended
        self._check_all_ended()
        return ended

    def _signal(self, worker: WorkerProcess, signal_name: str) -> None:
        try:
            if worker.transport is not None:
                worker.transport.signalProcess(signal_name)
        except ProcessExitedAlready:
            pass

    def _kill_remaining(self) -> None:
        self._kill = None
        for number, worker in self._workers.items():
            self._log.error(
                "worker {worker} (pid {pid}) still running {seconds:g} s after SIGTERM;"
                " killing it (what it staged is recovered once its lease lapses)",
                event="worker_killed",
                worker=number,
                pid=worker.pid,
                seconds=self._config.shutdown_timeout_s + KILL_GRACE_S,
            )
            self._signal(worker, "KILL")

    def _check_all_ended(self) -> None:
        if self._workers or self._all_ended is None or self._all_ended.called:
            return
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self._kill = None
        if self._listening is not None:
            self._listening.close()
            self._listening = None
            self._socket = None
        if self._metrics_broadcast.running:
            self._metrics_broadcast.stop()
        if self._admin is not None:
            admin, self._admin = self._admin, None
            admin.stopService()
        self._log.info("all workers stopped", event="workers_stopped")
        self._all_ended.callback(None)
