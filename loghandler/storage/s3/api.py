"""
The S3 calls the S3 writer makes (:class:`IS3Client`), and the values they take and
give.  One call is one attempt: an implementation does not retry; the one retry layer
(:mod:`loghandler.retry`) classifies every failure and decides.

Implementations: :class:`loghandler.storage.s3.client.S3Client` (treq and botocore,
against AWS, moto or MinIO) and :class:`loghandler.storage.memory.MemoryStore`, the
in-memory reference with S3's rules that unit and model-based tests use.

ETags are opaque strings passed back exactly as S3 returned them (with their double
quotes, as ``If-Match`` wants them).

Write IDs: every object the daemon writes carries, in the user metadata
``x-amz-meta-loghandler-writes``, the comma-separated write IDs (random hex strings,
newest last, at most :data:`MAX_WRITES` and :data:`MAX_WRITES_BYTES`, see
:func:`newest_writes`) of the staging objects merged into it.  S3 sets an
object's metadata when it is created (PutObject) or when its multipart upload is
created (CreateMultipartUpload), so a merge upload is created after the HEAD that
shows the key's list.  When the answer to a write is lost, HEAD tells whether it
landed (DESIGN.md section 5).

Failures errback with :class:`loghandler.interfaces.StorageError` (an HTTP error
answer: status and S3 error code), :class:`loghandler.interfaces.PreconditionFailed`
(412), or the HTTP client's own exception when no answer came (connection refused,
lost, cancelled).

S3 API pages: https://docs.aws.amazon.com/AmazonS3/latest/API/API_Operations_Amazon_Simple_Storage_Service.html
"""

from __future__ import annotations

from typing import Optional, Sequence

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

#: The user metadata entry (``x-amz-meta-`` + this) that lists an object's write IDs.
WRITES_METADATA = "loghandler-writes"

#: Write IDs kept in an object's metadata at most.  A merge takes at most half as
#: many staging objects (:data:`~loghandler.storage.s3.merge.MAX_BATCH`), so that
#: the IDs of one merge are still listed after the next one.
MAX_WRITES = 96

#: Bytes of the comma-joined write IDs kept at most: S3 allows 2 KB of user
#: metadata (names and values); 96 IDs of 16 hex digits take 1,631 bytes, and the
#: 32-digit IDs of earlier versions (at most 16 in a list they wrote) fit beside
#: 80 of them.
MAX_WRITES_BYTES = 1900


def newest_writes(writes: Sequence[str]) -> tuple[str, ...]:
    """
    The newest of ``writes`` (oldest first) that fit in :data:`MAX_WRITES` entries
    and :data:`MAX_WRITES_BYTES` bytes when comma-joined, oldest first.
    """
    kept: list[str] = []
    size = -1
    for write in reversed(writes):
        if len(kept) == MAX_WRITES or size + 1 + len(write) > MAX_WRITES_BYTES:
            break
        kept.append(write)
        size += 1 + len(write)
    return tuple(reversed(kept))


@attrs.frozen
class ObjectInfo:
    """
    What HeadObject tells of an existing object.

    :ivar size: the object's length in bytes.
    :ivar etag: its ETag, quotes included.
    :ivar writes: the write IDs in its metadata, oldest first (empty when none).
    """

    size: int
    etag: str
    writes: tuple[str, ...] = ()


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


@attrs.frozen
class ListedObject:
    """
    One object as ListObjectsV2 reports it.

    :ivar key: its key.
    :ivar size: its length in bytes.
    :ivar etag: its ETag, quotes included.
    :ivar last_modified: seconds since the Unix epoch, by S3's clock.
    """

    key: str
    size: int
    etag: str
    last_modified: float


