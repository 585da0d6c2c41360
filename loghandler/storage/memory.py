"""
An in-memory :class:`~loghandler.interfaces.IObjectStore` with S3's rules, for unit
tests: the part minimum for all but the last part, ETags, and the conditions
``If-Match`` / ``If-None-Match: *`` everywhere, CompleteMultipartUpload included
(which moto does not enforce).

Tests can make the next calls of an operation fail (:meth:`MemoryStore.fail`), hold
calls until they release them (:meth:`MemoryStore.hold`), or run code just before an
operation (:meth:`MemoryStore.before`), to play another writer.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any, Callable, Optional, Sequence

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from loghandler.config import S3_MAX_PART_SIZE, S3_MIN_PART_SIZE
from loghandler.interfaces import (
    CompletedPart,
    IObjectStore,
    ObjectInfo,
    PendingUpload,
    PreconditionFailed,
    StorageError,
    StoredPart,
)


def _etag(body: bytes) -> str:
    return '"%s"' % hashlib.md5(body).hexdigest()


@attrs.define
class _Upload:
    key: str
    initiated: float
    write_id: Optional[str] = None
    parts: dict[int, tuple[bytes, str]] = attrs.field(factory=dict)


@attrs.define
class _Held:
    operation: str
    run: Callable[[], Any]
    result: Deferred[Any]


@implementer(IObjectStore)
class MemoryStore:
    """
    Objects and multipart uploads in dicts.

    :param min_part_size: bytes every part but the last must have at completion
        (S3: 5 MiB).
    :param now: returns the time in seconds, for uploads' ``initiated``.
    :ivar objects: key -> (body, ETag) of the completed objects.
    :ivar calls: (operation, key) of every call, in order.
    """

    name = "memory"

    def __init__(
        self, min_part_size: int = S3_MIN_PART_SIZE, now: Callable[[], float] = lambda: 0.0
    ) -> None:
        self.min_part_size = min_part_size
        self._now = now
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.write_ids: dict[str, Optional[str]] = {}
        self.uploads: dict[str, _Upload] = {}
        self.calls: list[tuple[str, str]] = []
        self.held: list[_Held] = []
        self._failures: dict[str, list[Exception]] = {}
        self._holding: set[str] = set()
        self._before: dict[str, list[Callable[[], None]]] = {}
        self._lost: dict[str, int] = {}
        self._ids = itertools.count(1)

    # test controls

    def fail(self, operation: str, error: Exception, times: int = 1) -> None:
        """Make the next ``times`` calls of ``operation`` (``UploadPart``...) fail."""
        self._failures.setdefault(operation, []).extend([error] * times)

    def hold(self, operation: str) -> None:
        """Keep calls of ``operation`` waiting in :attr:`held` until :meth:`release`."""
        self._holding.add(operation)

    def release(self, count: Optional[int] = None) -> None:
        """Stop holding; run the first ``count`` held calls (all by default)."""
        if count is None:
            self._holding.clear()
            count = len(self.held)
        ready, self.held = self.held[:count], self.held[count:]
        for held in ready:
            self._settle(held.run, held.result)

    def lose_answer(self, operation: str, times: int = 1) -> None:
        """
        Carry out the next ``times`` calls of ``operation`` but answer them with a
        StorageError, as when the connection drops before the answer arrives.
        """
        self._lost[operation] = self._lost.get(operation, 0) + times

    def before(self, operation: str, action: Callable[[], None]) -> None:
        """Run ``action`` once, just before the next call of ``operation``."""
        self._before.setdefault(operation, []).append(action)

    def body(self, key: str) -> bytes:
        """The stored bytes of ``key`` (KeyError if missing)."""
        return self.objects[key][0]

    def _settle(self, run: Callable[[], Any], result: Deferred[Any]) -> None:
        try:
            value = run()
        except Exception:
            result.errback(Failure())
        else:
            result.callback(value)

    def _call(self, operation: str, key: str, run: Callable[[], Any]) -> Deferred[Any]:
        self.calls.append((operation, key))
        for action in self._before.pop(operation, []):
            action()
        errors = self._failures.get(operation)
        if errors:
            return fail(errors.pop(0))
        if operation in self._holding:
            result: Deferred[Any] = Deferred()
            self.held.append(_Held(operation, run, result))
            return result
        try:
            value = run()
        except Exception as e:
            return fail(e)
        if self._lost.get(operation):
            self._lost[operation] -= 1
            return fail(StorageError(operation, 0, "ResponseNeverReceived", "answer lost"))
        return succeed(value)

    def _check(
        self, operation: str, key: str, if_match: Optional[str], if_none_match: bool
    ) -> None:
        current = self.objects.get(key)
        if if_none_match and current is not None:
            raise PreconditionFailed(operation, f"{key} exists")
        if if_match is not None and (current is None or current[1] != if_match):
            raise PreconditionFailed(operation, f"{key} is not {if_match}")

    def _upload(self, operation: str, key: str, upload_id: str) -> _Upload:
        upload = self.uploads.get(upload_id)
        if upload is None or upload.key != key:
            raise StorageError(operation, 404, "NoSuchUpload", upload_id)
        return upload

    # IObjectStore

    def head(self, key: str) -> Deferred[Optional[ObjectInfo]]:
        """HeadObject."""

        def run() -> Optional[ObjectInfo]:
            current = self.objects.get(key)
            if current is None:
                return None
            return ObjectInfo(len(current[0]), current[1], self.write_ids.get(key))

        return self._call("HeadObject", key, run)

    def get(self, key: str, if_match: str) -> Deferred[bytes]:
        """GetObject with If-Match."""

        def run() -> bytes:
            if key not in self.objects:
                raise StorageError("GetObject", 404, "NoSuchKey", key)
            self._check("GetObject", key, if_match, False)
            return self.objects[key][0]

        return self._call("GetObject", key, run)

    def put(
        self,
        key: str,
        body: bytes,
        if_match: Optional[str] = None,
        if_none_match: bool = False,
        write_id: Optional[str] = None,
    ) -> Deferred[str]:
        """PutObject with optional If-Match / If-None-Match: *."""

        def run() -> str:
            self._check("PutObject", key, if_match, if_none_match)
            self.objects[key] = (bytes(body), _etag(body))
            self.write_ids[key] = write_id
            return self.objects[key][1]

        return self._call("PutObject", key, run)

    def create_upload(self, key: str, write_id: Optional[str] = None) -> Deferred[str]:
        """CreateMultipartUpload."""

        def run() -> str:
            upload_id = "upload-%d" % next(self._ids)
            self.uploads[upload_id] = _Upload(key, self._now(), write_id)
            return upload_id

        return self._call("CreateMultipartUpload", key, run)

    def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> Deferred[str]:
        """UploadPart."""

        def run() -> str:
            upload = self._upload("UploadPart", key, upload_id)
            if not 1 <= number <= 10_000 or len(body) > S3_MAX_PART_SIZE:
                raise StorageError("UploadPart", 400, "InvalidArgument", str(number))
            upload.parts[number] = (bytes(body), _etag(body))
            return upload.parts[number][1]

        return self._call("UploadPart", key, run)

    def upload_part_copy(
        self, key: str, upload_id: str, number: int, source_key: str, if_match: str
    ) -> Deferred[str]:
        """UploadPartCopy with x-amz-copy-source-if-match."""

        def run() -> str:
            upload = self._upload("UploadPartCopy", key, upload_id)
            if source_key not in self.objects:
                raise StorageError("UploadPartCopy", 404, "NoSuchKey", source_key)
            self._check("UploadPartCopy", source_key, if_match, False)
            body = self.objects[source_key][0]
            if len(body) > S3_MAX_PART_SIZE:
                raise StorageError("UploadPartCopy", 400, "InvalidRequest", "source too large")
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
            self.objects[key] = (b"".join(bodies), etag)
            self.write_ids[key] = upload.write_id
            del self.uploads[upload_id]
            return etag

        return self._call("CompleteMultipartUpload", key, run)

    def abort_upload(self, key: str, upload_id: str) -> Deferred[None]:
        """AbortMultipartUpload."""

        def run() -> None:
            self._upload("AbortMultipartUpload", key, upload_id)
            del self.uploads[upload_id]

        return self._call("AbortMultipartUpload", key, run)

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

    def check(self) -> Deferred[None]:
        """HeadBucket: reachable unless a test made it fail (:meth:`fail`)."""
        return self._call("HeadBucket", "", lambda: None)

    def close(self) -> Deferred[None]:
        """Nothing to release."""
        return succeed(None)
