"""
End to end: ``twistd -n loghandler`` as a subprocess against moto's S3 server.

POST messages over 10 clients and 2 UTC dates, SIGTERM, then read every object back
with botocore: keys exact (nothing left staged under ``_loghandler/``, no pending
multipart upload), every object whole gzip members with
``Content-Type: application/gzip``, no ``Content-Encoding`` and its write IDs in
``x-amz-meta-loghandler-writes``, every acknowledged message present exactly once in
its own client's and date's object, no other line.  Further runs on the same keys
merge after what is there (DESIGN.md section 5): small objects by GET, one
re-compressed member and PutObject (they stay one member); a large client's stream
staged in S3's real 5 MiB parts and merged by multipart upload; then small streams
merged after that large object by UploadPartCopy.

The figures of each run (messages sent and found, objects and sizes, flush seconds)
are written to ``e2e-report.json`` in trial's working directory.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable, Optional, Sequence

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import members, read_lines
from tests.integration.moto import free_port, shared_moto

MS_PER_DAY = 86_400_000
CLIENTS = range(1, 11)


class Daemon:
    """
    One ``twistd -n loghandler`` child process.

    :param env: extra environment (the moto settings, timeouts).
    :param port: ``PORT`` (by default a free one), which ``env`` may use in ``LISTEN``.
    :param connect: a new connection to the daemon (by default HTTP to ``port``).
    :param args: twistd's own options (``--logger=...``).
    :ivar probe: a new connection to the probes (``ADMIN_PORT`` when set in ``env``).
    """

    def __init__(
        self,
        env: dict[str, str],
        workdir: str,
        port: Optional[int] = None,
        connect: Optional[Callable[[], http.client.HTTPConnection]] = None,
        args: Sequence[str] = (),
    ) -> None:
        self.port = port if port is not None else free_port()
        self.connect = connect or (
            lambda: http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        )
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.log_path = os.path.join(workdir, "twistd-%d.log" % self.port)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [twistd, "-n", "--pidfile=", *args, "loghandler"],
            env={**os.environ, **env, "ADDR": "127.0.0.1", "PORT": str(self.port)},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        admin_port = env.get("ADMIN_PORT")
        self.probe = (
            self.connect
            if admin_port is None
            else lambda: http.client.HTTPConnection("127.0.0.1", int(admin_port), timeout=2)
        )
        self._wait_ready()

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("twistd exited at start:\n" + self.log())
            try:
                connection = self.probe()
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    connection.close()
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("twistd did not answer in 30 s:\n" + self.log())

    def stop(self) -> float:
        """SIGTERM; wait for the exit; the seconds it took."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        seconds = time.monotonic() - started
        self._log.close()
        # twistd re-raises SIGTERM on itself after a clean shutdown.
        if code not in (0, -signal.SIGTERM):
            raise AssertionError("twistd exited with %r:\n%s" % (code, self.log()))
        return seconds

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if not self._log.closed:
            self._log.close()


