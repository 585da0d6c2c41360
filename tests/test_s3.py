"""
Unit tests of :mod:`loghandler.storage.s3`, without a network: the store's requests go
through ``treq.testing.StubTreq`` to a scripted fake S3 resource that records them.
Signatures are checked by an independent Signature Version 4 verifier written here
from AWS's description, not by botocore.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from datetime import datetime, timezone
from typing import Any, Callable, Optional
from urllib.parse import quote, unquote

import attrs
import botocore.auth
from botocore.credentials import Credentials
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface.verify import verifyObject

from loghandler.interfaces import (
    CompletedPart,
    IObjectStore,
    ObjectInfo,
    PendingUpload,
    PreconditionFailed,
    StorageError,
    StoredPart,
)
from loghandler.storage import s3
from loghandler.storage.s3 import S3Store, build_s3_store

ENDPOINT = "https://s3.eu-west-1.amazonaws.com"
BUCKET = "logs-bucket"
REGION = "eu-west-1"
ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
NS = ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
#: 2026-01-31T12:00:00Z, the test clock's start.
START = 1769860800.0
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@attrs.frozen
class Received:
    """
    One request as the fake S3 received it.

    :ivar method: e.g. ``PUT``.
    :ivar uri: the request target as sent, path and query, percent-encoded.
    :ivar headers: lowercase name -> all values.
    :ivar body: the request body.
    """

    method: str
    uri: str
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        """
        The single value of header ``name`` (None when absent; fails when repeated).
        """
        values = self.headers.get(name.lower())
        if values is None:
            return None
        assert len(values) == 1, (name, values)
        return values[0]


Answer = tuple[int, dict[str, str], bytes]


class FakeS3(Resource):
    """
    Records every request and answers with the next scripted ``(status, headers,
    body)``; for HEAD the body only sets Content-Length.
    """

    isLeaf = True

    def __init__(self, answers: list[Answer]):
        super().__init__()
        self.answers = list(answers)
        self.received: list[Received] = []

    def render(self, request: Request) -> bytes:
        """
        Record ``request``, answer with the next scripted answer.
        """
        headers: dict[str, list[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers.setdefault(name.decode().lower(), []).extend(v.decode() for v in values)
        assert request.method is not None and request.uri is not None
        self.received.append(
            Received(request.method.decode(), request.uri.decode(), headers, request.content.read())
        )
        status, answer_headers, body = self.answers.pop(0)
        request.setResponseCode(status)
        for name, value in answer_headers.items():
            request.setHeader(name, value)
        return body


def verify_sigv4(
    received: Received,
    secret: str = SECRET_KEY,
    region: str = REGION,
    access_key: str = ACCESS_KEY,
) -> str:
    """
    Check ``received``'s Authorization as S3 would (Signature Version 4,
    https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html),
    and that X-Amz-Content-SHA256 is the body's hash.  Returns the signed header
    names, ``;``-joined.

    :raises AssertionError: when anything does not match.
    """
    authorization = received.header("authorization")
    assert authorization is not None, "no Authorization header"
    algorithm, _, rest = authorization.partition(" ")
    assert algorithm == "AWS4-HMAC-SHA256", algorithm
    fields = dict(item.strip().split("=", 1) for item in rest.split(","))
    credential = fields["Credential"].split("/")
    assert credential[0] == access_key, credential
    date = credential[1]
    assert credential[2:] == [region, "s3", "aws4_request"], credential
    amz_date = received.header("x-amz-date")
    assert amz_date is not None and amz_date[:8] == date
    payload = received.header("x-amz-content-sha256")
    assert payload == hashlib.sha256(received.body).hexdigest(), "payload hash"

    path, _, query = received.uri.partition("?")
    canonical_uri = quote(unquote(path), safe="/-_.~")
    pairs = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        pairs.append((quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    canonical_query = "&".join(f"{n}={v}" for n, v in sorted(pairs))
    signed = fields["SignedHeaders"].split(";")
    assert signed == sorted(signed)
    canonical_headers = "".join(
        f"{name}:{','.join(' '.join(v.split()) for v in received.headers[name])}\n"
        for name in signed
    )
    canonical_request = "\n".join(
        [received.method, canonical_uri, canonical_query, canonical_headers,
         fields["SignedHeaders"], payload]
    )
    scope = f"{date}/{region}/s3/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope,
         hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = ("AWS4" + secret).encode()
    for part in (date, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    assert fields["Signature"] == expected, "signature mismatch"
    return fields["SignedHeaders"]


def error_xml(code: str, message: str = "msg", namespace: str = "") -> bytes:
    """
    An S3 ``<Error>`` document.
    """
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error{namespace}><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>R</RequestId></Error>"
    ).encode()


class UpperBound(random.Random):
    """
    A "random" source whose ``uniform(a, b)`` is always ``b``: the longest backoff.
    """

    def uniform(self, a: float, b: float) -> float:
        """
        ``b``.
        """
        return b


class S3StoreTestCase(SynchronousTestCase):
    """
    Builds stores on a fake S3 with a test clock, and signs with that clock's time.
    """

    def setUp(self) -> None:
        """
        A test clock at :data:`START`; botocore's signing time follows it.
        """
        self.clock = Clock()
        self.clock.advance(START)
        self.patch(
            botocore.auth,
            "get_current_datetime",
            lambda: datetime.fromtimestamp(self.clock.seconds(), timezone.utc),
        )
        self.hashed_in_thread: list[int] = []

    def defer_to_thread(self, f: Callable[..., Any], *args: Any) -> "defer.Deferred[Any]":
        """
        Record that ``f`` ran "on a thread" (its first argument's length), run it now.
        """
        self.hashed_in_thread.append(len(args[0]) if args else -1)
        return defer.succeed(f(*args))

    def store(
        self,
        answers: list[Answer],
        client: Any = None,
        credentials: Optional[Callable[[], Any]] = None,
        **kwargs: Any,
    ) -> tuple[S3Store, FakeS3]:
        """
        An S3Store on a FakeS3 scripted with ``answers``; ``kwargs`` go to S3Store.
        """
        fake = FakeS3(answers)
        kwargs.setdefault("random", random.Random(1234))
        store = S3Store(
            client if client is not None else StubTreq(fake),
            ENDPOINT,
            BUCKET,
            REGION,
            credentials or (lambda: Credentials(ACCESS_KEY, SECRET_KEY)),
            self.clock,
            self.defer_to_thread,
            **kwargs,
        )
        return store, fake

    def only(self, fake: FakeS3) -> Received:
        """
        The one request ``fake`` received, signature checked.
        """
        self.assertEqual(len(fake.received), 1, fake.received)
        verify_sigv4(fake.received[0])
        return fake.received[0]


class HelperTests(SynchronousTestCase):
    """
    The pure helpers: URLs, query strings, XML in and out, timestamps.
    """

    def test_url_quotes_key(self) -> None:
        """
        url() is path-style and percent-encodes the key except ``/`` and RFC 3986's
        unreserved characters; query pairs are sorted and quoted, None gives a bare
        name.
        """
        store = S3Store(None, ENDPOINT + "/", BUCKET, REGION, lambda: None, Clock())
        self.assertEqual(
            store.url("a b/ü+%=?#~._-x.gz"),
            f"{ENDPOINT}/{BUCKET}/a%20b/%C3%BC%2B%25%3D%3F%23~._-x.gz",
        )
        self.assertEqual(
            store.url("k", [("uploadId", "a+b/c="), ("partNumber", "2"), ("uploads", None)]),
            f"{ENDPOINT}/{BUCKET}/k?partNumber=2&uploadId=a%2Bb%2Fc%3D&uploads",
        )
        self.assertEqual(
            store.url(None, [("prefix", "logs/2026")]), f"{ENDPOINT}/{BUCKET}?prefix=logs%2F2026"
        )

    def test_complete_body(self) -> None:
        """
        The CompleteMultipartUpload document lists the parts in the order given, with
        namespace, quoted ETags kept.
        """
        body = s3.complete_body([CompletedPart(1, '"aa"'), CompletedPart(2, '"bb"')])
        self.assertEqual(
            body,
            b"<?xml version='1.0' encoding='utf-8'?>\n"
            b'<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            b'<Part><PartNumber>1</PartNumber><ETag>"aa"</ETag></Part>'
            b'<Part><PartNumber>2</PartNumber><ETag>"bb"</ETag></Part>'
            b"</CompleteMultipartUpload>",
        )

    def test_parse_error(self) -> None:
        """
        parse_error reads Code and Message with or without the S3 namespace, and
        gives empty strings for an empty body, HTML, or another document.
        """
        self.assertEqual(s3.parse_error(error_xml("SlowDown", "Reduce")), ("SlowDown", "Reduce"))
        self.assertEqual(s3.parse_error(error_xml("NoSuchKey", "x", NS)), ("NoSuchKey", "x"))
        self.assertEqual(s3.parse_error(b""), ("", ""))
        self.assertEqual(s3.parse_error(b"<html><h1>500</h1"), ("", ""))
        self.assertEqual(s3.parse_error(b"<CopyPartResult><ETag>e</ETag></CopyPartResult>"), ("", ""))

    def test_parse_timestamp(self) -> None:
        """
        S3 timestamps become epoch seconds: with Z and milliseconds, without a
        fraction, with an offset, and without a zone (taken as UTC).
        """
        self.assertEqual(s3.parse_timestamp("2026-01-31T12:00:00.000Z"), START)
        self.assertEqual(s3.parse_timestamp("2026-01-31T12:00:00.250Z"), START + 0.25)
        self.assertEqual(s3.parse_timestamp("2026-01-31T12:00:00Z"), START)
        self.assertEqual(s3.parse_timestamp("2026-01-31T13:00:00+01:00"), START)
        self.assertEqual(s3.parse_timestamp("2026-01-31T12:00:00"), START)
        self.assertRaises(ValueError, s3.parse_timestamp, "yesterday")


class OperationTests(S3StoreTestCase):
    """
    Each operation's exact request and how its answer is read.
    """

    def test_provides_interface(self) -> None:
        """
        S3Store provides IObjectStore; its name is "s3".
        """
        store, _ = self.store([])
        self.assertTrue(verifyObject(IObjectStore, store))
        self.assertEqual(store.name, "s3")

    def test_head(self) -> None:
        """
        head sends a signed HEAD to the path-style URL with the empty payload's hash
        and reads Content-Length and ETag.
        """
        store, fake = self.store([(200, {"ETag": '"abc"'}, b"x" * 1234)])
        self.assertEqual(
            self.successResultOf(store.head("logs/2026-01-31/a b.gz")), ObjectInfo(1234, '"abc"')
        )
        request = self.only(fake)
        self.assertEqual((request.method, request.uri), ("HEAD", f"/{BUCKET}/logs/2026-01-31/a%20b.gz"))
        self.assertEqual(request.header("host"), "s3.eu-west-1.amazonaws.com")
        self.assertEqual(request.header("x-amz-content-sha256"), EMPTY_SHA256)
        self.assertEqual(request.header("x-amz-date"), "20260131T120000Z")
        self.assertTrue(
            request.header("authorization").startswith(  # type: ignore[union-attr]
                f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20260131/{REGION}/s3/aws4_request,"
                " SignedHeaders=host;x-amz-content-sha256;x-amz-date,"
            )
        )
        self.assertIsNone(request.header("content-encoding"))

    def test_head_write_id(self) -> None:
        """head reports the x-amz-meta-loghandler-write-id header as the write ID."""
        store, fake = self.store(
            [(200, {"ETag": '"abc"', "x-amz-meta-loghandler-write-id": "w1"}, b"xy")]
        )
        self.assertEqual(
            self.successResultOf(store.head("k.gz")), ObjectInfo(2, '"abc"', "w1")
        )

    def test_check(self) -> None:
        """check() is a signed HEAD of the bucket itself; 403 is a StorageError."""
        store, fake = self.store([(200, {}, b"")])
        self.assertIsNone(self.successResultOf(store.check()))
        request = self.only(fake)
        self.assertEqual((request.method, request.uri), ("HEAD", f"/{BUCKET}"))
        store, fake = self.store([(403, {}, b"")])
        error = self.failureResultOf(store.check(), StorageError).value
        self.assertEqual((error.operation, error.status), ("HeadBucket", 403))

    def test_head_missing(self) -> None:
        """
        head of a missing key (404) is None, without retries.
        """
        store, fake = self.store([(404, {}, b"")])
        self.assertIsNone(self.successResultOf(store.head("missing.gz")))
        self.only(fake)

    def test_head_forbidden(self) -> None:
        """
        A 403 on HEAD (no body) is a StorageError with status 403 and empty code.
        """
        store, fake = self.store([(403, {}, b"")])
        error = self.failureResultOf(store.head("k.gz"), StorageError).value
        self.assertEqual((error.operation, error.status, error.code), ("HeadObject", 403, ""))

    def test_get(self) -> None:
        """
        get sends If-Match with the ETag (signed) and fires with the exact body.
        """
        body = bytes(range(256)) * 3
        store, fake = self.store([(200, {"ETag": '"e1"'}, body)])
        self.assertEqual(self.successResultOf(store.get("k.gz", '"e1"')), body)
        request = self.only(fake)
        self.assertEqual((request.method, request.uri), ("GET", f"/{BUCKET}/k.gz"))
        self.assertEqual(request.header("if-match"), '"e1"')
        self.assertIn("if-match", verify_sigv4(request).split(";"))

    def test_get_precondition_failed(self) -> None:
        """
        A 412 on GetObject is PreconditionFailed, not retried.
        """
        store, fake = self.store([(412, {}, error_xml("PreconditionFailed", "At least one"))])
        error = self.failureResultOf(store.get("k.gz", '"old"'), PreconditionFailed).value
        self.assertEqual(
            (error.operation, error.status, error.message), ("GetObject", 412, "At least one")
        )
        self.only(fake)

    def test_get_missing(self) -> None:
        """
        A 404 NoSuchKey on GetObject is a StorageError with that code, not retried.
        """
        store, fake = self.store([(404, {}, error_xml("NoSuchKey", "gone"))])
        error = self.failureResultOf(store.get("k.gz", '"e"'), StorageError).value
        self.assertEqual((error.status, error.code, error.message), (404, "NoSuchKey", "gone"))
        self.only(fake)

    def test_put(self) -> None:
        """
        put sends PUT with the exact body, Content-Type application/gzip, the body's
        SHA-256, no Content-Encoding and no condition; fires with the ETag.
        """
        body = b"\x1f\x8b\x08\x00" + b"z" * 100
        store, fake = self.store([(200, {"ETag": '"new"'}, b"")])
        self.assertEqual(self.successResultOf(store.put("k.gz", body)), '"new"')
        request = self.only(fake)
        self.assertEqual((request.method, request.uri, request.body), ("PUT", f"/{BUCKET}/k.gz", body))
        self.assertEqual(request.header("content-type"), "application/gzip")
        self.assertEqual(request.header("content-length"), str(len(body)))
        self.assertEqual(request.header("x-amz-content-sha256"), hashlib.sha256(body).hexdigest())
        self.assertEqual(
            tuple(request.header(h) for h in ("content-encoding", "if-match", "if-none-match")),
            (None, None, None),
        )
        self.assertEqual(self.hashed_in_thread, [])

    def test_put_write_id(self) -> None:
        """put sends the write ID as signed user metadata."""
        store, fake = self.store([(200, {"ETag": '"new"'}, b"")])
        self.successResultOf(store.put("k.gz", b"x", write_id="w1"))
        request = self.only(fake)
        self.assertEqual(request.header("x-amz-meta-loghandler-write-id"), "w1")
        self.assertIn("x-amz-meta-loghandler-write-id", verify_sigv4(request).split(";"))

    def test_put_conditions(self) -> None:
        """
        put sends If-None-Match: * and If-Match exactly, signed.
        """
        store, fake = self.store([(200, {"ETag": '"1"'}, b""), (200, {"ETag": '"2"'}, b"")])
        self.successResultOf(store.put("k.gz", b"a", if_none_match=True))
        self.successResultOf(store.put("k.gz", b"b", if_match='"1"'))
        first, second = fake.received
        self.assertEqual((first.header("if-none-match"), first.header("if-match")), ("*", None))
        self.assertEqual((second.header("if-none-match"), second.header("if-match")), (None, '"1"'))
        self.assertIn("if-none-match", verify_sigv4(first).split(";"))
        self.assertIn("if-match", verify_sigv4(second).split(";"))

    def test_put_precondition_failed(self) -> None:
        """
        A 412 on PutObject is PreconditionFailed, not retried.
        """
        store, fake = self.store([(412, {}, error_xml("PreconditionFailed"))])
        self.failureResultOf(store.put("k.gz", b"a", if_none_match=True), PreconditionFailed)
        self.only(fake)

    def test_put_empty(self) -> None:
        """
        An empty body is sent with Content-Length 0 and the empty payload's hash.
        """
        store, fake = self.store([(200, {"ETag": '"e"'}, b"")])
        self.successResultOf(store.put("k.gz", b""))
        request = self.only(fake)
        self.assertEqual((request.body, request.header("content-length")), (b"", "0"))
        self.assertEqual(request.header("x-amz-content-sha256"), EMPTY_SHA256)

    def test_large_body_hashed_through_defer_to_thread(self) -> None:
        """
        A body over hash_in_thread_over bytes is hashed through defer_to_thread, once
        for all attempts; a body at the limit is hashed inline.
        """
        store, fake = self.store(
            [(503, {}, error_xml("SlowDown")), (200, {"ETag": '"p"'}, b""), (200, {"ETag": '"q"'}, b"")],
            hash_in_thread_over=100,
        )
        d = store.upload_part("k.gz", "u", 2, b"x" * 101)
        self.clock.advance(10)
        self.successResultOf(d)
        self.successResultOf(store.upload_part("k.gz", "u", 3, b"x" * 100))
        self.assertEqual(self.hashed_in_thread, [101])
        for request in fake.received:
            verify_sigv4(request)

    def test_create_upload(self) -> None:
        """
        create_upload POSTs ``?uploads`` with Content-Type application/gzip and reads
        the UploadId, with or without the namespace.
        """
        for namespace in (NS, ""):
            store, fake = self.store(
                [(200, {}, f"<InitiateMultipartUploadResult{namespace}><Bucket>{BUCKET}</Bucket>"
                  "<Key>k.gz</Key><UploadId>up+1/x=</UploadId></InitiateMultipartUploadResult>".encode())]
            )
            self.assertEqual(self.successResultOf(store.create_upload("k.gz")), "up+1/x=")
            request = self.only(fake)
            self.assertEqual((request.method, request.uri), ("POST", f"/{BUCKET}/k.gz?uploads"))
            self.assertEqual(request.header("content-type"), "application/gzip")

    def test_create_upload_garbage(self) -> None:
        """
        A 200 answer to CreateMultipartUpload that is not the expected document is a
        StorageError.
        """
        store, _ = self.store([(200, {}, b"<html>proxy</html>")])
        error = self.failureResultOf(store.create_upload("k.gz"), StorageError).value
        self.assertEqual(error.operation, "CreateMultipartUpload")

    def test_upload_part(self) -> None:
        """
        upload_part PUTs the body to ``?partNumber=N&uploadId=ID`` (ID quoted) and
        fires with the ETag header.
        """
        store, fake = self.store([(200, {"ETag": '"p3"'}, b"")])
        self.assertEqual(self.successResultOf(store.upload_part("k.gz", "a+b/c=", 3, b"part")), '"p3"')
        request = self.only(fake)
        self.assertEqual(
            (request.method, request.uri, request.body),
            ("PUT", f"/{BUCKET}/k.gz?partNumber=3&uploadId=a%2Bb%2Fc%3D", b"part"),
        )

    def test_upload_part_without_etag(self) -> None:
        """
        An UploadPart answer without an ETag is a StorageError.
        """
        store, _ = self.store([(200, {}, b"")])
        self.failureResultOf(store.upload_part("k.gz", "u", 1, b"p"), StorageError)

    def test_upload_part_copy(self) -> None:
        """
        upload_part_copy sends x-amz-copy-source as /bucket/quoted-key and
        x-amz-copy-source-if-match, signed, no body; reads CopyPartResult's ETag.
        """
        store, fake = self.store(
            [(200, {}, f'<CopyPartResult{NS}><LastModified>2026-01-31T12:00:00.000Z</LastModified>'
              '<ETag>"c1"</ETag></CopyPartResult>'.encode())]
        )
        etag = self.successResultOf(store.upload_part_copy("k.gz", "u1", 1, "dir x/ü.gz", '"base"'))
        self.assertEqual(etag, '"c1"')
        request = self.only(fake)
        self.assertEqual(
            (request.method, request.uri, request.body),
            ("PUT", f"/{BUCKET}/k.gz?partNumber=1&uploadId=u1", b""),
        )
        self.assertEqual(request.header("x-amz-copy-source"), f"/{BUCKET}/dir%20x/%C3%BC.gz")
        self.assertEqual(request.header("x-amz-copy-source-if-match"), '"base"')
        signed = verify_sigv4(request).split(";")
        self.assertIn("x-amz-copy-source", signed)
        self.assertIn("x-amz-copy-source-if-match", signed)

    def test_upload_part_copy_precondition_failed(self) -> None:
        """
        A 412 on UploadPartCopy is PreconditionFailed.
        """
        store, _ = self.store([(412, {}, error_xml("PreconditionFailed"))])
        error = self.failureResultOf(
            store.upload_part_copy("k.gz", "u", 1, "k.gz", '"old"'), PreconditionFailed
        ).value
        self.assertEqual(error.operation, "UploadPartCopy")

    def test_upload_part_copy_error_in_200(self) -> None:
        """
        A 200 answer to UploadPartCopy holding an <Error> is a StorageError with its
        code, not retried when the code is not retryable.
        """
        store, fake = self.store([(200, {}, error_xml("AccessDenied", "no", NS))])
        error = self.failureResultOf(
            store.upload_part_copy("k.gz", "u", 1, "k.gz", '"e"'), StorageError
        ).value
        self.assertEqual((error.status, error.code, error.message), (200, "AccessDenied", "no"))
        self.only(fake)

    def test_complete(self) -> None:
        """
        complete_upload POSTs the parts document to ``?uploadId=ID`` with
        If-None-Match: * (signed) and reads the result's ETag.
        """
        store, fake = self.store(
            [(200, {}, f"<CompleteMultipartUploadResult{NS}><Location>l</Location><Bucket>{BUCKET}"
              '</Bucket><Key>k.gz</Key><ETag>"all-2"</ETag></CompleteMultipartUploadResult>'.encode())]
        )
        parts = [CompletedPart(1, '"a"'), CompletedPart(2, '"b"')]
        etag = self.successResultOf(store.complete_upload("k.gz", "u1", parts, if_none_match=True))
        self.assertEqual(etag, '"all-2"')
        request = self.only(fake)
        self.assertEqual((request.method, request.uri), ("POST", f"/{BUCKET}/k.gz?uploadId=u1"))
        self.assertEqual(request.body, s3.complete_body(parts))
        self.assertEqual((request.header("if-none-match"), request.header("if-match")), ("*", None))
        self.assertIn("if-none-match", verify_sigv4(request).split(";"))

    def test_complete_if_match(self) -> None:
        """
        complete_upload with if_match sends If-Match exactly.
        """
        store, fake = self.store(
            [(200, {}, b'<CompleteMultipartUploadResult><ETag>"x"</ETag></CompleteMultipartUploadResult>')]
        )
        self.successResultOf(
            store.complete_upload("k.gz", "u", [CompletedPart(1, '"a"')], if_match='"base"')
        )
        request = self.only(fake)
        self.assertEqual((request.header("if-match"), request.header("if-none-match")), ('"base"', None))

    def test_complete_error_in_200(self) -> None:
        """
        A 200 answer to CompleteMultipartUpload whose root is <Error> is a
        StorageError (not retried for a non-retryable code such as InvalidPart).
        """
        store, fake = self.store([(200, {}, error_xml("InvalidPart", "One or more", NS))])
        error = self.failureResultOf(
            store.complete_upload("k.gz", "u", [CompletedPart(1, '"a"')]), StorageError
        ).value
        self.assertEqual(
            (error.operation, error.status, error.code, error.message),
            ("CompleteMultipartUpload", 200, "InvalidPart", "One or more"),
        )
        self.assertNotIsInstance(error, PreconditionFailed)
        self.only(fake)

    def test_complete_precondition_in_200(self) -> None:
        """
        An <Error> with code PreconditionFailed, even inside a 200, is
        PreconditionFailed.
        """
        store, _ = self.store([(200, {}, error_xml("PreconditionFailed"))])
        self.failureResultOf(
            store.complete_upload("k.gz", "u", [CompletedPart(1, '"a"')], if_match='"x"'),
            PreconditionFailed,
        )

    def test_complete_internal_error_in_200_retried(self) -> None:
        """
        A 200 holding <Error> InternalError is retried, as AWS advises, and the retry
        succeeds.
        """
        store, fake = self.store(
            [(200, {}, error_xml("InternalError")),
             (200, {}, b'<CompleteMultipartUploadResult><ETag>"ok"</ETag></CompleteMultipartUploadResult>')]
        )
        d = store.complete_upload("k.gz", "u", [CompletedPart(1, '"a"')])
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d), '"ok"')
        self.assertEqual(len(fake.received), 2)

    def test_abort(self) -> None:
        """
        abort_upload sends DELETE ``?uploadId=ID`` and fires with None on 204.
        """
        store, fake = self.store([(204, {}, b"")])
        self.assertIsNone(self.successResultOf(store.abort_upload("k.gz", "u1")))
        request = self.only(fake)
        self.assertEqual(
            (request.method, request.uri, request.body),
            ("DELETE", f"/{BUCKET}/k.gz?uploadId=u1", b""),
        )

    def test_abort_no_such_upload(self) -> None:
        """
        A 404 NoSuchUpload on abort is a StorageError with that code.
        """
        store, _ = self.store([(404, {}, error_xml("NoSuchUpload"))])
        error = self.failureResultOf(store.abort_upload("k.gz", "u1"), StorageError).value
        self.assertEqual((error.status, error.code), (404, "NoSuchUpload"))

    def test_list_uploads_pages(self) -> None:
        """
        list_uploads asks ``GET /bucket?prefix=P&uploads``, then follows
        NextKeyMarker / NextUploadIdMarker until IsTruncated is false, and parses
        Initiated to epoch seconds (pages with and without the namespace).
        """
        page1 = (
            f"<ListMultipartUploadsResult{NS}><Bucket>{BUCKET}</Bucket><IsTruncated>true</IsTruncated>"
            "<NextKeyMarker>logs/b.gz</NextKeyMarker><NextUploadIdMarker>u+2</NextUploadIdMarker>"
            "<Upload><Key>logs/a.gz</Key><UploadId>u1</UploadId>"
            "<Initiated>2026-01-31T12:00:00.000Z</Initiated></Upload>"
            "<Upload><Key>logs/b.gz</Key><UploadId>u+2</UploadId>"
            "<Initiated>2026-01-31T12:00:01.500Z</Initiated></Upload>"
            "</ListMultipartUploadsResult>"
        ).encode()
        page2 = (
            "<ListMultipartUploadsResult><IsTruncated>false</IsTruncated>"
            "<Upload><Key>logs/c.gz</Key><UploadId>u3</UploadId>"
            "<Initiated>2026-01-31T12:00:02Z</Initiated></Upload>"
            "</ListMultipartUploadsResult>"
        ).encode()
        store, fake = self.store([(200, {}, page1), (200, {}, page2)])
        self.assertEqual(
            self.successResultOf(store.list_uploads("logs/")),
            [PendingUpload("logs/a.gz", "u1", START), PendingUpload("logs/b.gz", "u+2", START + 1.5),
             PendingUpload("logs/c.gz", "u3", START + 2)],
        )
        self.assertEqual(
            [(r.method, r.uri) for r in fake.received],
            [("GET", f"/{BUCKET}?prefix=logs%2F&uploads"),
             ("GET", f"/{BUCKET}?key-marker=logs%2Fb.gz&prefix=logs%2F"
                     "&upload-id-marker=u%2B2&uploads")],
        )
        for request in fake.received:
            verify_sigv4(request)

    def test_list_uploads_empty(self) -> None:
        """
        A page without Upload elements gives an empty list.
        """
        store, _ = self.store(
            [(200, {}, b"<ListMultipartUploadsResult><IsTruncated>false</IsTruncated>"
                       b"</ListMultipartUploadsResult>")]
        )
        self.assertEqual(self.successResultOf(store.list_uploads("")), [])

    def test_list_uploads_truncated_without_marker(self) -> None:
        """
        A truncated page without a next marker is a StorageError, not an endless loop.
        """
        store, fake = self.store(
            [(200, {}, b"<ListMultipartUploadsResult><IsTruncated>true</IsTruncated>"
                       b"</ListMultipartUploadsResult>")]
        )
        self.failureResultOf(store.list_uploads("logs/"), StorageError)
        self.assertEqual(len(fake.received), 1)

    def test_list_parts_pages(self) -> None:
        """
        list_parts asks ``GET ?uploadId=ID``, follows NextPartNumberMarker while
        IsTruncated, and reports number, ETag and size in number order (moto's root
        name ListPartsResponse accepted).
        """
        page1 = (
            f"<ListPartsResult{NS}><IsTruncated>true</IsTruncated>"
            "<NextPartNumberMarker>2</NextPartNumberMarker>"
            '<Part><PartNumber>1</PartNumber><ETag>"e1"</ETag><Size>5242880</Size></Part>'
            '<Part><PartNumber>2</PartNumber><ETag>"e2"</ETag><Size>10</Size></Part>'
            "</ListPartsResult>"
        ).encode()
        page2 = (
            f"<ListPartsResponse{NS}><IsTruncated>false</IsTruncated>"
            '<Part><PartNumber>3</PartNumber><ETag>"e3"</ETag><Size>7</Size></Part>'
            "</ListPartsResponse>"
        ).encode()
        store, fake = self.store([(200, {}, page1), (200, {}, page2)])
        self.assertEqual(
            self.successResultOf(store.list_parts("k.gz", "u1")),
            [StoredPart(1, '"e1"', 5242880), StoredPart(2, '"e2"', 10), StoredPart(3, '"e3"', 7)],
        )
        self.assertEqual(
            [r.uri for r in fake.received],
            [f"/{BUCKET}/k.gz?uploadId=u1", f"/{BUCKET}/k.gz?part-number-marker=2&uploadId=u1"],
        )

    def test_redirect_not_followed(self) -> None:
        """
        A 301 PermanentRedirect (bucket in another region) is a final StorageError;
        the Location is not followed.
        """
        store, fake = self.store(
            [(301, {"Location": "https://elsewhere/"}, error_xml("PermanentRedirect", "other")),
             (200, {"ETag": '"x"'}, b"")]
        )
        error = self.failureResultOf(store.get("k.gz", '"e"'), StorageError).value
        self.assertEqual((error.status, error.code), (301, "PermanentRedirect"))
        self.only(fake)

    def test_session_token_signed(self) -> None:
        """
        Temporary credentials send X-Amz-Security-Token, and it is signed.
        """
        store, fake = self.store(
            [(404, {}, b"")], credentials=lambda: Credentials(ACCESS_KEY, SECRET_KEY, "TOKEN")
        )
        self.successResultOf(store.head("k.gz"))
        request = self.only(fake)
        self.assertEqual(request.header("x-amz-security-token"), "TOKEN")
        self.assertIn("x-amz-security-token", verify_sigv4(request).split(";"))


class FakeRefreshable:
    """
    Credentials that need a refresh: get_frozen_credentials records the thread hop.
    """

    def __init__(self, test: S3StoreTestCase):
        self.test = test
        self.frozen_calls = 0

    def refresh_needed(self) -> bool:
        """
        Always.
        """
        return True

    def get_frozen_credentials(self) -> Any:
        """
        Fresh credentials (counted).
        """
        self.frozen_calls += 1
        return Credentials(ACCESS_KEY, SECRET_KEY).get_frozen_credentials()


class RetryTests(S3StoreTestCase):
    """
    Which failures are retried, the backoff, re-signing, logging and giving up.
    """

    def test_retry_503_then_success(self) -> None:
        """
        Two 503 SlowDown answers then a 200: three attempts, each after the seeded
        full-jitter delay (base 0.1 s doubling), each signed anew with a fresh date,
        each retry logged with named fields.
        """
        expected = random.Random(1234)
        delays = [expected.uniform(0, 0.1), expected.uniform(0, 0.2)]
        store, fake = self.store(
            [(503, {}, error_xml("SlowDown", "Reduce your request rate")),
             (503, {}, error_xml("SlowDown", "Reduce your request rate")),
             (200, {"ETag": '"ok"'}, b"")],
            base_delay=0.1,
        )
        with capturedLogs() as events:
            d = store.put("k.gz", b"body")
            self.assertEqual(len(fake.received), 1)
            self.clock.advance(delays[0] - 0.0001)
            self.assertEqual(len(fake.received), 1)
            self.clock.advance(0.0001)
            self.assertEqual(len(fake.received), 2)
            self.clock.advance(delays[1])
            self.assertEqual(self.successResultOf(d), '"ok"')
        self.assertEqual(len(fake.received), 3)
        for request in fake.received:
            verify_sigv4(request)
            self.assertEqual(request.body, b"body")
        retries = [e for e in events if e.get("operation") == "PutObject"]
        self.assertEqual(
            [(e["log_level"], e["attempt"], e["status"], e["code"], e["delay"], e["key"])
             for e in retries],
            [(LogLevel.warn, 1, 503, "SlowDown", delays[0], "k.gz"),
             (LogLevel.warn, 2, 503, "SlowDown", delays[1], "k.gz")],
        )
        self.assertIn("{delay", retries[0]["log_format"])

    def test_retry_resigns(self) -> None:
        """
        A retry after a wait of over a second carries a new X-Amz-Date and a new
        Authorization, and asks the credentials provider again.
        """
        calls = []

        def credentials() -> Credentials:
            calls.append(1)
            return Credentials(ACCESS_KEY, SECRET_KEY)

        store, fake = self.store(
            [(503, {}, b""), (200, {"ETag": '"ok"'}, b"")],
            credentials=credentials, base_delay=2.0, random=UpperBound(),
        )
        d = store.put("k.gz", b"body")
        self.clock.advance(2.0)
        self.successResultOf(d)
        first, second = fake.received
        self.assertEqual(
            (first.header("x-amz-date"), second.header("x-amz-date")),
            ("20260131T120000Z", "20260131T120002Z"),
        )
        self.assertNotEqual(first.header("authorization"), second.header("authorization"))
        verify_sigv4(second)
        self.assertEqual(len(calls), 2)

    def test_retried_statuses_and_codes(self) -> None:
        """
        500, 502, 503 and 504 are retried, and so are SlowDown, RequestTimeout and
        InternalError whatever the status.
        """
        for status, code in [(500, ""), (502, ""), (503, ""), (504, ""),
                             (400, "RequestTimeout"), (429, "SlowDown"), (409, "InternalError")]:
            store, fake = self.store(
                [(status, {}, error_xml(code) if code else b"<html/>"), (200, {"ETag": '"ok"'}, b"")]
            )
            d = store.put("k.gz", b"body")
            self.clock.advance(1)
            self.assertEqual(self.successResultOf(d), '"ok"', (status, code))
            self.assertEqual(len(fake.received), 2, (status, code))

    def test_no_retry_on_4xx(self) -> None:
        """
        403, 400 and 404 are final at once: one request, StorageError with status,
        code and message.
        """
        for status, code in [(403, "AccessDenied"), (400, "EntityTooSmall"),
                             (404, "NoSuchUpload"), (403, "SignatureDoesNotMatch")]:
            store, fake = self.store(
                [(status, {}, error_xml(code, "why")), (200, {"ETag": '"ok"'}, b"")]
            )
            d = store.upload_part("k.gz", "u", 1, b"p")
            self.clock.advance(100)
            error = self.failureResultOf(d, StorageError).value
            self.assertEqual(
                (error.operation, error.status, error.code, error.message),
                ("UploadPart", status, code, "why"),
            )
            self.assertEqual(len(fake.received), 1)

    def test_give_up(self) -> None:
        """
        After max_attempts failed attempts the last error is raised, and logged as an
        error; no further request is made.
        """
        store, fake = self.store([(503, {}, error_xml("SlowDown", "slow"))] * 4, max_attempts=3)
        with capturedLogs() as events:
            d = store.put("k.gz", b"body")
            self.clock.pump([1.0] * 10)
        error = self.failureResultOf(d, StorageError).value
        self.assertEqual((error.status, error.code, error.message), (503, "SlowDown", "slow"))
        self.assertEqual(len(fake.received), 3)
        final = [e for e in events if e.get("log_level") == LogLevel.error]
        self.assertEqual([(e["operation"], e["attempts"]) for e in final], [("PutObject", 3)])

    def test_default_max_attempts(self) -> None:
        """
        By default six attempts are made.
        """
        store, fake = self.store([(500, {}, b"")] * 7)
        d = store.head("k.gz")
        self.clock.pump([1.0] * 60)
        self.assertEqual(self.failureResultOf(d, StorageError).value.status, 500)
        self.assertEqual(len(fake.received), 6)

    def test_backoff_capped(self) -> None:
        """
        The backoff ceiling doubles from base_delay up to max_delay and no further.
        """
        store, fake = self.store(
            [(500, {}, b"")] * 6,
            random=UpperBound(), base_delay=1.0, max_delay=3.0, max_attempts=5,
        )
        d = store.head("k.gz")
        times = []
        for _ in range(4):
            before = len(fake.received)
            waited = 0.0
            while len(fake.received) == before:
                self.clock.advance(0.5)
                waited += 0.5
            times.append(waited)
        self.failureResultOf(d, StorageError)
        self.assertEqual(times, [1.0, 2.0, 3.0, 3.0])

    def test_connection_errors_retried(self) -> None:
        """
        Connection errors (refused, response never received) are retried; when
        they persist, StorageError with status 0 and the exception's name as code.
        """
        fake = FakeS3([(200, {"ETag": '"ok"'}, b"")])
        stub = StubTreq(fake)
        failures: list[Exception] = [
            ConnectionRefusedError(),
            ResponseNeverReceived([Failure(Exception("reset"))]),
        ]

        class Flaky:
            def request(self, method: str, url: bytes, **kwargs: Any) -> "defer.Deferred[Any]":
                if failures:
                    return defer.fail(failures.pop(0))
                return stub.request(method, url, **kwargs)

        store, _ = self.store([], client=Flaky())
        d = store.put("k.gz", b"body")
        self.clock.pump([1.0] * 3)
        self.assertEqual(self.successResultOf(d), '"ok"')
        self.assertEqual(len(fake.received), 1)

        class Down:
            def request(self, method: str, url: bytes, **kwargs: Any) -> "defer.Deferred[Any]":
                return defer.fail(ConnectionRefusedError())

        store, _ = self.store([], client=Down(), max_attempts=2)
        d = store.put("k.gz", b"body")
        self.clock.pump([1.0] * 3)
        error = self.failureResultOf(d, StorageError).value
        self.assertEqual((error.status, error.code), (0, "ConnectionRefusedError"))

    def test_other_exceptions_not_retried(self) -> None:
        """
        An exception that is not a connection error (a bug) is not retried and not
        wrapped.
        """
        calls = []

        class Broken:
            def request(self, method: str, url: bytes, **kwargs: Any) -> "defer.Deferred[Any]":
                calls.append(1)
                return defer.fail(TypeError("bug"))

        store, _ = self.store([], client=Broken())
        d = store.put("k.gz", b"body")
        self.clock.pump([1.0] * 3)
        self.failureResultOf(d, TypeError)
        self.assertEqual(len(calls), 1)

    def test_timeout_retried(self) -> None:
        """
        An attempt with no answer after ``timeout`` seconds is cancelled and retried.
        """
        fake = FakeS3([(200, {"ETag": '"ok"'}, b"")])
        stub = StubTreq(fake)
        cancelled: list["defer.Deferred[Any]"] = []
        calls = []

        class Slow:
            def request(self, method: str, url: bytes, **kwargs: Any) -> "defer.Deferred[Any]":
                calls.append(1)
                if len(calls) == 1:
                    return defer.Deferred(cancelled.append)
                return stub.request(method, url, **kwargs)

        store, _ = self.store([], client=Slow(), timeout=30.0, random=UpperBound())
        d = store.put("k.gz", b"body")
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual((len(cancelled), len(calls)), (1, 1))
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), '"ok"')

    def test_cancel_stops_retries(self) -> None:
        """
        Cancelling an operation while it waits to retry, or while a request is in
        flight, ends it with CancelledError and makes no further request.
        """
        store, fake = self.store([(503, {}, b"")] * 3, random=UpperBound())
        d = store.put("k.gz", b"body")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.clock.pump([1.0] * 10)
        self.assertEqual(len(fake.received), 1)

        hanging: list["defer.Deferred[Any]"] = []

        class Slow:
            def request(self, method: str, url: bytes, **kwargs: Any) -> "defer.Deferred[Any]":
                hanging.append(defer.Deferred())
                return hanging[-1]

        store, _ = self.store([], client=Slow())
        d = store.put("k.gz", b"body")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.clock.pump([1.0] * 200)
        self.assertEqual(len(hanging), 1)

    def test_refresh_off_thread(self) -> None:
        """
        Refreshable credentials that need a refresh are frozen through
        defer_to_thread, once per attempt.
        """
        creds = FakeRefreshable(self)
        store, fake = self.store([(404, {}, b"")], credentials=lambda: creds)
        self.successResultOf(store.head("k.gz"))
        self.assertEqual((creds.frozen_calls, self.hashed_in_thread), (1, [-1]))
        verify_sigv4(fake.received[0])


class BuildTests(SynchronousTestCase):
    """
    build_s3_store: endpoint, credentials, pool ownership.
    """

    def build(self, **kwargs: Any) -> S3Store:
        """
        build_s3_store on a memory reactor, with an unstarted thread pool.
        """
        kwargs.setdefault("bucket", BUCKET)
        kwargs.setdefault("region", REGION)
        return build_s3_store(MemoryReactorClock(), threadpool=ThreadPool(), **kwargs)

    def test_default_endpoint(self) -> None:
        """
        Without an endpoint the store talks to https://s3.{region}.amazonaws.com,
        path-style.
        """
        store = self.build(access_key="a", secret_key="b")
        self.assertEqual(store.url("k.gz"), f"https://s3.eu-west-1.amazonaws.com/{BUCKET}/k.gz")
        self.assertEqual(store.name, "s3")

    def test_endpoint(self) -> None:
        """
        A given endpoint is used as is, path-style.
        """
        store = self.build(access_key="a", secret_key="b", endpoint_url="http://127.0.0.1:5000")
        self.assertEqual(store.url("k.gz"), f"http://127.0.0.1:5000/{BUCKET}/k.gz")

    def test_static_credentials(self) -> None:
        """
        access_key and secret_key become static credentials.
        """
        store = self.build(access_key="AKID1", secret_key="S1")
        frozen = store._credentials().get_frozen_credentials()
        self.assertEqual((frozen.access_key, frozen.secret_key), ("AKID1", "S1"))

    def test_standard_chain(self) -> None:
        """
        Without access_key and secret_key, botocore's standard chain is asked.
        """
        import botocore.session

        chain = Credentials("CHAIN", "SECRET")

        class Session:
            def get_credentials(self) -> Credentials:
                return chain

        self.patch(botocore.session, "get_session", Session)
        store = self.build()
        self.assertIs(store._credentials(), chain)

    def test_no_credentials(self) -> None:
        """
        When neither the arguments nor the chain give credentials: ValueError with
        the documented message.
        """
        import botocore.session

        class Session:
            def get_credentials(self) -> None:
                return None

        self.patch(botocore.session, "get_session", Session)
        error = self.assertRaises(ValueError, self.build)
        self.assertEqual(
            str(error),
            "no AWS credentials: set AWS_ACCESS_KEY and AWS_ACCESS_SECRET or configure the"
            " standard AWS chain",
        )

    def test_half_credentials(self) -> None:
        """
        Only one of access_key / secret_key is a ValueError naming the missing variable.
        """
        error = self.assertRaises(ValueError, self.build, access_key="a")
        self.assertIn("AWS_ACCESS_SECRET is not set", str(error))
        error = self.assertRaises(ValueError, self.build, secret_key="b")
        self.assertIn("AWS_ACCESS_KEY is not set", str(error))

    def test_close_owned_pool(self) -> None:
        """
        close() closes the pool build_s3_store made, and leaves a given pool alone.
        """
        closed = []
        original = HTTPConnectionPool.closeCachedConnections

        def spy(pool: HTTPConnectionPool) -> "defer.Deferred[None]":
            closed.append(pool)
            return original(pool)  # type: ignore[no-any-return]

        self.patch(HTTPConnectionPool, "closeCachedConnections", spy)
        store = self.build(access_key="a", secret_key="b")
        self.assertIsNone(self.successResultOf(store.close()))
        self.assertEqual(len(closed), 1)
        given = HTTPConnectionPool(MemoryReactorClock())
        store = self.build(access_key="a", secret_key="b", pool=given)
        self.successResultOf(store.close())
        self.assertEqual(len(closed), 1)