class IS3Client(Interface):
    """
    One S3 bucket's calls, one attempt each.  Every method returns a Deferred.  Keys
    are ``str`` (no leading slash); bodies are ``bytes``; byte ranges are
    ``(start, end)`` with ``end`` exclusive, in bytes, and not empty.  Write IDs are
    non-empty printable ASCII without commas; the S3 client errbacks with
    ``ValueError`` for a malformed write ID or range (a caller's bug).
    """

    name = Attribute("A short name for logs: 's3', 'memory'.")

    def head(key: str) -> "Deferred[Optional[ObjectInfo]]":
        """
        HeadObject: the object's size, ETag and write IDs, or None when there is no
        such key (404).
        """

    def get(
        key: str, if_match: Optional[str] = None, byte_range: Optional[tuple[int, int]] = None
    ) -> "Deferred[bytes]":
        """
        GetObject of the object (or of ``byte_range`` of it, ``Range: bytes=start-(end-1)``),
        only while its ETag is ``if_match`` when given (else :class:`PreconditionFailed`).
        A missing key errbacks with StorageError code ``NoSuchKey`` (404).
        """

    def put(
        key: str,
        body: bytes,
        if_match: Optional[str] = None,
        if_none_match: bool = False,
        writes: Sequence[str] = (),
    ) -> "Deferred[str]":
        """
        PutObject with ``Content-Type: application/gzip`` (no Content-Encoding) and the
        write IDs ``writes`` in its metadata; fires with the new ETag.

        :param if_match: replace only the object with this ETag (else 412).
        :param if_none_match: write only if the key does not exist (``If-None-Match: *``).
        """

    def create_upload(key: str, writes: Sequence[str] = ()) -> "Deferred[str]":
        """
        CreateMultipartUpload with ``Content-Type: application/gzip`` and the write IDs
        ``writes`` in the metadata of the object it will complete as; fires with the
        upload ID.
        """

    def upload_part(key: str, upload_id: str, number: int, body: bytes) -> "Deferred[str]":
        """
        UploadPart: store ``body`` as part ``number`` (1 to 10,000), replacing an
        earlier upload of that number; fires with the part's ETag.  An unknown upload
        errbacks with code ``NoSuchUpload`` (404).
        """

    def upload_part_copy(
        key: str,
        upload_id: str,
        number: int,
        source_key: str,
        if_match: str,
        byte_range: Optional[tuple[int, int]] = None,
    ) -> "Deferred[str]":
        """
        UploadPartCopy: make the object ``source_key`` (same bucket), or its
        ``byte_range`` (``x-amz-copy-source-range``), part ``number``, only while its
        ETag is ``if_match`` (``x-amz-copy-source-if-match``, else 412); fires with
        the part's ETag.  A copied piece holds at most 5 GiB.
        """

    def complete_upload(
        key: str,
        upload_id: str,
        parts: Sequence[CompletedPart],
        if_match: Optional[str] = None,
        if_none_match: bool = False,
    ) -> "Deferred[str]":
        """
        CompleteMultipartUpload with ``parts`` in ascending number order; fires with
        the object's ETag.  An ``<Error>`` document inside a 200 answer is an error.
        ``if_match`` / ``if_none_match`` as for :meth:`put`; S3 answers 409
        ``ConditionalRequestConflict`` (and discards the upload) when a conditional
        Complete races another write of the key, and ``NoSuchUpload`` (404) for an
        upload that was aborted.  A repeat of the Complete that made the current
        object may answer 200 with the same ETag (S3 and moto treat it as
        idempotent for a while) or ``NoSuchUpload``: callers must accept both.
        """

    def abort_upload(key: str, upload_id: str) -> "Deferred[None]":
        """
        AbortMultipartUpload: discard the upload and its parts.  An unknown upload
        errbacks with code ``NoSuchUpload`` (404).
        """

    def delete(key: str) -> "Deferred[None]":
        """
        DeleteObject.  Deleting a missing key succeeds (S3 answers 204 either way).
        """

    def list_uploads(prefix: str) -> "Deferred[list[PendingUpload]]":
        """
        ListMultipartUploads under ``prefix``, all pages, ordered by key then upload.
        """

    def list_parts(key: str, upload_id: str) -> "Deferred[list[StoredPart]]":
        """
        ListParts of one upload, all pages, in part number order.  An unknown upload
        errbacks with code ``NoSuchUpload`` (404).
        """

    def list_objects(prefix: str) -> "Deferred[list[ListedObject]]":
        """
        ListObjectsV2 under ``prefix``, all pages, in key order.
        """

    def versioning() -> "Deferred[str]":
        """
        GetBucketVersioning: ``"Enabled"``, ``"Suspended"``, or ``""`` for a bucket
        that never had versioning.
        """

    def check() -> "Deferred[None]":
        """
        HeadBucket: fires when the bucket exists and the credentials may use it.
        """

    def close() -> "Deferred[None]":
        """
        Release connections; called once when the server stops, after the flush.
        """
