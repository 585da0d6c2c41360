"""
Tests for :mod:`loghandler.web` through ``StubTreq`` with the real ``LogSite`` (its
body limit, no form parsing): status codes, JSON bodies, and what reaches storage
(the S3 writer over the in-memory S3, objects read back line by line).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.interfaces import StorageError
from loghandler.keys import key_for
from loghandler.message import Limits
from loghandler.registry import StreamRegistry, StreamSettings
from loghandler.retry import RetryLayer
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.writer import S3ObjectStore
from loghandler.web import BoundedBody, make_site
from tests.helpers import DAY_START_MS, read_lines

NOW_MS = DAY_START_MS + 3_600_000
MAX_BODY = 1024
PART = 16 * 1024


def body(**fields: Any) -> bytes:
    """A JSON message body; defaults make a valid one."""
    values: dict[str, Any] = {
        "text": "hello world",
        "content_id": 17,
        "client_id": 3,
        "timestamp": NOW_MS,
    }
    values.update(fields)
    return json.dumps(values).encode()


class WebCase(SynchronousTestCase):
    """A site over a registry and a memory store, driven by StubTreq."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.mem = MemoryStore(min_part_size=PART, now=self.clock.seconds)
        budget = MemoryBudget(256 * 1024 * 1024)
        # Retries after a permanent failure wait 60 s at most (their upper bound).
        retry = RetryLayer(
            self.clock, permanent_backoff=Backoff(base=5.0, cap=60.0, uniform=lambda a, b: b)
        )
        self.store = S3ObjectStore(self.mem, self.clock, budget, part_size=PART, retry=retry)
        self.registry = StreamRegistry(
            self.store,
            self.clock,
            StreamSettings(part_size=PART, lifetime_s=60),
            budget,
            uniform=lambda a, b: b,
        )
        site = self.site = make_site(self.registry, Limits(), lambda: NOW_MS, MAX_BODY)
        self.client = StubTreq(site.resource)
        # Serve through our own Site (body limit, no form parsing), not treq's plain one.
        site.reactor = self.client._agent._memoryReactor
        self.client._agent._serverFactory = site

    def request(
        self, method: str, path: str, data: Optional[bytes] = None, headers: Any = None
    ) -> tuple[int, Headers, Any]:
        """Send a request; answer (status, headers, parsed JSON body)."""
        response = self.successResultOf(
            self.client.request(method, "http://example.test" + path, data=data, headers=headers)
        )
        content = self.successResultOf(self.client.content(response))
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json"], content
        )
        return response.code, response.headers, json.loads(content)

    def stored_lines(self) -> list[bytes]:
        """Complete every object and read back the one key the tests use."""
        self.successResultOf(self.registry.close_all())
        key = key_for(NOW_MS, 3)
        self.assertLessEqual(set(self.mem.objects), {key})
        return read_lines(self.mem.body(key)) if key in self.mem.objects else []


