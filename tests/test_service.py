"""
Tests for :mod:`loghandler.service`: the service tree, the listener, and the flush on
stop bounded by ``SHUTDOWN_TIMEOUT_S``, on a ``MemoryReactorClock``.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from loghandler.config import Config
from loghandler.keys import key_for
from loghandler.service import StreamService, build_service, listen_description
from loghandler.storage.memory import MemoryStore
from tests.helpers import DAY_START_MS, message, read_lines


class ServiceTests(SynchronousTestCase):
    """The root service listens, and flushes on stop."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.store = MemoryStore()
        config = Config(addr="127.0.0.1", port=8902, shutdown_timeout_s=25, no_upload=True)
        self.root = build_service(config, self.store, self.reactor, lambda: DAY_START_MS)
        self.root.startService()
        (self.streams,) = [s for s in self.root if isinstance(s, StreamService)]

    def test_listens(self) -> None:
        """The listener binds ADDR and PORT."""
        (port,) = self.reactor.tcpServers
        self.assertEqual((port[0], port[3]), (8902, "127.0.0.1"))

    def test_listen_description_ipv6(self) -> None:
        """An IPv6 ADDR is quoted for the endpoint string."""
        self.assertEqual(listen_description("::", 80), "tcp:80:interface=\\:\\:")

    def test_refuses_until_storage_reachable(self) -> None:
        """
        While the store's check fails, messages are refused with 'storage is not
        reachable yet' and the error is logged; the check is retried and then
        messages are taken.
        """
        from loghandler.interfaces import StorageError
        from loghandler.registry import Busy
        from loghandler.service import CHECK_INTERVAL_S

        self.root.stopService()
        store = MemoryStore()
        store.fail("HeadBucket", StorageError("HeadBucket", 404), times=2)
        config = Config(addr="127.0.0.1", port=8903, no_upload=True)
        root = build_service(config, store, self.reactor, lambda: DAY_START_MS)
        with capturedLogs() as events:
            root.startService()
        (streams,) = [s for s in root if isinstance(s, StreamService)]
        with self.assertRaises(Busy) as caught:
            streams.registry.accept(message(1))
        self.assertEqual(caught.exception.reason, "storage is not reachable yet")
        self.assertTrue(any("not reachable" in e.get("log_format", "") for e in events))
        self.reactor.advance(CHECK_INTERVAL_S)
        self.assertRaises(Busy, streams.registry.accept, message(1))
        self.reactor.advance(CHECK_INTERVAL_S)
        streams.registry.accept(message(1))
        self.assertEqual(store.calls.count(("HeadBucket", "")), 3)
        self.successResultOf(root.stopService())
        self.assertEqual(len(store.objects), 1)

    def test_stop_flushes(self) -> None:
        """stopService completes every object before its Deferred fires."""
        self.streams.registry.accept(message(1))
        self.streams.registry.accept(message(2, client_id=4))
        self.store.hold("PutObject")
        with capturedLogs() as events:
            stopping = self.root.stopService()
            self.assertNoResult(stopping)
            self.store.release()
            self.successResultOf(stopping)
        self.assertEqual(
            read_lines(self.store.body(key_for(DAY_START_MS + 1000, 3))), [message(1).to_line()]
        )
        self.assertEqual(len(self.store.objects), 2)
        self.assertTrue(any("flush on stop done" in e.get("log_format", "") for e in events))

    def test_stop_deadline(self) -> None:
        """A flush that cannot finish ends at the deadline and logs what was lost."""
        self.streams.registry.accept(message(1))
        self.store.hold("PutObject")
        with capturedLogs() as events:
            stopping = self.root.stopService()
            self.reactor.advance(24.9)
            self.assertNoResult(stopping)
            self.reactor.advance(0.1)
            self.successResultOf(stopping)
        formats = [e.get("log_format", "") for e in events]
        self.assertTrue(any("passed its deadline" in f for f in formats), formats)
        self.assertTrue(any("lost_bytes" in e for e in events))
