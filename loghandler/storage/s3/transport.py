"""
One signed HTTP exchange with an S3 endpoint: :class:`SigV4Transport` signs a request
with botocore's Signature Version 4 for S3 and sends exactly the signed bytes with
treq, then reads the whole answer.  It knows no S3 operation and does not retry.

- URLs are ``{endpoint}{path}?{query}``: the path comes percent-encoded from the
  caller, the query is built here (:func:`~loghandler.storage.s3.documents.query_string`),
  so the URL botocore signs and the one treq sends are the same bytes.
- ``X-Amz-Content-SHA256`` always carries the payload's SHA-256; bodies over
  ``hash_in_thread_over`` bytes are hashed off the reactor thread (5 MiB: about 4 ms).
- Each request is signed when it is sent (fresh ``X-Amz-Date``), with the current
  credentials; refreshable credentials that need a refresh are refreshed off the
  reactor thread (the refresh may call STS or instance metadata).
- Redirects are not followed (a 301/307 is an answer to report, and the signature
  was made for this host).
- Cancelling :meth:`SigV4Transport.send`'s Deferred cancels the HTTP request (or
  aborts the connection while the answer's body arrives); when no answer came, the
  HTTP client's exception (``ConnectError``, ``ResponseNeverReceived``,
  ``CancelledError``...) is raised unchanged.

Signature Version 4 for S3:
https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional, Protocol as TypingProtocol, Sequence, cast
from urllib.parse import urlsplit

import attrs
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from loghandler.storage.s3.documents import query_string
from loghandler.threads import DeferToThread, synchronously

__all__ = ["Answer", "HTTPRequester", "SigV4Transport", "read_body"]

#: SHA-256 of the empty string, hex: the payload hash of a request without a body.
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

class HTTPRequester(TypingProtocol):
    """
    What the transport needs of ``treq.HTTPClient`` (``treq.testing.StubTreq`` has
    it too).
    """

    def request(
        self,
        method: str,
        url: bytes,
        *,
        headers: Headers,
        data: Optional[bytes],
        allow_redirects: bool,
        unbuffered: bool,
    ) -> "Deferred[Any]":
        """
        Send one request; fire with an ``IResponse`` once its headers arrived.
        """


def _sha256_hex(body: bytes) -> str:
    """The SHA-256 of ``body``, 64 lowercase hex digits."""
    return hashlib.sha256(body).hexdigest()


@attrs.frozen
class Answer:
    """
    One HTTP answer, body read in full.

    :ivar status: the HTTP status code.
    :ivar headers: the answer's headers.
    :ivar body: its whole body (empty for HEAD).
    """

    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> Optional[str]:
        """
        The first value of header ``name`` (any case) as text, or None.
        """
        values = self.headers.getRawHeaders(name.encode("ascii"))
        if not values:
            return None
        return values[0].decode("latin-1")


class _BodyReader(Protocol):
    """
    Collects a response body into ``done``; ignores the end of a body whose reading
    was cancelled.
    """

    def __init__(self, done: "Deferred[bytes]") -> None:
        self._done = done
        self._chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        """Keep a chunk."""
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        The body ended: fire ``done`` with it, or with the error that cut it.  A
        body without a length that ended with the connection (``PotentialDataLoss``)
        is an error too: it may be cut short, and S3 always sends a length.
        """
        if self._done.called:
            return
        if reason.check(ResponseDone):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(reason)


def read_body(response: IResponse) -> "Deferred[bytes]":
    """
    The whole body of ``response``.  Cancelling the Deferred stops the transfer
    (``stopProducing`` on the body's transport, which closes the connection) and
    errbacks with ``CancelledError``; unlike ``treq.content``, whose Deferred cannot
    be cancelled.

    :raises: (errback) ``ResponseFailed`` when the connection is cut,
        ``PotentialDataLoss`` when the body had no length and ended with the
        connection.
    """
    reader: _BodyReader

    def cancel(_: "Deferred[bytes]") -> None:
        if reader.transport is not None:
            # A response body's transport is an IPushProducer (IResponse.deliverBody).
            cast(IPushProducer, reader.transport).stopProducing()

    done: "Deferred[bytes]" = Deferred(cancel)
    reader = _BodyReader(done)
    response.deliverBody(reader)
    return done


class _PrehashedS3SigV4Auth(S3SigV4Auth):  # type: ignore[misc]  # botocore is untyped
    """
    botocore's ``S3SigV4Auth`` with the payload hash computed beforehand (perhaps on
    a thread) and passed in the request's context as ``"loghandler_sha256"``, so
    botocore neither needs the body nor hashes it again on the reactor thread.
    """

    def payload(self, request: AWSRequest) -> str:
        """The precomputed hex SHA-256 of the request body."""
        return str(request.context["loghandler_sha256"])


