"""
:class:`S3Client`: :class:`~loghandler.storage.s3.api.IS3Client` over S3's REST API,
one attempt per call, and :func:`build_s3_client`, which wires it to treq, a
connection pool and a thread pool.

Each method builds its request (path-style, ``/{bucket}/{url-quoted key}``, so the
same code talks to AWS, moto and MinIO), sends it once through
:class:`~loghandler.storage.s3.transport.SigV4Transport`, and reads the answer
(:mod:`loghandler.storage.s3.documents`).  It neither retries nor times out: the one
retry layer (:mod:`loghandler.retry`) does both, and cancels a call's Deferred on
timeout, which cancels its HTTP request.

Errors:

- an error answer: :class:`~loghandler.interfaces.StorageError` with the operation,
  the HTTP status and S3's ``Code`` and ``Message`` ("" when the answer has no
  ``<Error>`` document, as HEAD answers never do);
- 412, or code ``PreconditionFailed``: :class:`~loghandler.interfaces.PreconditionFailed`;
- a 200 answer holding an ``<Error>`` document (CompleteMultipartUpload and
  UploadPartCopy may send one): a StorageError with that code and status 200;
- a success answer that is not what the operation returns (no ETag, not the
  expected document): a StorageError with that status and code "";
- no answer: the HTTP client's exception, unchanged.

S3 API pages: https://docs.aws.amazon.com/AmazonS3/latest/API/API_Operations_Amazon_Simple_Storage_Service.html
(each method names its own); errors:
https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, TypeVar
from urllib.parse import quote

import attrs
from botocore.credentials import Credentials
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool
from twisted.web import client as web_client
from zope.interface import implementer

from loghandler.interfaces import PreconditionFailed, StorageError
from loghandler.storage.s3 import documents
from loghandler.storage.s3.api import (
    WRITES_METADATA,
    CompletedPart,
    IS3Client,
    ListedObject,
    ObjectInfo,
    PendingUpload,
    StoredPart,
)
from loghandler.storage.s3.transport import Answer, SigV4Transport
from loghandler.threads import on_thread_pool

__all__ = ["S3Client", "ServerSideEncryption", "build_s3_client", "WRITES_HEADER"]

_T = TypeVar("_T")

#: The header that carries an object's write IDs (user metadata).
WRITES_HEADER = "x-amz-meta-" + WRITES_METADATA

Query = Sequence[tuple[str, Optional[str]]]


def _error(operation: str, status: int, body: bytes) -> StorageError:
    """
    The error for an error answer: :class:`PreconditionFailed` for 412 or code
    ``PreconditionFailed``, else :class:`StorageError` with S3's code and message.
    """
    code, message = documents.parse_error(body)
    if status == 412 or code == "PreconditionFailed":
        return PreconditionFailed(operation, message)
    return StorageError(operation, status, code, message)


def _conditions(if_match: Optional[str], if_none_match: bool) -> dict[str, str]:
    """The ``If-Match`` / ``If-None-Match: *`` headers of a conditional write."""
    headers = {}
    if if_match is not None:
        headers["If-Match"] = if_match
    if if_none_match:
        headers["If-None-Match"] = "*"
    return headers


def _writes_header(writes: Sequence[str]) -> dict[str, str]:
    """
    The write IDs as user metadata, comma-joined; no header when there are none.

    :raises ValueError: when an ID is empty, holds a comma or is not printable ASCII.
    """
    for write in writes:
        if not write or "," in write or not (write.isascii() and write.isprintable()):
            raise ValueError(f"a write ID must be printable ASCII without commas: {write!r}")
    return {WRITES_HEADER: ",".join(writes)} if writes else {}


@attrs.frozen
class ServerSideEncryption:
    """
    The server-side encryption every object the client creates asks for (PutObject
    and CreateMultipartUpload; the parts and the completed object of a multipart
    upload take its creation's).

    :ivar algorithm: ``AES256`` (SSE-S3) or ``aws:kms`` (SSE-KMS), sent as
        ``x-amz-server-side-encryption``.
    :ivar kms_key_id: with ``aws:kms``, the key (ID, ARN or ``alias/NAME``), sent as
        ``x-amz-server-side-encryption-aws-kms-key-id``; None lets S3 use the AWS
        managed key ``aws/s3``.

    https://docs.aws.amazon.com/AmazonS3/latest/userguide/specifying-kms-encryption.html
    """

    algorithm: str
    kms_key_id: Optional[str] = None

    def headers(self) -> dict[str, str]:
        """The request headers that ask for this encryption."""
        headers = {"x-amz-server-side-encryption": self.algorithm}
        if self.kms_key_id is not None:
            headers["x-amz-server-side-encryption-aws-kms-key-id"] = self.kms_key_id
        return headers


def _byte_range(byte_range: tuple[int, int]) -> str:
    """
    ``bytes=start-last`` for the half-open ``(start, end)``: HTTP ranges include
    their last byte.

    :raises ValueError: when the range is empty or negative.
    """
    start, end = byte_range
    if not 0 <= start < end:
        raise ValueError(f"byte range must have 0 <= start < end: {byte_range!r}")
    return f"bytes={start}-{end - 1}"


@implementer(IS3Client)
class S3Client:
    """
    :class:`~loghandler.storage.s3.api.IS3Client` on one bucket (see the module
    docstring for the errors).

    :param transport: signs and sends the requests.
    :param bucket: the bucket's name.
    :param closer: called by :meth:`close` (to close a connection pool it owns).
    :param encryption: the server-side encryption of every object it creates; None
        leaves it to the bucket's default encryption.
    """

    name = "s3"

    def __init__(
        self,
        transport: SigV4Transport,
        bucket: str,
        closer: Optional[Callable[[], "Deferred[Any]"]] = None,
        encryption: Optional[ServerSideEncryption] = None,
    ) -> None:
        self._transport = transport
        self.bucket = bucket
        self._closer = closer
        self.encryption = encryption
        self._creating = encryption.headers() if encryption is not None else {}

    def __repr__(self) -> str:
        return f"<S3Client {self._transport.endpoint_url}/{self.bucket}>"

    # -- plumbing ----------------------------------------------------------------

    def path(self, key: Optional[str]) -> str:
        """
        The path of ``key`` (None: of the bucket): ``/{bucket}/{key}``, the key
        percent-encoded except ``/`` and RFC 3986's unreserved characters.

        :raises ValueError: for an empty key.
        """
        path = "/" + quote(self.bucket, safe="")
        if key is None:
            return path
        if not key:
            raise ValueError("an object key must not be empty")
        return path + "/" + quote(key, safe="/~")

    async def _call(
        self,
        operation: str,
        method: str,
        key: Optional[str],
        query: Query = (),
        headers: Optional[dict[str, str]] = None,
        body: bytes = b"",
        error_in_200: bool = False,
    ) -> Answer:
        """
        Send one request and return its success (2xx) answer.

        :param error_in_200: whether a 200 answer may hold an ``<Error>`` document
            that makes it an error (CompleteMultipartUpload, UploadPartCopy).
        :raises StorageError: for an error answer (see the module docstring).
        """
        answer = await self._transport.send(method, self.path(key), query, headers, body)
        if not 200 <= answer.status < 300:
            raise _error(operation, answer.status, answer.body)
        if error_in_200 and documents.parse_error(answer.body)[0]:
            raise _error(operation, answer.status, answer.body)
        return answer

    @staticmethod
    def _etag(operation: str, answer: Answer) -> str:
        """
        The ``ETag`` header of a success answer, quotes kept.

        :raises StorageError: when there is none.
        """
        etag = answer.header("etag")
        if not etag:
            raise StorageError(operation, answer.status, "", "answer without an ETag")
        return etag

    @staticmethod
    def _read(operation: str, answer: Answer, parse: Callable[[bytes], _T]) -> _T:
        """
        ``parse(answer.body)``.

        :raises StorageError: when the body is not the expected document.
        """
        try:
            return parse(answer.body)
        except documents.DocumentError as e:
            raise StorageError(operation, answer.status, "", str(e)) from None

    async def _pages(
        self,
        operation: str,
        key: Optional[str],
        query: Query,
        parse: Callable[[bytes], documents.Page[_T]],
        next_query: Callable[[tuple[str, ...]], Query],
    ) -> list[_T]:
        """
        Every page of a listing: GET ``query``, then ``query`` plus
        ``next_query(page.next)`` until a page is the last.

        :raises StorageError: also when a page names the same next page again.
        """
        items: list[_T] = []
        following: Optional[tuple[str, ...]] = None
        while True:
            extra = next_query(following) if following is not None else ()
            answer = await self._call(operation, "GET", key, [*query, *extra])
            page = self._read(operation, answer, parse)
            items.extend(page.items)
            if page.next is None:
                return items
            if page.next == following:
                raise StorageError(operation, answer.status, "", "the listing does not advance")
            following = page.next

    # -- IS3Client ---------------------------------------------------------------

    def head(self, key: str) -> "Deferred[Optional[ObjectInfo]]":
        """
        HeadObject: the object's size (``Content-Length``, bytes), ETag and write IDs
        (``x-amz-meta-loghandler-writes``, comma-separated), or None on 404.  (A
        missing bucket answers HEAD with 404 too, and HEAD answers have no body to
        tell them apart: :meth:`check` finds a missing bucket.)

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_HeadObject.html
        """

        async def run() -> Optional[ObjectInfo]:
            answer = await self._transport.send("HEAD", self.path(key))
            if answer.status == 404:
                return None
            if not 200 <= answer.status < 300:
                raise _error("HeadObject", answer.status, answer.body)
            length = (answer.header("content-length") or "").strip()
            if not length.isdigit():
                raise StorageError("HeadObject", answer.status, "", "answer without a Content-Length")
            writes = answer.header(WRITES_HEADER) or ""
            return ObjectInfo(
                size=int(length),
                etag=self._etag("HeadObject", answer),
                writes=tuple(w.strip() for w in writes.split(",") if w.strip()),
            )

        return Deferred.fromCoroutine(run())

    def get(
        self,
        key: str,
        if_match: Optional[str] = None,
        byte_range: Optional[tuple[int, int]] = None,
    ) -> "Deferred[bytes]":
        """
        GetObject of the object's bytes, or of ``byte_range`` (``(start, end)``, end
        exclusive, sent as ``Range: bytes=start-(end-1)``; S3 answers the bytes that
        exist, 416 InvalidRange when ``start`` is past the end), with
        ``If-Match: {if_match}`` when given.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html

        :raises ValueError: (errback) for an empty or negative range.
        """

        async def run() -> bytes:
            headers = _conditions(if_match, False)
            if byte_range is not None:
                headers["Range"] = _byte_range(byte_range)
            answer = await self._call("GetObject", "GET", key, headers=headers)
            return answer.body

        return Deferred.fromCoroutine(run())

    def put(
        self,
        key: str,
        body: bytes,
        if_match: Optional[str] = None,
        if_none_match: bool = False,
        writes: Sequence[str] = (),
    ) -> "Deferred[str]":
        """
        PutObject of ``body`` with ``Content-Type: application/gzip`` (no
        Content-Encoding), ``If-Match`` / ``If-None-Match: *`` when asked, the
        write IDs in ``x-amz-meta-loghandler-writes`` when there are any, and the
        client's server-side encryption headers; fires with the new ETag.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_PutObject.html

        :raises ValueError: (errback) for a write ID that is empty, holds a comma or
            is not printable ASCII.
        """

        async def run() -> str:
            headers = {"Content-Type": "application/gzip"}
            headers.update(_conditions(if_match, if_none_match))
            headers.update(_writes_header(writes))
            headers.update(self._creating)
            answer = await self._call("PutObject", "PUT", key, headers=headers, body=body)
            return self._etag("PutObject", answer)

        return Deferred.fromCoroutine(run())

    def create_upload(self, key: str, writes: Sequence[str] = ()) -> "Deferred[str]":
        """
        CreateMultipartUpload (``POST ?uploads``) with ``Content-Type:
        application/gzip``, the write IDs and the server-side encryption headers as
        for :meth:`put`; fires with the ``UploadId``.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_CreateMultipartUpload.html
        """

        async def run() -> str:
            headers = {"Content-Type": "application/gzip"}
            headers.update(_writes_header(writes))
            headers.update(self._creating)
            answer = await self._call(
                "CreateMultipartUpload", "POST", key, [("uploads", None)], headers
            )
            return self._read("CreateMultipartUpload", answer, documents.parse_upload_id)

        return Deferred.fromCoroutine(run())

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
                [("partNumber", str(number)), ("uploadId", upload_id)],
                body=body,
            )
            return self._etag("UploadPart", answer)

        return Deferred.fromCoroutine(run())

    def upload_part_copy(
        self,
        key: str,
        upload_id: str,
        number: int,
        source_key: str,
        if_match: str,
        byte_range: Optional[tuple[int, int]] = None,
    ) -> "Deferred[str]":
        """
        UploadPartCopy (``PUT ?partNumber={number}&uploadId={upload_id}``) with
        ``x-amz-copy-source: /{bucket}/{url-quoted source_key}``,
        ``x-amz-copy-source-if-match: {if_match}`` and, for ``byte_range``,
        ``x-amz-copy-source-range: bytes=start-(end-1)``; fires with the ETag of the
        ``CopyPartResult``.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_UploadPartCopy.html

        :raises ValueError: (errback) for an empty or negative range.
        """

        async def run() -> str:
            headers = {
                "x-amz-copy-source": self.path(source_key),
                "x-amz-copy-source-if-match": if_match,
            }
            if byte_range is not None:
                headers["x-amz-copy-source-range"] = _byte_range(byte_range)
            answer = await self._call(
                "UploadPartCopy",
                "PUT",
                key,
                [("partNumber", str(number)), ("uploadId", upload_id)],
                headers,
                error_in_200=True,
            )
            return self._read(
                "UploadPartCopy", answer, lambda body: documents.parse_etag(body, "CopyPartResult")
            )

        return Deferred.fromCoroutine(run())

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
        ``<CompleteMultipartUpload>`` document listing ``parts`` as given and
        ``If-Match`` / ``If-None-Match: *`` when asked; fires with the object's ETag.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_CompleteMultipartUpload.html
        """

        async def run() -> str:
            headers = {"Content-Type": "application/xml"}
            headers.update(_conditions(if_match, if_none_match))
            answer = await self._call(
                "CompleteMultipartUpload",
                "POST",
                key,
                [("uploadId", upload_id)],
                headers,
                documents.complete_body(parts),
                error_in_200=True,
            )
            return self._read(
                "CompleteMultipartUpload",
                answer,
                lambda body: documents.parse_etag(body, "CompleteMultipartUploadResult"),
            )

        return Deferred.fromCoroutine(run())

    def abort_upload(self, key: str, upload_id: str) -> "Deferred[None]":
        """
        AbortMultipartUpload (``DELETE ?uploadId={upload_id}``).

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_AbortMultipartUpload.html
        """

        async def run() -> None:
            await self._call("AbortMultipartUpload", "DELETE", key, [("uploadId", upload_id)])

        return Deferred.fromCoroutine(run())

    def delete(self, key: str) -> "Deferred[None]":
        """
        DeleteObject (``DELETE /{bucket}/{key}``); S3 answers 204 whether or not the
        key existed.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_DeleteObject.html
        """

        async def run() -> None:
            await self._call("DeleteObject", "DELETE", key)

        return Deferred.fromCoroutine(run())

    def list_uploads(self, prefix: str) -> "Deferred[list[PendingUpload]]":
        """
        ListMultipartUploads (``GET /{bucket}?uploads&prefix={prefix}``), following
        ``key-marker`` / ``upload-id-marker`` through all pages; in S3's order (key,
        then initiation).

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListMultipartUploads.html
        """
        return Deferred.fromCoroutine(
            self._pages(
                "ListMultipartUploads",
                None,
                [("uploads", None), ("prefix", prefix)],
                documents.parse_uploads,
                lambda markers: [("key-marker", markers[0]), ("upload-id-marker", markers[1])],
            )
        )

    def list_parts(self, key: str, upload_id: str) -> "Deferred[list[StoredPart]]":
        """
        ListParts (``GET ?uploadId={upload_id}``), following ``part-number-marker``
        through all pages; in part number order.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListParts.html
        """

        async def run() -> list[StoredPart]:
            parts = await self._pages(
                "ListParts",
                key,
                [("uploadId", upload_id)],
                documents.parse_parts,
                lambda marker: [("part-number-marker", marker[0])],
            )
            return sorted(parts, key=lambda part: part.number)

        return Deferred.fromCoroutine(run())

    def list_objects(self, prefix: str) -> "Deferred[list[ListedObject]]":
        """
        ListObjectsV2 (``GET /{bucket}?list-type=2&prefix={prefix}``), following
        ``continuation-token`` through all pages; in key order.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListObjectsV2.html
        """
        return Deferred.fromCoroutine(
            self._pages(
                "ListObjectsV2",
                None,
                [("list-type", "2"), ("prefix", prefix)],
                documents.parse_objects,
                lambda token: [("continuation-token", token[0])],
            )
        )

    def versioning(self) -> "Deferred[str]":
        """
        GetBucketVersioning (``GET /{bucket}?versioning``): ``"Enabled"``,
        ``"Suspended"`` or ``""``.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetBucketVersioning.html
        """

        async def run() -> str:
            answer = await self._call("GetBucketVersioning", "GET", None, [("versioning", None)])
            return self._read("GetBucketVersioning", answer, documents.parse_versioning)

        return Deferred.fromCoroutine(run())

    def check(self) -> "Deferred[None]":
        """
        HeadBucket (``HEAD /{bucket}``): fires when the bucket exists and the
        credentials may use it; a StorageError with status 404 (no such bucket), 403
        (access denied) or 301 (another region) and code "" (HEAD answers have no
        body) otherwise.

        https://docs.aws.amazon.com/AmazonS3/latest/API/API_HeadBucket.html
        """

        async def run() -> None:
            await self._call("HeadBucket", "HEAD", None)

        return Deferred.fromCoroutine(run())

    def close(self) -> "Deferred[None]":
        """
        Close the connection pool that :func:`build_s3_client` made (a pool passed
        in stays open); fires when done.
        """
        if self._closer is None:
            return defer.succeed(None)
        return self._closer().addCallback(lambda _: None)


