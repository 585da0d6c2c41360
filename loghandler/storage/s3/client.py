"""
:class:`S3Store`: :class:`~loghandler.interfaces.IObjectStore` over S3's REST API,
with treq for HTTP and botocore for Signature Version 4 and the AWS credential chain.

Requests are path-style, ``{endpoint}/{bucket}/{url-quoted key}``, so the same code
talks to AWS (``https://s3.{region}.amazonaws.com``), moto and MinIO.  Each attempt is
signed anew (fresh ``X-Amz-Date``, fresh credentials) with
``botocore.auth.S3SigV4Auth``; the URL, the query string (built here, sorted, RFC 3986
quoted) and the headers that are signed are exactly the bytes treq sends.
``X-Amz-Content-SHA256`` always carries the payload's SHA-256.

Sources:

- Signature Version 4 for S3:
  https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html
- Error responses: https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html
- The operations: https://docs.aws.amazon.com/AmazonS3/latest/API/API_Operations_Amazon_Simple_Storage_Service.html
  (each method names its page).
- Retries, backoff with full jitter:
  https://docs.aws.amazon.com/sdkref/latest/guide/feature-retry-behavior.html
"""

from __future__ import annotations

import hashlib
import random as _random_module
from datetime import datetime, timezone
from typing import Any, Callable, Optional, Sequence, TypeVar
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree

import attrs
import treq
from treq.client import HTTPClient
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials
from twisted.internet import defer, error as internet_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web import client as web_client
from twisted.web.http_headers import Headers
from zope.interface import implementer

from loghandler.backoff import Backoff
from loghandler.interfaces import (
    CompletedPart,
    IObjectStore,
    ObjectInfo,
    PendingUpload,
    PreconditionFailed,
    StorageError,
    StoredPart,
)

__all__ = ["S3Store", "build_s3_store", "S3_NAMESPACE"]

_T = TypeVar("_T")

#: The XML namespace of S3's documents.  Requests use it; responses are parsed with or
#: without it (moto answers some operations without a namespace).
S3_NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"

#: SHA-256 of the empty string, hex: the payload hash of a request without a body.
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

#: The user metadata header that carries a write ID (see loghandler.interfaces).
WRITE_ID_HEADER = "x-amz-meta-loghandler-write-id"

#: HTTP statuses worth another attempt.
_RETRY_STATUSES = frozenset({500, 502, 503, 504})

#: S3 error codes worth another attempt, whatever the status (InternalError also
#: comes inside a 200 answer to CompleteMultipartUpload or UploadPartCopy).
_RETRY_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError"})

#: Exceptions from the HTTP client that mean "no usable answer came": the request may
#: or may not have reached S3, and another attempt is made.
_RETRY_EXCEPTIONS: tuple[type[BaseException], ...] = (
    internet_error.ConnectError,  # refused, DNS lookup, connect timeout...
    internet_error.ConnectionLost,
    internet_error.ConnectionDone,
    internet_error.TimeoutError,
    defer.TimeoutError,  # our own per-attempt timeout (Deferred.addTimeout)
    web_client.ResponseNeverReceived,
    web_client.ResponseFailed,
    web_client.RequestTransmissionFailed,
    web_client.RequestNotSent,  # type: ignore[attr-defined]  # not in __all__
)

DeferToThread = Callable[..., "Deferred[Any]"]
"""``defer_to_thread(f, *args)``: call ``f(*args)`` off the reactor thread and fire
with its result (``functools.partial(deferToThreadPool, reactor, pool)``)."""

CredentialsProvider = Callable[[], Credentials]
"""A callable returning botocore credentials (static or refreshable)."""


def _synchronously(f: Callable[..., _T], *args: Any) -> "Deferred[_T]":
    """
    The default ``defer_to_thread``: call ``f(*args)`` at once, on this thread, and
    return a Deferred that has already fired with its result (or failure).
    """
    return defer.maybeDeferred(f, *args)


def _sha256_hex(body: bytes) -> str:
    """
    The SHA-256 of ``body`` as 64 lowercase hex digits (``X-Amz-Content-SHA256``).
    """
    return hashlib.sha256(body).hexdigest()