def _host_header(url: str) -> str:
    """
    The ``Host`` header for ``url``: the host, with the port only when it is not the
    scheme's default (as botocore and Twisted's Agent write it).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is not None and parts.port != default:
        host = f"{host}:{parts.port}"
    return host


class SigV4Transport:
    """
    Signs and sends requests to one S3 endpoint.

    :param http: a ``treq.HTTPClient`` (or anything with its ``request``).
    :param endpoint_url: ``scheme://host[:port]``, such as
        ``https://s3.eu-west-1.amazonaws.com`` or ``http://127.0.0.1:5000``.
    :param region: the signing region, such as ``eu-west-1``.
    :param credentials: botocore ``Credentials``, static or refreshable.
    :param defer_to_thread: runs blocking work (hashing big bodies, refreshing
        credentials) off the reactor thread; the default runs it at once.
    :param hash_in_thread_over: bodies longer than this many bytes are hashed
        through ``defer_to_thread``.
    """

    def __init__(
        self,
        http: HTTPRequester,
        endpoint_url: str,
        region: str,
        credentials: Credentials,
        defer_to_thread: DeferToThread = synchronously,
        hash_in_thread_over: int = 64 * 1024,
    ) -> None:
        self._http = http
        self.endpoint_url = endpoint_url.rstrip("/")
        self.region = region
        self._credentials = credentials
        self._defer_to_thread = defer_to_thread
        self._hash_in_thread_over = hash_in_thread_over
        self._host = _host_header(self.endpoint_url)

    def __repr__(self) -> str:
        return f"<SigV4Transport {self.endpoint_url} ({self.region})>"

    def url(self, path: str, query: Sequence[tuple[str, Optional[str]]] = ()) -> str:
        """
        ``{endpoint}{path}`` and, when ``query`` has pairs, ``?`` and their
        :func:`~loghandler.storage.s3.documents.query_string`.

        :param path: percent-encoded, starting with ``/``.
        """
        url = self.endpoint_url + path
        if query:
            url += "?" + query_string(query)
        return url

    def send(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, Optional[str]]] = (),
        headers: Optional[Mapping[str, str]] = None,
        body: bytes = b"",
    ) -> "Deferred[Answer]":
        """
        Sign and send one request; fire with the whole answer, whatever its status.

        :param method: ``GET``, ``PUT``...
        :param path: percent-encoded, starting with ``/`` (see :meth:`url`).
        :param query: name/value pairs; a None value gives a bare name.
        :param headers: headers to send and sign (ASCII values).
        :param body: the request body.
        :raises: (errback) the HTTP client's exception when no answer came, or
            ``CancelledError`` when cancelled before the request went out.
        """
        return Deferred.fromCoroutine(
            self._send(method, self.url(path, query), headers or {}, body)
        )

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> Answer:
        """
        :meth:`send`, with the URL built.
        """
        if not body:
            payload_hash = _EMPTY_SHA256
        elif len(body) > self._hash_in_thread_over:
            payload_hash = str(await self._defer_to_thread(_sha256_hex, body))
        else:
            payload_hash = _sha256_hex(body)
        frozen = await self._frozen_credentials()
        request = AWSRequest(method=method, url=url)
        request.headers["Host"] = self._host
        for name, value in headers.items():
            request.headers[name] = value
        request.headers["X-Amz-Content-SHA256"] = payload_hash
        request.context["loghandler_sha256"] = payload_hash
        _PrehashedS3SigV4Auth(frozen, "s3", self.region).add_auth(request)
        signed = Headers(
            {name.encode("ascii"): [value.encode("ascii")] for name, value in request.headers.items()}
        )
        response = await self._http.request(
            method,
            url.encode("ascii"),
            headers=signed,
            data=body or None,
            allow_redirects=False,
            unbuffered=True,
        )
        content = await read_body(response)
        return Answer(response.code, response.headers, content)

    async def _frozen_credentials(self) -> ReadOnlyCredentials:
        """
        The credentials as they are now; refreshed off the reactor thread when
        refreshable ones are about to expire.
        """
        refresh_needed = getattr(self._credentials, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            frozen = await self._defer_to_thread(self._credentials.get_frozen_credentials)
        else:
            frozen = self._credentials.get_frozen_credentials()
        result: ReadOnlyCredentials = frozen
        return result
