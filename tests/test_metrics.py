"""
Tests for :mod:`loghandler.metrics` and the instrumentation of the data path: the
real site, registry, streams, retry layer and S3 writer over the in-memory S3
(and the Azure writer over the in-memory append blobs) on a ``task.Clock``,
driven, then the values read from the process's own registry.
"""

from __future__ import annotations

import os
from typing import Optional

from prometheus_client import REGISTRY, generate_latest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.config import Config
from loghandler.interfaces import StorageError
from loghandler.keys import key_for
from loghandler.message import Limits, Message
from loghandler.metrics import GAUGES_COMBINED_BY_MAX, Metrics
from loghandler.registry import StreamRegistry, StreamSettings
from loghandler.retry import RetryLayer
from loghandler.service import STREAM_SERVICE_NAME, build_service
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.writer import S3ObjectStore
from loghandler.web import make_site
from tests.helpers import DAY_START_MS, message, noise
from tests.test_azure_writer import AzureWriterCase
from tests.test_recovery import RecoveryCase
from tests.test_web import MAX_BODY, NOW_MS, PART, RawCase, WebCase, body


def no_jitter(a: float, b: float) -> float:
    """Backoff's uniform draw, always the upper bound."""
    return b


class MetricsModuleTests(SynchronousTestCase):
    """The Metrics object itself."""

    def test_own_registry(self) -> None:
        """
        Each Metrics has its own registry, never the library's global one: two of
        them count apart, and the global registry holds no loghandler metric.
        """
        one, two = Metrics(), Metrics()
        one.accepted.inc(3)
        self.assertEqual(one.get("loghandler_messages_total", {"result": "accepted"}), 3)
        self.assertEqual(two.get("loghandler_messages_total", {"result": "accepted"}), 0)
        self.assertNotIn(b"loghandler_", generate_latest(REGISTRY))

    def test_names(self) -> None:
        """
        Every metric but the process collector's is named loghandler_*, counters end in _total, no Summary, no
        *_created sample; the gauges combined by maximum are gauges of the registry.
        """
        metrics = Metrics()
        gauges = set()
        for family in metrics.registry.collect():
            if family.name.startswith("process_"):  # prometheus_client's ProcessCollector
                continue
            self.assertTrue(family.name.startswith("loghandler_"), family.name)
            self.assertIn(family.type, ("counter", "gauge", "histogram"), family.name)
            if family.type == "gauge":
                gauges.add(family.name)
            for sample in family.samples:
                self.assertFalse(sample.name.endswith("_created"), sample.name)
                if family.type == "counter":
                    self.assertTrue(sample.name.endswith("_total"), sample.name)
        self.assertLessEqual(GAUGES_COMBINED_BY_MAX, gauges)


class InstrumentedCase(WebCase):
    """A site, registry and S3 writer over the memory store, all counting on one Metrics."""

    budget_bytes = 256 * 1024 * 1024
    client_budget_bytes: Optional[int] = None

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.mem = MemoryStore(min_part_size=PART, now=self.clock.seconds)
        self.budget = MemoryBudget(self.budget_bytes)
        self.retry = RetryLayer(
            self.clock,
            backoff=Backoff(base=0.2, cap=30.0, uniform=no_jitter),
            metrics=self.metrics,
        )
        self.store = S3ObjectStore(
            self.mem, self.clock, self.budget, part_size=PART, retry=self.retry
        )
        self.registry = StreamRegistry(
            self.store,
            self.clock,
            StreamSettings(
                part_size=PART, lifetime_s=60, client_budget_bytes=self.client_budget_bytes
            ),
            self.budget,
            uniform=no_jitter,
            metrics=self.metrics,
        )
        self.serve(make_site(self.registry, Limits(), lambda: NOW_MS, MAX_BODY, metrics=self.metrics))

    def post(self, data: bytes, path: str = "/log", batch: bool = False, method: str = "POST") -> int:
        """Send a request; its status."""
        headers = {b"content-type": [b"application/x-ndjson"]} if batch else None
        return self.request(method, path, data, headers)[0]

    def value(self, name: str, **labels: str) -> float:
        """A sample's value (0 when it has none)."""
        return self.metrics.get(name, labels)

    def messages(self) -> dict[str, float]:
        """loghandler_messages_total by result, those not 0."""
        values = {}
        for family in self.metrics.registry.collect():
            if family.name == "loghandler_messages":
                for sample in family.samples:
                    if sample.value:
                        values[sample.labels["result"]] = sample.value
        return values


