"""
:class:`MemoryStore`: an in-memory :class:`~loghandler.storage.s3.api.IS3Client` with
S3's rules, the reference that unit tests, the model-based test and the contract suite
use (moto enforces fewer of them):

- metadata (the write IDs) is set only by PutObject and CreateMultipartUpload;
- ``If-Match`` / ``If-None-Match: *`` on PutObject, GetObject and
  CompleteMultipartUpload, ``x-amz-copy-source-if-match`` on UploadPartCopy: 412;
- every part but the last at least ``min_part_size`` at completion (EntityTooSmall);
- a completed or aborted upload is gone: NoSuchUpload;
- a conditional CompleteMultipartUpload that races another write of the key answers
  409 ConditionalRequestConflict and discards the upload (injected with
  :meth:`MemoryStore.conflict`).

Fault injection, per operation (``UploadPart``, ``CompleteMultipartUpload``...), as
:class:`~loghandler.storage.scripted.ScriptedCalls` gives it (fail, lose the answer,
hold, run code before, chaos), plus :meth:`~MemoryStore.conflict` and the chaos step
:data:`CONFLICT`.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Callable, Optional, Sequence

import attrs
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from loghandler.config import S3_MAX_PART_SIZE, S3_MIN_PART_SIZE
from loghandler.interfaces import PreconditionFailed, StorageError
from loghandler.storage.s3.api import (
    CompletedPart,
    IS3Client,
    ListedObject,
    ObjectInfo,
    PendingUpload,
    StoredPart,
    newest_writes,
)
from loghandler.storage.scripted import LOST, STALL, Held, ScriptedCalls, lost_answer

__all__ = [
    "CONFLICT",
    "LOST",
    "STALL",
    "Held",
    "MemoryStore",
    "StoredObject",
    "lost_answer",
]

#: S3's largest part number.
_MAX_PART_NUMBER = 10_000


def _etag(body: bytes) -> str:
    return '"%s"' % hashlib.md5(body).hexdigest()


#: A :attr:`MemoryStore.chaos` step: a conditional Complete answers 409.
CONFLICT = Exception("conflict")


@attrs.define
class StoredObject:
    """
    A completed object.

    :ivar body: its bytes.
    :ivar etag: its ETag.
    :ivar writes: the write IDs in its metadata.
    :ivar last_modified: seconds, by the store's clock.
    """

    body: bytes
    etag: str
    writes: tuple[str, ...]
    last_modified: float


@attrs.define
class _Upload:
    key: str
    initiated: float
    writes: tuple[str, ...] = ()
    parts: dict[int, tuple[bytes, str]] = attrs.field(factory=dict)


@implementer(IS3Client)
class MemoryStore(ScriptedCalls):
    """
    One bucket in dicts.

    :param min_part_size: bytes every part but the last must have at completion
        (S3: 5 MiB).
    :param now: the store's clock in seconds (uploads' ``initiated``, objects'
        ``last_modified``).
    :ivar objects: key -> :class:`StoredObject`.
    :ivar uploads: upload ID -> the upload.
    :ivar calls: (operation, key) of every call, in order.
    :ivar held: the stalled calls, oldest first.
    """

    name = "memory"

    def __init__(
        self, min_part_size: int = S3_MIN_PART_SIZE, now: Callable[[], float] = lambda: 0.0
    ) -> None:
        super().__init__()
        self.min_part_size = min_part_size
        self._now = now
        self.objects: dict[str, StoredObject] = {}
        self.uploads: dict[str, _Upload] = {}
        self.versioning_status = ""
        self._conflicts = 0
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return "<MemoryStore>"

    # -- test controls ---------------------------------------------------------

    def conflict(self, times: int = 1) -> None:
        """
        Answer the next ``times`` conditional CompleteMultipartUploads with 409
        ConditionalRequestConflict and discard their uploads, as S3 does when the
        Complete races another write of the key.
        """
        self._conflicts += times

    def body(self, key: str) -> bytes:
        """The stored bytes of ``key`` (KeyError if missing)."""
        return self.objects[key].body

    def store(self, key: str, body: bytes, writes: Sequence[str] = ()) -> str:
        """Write ``body`` at ``key`` at once, as another program would; returns the ETag."""
        self.objects[key] = StoredObject(bytes(body), _etag(body), tuple(writes), self._now())
        return self.objects[key].etag

    # -- plumbing ----------------------------------------------------------------

    def _chaos_step(self, step: Optional[BaseException]) -> Optional[BaseException]:
        if step is CONFLICT:
            self._conflicts += 1
            return None
        return step

    def _check(
        self, operation: str, key: str, if_match: Optional[str], if_none_match: bool
    ) -> None:
        current = self.objects.get(key)
        if if_none_match and current is not None:
            raise PreconditionFailed(operation, f"{key} exists")
        if if_match is not None and (current is None or current.etag != if_match):
            raise PreconditionFailed(operation, f"{key} is not {if_match}")

    def _upload(self, operation: str, key: str, upload_id: str) -> _Upload:
        upload = self.uploads.get(upload_id)
        if upload is None or upload.key != key:
            raise StorageError(operation, 404, "NoSuchUpload", upload_id)
        return upload

    @staticmethod
    def _slice(operation: str, body: bytes, byte_range: Optional[tuple[int, int]]) -> bytes:
        if byte_range is None:
            return body
        start, end = byte_range
        if not 0 <= start < end or start >= len(body):
            raise StorageError(operation, 416, "InvalidRange", f"{start}-{end}")
        return body[start:end]

    # -- IS3Client ---------------------------------------------------------------

    def head(self, key: str) -> Deferred[Optional[ObjectInfo]]:
        """HeadObject."""

        def run() -> Optional[ObjectInfo]:
            current = self.objects.get(key)
            if current is None:
                return None
            return ObjectInfo(len(current.body), current.etag, current.writes)

        return self._call("HeadObject", key, run)

    def get(
        self,
        key: str,
        if_match: Optional[str] = None,
        byte_range: Optional[tuple[int, int]] = None,
    ) -> Deferred[bytes]:
        """GetObject, optionally with If-Match and a Range."""

        def run() -> bytes:
            if key not in self.objects:
                raise StorageError("GetObject", 404, "NoSuchKey", key)
            self._check("GetObject", key, if_match, False)
            return self._slice("GetObject", self.objects[key].body, byte_range)

        return self._call("GetObject", key, run)

    def put(
        self,
        key: str,
        body: bytes,
        if_match: Optional[str] = None,
        if_none_match: bool = False,
        writes: Sequence[str] = (),
    ) -> Deferred[str]:
        """PutObject with optional If-Match / If-None-Match: *."""

        def run() -> str:
            self._check("PutObject", key, if_match, if_none_match)
            return self.store(key, body, newest_writes(writes))

        return self._call("PutObject", key, run)

    def create_upload(self, key: str, writes: Sequence[str] = ()) -> Deferred[str]:
        """CreateMultipartUpload."""

        def run() -> str:
            upload_id = "upload-%d" % next(self._ids)
            self.uploads[upload_id] = _Upload(key, self._now(), tuple(newest_writes(writes)))
            return upload_id

        return self._call("CreateMultipartUpload", key, run)

    def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> Deferred[str]:
        """UploadPart."""

        def run() -> str:
            upload = self._upload("UploadPart", key, upload_id)
            if not 1 <= number <= _MAX_PART_NUMBER or len(body) > S3_MAX_PART_SIZE:
                raise StorageError("UploadPart", 400, "InvalidArgument", str(number))
            upload.parts[number] = (bytes(body), _etag(body))
            return upload.parts[number][1]

        return self._call("UploadPart", key, run)

    def upload_part_copy(
        self,
        key: str,
        upload_id: str,
        number: int,
        source_key: str,
        if_match: str,
        byte_range: Optional[tuple[int, int]] = None,
    ) -> Deferred[str]:
        """UploadPartCopy with x-amz-copy-source-if-match and an optional range."""

        def run() -> str:
            operation = "UploadPartCopy"
            upload = self._upload(operation, key, upload_id)
            if source_key not in self.objects:
                raise StorageError(operation, 404, "NoSuchKey", source_key)
            self._check(operation, source_key, if_match, False)
            body = self._slice(operation, self.objects[source_key].body, byte_range)
            if len(body) > S3_MAX_PART_SIZE:
                raise StorageError(operation, 400, "InvalidRequest", "source too large")
            upload.parts[number] = (body, _etag(body))
            return upload.parts[number][1]

        return self._call("UploadPartCopy", key, run)

    def complete_upload(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[CompletedPart],
        if_match: Optional[str] = None,
        if_none_match: bool = False,
    ) -> Deferred[str]:
        """CompleteMultipartUpload, with S3's checks on parts and conditions."""

        def run() -> str:
            operation = "CompleteMultipartUpload"
            upload = self._upload(operation, key, upload_id)
            if self._conflicts and (if_match is not None or if_none_match):
                self._conflicts -= 1
                del self.uploads[upload_id]
                raise StorageError(operation, 409, "ConditionalRequestConflict", key)
            numbers = [part.number for part in parts]
            if not parts or numbers != sorted(set(numbers)):
                raise StorageError(operation, 400, "InvalidPartOrder")
            bodies = []
            for index, part in enumerate(parts):
                stored = upload.parts.get(part.number)
                if stored is None or stored[1] != part.etag:
                    raise StorageError(operation, 400, "InvalidPart", str(part.number))
                if index < len(parts) - 1 and len(stored[0]) < self.min_part_size:
                    raise StorageError(operation, 400, "EntityTooSmall", str(part.number))
                bodies.append(stored[0])
            self._check(operation, key, if_match, if_none_match)
            digest = hashlib.md5(
                b"".join(bytes.fromhex(upload.parts[n][1].strip('"')) for n in numbers)
            ).hexdigest()
            etag = '"%s-%d"' % (digest, len(parts))
            self.objects[key] = StoredObject(
                b"".join(bodies), etag, upload.writes, self._now()
            )
            del self.uploads[upload_id]
            return etag

        return self._call("CompleteMultipartUpload", key, run)

    def abort_upload(self, key: str, upload_id: str) -> Deferred[None]:
        """AbortMultipartUpload."""

        def run() -> None:
            self._upload("AbortMultipartUpload", key, upload_id)
            del self.uploads[upload_id]

        return self._call("AbortMultipartUpload", key, run)

    def delete(self, key: str) -> Deferred[None]:
        """DeleteObject; a missing key is no error."""

        def run() -> None:
            self.objects.pop(key, None)

        return self._call("DeleteObject", key, run)

    def list_uploads(self, prefix: str) -> Deferred[list[PendingUpload]]:
        """ListMultipartUploads under a prefix, ordered by key then upload ID."""

        def run() -> list[PendingUpload]:
            return sorted(
                (
                    PendingUpload(upload.key, upload_id, upload.initiated)
                    for upload_id, upload in self.uploads.items()
                    if upload.key.startswith(prefix)
                ),
                key=lambda pending: (pending.key, pending.upload_id),
            )

        return self._call("ListMultipartUploads", prefix, run)

    def list_parts(self, key: str, upload_id: str) -> Deferred[list[StoredPart]]:
        """ListParts."""

        def run() -> list[StoredPart]:
            upload = self._upload("ListParts", key, upload_id)
            return [
                StoredPart(number, etag, len(body))
                for number, (body, etag) in sorted(upload.parts.items())
            ]

        return self._call("ListParts", key, run)

    def list_objects(self, prefix: str) -> Deferred[list[ListedObject]]:
        """ListObjectsV2 under a prefix, in key order."""

        def run() -> list[ListedObject]:
            return [
                ListedObject(key, len(obj.body), obj.etag, obj.last_modified)
                for key, obj in sorted(self.objects.items())
                if key.startswith(prefix)
            ]

        return self._call("ListObjectsV2", prefix, run)

    def versioning(self) -> Deferred[str]:
        """GetBucketVersioning: :attr:`versioning_status`."""
        return self._call("GetBucketVersioning", "", lambda: self.versioning_status)

    def check(self) -> Deferred[None]:
        """HeadBucket: reachable unless a test made it fail (:meth:`fail`)."""
        return self._call("HeadBucket", "", lambda: None)

    def close(self) -> Deferred[None]:
        """Nothing to release."""
        return succeed(None)
