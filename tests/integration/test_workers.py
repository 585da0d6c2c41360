"""
End to end with ``WORKERS=2``: ``twistd -n loghandler`` as a subprocess against
moto's S3 server.  The supervisor opens the port and starts two worker processes
that accept on it; ``/healthz`` answers for both; a worker killed with SIGKILL is
restarted and what it had staged is merged by recovery; SIGTERM stops the
supervisor only once both workers flushed; every acknowledged message is stored
exactly once, in its own client's object.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import time
from collections import Counter, defaultdict
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import read_lines
from tests.integration.moto import free_port, shared_moto
from tests.integration.test_end_to_end import (
    Daemon,
    canonical,
    key,
    message_body,
    post_all,
    scrape,
)


def health(port: int, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("GET", path)
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    return response.status, body


def wait_for(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for " + what)


class WorkersEndToEndTests(SynchronousTestCase):
    """Two workers on one port, against moto."""

    def setUp(self) -> None:
        self.moto = shared_moto()
        self.moto.reset()
        self.s3 = self.moto.botocore_client()
        self.addCleanup(self.s3.close)
        self.expected: dict[str, Counter[str]] = defaultdict(Counter)
        self.next_id = 1

    def start(self, **env: str) -> Daemon:
        daemon = Daemon(
            {**self.moto.env(), "WORKERS": "2", "SHUTDOWN_TIMEOUT_S": "20", **env},
            os.path.abspath("."),
        )
        self.addCleanup(daemon.kill)
        probe_port = int(env.get("ADMIN_PORT", daemon.port))
        wait_for(
            "two workers ready",
            lambda: health(probe_port, "/readyz")[1].get("workers_running") == 2,
        )
        return daemon

    def post(self, daemon: Daemon, count: int) -> None:
        """POST ``count`` messages over 10 clients; all must be answered 200."""
        now = int(time.time() * 1000)
        bodies = []
        for n in range(count):
            client = 1 + n % 10
            body = message_body(self.next_id, client, now)
            self.next_id += 1
            bodies.append(body)
            self.expected[key(now, client)][canonical(body)] += 1
        statuses = post_all(daemon.port, bodies, threads=8)
        self.assertEqual(Counter(statuses), Counter({200: count}))

    def check_bucket(self) -> None:
        """Every object holds its acknowledged lines exactly once; nothing staged is left."""
        listing = self.s3.list_objects_v2(Bucket=self.moto.bucket)
        keys = sorted(o["Key"] for o in listing.get("Contents", []))
        self.assertEqual(keys, sorted(self.expected))
        self.assertEqual(self.s3.list_multipart_uploads(Bucket=self.moto.bucket).get("Uploads", []), [])
        for object_key, want in self.expected.items():
            data = self.s3.get_object(Bucket=self.moto.bucket, Key=object_key)["Body"].read()
            got = Counter(line.decode("utf-8") for line in read_lines(data))
            self.assertEqual(got, want, object_key)

    def test_two_workers_flush_on_sigterm(self) -> None:
        """
        /healthz lists both workers (their pids, the budget summed); messages land
        through both; SIGTERM to the supervisor: each worker flushes, then it exits.
        """
        daemon = self.start(BUFFER_BUDGET_BYTES=str(64 * 1024 * 1024))
        status, body = health(daemon.port)
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["workers_expected"], 2)
        self.assertEqual(body["buffer_budget_bytes"], 64 * 1024 * 1024)
        pids = {w["pid"] for w in body["workers"]}
        self.assertEqual(len(pids), 2)
        self.assertNotIn(daemon.process.pid, pids)
        # SIGHUP (a closed terminal) stops nothing, in the supervisor or a worker.
        os.kill(daemon.process.pid, signal.SIGHUP)
        for pid in pids:
            os.kill(pid, signal.SIGHUP)
        time.sleep(1.5)
        self.assertEqual({w["pid"] for w in health(daemon.port)[1]["workers"]}, pids)
        self.post(daemon, 2000)
        daemon.stop()
        log = daemon.log()
        for number in (1, 2):
            self.assertIn("[worker %d] flush on stop done" % number, log)
            self.assertIn("worker %d stopped" % number, log)
        self.assertLess(log.index("worker 1 stopped"), log.index("all workers stopped"))
        self.assertNotIn("Traceback", log)
        # Both workers took messages: each completed objects.
        self.assertRegex(log, r"\[worker 1\] completing \d+ objects")
        self.assertRegex(log, r"\[worker 2\] completing \d+ objects")
        self.check_bucket()
        for pid in pids:
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)

    def test_probes_and_metrics_on_the_admin_port(self) -> None:
        """
        ADMIN_PORT: the supervisor serves /livez, /readyz and /metrics for both
        workers (the main port answers 404 for them); the messages counted are the
        ones posted, over both workers, and none lost.
        """
        admin_port = free_port()
        daemon = self.start(ADMIN_PORT=str(admin_port), ADMIN_ADDR="127.0.0.1")
        admin = lambda: http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)  # noqa: E731
        for path in ("/livez", "/readyz", "/healthz", "/metrics"):
            connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
            connection.request("GET", path)
            self.assertEqual(connection.getresponse().status, 404, path)
            connection.close()
        connection = admin()
        connection.request("GET", "/livez")
        self.assertEqual(json.loads(connection.getresponse().read()), {"status": "ok", "workers_running": 2})
        connection.close()
        self.post(daemon, 1000)
        accepted = ("loghandler_messages_total", (("result", "accepted"),))
        metrics = wait_for(
            "the workers' counts in the supervisor's /metrics",
            lambda: (lambda m: m if m.get(accepted) == 1000 else None)(scrape(admin)),
        )
        self.assertEqual(metrics[("loghandler_workers_running", ())], 2)
        self.assertEqual(metrics[("loghandler_lines_lost_total", ())], 0)
        processes = {
            dict(labels).get("process")
            for name, labels in metrics
            if name == "process_resident_memory_bytes"
        }
        self.assertEqual(processes, {"supervisor", "worker-1", "worker-2"})
        daemon.stop()
        self.check_bucket()

    def test_killed_worker_is_restarted_and_its_lines_recovered(self) -> None:
        """
        ``ACK=durable``: every 200 is in storage.  SIGKILL one worker: the supervisor
        logs it and starts a new one (a new pid in /healthz); the other workers'
        recovery merges what the dead one staged once its lease lapsed; after
        SIGTERM every acknowledged message is stored exactly once.
        """
        daemon = self.start(
            ACK="durable",
            CHECKPOINT_S="0.2",
            LEASE_S="1",
            RECOVERY_INTERVAL_S="1",
        )
        self.post(daemon, 1000)
        before = {w["worker"]: w["pid"] for w in health(daemon.port)[1]["workers"]}
        # Kill a worker that holds staged data (the kernel may have handed every
        # connection to one of them): its checkpoints are in staging uploads.
        writers = dict(
            (int(n), w)
            for n, w in re.findall(r"\[worker (\d)\] loghandler on .* writer ([0-9a-f]{32})>", daemon.log())
        )

        def staged_by(number: int) -> bool:
            prefix = "_loghandler/staging/%s/" % writers[number]
            return bool(
                self.s3.list_multipart_uploads(Bucket=self.moto.bucket, Prefix=prefix).get("Uploads")
            )

        victim = 1 if staged_by(1) else 2
        other = 3 - victim
        self.assertTrue(staged_by(victim))
        os.kill(before[victim], signal.SIGKILL)

        def restarted() -> bool:
            workers = {w["worker"]: w["pid"] for w in health(daemon.port)[1]["workers"]}
            return workers.get(victim) not in (None, before[victim]) and workers.get(other) == before[other]

        wait_for("worker %d restarted" % victim, restarted)
        self.assertIn(
            "worker %d (pid %d) ended unexpectedly (killed by signal 9)" % (victim, before[victim]),
            daemon.log(),
        )
        # The dead worker's staging data (its uploads, then staging objects): merged
        # by recovery once its lease (3 x LEASE_S) lapsed.
        staging = "_loghandler/staging/%s/" % writers[victim]

        def merged() -> bool:
            uploads = self.s3.list_multipart_uploads(Bucket=self.moto.bucket, Prefix=staging)
            objects = self.s3.list_objects_v2(Bucket=self.moto.bucket, Prefix=staging)
            return not uploads.get("Uploads") and not objects.get("Contents")

        wait_for("the dead worker's staging merged", merged)
        wait_for("the merge logged", lambda: "merged " + staging in daemon.log(), timeout=10)
        self.post(daemon, 500)
        daemon.stop()
        self.assertIn("all workers stopped", daemon.log())
        self.check_bucket()