class MessageResultTests(InstrumentedCase):
    """loghandler_messages_total and loghandler_received_bytes_total from POST /log."""

    def test_accepted_and_each_rejection(self) -> None:
        """
        One message accepted and one refused for each reason: each result counts
        one; the bytes received are those of the accepted body only.
        """
        accepted = body()
        self.assertEqual(self.post(accepted), 200)
        self.assertEqual(self.post(b"{not json"), 400)
        self.assertEqual(self.post(body(text="x" * MAX_BODY)), 413)
        self.assertEqual(self.post(b"", path="/log/below"), 404)
        self.assertEqual(self.post(b"", method="GET"), 405)
        self.registry.ready = False
        self.assertEqual(self.post(body()), 503)
        self.registry.ready = True
        self.budget.change(self.budget.limit)
        self.assertEqual(self.post(body()), 503)
        self.budget.change(-self.budget.limit)
        self.registry.stopping = True
        self.assertEqual(self.post(body()), 503)
        self.assertEqual(
            self.messages(),
            {
                "accepted": 1,
                "invalid": 1,
                "too_large": 1,
                "not_found": 1,
                "method": 1,
                "unavailable": 1,
                "busy": 1,
                "stopping": 1,
            },
        )
        self.assertEqual(self.value("loghandler_received_bytes_total"), len(accepted))

    def test_unexpected_error(self) -> None:
        """A registry failure answered 500 counts as result="error"."""

        def broken(message: object) -> None:
            raise RuntimeError("boom")

        self.patch(self.registry, "accept", broken)
        self.assertEqual(self.post(body()), 500)
        self.assertEqual(self.messages(), {"error": 1})
        self.flushLoggedErrors(RuntimeError)

    def test_batch_counts_each_line(self) -> None:
        """
        A batch accepted counts each of its messages; a batch refused (a bad line)
        counts each of its lines under that reason.
        """
        good = b"\n".join(body(content_id=n) for n in range(1, 4)) + b"\n"
        self.assertEqual(self.post(good, batch=True), 200)
        bad = body(content_id=1) + b"\n{oops\n" + body(content_id=3)
        self.assertEqual(self.post(bad, batch=True), 400)
        self.assertEqual(self.messages(), {"accepted": 3, "invalid": 3})
        self.assertEqual(self.value("loghandler_received_bytes_total"), len(good))


class ClientShareTests(InstrumentedCase):
    """A client over its share of the budget is counted busy."""

    client_budget_bytes = 8 * 1024

    def test_client_share(self) -> None:
        """Past CLIENT_BUDGET_BYTES a message is refused 503 and counted busy."""
        self.registry.shares.clear()
        self.assertEqual(self.post(body()), 200)
        share = self.registry.shares[3]
        share.change(share.limit)
        self.assertEqual(self.post(body()), 503)
        share.change(-share.limit)
        self.assertEqual(self.messages(), {"accepted": 1, "busy": 1})


class StorageCallTests(InstrumentedCase):
    """The retry layer counts every storage call."""

    def test_fault_outcome_and_retries(self) -> None:
        """
        An UploadPart that fails once with a 503 SlowDown then succeeds: one attempt
        counted transient and one ok, one retry, and two latency observations.
        """
        self.mem.fail("UploadPart", StorageError("UploadPart", 503, "SlowDown"))
        writer = self.store.open("chat/k")
        done = writer.part(b"x" * PART)
        self.clock.advance(1)  # the retry's wait (0.2 s at most)
        self.successResultOf(done)
        calls = "loghandler_storage_calls_total"
        self.assertEqual(self.value(calls, operation="UploadPart", outcome="transient"), 1)
        self.assertEqual(self.value(calls, operation="UploadPart", outcome="ok"), 1)
        self.assertEqual(
            self.value(calls, operation="CreateMultipartUpload", outcome="ok"), 1
        )
        self.assertEqual(
            self.value("loghandler_storage_retries_total", operation="UploadPart"), 1
        )
        self.assertEqual(
            self.value("loghandler_storage_call_duration_seconds_count", operation="UploadPart"),
            2,
        )

    def test_permanent_failure(self) -> None:
        """
        AccessDenied counts outcome="permanent" and turns loghandler_storage_failing
        to 1 until the call succeeds.
        """
        self.mem.fail("CreateMultipartUpload", StorageError("CreateMultipartUpload", 403, "AccessDenied"))
        writer = self.store.open("chat/k")
        done = writer.part(b"x" * PART)
        self.assertEqual(self.value("loghandler_storage_failing"), 1)
        self.assertEqual(
            self.value(
                "loghandler_storage_calls_total",
                operation="CreateMultipartUpload",
                outcome="permanent",
            ),
            1,
        )
        self.clock.advance(60)
        self.successResultOf(done)
        self.assertEqual(self.value("loghandler_storage_failing"), 0)