class _PrehashedS3SigV4Auth(S3SigV4Auth):  # type: ignore[misc]  # botocore is untyped
    """
    botocore's ``S3SigV4Auth``, except that the payload hash is the one computed
    beforehand (possibly on a thread) and passed in the request's context under
    ``"loghandler_payload_sha256"``, so botocore neither needs the body nor hashes it
    a second time on the reactor thread.
    """

    def payload(self, request: AWSRequest) -> str:
        """
        The precomputed hex SHA-256 of the request body.
        """
        return str(request.context["loghandler_payload_sha256"])


@attrs.frozen
class _Answer:
    """
    One HTTP answer, body read in full.

    :ivar status: the HTTP status code.
    :ivar headers: the response headers.
    :ivar body: the whole response body (empty for HEAD).
    """

    status: int
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> Optional[str]:
        """
        The first value of header ``name`` as text, or None when absent.
        """
        values = self.headers.getRawHeaders(name)
        if not values:
            return None
        return values[0].decode("latin-1")


class _Retry(Exception):
    """
    Raised inside an attempt when it failed in a way worth trying again; carries the
    error to raise when no attempt is left.

    :ivar error: the :class:`StorageError` for the final failure.
    :ivar reason: a short description for the retry log line.
    """

    def __init__(self, error: StorageError, reason: str):
        super().__init__(reason)
        self.error = error
        self.reason = reason


def _local_name(tag: str) -> str:
    """
    An ElementTree tag without its ``{namespace}``: ``{ns}Part`` -> ``Part``.
    """
    return tag.rsplit("}", 1)[-1]


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    """
    The direct children of ``element`` named ``name``, in any namespace or none.
    """
    return [child for child in element if _local_name(child.tag) == name]


def _child_text(element: ElementTree.Element, name: str) -> Optional[str]:
    """
    The text of the first direct child named ``name`` (any namespace), "" when that
    child is empty, None when there is no such child.
    """
    for child in _children(element, name):
        return child.text or ""
    return None


def parse_xml(body: bytes) -> Optional[ElementTree.Element]:
    """
    Parse an S3 XML document; None when ``body`` is empty or not XML.
    """
    if not body.strip():
        return None
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None


def parse_error(body: bytes) -> tuple[str, str]:
    """
    The ``(Code, Message)`` of an S3 ``<Error>`` document, or ``("", "")`` when
    ``body`` is not one (HEAD answers have no body).

    See https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html
    """
    root = parse_xml(body)
    if root is None or _local_name(root.tag) != "Error":
        return "", ""
    return _child_text(root, "Code") or "", _child_text(root, "Message") or ""


def complete_body(parts: Sequence[CompletedPart]) -> bytes:
    """
    The ``<CompleteMultipartUpload>`` request document listing ``parts`` in the order
    given (S3 wants ascending part numbers), UTF-8 with an XML declaration.

    See https://docs.aws.amazon.com/AmazonS3/latest/API/API_CompleteMultipartUpload.html
    """
    root = ElementTree.Element("CompleteMultipartUpload", xmlns=S3_NAMESPACE)
    for part in parts:
        element = ElementTree.SubElement(root, "Part")
        ElementTree.SubElement(element, "PartNumber").text = str(part.number)
        ElementTree.SubElement(element, "ETag").text = part.etag
    return bytes(ElementTree.tostring(root, encoding="utf-8", xml_declaration=True))


