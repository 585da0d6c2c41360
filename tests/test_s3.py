"""
Unit tests of the S3 client modules (:mod:`loghandler.storage.s3.documents`,
:mod:`~loghandler.storage.s3.transport`, :mod:`~loghandler.storage.s3.client`,
:mod:`~loghandler.storage.s3.credentials`), without a network: requests go through
``treq.testing.StubTreq`` to a scripted fake S3 resource that records them exactly.
Signatures are checked by an independent Signature Version 4 verifier written here
from AWS's description, not by botocore.
"""

from __future__ import annotations

import hashlib
import hmac
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
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface.verify import verifyObject

from loghandler.interfaces import PreconditionFailed, StorageError
from loghandler.storage.s3 import credentials as credentials_module, documents
from loghandler.storage.s3.api import (
    CompletedPart,
    IS3Client,
    ListedObject,
    ObjectInfo,
    PendingUpload,
    StoredPart,
)
from loghandler.storage.s3.client import S3Client, ServerSideEncryption, build_s3_client
from loghandler.storage.s3.credentials import aws_credentials
from loghandler.storage.s3.transport import SigV4Transport, read_body

ENDPOINT = "https://s3.eu-west-1.amazonaws.com"
BUCKET = "logs-bucket"
REGION = "eu-west-1"
ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
NS = ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
#: 2026-01-31T12:00:00Z, the test clock's start.
START = 1769860800.0
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
#: The headers every request signs.
BASE_SIGNED = ["host", "x-amz-content-sha256", "x-amz-date"]


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
) -> list[str]:
    """
    Check ``received``'s Authorization as S3 would (Signature Version 4,
    https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html),
    and that X-Amz-Content-SHA256 is the body's hash.  Returns the signed header
    names.

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
    return signed


def error_xml(code: str, message: str = "msg", namespace: str = "") -> bytes:
    """
    An S3 ``<Error>`` document.
    """
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error{namespace}><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>R</RequestId></Error>"
    ).encode()


class Hanging:
    """
    An HTTP client whose requests never answer; records each request's Deferred and
    whether it was cancelled.
    """

    def __init__(self) -> None:
        self.requests: list["defer.Deferred[Any]"] = []
        self.cancelled = 0

    def request(self, method: str, url: bytes, **kwargs: Any) -> "defer.Deferred[Any]":
        """A Deferred that fires only when cancelled (with CancelledError)."""

        def cancel(d: "defer.Deferred[Any]") -> None:
            self.cancelled += 1

        self.requests.append(defer.Deferred(cancel))
        return self.requests[-1]


class Failing:
    """An HTTP client whose requests fail at once with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def request(self, method: str, url: bytes, **kwargs: Any) -> "defer.Deferred[Any]":
        """A failed Deferred."""
        return defer.fail(self.error)


class FakeRefreshable:
    """
    Refreshable credentials that always need a refresh; counts refreshes.
    """

    def __init__(self) -> None:
        self.refreshes = 0

    def refresh_needed(self) -> bool:
        """Always."""
        return True

    def get_frozen_credentials(self) -> Any:
        """Fresh credentials (counted)."""
        self.refreshes += 1
        return Credentials(ACCESS_KEY, SECRET_KEY).get_frozen_credentials()


