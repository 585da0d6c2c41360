"""
Tests for :mod:`loghandler.web` through ``StubTreq`` with the real ``LogSite`` (its
body limit, no form parsing): status codes, JSON bodies, and what reaches storage
(the S3 writer over the in-memory S3, objects read back line by line).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.keys import key_for
from loghandler.message import Limits
from loghandler.registry import StreamRegistry, StreamSettings
from loghandler.retry import RetryLayer
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.writer import S3ObjectStore
from loghandler.web import BoundedBody, LogChannel, LogSite, make_site
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
        self.serve(make_site(self.registry, Limits(), lambda: NOW_MS, MAX_BODY))

    def serve_site(self, **options: Any) -> None:
        """Serve a new site over the test's registry, with ``make_site``'s ``options``."""
        self.serve(make_site(self.registry, Limits(), lambda: NOW_MS, MAX_BODY, **options))

    def serve(self, site: LogSite) -> None:
        """Send the requests to ``site``."""
        self.site = site
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
        self.assertEqual(answer, {"error": "body is larger than %d bytes (MAX_BODY_BYTES)" % MAX_BODY, "field": None})
        self.assertEqual(self.stored_lines(), [])

    def test_body_kept_in_memory_and_cut(self) -> None:
        """
        The site keeps bodies in a BoundedBody (never a temporary file) that stops
        storing at the limit.
        """
        bodies: list[BoundedBody] = []
        real = self.site.getContentFile

        def record(length: Optional[int], batch: bool = False) -> BoundedBody:
            bodies.append(real(length, batch))
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

    def test_unexpected_error_is_500_and_logged(self) -> None:
        """
        A registry that fails in an unexpected way: 500 with a JSON reason and the
        failure logged with its traceback, for a message and for a batch.
        """

        def broken(*args: Any) -> Any:
            raise RuntimeError("boom")

        self.patch(self.registry, "accept", broken)
        self.patch(self.registry, "accept_batch", broken)
        for data, headers, failed, kept in [
            (body(), None, "accepting a message failed", "the message was not kept"),
            (body() + b"\n", NDJSON, "accepting a batch failed", "the batch was not kept whole"),
        ]:
            with capturedLogs() as events:
                status, _, answer = self.request("POST", "/log", data, headers)
            self.assertEqual((status, answer["error"]), (500, "internal error; " + kept))
            logged = [e for e in events if e.get("event") == "request_failed"]
            self.assertEqual([formatEvent(e) for e in logged], [failed])
            self.assertEqual(len(logged), 1)
            self.assertIsInstance(logged[0]["log_failure"].value, RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

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


class DurableCase(WebCase):
    """A site with ACK=durable (5 s) on the test's clock."""

    def setUp(self) -> None:
        super().setUp()
        self.serve_site(durable_timeout_s=5.0, clock=self.clock)


class DurableAckTests(DurableCase):
    """ACK=durable: 200 only once the message is in storage."""

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


BATCH_BYTES = 4096
BATCH_LINES = 5
NDJSON = {b"content-type": [b"application/x-ndjson"]}


def batch(*lines: bytes, end: bytes = b"\n") -> bytes:
    """An NDJSON body of ``lines``."""
    return b"\n".join(lines) + end


def batch_of(count: int, **fields: Any) -> bytes:
    """``count`` valid lines, content_id 1 to ``count``."""
    return batch(*(body(content_id=i, **fields) for i in range(1, count + 1)))