def parse_timestamp(text: str) -> float:
    """
    An S3 timestamp such as ``2026-01-31T12:00:00.000Z`` as seconds since the Unix
    epoch (a timestamp without an offset is taken as UTC).

    :raises ValueError: when ``text`` is not an ISO 8601 timestamp.
    """
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _host_header(url: str) -> str:
    """
    The ``Host`` header for ``url``: the lowercase host, with the port only when it
    is not the scheme's default (as botocore and Twisted's Agent compute it).
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is not None and parts.port != default:
        host = f"{host}:{parts.port}"
    return host


def _query_string(query: Sequence[tuple[str, Optional[str]]]) -> str:
    """
    A canonical query string: each name and value quoted as RFC 3986 wants (only
    ``A-Za-z0-9-_.~`` left as is), pairs sorted; a None value gives a bare name
    (``uploads``).  S3 and botocore both derive the same canonical form from it.
    """
    pairs = sorted(
        (quote(name, safe="~"), None if value is None else quote(value, safe="~"))
        for name, value in query
    )
    return "&".join(name if value is None else f"{name}={value}" for name, value in pairs)


def _status_error(operation: str, status: int, body: bytes) -> StorageError:
    """
    The :class:`StorageError` (or :class:`PreconditionFailed`) for an error answer.
    """
    code, message = parse_error(body)
    if status == 412 or code == "PreconditionFailed":
        return PreconditionFailed(operation, message)
    return StorageError(operation, status, code, message)


def _timed_out(result: object, timeout: float) -> _Answer:
    """
    ``onTimeoutCancel`` for an attempt: whatever the cancelled request fired with
    (``CancelledError``, or ``ResponseNeverReceived`` around one), the attempt timed out.

    :raises defer.TimeoutError: always.
    """
    raise defer.TimeoutError(f"no complete answer within {timeout} s")


def _cancelled(exception: BaseException) -> bool:
    """
    Whether ``exception`` (as the HTTP client raised it) comes from cancelling the
    request: a ``CancelledError``, or one of Twisted's wrapper exceptions
    (``ResponseNeverReceived``, ``ResponseFailed``...) around one.
    """
    if isinstance(exception, defer.CancelledError):
        return True
    reasons = getattr(exception, "reasons", None) or []
    return any(reason.check(defer.CancelledError) for reason in reasons)


def _is_retryable(status: int, code: str) -> bool:
    """
    Whether an error answer is worth another attempt: 500, 502, 503, 504, or the
    codes SlowDown, RequestTimeout and InternalError.  Other 4xx never are.
    """
    return status in _RETRY_STATUSES or code in _RETRY_CODES


@implementer(IObjectStore)
class S3Store:
    """
    An :class:`~loghandler.interfaces.IObjectStore` on one S3 bucket.

    Every method returns a Deferred.  Failures after the retries errback with
    :class:`~loghandler.interfaces.StorageError` (``status`` 0 when no answer came,
    ``code`` and ``message`` from S3's error document), failed conditions (412, or an
    error code ``PreconditionFailed``) with
    :class:`~loghandler.interfaces.PreconditionFailed`, never retried.

    Retries: up to ``max_attempts`` attempts in all on connection errors, timeouts
    (``timeout`` seconds per attempt, response body included), 500/502/503/504 and the
    codes SlowDown, RequestTimeout and InternalError; before attempt ``n + 1`` it
    waits ``uniform(0, min(max_delay, base_delay * 2 ** (n - 1)))`` seconds on
    ``clock`` (exponential backoff with full jitter) and logs a warning.  Operations
    are retried whether idempotent or not: after an ambiguous failure (timeout,
    dropped connection, 5xx) a retried CreateMultipartUpload may leave an extra empty
    upload, and a retried CompleteMultipartUpload may answer NoSuchUpload (404) or
    412 because the first attempt did succeed.

    :param client: a ``treq.HTTPClient``, or anything with
        ``request(method, url, headers=..., data=..., allow_redirects=False)`` firing
        with an ``IResponse``.
    :param endpoint_url: ``scheme://host[:port]``, such as
        ``https://s3.eu-west-1.amazonaws.com`` or ``http://127.0.0.1:5000``.
    :param bucket: the bucket name.
    :param region: the region used in the signature, such as ``eu-west-1``.
    :param credentials: returns botocore ``Credentials`` (static or refreshable);
        called for each attempt and frozen then.  When refreshable ones need a
        refresh, the (blocking) refresh runs through ``defer_to_thread``.
    :param clock: for backoff delays and per-attempt timeouts.
    :param defer_to_thread: ``defer_to_thread(f, *args) -> Deferred``, runs CPU work
        (hashing bodies over ``hash_in_thread_over`` bytes) off the reactor thread.
        The default runs it synchronously.
    :param max_attempts: attempts in all, at least 1.
    :param base_delay: seconds, the backoff's first ceiling.
    :param max_delay: seconds, the backoff's largest ceiling.
    :param timeout: seconds allowed for one attempt, request and whole answer.
    :param random: the jitter's random source (seed one in tests).
    :param hash_in_thread_over: bodies longer than this many bytes are hashed
        through ``defer_to_thread`` (SHA-256 of 5 MiB takes about 4 ms).
    :param closer: called by :meth:`close` (e.g. to close the connection pool).
    """

    name = "s3"
    _log = Logger()

    def __init__(
        self,
        client: Any,
        endpoint_url: str,
        bucket: str,
        region: str,
        credentials: CredentialsProvider,
        clock: IReactorTime,
        defer_to_thread: DeferToThread = _synchronously,
        *,
        max_attempts: int = 6,
        base_delay: float = 0.1,
        max_delay: float = 10.0,
        timeout: float = 120.0,
        random: Optional[_random_module.Random] = None,
        hash_in_thread_over: int = 64 * 1024,
        closer: Optional[Callable[[], "Deferred[Any]"]] = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._client = client
        self._endpoint = endpoint_url.rstrip("/")
        self._bucket = bucket
        self._region = region
        self._credentials = credentials
        self._clock = clock
        self._defer_to_thread = defer_to_thread
        self._max_attempts = max_attempts
        self._timeout = timeout
        self._backoff = Backoff(
            base_delay, max_delay, (random or _random_module.Random()).uniform
        )
        self._hash_in_thread_over = hash_in_thread_over
        self._closer = closer
        self._host = _host_header(self._endpoint)

    def __repr__(self) -> str:
        return f"<S3Store {self._endpoint}/{self._bucket} ({self._region})>"

    # -- plumbing ----------------------------------------------------------------

    def url(self, key: Optional[str], query: Sequence[tuple[str, Optional[str]]] = ()) -> str:
        """
        The request URL for ``key`` (None: the bucket itself) with the query pairs
        ``query`` (a None value gives a bare name): ``{endpoint}/{bucket}/{key}?{query}``
        with the key percent-encoded except ``/`` and RFC 3986's unreserved
        characters.
        """
        url = f"{self._endpoint}/{quote(self._bucket, safe='')}"
        if key is not None:
            url += "/" + quote(key, safe="/~")
        if query:
            url += "?" + _query_string(query)
        return url

    def close(self) -> "Deferred[None]":
        """
        Release the store's resources (the connection pool that
        :func:`build_s3_store` made); fires when done.
        """
        if self._closer is None:
            return defer.succeed(None)
        return self._closer().addCallback(lambda _: None)

    async def _payload_hash(self, body: bytes) -> str:
        """
        The hex SHA-256 of ``body``, computed through ``defer_to_thread`` when the body
        is longer than ``hash_in_thread_over`` bytes.
        """
        if not body:
            return _EMPTY_SHA256
        if len(body) > self._hash_in_thread_over:
            return str(await self._defer_to_thread(_sha256_hex, body))
        return _sha256_hex(body)

    async def _frozen_credentials(self) -> ReadOnlyCredentials:
        """
        The current credentials, frozen; refreshed off the reactor thread when
        refreshable credentials are about to expire.
        """
        credentials = self._credentials()
        refresh_needed = getattr(credentials, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            frozen = await self._defer_to_thread(credentials.get_frozen_credentials)
        else:
            frozen = credentials.get_frozen_credentials()
        result: ReadOnlyCredentials = frozen
        return result

    async def _attempt(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        payload_hash: str,
    ) -> _Answer:
        """
        Sign and send one request, read the whole answer.

        :raises: the HTTP client's exceptions, or ``defer.TimeoutError`` after
            ``timeout`` seconds.
        """
        frozen = await self._frozen_credentials()
        request = AWSRequest(method=method, url=url)
        request.headers["Host"] = self._host
        for name, value in headers.items():
            request.headers[name] = value
        request.headers["X-Amz-Content-SHA256"] = payload_hash
        request.context["loghandler_payload_sha256"] = payload_hash
        _PrehashedS3SigV4Auth(frozen, "s3", self._region).add_auth(request)
        sent_headers = {
            name.encode("ascii"): [value.encode("ascii")]
            for name, value in request.headers.items()
        }

        async def exchange() -> _Answer:
            # No redirects: S3's 301/307 answers are errors to report, not to follow
            # with a signature made for another host.
            response = await self._client.request(
                method,
                url.encode("ascii"),
                headers=sent_headers,
                data=body or None,
                allow_redirects=False,
            )
            content = await treq.content(response)
            return _Answer(response.code, response.headers, content)

        return await defer.ensureDeferred(exchange()).addTimeout(
            self._timeout, self._clock, onTimeoutCancel=_timed_out
        )

    async def _call(
        self,
        operation: str,
        method: str,
        key: Optional[str],
        query: Sequence[tuple[str, Optional[str]]] = (),
        headers: Optional[dict[str, str]] = None,
        body: bytes = b"",
        accept: frozenset[int] = frozenset(),
        error_in_200: bool = False,
    ) -> _Answer:
        """
        Run one S3 operation with retries and return its successful answer.

        :param accept: statuses besides 2xx returned rather than raised (404 for HEAD).
        :param error_in_200: whether a 200 answer may hold an ``<Error>`` document
            (CompleteMultipartUpload, UploadPartCopy), which is then an error.
        :raises PreconditionFailed: on 412 or an error code ``PreconditionFailed``.
        :raises StorageError: on any other error, after the retries.
        """
        url = self.url(key, query)
        headers = headers or {}
        payload_hash = await self._payload_hash(body)
        attempt = 1
        while True:
            try:
                return await self._one_attempt(
                    operation, method, url, headers, body, payload_hash, accept, error_in_200
                )
            except _Retry as retry:
                if attempt >= self._max_attempts:
                    self._log.error(
                        "S3 {operation} {key!r} failed after {attempts} attempts: {reason}",
                        operation=operation,
                        key=key,
                        attempts=attempt,
                        reason=retry.reason,
                    )
                    raise retry.error from None
                delay = self._backoff.delay(attempt - 1)
                self._log.warn(
                    "S3 {operation} {key!r} attempt {attempt} failed: {reason};"
                    " retrying in {delay:.3f} s",
                    operation=operation,
                    key=key,
                    attempt=attempt,
                    reason=retry.reason,
                    delay=delay,
                    status=retry.error.status,
                    code=retry.error.code,
                )
                await deferLater(self._clock, delay, lambda: None)
                attempt += 1

    async def _one_attempt(
        self,
        operation: str,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        payload_hash: str,
        accept: frozenset[int],
        error_in_200: bool,
    ) -> _Answer:
        """
        One attempt of :meth:`_call`, its outcome classified.

        :raises _Retry: when another attempt is worth it.
        :raises StorageError: when the error is final.
        """
        try:
            answer = await self._attempt(method, url, headers, body, payload_hash)
        except _RETRY_EXCEPTIONS as e:
            if _cancelled(e):
                # Our caller cancelled the operation: no retry.
                raise defer.CancelledError() from e
            reason = f"{type(e).__name__}: {e}"
            raise _Retry(StorageError(operation, 0, type(e).__name__, str(e)), reason) from e
        if 200 <= answer.status < 300:
            if error_in_200:
                code, message = parse_error(answer.body)
                if code:
                    error = _status_error(operation, answer.status, answer.body)
                    if _is_retryable(answer.status, code):
                        raise _Retry(error, f"{answer.status} {code}")
                    raise error
            return answer
        if answer.status in accept:
            return answer
        error = _status_error(operation, answer.status, answer.body)
        if not isinstance(error, PreconditionFailed) and _is_retryable(
            answer.status, error.code
        ):
            raise _Retry(error, f"{answer.status} {error.code}".strip())
        raise error

    def _etag(self, operation: str, answer: _Answer) -> str:
        """
        The ``ETag`` header of a successful answer, quotes included.

        :raises StorageError: when it is missing.
        """
        etag = answer.header(b"etag")
        if etag is None:
            raise StorageError(operation, answer.status, "", "answer without an ETag")
        return etag

    def _document(
        self, operation: str, answer: _Answer, *root_names: str
    ) -> ElementTree.Element:
        """
        The XML document of a successful answer, checked to have one of
        ``root_names`` as its root element (in any namespace).

        :raises StorageError: when the body is not such a document.
        """
        root = parse_xml(answer.body)
        if root is None or _local_name(root.tag) not in root_names:
            raise StorageError(
                operation, answer.status, "", f"expected a {root_names[0]} document"
            )
        return root

    @staticmethod
    def _conditions(if_match: Optional[str], if_none_match: bool) -> dict[str, str]:
        """
        The ``If-Match`` / ``If-None-Match: *`` headers for a conditional write.
        """
        headers = {}
        if if_match is not None:
            headers["If-Match"] = if_match
        if if_none_match:
            headers["If-None-Match"] = "*"
        return headers

    # -- IObjectStore ------------------------------------------------------------

    def check(self) -> "Deferred[None]":
        """
        HeadBucket (``HEAD /{bucket}``): fires with None when the bucket exists and the
        credentials may use it; :class:`StorageError` with status 404 (no such bucket),
        403 (access denied) or 0 (no answer) otherwise.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_HeadBucket.html
        """

        async def run() -> None:
            await self._call("HeadBucket", "HEAD", None)

        return defer.ensureDeferred(run())

    def head(self, key: str) -> "Deferred[Optional[ObjectInfo]]":
        """
        HeadObject: the object's size (bytes, from ``Content-Length``) and ETag, or
        None on 404.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_HeadObject.html
        """

        async def run() -> Optional[ObjectInfo]:
            answer = await self._call("HeadObject", "HEAD", key, accept=frozenset({404}))
            if answer.status == 404:
                return None
            length = answer.header(b"content-length")
            if length is None or not length.strip().isdigit():
                raise StorageError(
                    "HeadObject", answer.status, "", "answer without a Content-Length"
                )
            return ObjectInfo(
                size=int(length),
                etag=self._etag("HeadObject", answer),
                write_id=answer.header(WRITE_ID_HEADER.encode("ascii")),
            )

        return defer.ensureDeferred(run())

    def get(self, key: str, if_match: str) -> "Deferred[bytes]":
        """
        GetObject of the whole object with ``If-Match: {if_match}``; fires with its
        bytes.  A changed object gives :class:`PreconditionFailed`, a missing one
        :class:`StorageError` with code ``NoSuchKey``.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html
        """

        async def run() -> bytes:
            answer = await self._call("GetObject", "GET", key, headers={"If-Match": if_match})
            return answer.body

        return defer.ensureDeferred(run())

    def put(
        self,
        key: str,
        body: bytes,
        if_match: Optional[str] = None,
        if_none_match: bool = False,
        write_id: Optional[str] = None,
    ) -> "Deferred[str]":
        """
        PutObject of ``body`` with ``Content-Type: application/gzip`` (and no
        ``Content-Encoding``), optionally ``If-Match: {if_match}`` and/or
        ``If-None-Match: *``; fires with the new ETag.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_PutObject.html
        """

        async def run() -> str:
            headers = {"Content-Type": "application/gzip"}
            headers.update(self._conditions(if_match, if_none_match))
            if write_id is not None:
                headers[WRITE_ID_HEADER] = write_id
            answer = await self._call("PutObject", "PUT", key, headers=headers, body=body)
            return self._etag("PutObject", answer)

        return defer.ensureDeferred(run())

    def create_upload(self, key: str, write_id: Optional[str] = None) -> "Deferred[str]":
        """
        CreateMultipartUpload (``POST /{bucket}/{key}?uploads``) with
        ``Content-Type: application/gzip``; fires with the ``UploadId``.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_CreateMultipartUpload.html
        """

        async def run() -> str:
            headers = {"Content-Type": "application/gzip"}
            if write_id is not None:
                headers[WRITE_ID_HEADER] = write_id
            answer = await self._call(
                "CreateMultipartUpload",
                "POST",
                key,
                query=[("uploads", None)],
                headers=headers,
            )
            root = self._document("CreateMultipartUpload", answer, "InitiateMultipartUploadResult")
            upload_id = _child_text(root, "UploadId")
            if not upload_id:
                raise StorageError("CreateMultipartUpload", answer.status, "", "no UploadId")
            return upload_id

        return defer.ensureDeferred(run())

    def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> "Deferred[str]":
        """
        UploadPart (``PUT ?partNumber={number}&uploadId={upload_id}``) of ``body``;
        fires with the part's ETag.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_UploadPart.html
        """

        async def run() -> str:
            answer = await self._call(
                "UploadPart",
                "PUT",
                key,
                query=[("partNumber", str(number)), ("uploadId", upload_id)],
                body=body,
            )
            return self._etag("UploadPart", answer)

        return defer.ensureDeferred(run())

    def upload_part_copy(
        self, key: str, upload_id: str, number: int, source_key: str, if_match: str
    ) -> "Deferred[str]":
        """
        UploadPartCopy of the whole object ``source_key`` (same bucket) as part
        ``number``, with ``x-amz-copy-source: /{bucket}/{url-quoted source_key}`` and
        ``x-amz-copy-source-if-match: {if_match}``; fires with the ETag from the
        ``CopyPartResult`` document.  A 200 answer holding an ``<Error>`` is an error.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_UploadPartCopy.html
        """

        async def run() -> str:
            source = f"/{quote(self._bucket, safe='')}/{quote(source_key, safe='/~')}"
            answer = await self._call(
                "UploadPartCopy",
                "PUT",
                key,
                query=[("partNumber", str(number)), ("uploadId", upload_id)],
                headers={
                    "x-amz-copy-source": source,
                    "x-amz-copy-source-if-match": if_match,
                },
                error_in_200=True,
            )
            root = self._document("UploadPartCopy", answer, "CopyPartResult")
            etag = _child_text(root, "ETag")
            if not etag:
                raise StorageError("UploadPartCopy", answer.status, "", "no ETag")
            return etag

        return defer.ensureDeferred(run())

    def complete_upload(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[CompletedPart],
        if_match: Optional[str] = None,
        if_none_match: bool = False,
    ) -> "Deferred[str]":
        """
        CompleteMultipartUpload (``POST ?uploadId={upload_id}``) with a
        ``<CompleteMultipartUpload>`` document listing ``parts`` as given, optionally
        ``If-Match`` / ``If-None-Match: *``; fires with the object's ETag.  A 200
        answer whose root element is ``<Error>`` is an error (retried when its code is
        InternalError, SlowDown or RequestTimeout).

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_CompleteMultipartUpload.html
        """

        async def run() -> str:
            headers = {"Content-Type": "application/xml"}
            headers.update(self._conditions(if_match, if_none_match))
            answer = await self._call(
                "CompleteMultipartUpload",
                "POST",
                key,
                query=[("uploadId", upload_id)],
                headers=headers,
                body=complete_body(parts),
                error_in_200=True,
            )
            root = self._document(
                "CompleteMultipartUpload", answer, "CompleteMultipartUploadResult"
            )
            etag = _child_text(root, "ETag")
            if not etag:
                raise StorageError("CompleteMultipartUpload", answer.status, "", "no ETag")
            return etag

        return defer.ensureDeferred(run())

    def abort_upload(self, key: str, upload_id: str) -> "Deferred[None]":
        """
        AbortMultipartUpload (``DELETE ?uploadId={upload_id}``).  An unknown upload
        errbacks with :class:`StorageError` code ``NoSuchUpload`` (404).

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_AbortMultipartUpload.html
        """

        async def run() -> None:
            await self._call(
                "AbortMultipartUpload", "DELETE", key, query=[("uploadId", upload_id)]
            )

        return defer.ensureDeferred(run())

    def list_uploads(self, prefix: str) -> "Deferred[list[PendingUpload]]":
        """
        ListMultipartUploads (``GET /{bucket}?uploads&prefix={prefix}``), following
        ``NextKeyMarker`` / ``NextUploadIdMarker`` through all pages; ``initiated`` in
        seconds since the epoch.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListMultipartUploads.html
        """

        async def run() -> list[PendingUpload]:
            uploads: list[PendingUpload] = []
            key_marker: Optional[str] = None
            upload_id_marker: Optional[str] = None
            while True:
                query: list[tuple[str, Optional[str]]] = [("uploads", None), ("prefix", prefix)]
                if key_marker is not None:
                    query.append(("key-marker", key_marker))
                if upload_id_marker is not None:
                    query.append(("upload-id-marker", upload_id_marker))
                answer = await self._call("ListMultipartUploads", "GET", None, query=query)
                root = self._document(
                    "ListMultipartUploads", answer, "ListMultipartUploadsResult"
                )
                for element in _children(root, "Upload"):
                    uploads.append(
                        PendingUpload(
                            key=_child_text(element, "Key") or "",
                            upload_id=_child_text(element, "UploadId") or "",
                            initiated=parse_timestamp(_child_text(element, "Initiated") or ""),
                        )
                    )
                if (_child_text(root, "IsTruncated") or "").strip().lower() != "true":
                    return uploads
                next_key = _child_text(root, "NextKeyMarker")
                next_id = _child_text(root, "NextUploadIdMarker")
                if not next_key or (next_key, next_id) == (key_marker, upload_id_marker):
                    raise StorageError(
                        "ListMultipartUploads", answer.status, "", "truncated without a new marker"
                    )
                key_marker, upload_id_marker = next_key, next_id

        return defer.ensureDeferred(run())

    def list_parts(self, key: str, upload_id: str) -> "Deferred[list[StoredPart]]":
        """
        ListParts (``GET ?uploadId={upload_id}``), following
        ``NextPartNumberMarker`` through all pages; parts in ascending number order.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListParts.html
        """

        async def run() -> list[StoredPart]:
            parts: list[StoredPart] = []
            marker: Optional[str] = None
            while True:
                query: list[tuple[str, Optional[str]]] = [("uploadId", upload_id)]
                if marker is not None:
                    query.append(("part-number-marker", marker))
                answer = await self._call("ListParts", "GET", key, query=query)
                # moto names the root ListPartsResponse.
                root = self._document("ListParts", answer, "ListPartsResult", "ListPartsResponse")
                for element in _children(root, "Part"):
                    parts.append(
                        StoredPart(
                            number=int(_child_text(element, "PartNumber") or "0"),
                            etag=_child_text(element, "ETag") or "",
                            size=int(_child_text(element, "Size") or "0"),
                        )
                    )
                if (_child_text(root, "IsTruncated") or "").strip().lower() != "true":
                    parts.sort(key=lambda part: part.number)
                    return parts
                next_marker = _child_text(root, "NextPartNumberMarker")
                if not next_marker or next_marker == marker:
                    raise StorageError(
                        "ListParts", answer.status, "", "truncated without a new marker"
                    )
                marker = next_marker

        return defer.ensureDeferred(run())


class _QuietClientFactory(web_client._HTTP11ClientFactory):
    """The pool's connection factory without a log line per connection."""

    noisy = False


