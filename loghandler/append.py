"""
Never overwrite: complete an object by appending to what the key already holds
(DESIGN.md section 5).

1. HEAD the key.  Missing: complete with ``If-None-Match: *``.
2. Existing and at least 5 MiB: copy it in as part 1 (UploadPartCopy with
   ``x-amz-copy-source-if-match``) and complete with ``If-Match``.  New data are parts 2
   and up, so part 1 is free for the copy.
3. Existing and under 5 MiB: GET it and upload it with the tail as the last part (or
   PutObject the whole when no multipart upload exists), with ``If-Match``.
4. 412 Precondition Failed (another writer got there first): start again at 1.

Every write carries the stream's write ID (user metadata).  When HEAD finds the key
last written with our own ID, an earlier try landed although its answer was lost (the
store retried a PutObject or CompleteMultipartUpload that had succeeded): the append
is done, and nothing is written twice.

A key whose object is over :data:`ROLLOVER_BYTES` takes no more appends: new data go to
``{key}.1``, ``{key}.2``... (one copied part holds at most 5 GiB; the margin leaves room
for writers that append while an upload is open).

S3 API pages: HeadObject, GetObject, PutObject, CreateMultipartUpload, UploadPart,
UploadPartCopy, CompleteMultipartUpload ("Conditional requests" for the conditions).
"""

from __future__ import annotations

from typing import Optional

import attrs
from twisted.logger import Logger

from loghandler.config import GiB, S3_MAX_PART_SIZE, S3_MIN_PART_SIZE
from loghandler.interfaces import CompletedPart, IObjectStore, ObjectInfo, PreconditionFailed
from loghandler.keys import rollover_key

ROLLOVER_BYTES = 4 * GiB
#: Part number reserved for the copy of the existing object; data start after it.
COPY_PART = 1
FIRST_DATA_PART = 2

_log = Logger()


class ObjectTooLarge(Exception):
    """
    The object an open multipart upload must append to grew past what one copied part
    holds (5 GiB) while the upload was open; the upload is left in place for recovery.
    """


@attrs.define
class MultipartUpload:
    """
    A multipart upload in progress.

    :ivar key: the key it completes as (the stream's key or a rollover of it).
    :ivar upload_id: S3's upload ID.
    :ivar parts: part number -> ETag of the data parts uploaded so far (2 and up).
    :ivar next_number: the number after the last data part: the tail's.
    """

    key: str
    upload_id: str
    parts: dict[int, str] = attrs.field(factory=dict)
    next_number: int = FIRST_DATA_PART

    def completed_parts(self) -> list[CompletedPart]:
        """The data parts uploaded so far, in number order."""
        return [CompletedPart(n, etag) for n, etag in sorted(self.parts.items())]


async def choose_target(store: IObjectStore, key: str) -> tuple[str, Optional[ObjectInfo]]:
    """
    The key that takes new data for ``key``: ``key`` itself, or the first rollover
    key (``{key}.N``) whose object is missing or not over :data:`ROLLOVER_BYTES`.

    :returns: that key and what HEAD found there (None: no object).
    """
    generation = 0
    while True:
        target = rollover_key(key, generation)
        info = await store.head(target)
        if info is None or info.size <= ROLLOVER_BYTES:
            return target, info
        generation += 1


async def append_object(
    store: IObjectStore,
    key: str,
    upload: Optional[MultipartUpload],
    tail: bytes,
    write_id: str,
) -> str:
    """
    Write ``tail`` (and, with an upload, its data parts) after whatever the key holds.

    :param key: the stream's key; with an upload, the upload's own key is used.
    :param upload: the stream's multipart upload with all its data parts uploaded, or
        None when everything is in ``tail``.
    :param tail: the last gzip members, held in memory (may be empty).
    :param write_id: the stream's write ID, unique to it; the upload was created with it.
    :returns: the key written (``key`` or a rollover of it).
    :raises StorageError: a call failed; the caller retries the whole protocol.
    :raises ObjectTooLarge: see the exception.
    """
    while True:
        if upload is None:
            target, info = await choose_target(store, key)
        else:
            target, info = upload.key, await store.head(upload.key)
        if info is not None and info.write_id == write_id:
            _log.info("{key}: an earlier try of this append landed", key=target)
            return target
        try:
            if upload is None:
                if not tail:
                    return target
                if info is None:
                    await store.put(target, tail, if_none_match=True, write_id=write_id)
                    return target
                if info.size < S3_MIN_PART_SIZE:
                    base = await store.get(target, info.etag)
                    await store.put(target, base + tail, if_match=info.etag, write_id=write_id)
                    _appended(target, info, "GetObject")
                    return target
                upload = MultipartUpload(target, await store.create_upload(target, write_id))
            how = await _complete(store, upload, info, tail)
            if info is not None:
                _appended(target, info, how)
            return target
        except PreconditionFailed as e:
            _log.info(
                "{key}: another writer changed the object ({operation}); appending again",
                key=target,
                operation=e.operation,
            )


def _appended(key: str, info: ObjectInfo, how: str) -> None:
    _log.info(
        "{key}: appended to the existing {size} bytes by {how}", key=key, size=info.size, how=how
    )


async def _complete(
    store: IObjectStore, upload: MultipartUpload, info: Optional[ObjectInfo], tail: bytes
) -> str:
    """
    One attempt of steps 1-3 for an object with a multipart upload.

    :returns: how the existing object was taken in: "GetObject", "UploadPartCopy",
        or "" when there was none.
    """
    key, upload_id = upload.key, upload.upload_id
    parts = upload.completed_parts()
    last = upload.next_number
    if info is None:
        if tail:
            parts.append(CompletedPart(last, await store.upload_part(key, upload_id, last, tail)))
        await store.complete_upload(key, upload_id, parts, if_none_match=True)
        return ""
    if info.size < S3_MIN_PART_SIZE:
        base = await store.get(key, info.etag)
        etag = await store.upload_part(key, upload_id, last, base + tail)
        parts.append(CompletedPart(last, etag))
        await store.complete_upload(key, upload_id, parts, if_match=info.etag)
        return "GetObject"
    if info.size > S3_MAX_PART_SIZE:
        raise ObjectTooLarge(f"{key} is {info.size} bytes, over one copied part's limit")
    copy = await store.upload_part_copy(key, upload_id, COPY_PART, key, info.etag)
    parts.insert(0, CompletedPart(COPY_PART, copy))
    if tail:
        parts.append(CompletedPart(last, await store.upload_part(key, upload_id, last, tail)))
    await store.complete_upload(key, upload_id, parts, if_match=info.etag)
    return "UploadPartCopy"