class PostTests(WebCase):
    """POST /log."""

    def test_accepted(self) -> None:
        """A valid message gets 200 {"ok": true} and is stored as its canonical line."""
        status, _, answer = self.request("POST", "/log", body(text="héllo"))
        self.assertEqual((status, answer), (200, {"ok": True}))
        self.assertEqual(
            self.stored_lines(),
            [
                b'{"text":"h\xc3\xa9llo","content_id":17,"client_id":3,"timestamp":%d}\n'
                % NOW_MS
            ],
        )

    def test_form_content_type_not_parsed(self) -> None:
        """A form Content-Type does not change anything: the body is read as JSON."""
        status, _, _ = self.request(
            "POST",
            "/log",
            body(),
            headers={b"content-type": [b"application/x-www-form-urlencoded"]},
        )
        self.assertEqual(status, 200)
        self.assertEqual(len(self.stored_lines()), 1)

    def test_bad_body(self) -> None:
        """A bad body gets 400 with error and field, and nothing is stored."""
        status, _, answer = self.request("POST", "/log", body(content_id=True))
        self.assertEqual(status, 400)
        self.assertEqual(answer, {"error": "content_id must be an integer", "field": "content_id"})
        self.assertEqual(self.stored_lines(), [])

    def test_too_large(self) -> None:
        """A body over the limit gets 413 and nothing is stored."""
        status, _, answer = self.request("POST", "/log", body(text="x" * MAX_BODY))
        self.assertEqual(status, 413)
        self.assertEqual(answer, {"error": "body is larger than %d bytes" % MAX_BODY, "field": None})
        self.assertEqual(self.stored_lines(), [])

    def test_body_kept_in_memory_and_cut(self) -> None:
        """
        The site keeps bodies in a BoundedBody (never a temporary file) that stops
        storing at the limit.
        """
        bodies: list[BoundedBody] = []
        real = self.site.getContentFile

        def record(length: Optional[int]) -> BoundedBody:
            bodies.append(real(length))
            return bodies[-1]

        self.site.getContentFile = record  # type: ignore[method-assign]
        self.assertEqual(self.request("POST", "/log", b"x" * (MAX_BODY * 200))[0], 413)
        self.assertEqual(len(bodies), 1)
        self.assertTrue(bodies[0].overflowed)

    def test_bounded_body_chunks(self) -> None:
        """Without a Content-Length, chunks are kept up to the limit, then dropped."""
        content = BoundedBody(10, None)
        content.write(b"12345")
        content.write(b"67890")
        self.assertFalse(content.overflowed)
        content.write(b"1")
        self.assertTrue(content.overflowed)
        self.assertEqual(content.getvalue(), b"1234567890")

    def test_exactly_at_limit(self) -> None:
        """A valid body of exactly the limit is accepted."""
        data = body(text="")
        data = body(text="x" * (MAX_BODY - len(data)))
        self.assertEqual(len(data), MAX_BODY)
        status, _, _ = self.request("POST", "/log", data)
        self.assertEqual(status, 200)

    def test_stopping(self) -> None:
        """While stopping, 503 with Retry-After and a reason."""
        self.registry.close_all()
        status, headers, answer = self.request("POST", "/log", body())
        self.assertEqual(status, 503)
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"5"])
        self.assertEqual(answer["error"], "server is stopping")

    def test_accepted_data_survives_bad_requests(self) -> None:
        """Bad requests between good ones leave the accepted lines intact."""
        self.assertEqual(self.request("POST", "/log", body(content_id=1))[0], 200)
        self.assertEqual(self.request("POST", "/log", b"\xff\xfe")[0], 400)
        self.assertEqual(self.request("POST", "/log", b"{" * 2000)[0], 413)
        self.assertEqual(self.request("POST", "/log", b"[" * 1000)[0], 400)
        self.assertEqual(self.request("POST", "/log", body(content_id=2))[0], 200)
        self.assertEqual(
            [json.loads(line)["content_id"] for line in self.stored_lines()], [1, 2]
        )


class RoutingTests(WebCase):
    """Methods and paths other than POST /log."""

    def test_get_log_405(self) -> None:
        """GET /log is 405 with Allow: POST."""
        status, headers, answer = self.request("GET", "/log")
        self.assertEqual(status, 405)
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"POST"])
        self.assertEqual(answer["field"], None)

    def test_put_log_405(self) -> None:
        """PUT /log is 405 too."""
        self.assertEqual(self.request("PUT", "/log", body())[0], 405)

    def test_not_found(self) -> None:
        """Other paths, below /log too, are JSON 404s."""
        for path in ("/", "/logs", "/log/x", "/chat/2020-03-30"):
            status, _, answer = self.request("POST", path, body())
            self.assertEqual((status, answer["error"]), (404, "not found"), path)

    def test_health(self) -> None:
        """/healthz is 200 while running and 503 once stopping."""
        status, _, answer = self.request("GET", "/healthz")
        self.assertEqual((status, answer["status"]), (200, "ok"))
        self.registry.close_all()
        status, _, answer = self.request("GET", "/healthz")
        self.assertEqual((status, answer["status"]), (503, "stopping"))

    def test_health_buffers_full(self) -> None:
        """/healthz is 503 'buffers full' while the budget is spent, with the counts."""
        self.mem.hold("PutObject")
        self.assertEqual(self.request("POST", "/log", body())[0], 200)
        self.clock.advance(60)
        self.registry.budget.change(self.registry.budget.limit)
        status, _, answer = self.request("GET", "/healthz")
        self.assertEqual((status, answer["status"]), (503, "buffers full"))
        self.assertEqual((answer["open_objects"], answer["completing_objects"]), (0, 1))
        self.registry.budget.change(-self.registry.budget.limit)
        self.assertEqual(self.request("GET", "/healthz")[0], 200)

    def test_health_storage_not_reachable(self) -> None:
        """/healthz is 503 'storage not reachable' until the store was reached."""
        self.registry.ready = False
        status, _, answer = self.request("GET", "/healthz")
        self.assertEqual((status, answer["status"]), (503, "storage not reachable"))

    def test_health_storage_failing(self) -> None:
        """
        While storage answers 403 (a permanent failure only an operator can fix),
        /healthz is 503 with the reason and the error is logged once; messages are
        still held and stored once storage takes them, and /healthz is 200 again.
        """
        self.mem.fail("PutObject", StorageError("PutObject", 403, "AccessDenied"), times=3)
        self.assertEqual(self.request("POST", "/log", body(content_id=1))[0], 200)
        with capturedLogs() as events:
            self.clock.advance(60)  # rotation: the staging write is refused
            status, _, answer = self.request("GET", "/healthz")
            self.assertEqual(status, 503)
            self.assertEqual(answer["status"], "storage failing: PutObject fails: 403 AccessDenied")
            self.assertEqual(answer["completing_objects"], 1)
            self.clock.advance(60)  # refused again
            self.assertEqual(self.request("GET", "/healthz")[0], 503)
            self.clock.advance(60)  # refused a third time
            self.assertEqual(self.request("GET", "/healthz")[0], 503)
            self.clock.advance(60)  # taken
        texts = [e.get("log_format") or "" for e in events]
        self.assertEqual(len([t for t in texts if "until this is fixed" in t]), 1, texts)
        self.assertEqual(len([t for t in texts if "storage works again" in t]), 1, texts)
        status, _, answer = self.request("GET", "/healthz")
        self.assertEqual((status, answer["status"]), (200, "ok"))
        self.assertEqual(answer["completing_objects"], 0)
        self.assertEqual([json.loads(line)["content_id"] for line in self.stored_lines()], [1])

    def test_health_below_404(self) -> None:
        """Paths below /healthz are JSON 404s."""
        self.assertEqual(self.request("GET", "/healthz/x")[0], 404)

    def test_health_post_405(self) -> None:
        """POST /healthz is a JSON 405 with Allow."""
        status, headers, answer = self.request("POST", "/healthz", b"{}")
        self.assertEqual(status, 405)
        self.assertEqual(headers.getRawHeaders(b"allow"), [b"GET, HEAD"])