class _QuietClientFactory(web_client._HTTP11ClientFactory):
    """The pool's connection factory without a log line per connection."""

    noisy = False


def build_s3_client(
    reactor: Any,
    *,
    bucket: str,
    region: str,
    endpoint_url: Optional[str] = None,
    credentials: Credentials,
    pool: Optional[web_client.HTTPConnectionPool] = None,
    threadpool: Optional[ThreadPool] = None,
    encryption: Optional[ServerSideEncryption] = None,
) -> S3Client:
    """
    The production :class:`S3Client`: treq over an ``Agent`` with a persistent
    ``HTTPConnectionPool`` (16 connections per host, idle ones closed after 15 s,
    before S3 closes them), hashing and credential refreshes on a thread pool.

    :param reactor: provides ``IReactorTCP``/``IReactorSSL``, ``IReactorTime`` and
        ``IReactorThreads``.
    :param bucket: the bucket's name.
    :param region: the signing region, such as ``eu-west-1``.
    :param endpoint_url: an S3-compatible endpoint (moto, MinIO); by default
        ``https://s3.{region}.amazonaws.com``.  Path-style either way.
    :param credentials: botocore ``Credentials``, static or refreshable (see
        :func:`loghandler.storage.s3.credentials.aws_credentials`).
    :param pool: a connection pool to use; it stays the caller's to close.
    :param threadpool: the pool for blocking work; default
        ``reactor.getThreadPool()``.
    :param encryption: the server-side encryption of every object created
        (``S3_SSE``); None: the bucket's default.
    :returns: the client; its ``close()`` closes the pool this function made.
    """
    if endpoint_url is None:
        endpoint_url = f"https://s3.{region}.amazonaws.com"
    closer: Optional[Callable[[], "Deferred[Any]"]] = None
    if pool is None:
        pool = web_client.HTTPConnectionPool(reactor, persistent=True)
        # Twisted logs "Starting factory"/"Stopping factory" for every connection.
        pool._factory = _QuietClientFactory
        pool.maxPersistentPerHost = 16
        pool.cachedConnectionTimeout = 15
        closer = pool.closeCachedConnections
    http = HTTPClient(web_client.Agent(reactor, pool=pool))
    transport = SigV4Transport(
        http, endpoint_url, region, credentials, on_thread_pool(reactor, threadpool)
    )
    return S3Client(transport, bucket, closer, encryption)
