"""
Tests for :mod:`loghandler.connections` through the real ``LogSite`` and
``LogChannel`` on ``StringTransport`` connections and a ``task.Clock``: the
whole-request deadline (``REQUEST_TIMEOUT_S``), the idle timeout, the cap on open
connections (``MAX_CONNECTIONS``), and their rate-limited log lines.
"""

from __future__ import annotations

import resource
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from loghandler.connections import (
    ABORT_AFTER_S,
    IDLE_TIMEOUT_S,
    LOG_INTERVAL_S,
    default_max_connections,
)
from loghandler.message import Limits
from loghandler.web import LogChannel, make_site
from tests.test_web import MAX_BODY, NOW_MS, RawCase, body

TIMEOUT_S = 5.0

#: The head of a POST of one message, without its body.
HEAD = b"POST /log HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body())


class Transport(StringTransport):
    """A ``StringTransport`` that tells an abort from a close."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class FakePort:
    """The listening port: whether it is read."""

    def __init__(self) -> None:
        self.reading = True
        self.calls: list[str] = []

    def stopReading(self) -> None:
        self.reading = False
        self.calls.append("stop")

    def startReading(self) -> None:
        self.reading = True
        self.calls.append("start")


class GuardCase(RawCase):
    """A site with REQUEST_TIMEOUT_S=5 and MAX_CONNECTIONS=3 on the test's clock, listening."""

    request_timeout_s = TIMEOUT_S
    durable_timeout_s: Optional[float] = None

    def setUp(self) -> None:
        super().setUp()
        self.serve_site(
            clock=self.clock,
            durable_timeout_s=self.durable_timeout_s,
            request_timeout_s=self.request_timeout_s,
            max_connections=3,
        )
        self.port = FakePort()
        self.site.listening(self.port)
        self.site.doStart()
        self.addCleanup(self.site.doStop)

    def connect(self) -> tuple[LogChannel, Any]:
        """A new connection (a ``Transport``), or (None, None) when refused at the cap."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        if channel is None:
            return None, None  # type: ignore[return-value]
        transport = Transport()
        channel.makeConnection(transport)
        self.addCleanup(self.close, channel, transport)
        return channel, transport

    def close(self, channel: LogChannel, transport: Any) -> None:
        """The connection closes (as the reactor would after a close or abort)."""
        if not getattr(transport, "closed", False):
            transport.closed = True
            channel.connectionLost(Failure(ConnectionDone()))

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, one sweep a second."""
        for _ in range(int(seconds)):
            self.clock.advance(1)


class RequestTimeoutTests(GuardCase):
    """REQUEST_TIMEOUT_S: a request must come whole within it of its first byte."""

    def test_trickling_client_cut_at_the_deadline(self) -> None:
        """
        A client sending one byte a second (the idle timer of twisted.web restarted
        on each) gets 408 with a JSON body 5 s after its first byte, and the
        connection is closed; meanwhile another client is answered at once.
        """
        slow, slow_transport = self.connect()
        data = HEAD + body()
        for n in range(4):
            slow.dataReceived(data[n : n + 1])
            self.advance(1)
        fast, fast_transport = self.connect()
        fast.dataReceived(data)
        self.assertEqual(self.answer(fast_transport)[0], 200)
        self.assertEqual(slow_transport.value(), b"")
        slow.dataReceived(data[4:5])
        self.advance(1)
        status, headers, answer = self.answer(slow_transport)
        self.assertEqual(
            (status, answer),
            (
                408,
                {
                    "error": "request did not come whole within 5 s (REQUEST_TIMEOUT_S)",
                    "field": None,
                },
            ),
        )
        self.assertEqual(headers["connection"], "close")
        self.assertTrue(slow_transport.disconnecting)
        self.assertFalse(fast_transport.disconnecting)
        metrics = self.site.metrics
        self.assertEqual(metrics.get("loghandler_refused_requests_total", {"status": "408"}), 1)
        self.assertEqual(metrics.get("loghandler_open_connections"), 2)
        self.close(slow, slow_transport)
        self.assertEqual(metrics.get("loghandler_open_connections"), 1)

    def test_body_counts_too(self) -> None:
        """Headers in time but the body trickling: cut all the same."""
        channel, transport = self.connect()
        channel.dataReceived(HEAD)
        for byte in body()[:6]:
            self.advance(1)
            channel.dataReceived(bytes([byte]))
        self.assertEqual(self.answer(transport)[0], 408)
        self.assertEqual(self.stored_lines(), [])

    def test_each_request_has_its_own_deadline(self) -> None:
        """
        A kept-alive connection sending a whole request every 3 s for a minute is
        never cut: the deadline starts at each request's first byte.
        """
        channel, transport = self.connect()
        for n in range(20):
            transport.clear()
            channel.dataReceived(HEAD + body())
            self.assertEqual(self.answer(transport)[0], 200, n)
            self.advance(3)
        self.assertFalse(transport.disconnecting)

    def test_idle_connection_closed_without_answer(self) -> None:
        """A connection idle for IDLE_TIMEOUT_S (between requests) is closed, no bytes sent."""
        channel, transport = self.connect()
        channel.dataReceived(HEAD + body())
        transport.clear()
        self.advance(IDLE_TIMEOUT_S)
        self.assertFalse(transport.disconnecting)
        self.advance(1)
        self.assertEqual((transport.value(), transport.disconnecting), (b"", True))
        _, silent = self.connect()  # never a byte: idle from the start
        self.advance(IDLE_TIMEOUT_S + 1)
        self.assertTrue(silent.disconnecting)

    def test_aborted_when_it_does_not_close(self) -> None:
        """A cut connection still open ABORT_AFTER_S later is aborted."""
        channel, transport = self.connect()
        channel.dataReceived(b"P")
        self.advance(TIMEOUT_S)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.aborted)
        self.advance(ABORT_AFTER_S)
        self.assertTrue(transport.aborted)

    def test_logged_as_a_rejection(self) -> None:
        """A cut is logged as every 4xx is, with its status and error."""
        channel, _ = self.connect()
        with capturedLogs() as events:
            channel.dataReceived(b"P")
            self.advance(TIMEOUT_S)
        (event,) = [e for e in events if e.get("event") == "request_rejected"]
        self.assertEqual(
            (event["status"], event["error"]),
            (408, "request did not come whole within 5 s (REQUEST_TIMEOUT_S)"),
        )