def build_s3_store(
    reactor: Any,
    *,
    bucket: str,
    region: str,
    endpoint_url: Optional[str] = None,
    access_key: Optional[str] = None,
    secret_key: Optional[str] = None,
    pool: Optional[web_client.HTTPConnectionPool] = None,
    threadpool: Optional[ThreadPool] = None,
) -> S3Store:
    """
    Build the production :class:`S3Store`: treq over ``Agent`` with a persistent
    ``HTTPConnectionPool`` (16 connections per host, idle ones dropped after 15 s,
    before S3 drops them), hashing on a thread pool, backoff on ``reactor``.

    :param reactor: provides ``IReactorTime``, ``IReactorTCP``/``IReactorSSL`` and
        ``IReactorThreads``.
    :param bucket: the bucket name.
    :param region: the signing region, e.g. ``eu-west-1``.
    :param endpoint_url: an S3-compatible endpoint (moto, MinIO); default
        ``https://s3.{region}.amazonaws.com``.  Requests are path-style either way.
    :param access_key: with ``secret_key``, static credentials (``AWS_ACCESS_KEY`` /
        ``AWS_ACCESS_SECRET``); without both, botocore's standard chain (environment,
        shared config and profile, web identity, container and instance metadata),
        whose credentials refresh themselves.  Reading the chain may block briefly
        (instance metadata) -- call this at start-up.
    :param pool: a connection pool to use instead; it stays the caller's to close.
    :param threadpool: the pool to hash on; default ``reactor.getThreadPool()``.
    :returns: the store; its ``close()`` closes the pool this function made.
    :raises ValueError: when only one of ``access_key`` / ``secret_key`` is given, or
        when neither they nor the standard chain yield credentials.
    """
    if endpoint_url is None:
        endpoint_url = f"https://s3.{region}.amazonaws.com"
    if bool(access_key) != bool(secret_key):
        missing = "AWS_ACCESS_SECRET" if access_key else "AWS_ACCESS_KEY"
        raise ValueError(
            f"{missing} is not set: set both AWS_ACCESS_KEY and AWS_ACCESS_SECRET, or neither"
            " to use the standard AWS chain"
        )
    credentials: Optional[Credentials]
    if access_key and secret_key:
        credentials = Credentials(access_key, secret_key)
    else:
        import botocore.session

        credentials = botocore.session.get_session().get_credentials()
    if credentials is None:
        raise ValueError(
            "no AWS credentials: set AWS_ACCESS_KEY and AWS_ACCESS_SECRET or configure"
            " the standard AWS chain"
        )
    found: Credentials = credentials

    closer: Optional[Callable[[], "Deferred[Any]"]] = None
    if pool is None:
        pool = web_client.HTTPConnectionPool(reactor, persistent=True)
        # Twisted logs "Starting factory"/"Stopping factory" for every connection.
        pool._factory = _QuietClientFactory
        pool.maxPersistentPerHost = 16
        pool.cachedConnectionTimeout = 15
        closer = pool.closeCachedConnections
    agent = web_client.Agent(reactor, pool=pool)
    http_client = HTTPClient(agent)
    if threadpool is None:
        threadpool = reactor.getThreadPool()
    chosen_pool: ThreadPool = threadpool

    def defer_to_thread(f: Callable[..., _T], *args: Any) -> "Deferred[_T]":
        """Run ``f(*args)`` on the thread pool."""
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(reactor, chosen_pool, f, *args)

    return S3Store(
        http_client,
        endpoint_url,
        bucket,
        region,
        lambda: found,
        reactor,
        defer_to_thread,
        closer=closer,
    )

