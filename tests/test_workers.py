"""
Tests for ``WORKERS``: the setting (:mod:`loghandler.config`, :mod:`loghandler.cpus`),
the combined health (:mod:`loghandler.health`), the worker's channel to its supervisor
(:mod:`loghandler.worker`) and the supervisor's restarts and stop
(:mod:`loghandler.supervisor`), on a fake process reactor and ``task.Clock``.  The
real processes are tested end to end in ``tests/integration/test_workers.py``.
"""

from __future__ import annotations

import atexit
import io
import json
import signal
import socket
import sys
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    CannotListenError,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import (
    LogLevel,
    eventAsJSON,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from loghandler.config import ConfigError, MiB, from_environ, worker_share
from loghandler.cpus import cgroup_cpu_limit, usable_cpus
from loghandler.exposition import combine, render, samples_of
from loghandler.health import LIVE_STALE_S, READY_STALE_S, combine_health, combine_liveness
from loghandler.listen import open_listening_socket
from loghandler.supervisor import (
    KILL_GRACE_S,
    RESTART_BASE_S,
    WorkerProcess,
    WorkerSupervisor,
    describe_exit,
)
from loghandler.worker import FD_LISTEN, FD_REPORTS, REPORT_INTERVAL_S, SupervisorChannel

BASE = {"NO_UPLOAD": "1"}


class WorkersSettingTests(SynchronousTestCase):
    """``WORKERS``: a number from 1 to 64 or ``auto``; each worker's share of the budget."""

    def test_default_is_one(self) -> None:
        self.assertEqual(from_environ(BASE).workers, 1)

    def test_number(self) -> None:
        self.assertEqual(from_environ({**BASE, "WORKERS": " 4 "}).workers, 4)

    def test_auto_is_the_usable_cpus(self) -> None:
        self.assertEqual(from_environ({**BASE, "WORKERS": "AUTO"}).workers, usable_cpus())

    def test_bad_values(self) -> None:
        for value, message in [
            ("0", "WORKERS: must be 'auto' or an integer from 1 to 64, got '0'"),
            ("65", "WORKERS: must be 'auto' or an integer from 1 to 64, got '65'"),
            ("two", "WORKERS: must be 'auto' or an integer from 1 to 64, got 'two'"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                from_environ({**BASE, "WORKERS": value})
            self.assertEqual(str(caught.exception), message)

    def test_budget_must_hold_four_parts_per_worker(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            from_environ({**BASE, "WORKERS": "4", "BUFFER_BUDGET_BYTES": str(64 * MiB)})
        self.assertEqual(
            str(caught.exception),
            "BUFFER_BUDGET_BYTES: must be at least WORKERS x 4 x PART_SIZE_BYTES"
            " (83886080 with WORKERS=4), got 67108864",
        )

    def test_batch_must_fit_half_a_share(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            from_environ(
                {
                    **BASE,
                    "WORKERS": "2",
                    "BUFFER_BUDGET_BYTES": str(48 * MiB),
                    "BATCH_MAX_BYTES": str(16 * MiB),
                }
            )
        self.assertIn("BATCH_MAX_BYTES: must be at most half of BUFFER_BUDGET_BYTES / WORKERS", str(caught.exception))

    def test_worker_share(self) -> None:
        """Each of N workers holds BUFFER_BUDGET_BYTES / N; one worker holds it all."""
        config = from_environ({**BASE, "WORKERS": "3", "BUFFER_BUDGET_BYTES": str(300 * MiB)})
        self.assertEqual(worker_share(config).buffer_budget_bytes, 100 * MiB)
        one = from_environ(BASE)
        self.assertIs(worker_share(one), one)


class UsableCpusTests(SynchronousTestCase):
    """``WORKERS=auto`` counts the affinity mask, capped by the cgroup CPU quota."""

    def files(self, **contents: str) -> Any:
        paths = {
            "v2": "/sys/fs/cgroup/cpu.max",
            "quota": "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
            "period": "/sys/fs/cgroup/cpu/cpu.cfs_period_us",
        }
        table = {paths[name]: text for name, text in contents.items()}
        return table.get

    def test_cgroup_v2_quota(self) -> None:
        self.assertEqual(cgroup_cpu_limit(self.files(v2="150000 100000")), 1.5)
        self.assertEqual(usable_cpus(self.files(v2="150000 100000"), lambda: 8), 2)

    def test_cgroup_v2_no_quota(self) -> None:
        self.assertIsNone(cgroup_cpu_limit(self.files(v2="max 100000")))
        self.assertEqual(usable_cpus(self.files(v2="max 100000"), lambda: 8), 8)

    def test_cgroup_v1_quota(self) -> None:
        read = self.files(quota="50000", period="100000")
        self.assertEqual(cgroup_cpu_limit(read), 0.5)
        self.assertEqual(usable_cpus(read, lambda: 4), 1)

    def test_cgroup_v1_unlimited(self) -> None:
        self.assertIsNone(cgroup_cpu_limit(self.files(quota="-1", period="100000")))

    def test_no_cgroup_and_affinity_wins(self) -> None:
        self.assertEqual(usable_cpus(self.files(), lambda: 3), 3)

    def test_quota_never_below_one(self) -> None:
        self.assertEqual(usable_cpus(self.files(v2="10000 100000"), lambda: 4), 1)

    def test_garbage(self) -> None:
        self.assertIsNone(cgroup_cpu_limit(self.files(v2="lots 100000")))


def report(
    status: str = "ok", pid: int = 100, held: int = 10, failing_s: float = 0.0
) -> dict[str, Any]:
    return {
        "status": status,
        "open_objects": 2,
        "completing_objects": 1,
        "buffered_bytes": held,
        "buffer_budget_bytes": 1000,
        "storage_failing_s": failing_s,
        "pid": pid,
    }


class CombineHealthTests(SynchronousTestCase):
    """The whole server's ``/healthz`` from the workers' reports."""

    def test_all_ok_sums(self) -> None:
        combined = combine_health(
            {1: report(pid=11, held=5, failing_s=3.5), 2: report(pid=12, held=7, failing_s=1)}, 2
        )
        self.assertEqual(
            combined,
            {
                "status": "ok",
                "open_objects": 4,
                "completing_objects": 2,
                "buffered_bytes": 12,
                "buffer_budget_bytes": 2000,
                "storage_failing_s": 3.5,
                "workers_running": 2,
                "workers_expected": 2,
                "workers": [
                    {"worker": 1, "pid": 11, "status": "ok"},
                    {"worker": 2, "pid": 12, "status": "ok"},
                ],
            },
        )

    def test_one_worker_not_ok(self) -> None:
        combined = combine_health({1: report(), 2: report("buffers full")}, 2)
        self.assertEqual(combined["status"], "worker 2: buffers full")

    def test_a_worker_being_restarted_is_still_ok(self) -> None:
        combined = combine_health({2: report()}, 2)
        self.assertEqual((combined["status"], combined["workers_running"]), ("ok", 1))

    def test_none_running(self) -> None:
        self.assertEqual(combine_health({}, 2)["status"], "no worker running")

    def test_stopping(self) -> None:
        self.assertEqual(combine_health({1: report()}, 2, stopping=True)["status"], "stopping")

    def test_liveness(self) -> None:
        """Alive until a running worker has been silent past the bound (stuck)."""
        self.assertEqual(combine_liveness({1: 1.0, 2: 30.0}, 30.0), {"status": "ok", "workers_running": 2})
        self.assertEqual(
            combine_liveness({1: 1.0, 2: 30.5}, 30.0),
            {"status": "worker 2 sent no report for 30 s", "workers_running": 2},
        )
        self.assertEqual(combine_liveness({}, 30.0), {"status": "ok", "workers_running": 0})


class SupervisorChannelTests(SynchronousTestCase):
    """The worker reports its health each second and answers with the combined one."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.local = report(pid=0)
        self.gone: list[bool] = []
        self.registry = CollectorRegistry()
        Counter("loghandler_requests", "requests", registry=self.registry).inc(3)
        ProcessCollector(registry=self.registry)
        self.channel = SupervisorChannel(
            2, lambda: dict(self.local), self.clock, lambda: self.gone.append(True), self.registry
        )
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def sent(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.transport.value().splitlines()]

    def test_reports_now_and_every_interval(self) -> None:
        self.assertEqual(len(self.sent()), 1)
        self.clock.advance(REPORT_INTERVAL_S)
        self.clock.advance(REPORT_INTERVAL_S)
        sent = self.sent()
        self.assertEqual(len(sent), 3)
        self.assertEqual(sent[-1]["status"], "ok")
        self.assertIsInstance(sent[-1]["pid"], int)
        self.assertNotEqual(sent[-1]["pid"], 0)

    def test_local_until_combined_arrives(self) -> None:
        self.assertEqual(self.channel.health(), self.local)

    def test_combined_while_fresh(self) -> None:
        combined = combine_health({1: report(pid=1), 2: report(pid=2)}, 2)
        self.channel.dataReceived(json.dumps({"ready": combined}).encode() + b"\n")
        self.assertEqual(self.channel.health(), combined)
        self.clock.advance(3 * REPORT_INTERVAL_S)
        self.assertEqual(self.channel.health(), combined)
        self.clock.advance(0.1)
        self.assertEqual(self.channel.health(), self.local)

    def test_own_reason_wins_over_stale_ok(self) -> None:
        """The worker answering is stopping before the supervisor's view says so."""
        ready = combine_health({2: report()}, 2)
        self.channel.dataReceived(json.dumps({"ready": ready}).encode() + b"\n")
        self.local["status"] = "stopping"
        self.assertEqual(self.channel.health()["status"], "worker 2: stopping")

    def test_garbage_is_logged_not_used(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.channel.dataReceived(b"{not json\n")
        self.assertEqual(self.channel.health(), self.local)
        self.assertIn("unreadable line", formatEventAsClassicLogText(events[-1]) or "")

    def test_liveness_combined_while_fresh(self) -> None:
        """/livez: the supervisor's view (a stuck worker) while fresh, else alive."""
        self.assertEqual(self.channel.liveness(), {"status": "ok"})
        stuck = combine_liveness({1: 31.0, 2: 0.5}, 30.0)
        self.channel.dataReceived(json.dumps({"live": stuck}).encode() + b"\n")
        self.assertEqual(self.channel.liveness()["status"], "worker 1 sent no report for 31 s")
        self.clock.advance(3 * REPORT_INTERVAL_S + 0.1)
        self.assertEqual(self.channel.liveness(), {"status": "ok"})

    def test_reports_carry_metrics(self) -> None:
        """Each report carries this worker's samples, process_* labelled worker-2."""
        sent = self.sent()[-1]
        names = {family[0] for family in sent["metrics"]}
        self.assertIn("loghandler_requests", names)
        process = [f for f in sent["metrics"] if f[0].startswith("process_")]
        for family in process:
            for _, labels, _ in family[4]:
                self.assertEqual(labels["process"], "worker-2")

    def test_metrics_combined_while_fresh(self) -> None:
        """/metrics: the supervisor's combination while fresh, else this worker's own."""
        own = self.channel.metrics()
        self.assertIn(b"loghandler_requests_total 3.0", own)
        combined = combine([samples_of(self.registry), samples_of(self.registry)])
        self.channel.dataReceived(json.dumps({"metrics": combined}).encode() + b"\n")
        self.assertIn(b"loghandler_requests_total 6.0", self.channel.metrics())
        self.clock.advance(3 * REPORT_INTERVAL_S + 0.1)
        self.assertIn(b"loghandler_requests_total 3.0", self.channel.metrics())

    def test_supervisor_gone_stops(self) -> None:
        self.channel.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.gone, [True])
        self.clock.advance(10)
        self.assertEqual(len(self.sent()), 1)


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid: Optional[int] = pid
        self.signals: list[str] = []
        self.written: list[bytes] = []

    def signalProcess(self, name: str) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def write(self, data: bytes) -> None:
        self.written.append(data)


class FakeProcessReactor(Clock):
    """``spawnProcess`` recording each call, on a ``Clock``."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[WorkerProcess, list[str], dict[int, Any], FakeProcess]] = []
        self.stopped = 0
        self.triggers: list[tuple[str, str, Any, Any]] = []

    def spawnProcess(
        self, protocol: WorkerProcess, executable: str, args: list[str], env: Any, childFDs: Any
    ) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned))
        protocol.makeConnection(process)  # type: ignore[arg-type]
        self.spawned.append((protocol, args, childFDs, process))
        return process

    def stop(self) -> None:
        self.stopped += 1

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        """Record the listener (the ``ADMIN_PORT`` one)."""
        if getattr(self, "refuse_listen", False):
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        self.listening = (port, factory, interface)
        listening = self

        class Port:
            def getHost(self) -> Any:
                return IPv4Address("TCP", interface, port or 9102)

            def stopListening(self) -> None:
                listening.listening = None

        return Port()

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        self.when_running = (f, args)

    def addSystemEventTrigger(self, phase: str, event: str, f: Any, *args: Any) -> None:
        self.triggers.append((phase, event, f, args))


def exited(code: Optional[int] = None, signum: Optional[int] = None) -> Failure:
    if code == 0 and signum is None:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(exitCode=code, signal=signum))


class SupervisorTests(SynchronousTestCase):
    """Start, health hand-over, restarts with backoff, stop."""

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.config = from_environ(
            {**BASE, "WORKERS": "2", "ADDR": "127.0.0.1", "PORT": "0", "SHUTDOWN_TIMEOUT_S": "10"}
        )
        self.supervisor = WorkerSupervisor(
            self.config, self.reactor, {"WORKERS": "2", "X": "y"}, executable="/py"
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.supervisor.startService()
        self.addCleanup(self.close)

    def close(self) -> None:
        socket_ = self.supervisor._socket
        if socket_ is not None:
            socket_.close()

    def logged(self) -> str:
        return "\n".join(formatEventAsClassicLogText(e) or "" for e in self.events)

    def test_starts_each_worker_on_the_socket(self) -> None:
        """Two ``python -m loghandler.worker N FAMILY`` with the socket as fd 3."""
        self.assertEqual(len(self.reactor.spawned), 2)
        for number, (protocol, args, fds, _) in enumerate(self.reactor.spawned, 1):
            self.assertEqual(args, ["/py", "-m", "loghandler.worker", str(number), str(int(socket.AF_INET))])
            self.assertEqual(fds[FD_LISTEN], self.supervisor._socket.fileno())  # type: ignore[union-attr]
            self.assertEqual((fds[0], fds[1], fds[2], fds[FD_REPORTS]), ("w", "r", "r", "r"))
            self.assertEqual(protocol.number, number)
        self.assertEqual(self.supervisor.pids, {1: 1000, 2: 1001})
        listening = socket.create_connection(("127.0.0.1", self.supervisor.port))
        listening.close()

    def test_reports_are_combined_and_handed_to_every_worker(self) -> None:
        first, second = self.reactor.spawned[0][0], self.reactor.spawned[1][0]
        first.childDataReceived(FD_REPORTS, json.dumps(report(pid=1000)).encode())
        first.childDataReceived(FD_REPORTS, b"\n")
        second.childDataReceived(FD_REPORTS, json.dumps(report("buffers full", 1001)).encode() + b"\n")
        for _, _, _, process in self.reactor.spawned:
            last = json.loads(b"".join(process.written).splitlines()[-1])
            self.assertEqual(last["ready"]["status"], "worker 2: buffers full")
            self.assertEqual(last["ready"]["workers_running"], 2)
            self.assertEqual(last["live"], {"status": "ok", "workers_running": 2})
        self.assertEqual(self.supervisor.health()["buffered_bytes"], 20)

    def report_metrics(self, index: int, accepted: float, held: float) -> None:
        """Worker ``index`` (0-based) reports ``accepted`` messages and ``held`` bytes."""
        registry = CollectorRegistry()
        Counter("loghandler_messages", "m", ["result"], registry=registry).labels(
            "accepted"
        ).inc(accepted)
        Gauge("loghandler_buffered_bytes", "b", registry=registry).set(held)
        Gauge("loghandler_oldest_unstored_line_age_seconds", "a", registry=registry).set(held)
        line = dict(report(pid=1000 + index), metrics=samples_of(registry))
        self.reactor.spawned[index][0].childDataReceived(
            FD_REPORTS, json.dumps(line).encode() + b"\n"
        )

    def scraped(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The supervisor's combined metrics, parsed back from the text format."""
        text = render(self.supervisor.metrics()).decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def test_metrics_summed_with_ages_by_max(self) -> None:
        """Counters and gauges summed over workers; the oldest-line age is the largest."""
        self.report_metrics(0, accepted=5, held=100)
        self.report_metrics(1, accepted=7, held=40)
        scraped = self.scraped()
        self.assertEqual(scraped[("loghandler_messages_total", (("result", "accepted"),))], 12)
        self.assertEqual(scraped[("loghandler_buffered_bytes", ())], 140)
        self.assertEqual(scraped[("loghandler_oldest_unstored_line_age_seconds", ())], 100)
        self.assertEqual(scraped[("loghandler_workers_running", ())], 2)
        self.assertIn(("process_cpu_seconds_total", (("process", "supervisor"),)), scraped)
        # Handed to every worker once a second, for /metrics on the shared port.
        self.reactor.advance(REPORT_INTERVAL_S)
        def loghandler_lines(families: Any) -> list[bytes]:
            return [line for line in render(families).splitlines() if b"loghandler_" in line]

        for _, _, _, process in self.reactor.spawned:
            last = json.loads(b"".join(process.written).splitlines()[-1])
            self.assertEqual(
                loghandler_lines(last["metrics"]), loghandler_lines(self.supervisor.metrics())
            )

    def test_counters_survive_a_worker_restart(self) -> None:
        """A worker that ended still counts in the totals (they never go down)."""
        self.report_metrics(0, accepted=5, held=100)
        self.report_metrics(1, accepted=7, held=40)
        self.reactor.spawned[0][0].processEnded(exited(signum=signal.SIGKILL))
        scraped = self.scraped()
        self.assertEqual(scraped[("loghandler_messages_total", (("result", "accepted"),))], 12)
        self.assertEqual(scraped[("loghandler_buffered_bytes", ())], 40)
        self.assertEqual(scraped[("loghandler_worker_restarts_total", ())], 1)
        self.assertEqual(scraped[("loghandler_workers_running", ())], 1)
        self.reactor.advance(RESTART_BASE_S)
        self.reactor.spawned.append(self.reactor.spawned.pop())  # the new worker 1 is last
        self.report_metrics(2, accepted=2, held=1)
        scraped = self.scraped()
        self.assertEqual(scraped[("loghandler_messages_total", (("result", "accepted"),))], 14)
        self.assertEqual(scraped[("loghandler_buffered_bytes", ())], 41)

    def test_readiness_names_a_silent_worker(self) -> None:
        """
        A worker that reported once and then went silent past READY_STALE_S (stopped,
        stuck) makes /readyz 503, long before /livez gives up on it (it stayed 'ok'
        before: found by the fresh tester with kill -STOP).
        """
        self.report_metrics(0, accepted=0, held=0)
        self.report_metrics(1, accepted=0, held=0)
        for _ in range(int(READY_STALE_S)):
            self.reactor.advance(1)
            self.report_metrics(1, accepted=0, held=0)
        self.assertEqual(self.supervisor.health()["status"], "ok")
        self.reactor.advance(1)
        self.report_metrics(1, accepted=0, held=0)
        self.assertEqual(self.supervisor.health()["status"], "worker 1 sent no report for 6 s")
        last = json.loads(b"".join(self.reactor.spawned[1][3].written).splitlines()[-1])
        self.assertEqual(last["ready"]["status"], "worker 1 sent no report for 6 s")
        self.assertEqual(self.supervisor.liveness()["status"], "ok")

    def test_liveness_names_a_silent_worker(self) -> None:
        """/livez fails once a running worker has sent no report for LIVE_STALE_S."""
        self.reactor.advance(20)
        self.report_metrics(0, accepted=0, held=0)
        self.reactor.advance(LIVE_STALE_S - 20)
        self.assertEqual(self.supervisor.liveness()["status"], "ok")
        self.reactor.advance(1)
        self.assertEqual(
            self.supervisor.liveness(),
            {"status": "worker 2 sent no report for 31 s", "workers_running": 2},
        )

    def test_worker_log_events_are_republished(self) -> None:
        event = {"log_format": "hello {who}", "who": "there", "log_level": LogLevel.warn, "log_namespace": "x"}
        line = eventAsJSON(event).encode()
        self.reactor.spawned[1][0].childDataReceived(1, line[:10])
        self.reactor.spawned[1][0].childDataReceived(1, line[10:] + b"\n")
        self.reactor.spawned[1][0].childDataReceived(2, b"Traceback: boom\n")
        text = self.logged()
        self.assertIn("[worker 2] hello there", text)
        self.assertIn("worker 2: Traceback: boom", text)

    def test_restart_with_backoff(self) -> None:
        """1 s, 2 s, 4 s... while a worker keeps dying young; 1 s again once it ran 60 s."""
        delays = []
        for _ in range(4):
            spawned = len(self.reactor.spawned)
            self.supervisor._workers[1].processEnded(exited(signum=signal.SIGKILL))
            waited = 0.0
            while len(self.reactor.spawned) == spawned:
                self.reactor.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0])
        self.assertIn("worker 1 (pid 1000) ended unexpectedly (killed by signal 9) after 0.0 s; restarting it in 1 s", self.logged())
        self.reactor.advance(60)
        self.supervisor._workers[1].processEnded(exited(code=75))
        self.reactor.advance(1)
        self.assertEqual(self.supervisor.pids[1], self.reactor.spawned[-1][3].pid)
        self.assertIn("(exit status 75) after 60.0 s; restarting it in 1 s", self.logged())

    def test_restart_cap(self) -> None:
        for _ in range(10):
            self.supervisor._workers[1].processEnded(exited(code=1))
            self.reactor.advance(30)
        self.assertIn("restarting it in 30 s", self.logged())
        self.assertNotIn("restarting it in 32 s", self.logged())

    def test_configuration_refused_stops(self) -> None:
        """A worker that exits 2 before any report refused its settings: no restart loop."""
        self.reactor.spawned[0][0].processEnded(exited(code=2))
        self.assertEqual(self.reactor.stopped, 1)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertIn("worker 1 refused the configuration", self.logged())

    def test_stop_waits_for_every_worker(self) -> None:
        stopped = self.supervisor.stopService()
        self.assertEqual([p.signals for _, _, _, p in self.reactor.spawned], [["TERM"], ["TERM"]])
        last = json.loads(b"".join(self.reactor.spawned[0][3].written).splitlines()[-1])
        self.assertEqual(last["ready"]["status"], "stopping")
        self.reactor.spawned[0][0].processEnded(exited(signum=signal.SIGTERM))
        self.assertNoResult(stopped)
        self.reactor.spawned[1][0].processEnded(exited(code=0))
        self.successResultOf(stopped)
        self.assertIsNone(self.supervisor._socket)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 2)  # no restart while stopping
        self.assertIn("worker 2 stopped (exit status 0)", self.logged())
        self.assertIn("all workers stopped", self.logged())

    def test_worker_killed_during_the_stop_is_an_error(self) -> None:
        """A worker that does not exit 0 after SIGTERM did not finish its flush."""
        stopped = self.supervisor.stopService()
        self.reactor.spawned[0][0].processEnded(exited(code=0))
        self.reactor.spawned[1][0].processEnded(exited(signum=signal.SIGKILL))
        self.successResultOf(stopped)
        self.assertIn("worker 1 stopped (exit status 0)", self.logged())
        self.assertIn(
            "worker 2 (pid 1001) ended during the stop (killed by signal 9) before its"
            " flush was done",
            self.logged(),
        )
        self.assertEqual(self.supervisor.workers_lost, 1)

    def install_stop_signals(self) -> list[Any]:
        """
        Run what the supervisor does once the reactor runs (its StopSignals), the
        process's signal handlers restored after the test; what it registers with
        ``atexit`` goes to the list returned.
        """
        f, args = self.reactor.when_running
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        for signum, handler in previous.items():
            self.addCleanup(signal.signal, signum, handler)
        registered: list[Any] = []
        self.patch(atexit, "register", registered.append)
        f(*args)
        return registered

    def test_worker_that_lost_lines_makes_exit_1(self) -> None:
        """
        A worker whose flush lost lines exits 1: logged, counted, and after the
        shutdown the supervisor's exit status is 1 (not death by the signal).
        """
        registered = self.install_stop_signals()  # installs the supervisor's StopSignals
        stopped = self.supervisor.stopService()
        self.reactor.spawned[0][0].processEnded(exited(code=0))
        self.reactor.spawned[1][0].processEnded(exited(code=1))
        self.successResultOf(stopped)
        self.assertIn(
            "worker 2 (pid 1001) stopped (exit status 1): its flush lost acknowledged lines",
            self.logged(),
        )
        self.assertEqual(self.supervisor.workers_lost, 1)
        ((phase, event, after, _),) = self.reactor.triggers
        self.assertEqual((phase, event), ("after", "shutdown"))
        after()
        self.assertEqual(len(registered), 1)  # os._exit(1) once twistd is done
        self.assertIn("exit status 1: 1 worker(s) lost acknowledged lines", self.logged())

    def test_workers_that_flushed_exit_clean(self) -> None:
        """Every worker exited 0: nothing is registered, twistd's exit stands."""
        registered = self.install_stop_signals()
        stopped = self.supervisor.stopService()
        for protocol, _, _, _ in self.reactor.spawned:
            protocol.processEnded(exited(code=0))
        self.successResultOf(stopped)
        self.reactor.triggers[0][2]()
        self.assertEqual((self.supervisor.workers_lost, registered), (0, []))

    def test_stop_signals_act_once(self) -> None:
        """
        SIGTERM twice stops the reactor once; SIGHUP is passed on to every worker
        (which reloads AUTH_TOKENS_FILE) and stops nothing.
        """
        f, args = self.reactor.when_running
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        for signum, handler in previous.items():
            self.addCleanup(signal.signal, signum, handler)
        calls: list[Any] = []
        self.reactor.callFromThread = lambda g, *a: calls.append((g, a))  # type: ignore[attr-defined]
        f(*args)
        hangup = signal.getsignal(signal.SIGHUP)
        assert callable(hangup)
        hangup(signal.SIGHUP, None)
        for g, a in calls:
            g(*a)
        calls.clear()
        self.assertEqual([p.signals for _, _, _, p in self.reactor.spawned], [["HUP"], ["HUP"]])
        self.assertEqual(self.reactor.stopped, 0)
        self.assertIn("SIGHUP: passed on to the workers", self.logged())
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, None)
        handler(signal.SIGTERM, None)
        for g, a in calls:
            g(*a)
        self.assertEqual(self.reactor.stopped, 1)

    def test_stop_cancels_a_pending_restart(self) -> None:
        self.reactor.spawned[0][0].processEnded(exited(code=1))
        stopped = self.supervisor.stopService()
        self.reactor.spawned[1][0].processEnded(exited(code=0))
        self.successResultOf(stopped)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stop_kills_a_worker_past_the_deadline(self) -> None:
        stopped = self.supervisor.stopService()
        self.reactor.spawned[0][0].processEnded(exited(code=0))
        self.reactor.advance(self.config.shutdown_timeout_s + KILL_GRACE_S - 0.1)
        self.assertEqual(self.reactor.spawned[1][3].signals, ["TERM"])
        self.reactor.advance(0.1)
        self.assertEqual(self.reactor.spawned[1][3].signals, ["TERM", "KILL"])
        self.assertIn("worker 2 (pid 1001) still running 15 s after SIGTERM; killing it", self.logged())
        self.reactor.spawned[1][0].processEnded(exited(signum=signal.SIGKILL))
        self.successResultOf(stopped)


class ExitDescriptionTests(SynchronousTestCase):
    def test_descriptions(self) -> None:
        self.assertEqual(describe_exit(exited(code=0)), "exit status 0")
        self.assertEqual(describe_exit(exited(code=75)), "exit status 75")
        self.assertEqual(describe_exit(exited(signum=9)), "killed by signal 9")


class ListeningSocketTests(SynchronousTestCase):
    def test_port_in_use(self) -> None:
        first = open_listening_socket("127.0.0.1", 0)
        self.addCleanup(first.close)
        with self.assertRaises(OSError):
            open_listening_socket("127.0.0.1", first.getsockname()[1])

    def test_busy_port_is_one_line_and_exit_2(self) -> None:
        first = open_listening_socket("127.0.0.1", 0)
        self.addCleanup(first.close)
        config = from_environ({**BASE, "WORKERS": "2", "ADDR": "127.0.0.1", "PORT": str(first.getsockname()[1])})
        supervisor = WorkerSupervisor(config, FakeProcessReactor(), {})
        import io
        import sys

        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            supervisor.privilegedStartService()
        self.assertEqual(caught.exception.code, 2)
        self.assertRegex(stderr.getvalue(), r"^loghandler: ADDR/PORT: cannot listen on 127.0.0.1:\d+: Address already in use\n$")





class PreformattedTests(SynchronousTestCase):
    """A worker's log events keep their format specs through the JSON pipe."""

    def test_format_spec_survives_json(self) -> None:
        from twisted.logger import eventFromJSON

        from loghandler.worker import preformatted

        lines: list[str] = []
        observer = preformatted(lambda event: lines.append(eventAsJSON(event)))  # type: ignore[arg-type]
        observer({"log_format": "flush done in {seconds:.3f} s {{x}}", "seconds": 0.123456, "log_time": 1.0, "log_level": LogLevel.info})
        event = eventFromJSON(lines[0])
        event["log_system"] = "worker 1"
        self.assertIn("[worker 1] flush done in 0.123 s {x}", formatEventAsClassicLogText(event) or "")


class AdminSupervisorTests(SynchronousTestCase):
    """With ADMIN_PORT, the supervisor serves the whole server's probes and metrics."""

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.config = from_environ(
            {**BASE, "WORKERS": "2", "ADDR": "127.0.0.1", "PORT": "0", "ADMIN_PORT": "0"}
        )
        self.supervisor = WorkerSupervisor(self.config, self.reactor, {}, executable="/py")
        self.addCleanup(self.close)

    def close(self) -> None:
        if self.supervisor._socket is not None:
            self.supervisor._socket.close()

    def test_serves_the_whole_server(self) -> None:
        self.supervisor.startService()
        port, site, interface = self.reactor.listening
        self.assertEqual((port, interface), (0, "0.0.0.0"))
        client = StubTreq(site.resource)

        def get(path: str) -> tuple[int, bytes]:
            response = self.successResultOf(client.get("http://admin.test" + path))
            return response.code, self.successResultOf(client.content(response))

        status, content = get("/readyz")
        self.assertEqual((status, json.loads(content)["status"]), (503, "no worker running"))
        for protocol, _, _, _ in self.reactor.spawned:
            protocol.childDataReceived(FD_REPORTS, json.dumps(report()).encode() + b"\n")
        status, content = get("/readyz")
        self.assertEqual((status, json.loads(content)["workers_running"]), (200, 2))
        self.assertEqual(get("/livez")[0], 200)
        status, content = get("/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"loghandler_workers_running 2.0", content)
        stopped = self.supervisor.stopService()
        self.assertEqual(json.loads(get("/readyz")[1])["status"], "stopping")
        for protocol, _, _, _ in self.reactor.spawned:
            protocol.processEnded(exited(code=0))
        self.successResultOf(stopped)
        self.assertIsNone(self.reactor.listening)

    def test_admin_port_in_use_is_one_line_and_exit_2(self) -> None:
        self.reactor.refuse_listen = True
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as raised:
            self.supervisor.privilegedStartService()
        self.assertEqual(raised.exception.code, 2)
        self.assertEqual(
            stderr.getvalue(),
            "loghandler: ADMIN_ADDR/ADMIN_PORT: cannot listen on 0.0.0.0:0:"
            " Address already in use\n",
        )