class BatchTests(WebCase):
    """POST /log with Content-Type application/x-ndjson: many messages, all or none."""

    def setUp(self) -> None:
        super().setUp()
        self.serve(
            make_site(
                self.registry,
                Limits(),
                lambda: NOW_MS,
                MAX_BODY,
                batch_max_bytes=BATCH_BYTES,
                batch_max_lines=BATCH_LINES,
            )
        )

    def post(self, data: bytes, content_type: bytes = b"application/x-ndjson") -> Any:
        """POST a batch; (status, headers, JSON answer)."""
        return self.request("POST", "/log", data, headers={b"content-type": [content_type]})

    def test_accepted(self) -> None:
        """Every line is stored, in order; 200 with the count."""
        status, _, answer = self.post(batch_of(3))
        self.assertEqual((status, answer), (200, {"ok": True, "accepted": 3}))
        self.assertEqual(
            [json.loads(line)["content_id"] for line in self.stored_lines()], [1, 2, 3]
        )

    def test_content_type_parameters_and_case(self) -> None:
        """Parameters and case of the Content-Type do not matter; no final newline is fine."""
        data = batch(body(content_id=1), body(content_id=2), end=b"")
        for content_type in (b"Application/X-NDJSON; charset=utf-8", b"application/x-ndjson"):
            status, _, answer = self.post(data, content_type)
            self.assertEqual((status, answer), (200, {"ok": True, "accepted": 2}), content_type)
        self.assertEqual(len(self.stored_lines()), 4)

    def test_crlf(self) -> None:
        """Lines may end in CRLF."""
        status, _, answer = self.post(batch(body(content_id=1), body(content_id=2), end=b"\r\n"))
        self.assertEqual((status, answer), (200, {"ok": True, "accepted": 2}))

    def test_one_line(self) -> None:
        """A batch of one line is a batch: the count in the answer."""
        status, _, answer = self.post(body())
        self.assertEqual((status, answer), (200, {"ok": True, "accepted": 1}))

    def test_not_batch_is_one_message(self) -> None:
        """Two lines without the NDJSON Content-Type are one (invalid) body, as before."""
        status, _, answer = self.post(batch_of(2), b"application/json")
        self.assertEqual(status, 400)
        self.assertNotIn("line", answer)
        self.assertEqual(self.stored_lines(), [])

    def test_bad_line_rejects_all(self) -> None:
        """One bad line: 400 naming its line (from 1) and field; nothing is stored."""
        data = batch(body(content_id=1), body(content_id=2), body(content_id=True))
        status, _, answer = self.post(data)
        self.assertEqual(status, 400)
        self.assertEqual(
            answer,
            {"error": "content_id must be an integer", "field": "content_id", "line": 3},
        )
        self.assertEqual(self.stored_lines(), [])

    def test_bad_json_line(self) -> None:
        """A line that is not JSON: the single path's error, with the line."""
        status, _, answer = self.post(batch(body(), b"{", body()))
        self.assertEqual(status, 400)
        self.assertEqual((answer["field"], answer["line"]), (None, 2))
        self.assertTrue(answer["error"].startswith("body is not valid JSON"), answer)
        self.assertEqual(self.stored_lines(), [])

    def test_byte_order_mark(self) -> None:
        """
        A body (or a batch) that starts with a UTF-8 byte order mark gets a 400 that
        names the mark, not the JSON parser's "Expecting value"; nothing is stored.
        """
        bom = b"\xef\xbb\xbf"
        error = "body starts with a UTF-8 byte order mark (EF BB BF); send the JSON without it"
        status, _, answer = self.request("POST", "/log", bom + body())
        self.assertEqual((status, answer), (400, {"error": error, "field": None}))
        status, _, answer = self.post(bom + batch(body(), body()))
        self.assertEqual((status, answer), (400, {"error": error, "field": None, "line": 1}))
        self.assertEqual(self.stored_lines(), [])

    def test_blank_line_in_the_middle(self) -> None:
        """A blank line other than the final newline is an error with its number."""
        for data, line in (
            (batch(body(), b"", body()), 2),
            (batch(body(), b"  ", body()), 2),
            (batch(body(), body()) + b"\n", 3),
            (b"\n" + batch(body()), 1),
        ):
            status, _, answer = self.post(data)
            self.assertEqual(
                (status, answer),
                (400, {"error": "line is empty", "field": None, "line": line}),
                data,
            )
        self.assertEqual(self.stored_lines(), [])

    def test_empty(self) -> None:
        """An empty body (or a lone newline) is 400 'body is empty'."""
        for data in (b"", b"\n", b" "):
            status, _, answer = self.post(data)
            self.assertEqual((status, answer), (400, {"error": "body is empty", "field": None}))

    def test_too_many_lines(self) -> None:
        """More than BATCH_MAX_LINES lines: 413 naming it; exactly that many is fine."""
        status, _, answer = self.post(batch_of(BATCH_LINES + 1))
        self.assertEqual(status, 413)
        self.assertEqual(
            answer, {"error": "batch has more than 5 lines (BATCH_MAX_LINES)", "field": None}
        )
        self.assertEqual(self.registry.open_keys, [])
        self.assertEqual(self.post(batch_of(BATCH_LINES))[0], 200)
        self.assertEqual(len(self.stored_lines()), BATCH_LINES)

    def test_larger_than_max_body(self) -> None:
        """A batch may be larger than MAX_BODY_BYTES (each line not), up to BATCH_MAX_BYTES."""
        data = batch_of(5, text="x" * 400)
        self.assertGreater(len(data), MAX_BODY)
        self.assertLess(len(data), BATCH_BYTES)
        self.assertEqual(self.post(data)[0], 200)
        self.assertEqual(len(self.stored_lines()), 5)

    def test_too_large(self) -> None:
        """
        A body over BATCH_MAX_BYTES: 413 naming it, and the body was cut at that
        limit while being read; a single message keeps MAX_BODY_BYTES.
        """
        bodies: list[BoundedBody] = []
        real = self.site.getContentFile

        def record(length: Optional[int], batch: bool = False) -> BoundedBody:
            bodies.append(real(length, batch))
            return bodies[-1]

        self.site.getContentFile = record  # type: ignore[method-assign]
        status, _, answer = self.post(batch_of(4, text="x" * 1200))
        self.assertEqual(status, 413)
        self.assertEqual(
            answer,
            {"error": "batch body is larger than 4096 bytes (BATCH_MAX_BYTES)", "field": None},
        )
        self.assertEqual((bodies[0].limit, bodies[0].overflowed), (BATCH_BYTES, True))
        status, _, answer = self.post(body(text="x" * 2000), b"application/json")
        self.assertEqual(status, 413)
        self.assertEqual(bodies[1].limit, MAX_BODY)
        self.assertEqual(self.stored_lines(), [])

    def test_line_over_max_body(self) -> None:
        """Each line is held to MAX_BODY_BYTES: 413 naming the line; nothing stored."""
        data = batch(body(content_id=1), body(content_id=2, text="x" * MAX_BODY))
        status, _, answer = self.post(data)
        self.assertEqual(status, 413)
        self.assertEqual(
            answer,
            {"error": "line is larger than 1024 bytes (MAX_BODY_BYTES)", "field": None, "line": 2},
        )
        self.assertEqual(self.stored_lines(), [])

    def test_many_keys(self) -> None:
        """Lines for several clients go to their own objects."""
        data = batch(
            body(client_id=3, content_id=1),
            body(client_id=4, content_id=2),
            body(client_id=3, content_id=3),
        )
        self.assertEqual(self.post(data)[0], 200)
        self.successResultOf(self.registry.close_all())
        for client_id, content_ids in ((3, [1, 3]), (4, [2])):
            lines = read_lines(self.mem.body(key_for(NOW_MS, client_id)))
            self.assertEqual([json.loads(line)["content_id"] for line in lines], content_ids)

    def test_budget_too_small_accepts_nothing(self) -> None:
        """
        When the budget left cannot take the whole batch (though it is not spent), 503
        with Retry-After and nothing of the batch is kept; a single message still is.
        """
        budget = self.registry.budget
        room = 1000
        budget.change(budget.limit - budget.held - room)
        status, headers, answer = self.post(batch_of(3))
        self.assertEqual(status, 503)
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual(answer["error"], "buffers are too full for this batch")
        self.assertEqual(self.registry.open_keys, [])
        self.assertEqual(self.request("POST", "/log", body(content_id=9))[0], 200)
        budget.change(-(budget.limit - room))
        self.assertEqual([json.loads(line)["content_id"] for line in self.stored_lines()], [9])

    def test_key_backed_up_accepts_nothing(self) -> None:
        """A line for a key whose uploads are backed up: 503, the other keys' lines not kept."""
        self.assertEqual(self.request("POST", "/log", body(client_id=3, content_id=1))[0], 200)
        self.registry._open[key_for(NOW_MS, 3)].admission.pauseProducing()
        data = batch(body(client_id=4, content_id=2), body(client_id=3, content_id=3))
        status, _, answer = self.post(data)
        self.assertEqual((status, answer["error"]), (503, "uploads for this object are backed up"))
        self.assertEqual(self.registry.open_keys, [key_for(NOW_MS, 3)])

    def test_stopping(self) -> None:
        """While stopping, 503 with Retry-After 5."""
        self.registry.close_all()
        status, headers, answer = self.post(batch_of(2))
        self.assertEqual((status, answer["error"]), (503, "server is stopping"))
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"5"])