class NoRequestTimeoutTests(GuardCase):
    """REQUEST_TIMEOUT_S=0: no deadline, the idle timeout still restarts on every byte."""

    request_timeout_s = 0.0

    def test_not_cut(self) -> None:
        channel, transport = self.connect()
        for byte in HEAD[:30]:
            channel.dataReceived(bytes([byte]))
            self.advance(1)
        self.assertFalse(transport.disconnecting)


class DurableWaitTests(GuardCase):
    """A request being answered (ACK=durable's wait) has no deadline."""

    durable_timeout_s = 60.0

    def test_waiting_answer_not_cut(self) -> None:
        channel, transport = self.connect()
        self.mem.hold("PutObject")
        self.mem.hold("UploadPart")
        channel.dataReceived(HEAD + body())
        self.advance(30)
        self.assertEqual((transport.value(), transport.disconnecting), (b"", False))
        self.advance(31)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 202 "), transport.value())
        self.assertFalse(transport.disconnecting)


class MaxConnectionsTests(GuardCase):
    """MAX_CONNECTIONS=3: at the cap the port is no longer read, past it a connection is closed."""

    def test_paused_at_the_cap(self) -> None:
        """
        The third connection stops the port's reading; one built past the cap is
        refused (closed at once by the port); a close resumes the reading.  Logged
        once a minute at most.
        """
        with capturedLogs() as events:
            first, first_transport = self.connect()
            self.connect()
            self.assertEqual(self.port.calls, [])
            self.connect()
            self.assertEqual(self.port.calls, ["stop"])
            self.assertIsNone(self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)))
            self.close(first, first_transport)
            self.assertEqual(self.port.calls, ["stop", "start"])
            self.connect()
            self.assertEqual(self.port.calls, ["stop", "start", "stop"])
            full = [e for e in events if e.get("event") == "max_connections"]
            self.assertEqual([(e["count"], e["limit"]) for e in full], [(1, 3)])
            self.advance(LOG_INTERVAL_S)
            full = [e for e in events if e.get("event") == "max_connections"]
            self.assertEqual([e["count"] for e in full], [1, 1])

    def test_served_at_the_cap(self) -> None:
        """The connections open at the cap are served as usual."""
        connections = [self.connect() for _ in range(3)]
        for channel, transport in connections:
            channel.dataReceived(HEAD + body())
            self.assertEqual(self.answer(transport)[0], 200)


class DefaultTests(RawCase):
    """MAX_CONNECTIONS unset: derived from RLIMIT_NOFILE's soft limit."""

    def test_derived(self) -> None:
        for soft, expected in (
            (1024, 768),
            (4096, 3840),
            (200, 64),
            (1_048_576, 10_000),
            (resource.RLIM_INFINITY, 10_000),
        ):
            self.assertEqual(
                default_max_connections(lambda _: (soft, resource.RLIM_INFINITY)), expected, soft
            )

    def test_site_default(self) -> None:
        """A site given none takes the derived one."""
        site = make_site(self.registry, Limits(), lambda: NOW_MS, MAX_BODY)
        self.assertEqual(site.guard.max_connections, default_max_connections())
        self.assertEqual(site.guard.request_timeout_s, 30.0)