class ServiceTests(SynchronousTestCase):
    """build_service makes one Metrics for the whole tree and the flush sets its duration."""

    def test_service_metrics(self) -> None:
        """
        The stream service holds the Metrics its registry and site count on; a
        flush on stop whose PutObject takes 3 s sets the last flush duration to 3 s.
        """
        reactor = MemoryReactorClock()
        mem = MemoryStore(min_part_size=PART, now=reactor.seconds)
        config = Config(addr="127.0.0.1", port=8902, part_size=PART, no_upload=False)
        store = S3ObjectStore(mem, reactor, part_size=PART, retry=RetryLayer(reactor))
        root = build_service(config, store, reactor, lambda: DAY_START_MS)
        root.startService()
        streams = root.getServiceNamed(STREAM_SERVICE_NAME)  # type: ignore[attr-defined]
        metrics = streams.metrics
        self.assertIs(streams.registry.metrics, metrics)
        streams.registry.accept(message(1))
        self.assertEqual(metrics.get("loghandler_open_streams"), 1)
        mem.hold("PutObject")
        stopping = root.stopService()
        reactor.advance(3)
        mem.release()
        self.successResultOf(stopping)
        self.assertEqual(metrics.get("loghandler_last_flush_duration_seconds"), 3)
        self.assertEqual(metrics.get("loghandler_open_streams"), 0)
        self.assertEqual(metrics.get("loghandler_lines_lost_total"), 0)
        self.assertEqual(metrics.get("loghandler_completions_total", {"outcome": "merged"}), 1)


def noisy(n: int) -> Message:
    """A message of about 200 bytes that compresses poorly."""
    return Message(os.urandom(100).hex(), n, 3, NOW_MS)


class StreamMetricsTests(InstrumentedCase):
    """What the streams count: bytes stored, parts, checkpoints, lines lost, ages."""

    def test_stored_parts_merges(self) -> None:
        """
        Lines of more than a part, then the stop: one part, the stored bytes are
        those of the object (part and tail, staged then copied), one merge by
        multipart upload, one staging object merged, one completion merged,
        nothing lost, nothing buffered.
        """
        for n in range(250):  # about 65 KB, half of it compressed away: one part, a tail
            self.registry.accept(noisy(n))
        self.assertEqual(self.value("loghandler_open_streams"), 1)
        self.assertGreater(self.value("loghandler_buffered_bytes"), 0)
        self.successResultOf(self.registry.close_all())
        self.assertEqual(self.value("loghandler_parts_total"), 1)
        self.assertEqual(
            self.value("loghandler_stored_bytes_total"), len(self.mem.body(key_for(NOW_MS, 3)))
        )
        self.assertEqual(self.value("loghandler_merges_total", method="copy"), 1)
        self.assertEqual(self.value("loghandler_merges_total", method="put"), 0)
        self.assertEqual(self.value("loghandler_merged_staging_objects_total"), 1)
        self.assertEqual(self.value("loghandler_completions_total", outcome="merged"), 1)
        self.assertEqual(self.value("loghandler_completion_duration_seconds_count"), 1)
        self.assertEqual(self.value("loghandler_lines_lost_total"), 0)
        self.assertEqual(self.value("loghandler_buffered_bytes"), 0)
        self.assertEqual(self.value("loghandler_open_streams"), 0)
        self.assertEqual(self.value("loghandler_staged_awaiting_merge_objects"), 0)

    def test_staged_awaiting_merge(self) -> None:
        """
        While the merge of a completed staging object waits (its GetObject held),
        it is counted awaiting a merge, with its bytes; once merged (by PutObject,
        small objects), no longer.
        """
        self.registry.accept(message(1))
        self.mem.hold("GetObject")
        done = self.registry.close_all()
        (staging,) = [k for k in self.mem.objects if k.startswith("_loghandler/staging/")]
        self.assertEqual(self.value("loghandler_staged_awaiting_merge_objects"), 1)
        self.assertEqual(
            self.value("loghandler_staged_awaiting_merge_bytes"), len(self.mem.body(staging))
        )
        self.mem.release()
        self.successResultOf(done)
        self.assertEqual(self.value("loghandler_staged_awaiting_merge_objects"), 0)
        self.assertEqual(self.value("loghandler_staged_awaiting_merge_bytes"), 0)
        self.assertEqual(self.value("loghandler_merges_total", method="put"), 1)

    def test_lines_lost(self) -> None:
        """
        A flush cut short (the deadline abandons it) while the tail's PutObject
        hangs: its 2 lines are counted lost, once, and the completion "lost".
        """
        self.registry.accept(message(1))
        self.registry.accept(message(2))
        self.mem.hold("PutObject")
        done = self.registry.close_all()
        done.cancel()  # the flush's deadline
        self.failureResultOf(done)
        self.assertEqual(self.value("loghandler_lines_lost_total"), 2)
        self.assertEqual(self.value("loghandler_completions_total", outcome="lost"), 1)
        self.flushLoggedErrors()

    def test_staged_at_deadline_not_lost(self) -> None:
        """
        A flush cut while the merge hangs (the lines are staged): nothing is counted
        lost; the completion counts "staged".
        """
        self.registry.accept(message(1))
        self.mem.hold("GetObject")
        done = self.registry.close_all()
        done.cancel()
        self.failureResultOf(done)
        self.assertEqual(self.value("loghandler_lines_lost_total"), 0)
        self.assertEqual(self.value("loghandler_completions_total", outcome="staged"), 1)

    def test_checkpoints(self) -> None:
        """A checkpoint round that lands counts one checkpoint and its bytes."""
        self.registry.accept(message(1))
        self.successResultOf(self.registry.checkpoint_all())
        self.assertEqual(self.value("loghandler_checkpoints_total"), 1)
        (body,) = [
            b for k, b in self.uploaded_parts() if k.startswith("_loghandler/staging/")
        ]
        self.assertEqual(self.value("loghandler_checkpoint_bytes_total"), len(body))

    def uploaded_parts(self) -> list[tuple[str, bytes]]:
        """(key, body) of every part of the open uploads."""
        return [
            (upload.key, part[0])
            for upload in self.mem.uploads.values()
            for part in upload.parts.values()
        ]

    def test_oldest_unstored_line_age(self) -> None:
        """
        The age of the oldest line not in storage: 0 with none; the first line's
        age while no line is stored; after a checkpoint that covers the first two
        lands (started before the third came), the third's age; 0 once all are
        stored.
        """
        age = "loghandler_oldest_unstored_line_age_seconds"
        self.assertEqual(self.value(age), 0)
        self.registry.accept(message(1))
        self.clock.advance(5)
        self.registry.accept(message(2))
        self.clock.advance(2)
        self.assertEqual(self.value(age), 7)
        self.mem.hold("UploadPart")
        checkpoint = self.registry.checkpoint_all()
        self.clock.advance(1)
        self.registry.accept(message(3))  # at 8 s
        self.clock.advance(3)
        self.assertEqual(self.value(age), 11)
        self.mem.release()
        self.successResultOf(checkpoint)
        self.assertEqual(self.value(age), 3)
        self.successResultOf(self.registry.checkpoint_all())
        self.assertEqual(self.value(age), 0)
        self.clock.advance(4)
        self.assertEqual(self.value(age), 0)


