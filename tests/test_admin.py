"""
Tests for the probes and metrics (:mod:`loghandler.admin`): ``/livez``, ``/readyz``,
``/healthz`` and ``/metrics`` on the main site of one process, through ``StubTreq``
over a registry and the in-memory S3 on ``task.Clock``; ``HEAD``; the ``ADMIN_PORT``
site; and the text format's combination over workers (:mod:`loghandler.exposition`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from loghandler.admin import Probes, add_probes, local_probes, make_admin_site
from loghandler.exposition import CONTENT_TYPE, combine, cumulative, render, samples_of
from loghandler.interfaces import StorageError
from loghandler.metrics import Metrics
from tests.test_web import WebCase, body

#: READY_FAIL_AFTER_S of these tests.
READY_FAIL_AFTER_S = 30.0


class ProbeCase(WebCase):
    """The main site of one process with its probes, as ``build_service`` makes it."""

    def setUp(self) -> None:
        super().setUp()
        self.metrics = CollectorRegistry()
        self.accepted = Counter("loghandler_test_accepted", "test", registry=self.metrics)
        add_probes(
            self.site.resource,
            local_probes(self.registry, READY_FAIL_AFTER_S, self.metrics),
            self.site,
        )

    def status(self, path: str) -> tuple[int, Any]:
        """GET ``path``: (status, parsed JSON)."""
        status, _, answer = self.request("GET", path)
        return status, answer

    def raw(self, method: str, path: str) -> tuple[int, Any, bytes]:
        """Any request: (status, headers, body bytes)."""
        response = self.successResultOf(self.client.request(method, "http://example.test" + path))
        return response.code, response.headers, self.successResultOf(self.client.content(response))


class ReadinessTests(ProbeCase):
    """/readyz (and /healthz, its alias): whether messages are taken and stored."""

    def test_ok_then_stopping(self) -> None:
        """200 while running, 503 'stopping' once the flush began; /livez stays 200."""
        for path in ("/readyz", "/healthz"):
            status, answer = self.status(path)
            self.assertEqual((status, answer["status"]), (200, "ok"), path)
            self.assertEqual(answer["storage_failing_s"], 0, path)
        self.registry.close_all()
        for path in ("/readyz", "/healthz"):
            self.assertEqual(self.status(path), (503, self.status(path)[1]))
            self.assertEqual(self.status(path)[1]["status"], "stopping")
        self.assertEqual(self.status("/livez"), (200, {"status": "ok"}))

    def test_buffers_full(self) -> None:
        """503 'buffers full' while the budget is spent, with the counts."""
        self.mem.hold("PutObject")
        self.assertEqual(self.request("POST", "/log", body())[0], 200)
        self.clock.advance(60)
        self.registry.budget.change(self.registry.budget.limit)
        status, answer = self.status("/readyz")
        self.assertEqual((status, answer["status"]), (503, "buffers full"))
        self.assertEqual((answer["open_objects"], answer["completing_objects"]), (0, 1))
        self.registry.budget.change(-self.registry.budget.limit)
        self.assertEqual(self.status("/readyz")[0], 200)

    def test_starting(self) -> None:
        """503 'storage not reachable' until the store was reached (starting)."""
        self.registry.ready = False
        self.assertEqual(self.status("/readyz")[1]["status"], "storage not reachable")
        self.assertEqual(self.status("/readyz")[0], 503)
        self.assertEqual(self.status("/livez")[0], 200)

    def test_permanent_failure_past_the_bound(self) -> None:
        """
        Storage answering 403 (only an operator can fix it) turns /readyz to 503
        with the reason once it failed for READY_FAIL_AFTER_S with no success; the
        error is logged once; /livez stays 200 (a restart would lose the data); the
        message is stored once storage takes it, and /readyz is 200 again.
        """
        self.mem.fail("PutObject", StorageError("PutObject", 403, "AccessDenied"), times=3)
        self.assertEqual(self.request("POST", "/log", body(content_id=1))[0], 200)
        with capturedLogs() as events:
            self.clock.advance(60)  # rotation: the staging write is refused
            status, answer = self.status("/readyz")
            self.assertEqual((status, answer["storage_failing_s"]), (200, 0))
            self.clock.pump([1.0] * int(READY_FAIL_AFTER_S))  # refused at +5 and +15
            self.assertEqual(self.status("/readyz")[0], 200)
            self.clock.advance(1)
            status, answer = self.status("/readyz")
            self.assertEqual(status, 503)
            self.assertEqual(
                answer["status"], "storage failing for 31 s: PutObject fails: 403 AccessDenied"
            )
            self.assertEqual(answer["completing_objects"], 1)
            self.assertEqual(self.status("/livez"), (200, {"status": "ok"}))
            self.clock.pump([1.0] * 4)  # taken at 60 + 5 + 10 + 20
        texts = [e.get("log_format") or "" for e in events]
        self.assertEqual(len([t for t in texts if "until this is fixed" in t]), 1, texts)
        self.assertEqual(len([t for t in texts if "storage works again" in t]), 1, texts)
        status, answer = self.status("/readyz")
        self.assertEqual((status, answer["status"], answer["storage_failing_s"]), (200, "ok", 0))
        self.assertEqual([json.loads(line)["content_id"] for line in self.stored_lines()], [1])

    def test_transient_failures_past_the_bound(self) -> None:
        """503s from storage past READY_FAIL_AFTER_S: 503 naming the last failure."""
        self.mem.fail("PutObject", StorageError("PutObject", 503, "SlowDown"), times=1000)
        self.assertEqual(self.request("POST", "/log", body(content_id=1))[0], 200)
        self.clock.advance(60)
        self.clock.pump([1.0] * 30)
        self.assertEqual(self.status("/readyz")[0], 200)
        self.clock.pump([1.0] * 2)
        status, answer = self.status("/readyz")
        self.assertEqual(status, 503)
        self.assertRegex(answer["status"], r"^storage failing for 3[12] s: PutObject: 503 SlowDown$")

    def test_below_404_and_post_405(self) -> None:
        """Paths below a probe are JSON 404s; POST is a JSON 405 with Allow."""
        for path in ("/livez", "/readyz", "/healthz", "/metrics"):
            self.assertEqual(self.request("GET", path + "/x")[0], 404, path)
            status, headers, answer = self.request("POST", path, b"{}")
            self.assertEqual(status, 405, path)
            self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD"], path)


class MetricsTests(ProbeCase):
    """/metrics: the Prometheus text format of the process's registry."""

    def test_text_format(self) -> None:
        """200, text/plain version 0.0.4, the registry's samples as they are now."""
        self.accepted.inc(3)
        status, headers, content = self.raw("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [CONTENT_TYPE.encode()])
        samples = {
            sample.name: sample.value
            for family in text_string_to_metric_families(content.decode())
            for sample in family.samples
        }
        self.assertEqual(samples["loghandler_test_accepted_total"], 3)


class HeadTests(ProbeCase):
    """HEAD answers as GET without a body, and logs no "returning a message body" warning."""

    def test_head_is_get_without_body(self) -> None:
        for path in ("/livez", "/readyz", "/healthz", "/metrics", "/log", "/nothing"):
            get_status, get_headers, get_body = self.raw("GET", path)
            with capturedLogs() as events:
                status, headers, content = self.raw("HEAD", path)
            self.assertEqual(status, get_status, path)
            self.assertEqual(content, b"", path)
            self.assertEqual(
                headers.getRawHeaders(b"content-type"),
                get_headers.getRawHeaders(b"content-type"),
                path,
            )
            if path != "/metrics":  # the process's CPU time moves between the two
                self.assertEqual(
                    headers.getRawHeaders(b"content-length"), [b"%d" % len(get_body)], path
                )
            warnings = [e for e in events if "message body" in (e.get("log_format") or "")]
            self.assertEqual(warnings, [], path)


class AdminSiteTests(SynchronousTestCase):
    """The ``ADMIN_PORT`` site: the probes and metrics only."""

    def setUp(self) -> None:
        self.probes = Probes(
            live=lambda: {"status": "ok"},
            ready=lambda: {"status": "stopping"},
            metrics=lambda: b"# metrics\n",
        )
        self.client = StubTreq(make_admin_site(self.probes).resource)

    def get(self, path: str) -> tuple[int, bytes]:
        response = self.successResultOf(self.client.get("http://admin.test" + path))
        return response.code, self.successResultOf(self.client.content(response))

    def test_paths(self) -> None:
        self.assertEqual(self.get("/livez"), (200, b'{"status": "ok"}'))
        self.assertEqual(self.get("/readyz"), (503, b'{"status": "stopping"}'))
        self.assertEqual(self.get("/healthz"), (503, b'{"status": "stopping"}'))
        self.assertEqual(self.get("/metrics"), (200, b"# metrics\n"))
        self.assertEqual(self.get("/log")[0], 404)


def _registry(accepted: float, held: float, age: float, seconds: list[float]) -> CollectorRegistry:
    registry = CollectorRegistry()
    messages = Counter("loghandler_messages", "m", ["result"], registry=registry)
    messages.labels("accepted").inc(accepted)
    Gauge("loghandler_buffered_bytes", "b", registry=registry).set(held)
    Gauge("loghandler_oldest_unstored_line_age_seconds", "a", registry=registry).set(age)
    latency = Histogram(
        "loghandler_storage_seconds", "s", ["operation"], buckets=(0.1, 1.0), registry=registry
    )
    for value in seconds:
        latency.labels("PutObject").observe(value)
    return registry


class CombineTests(SynchronousTestCase):
    """Samples of several processes combined into one text format."""

    def parsed(self, families: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(render(families).decode())
            for sample in family.samples
        }

    def test_sums_counters_histograms_gauges_and_max_of_named_gauges(self) -> None:
        one = samples_of(_registry(5, 100, 7.5, [0.05, 2.0]))
        two = samples_of(_registry(7, 40, 12.0, [0.5]))
        parsed = self.parsed(
            combine([one, two], frozenset({"loghandler_oldest_unstored_line_age_seconds"}))
        )
        self.assertEqual(parsed[("loghandler_messages_total", (("result", "accepted"),))], 12)
        self.assertEqual(parsed[("loghandler_buffered_bytes", ())], 140)
        self.assertEqual(parsed[("loghandler_oldest_unstored_line_age_seconds", ())], 12.0)
        bucket = "loghandler_storage_seconds_bucket"
        op = ("operation", "PutObject")
        self.assertEqual(parsed[(bucket, (("le", "0.1"), op))], 1)
        self.assertEqual(parsed[(bucket, (("le", "1.0"), op))], 2)
        self.assertEqual(parsed[(bucket, (("le", "+Inf"), op))], 3)
        self.assertEqual(parsed[("loghandler_storage_seconds_count", (op,))], 3)
        self.assertAlmostEqual(parsed[("loghandler_storage_seconds_sum", (op,))], 2.55)
        self.assertFalse([name for name, _ in parsed if name.endswith("_created")])

    def test_process_metrics_keep_their_process(self) -> None:
        from prometheus_client import ProcessCollector

        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        parsed = self.parsed(
            combine([samples_of(registry, "worker-1"), samples_of(registry, "worker-2")])
        )
        processes = {
            dict(labels)["process"] for name, labels in parsed if name == "process_cpu_seconds_total"
        }
        self.assertEqual(processes, {"worker-1", "worker-2"})

    def test_cumulative_keeps_counters_and_histograms(self) -> None:
        kept = cumulative(samples_of(_registry(5, 100, 7.5, [0.05])))
        self.assertEqual(
            [family[0] for family in kept], ["loghandler_messages", "loghandler_storage_seconds"]
        )


class ReadmeMetricsTests(SynchronousTestCase):
    """README.rst's Metrics section names every loghandler_* metric the code exports."""

    def test_every_metric_documented(self) -> None:
        readme = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.rst")
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        section = text[text.index("\nMetrics\n~~~~~~~\n") : text.index("\nPerformance\n")]
        documented = set(re.findall(r"``(loghandler_[a-z_]+)", section))
        for name in list(documented):
            if name.endswith("_objects"):  # "..._objects, ``..._bytes``"
                documented.add(name[: -len("objects")] + "bytes")
        exported = {
            family.name + ("_total" if family.type == "counter" else "")
            for family in Metrics().registry.collect()
            if family.name.startswith("loghandler_")
        }
        exported |= {"loghandler_workers_running", "loghandler_worker_restarts_total"}
        self.assertEqual(exported - documented, set())
        self.assertEqual(documented - exported, set())
