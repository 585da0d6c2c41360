"""
What the daemon checks of its bucket at start, besides reaching it (HeadBucket), and
warns about, since each silently breaks a promise of stage-then-merge (DESIGN.md
section 5):

- **Versioning** (GetBucketVersioning): every merge keeps the object it replaced as
  a noncurrent version, so storage grows with the square of the merges.
- **Conditional CompleteMultipartUpload**: merges of objects of 5 MiB or more are
  completed with ``If-Match``; a store that ignores it (moto does; AWS S3 enforces
  it, https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes.html)
  lets two daemons that merge into one key at once overwrite each other's lines.
  Probed on ``_loghandler/probe/{writer_id}``: PutObject, CreateMultipartUpload,
  UploadPart, CompleteMultipartUpload with a wrong ``If-Match`` (expected: 412),
  then AbortMultipartUpload and DeleteObject.

Each check is one attempt per call, outside the retry layer: a check that fails is
logged and the daemon goes on.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from loghandler.interfaces import StorageError
from loghandler.storage.s3.api import CompletedPart, IS3Client

#: An ETag no object has: the probe's Complete must be refused with it.
_NO_SUCH_ETAG = '"%s"' % ("0" * 32)

_log = Logger()


async def check_bucket(client: IS3Client, writer_id: str) -> None:
    """
    Warn (log) when the bucket is versioned or does not enforce ``If-Match`` on
    CompleteMultipartUpload; log why when a check could not be made.  Never raises.
    """
    try:
        if await client.versioning() == "Enabled":
            _log.warn(
                "the bucket is versioned: every merge keeps the object it replaced as a"
                " noncurrent version, so storage grows with the square of the merges;"
                " add a lifecycle rule with NoncurrentVersionExpiration",
                event="bucket_versioned",
            )
    except Exception as e:
        _log.info(
            "could not read the bucket's versioning ({error})",
            event="bucket_versioning_unknown",
            error=str(e),
        )
    try:
        enforced = await conditional_complete_enforced(client, "_loghandler/probe/" + writer_id)
    except Exception as e:
        _log.info(
            "could not probe conditional CompleteMultipartUpload ({error})",
            event="conditional_complete_unknown",
            error=str(e),
        )
        return
    if not enforced:
        _log.warn(
            "this store does not enforce If-Match on CompleteMultipartUpload (moto does"
            " not; AWS S3 does): run only one daemon per bucket with it, since two"
            " daemons merging into one object of 5 MiB or more at once can overwrite"
            " each other's lines",
            event="conditional_complete_not_enforced",
        )


async def conditional_complete_enforced(client: IS3Client, key: str) -> bool:
    """
    Whether a CompleteMultipartUpload with a stale ``If-Match`` on ``key`` is refused
    (412, or 409); the probe's object and upload are removed afterwards.

    :raises Exception: whatever a call of the probe raised, but the refusal.
    """
    await client.put(key, b"")
    upload_id = await client.create_upload(key)
    try:
        etag = await client.upload_part(key, upload_id, 1, b"probe")
        try:
            await client.complete_upload(
                key, upload_id, [CompletedPart(1, etag)], if_match=_NO_SUCH_ETAG
            )
        except StorageError as e:
            if e.status in (409, 412):
                return True
            raise
        return False
    finally:
        await _quietly(client.abort_upload(key, upload_id))
        await _quietly(client.delete(key))


async def _quietly(call: "Deferred[None]") -> None:
    """Await ``call``; a failure (the upload already completed) is not an error."""
    try:
        await call
    except Exception:
        pass