class BatchDurableTests(DurableCase):
    """ACK=durable for a batch: 200 once every stream it touched stored its last line."""

    def post(self) -> Any:
        """Start a batch POST of three lines, for clients 3 and 4."""
        data = batch(
            body(client_id=3, content_id=1),
            body(client_id=4, content_id=2),
            body(client_id=3, content_id=3),
        )
        return self.client.request("POST", "http://example.test/log", data=data, headers=NDJSON)

    def answer(self, d: Any) -> tuple[int, Any]:
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(self.client.content(response)))

    def test_200_once_every_key_stored(self) -> None:
        """One checkpoint per key; the answer waits for both."""
        self.mem.hold("UploadPart")
        d = self.post()
        self.client.flush()
        self.assertEqual([h.operation for h in self.mem.held], ["UploadPart"] * 2)
        self.mem.release(1)
        self.client.flush()
        self.assertNoResult(d)
        self.mem.release()
        self.client.flush()
        self.assertEqual(self.answer(d), (200, {"ok": True, "accepted": 3}))

    def test_202_when_storage_is_slow(self) -> None:
        """A key not stored within DURABLE_TIMEOUT_S: 202, durable false; stored later."""
        self.mem.hold("UploadPart")
        d = self.post()
        self.client.flush()
        self.mem.release(1)
        self.client.flush()
        self.clock.advance(5.0)
        self.client.flush()
        self.assertEqual(self.answer(d), (202, {"ok": True, "durable": False}))
        self.mem.release()
        self.successResultOf(self.registry.close_all())
        self.assertEqual(len(read_lines(self.mem.body(key_for(NOW_MS, 3)))), 2)
        self.assertEqual(len(read_lines(self.mem.body(key_for(NOW_MS, 4)))), 1)

    def test_500_when_lost(self) -> None:
        """A batch one of whose streams gave up before storing it is answered 500."""
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
        self.assertEqual(answer["error"], "storage failed; messages of the batch were not stored")