class RecoveryMetricsTests(RecoveryCase):
    """Recovery counts the gone writers it took on, and the merges it made."""

    def test_recovered_writer(self) -> None:
        """A dead writer's staging upload recovered: one writer, one merge, one object merged."""
        self.stage_dead()
        report = self.recover()
        self.assertEqual(report.writers, ["dead"])
        metrics = self.retry.metrics
        self.assertEqual(metrics.get("loghandler_recovered_writers_total"), 1)
        self.assertEqual(metrics.get("loghandler_merged_staging_objects_total"), 1)
        self.assertEqual(
            metrics.get("loghandler_merges_total", {"method": "copy"})
            + metrics.get("loghandler_merges_total", {"method": "put"}),
            1,
        )


class AzureMetricsTests(AzureWriterCase):
    """The Azure writer counts the blocks it appended."""

    def test_blocks_appended(self) -> None:
        """
        Two parts and a tail, the first append's answer lost (read back: it
        landed): three blocks counted, and the retried append counted a conflict.
        """
        self.azure.lose_answer("AppendBlock")
        lines = noise(0, 30)
        self.write([lines[:10], lines[10:20], lines[20:]])
        metrics = self.store.retry.metrics
        self.assertEqual(metrics.get("loghandler_blocks_appended_total"), 3)
        calls = "loghandler_storage_calls_total"
        self.assertEqual(metrics.get(calls, {"operation": "AppendBlock", "outcome": "ok"}), 2)
        self.assertEqual(
            metrics.get(calls, {"operation": "AppendBlock", "outcome": "transient"}), 1
        )
        self.assertEqual(
            metrics.get(calls, {"operation": "AppendBlock", "outcome": "conflict"}), 1
        )


class ExpectContinueMetricsTests(RawCase):
    """A body refused before it is read is counted too."""

    def test_refused_before_the_body(self) -> None:
        """A 413 to ``Expect: 100-continue`` over the limit counts one too_large."""
        channel, _ = self.connect()
        channel.dataReceived(
            b"POST /log HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        )
        self.assertEqual(
            self.site.metrics.get("loghandler_messages_total", {"result": "too_large"}), 1
        )
