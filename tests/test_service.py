"""
Tests for :mod:`loghandler.service`: the service tree, the listener, the storage
check at start, and the flush on stop bounded by ``SHUTDOWN_TIMEOUT_S`` (waking
retries that sleep, abandoning what storage does not take in time), on a
``MemoryReactorClock`` with the S3 writer over the in-memory S3.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from treq.testing import StubTreq
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.config import Config
from loghandler.health import local_health
from loghandler.interfaces import StorageError
from loghandler.keys import key_for
from loghandler.listen import listen_description
from loghandler.message import Message
from loghandler.registry import Busy
from loghandler.retry import RetryLayer
from loghandler.service import (
    ADMIN_SERVICE_NAME,
    CHECK_INTERVAL_S,
    CHECK_TIMEOUT_S,
    StreamService,
    build_service,
)
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.writer import S3ObjectStore
from tests.helpers import DAY_START_MS, message, read_lines

PART = 16 * 1024
KEY = key_for(DAY_START_MS + 1000, 3)


class ServiceTests(SynchronousTestCase):
    """The root service listens, checks the store, and flushes on stop."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.mem = MemoryStore(min_part_size=PART, now=self.reactor.seconds)
        self.root, self.streams = self.build(self.mem, port=8902)

    def build(
        self,
        mem: MemoryStore,
        port: int,
        backoff: Backoff = Backoff(base=0.2, cap=30.0),
        admin_port: Optional[int] = None,
    ) -> tuple[MultiService, StreamService]:
        """A started root service over ``mem``, and its StreamService."""
        config = Config(
            addr="127.0.0.1",
            port=port,
            shutdown_timeout_s=25,
            part_size=PART,
            no_upload=False,
            admin_addr="127.0.0.2",
            admin_port=admin_port,
        )
        budget = MemoryBudget(config.buffer_budget_bytes)
        self.store = S3ObjectStore(
            mem,
            self.reactor,
            budget,
            part_size=PART,
            retry=RetryLayer(self.reactor, backoff=backoff),
        )
        root = build_service(config, self.store, self.reactor, lambda: DAY_START_MS, budget)
        root.startService()
        (streams,) = [s for s in root if isinstance(s, StreamService)]
        return root, streams

    def test_listens(self) -> None:
        """The listener binds ADDR and PORT."""
        (port,) = self.reactor.tcpServers
        self.assertEqual((port[0], port[3]), (8902, "127.0.0.1"))

    def get(self, site: Any, path: str) -> int:
        """The status of ``GET path`` on ``site``."""
        client = StubTreq(site.resource)
        return int(self.successResultOf(client.get("http://test" + path)).code)

    def test_probes_on_the_main_port(self) -> None:
        """Without ADMIN_PORT, the main port serves /log and the probes."""
        ((_, site, _, _),) = self.reactor.tcpServers
        self.assertEqual(set(site.routes), {b"/log", b"/livez", b"/readyz", b"/healthz", b"/metrics"})
        self.assertEqual(self.get(site, "/metrics"), 200)

    def test_admin_port(self) -> None:
        """
        With ADMIN_PORT, the probes and metrics are on that listener only (404 on
        the main port), which still answers during the flush (/readyz: stopping).
        """
        self.root.stopService()
        self.reactor.tcpServers.clear()
        root, streams = self.build(self.mem, port=8902, admin_port=9102)
        (admin, main) = self.reactor.tcpServers
        self.assertEqual((admin[0], admin[3]), (9102, "127.0.0.2"))
        self.assertEqual((main[0], main[3]), (8902, "127.0.0.1"))
        for path in ("/livez", "/readyz", "/healthz", "/metrics"):
            self.assertEqual(self.get(main[1], path), 404, path)
            self.assertEqual(self.get(admin[1], path), 200, path)
        self.assertEqual(set(admin[1].routes), {b"/livez", b"/readyz", b"/healthz", b"/metrics"})
        self.mem.hold("PutObject")
        streams.registry.accept(message(1))
        stopping = root.stopService()
        self.assertNoResult(stopping)
        self.assertEqual(self.get(admin[1], "/readyz"), 503)
        self.assertEqual(self.get(admin[1], "/livez"), 200)
        # The listener itself stays open until the flush is done (MultiService stops
        # every child at once: it closed as the flush began, found by the tester).
        listener = root.getServiceNamed(ADMIN_SERVICE_NAME)._inner  # type: ignore[attr-defined]
        self.assertTrue(listener.running)
        self.mem.release()
        self.successResultOf(stopping)
        self.assertFalse(listener.running)

    def test_listen_description_ipv6(self) -> None:
        """An IPv6 ADDR is quoted for the endpoint string."""
        self.assertEqual(listen_description("::", 80), "tcp:80:interface=\\:\\:")

    def test_check_that_never_answers_times_out_and_is_retried(self) -> None:
        """
        A store check that never fires (a resolver that never calls back) counts as
        failed after CHECK_TIMEOUT_S: logged, tried again, and messages taken once
        the store answers.
        """
        self.successResultOf(self.root.stopService())
        mem = MemoryStore(min_part_size=PART, now=self.reactor.seconds)
        mem.hold("HeadBucket")
        with capturedLogs() as events:
            root, streams = self.build(mem, port=8903)
            self.reactor.advance(CHECK_TIMEOUT_S - 0.1)
            self.assertEqual(
                [e for e in events if e.get("event") == "storage_unreachable"], []
            )
            self.reactor.advance(0.1)
        (unreachable,) = [e for e in events if e.get("event") == "storage_unreachable"]
        self.assertEqual(unreachable["error"], "no answer in %g s" % CHECK_TIMEOUT_S)
        self.assertRaises(Busy, streams.registry.accept, message(1))
        mem.release()
        self.reactor.advance(CHECK_INTERVAL_S)
        streams.registry.accept(message(1))
        self.successResultOf(root.stopService())
        self.assertEqual(read_lines(mem.body(KEY)), [message(1).to_line()])

    def test_refuses_until_storage_reachable(self) -> None:
        """
        While the store's check fails, messages are refused with 'storage is not
        reachable yet' and the error is logged; the check is retried and then
        messages are taken.
        """
        self.successResultOf(self.root.stopService())
        mem = MemoryStore(min_part_size=PART, now=self.reactor.seconds)
        mem.fail("HeadBucket", StorageError("HeadBucket", 404, "NoSuchBucket"), times=2)
        with capturedLogs() as events:
            root, streams = self.build(mem, port=8903)
        with self.assertRaises(Busy) as caught:
            streams.registry.accept(message(1))
        self.assertEqual(caught.exception.reason, "storage is not reachable yet")
        (unreachable,) = [e for e in events if "not reachable" in (e.get("log_format") or "")]
        self.assertIn("NoSuchBucket", unreachable["error"])
        # /readyz names it too (it said only "storage not reachable" before).
        self.assertEqual(
            local_health(streams.registry)["status"],
            "storage not reachable: " + unreachable["error"],
        )
        self.reactor.advance(CHECK_INTERVAL_S)
        self.assertRaises(Busy, streams.registry.accept, message(1))
        self.reactor.advance(CHECK_INTERVAL_S)
        streams.registry.accept(message(1))
        self.assertEqual(mem.calls.count(("HeadBucket", "")), 3)
        self.successResultOf(root.stopService())
        self.assertEqual(list(mem.objects), [KEY])
        self.assertEqual(read_lines(mem.body(KEY)), [message(1).to_line()])

    def test_stop_flushes(self) -> None:
        """stopService completes every object before its Deferred fires."""
        self.streams.registry.accept(message(1))
        self.streams.registry.accept(message(2, client_id=4))
        self.mem.hold("PutObject")
        with capturedLogs() as events:
            stopping = self.root.stopService()
            self.assertNoResult(stopping)
            self.mem.release()
            self.successResultOf(stopping)
        self.assertEqual(sorted(self.mem.objects), sorted([KEY, key_for(DAY_START_MS + 1000, 4)]))
        self.assertEqual(read_lines(self.mem.body(KEY)), [message(1).to_line()])
        self.assertEqual(
            read_lines(self.mem.body(key_for(DAY_START_MS + 1000, 4))),
            [message(2, client_id=4).to_line()],
        )
        self.assertTrue(any("flush on stop done" in (e.get("log_format") or "") for e in events))
        self.assertEqual(self.streams.registry.budget.held, 0)
        self.assertEqual(self.streams.lines_lost, 0)

    def test_stop_wakes_retries_in_backoff(self) -> None:
        """
        A part that failed (503) and sleeps in backoff is tried again as soon as the
        stop begins: the flush is done at once, long before the backoff would have
        ended, with every line stored.
        """
        self.successResultOf(self.root.stopService())
        mem = MemoryStore(min_part_size=PART, now=self.reactor.seconds)
        # Waits of 10 s, then 20 s (the upper bound of each backoff interval).
        root, streams = self.build(
            mem, port=8903, backoff=Backoff(base=10.0, cap=60.0, uniform=lambda a, b: b)
        )
        mem.fail("UploadPart", StorageError("UploadPart", 503, "SlowDown"), times=2)
        sent = []
        n = 0
        def part_uploads() -> int:
            """UploadParts of the stream (not of the start-up probe of the bucket)."""
            return [(op, k.startswith("_loghandler/staging/")) for op, k in mem.calls].count(
                ("UploadPart", True)
            )

        while not part_uploads():  # until the first part
            n += 1
            m = Message(os.urandom(500).hex(), n, 3, DAY_START_MS + 1000)
            streams.registry.accept(m)
            sent.append(m.to_line())
        self.reactor.advance(10)  # the second attempt fails too: 20 s more
        self.assertEqual(part_uploads(), 2)
        started = self.reactor.seconds()
        with capturedLogs() as events:
            stopping = root.stopService()
            self.successResultOf(stopping)
        self.assertEqual(self.reactor.seconds(), started)
        self.assertTrue(any("flush on stop done" in (e.get("log_format") or "") for e in events))
        self.assertEqual(list(mem.objects), [KEY])
        self.assertEqual(read_lines(mem.body(KEY)), sent)

    def test_stop_deadline(self) -> None:
        """
        With storage stalled past the deadline, the stop fires at the deadline and
        the log names the key and the lines that were not stored, as a deadline loss
        (no traceback).
        """
        self.streams.registry.accept(message(1))
        self.streams.registry.accept(message(2))
        self.mem.hold("PutObject")
        with capturedLogs() as events:
            stopping = self.root.stopService()
            self.reactor.advance(24.9)
            self.assertNoResult(stopping)
            self.reactor.advance(0.1)
            self.successResultOf(stopping)
        (lost,) = [e for e in events if "lost_lines" in e]
        self.assertEqual((lost["key"], lost["lost_lines"]), (KEY, 2))
        self.assertIn("by the shutdown deadline", lost["reason"])
        self.assertFalse([e for e in events if e.get("log_failure")], "no traceback")
        formats = [e.get("log_format") or "" for e in events]
        self.assertTrue([f for f in formats if "passed its deadline" in f], formats)
        self.assertFalse([f for f in formats if f.startswith("flush on stop done")], formats)
        self.assertEqual(self.mem.objects, {})
        self.assertEqual(self.streams.registry.budget.held, 0)
        self.assertEqual(self.streams.lines_lost, 2)  # the exit status will be 1

    def test_stop_deadline_with_everything_staged(self) -> None:
        """
        Storage stalled past the deadline, but the lines were staged by a
        checkpoint: nothing lost (the exit status stays a clean one).
        """
        self.streams.registry.accept(message(1))
        self.reactor.advance(10)  # CHECKPOINT_S: the line is staged
        self.mem.hold("CompleteMultipartUpload")
        self.mem.hold("PutObject")
        with capturedLogs() as events:
            stopping = self.root.stopService()
            self.reactor.advance(25)
            self.successResultOf(stopping)
        self.assertEqual([e for e in events if e.get("event") == "lines_lost"], [])
        self.assertEqual(self.streams.lines_lost, 0)