class DurableAckTests(WebCase):
    """ACK=durable: 200 only once the message is in storage."""

    def setUp(self) -> None:
        super().setUp()
        site = self.site = make_site(
            self.registry, Limits(), lambda: NOW_MS, MAX_BODY, durable_timeout_s=5.0, clock=self.clock
        )
        self.client = StubTreq(site.resource)
        site.reactor = self.client._agent._memoryReactor
        self.client._agent._serverFactory = site

    def post(self) -> Any:
        """Start a POST; its response Deferred (not yet answered, maybe)."""
        return self.client.request("POST", "http://example.test/log", data=body())

    def answer(self, d: Any) -> tuple[int, Any]:
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(self.client.content(response)))

    def staged_lines(self) -> list[bytes]:
        ((upload_id, upload),) = self.mem.uploads.items()
        return read_lines(b"".join(body for _, (body, _) in sorted(upload.parts.items())))

    def test_200_once_checkpoint_landed(self) -> None:
        """The answer waits for the checkpoint; 200 once it is in storage."""
        self.mem.hold("UploadPart")
        d = self.post()
        self.client.flush()
        self.assertNoResult(d)
        self.mem.release()
        self.client.flush()
        self.assertEqual(self.answer(d), (200, {"ok": True}))
        self.assertEqual(len(self.staged_lines()), 1)

    def test_202_when_storage_is_slow(self) -> None:
        """
        A checkpoint that does not land within DURABLE_TIMEOUT_S gets 202 with
        durable false, and the message is still stored afterwards.
        """
        self.mem.hold("UploadPart")
        d = self.post()
        self.client.flush()
        self.clock.advance(5.0)
        self.client.flush()
        self.assertEqual(self.answer(d), (202, {"ok": True, "durable": False}))
        self.mem.release()
        self.assertEqual(len(self.stored_lines()), 1)

    def test_group_commit(self) -> None:
        """
        Requests that come while a checkpoint is in flight share the next one: two
        checkpoints for three requests, each answered 200 after the one holding it.
        """
        self.mem.hold("UploadPart")
        first = self.post()
        self.client.flush()
        second, third = self.post(), self.post()
        self.client.flush()
        self.assertEqual([h.operation for h in self.mem.held], ["UploadPart"])
        self.mem.release(1)
        self.client.flush()
        self.assertEqual(self.answer(first)[0], 200)
        self.assertNoResult(second)
        self.assertEqual([h.operation for h in self.mem.held], ["UploadPart"])
        self.mem.release()
        self.client.flush()
        self.assertEqual([self.answer(d)[0] for d in (second, third)], [200, 200])
        self.assertEqual(len(self.staged_lines()), 3)

    def test_500_when_lost(self) -> None:
        """A message whose stream gave up before storing it is answered 500."""
        self.mem.hold("UploadPart")
        self.mem.hold("CreateMultipartUpload")
        d = self.post()
        self.client.flush()
        flushing = self.registry.close_all()
        with capturedLogs():
            flushing.cancel()  # the shutdown deadline
        self.client.flush()
        self.failureResultOf(flushing)
        code, answer = self.answer(d)
        self.assertEqual(code, 500)
        self.assertEqual(answer["error"], "storage failed; the message was not stored")
