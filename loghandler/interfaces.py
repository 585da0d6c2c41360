"""
The storage interface the streams drive, and the values and errors it uses.

The operations are those of S3's multipart upload API
(https://docs.aws.amazon.com/AmazonS3/latest/API/API_CreateMultipartUpload.html and
its siblings), reduced to what the data path needs.  An implementation talks to S3
(:mod:`loghandler.storage.s3`), keeps everything in memory for tests
(:mod:`loghandler.storage.memory`) or discards the bytes (``NO_UPLOAD=1``).

ETags are opaque strings passed back exactly as the store returned them (S3 returns
them with their double quotes, and ``If-Match`` wants them so).

A write ID is a random string that a writer attaches to the object it writes (S3 user
metadata, ``x-amz-meta-loghandler-write-id``): when the answer to a write is lost and
the write is tried again, HEAD tells whether the first try landed, so that no line is
appended twice.
"""

from __future__ import annotations

from typing import Optional, Sequence

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


@attrs.frozen
class ObjectInfo:
    """
    What HeadObject tells of an existing object.

    :ivar size: the object's length in bytes.
    :ivar etag: its ETag, quotes included.
    :ivar write_id: the write ID of the PutObject or multipart upload that last wrote
        it (user metadata ``x-amz-meta-loghandler-write-id``), or None.
    """

    size: int
    etag: str
    write_id: Optional[str] = None


@attrs.frozen
class CompletedPart:
    """
    One part of a multipart upload as CompleteMultipartUpload lists it.

    :ivar number: the part number, 1 to 10,000.
    :ivar etag: the ETag that UploadPart or UploadPartCopy returned for it.
    """

    number: int
    etag: str


@attrs.frozen
class PendingUpload:
    """
    A multipart upload that was created and neither completed nor aborted
    (ListMultipartUploads).

    :ivar key: the object key it will complete as.
    :ivar upload_id: its upload ID.
    :ivar initiated: when it was created, in seconds since the Unix epoch.
    """

    key: str
    upload_id: str
    initiated: float


@attrs.frozen
class StoredPart:
    """
    One uploaded part as ListParts reports it.

    :ivar number: the part number.
    :ivar etag: its ETag.
    :ivar size: its length in bytes.
    """

    number: int
    etag: str
    size: int


class StorageError(Exception):
    """
    A storage call failed for good (after the store's own retries).

    :ivar status: the HTTP status, or 0 when no response came.
    :ivar code: the store's error code (``NoSuchUpload``, ``EntityTooSmall``...), or "".
    :ivar operation: the operation that failed, such as ``UploadPart``.
    """

    def __init__(self, operation: str, status: int = 0, code: str = "", message: str = ""):
        super().__init__(f"{operation} failed: {status} {code} {message}".strip())
        self.operation = operation
        self.status = status
        self.code = code
        self.message = message


class PreconditionFailed(StorageError):
    """
    412 Precondition Failed: an ``If-Match``, ``If-None-Match: *`` or
    ``x-amz-copy-source-if-match`` condition did not hold, because another writer
    changed the object first.
    """

    def __init__(self, operation: str, message: str = ""):
        super().__init__(operation, 412, "PreconditionFailed", message)


class IObjectStore(Interface):
    """
    An S3-like object store.  Every method returns a Deferred; a failed call errbacks
    with :class:`StorageError`, a failed condition with :class:`PreconditionFailed`.
    Keys are ``str`` (S3 object keys, no leading slash); bodies are ``bytes``.
    """

    name = Attribute("A short name for logs: 's3', 'memory', 'discard'.")

    def head(key: str) -> "Deferred[Optional[ObjectInfo]]":
        """
        HeadObject: the object's size and ETag, or None when there is no such key.
        """

    def get(key: str, if_match: str) -> "Deferred[bytes]":
        """
        GetObject of the whole object, only while its ETag is ``if_match``
        (else :class:`PreconditionFailed`).
        """

    def put(
        key: str,
        body: bytes,
        if_match: Optional[str] = None,
        if_none_match: bool = False,
        write_id: Optional[str] = None,
    ) -> "Deferred[str]":
        """
        PutObject with ``Content-Type: application/gzip``; fires with the new ETag.

        :param if_match: replace only the object with this ETag.
        :param if_none_match: write only if the key does not exist (``If-None-Match: *``).
        :param write_id: stored with the object, reported by :meth:`head`.
        """

    def create_upload(key: str, write_id: Optional[str] = None) -> "Deferred[str]":
        """
        CreateMultipartUpload with ``Content-Type: application/gzip``; fires with the
        upload ID.  ``write_id`` is stored with the object the upload completes.
        """

    def upload_part(key: str, upload_id: str, number: int, body: bytes) -> "Deferred[str]":
        """
        UploadPart: store ``body`` as part ``number`` (1 to 10,000), replacing an
        earlier upload of that number; fires with the part's ETag.
        """

    def upload_part_copy(
        key: str, upload_id: str, number: int, source_key: str, if_match: str
    ) -> "Deferred[str]":
        """
        UploadPartCopy: make the whole object ``source_key`` part ``number``, only
        while its ETag is ``if_match`` (``x-amz-copy-source-if-match``); fires with the
        part's ETag.  The source must be 5 MiB to 5 GiB.
        """

    def complete_upload(
        key: str,
        upload_id: str,
        parts: Sequence[CompletedPart],
        if_match: Optional[str] = None,
        if_none_match: bool = False,
    ) -> "Deferred[str]":
        """
        CompleteMultipartUpload with the given parts in ascending number order; fires
        with the object's ETag.  An ``<Error>`` document inside a 200 answer is an
        error.  ``if_match`` / ``if_none_match`` as for :meth:`put`.
        """

    def abort_upload(key: str, upload_id: str) -> "Deferred[None]":
        """
        AbortMultipartUpload: discard the upload and its parts.
        """

    def list_uploads(prefix: str) -> "Deferred[list[PendingUpload]]":
        """
        ListMultipartUploads under ``prefix``, all pages.
        """

    def list_parts(key: str, upload_id: str) -> "Deferred[list[StoredPart]]":
        """
        ListParts of one upload, all pages, in part number order.
        """

    def check() -> "Deferred[None]":
        """
        Check that the bucket exists and can be reached with these credentials
        (HeadBucket); :class:`StorageError` if not.
        """

    def close() -> "Deferred[None]":
        """
        Release connections; called once when the server stops, after the flush.
        """
