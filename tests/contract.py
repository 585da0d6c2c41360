"""
The behaviour every :class:`~loghandler.storage.s3.api.IS3Client` must have, written
once and run against each implementation (the pattern of twisted/txaws
``txaws/testing/s3_tests.py``): ``MemoryStore`` in ``tests/test_storage_memory.py``,
``S3Client`` on moto in ``tests/integration/test_s3_moto.py``.

Mix :class:`S3ClientContractMixin` into a ``twisted.trial.unittest.TestCase`` (not
``SynchronousTestCase``: the tests return Deferreds, which fire at once for an
in-memory store and later on a network) and implement ``make_client``::

    class MemoryStoreContractTests(S3ClientContractMixin, TestCase):
        def make_client(self):
            return MemoryStore(min_part_size=1024), 1024

An implementation that does not enforce some rule (moto does not enforce ``If-Match``
on CompleteMultipartUpload) overrides that one test and skips it, saying why.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Coroutine, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from loghandler.interfaces import PreconditionFailed, StorageError
from loghandler.storage.s3.api import CompletedPart, IS3Client, ObjectInfo

__all__ = ["S3ClientContractMixin", "body_of"]


def _deferred_test(
    method: Callable[[Any], Coroutine[Any, Any, None]],
) -> Callable[[Any], "Deferred[None]"]:
    """
    Make ``async def test_x(self)`` a trial test method returning a Deferred, with
    its name and docstring kept.
    """

    def test(self: Any) -> "Deferred[None]":
        return defer.ensureDeferred(method(self))

    test.__name__ = method.__name__
    test.__qualname__ = method.__qualname__
    test.__doc__ = method.__doc__
    return test


def body_of(size: int, seed: int) -> bytes:
    """
    ``size`` bytes that differ from one ``seed`` to another and cover all byte
    values (gzip data are binary, not text).
    """
    pattern = bytes((seed * 7 + i) % 256 for i in range(256))
    return (pattern * (size // 256 + 1))[:size]


class S3ClientContractMixin:
    """
    Tests of the :class:`~loghandler.storage.s3.api.IS3Client` contract.

    Subclasses (which also derive from ``twisted.trial.unittest.TestCase``) implement
    :meth:`make_client`.  Every test uses keys under its own prefix,
    ``contract/{test name}/``.
    """

    # Provided by trial's TestCase.
    assertEqual: Callable[..., None]
    assertIn: Callable[..., None]
    assertIsInstance: Callable[..., None]
    assertIsNone: Callable[..., None]
    assertTrue: Callable[..., None]
    assertFailure: Callable[..., "Deferred[Any]"]
    id: Callable[[], str]

    def make_client(self) -> tuple[Any, int]:
        """
        A fresh (or emptied) client under test and its smallest allowed non-last
        part in bytes (5 MiB for S3), as ``(client, min_part_size)``.  Called once per
        test.
        """
        raise NotImplementedError

    def _made(self) -> tuple[Any, int]:
        """``(client, min_part_size)`` for this test, made on first use."""
        made: Optional[tuple[Any, int]] = getattr(self, "_contract_client", None)
        if made is None:
            made = self.make_client()
            self._contract_client = made
        return made

    @property
    def client(self) -> Any:
        """The client under test."""
        return self._made()[0]

    @property
    def min_part(self) -> int:
        """The smallest non-last part, in bytes."""
        return self._made()[1]

    def key(self, name: str) -> str:
        """A key for this test: ``contract/{test method}/{name}``."""
        return f"contract/{self.id().rsplit('.', 1)[-1]}/{name}"

    async def fails_with_precondition(self, d: "Deferred[Any]") -> None:
        """Wait for ``d``; check that it failed with PreconditionFailed (412)."""
        error = await self.assertFailure(d, PreconditionFailed)
        self.assertEqual(error.status, 412)

    async def fails_with_code(self, d: "Deferred[Any]", status: int, code: str) -> None:
        """Wait for ``d``; check that it failed with a StorageError of this status and code."""
        error = await self.assertFailure(d, StorageError)
        self.assertEqual((error.status, error.code), (status, code))

    async def upload(
        self, key: str, bodies: list[bytes], writes: tuple[str, ...] = (), **complete: Any
    ) -> str:
        """
        A whole multipart upload of ``bodies`` as parts 1, 2, ... of ``key``;
        ``complete`` goes to ``complete_upload``.  Returns the object's ETag.
        """
        upload_id = await self.client.create_upload(key, writes)
        parts = []
        for number, body in enumerate(bodies, 1):
            part_etag = await self.client.upload_part(key, upload_id, number, body)
            parts.append(CompletedPart(number, part_etag))
        return str(await self.client.complete_upload(key, upload_id, parts, **complete))

    # -- objects -------------------------------------------------------------------

    def test_provides_interface(self) -> None:
        """
        The client provides IS3Client, its name included.
        """
        self.assertTrue(verifyObject(IS3Client, self.client))
        self.assertIsInstance(self.client.name, str)

    @_deferred_test
    async def test_put_head_get(self) -> None:
        """
        put stores the exact bytes and fires with an ETag; head reports the size, that
        ETag and no write IDs; get returns the bytes, with or without that ETag as
        if_match.
        """
        key = self.key("object.gz")
        body = body_of(1000, 1) + b"\x00\xff\r\n"
        etag = await self.client.put(key, body)
        self.assertIsInstance(etag, str)
        self.assertEqual(await self.client.head(key), ObjectInfo(len(body), etag, ()))
        self.assertEqual(await self.client.get(key), body)
        self.assertEqual(await self.client.get(key, etag), body)

    @_deferred_test
    async def test_put_empty(self) -> None:
        """
        An empty object can be stored and read back.
        """
        key = self.key("empty.gz")
        etag = await self.client.put(key, b"")
        self.assertEqual(await self.client.head(key), ObjectInfo(0, etag))
        self.assertEqual(await self.client.get(key, etag), b"")

    @_deferred_test
    async def test_odd_key(self) -> None:
        """
        Keys with spaces, non-ASCII letters and URL-special characters work.
        """
        key = self.key("dir with space/ü+%=&?#~.._!*'()x.gz")
        etag = await self.client.put(key, b"odd")
        self.assertEqual(await self.client.head(key), ObjectInfo(3, etag))
        self.assertEqual(await self.client.get(key, etag), b"odd")
        self.assertIsNone(await self.client.head(self.key("dir with space/ü")))

    @_deferred_test
    async def test_head_missing(self) -> None:
        """
        head of a key that does not exist is None.
        """
        self.assertIsNone(await self.client.head(self.key("missing.gz")))

    @_deferred_test
    async def test_get_missing(self) -> None:
        """
        get of a key that does not exist fails with 404 NoSuchKey.
        """
        await self.fails_with_code(self.client.get(self.key("missing.gz")), 404, "NoSuchKey")

    @_deferred_test
    async def test_get_stale_if_match(self) -> None:
        """
        get with a stale if_match fails with PreconditionFailed.
        """
        key = self.key("stale-get.gz")
        old = await self.client.put(key, b"first")
        await self.client.put(key, b"second")
        await self.fails_with_precondition(self.client.get(key, old))

    @_deferred_test
    async def test_get_byte_range(self) -> None:
        """
        get of ``(start, end)`` returns bytes start to end - 1; a range running past
        the end returns the bytes that exist; with if_match too.
        """
        key = self.key("ranged.gz")
        body = body_of(100, 2)
        etag = await self.client.put(key, body)
        self.assertEqual(await self.client.get(key, byte_range=(0, 1)), body[:1])
        self.assertEqual(await self.client.get(key, etag, (10, 20)), body[10:20])
        self.assertEqual(await self.client.get(key, byte_range=(90, 1000)), body[90:])

    @_deferred_test
    async def test_get_range_past_end(self) -> None:
        """
        A byte range starting at or past the end fails with 416 InvalidRange.
        """
        key = self.key("short.gz")
        await self.client.put(key, b"0123456789")
        await self.fails_with_code(
            self.client.get(key, byte_range=(10, 20)), 416, "InvalidRange"
        )

    @_deferred_test
    async def test_writes_metadata(self) -> None:
        """
        Write IDs given to put, or to create_upload and then complete, are what head
        reports for the object, in order; a write without them leaves none.
        """
        key = self.key("object.gz")
        await self.client.put(key, b"one", writes=("a1", "b2"))
        self.assertEqual((await self.client.head(key)).writes, ("a1", "b2"))
        await self.client.put(key, b"two")
        self.assertEqual((await self.client.head(key)).writes, ())
        await self.upload(key, [b"three"], writes=("c3", "d4", "e5"))
        self.assertEqual((await self.client.head(key)).writes, ("c3", "d4", "e5"))

    @_deferred_test
    async def test_put_if_none_match(self) -> None:
        """
        put with if_none_match writes a key that does not exist, and fails with
        PreconditionFailed on one that does, leaving it as it was.
        """
        key = self.key("new.gz")
        etag = await self.client.put(key, b"first", if_none_match=True)
        await self.fails_with_precondition(self.client.put(key, b"second", if_none_match=True))
        self.assertEqual(await self.client.get(key, etag), b"first")

    @_deferred_test
    async def test_put_if_match(self) -> None:
        """
        put with the current ETag as if_match replaces the object; with a stale one
        it fails with PreconditionFailed and leaves the newer object.
        """
        key = self.key("replace.gz")
        old = await self.client.put(key, b"first")
        current = await self.client.put(key, b"second", if_match=old)
        self.assertEqual(await self.client.get(key, current), b"second")
        await self.fails_with_precondition(self.client.put(key, b"third", if_match=old))
        self.assertEqual(await self.client.get(key, current), b"second")

    @_deferred_test
    async def test_delete(self) -> None:
        """
        delete removes the object; deleting a missing key succeeds.
        """
        key = self.key("doomed.gz")
        await self.client.put(key, b"x")
        self.assertIsNone(await self.client.delete(key))
        self.assertIsNone(await self.client.head(key))
        self.assertIsNone(await self.client.delete(key))
        self.assertIsNone(await self.client.delete(self.key("never.gz")))

    @_deferred_test
    async def test_list_objects(self) -> None:
        """
        list_objects reports the objects under a prefix (only those), in key order,
        with size, ETag and a recent last-modified time.
        """
        inside = {self.key("in/b.gz"): b"bb", self.key("in/a.gz"): b"a", self.key("in/c/d"): b""}
        etags = {key: await self.client.put(key, body) for key, body in inside.items()}
        await self.client.put(self.key("out.gz"), b"out")
        listed = await self.client.list_objects(self.key("in/"))
        self.assertEqual(
            [(o.key, o.size, o.etag) for o in listed],
            [(key, len(inside[key]), etags[key]) for key in sorted(inside)],
        )
        for entry in listed:
            self.assertIsInstance(entry.last_modified, float)
        self.assertEqual(await self.client.list_objects(self.key("nothing/")), [])

    @_deferred_test
    async def test_list_objects_many(self) -> None:
        """
        list_objects returns every object under the prefix, more than one page's
        worth on moto (100 keys a page).
        """
        keys = [self.key(f"many/{n:04d}") for n in range(130)]
        await defer.gatherResults([self.client.put(key, b"x") for key in keys])
        listed = await self.client.list_objects(self.key("many/"))
        self.assertEqual([o.key for o in listed], keys)

    # -- multipart uploads -------------------------------------------------------

    @_deferred_test
    async def test_multipart(self) -> None:
        """
        create, upload parts (all but the last of the minimum size), complete with
        if_none_match on a new key: the object is the exact concatenation, and head
        reports its size and the ETag complete returned.
        """
        key = self.key("multipart.gz")
        bodies = [body_of(self.min_part, 1), body_of(self.min_part, 2), b"tail"]
        etag = await self.upload(key, bodies, if_none_match=True)
        expected = b"".join(bodies)
        self.assertEqual(await self.client.head(key), ObjectInfo(len(expected), etag))
        self.assertEqual(await self.client.get(key, etag), expected)

    @_deferred_test
    async def test_reupload_part(self) -> None:
        """
        Uploading a part number again replaces that part; complete uses the ETag of
        the newest upload.
        """
        key = self.key("reupload.gz")
        first = body_of(self.min_part, 1)
        upload_id = await self.client.create_upload(key)
        etag1 = await self.client.upload_part(key, upload_id, 1, first)
        await self.client.upload_part(key, upload_id, 2, b"old checkpoint")
        etag2 = await self.client.upload_part(key, upload_id, 2, b"new checkpoint, longer")
        etag = await self.client.complete_upload(
            key, upload_id, [CompletedPart(1, etag1), CompletedPart(2, etag2)]
        )
        self.assertEqual(await self.client.get(key, etag), first + b"new checkpoint, longer")

    @_deferred_test
    async def test_complete_if_none_match_existing(self) -> None:
        """
        complete_upload with if_none_match when the key exists fails with
        PreconditionFailed and leaves the object as it was.
        """
        key = self.key("complete-exists.gz")
        existing = await self.client.put(key, b"first")
        upload_id = await self.client.create_upload(key)
        etag1 = await self.client.upload_part(key, upload_id, 1, b"part")
        await self.fails_with_precondition(
            self.client.complete_upload(key, upload_id, [CompletedPart(1, etag1)], if_none_match=True)
        )
        self.assertEqual(await self.client.get(key, existing), b"first")

    @_deferred_test
    async def test_complete_current_if_match(self) -> None:
        """
        complete_upload with the current ETag as if_match replaces the object.
        """
        key = self.key("complete-replace.gz")
        existing = await self.client.put(key, b"first")
        etag = await self.upload(key, [b"second"], if_match=existing)
        self.assertEqual(await self.client.get(key, etag), b"second")

    @_deferred_test
    async def test_complete_stale_if_match(self) -> None:
        """
        complete_upload with a stale if_match fails with PreconditionFailed and
        leaves the newer object in place.
        """
        key = self.key("complete-stale.gz")
        old = await self.client.put(key, b"first")
        current = await self.client.put(key, b"second")
        upload_id = await self.client.create_upload(key)
        etag1 = await self.client.upload_part(key, upload_id, 1, b"third")
        await self.fails_with_precondition(
            self.client.complete_upload(key, upload_id, [CompletedPart(1, etag1)], if_match=old)
        )
        self.assertEqual(await self.client.get(key, current), b"second")

    @_deferred_test
    async def test_complete_too_small(self) -> None:
        """
        A non-last part under the minimum makes complete_upload fail with 400
        EntityTooSmall, and nothing is written.
        """
        key = self.key("small-parts.gz")
        upload_id = await self.client.create_upload(key)
        etag1 = await self.client.upload_part(key, upload_id, 1, body_of(self.min_part - 1, 1))
        etag2 = await self.client.upload_part(key, upload_id, 2, b"tail")
        await self.fails_with_code(
            self.client.complete_upload(
                key, upload_id, [CompletedPart(1, etag1), CompletedPart(2, etag2)]
            ),
            400,
            "EntityTooSmall",
        )
        self.assertIsNone(await self.client.head(key))

    @_deferred_test
    async def test_upload_part_copy(self) -> None:
        """
        upload_part_copy of an existing object (of the minimum part size) as part 1,
        a part uploaded after it, complete with if_match of the base: the object is
        the base followed by the new bytes.
        """
        key = self.key("append.gz")
        base = body_of(self.min_part, 3)
        base_etag = await self.client.put(key, base)
        upload_id = await self.client.create_upload(key)
        copied = await self.client.upload_part_copy(key, upload_id, 1, key, base_etag)
        self.assertIsInstance(copied, str)
        added = await self.client.upload_part(key, upload_id, 2, b"appended")
        etag = await self.client.complete_upload(
            key, upload_id, [CompletedPart(1, copied), CompletedPart(2, added)], if_match=base_etag
        )
        self.assertEqual(await self.client.get(key, etag), base + b"appended")

    @_deferred_test
    async def test_upload_part_copy_ranges(self) -> None:
        """
        upload_part_copy reads the source key (not the upload's key), and of it
        ``byte_range`` when given: two ranged copies of one source make the object.
        """
        key = self.key("target.gz")
        source = self.key("source dir/staged ü.gz")
        base = body_of(self.min_part + 100, 4)
        source_etag = await self.client.put(source, base)
        upload_id = await self.client.create_upload(key)
        first = await self.client.upload_part_copy(
            key, upload_id, 1, source, source_etag, (0, self.min_part)
        )
        second = await self.client.upload_part_copy(
            key, upload_id, 2, source, source_etag, (self.min_part, len(base))
        )
        etag = await self.client.complete_upload(
            key, upload_id, [CompletedPart(1, first), CompletedPart(2, second)], if_none_match=True
        )
        self.assertEqual(await self.client.get(key, etag), base)

    @_deferred_test
    async def test_upload_part_copy_stale_if_match(self) -> None:
        """
        upload_part_copy with a stale if_match fails with PreconditionFailed.
        """
        key = self.key("copy-stale.gz")
        old = await self.client.put(key, body_of(self.min_part, 5))
        await self.client.put(key, body_of(self.min_part, 6))
        upload_id = await self.client.create_upload(key)
        await self.fails_with_precondition(
            self.client.upload_part_copy(key, upload_id, 1, key, old)
        )

    @_deferred_test
    async def test_unknown_upload(self) -> None:
        """
        list_parts and abort_upload of an upload ID that never existed fail with 404
        NoSuchUpload.
        """
        key = self.key("k.gz")
        await self.fails_with_code(self.client.list_parts(key, "no-such-upload"), 404, "NoSuchUpload")
        await self.fails_with_code(self.client.abort_upload(key, "no-such-upload"), 404, "NoSuchUpload")

    @_deferred_test
    async def test_no_such_upload_writes(self) -> None:
        """
        upload_part and complete_upload of an upload ID that never existed, or of an
        aborted upload, fail with 404 NoSuchUpload.
        """
        key = self.key("gone.gz")
        aborted = await self.client.create_upload(key)
        etag = await self.client.upload_part(key, aborted, 1, b"part")
        await self.client.abort_upload(key, aborted)
        for upload_id in ("no-such-upload", aborted):
            await self.fails_with_code(
                self.client.upload_part(key, upload_id, 1, b"late"), 404, "NoSuchUpload"
            )
            await self.fails_with_code(
                self.client.complete_upload(key, upload_id, [CompletedPart(1, etag)]),
                404,
                "NoSuchUpload",
            )

    @_deferred_test
    async def test_complete_again(self) -> None:
        """
        A CompleteMultipartUpload repeated after it landed (a retry whose first
        answer was lost) either fails with 404 NoSuchUpload or answers the same ETag
        again (S3 treats a repeat of the Complete that made the current object as
        idempotent; moto too); either way the object is unchanged.
        """
        key = self.key("done.gz")
        upload_id = await self.client.create_upload(key)
        etag1 = await self.client.upload_part(key, upload_id, 1, b"part")
        parts = [CompletedPart(1, etag1)]
        etag = await self.client.complete_upload(key, upload_id, parts)
        try:
            again = await self.client.complete_upload(key, upload_id, parts)
        except StorageError as e:
            self.assertEqual((e.status, e.code), (404, "NoSuchUpload"))
        else:
            self.assertEqual(again, etag)
        self.assertEqual(await self.client.head(key), ObjectInfo(4, etag))
        self.assertEqual(await self.client.get(key), b"part")

    @_deferred_test
    async def test_list_uploads(self) -> None:
        """
        list_uploads reports the pending uploads under a prefix only, with a
        recent-ish ``initiated`` time in epoch seconds; two uploads of one key are
        both listed.
        """
        inside = self.key("in/a.gz")
        outside = self.key("out/b.gz")
        upload_in = await self.client.create_upload(inside)
        second_in = await self.client.create_upload(inside)
        upload_out = await self.client.create_upload(outside)
        listed = await self.client.list_uploads(self.key("in/"))
        self.assertEqual(
            sorted((u.key, u.upload_id) for u in listed),
            sorted([(inside, upload_in), (inside, second_in)]),
        )
        self.assertIsInstance(listed[0].initiated, float)
        self.assertTrue(listed[0].initiated <= time.time() + 3600)
        everything = await self.client.list_uploads(self.key(""))
        self.assertIn((outside, upload_out), {(u.key, u.upload_id) for u in everything})

    @_deferred_test
    async def test_list_parts(self) -> None:
        """
        list_parts reports each uploaded part's number, ETag and size, in number
        order, only the newest upload of a number.
        """
        key = self.key("parts.gz")
        upload_id = await self.client.create_upload(key)
        etag1 = await self.client.upload_part(key, upload_id, 1, body_of(self.min_part, 7))
        await self.client.upload_part(key, upload_id, 3, b"old")
        etag3 = await self.client.upload_part(key, upload_id, 3, b"newer")
        etag2 = await self.client.upload_part(key, upload_id, 2, b"two")
        parts = await self.client.list_parts(key, upload_id)
        self.assertEqual(
            [(p.number, p.etag, p.size) for p in parts],
            [(1, etag1, self.min_part), (2, etag2, 3), (3, etag3, 5)],
        )

    @_deferred_test
    async def test_abort(self) -> None:
        """
        abort_upload removes the upload: list_uploads no longer reports it, list_parts
        of it fails with 404 NoSuchUpload, and the key was never written.
        """
        key = self.key("aborted.gz")
        kept_key = self.key("kept.gz")
        upload_id = await self.client.create_upload(key)
        kept = await self.client.create_upload(kept_key)
        await self.client.upload_part(key, upload_id, 1, b"part")
        self.assertIsNone(await self.client.abort_upload(key, upload_id))
        listed = await self.client.list_uploads(self.key(""))
        self.assertEqual([(u.key, u.upload_id) for u in listed], [(kept_key, kept)])
        self.assertIsNone(await self.client.head(key))
        await self.fails_with_code(self.client.list_parts(key, upload_id), 404, "NoSuchUpload")

    # -- the bucket --------------------------------------------------------------

    @_deferred_test
    async def test_bucket(self) -> None:
        """
        check succeeds for the bucket; versioning is "" for a bucket that never had
        it; close fires.
        """
        self.assertIsNone(await self.client.check())
        self.assertEqual(await self.client.versioning(), "")
        self.assertIsNone(await self.client.close())