class ClientTestCase(SynchronousTestCase):
    """
    Builds clients on a fake S3 with a test clock, and signs with that clock's time.
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
        self.on_thread: list[str] = []

    def defer_to_thread(self, f: Callable[..., Any], *args: Any) -> "defer.Deferred[Any]":
        """
        Record that ``f`` ran "on a thread" (its name), run it now.
        """
        self.on_thread.append(getattr(f, "__name__", repr(f)))
        return defer.succeed(f(*args))

    def client(
        self,
        answers: list[Answer],
        http: Any = None,
        credentials: Any = None,
        endpoint: str = ENDPOINT,
        encryption: Optional[ServerSideEncryption] = None,
        **kwargs: Any,
    ) -> tuple[S3Client, FakeS3]:
        """
        An S3Client on a FakeS3 scripted with ``answers`` (or on ``http``), asking
        for ``encryption`` when given; ``kwargs`` go to the SigV4Transport.
        """
        fake = FakeS3(answers)
        transport = SigV4Transport(
            http if http is not None else StubTreq(fake),
            endpoint,
            REGION,
            credentials or Credentials(ACCESS_KEY, SECRET_KEY),
            self.defer_to_thread,
            **kwargs,
        )
        return S3Client(transport, BUCKET, encryption=encryption), fake

    def only(self, fake: FakeS3, signed: tuple[str, ...] = ()) -> Received:
        """
        The one request ``fake`` received; its signature checked, and its signed
        headers exactly the base ones plus ``signed``.
        """
        self.assertEqual(len(fake.received), 1, fake.received)
        request = fake.received[0]
        self.assertEqual(verify_sigv4(request), sorted(BASE_SIGNED + list(signed)))
        return request


class DocumentTests(SynchronousTestCase):
    """
    The pure XML and query-string helpers.
    """

    def test_query_string(self) -> None:
        """
        Pairs are sorted and RFC 3986 quoted; None gives a bare name.
        """
        self.assertEqual(
            documents.query_string(
                [("uploadId", "a+b/c= ~"), ("partNumber", "2"), ("uploads", None)]
            ),
            "partNumber=2&uploadId=a%2Bb%2Fc%3D%20~&uploads",
        )
        self.assertEqual(documents.query_string([]), "")

    def test_complete_body(self) -> None:
        """
        The CompleteMultipartUpload document lists the parts in the order given, with
        the namespace, quoted ETags kept (escaped as XML needs).
        """
        body = documents.complete_body([CompletedPart(1, '"aa"'), CompletedPart(2, '"b&b"')])
        self.assertEqual(
            body,
            b"<?xml version='1.0' encoding='utf-8'?>\n"
            b'<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            b'<Part><PartNumber>1</PartNumber><ETag>"aa"</ETag></Part>'
            b'<Part><PartNumber>2</PartNumber><ETag>"b&amp;b"</ETag></Part>'
            b"</CompleteMultipartUpload>",
        )

    def test_parse_error(self) -> None:
        """
        parse_error reads Code and Message with or without the namespace, after
        leading white space, and gives empty strings for an empty body, HTML, or
        another document.
        """
        self.assertEqual(documents.parse_error(error_xml("SlowDown", "Reduce")), ("SlowDown", "Reduce"))
        self.assertEqual(documents.parse_error(error_xml("NoSuchKey", "x", NS)), ("NoSuchKey", "x"))
        self.assertEqual(documents.parse_error(b"\n  " + error_xml("InternalError")), ("InternalError", "msg"))
        self.assertEqual(documents.parse_error(b""), ("", ""))
        self.assertEqual(documents.parse_error(b"<html><h1>500</h1"), ("", ""))
        self.assertEqual(documents.parse_error(b"<CopyPartResult><ETag>e</ETag></CopyPartResult>"), ("", ""))

    def test_parse_timestamp(self) -> None:
        """
        S3 timestamps become epoch seconds: with Z and milliseconds, without a
        fraction, with an offset, and without a zone (taken as UTC).
        """
        self.assertEqual(documents.parse_timestamp("2026-01-31T12:00:00.000Z"), START)
        self.assertEqual(documents.parse_timestamp("2026-01-31T12:00:00.250Z"), START + 0.25)
        self.assertEqual(documents.parse_timestamp("2026-01-31T12:00:00Z"), START)
        self.assertEqual(documents.parse_timestamp("2026-01-31T13:00:00+01:00"), START)
        self.assertEqual(documents.parse_timestamp("2026-01-31T12:00:00"), START)
        self.assertRaises(ValueError, documents.parse_timestamp, "yesterday")

    def test_parse_upload_id_and_etags(self) -> None:
        """
        UploadId and ETag come out of their documents, with or without the
        namespace; another root, a missing or empty element is a DocumentError.
        """
        self.assertEqual(
            documents.parse_upload_id(
                f"<InitiateMultipartUploadResult{NS}><UploadId>u+1</UploadId>"
                "</InitiateMultipartUploadResult>".encode()
            ),
            "u+1",
        )
        self.assertEqual(
            documents.parse_etag(b'<CopyPartResult><ETag>"c"</ETag></CopyPartResult>', "CopyPartResult"),
            '"c"',
        )
        for body in (
            b"<InitiateMultipartUploadResult/>",
            b"<InitiateMultipartUploadResult><UploadId></UploadId></InitiateMultipartUploadResult>",
            b"<Other><UploadId>u</UploadId></Other>",
            b"not xml",
        ):
            self.assertRaises(documents.DocumentError, documents.parse_upload_id, body)

    def test_parse_pages(self) -> None:
        """
        Listing pages give their entries and the next page's markers only when
        truncated; truncated without a marker is a DocumentError, and so is a
        malformed number or time.
        """
        page = documents.parse_parts(
            b"<ListPartsResponse><IsTruncated>true</IsTruncated>"
            b"<NextPartNumberMarker>2</NextPartNumberMarker>"
            b'<Part><PartNumber>2</PartNumber><ETag>"p"</ETag><Size>7</Size></Part>'
            b"</ListPartsResponse>"
        )
        self.assertEqual(page, documents.Page([StoredPart(2, '"p"', 7)], ("2",)))
        self.assertRaises(
            documents.DocumentError,
            documents.parse_parts,
            b"<ListPartsResult><IsTruncated>true</IsTruncated></ListPartsResult>",
        )
        self.assertRaises(
            documents.DocumentError,
            documents.parse_parts,
            b"<ListPartsResult><Part><PartNumber>x</PartNumber><ETag>e</ETag><Size>1</Size>"
            b"</Part></ListPartsResult>",
        )
        self.assertRaises(
            documents.DocumentError,
            documents.parse_objects,
            b"<ListBucketResult><Contents><Key>k</Key><Size>1</Size><ETag>e</ETag>"
            b"<LastModified>soon</LastModified></Contents></ListBucketResult>",
        )
        self.assertEqual(
            documents.parse_uploads(b"<ListMultipartUploadsResult/>"), documents.Page([], None)
        )

    def test_parse_versioning(self) -> None:
        """
        Status, or "" without one; moto's root name is accepted too.
        """
        self.assertEqual(
            documents.parse_versioning(
                f"<VersioningConfiguration{NS}><Status>Enabled</Status></VersioningConfiguration>".encode()
            ),
            "Enabled",
        )
        self.assertEqual(documents.parse_versioning(f"<VersioningConfiguration{NS}/>".encode()), "")
        self.assertEqual(documents.parse_versioning(b"<GetBucketVersioningResponse/>"), "")
        self.assertRaises(documents.DocumentError, documents.parse_versioning, b"")


class TransportTests(ClientTestCase):
    """
    Signing and the HTTP exchange.
    """

    def test_signed_request(self) -> None:
        """
        A request carries Host, X-Amz-Date, the payload's SHA-256 and an
        Authorization over exactly those and the given headers; the URL is the
        endpoint, the path and the sorted query.
        """
        fake = FakeS3([(200, {"X-Answer": "yes"}, b"answer")])
        transport = SigV4Transport(
            StubTreq(fake), ENDPOINT + "/", REGION, Credentials(ACCESS_KEY, SECRET_KEY)
        )
        answer = self.successResultOf(
            transport.send("PUT", "/b/k%20x", [("b", "2"), ("a", None)], {"X-Amz-Meta-A": "v"}, b"body")
        )
        self.assertEqual((answer.status, answer.body, answer.header("x-answer")), (200, b"answer", "yes"))
        self.assertIsNone(answer.header("x-missing"))
        (request,) = fake.received
        self.assertEqual((request.method, request.uri, request.body), ("PUT", "/b/k%20x?a&b=2", b"body"))
        self.assertEqual(request.header("host"), "s3.eu-west-1.amazonaws.com")
        self.assertEqual(request.header("x-amz-date"), "20260131T120000Z")
        self.assertEqual(request.header("x-amz-content-sha256"), hashlib.sha256(b"body").hexdigest())
        self.assertEqual(verify_sigv4(request), sorted(BASE_SIGNED + ["x-amz-meta-a"]))
        self.assertTrue(
            request.header("authorization").startswith(  # type: ignore[union-attr]
                f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20260131/{REGION}/s3/aws4_request,"
                " SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-meta-a,"
            )
        )

    def test_host_with_port(self) -> None:
        """
        An endpoint on a non-default port is signed and sent with the port in Host;
        a default port is left out.
        """
        for endpoint, host in (
            ("http://127.0.0.1:5000", "127.0.0.1:5000"),
            ("https://s3.example.com:443", "s3.example.com"),
        ):
            client, fake = self.client([(200, {}, b"")], endpoint=endpoint)
            self.successResultOf(client.check())
            self.assertEqual(self.only(fake).header("host"), host)

    def test_each_request_signed_when_sent(self) -> None:
        """
        Two requests a few seconds apart carry their own X-Amz-Date and signature.
        """
        client, fake = self.client([(200, {}, b""), (200, {}, b"")])
        self.successResultOf(client.check())
        self.clock.advance(5)
        self.successResultOf(client.check())
        first, second = fake.received
        self.assertEqual(
            (first.header("x-amz-date"), second.header("x-amz-date")),
            ("20260131T120000Z", "20260131T120005Z"),
        )
        self.assertNotEqual(first.header("authorization"), second.header("authorization"))
        verify_sigv4(second)

    def test_session_token_signed(self) -> None:
        """
        Temporary credentials add X-Amz-Security-Token, signed.
        """
        client, fake = self.client([(200, {}, b"")], credentials=Credentials(ACCESS_KEY, SECRET_KEY, "tok"))
        self.successResultOf(client.check())
        request = self.only(fake, ("x-amz-security-token",))
        self.assertEqual(request.header("x-amz-security-token"), "tok")

    def test_big_body_hashed_on_thread(self) -> None:
        """
        A body over hash_in_thread_over bytes is hashed through defer_to_thread; one
        at the limit is hashed inline.
        """
        client, fake = self.client(
            [(200, {"ETag": '"p"'}, b""), (200, {"ETag": '"q"'}, b"")], hash_in_thread_over=100
        )
        self.successResultOf(client.upload_part("k.gz", "u", 2, b"x" * 101))
        self.assertEqual(self.on_thread, ["_sha256_hex"])
        self.successResultOf(client.upload_part("k.gz", "u", 3, b"x" * 100))
        self.assertEqual(self.on_thread, ["_sha256_hex"])
        for request in fake.received:
            verify_sigv4(request)

    def test_refresh_off_thread(self) -> None:
        """
        Refreshable credentials that need a refresh are refreshed through
        defer_to_thread, for each request.
        """
        creds = FakeRefreshable()
        client, fake = self.client([(200, {}, b""), (200, {}, b"")], credentials=creds)
        self.successResultOf(client.check())
        self.successResultOf(client.check())
        self.assertEqual((creds.refreshes, self.on_thread), (2, ["get_frozen_credentials"] * 2))
        verify_sigv4(fake.received[1])

    def test_redirect_not_followed(self) -> None:
        """
        A 301 or 307 is the answer (an error), not followed to its Location.
        """
        for status in (301, 307):
            client, fake = self.client(
                [(status, {"Location": "https://elsewhere/"}, error_xml("PermanentRedirect"))]
            )
            error = self.failureResultOf(client.put("k.gz", b"x"), StorageError).value
            self.assertEqual((error.status, error.code), (status, "PermanentRedirect"))
            self.assertEqual(len(fake.received), 1)

    def test_no_answer_propagates(self) -> None:
        """
        When no answer came, the HTTP client's exception is raised unchanged.
        """
        for exception in (
            ConnectionRefusedError(),
            ResponseNeverReceived([Failure(Exception("reset"))]),
            TypeError("a bug"),
        ):
            client, _ = self.client([], http=Failing(exception))
            self.assertIs(self.failureResultOf(client.put("k.gz", b"x")).value, exception)

    def test_read_body_cancel(self) -> None:
        """
        Cancelling read_body stops the body's transport (which closes the
        connection) and errbacks with CancelledError; the body's later end is
        ignored.  Without a cancel, the body is whole at ResponseDone; a cut body
        errbacks with the reason, and so does one without a length that ended with
        the connection (PotentialDataLoss: it may be cut short).
        """

        @attrs.define
        class Producer:
            stopped: int = 0

            def stopProducing(self) -> None:
                self.stopped += 1

        @attrs.define
        class Response:
            producer: Producer
            protocol: Any = None

            def deliverBody(self, protocol: Any) -> None:
                self.protocol = protocol
                protocol.makeConnection(self.producer)

        response = Response(Producer())
        d = read_body(response)  # type: ignore[arg-type]
        response.protocol.dataReceived(b"partial")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(response.producer.stopped, 1)
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(Exception("aborted"))])))

        response = Response(Producer())
        d = read_body(response)  # type: ignore[arg-type]
        response.protocol.dataReceived(b"a")
        response.protocol.dataReceived(b"b")
        response.protocol.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(d), b"ab")

        response = Response(Producer())
        d = read_body(response)  # type: ignore[arg-type]
        response.protocol.connectionLost(Failure(ResponseFailed([Failure(Exception("cut"))])))
        self.failureResultOf(d, ResponseFailed)

        response = Response(Producer())
        d = read_body(response)  # type: ignore[arg-type]
        response.protocol.dataReceived(b"maybe all")
        response.protocol.connectionLost(Failure(PotentialDataLoss()))
        self.failureResultOf(d, PotentialDataLoss)


class CancellationTests(ClientTestCase):
    """
    The retry layer cancels a call's Deferred on timeout: that must cancel the HTTP
    request.
    """

    def test_cancel_cancels_request(self) -> None:
        """
        Cancelling a call whose request is in flight cancels the request's
        Deferred; the call fails with CancelledError; nothing else is sent.
        """
        http = Hanging()
        client, _ = self.client([], http=http)
        d = client.complete_upload("k.gz", "u", [CompletedPart(1, '"a"')])
        self.assertEqual(len(http.requests), 1)
        d.cancel()
        self.assertEqual(http.cancelled, 1)
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(http.requests), 1)

    def test_cancel_while_hashing(self) -> None:
        """
        Cancelling a call while its body is hashed on a thread fails it with
        CancelledError and sends nothing.
        """
        hashing: list["defer.Deferred[Any]"] = []

        def slow_thread(f: Callable[..., Any], *args: Any) -> "defer.Deferred[Any]":
            hashing.append(defer.Deferred())
            return hashing[-1]

        http = Hanging()
        transport = SigV4Transport(
            http, ENDPOINT, REGION, Credentials(ACCESS_KEY, SECRET_KEY), slow_thread, 10
        )
        d = S3Client(transport, BUCKET).upload_part("k.gz", "u", 1, b"x" * 11)
        self.assertEqual(len(hashing), 1)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(http.requests, [])

    def test_cancel_while_body_arrives(self) -> None:
        """
        Cancelling a call while its answer's body arrives stops the transfer and
        fails the call with CancelledError.
        """

        @attrs.define
        class Producer:
            stopped: int = 0

            def stopProducing(self) -> None:
                self.stopped += 1

        @attrs.define
        class Response:
            code: int = 200
            headers: Headers = attrs.Factory(Headers)
            producer: Producer = attrs.Factory(Producer)

            def deliverBody(self, protocol: Any) -> None:
                protocol.makeConnection(self.producer)
                protocol.dataReceived(b"first bytes")

        response = Response()

        class Answering:
            def request(self, method: str, url: bytes, **kwargs: Any) -> "defer.Deferred[Any]":
                return defer.succeed(response)

        client, _ = self.client([], http=Answering())
        d = client.get("k.gz")
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(response.producer.stopped, 1)


class OperationTests(ClientTestCase):
    """
    Each call's exact request and how its answer is read.
    """

    def test_provides_interface(self) -> None:
        """
        S3Client provides IS3Client; its name is "s3".
        """
        client, _ = self.client([])
        self.assertTrue(verifyObject(IS3Client, client))
        self.assertEqual(client.name, "s3")

    def test_path(self) -> None:
        """
        Path-style paths percent-encode the key except ``/`` and RFC 3986's
        unreserved characters; an empty key is refused.
        """
        client, _ = self.client([])
        self.assertEqual(
            client.path("a b/ü+%=?#~._-!*'()x.gz"),
            f"/{BUCKET}/a%20b/%C3%BC%2B%25%3D%3F%23~._-%21%2A%27%28%29x.gz",
        )
        self.assertEqual(client.path(None), f"/{BUCKET}")
        self.assertRaises(ValueError, client.path, "")

    def test_head(self) -> None:
        """
        head sends a signed HEAD with the empty payload's hash and reads
        Content-Length, ETag and the comma-separated write IDs.
        """
        client, fake = self.client(
            [(200, {"ETag": '"abc"', "x-amz-meta-loghandler-writes": "w1, w2,w3"}, b"x" * 1234)]
        )
        self.assertEqual(
            self.successResultOf(client.head("logs/2026-01-31/a b.gz")),
            ObjectInfo(1234, '"abc"', ("w1", "w2", "w3")),
        )
        request = self.only(fake)
        self.assertEqual((request.method, request.uri), ("HEAD", f"/{BUCKET}/logs/2026-01-31/a%20b.gz"))
        self.assertEqual(request.header("x-amz-content-sha256"), EMPTY_SHA256)

    def test_head_without_writes(self) -> None:
        """
        Without the metadata header, or with an empty one, writes is empty.
        """
        for headers in ({"ETag": '"e"'}, {"ETag": '"e"', "x-amz-meta-loghandler-writes": ""}):
            client, _ = self.client([(200, headers, b"xy")])
            self.assertEqual(self.successResultOf(client.head("k.gz")), ObjectInfo(2, '"e"', ()))

    def test_head_missing_and_errors(self) -> None:
        """
        head of a missing key (404) is None; a 403 (no body) is a StorageError with
        status 403 and code ""; a 200 without an ETag is a StorageError.
        """
        client, _ = self.client([(404, {}, b"")])
        self.assertIsNone(self.successResultOf(client.head("missing.gz")))
        client, _ = self.client([(403, {}, b"")])
        error = self.failureResultOf(client.head("k.gz"), StorageError).value
        self.assertEqual((error.operation, error.status, error.code), ("HeadObject", 403, ""))
        client, _ = self.client([(200, {}, b"x")])
        error = self.failureResultOf(client.head("k.gz"), StorageError).value
        self.assertEqual((error.operation, error.status, error.code), ("HeadObject", 200, ""))

    def test_get(self) -> None:
        """
        get without options sends a plain GET and fires with the exact body.
        """
        body = bytes(range(256)) * 3
        client, fake = self.client([(200, {"ETag": '"e1"'}, body)])
        self.assertEqual(self.successResultOf(client.get("k.gz")), body)
        request = self.only(fake)
        self.assertEqual((request.method, request.uri, request.body), ("GET", f"/{BUCKET}/k.gz", b""))

    def test_get_if_match_and_range(self) -> None:
        """
        get sends If-Match and Range (end exclusive in our API, inclusive in HTTP),
        both signed; a 206 answer is its body.
        """
        client, fake = self.client([(206, {}, b"0123")])
        self.assertEqual(self.successResultOf(client.get("k.gz", '"e1"', (10, 14))), b"0123")
        request = self.only(fake, ("if-match", "range"))
        self.assertEqual((request.header("if-match"), request.header("range")), ('"e1"', "bytes=10-13"))

    def test_get_bad_range(self) -> None:
        """
        An empty or negative range fails with ValueError before anything is sent.
        """
        client, fake = self.client([])
        for byte_range in ((5, 5), (6, 5), (-1, 3)):
            self.failureResultOf(client.get("k.gz", byte_range=byte_range), ValueError)
        self.assertEqual(fake.received, [])

    def test_get_errors(self) -> None:
        """
        412 is PreconditionFailed with S3's message; 404 NoSuchKey and 416
        InvalidRange are StorageErrors with status, code and message.
        """
        client, _ = self.client([(412, {}, error_xml("PreconditionFailed", "At least one"))])
        error = self.failureResultOf(client.get("k.gz", '"old"'), PreconditionFailed).value
        self.assertEqual((error.operation, error.status, error.message), ("GetObject", 412, "At least one"))
        client, _ = self.client([(404, {}, error_xml("NoSuchKey", "gone"))])
        error = self.failureResultOf(client.get("k.gz"), StorageError).value
        self.assertEqual((error.status, error.code, error.message), (404, "NoSuchKey", "gone"))
        client, _ = self.client([(416, {}, error_xml("InvalidRange"))])
        error = self.failureResultOf(client.get("k.gz", byte_range=(9, 10)), StorageError).value
        self.assertEqual((error.status, error.code), (416, "InvalidRange"))

    def test_put(self) -> None:
        """
        put sends PUT with the exact body, Content-Type application/gzip (signed),
        the body's SHA-256, no Content-Encoding, no condition and no metadata; fires
        with the ETag.
        """
        body = b"\x1f\x8b\x08\x00" + b"z" * 100
        client, fake = self.client([(200, {"ETag": '"new"'}, b"")])
        self.assertEqual(self.successResultOf(client.put("k.gz", body)), '"new"')
        request = self.only(fake, ("content-type",))
        self.assertEqual((request.method, request.uri, request.body), ("PUT", f"/{BUCKET}/k.gz", body))
        self.assertEqual(request.header("content-type"), "application/gzip")
        self.assertEqual(request.header("content-length"), str(len(body)))
        self.assertEqual(request.header("x-amz-content-sha256"), hashlib.sha256(body).hexdigest())
        for name in ("content-encoding", "if-match", "if-none-match", "x-amz-meta-loghandler-writes"):
            self.assertIsNone(request.header(name), name)

    def test_put_writes_and_conditions(self) -> None:
        """
        put sends the write IDs comma-joined as signed metadata, and If-None-Match: *
        or If-Match exactly, signed.
        """
        client, fake = self.client([(200, {"ETag": '"1"'}, b""), (200, {"ETag": '"2"'}, b"")])
        self.successResultOf(client.put("k.gz", b"a", if_none_match=True, writes=["w1", "w2"]))
        self.successResultOf(client.put("k.gz", b"b", if_match='"1"', writes=("w3",)))
        first, second = fake.received
        self.assertEqual(
            (first.header("if-none-match"), first.header("if-match"), first.header("x-amz-meta-loghandler-writes")),
            ("*", None, "w1,w2"),
        )
        self.assertEqual(
            (second.header("if-none-match"), second.header("if-match"), second.header("x-amz-meta-loghandler-writes")),
            (None, '"1"', "w3"),
        )
        self.assertEqual(
            verify_sigv4(first),
            sorted(BASE_SIGNED + ["content-type", "if-none-match", "x-amz-meta-loghandler-writes"]),
        )
        self.assertEqual(
            verify_sigv4(second),
            sorted(BASE_SIGNED + ["content-type", "if-match", "x-amz-meta-loghandler-writes"]),
        )

    def test_bad_write_ids(self) -> None:
        """
        A write ID that is empty, holds a comma or is not printable ASCII fails with
        ValueError before anything is sent.
        """
        client, fake = self.client([])
        for writes in ([""], ["a,b"], ["ü"], ["a\nb"]):
            self.failureResultOf(client.put("k.gz", b"x", writes=writes), ValueError)
            self.failureResultOf(client.create_upload("k.gz", writes), ValueError)
        self.assertEqual(fake.received, [])

    def test_put_empty(self) -> None:
        """
        An empty body is sent with Content-Length 0 and the empty payload's hash.
        """
        client, fake = self.client([(200, {"ETag": '"e"'}, b"")])
        self.successResultOf(client.put("k.gz", b""))
        request = self.only(fake, ("content-type",))
        self.assertEqual((request.body, request.header("content-length")), (b"", "0"))
        self.assertEqual(request.header("x-amz-content-sha256"), EMPTY_SHA256)

    def test_put_errors(self) -> None:
        """
        A 412 on PutObject is PreconditionFailed; a 200 without an ETag is a
        StorageError; a 503 is a StorageError after one request (no retry).
        """
        client, fake = self.client([(412, {}, error_xml("PreconditionFailed"))])
        self.failureResultOf(client.put("k.gz", b"a", if_none_match=True), PreconditionFailed)
        client, fake = self.client([(200, {}, b"")])
        error = self.failureResultOf(client.put("k.gz", b"a"), StorageError).value
        self.assertEqual((error.status, error.code, error.message), (200, "", "answer without an ETag"))
        client, fake = self.client([(503, {}, error_xml("SlowDown", "Reduce")), (200, {"ETag": '"e"'}, b"")])
        error = self.failureResultOf(client.put("k.gz", b"a"), StorageError).value
        self.assertEqual((error.operation, error.status, error.code, error.message), ("PutObject", 503, "SlowDown", "Reduce"))
        self.clock.advance(100)
        self.assertEqual(len(fake.received), 1)

    def test_error_without_document(self) -> None:
        """
        An error answer that is not an <Error> document (a proxy's HTML) is a
        StorageError with its status and code "".
        """
        client, _ = self.client([(502, {}, b"<html><body>Bad gateway</body></html>")])
        error = self.failureResultOf(client.upload_part("k.gz", "u", 1, b"p"), StorageError).value
        self.assertEqual((error.operation, error.status, error.code, error.message), ("UploadPart", 502, "", ""))

    def test_create_upload(self) -> None:
        """
        create_upload POSTs ``?uploads`` with Content-Type application/gzip and the
        write IDs, and reads the UploadId, with or without the namespace.
        """
        for namespace in (NS, ""):
            client, fake = self.client(
                [(200, {}, f"<InitiateMultipartUploadResult{namespace}><Bucket>{BUCKET}</Bucket>"
                  "<Key>k.gz</Key><UploadId>up+1/x=</UploadId></InitiateMultipartUploadResult>".encode())]
            )
            self.assertEqual(self.successResultOf(client.create_upload("k.gz", ("w1", "w2"))), "up+1/x=")
            request = self.only(fake, ("content-type", "x-amz-meta-loghandler-writes"))
            self.assertEqual((request.method, request.uri, request.body), ("POST", f"/{BUCKET}/k.gz?uploads", b""))
            self.assertEqual(request.header("content-type"), "application/gzip")
            self.assertEqual(request.header("x-amz-meta-loghandler-writes"), "w1,w2")

    def test_create_upload_without_writes(self) -> None:
        """
        Without write IDs no metadata header is sent.
        """
        client, fake = self.client(
            [(200, {}, b"<InitiateMultipartUploadResult><UploadId>u</UploadId></InitiateMultipartUploadResult>")]
        )
        self.successResultOf(client.create_upload("k.gz"))
        self.assertIsNone(self.only(fake, ("content-type",)).header("x-amz-meta-loghandler-writes"))

    def test_create_upload_garbage(self) -> None:
        """
        A 200 answer to CreateMultipartUpload that is not the expected document is a
        StorageError with status 200 and code "".
        """
        client, _ = self.client([(200, {}, b"<html>proxy</html>")])
        error = self.failureResultOf(client.create_upload("k.gz"), StorageError).value
        self.assertEqual((error.operation, error.status, error.code), ("CreateMultipartUpload", 200, ""))

    def test_upload_part(self) -> None:
        """
        upload_part PUTs the body to ``?partNumber=N&uploadId=ID`` (ID quoted) and
        fires with the ETag header.
        """
        client, fake = self.client([(200, {"ETag": '"p3"'}, b"")])
        self.assertEqual(self.successResultOf(client.upload_part("k.gz", "a+b/c=", 3, b"part")), '"p3"')
        request = self.only(fake)
        self.assertEqual(
            (request.method, request.uri, request.body),
            ("PUT", f"/{BUCKET}/k.gz?partNumber=3&uploadId=a%2Bb%2Fc%3D", b"part"),
        )

    def test_upload_part_no_such_upload(self) -> None:
        """
        A 404 NoSuchUpload on UploadPart is a StorageError with that code.
        """
        client, _ = self.client([(404, {}, error_xml("NoSuchUpload"))])
        error = self.failureResultOf(client.upload_part("k.gz", "u", 1, b"p"), StorageError).value
        self.assertEqual((error.operation, error.status, error.code), ("UploadPart", 404, "NoSuchUpload"))

    def test_upload_part_copy(self) -> None:
        """
        upload_part_copy sends x-amz-copy-source as /bucket/quoted-key and
        x-amz-copy-source-if-match, signed, no body; reads CopyPartResult's ETag.
        """
        client, fake = self.client(
            [(200, {}, f'<CopyPartResult{NS}><LastModified>2026-01-31T12:00:00.000Z</LastModified>'
              '<ETag>"c1"</ETag></CopyPartResult>'.encode())]
        )
        etag = self.successResultOf(client.upload_part_copy("k.gz", "u1", 1, "dir x/ü.gz", '"base"'))
        self.assertEqual(etag, '"c1"')
        request = self.only(fake, ("x-amz-copy-source", "x-amz-copy-source-if-match"))
        self.assertEqual(
            (request.method, request.uri, request.body),
            ("PUT", f"/{BUCKET}/k.gz?partNumber=1&uploadId=u1", b""),
        )
        self.assertEqual(request.header("x-amz-copy-source"), f"/{BUCKET}/dir%20x/%C3%BC.gz")
        self.assertEqual(request.header("x-amz-copy-source-if-match"), '"base"')
        self.assertIsNone(request.header("x-amz-copy-source-range"))

    def test_upload_part_copy_range(self) -> None:
        """
        A byte range is sent as x-amz-copy-source-range (end inclusive), signed; an
        empty range is a ValueError before anything is sent.
        """
        client, fake = self.client([(200, {}, b'<CopyPartResult><ETag>"c"</ETag></CopyPartResult>')])
        self.successResultOf(client.upload_part_copy("k.gz", "u", 2, "s.gz", '"e"', (5242880, 10485760)))
        request = self.only(fake, ("x-amz-copy-source", "x-amz-copy-source-if-match", "x-amz-copy-source-range"))
        self.assertEqual(request.header("x-amz-copy-source-range"), "bytes=5242880-10485759")
        self.failureResultOf(client.upload_part_copy("k.gz", "u", 2, "s.gz", '"e"', (3, 3)), ValueError)
        self.assertEqual(len(fake.received), 1)

    def test_upload_part_copy_errors(self) -> None:
        """
        A 412 on UploadPartCopy is PreconditionFailed; a 200 answer holding an
        <Error> is a StorageError with its code and status 200.
        """
        client, _ = self.client([(412, {}, error_xml("PreconditionFailed"))])
        error = self.failureResultOf(
            client.upload_part_copy("k.gz", "u", 1, "k.gz", '"old"'), PreconditionFailed
        ).value
        self.assertEqual(error.operation, "UploadPartCopy")
        client, fake = self.client([(200, {}, error_xml("InternalError", "retry", NS))])
        error = self.failureResultOf(
            client.upload_part_copy("k.gz", "u", 1, "k.gz", '"e"'), StorageError
        ).value
        self.assertEqual((error.status, error.code, error.message), (200, "InternalError", "retry"))
        self.assertEqual(len(fake.received), 1)

    def test_complete(self) -> None:
        """
        complete_upload POSTs the parts document to ``?uploadId=ID`` with
        Content-Type application/xml and If-None-Match: * (signed) and reads the
        result's ETag, after any white space S3 sent to keep the connection open.
        """
        client, fake = self.client(
            [(200, {}, b"  \n  " + f"<CompleteMultipartUploadResult{NS}><Location>l</Location><Bucket>{BUCKET}"
              '</Bucket><Key>k.gz</Key><ETag>"all-2"</ETag></CompleteMultipartUploadResult>'.encode())]
        )
        parts = [CompletedPart(1, '"a"'), CompletedPart(2, '"b"')]
        etag = self.successResultOf(client.complete_upload("k.gz", "u1", parts, if_none_match=True))
        self.assertEqual(etag, '"all-2"')
        request = self.only(fake, ("content-type", "if-none-match"))
        self.assertEqual((request.method, request.uri), ("POST", f"/{BUCKET}/k.gz?uploadId=u1"))
        self.assertEqual(request.body, documents.complete_body(parts))
        self.assertEqual(request.header("content-type"), "application/xml")
        self.assertEqual((request.header("if-none-match"), request.header("if-match")), ("*", None))

    def test_complete_if_match(self) -> None:
        """
        complete_upload with if_match sends If-Match exactly, signed.
        """
        client, fake = self.client(
            [(200, {}, b'<CompleteMultipartUploadResult><ETag>"x"</ETag></CompleteMultipartUploadResult>')]
        )
        self.successResultOf(
            client.complete_upload("k.gz", "u", [CompletedPart(1, '"a"')], if_match='"base"')
        )
        request = self.only(fake, ("content-type", "if-match"))
        self.assertEqual((request.header("if-match"), request.header("if-none-match")), ('"base"', None))

    def test_complete_errors(self) -> None:
        """
        A 200 answer to CompleteMultipartUpload whose root is <Error> is a
        StorageError with its code (InternalError and InvalidPart alike: classifying
        is the retry layer's job), one request; PreconditionFailed inside a 200 is
        PreconditionFailed; 409 ConditionalRequestConflict and 404 NoSuchUpload are
        StorageErrors with those codes.
        """
        for code in ("InternalError", "InvalidPart"):
            client, fake = self.client([(200, {}, error_xml(code, "One or more", NS))])
            error = self.failureResultOf(
                client.complete_upload("k.gz", "u", [CompletedPart(1, '"a"')]), StorageError
            ).value
            self.assertEqual(
                (error.operation, error.status, error.code, error.message),
                ("CompleteMultipartUpload", 200, code, "One or more"),
            )
            self.assertNotIsInstance(error, PreconditionFailed)
            self.assertEqual(len(fake.received), 1)
        client, _ = self.client([(200, {}, error_xml("PreconditionFailed"))])
        self.failureResultOf(
            client.complete_upload("k.gz", "u", [CompletedPart(1, '"a"')], if_match='"x"'),
            PreconditionFailed,
        )
        for status, code in ((409, "ConditionalRequestConflict"), (404, "NoSuchUpload")):
            client, _ = self.client([(status, {}, error_xml(code))])
            error = self.failureResultOf(
                client.complete_upload("k.gz", "u", [CompletedPart(1, '"a"')], if_match='"x"'),
                StorageError,
            ).value
            self.assertEqual((error.status, error.code), (status, code))
            self.assertNotIsInstance(error, PreconditionFailed)

    def test_abort(self) -> None:
        """
        abort_upload sends DELETE ``?uploadId=ID`` and fires with None on 204; a 404
        NoSuchUpload is a StorageError with that code.
        """
        client, fake = self.client([(204, {}, b"")])
        self.assertIsNone(self.successResultOf(client.abort_upload("k.gz", "u1")))
        request = self.only(fake)
        self.assertEqual(
            (request.method, request.uri, request.body), ("DELETE", f"/{BUCKET}/k.gz?uploadId=u1", b"")
        )
        client, _ = self.client([(404, {}, error_xml("NoSuchUpload"))])
        error = self.failureResultOf(client.abort_upload("k.gz", "u1"), StorageError).value
        self.assertEqual((error.operation, error.status, error.code), ("AbortMultipartUpload", 404, "NoSuchUpload"))

    def test_delete(self) -> None:
        """
        delete sends DELETE of the key and fires with None on 204; a 403 is a
        StorageError.
        """
        client, fake = self.client([(204, {}, b"")])
        self.assertIsNone(self.successResultOf(client.delete("_loghandler/staging/w/k x/1")))
        request = self.only(fake)
        self.assertEqual(
            (request.method, request.uri, request.body),
            ("DELETE", f"/{BUCKET}/_loghandler/staging/w/k%20x/1", b""),
        )
        client, _ = self.client([(403, {}, error_xml("AccessDenied"))])
        error = self.failureResultOf(client.delete("chat/k"), StorageError).value
        self.assertEqual((error.operation, error.status, error.code), ("DeleteObject", 403, "AccessDenied"))

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
        client, fake = self.client([(200, {}, page1), (200, {}, page2)])
        self.assertEqual(
            self.successResultOf(client.list_uploads("logs/")),
            [PendingUpload("logs/a.gz", "u1", START), PendingUpload("logs/b.gz", "u+2", START + 1.5),
             PendingUpload("logs/c.gz", "u3", START + 2)],
        )
        self.assertEqual(
            [(r.method, r.uri) for r in fake.received],
            [("GET", f"/{BUCKET}?prefix=logs%2F&uploads"),
             ("GET", f"/{BUCKET}?key-marker=logs%2Fb.gz&prefix=logs%2F&upload-id-marker=u%2B2&uploads")],
        )
        for request in fake.received:
            self.assertEqual(verify_sigv4(request), BASE_SIGNED)

    def test_list_stuck(self) -> None:
        """
        A listing that names the same next page twice is a StorageError, not an
        endless loop.
        """
        page = (
            b"<ListMultipartUploadsResult><IsTruncated>true</IsTruncated>"
            b"<NextKeyMarker>k</NextKeyMarker><NextUploadIdMarker>u</NextUploadIdMarker>"
            b"</ListMultipartUploadsResult>"
        )
        client, fake = self.client([(200, {}, page), (200, {}, page)])
        error = self.failureResultOf(client.list_uploads(""), StorageError).value
        self.assertEqual((error.operation, error.message), ("ListMultipartUploads", "the listing does not advance"))
        self.assertEqual(len(fake.received), 2)

    def test_list_parts_pages(self) -> None:
        """
        list_parts asks ``GET ?uploadId=ID``, follows NextPartNumberMarker, and
        returns the parts in number order (moto's ListPartsResponse root too).
        """
        page1 = (
            f"<ListPartsResult{NS}><IsTruncated>true</IsTruncated>"
            "<NextPartNumberMarker>2</NextPartNumberMarker>"
            '<Part><PartNumber>1</PartNumber><ETag>"p1"</ETag><Size>5242880</Size></Part>'
            '<Part><PartNumber>2</PartNumber><ETag>"p2"</ETag><Size>10</Size></Part>'
            "</ListPartsResult>"
        ).encode()
        page2 = (
            "<ListPartsResponse><IsTruncated>false</IsTruncated>"
            '<Part><PartNumber>3</PartNumber><ETag>"p3"</ETag><Size>0</Size></Part>'
            "</ListPartsResponse>"
        ).encode()
        client, fake = self.client([(200, {}, page1), (200, {}, page2)])
        self.assertEqual(
            self.successResultOf(client.list_parts("k.gz", "u/1")),
            [StoredPart(1, '"p1"', 5242880), StoredPart(2, '"p2"', 10), StoredPart(3, '"p3"', 0)],
        )
        self.assertEqual(
            [r.uri for r in fake.received],
            [f"/{BUCKET}/k.gz?uploadId=u%2F1", f"/{BUCKET}/k.gz?part-number-marker=2&uploadId=u%2F1"],
        )

    def test_list_objects_pages(self) -> None:
        """
        list_objects asks ListObjectsV2 (``list-type=2``) under the prefix, follows
        NextContinuationToken, and reads key, size, ETag and LastModified.
        """
        page1 = (
            f"<ListBucketResult{NS}><IsTruncated>true</IsTruncated><KeyCount>1</KeyCount>"
            "<NextContinuationToken>t+1/=</NextContinuationToken>"
            "<Contents><Key>_loghandler/writers/w1</Key><LastModified>2026-01-31T12:00:00.000Z</LastModified>"
            '<ETag>"e1"</ETag><Size>0</Size><StorageClass>STANDARD</StorageClass></Contents>'
            "</ListBucketResult>"
        ).encode()
        page2 = (
            "<ListBucketResult><IsTruncated>false</IsTruncated>"
            "<Contents><Key>_loghandler/writers/w2</Key><LastModified>2026-01-31T12:00:09Z</LastModified>"
            "<ETag>&quot;e2&quot;</ETag><Size>12</Size></Contents>"
            "</ListBucketResult>"
        ).encode()
        client, fake = self.client([(200, {}, page1), (200, {}, page2)])
        self.assertEqual(
            self.successResultOf(client.list_objects("_loghandler/writers/")),
            [ListedObject("_loghandler/writers/w1", 0, '"e1"', START),
             ListedObject("_loghandler/writers/w2", 12, '"e2"', START + 9)],
        )
        self.assertEqual(
            [r.uri for r in fake.received],
            [f"/{BUCKET}?list-type=2&prefix=_loghandler%2Fwriters%2F",
             f"/{BUCKET}?continuation-token=t%2B1%2F%3D&list-type=2&prefix=_loghandler%2Fwriters%2F"],
        )
        for request in fake.received:
            verify_sigv4(request)

    def test_versioning(self) -> None:
        """
        versioning asks ``GET /bucket?versioning`` and reads Status, "" when absent.
        """
        client, fake = self.client(
            [(200, {}, f"<VersioningConfiguration{NS}><Status>Suspended</Status></VersioningConfiguration>".encode()),
             (200, {}, f"<VersioningConfiguration{NS}/>".encode())]
        )
        self.assertEqual(self.successResultOf(client.versioning()), "Suspended")
        self.assertEqual(self.successResultOf(client.versioning()), "")
        self.assertEqual([(r.method, r.uri) for r in fake.received], [("GET", f"/{BUCKET}?versioning")] * 2)

    def test_check(self) -> None:
        """
        check() is a signed HEAD of the bucket; 403 and 404 are StorageErrors.
        """
        client, fake = self.client([(200, {}, b"")])
        self.assertIsNone(self.successResultOf(client.check()))
        request = self.only(fake)
        self.assertEqual((request.method, request.uri), ("HEAD", f"/{BUCKET}"))
        for status in (403, 404):
            client, _ = self.client([(status, {}, b"")])
            error = self.failureResultOf(client.check(), StorageError).value
            self.assertEqual((error.operation, error.status, error.code), ("HeadBucket", status, ""))

    def test_close(self) -> None:
        """
        close() calls the closer once, or does nothing without one.
        """
        client, _ = self.client([])
        self.assertIsNone(self.successResultOf(client.close()))
        closed: list[int] = []
        transport = SigV4Transport(Hanging(), ENDPOINT, REGION, Credentials("a", "b"))
        client = S3Client(transport, BUCKET, lambda: defer.succeed(closed.append(1)))
        self.assertIsNone(self.successResultOf(client.close()))
        self.assertEqual(closed, [1])


#: The server-side encryption headers, lowercase, as the fake S3 records them.
SSE_HEADER = "x-amz-server-side-encryption"
SSE_KEY_HEADER = "x-amz-server-side-encryption-aws-kms-key-id"


class EncryptionTests(ClientTestCase):
    """
    ``S3_SSE``: a client with a :class:`ServerSideEncryption` asks for it, signed, on
    every call that creates an object (PutObject, CreateMultipartUpload) and on no
    other (S3 refuses the header on UploadPart and takes the upload's encryption
    for its parts and the completed object).
    """

    #: One answer for each call of :meth:`every_call`, in order.
    ANSWERS: list[Answer] = [
        (200, {"ETag": '"p"'}, b""),
        (200, {}, b"<InitiateMultipartUploadResult><UploadId>u</UploadId></InitiateMultipartUploadResult>"),
        (200, {"ETag": '"1"'}, b""),
        (200, {}, b'<CopyPartResult><ETag>"2"</ETag></CopyPartResult>'),
        (200, {}, b'<CompleteMultipartUploadResult><ETag>"c"</ETag></CompleteMultipartUploadResult>'),
        (200, {"ETag": '"c"'}, b"x"),
        (200, {"ETag": '"c"'}, b"x"),
        (204, {}, b""),
        (204, {}, b""),
    ]

    def every_call(self, client: S3Client) -> list[str]:
        """
        Make each write-path call once through ``client``; the operations in order.
        """
        self.successResultOf(client.put("staging/k.gz", b"a", if_none_match=True, writes=["w1"]))
        self.successResultOf(client.create_upload("k.gz", ["w1"]))
        self.successResultOf(client.upload_part("k.gz", "u", 1, b"p"))
        self.successResultOf(client.upload_part_copy("k.gz", "u", 2, "staging/k.gz", '"p"'))
        self.successResultOf(
            client.complete_upload("k.gz", "u", [CompletedPart(1, '"1"'), CompletedPart(2, '"2"')])
        )
        self.successResultOf(client.head("k.gz"))
        self.successResultOf(client.get("k.gz"))
        self.successResultOf(client.abort_upload("k.gz", "u"))
        self.successResultOf(client.delete("staging/k.gz"))
        return [
            "PutObject", "CreateMultipartUpload", "UploadPart", "UploadPartCopy",
            "CompleteMultipartUpload", "HeadObject", "GetObject", "AbortMultipartUpload",
            "DeleteObject",
        ]

    def test_kms_key_on_creating_calls(self) -> None:
        """
        aws:kms with a key: PutObject and CreateMultipartUpload carry
        x-amz-server-side-encryption: aws:kms and the key ID, both signed; no other
        call carries either.
        """
        key = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        client, fake = self.client(
            list(self.ANSWERS), encryption=ServerSideEncryption("aws:kms", key)
        )
        operations = self.every_call(client)
        self.assertEqual(len(fake.received), len(operations))
        for operation, request in zip(operations, fake.received):
            if operation in ("PutObject", "CreateMultipartUpload"):
                self.assertEqual(
                    (request.header(SSE_HEADER), request.header(SSE_KEY_HEADER)),
                    ("aws:kms", key),
                    operation,
                )
                self.assertIn(SSE_HEADER, verify_sigv4(request))
                self.assertIn(SSE_KEY_HEADER, verify_sigv4(request))
            else:
                self.assertEqual(
                    (request.header(SSE_HEADER), request.header(SSE_KEY_HEADER)),
                    (None, None),
                    operation,
                )

    def test_aes256(self) -> None:
        """
        AES256: PutObject and CreateMultipartUpload carry the algorithm alone (no key
        ID), signed beside the headers they always sign.
        """
        client, fake = self.client(list(self.ANSWERS), encryption=ServerSideEncryption("AES256"))
        self.every_call(client)
        put, create = fake.received[:2]
        for request in (put, create):
            self.assertEqual(
                (request.header(SSE_HEADER), request.header(SSE_KEY_HEADER)), ("AES256", None)
            )
        self.assertEqual(
            verify_sigv4(put),
            sorted(
                BASE_SIGNED
                + ["content-type", "if-none-match", "x-amz-meta-loghandler-writes", SSE_HEADER]
            ),
        )
        self.assertEqual(
            verify_sigv4(create),
            sorted(BASE_SIGNED + ["content-type", "x-amz-meta-loghandler-writes", SSE_HEADER]),
        )
        self.assertTrue(all(r.header(SSE_HEADER) is None for r in fake.received[2:]))

    def test_unset(self) -> None:
        """
        Without encryption no call carries the header: the bucket's default applies.
        """
        client, fake = self.client(list(self.ANSWERS))
        self.every_call(client)
        self.assertEqual([r.header(SSE_HEADER) for r in fake.received], [None] * 9)

    def test_headers(self) -> None:
        """ServerSideEncryption.headers gives the key ID's header only with a key."""
        self.assertEqual(ServerSideEncryption("AES256").headers(), {SSE_HEADER: "AES256"})
        self.assertEqual(
            ServerSideEncryption("aws:kms", "alias/logs").headers(),
            {SSE_HEADER: "aws:kms", SSE_KEY_HEADER: "alias/logs"},
        )


class BuildTests(SynchronousTestCase):
    """
    build_s3_client: endpoint, credentials, pool ownership.
    """

    def build(self, **kwargs: Any) -> S3Client:
        """
        build_s3_client on a memory reactor, with an unstarted thread pool.
        """
        kwargs.setdefault("bucket", BUCKET)
        kwargs.setdefault("region", REGION)
        kwargs.setdefault("credentials", Credentials("a", "b"))
        return build_s3_client(MemoryReactorClock(), threadpool=ThreadPool(), **kwargs)

    def test_default_endpoint(self) -> None:
        """
        Without an endpoint the client talks to https://s3.{region}.amazonaws.com,
        path-style; it provides IS3Client.
        """
        client = self.build()
        self.assertEqual(client._transport.url(client.path("k.gz")), f"{ENDPOINT}/{BUCKET}/k.gz")
        self.assertTrue(verifyObject(IS3Client, client))
        self.assertEqual(repr(client), f"<S3Client {ENDPOINT}/{BUCKET}>")

    def test_endpoint(self) -> None:
        """
        A given endpoint is used as is, path-style.
        """
        client = self.build(endpoint_url="http://127.0.0.1:5000/")
        self.assertEqual(
            client._transport.url(client.path("k.gz"), [("uploads", None)]),
            f"http://127.0.0.1:5000/{BUCKET}/k.gz?uploads",
        )

    def test_credentials_used(self) -> None:
        """
        The credentials given are the ones the transport signs with.
        """
        given = Credentials("AKID1", "S1")
        client = self.build(credentials=given)
        self.assertIs(client._transport._credentials, given)

    def test_encryption(self) -> None:
        """
        The encryption given is the client's; none by default.
        """
        self.assertIsNone(self.build().encryption)
        sse = ServerSideEncryption("aws:kms", "alias/logs")
        self.assertIs(self.build(encryption=sse).encryption, sse)

    def test_close_owned_pool(self) -> None:
        """
        close() closes the pool build_s3_client made, and leaves a given pool alone.
        """
        closed = []
        original = HTTPConnectionPool.closeCachedConnections

        def spy(pool: HTTPConnectionPool) -> "defer.Deferred[None]":
            closed.append(pool)
            return original(pool)  # type: ignore[no-any-return]

        self.patch(HTTPConnectionPool, "closeCachedConnections", spy)
        client = self.build()
        self.assertIsNone(self.successResultOf(client.close()))
        self.assertEqual(len(closed), 1)
        given = HTTPConnectionPool(MemoryReactorClock())
        client = self.build(pool=given)
        self.successResultOf(client.close())
        self.assertEqual(len(closed), 1)


class CredentialsTests(SynchronousTestCase):
    """
    aws_credentials: static keys, the standard chain, one-line errors.
    """

    def chain(self, result: Any) -> None:
        """
        Make botocore's session return ``result`` from get_credentials (or raise it,
        when it is an exception).
        """
        import botocore.session

        class Session:
            def get_credentials(self) -> Any:
                if isinstance(result, Exception):
                    raise result
                return result

        self.patch(botocore.session, "get_session", Session)

    def test_static(self) -> None:
        """
        Both keys give static credentials; the chain is not asked.
        """
        self.chain(AssertionError("asked"))
        frozen = aws_credentials("AKID1", "S1").get_frozen_credentials()
        self.assertEqual((frozen.access_key, frozen.secret_key, frozen.token), ("AKID1", "S1", None))

    def test_half(self) -> None:
        """
        Only one key (the other None or empty) is a ValueError naming the missing
        variable, on one line.
        """
        for access, secret, missing in (("a", None, "AWS_ACCESS_SECRET"), ("", "b", "AWS_ACCESS_KEY")):
            error = self.assertRaises(ValueError, aws_credentials, access, secret)
            self.assertTrue(str(error).startswith(f"{missing} is not set"), str(error))
            self.assertNotIn("\n", str(error))

    def test_chain(self) -> None:
        """
        Without keys, the standard chain's credentials are returned as they are
        (refreshable ones stay refreshable).
        """
        found = Credentials("CHAIN", "SECRET")
        self.chain(found)
        self.assertIs(aws_credentials(None, ""), found)

    def test_nothing(self) -> None:
        """
        When the chain finds nothing: ValueError naming both variables.
        """
        self.chain(None)
        error = self.assertRaises(ValueError, aws_credentials, None, None)
        self.assertEqual(
            str(error),
            "no AWS credentials: set AWS_ACCESS_KEY and AWS_ACCESS_SECRET or configure the"
            " standard AWS credential chain",
        )

    def test_broken_configuration(self) -> None:
        """
        A chain that fails (an unknown AWS_PROFILE) is a one-line ValueError naming
        the variables and the cause.
        """
        from botocore.exceptions import ProfileNotFound

        self.chain(ProfileNotFound(profile="nope"))
        error = self.assertRaises(ValueError, aws_credentials, None, None)
        self.assertIn("AWS_ACCESS_KEY and AWS_ACCESS_SECRET are not set", str(error))
        self.assertIn("nope", str(error))
        self.assertNotIn("\n", str(error))
        self.assertIs(credentials_module.aws_credentials, aws_credentials)