def post_all(port: int, bodies: list[bytes], threads: int = 4) -> list[int]:
    """POST every body to /log over keep-alive connections; their status codes."""
    statuses = [0] * len(bodies)

    def work(indexes: Iterable[int]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in indexes:
            connection.request(
                "POST", "/log", bodies[i], {"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            response.read()
            statuses[i] = response.status
        connection.close()

    workers = [
        threading.Thread(target=work, args=(range(t, len(bodies), threads),))
        for t in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return statuses


def scrape(
    connect: Callable[[], http.client.HTTPConnection], path: str = "/metrics"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET ``/metrics``, parsed: each sample by (name, sorted labels)."""
    connection = connect()
    connection.request("GET", path)
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert response.status == 200, (response.status, text)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def message_body(content_id: int, client_id: int, timestamp: int, text: Optional[str] = None) -> bytes:
    """One message as a client would send it (key order and spacing of its own)."""
    return json.dumps(
        {
            "timestamp": timestamp,
            "client_id": client_id,
            "text": text if text is not None else "msg %d é ✓" % content_id,
            "content_id": content_id,
        },
        ensure_ascii=bool(content_id % 2),
        indent=content_id % 3 or None,
    ).encode()


def key(timestamp: int, client_id: int) -> str:
    """The expected key, computed independently of loghandler.keys."""
    date = time.strftime("%Y-%m-%d", time.gmtime(timestamp // 1000))
    return "chat/%s/content_logs_%s_%d" % (date, date, client_id)


class EndToEndTests(SynchronousTestCase):
    """The daemon against moto, from POST to the objects in the bucket."""

    def setUp(self) -> None:
        self.moto = shared_moto()
        self.moto.reset()
        self.workdir = os.path.abspath(".")
        self.s3 = self.moto.botocore_client()
        self.addCleanup(self.s3.close)
        self.expected: dict[str, Counter[str]] = defaultdict(Counter)
        self.report: list[dict[str, Any]] = []

    def run_daemon(self, bodies: list[tuple[bytes, Optional[str]]], **env: str) -> dict[str, Any]:
        """
        Start the daemon, POST the bodies, SIGTERM it.  A body with a key is valid and
        must be acknowledged with 200; one without must get a 4xx.
        """
        daemon = Daemon(
            {**self.moto.env(), "SHUTDOWN_TIMEOUT_S": "25", **env}, self.workdir
        )
        self.addCleanup(daemon.kill)
        started = time.monotonic()
        statuses = post_all(daemon.port, [body for body, _ in bodies])
        post_seconds = time.monotonic() - started
        for (body, expected_key), status in zip(bodies, statuses):
            if expected_key is None:
                self.assertIn(status, (400, 413), body[:200])
            else:
                self.assertEqual(status, 200, body[:200])
                self.expected[expected_key][canonical(body)] += 1
        # /metrics counts what was answered: each result, and nothing lost.
        metrics = scrape(daemon.connect)
        results = {
            result: metrics.get(("loghandler_messages_total", (("result", result),)), -1.0)
            for result in ("accepted", "invalid", "too_large", "busy")
        }
        self.assertEqual(
            results,
            {
                "accepted": statuses.count(200),
                "invalid": statuses.count(400),
                "too_large": statuses.count(413),
                "busy": 0,
            },
        )
        self.assertEqual(metrics[("loghandler_lines_lost_total", ())], 0)
        self.assertGreater(metrics[("loghandler_received_bytes_total", ())], 0)
        flush_seconds = daemon.stop()
        log = self.last_log = daemon.log()
        self.assertIn("flush on stop done", log)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Starting factory <twisted.web", log)
        flush = re.search(r"flush on stop done in ([0-9.]+) s", log)
        assert flush is not None
        return {
            "flush_seconds": float(flush.group(1)),
            "posted": len(bodies),
            "acknowledged": statuses.count(200),
            "rejected": len(bodies) - statuses.count(200),
            "post_seconds": round(post_seconds, 2),
            "sigterm_to_exit_seconds": round(flush_seconds, 3),
        }

    def merged(self, object_key: str) -> list[str]:
        """How the last run's merges into ``object_key`` went, from its log."""
        return re.findall(
            r"%s: merged \S+ \(\d+ bytes\) by (PutObject|multipart upload)" % re.escape(object_key),
            self.last_log,
        )

    def check_bucket(self, figures: dict[str, Any]) -> None:
        """
        Every object holds exactly the acknowledged lines of its key; nothing else is
        in the bucket (no staging object, no pending upload); objects under 5 MiB are
        one gzip member.
        """
        listing = self.s3.list_objects_v2(Bucket=self.moto.bucket)
        self.assertFalse(listing.get("IsTruncated"))
        sizes = {o["Key"]: o["Size"] for o in listing.get("Contents", [])}
        self.assertEqual(sorted(sizes), sorted(self.expected))
        uploads = self.s3.list_multipart_uploads(Bucket=self.moto.bucket)
        self.assertEqual(uploads.get("Uploads", []), [])
        found = 0
        for object_key, want in self.expected.items():
            answer = self.s3.get_object(Bucket=self.moto.bucket, Key=object_key)
            data = answer["Body"].read()
            self.assertEqual(answer["ContentType"], "application/gzip")
            self.assertNotIn("ContentEncoding", answer)
            writes = answer["Metadata"].get("loghandler-writes", "").split(",")
            self.assertTrue(1 <= len(writes) <= 16 and all(writes), answer["Metadata"])
            self.assertGreaterEqual(len(members(data)), 1)
            if len(data) < 5 * 1024 * 1024:
                self.assertEqual(len(members(data)), 1, object_key)
            lines = read_lines(data)
            got = Counter(line.decode("utf-8") for line in lines)
            self.assertEqual(got, want, object_key)
            self.assertEqual(max(got.values()), 1)
            found += len(lines)
        figures.update(
            found=found,
            objects=len(sizes),
            object_bytes_min=min(sizes.values()),
            object_bytes_max=max(sizes.values()),
            object_bytes_total=sum(sizes.values()),
        )
        self.report.append(figures)
        with open(os.path.join(self.workdir, "e2e-report.json"), "w") as f:
            json.dump(self.report, f, indent=2)

    def test_two_dates_ten_clients_then_merges(self) -> None:
        """
        20,000 messages over 10 clients and 2 UTC dates plus bad requests; SIGTERM;
        every object exact.  A second run on the same keys merges after them
        (PutObject of one member); a third adds a large client (staged in 5 MiB
        parts, merged by multipart upload) and a fourth merges after its 5 MiB+
        object by multipart upload with UploadPartCopy.
        """
        now = int(time.time() * 1000)
        today = now - now % MS_PER_DAY
        dates = (today - MS_PER_DAY + 1, today + 1)
        rng = random.Random(1585526400)

        def batch(count: int, first_id: int) -> list[tuple[bytes, Optional[str]]]:
            bodies: list[tuple[bytes, Optional[str]]] = []
            for n in range(count):
                content_id = first_id + n
                client = CLIENTS[n % 10]
                stamp = dates[(n // 10) % 2] + rng.randrange(0, max(1, min(MS_PER_DAY - 2, now - dates[1])))
                bodies.append((message_body(content_id, client, stamp), key(stamp, client)))
                if n % 200 == 0:
                    bodies.append((bad_body(n), None))
            return bodies

        first = self.run_daemon(batch(20_000, 1))
        self.assertEqual(first["acknowledged"], 20_000)
        self.check_bucket(first)
        self.assertEqual(first["found"], 20_000)
        self.assertEqual(first["objects"], 20)

        second = self.run_daemon(batch(2_000, 100_001))
        self.check_bucket(second)
        self.assertEqual(second["found"], 22_000)
        self.assertIn("by PutObject", self.last_log)
        self.assertNotIn("by multipart upload", self.last_log)

        # A large client: random text compresses poorly, so its stream fills 5 MiB
        # parts (a staging multipart upload), merged after its small existing object.
        big_key = key(dates[1], 1)
        big: list[tuple[bytes, Optional[str]]] = [
            (message_body(200_001 + n, 1, dates[1], os.urandom(24_000).hex()), big_key)
            for n in range(500)
        ]
        third = self.run_daemon(big)
        self.check_bucket(third)
        size = self.s3.head_object(Bucket=self.moto.bucket, Key=big_key)["ContentLength"]
        self.assertGreater(size, 10 * 1024 * 1024)
        self.assertIn("by multipart upload", self.last_log)
        self.assertEqual(self.merged(big_key), ["multipart upload"])

        fourth = self.run_daemon(batch(1_000, 300_001))
        self.check_bucket(fourth)
        self.assertEqual(self.merged(big_key), ["multipart upload"])
        self.assertIn("by PutObject", self.last_log)
        self.assertEqual(fourth["found"], 22_000 + 500 + 1_000)


def canonical(body: bytes) -> str:
    """The line loghandler must store for a valid body, built independently."""
    value = json.loads(body)
    return (
        json.dumps(
            {name: value[name] for name in ("text", "content_id", "client_id", "timestamp")},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        + "\n"
    )


def bad_body(n: int) -> bytes:
    """An invalid request body of a few kinds."""
    kinds = [
        b'{"text": "x", "content_id": 1, "client_id": 11, "timestamp": 1}',
        b'{"text": "x", "content_id": true, "client_id": 1, "timestamp": 1}',
        b"\xff\xfe not utf-8",
        b'{"text": "x", "text": "y", "content_id": 1, "client_id": 1, "timestamp": 1}',
        b"x" * 70_000,
    ]
    return kinds[(n // 200) % len(kinds)]
