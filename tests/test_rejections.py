"""
Tests for :mod:`loghandler.rejections`: rejected requests are logged at a bounded
pace (at most ``LINES_PER_WINDOW`` lines and one summary a window) and the counts
add up, on ``task.Clock``; and the site logs its 4xx answers through it, those of
its resources (400, 401, 404, 405, 413) and those of the channel (414, 431).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Optional

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from loghandler.budget import MemoryBudget
from loghandler.message import Limits
from loghandler.registry import StreamRegistry, StreamSettings
from loghandler.rejections import LINES_PER_WINDOW, WINDOW_S, RejectionLog
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.writer import S3ObjectStore
from loghandler.web import LogSite, make_site

#: Statuses of a flood, in the order they come round.
STATUSES = (400, 400, 400, 413, 404, 405, 431, 401)
NOW_MS = 1_585_526_400_123


def of(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


class RejectionLogTests(SynchronousTestCase):
    """The pace and the counts, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.log = RejectionLog(self.clock)

    def flood(self, count: int, every_s: float = 0.0) -> Counter[int]:
        """``count`` rejections ``every_s`` apart; the statuses sent, counted."""
        sent: Counter[int] = Counter()
        for i in range(count):
            status = STATUSES[i % len(STATUSES)]
            self.log.rejected(status, "bad", "10.0.0.7", b"POST", b"/log")
            sent[status] += 1
            if every_s:
                self.clock.advance(every_s)
        return sent

    def check_counts(self, events: list[dict[str, Any]], sent: Counter[int]) -> None:
        """Lines plus suppressed counts are every rejection, by status."""
        seen: Counter[int] = Counter(e["status"] for e in of(events, "request_rejected"))
        for summary in of(events, "rejections_suppressed"):
            seen.update({int(s): n for s, n in summary["by_status"].items()})
        self.assertEqual(seen, sent)

    def test_flood_in_one_window(self) -> None:
        """10,000 at once: 10 lines, then one summary of 9,990 when the window ends."""
        self.log.start()
        with capturedLogs() as events:
            sent = self.flood(10_000)
            self.assertEqual(len(events), LINES_PER_WINDOW)
            self.clock.advance(WINDOW_S)
        self.assertEqual(len(events), LINES_PER_WINDOW + 1)
        [summary] = of(events, "rejections_suppressed")
        self.assertEqual(summary["suppressed"], 10_000 - LINES_PER_WINDOW)
        self.assertEqual(summary["logged"], LINES_PER_WINDOW)
        self.assertEqual(summary["seconds"], WINDOW_S)
        self.assertEqual(summary["log_level"].name, "warn")
        self.assertEqual(
            formatEvent(summary),
            "suppressed 9990 more rejected requests in 60 s after the first 10"
            " ({'400': 3745, '401': 1249, '404': 1249, '405': 1249, '413': 1249,"
            " '431': 1249})",
        )
        self.check_counts(events, sent)
        self.assertEqual((self.log.total, self.log.suppressed_total), (10_000, 9_990))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flood_over_time(self) -> None:
        """10,000 over 500 s: at most 10 lines and one summary per 60 s window."""
        self.log.start()
        with capturedLogs() as events:
            sent = self.flood(10_000, every_s=0.05)
            self.clock.advance(WINDOW_S)
        windows = int(10_000 * 0.05 // WINDOW_S) + 1
        self.assertEqual(len(of(events, "request_rejected")), windows * LINES_PER_WINDOW)
        self.assertEqual(len(of(events, "rejections_suppressed")), windows)
        self.assertEqual(len(events), windows * (LINES_PER_WINDOW + 1))
        self.check_counts(events, sent)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_every_rejection_logged_at_a_slow_pace(self) -> None:
        """One every 10 s: each one a line, no summary."""
        self.log.start()
        with capturedLogs() as events:
            self.flood(100, every_s=10.0)
        self.assertEqual(len(of(events, "request_rejected")), 100)
        self.assertEqual(of(events, "rejections_suppressed"), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_not_started_keeps_no_timer(self) -> None:
        """
        A site that does not listen (a test's) arms no timer: the summary comes with
        the next rejection after the window, or at stop.
        """
        with capturedLogs() as events:
            sent = self.flood(50)
            self.assertEqual(self.clock.getDelayedCalls(), [])
            self.clock.advance(WINDOW_S + 1)
            self.assertEqual(of(events, "rejections_suppressed"), [])
            sent.update(self.flood(1))
            [summary] = of(events, "rejections_suppressed")
            self.assertEqual(summary["suppressed"], 40)
            self.assertEqual(summary["seconds"], WINDOW_S)
            sent.update(self.flood(30))
            self.log.stop()
        self.assertEqual(len(of(events, "rejections_suppressed")), 2)
        self.assertEqual(of(events, "rejections_suppressed")[1]["suppressed"], 21)
        self.check_counts(events, sent)

    def test_stop_logs_the_last_window(self) -> None:
        """At stop the window ends at once: its summary, and no timer left."""
        self.log.start()
        with capturedLogs() as events:
            self.flood(25)
            self.clock.advance(5)
            self.log.stop()
        [summary] = of(events, "rejections_suppressed")
        self.assertEqual((summary["suppressed"], summary["seconds"]), (15, 5.0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_line_fields(self) -> None:
        """Status, error, method, the path without its query, peer, batch line."""
        with capturedLogs() as events:
            self.log.rejected(400, "text must be a string", "10.0.0.7", b"POST", b"/log?token=x", 3)
            self.log.rejected(414, "request line too long", "10.0.0.8")
        first, second = events
        self.assertEqual(
            {k: first[k] for k in ("event", "status", "error", "method", "path", "peer", "line")},
            {
                "event": "request_rejected",
                "status": 400,
                "error": "text must be a string",
                "method": "POST",
                "path": "/log",
                "peer": "10.0.0.7",
                "line": 3,
            },
        )
        self.assertEqual(
            formatEvent(first),
            "rejected POST /log from 10.0.0.7: 400 text must be a string (line 3)",
        )
        self.assertEqual(first["log_level"].name, "info")
        self.assertEqual(formatEvent(second), "rejected   from 10.0.0.8: 414 request line too long")
        self.assertIsNone(second["line"])

    def test_long_path_cut(self) -> None:
        with capturedLogs() as events:
            self.log.rejected(404, "not found", "p", b"GET", b"/" + b"a" * 5000 + b"\xff")
        self.assertEqual(len(events[0]["path"]), 200)


class SiteRejectionTests(SynchronousTestCase):
    """The site's 4xx answers go through its RejectionLog."""

    def setUp(self) -> None:
        self.clock = Clock()
        mem = MemoryStore(min_part_size=5 * 1024 * 1024, now=self.clock.seconds)
        budget = MemoryBudget(64 * 1024 * 1024)
        store = S3ObjectStore(mem, self.clock, budget, part_size=5 * 1024 * 1024)
        registry = StreamRegistry(
            store, self.clock, StreamSettings(part_size=5 * 1024 * 1024, lifetime_s=60), budget
        )
        self.site = make_site(registry, Limits(), lambda: NOW_MS, 1024, clock=self.clock)
        self.client = StubTreq(self.site.resource)
        # Serve through this site, on the client's memory reactor (its connections'
        # timers must not reach the global reactor).
        self.site.reactor = self.client._agent._memoryReactor
        self.client._agent._serverFactory = self.site
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)

    def request(self, method: str, path: str, data: Optional[bytes] = None) -> int:
        response = self.successResultOf(
            self.client.request(method, "http://example.test" + path, data=data)
        )
        self.successResultOf(self.client.content(response))
        return int(response.code)

    def test_flood_of_bad_requests(self) -> None:
        """
        10,000 bad requests (400, 404, 405, 413) within a window: 10 lines, then one
        summary with the other 9,990 by status; a good request between them is
        taken and not logged.
        """
        requests = [
            ("POST", "/log", b"{not json", 400),
            ("GET", "/nowhere", None, 404),
            ("GET", "/log", None, 405),
            ("POST", "/log", b"x" * 2000, 413),
        ]
        sent: Counter[int] = Counter()
        with capturedLogs() as events:
            for i in range(10_000):
                method, path, data, status = requests[i % len(requests)]
                self.assertEqual(self.request(method, path, data), status)
                sent[status] += 1
            good = json.dumps(
                {"text": "ok", "content_id": 1, "client_id": 1, "timestamp": NOW_MS}
            ).encode()
            self.assertEqual(self.request("POST", "/log", good), 200)
            self.clock.advance(WINDOW_S)
        lines = of(events, "request_rejected")
        self.assertEqual(len(lines), LINES_PER_WINDOW)
        self.assertEqual(
            [(e["status"], e["method"], e["path"]) for e in lines[:4]],
            [
                (400, "POST", "/log"),
                (404, "GET", "/nowhere"),
                (405, "GET", "/log"),
                (413, "POST", "/log"),
            ],
        )
        self.assertEqual(lines[0]["peer"], "127.0.0.1")
        [summary] = of(events, "rejections_suppressed")
        seen = Counter(e["status"] for e in lines)
        seen.update({int(s): n for s, n in summary["by_status"].items()})
        self.assertEqual(seen, sent)
        self.assertEqual(summary["suppressed"], 9_990)
        self.assertEqual(self.site.rejections.total, 10_000)

    def test_batch_line(self) -> None:
        with capturedLogs() as events:
            status = self.successResultOf(
                self.client.request(
                    "POST",
                    "http://example.test/log",
                    data=b'{"text": "a"}\n',
                    headers={b"content-type": [b"application/x-ndjson"]},
                )
            ).code
        self.assertEqual(status, 400)
        [line] = of(events, "request_rejected")
        self.assertEqual(line["line"], 1)

    def connect(self) -> tuple[Any, StringTransport]:
        """A connection from 10.1.2.3 to the site."""
        peer = IPv4Address("TCP", "10.1.2.3", 5555)
        channel = self.site.buildProtocol(peer)
        assert channel is not None
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        return channel, transport

    def test_channel_refusals(self) -> None:
        """A header block over the limit (431) is logged with the peer, method and path."""
        channel, transport = self.connect()
        with capturedLogs() as events:
            channel.dataReceived(b"POST /log HTTP/1.1\r\n" + b"X-A: b\r\n" * 600 + b"\r\n")
        self.assertIn(b"431", transport.value().split(b"\r\n")[0])
        [line] = of(events, "request_rejected")
        self.assertEqual(
            (line["status"], line["peer"], line["method"], line["path"]),
            (431, "10.1.2.3", "POST", "/log"),
        )

    def test_channel_request_line_too_long(self) -> None:
        """414: the request line was not read, so no method or path."""
        channel, _ = self.connect()
        with capturedLogs() as events:
            channel.dataReceived(b"GET /" + b"a" * 20_000)
        [line] = of(events, "request_rejected")
        self.assertEqual((line["status"], line["method"], line["path"]), (414, "", ""))

    def test_stop_factory_ends_the_window(self) -> None:
        with capturedLogs() as events:
            for _ in range(LINES_PER_WINDOW + 3):
                self.request("GET", "/nowhere")
            self.site.stopFactory()
            self.site.startFactory()  # for the cleanup's stopFactory
        [summary] = of(events, "rejections_suppressed")
        self.assertEqual(summary["suppressed"], 3)
        # No window timer is left (the connection guard's sweep runs while listening).
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if "ConnectionGuard.sweep" not in repr(c)], []
        )


class LogSiteDefaultsTests(SynchronousTestCase):
    def test_has_a_rejection_log(self) -> None:
        site = LogSite(None, 1024)  # type: ignore[arg-type]
        self.assertIsInstance(site.rejections, RejectionLog)