class RawCase(WebCase):
    """A ``LogChannel`` of the site on a ``StringTransport``: the bytes as sent and answered."""

    def setUp(self) -> None:
        super().setUp()
        self.serve_site(batch_max_bytes=4 * MAX_BODY)

    def connect(self) -> tuple[LogChannel, StringTransport]:
        """A new connection to the site."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(channel, LogChannel)
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        return channel, transport

    def answer(self, transport: StringTransport) -> tuple[int, dict[str, str], Any]:
        """The one response written: (status, headers in lower case, parsed JSON body)."""
        head, _, content = transport.value().partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines)
        self.assertEqual(int(headers["content-length"]), len(content))
        return int(status_line.split()[1]), headers, json.loads(content)


class HeadLimitTests(RawCase):
    """
    A request line over 16 KiB is 414 and a header block over 16 KiB (or over 500
    fields) is 431, a request that is not HTTP 400, each with a JSON body and the
    connection closed, where twisted.web closed it without an answer or answered a
    bare 400.
    """

    def assertRefused(self, data: bytes, status: int, error: str) -> None:
        """
        Sending ``data`` gets ``status`` with ``error``, Connection: close, then the
        close; counted in loghandler_refused_requests_total by its status.
        """
        labels = {"status": str(status)}
        before = self.site.metrics.get("loghandler_refused_requests_total", labels)
        channel, transport = self.connect()
        channel.dataReceived(data)
        self.assertEqual(
            self.site.metrics.get("loghandler_refused_requests_total", labels), before + 1
        )
        got, headers, answer = self.answer(transport)
        self.assertEqual((got, answer), (status, {"error": error, "field": None}))
        self.assertEqual(
            (headers["content-type"], headers["connection"]), ("application/json", "close")
        )
        self.assertTrue(transport.disconnecting)

    def test_request_line_too_long(self) -> None:
        """A request line over 16,384 bytes: 414, whether its end came or not."""
        target = b"/log?" + b"x" * (16385 - len(b"POST /log? HTTP/1.1"))
        line = b"POST " + target + b" HTTP/1.1"
        self.assertEqual(len(line), 16385)
        error = "request line is longer than 16384 bytes"
        self.assertRefused(line + b"\r\nHost: x\r\n\r\n", 414, error)
        # Without its end: as soon as no end can come within the limit.
        self.assertRefused(line + b"x", 414, error)

    def test_request_line_at_the_limit(self) -> None:
        """A request line of exactly 16,384 bytes is read (a 404 for its unknown path)."""
        line = b"GET /" + b"x" * (16384 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
        self.assertEqual(len(line), 16384)
        channel, transport = self.connect()
        channel.dataReceived(line + b"\r\n\r\n")
        self.assertEqual(self.answer(transport)[0], 404)

    def test_header_block_too_large(self) -> None:
        """Headers of 17 KiB in many fields, or in one field, are 431."""
        error = "request header block is larger than 16384 bytes"
        many = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"y" * 100) for n in range(160))
        self.assertRefused(b"POST /log HTTP/1.1\r\n" + many + b"\r\n", 431, error)
        one = b"X-Big: " + b"y" * 17000 + b"\r\n"
        self.assertRefused(b"POST /log HTTP/1.1\r\n" + one + b"\r\n", 431, error)

    def test_too_many_header_fields(self) -> None:
        """501 small header fields are 431."""
        fields = b"".join(b"X-%d: 1\r\n" % n for n in range(501))
        self.assertRefused(
            b"POST /log HTTP/1.1\r\n" + fields + b"\r\n", 431, "more than 500 header fields"
        )

    def test_not_http(self) -> None:
        """A request line that is not HTTP, or a header without a colon, is a JSON 400."""
        self.assertRefused(b"HELLO\r\n\r\n", 400, "malformed HTTP request")
        self.assertRefused(
            b"POST /log HTTP/1.1\r\nno colon\r\n\r\n", 400, "malformed HTTP request"
        )


class ExpectContinueTests(RawCase):
    """
    ``Expect: 100-continue`` with a Content-Length over the limit (``MAX_BODY_BYTES``,
    or ``BATCH_MAX_BYTES`` for a batch) is answered 413 at once: no ``100 Continue``,
    the body not read, the connection closed.  Within the limit the client is told
    to go on.
    """

    def head(self, length: int, content_type: bytes = b"application/json") -> bytes:
        return (
            b"POST /log HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n" % (content_type, length)
        )

    def test_over_the_limit(self) -> None:
        """One byte over MAX_BODY_BYTES: 413 naming the limit, never 100 Continue."""
        channel, transport = self.connect()
        channel.dataReceived(self.head(MAX_BODY + 1))
        self.assertNotIn(b"100 Continue", transport.value())
        status, headers, answer = self.answer(transport)
        self.assertEqual(
            (status, answer),
            (413, {"error": "body is larger than %d bytes (MAX_BODY_BYTES)" % MAX_BODY, "field": None}),
        )
        self.assertEqual(headers["connection"], "close")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.stored_lines(), [])

    def test_batch_over_its_limit(self) -> None:
        """A batch over BATCH_MAX_BYTES: 413 naming BATCH_MAX_BYTES at once."""
        channel, transport = self.connect()
        channel.dataReceived(self.head(4 * MAX_BODY + 1, b"application/x-ndjson"))
        self.assertNotIn(b"100 Continue", transport.value())
        status, _, answer = self.answer(transport)
        self.assertEqual(status, 413)
        self.assertIn("(BATCH_MAX_BYTES)", answer["error"])
        self.assertTrue(transport.disconnecting)

    def test_within_the_limit(self) -> None:
        """
        At the limit (and a batch over MAX_BODY_BYTES but within its own), 100
        Continue, then the body is read and answered.
        """
        message = body()
        padded = message[:-1] + b" " * (MAX_BODY - len(message)) + b"}"
        channel, transport = self.connect()
        channel.dataReceived(self.head(len(padded)))
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        transport.clear()
        channel.dataReceived(padded)
        self.assertEqual(self.answer(transport)[:1], (200,))
        lines = batch(*[body(content_id=n) for n in range(1, 30)])
        self.assertGreater(len(lines), MAX_BODY)
        channel, transport = self.connect()
        channel.dataReceived(self.head(len(lines), b"application/x-ndjson"))
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        transport.clear()
        channel.dataReceived(lines)
        self.assertEqual(self.answer(transport)[2], {"ok": True, "accepted": 29})
        self.assertFalse(transport.disconnecting)

    def test_without_expect(self) -> None:
        """Without Expect, a body over the limit is read and then answered 413, as before."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /log HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        )
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"x" * (MAX_BODY + 1))
        self.assertEqual(self.answer(transport)[0], 413)
        self.assertFalse(transport.disconnecting)
