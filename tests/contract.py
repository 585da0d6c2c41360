"""
The behaviour every :class:`~loghandler.interfaces.IObjectStore` must have, written
once and run against each store (the pattern of twisted/txaws
``txaws/testing/s3_tests.py``).

Mix :class:`ObjectStoreContractMixin` into a ``twisted.trial.unittest.TestCase`` (not
``SynchronousTestCase``: the tests return Deferreds, which fire at once for an
in-memory store and later for a store on a network) and implement ``make_store``::

    class MemoryStoreContractTests(ObjectStoreContractMixin, TestCase):
        def make_store(self):
            return MemoryStore(), 5 * 1024 * 1024

A store that does not enforce some condition (moto does not enforce ``If-Match`` on
CompleteMultipartUpload) overrides that test method and skips it with the reason.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from loghandler.interfaces import (
    CompletedPart,
    IObjectStore,
    ObjectInfo,
    PreconditionFailed,
)


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


def _body(size: int, seed: int) -> bytes:
    """
    ``size`` bytes that differ from one ``seed`` to another and cover all byte
    values (binary, not text: gzip data is binary).
    """
    pattern = bytes((seed * 7 + i) % 256 for i in range(256))
    return (pattern * (size // 256 + 1))[:size]


class ObjectStoreContractMixin:
    """
    Tests of the :class:`~loghandler.interfaces.IObjectStore` contract.

    Subclasses (which also derive from ``twisted.trial.unittest.TestCase``) implement
    :meth:`make_store`.  Every test uses keys under its own prefix.
    """

    # Provided by trial's TestCase.
    assertEqual: Callable[..., None]
    assertIn: Callable[..., None]
    assertNotIn: Callable[..., None]
    assertIsInstance: Callable[..., None]
    assertIsNone: Callable[..., None]
    assertTrue: Callable[..., None]
    assertFailure: Callable[..., "Deferred[Any]"]
    id: Callable[[], str]

    def make_store(self) -> tuple[Any, int]:
        """
        A fresh (or emptied) store under test and its smallest allowed non-last part
        size in bytes (5 MiB for S3), as ``(store, min_part_size)``.  Called once per
        test.
        """
        raise NotImplementedError

    def _setUpStore(self) -> tuple[Any, int]:
        """
        ``(store, min_part_size)`` for this test, made on first use.
        """
        made: Optional[tuple[Any, int]] = getattr(self, "_contract_store", None)
        if made is None:
            made = self.make_store()
            self._contract_store = made
        return made

    @property
    def store(self) -> Any:
        """
        The store under test.
        """
        return self._setUpStore()[0]

    @property
    def min_part(self) -> int:
        """
        The store's smallest non-last part, in bytes.
        """
        return self._setUpStore()[1]

    def key(self, name: str) -> str:
        """
        A key for this test: ``contract/{test method}/{name}``.
        """
        return f"contract/{self.id().rsplit('.', 1)[-1]}/{name}"

    async def fails_with_precondition(self, d: "Deferred[Any]") -> None:
        """
        Wait for ``d`` and check that it failed with :class:`PreconditionFailed`.
        """
        error = await self.assertFailure(d, PreconditionFailed)
        self.assertEqual(error.status, 412)

    async def upload(
        self, key: str, bodies: list[bytes], **complete: Any
    ) -> tuple[str, list[CompletedPart]]:
        """
        A whole multipart upload of ``bodies`` as parts 1, 2, ... of ``key``;
        ``complete`` goes to ``complete_upload``.  Returns (object ETag, parts).
        """
        upload_id = await self.store.create_upload(key)
        parts = []
        for number, body in enumerate(bodies, 1):
            etag = await self.store.upload_part(key, upload_id, number, body)
            parts.append(CompletedPart(number, etag))
        etag = await self.store.complete_upload(key, upload_id, parts, **complete)
        return etag, parts

    # -- the contract ------------------------------------------------------------

    def test_provides_interface(self) -> None:
        """
        The store provides IObjectStore, name included.
        """
        self.assertTrue(verifyObject(IObjectStore, self.store))
        self.assertIsInstance(self.store.name, str)

    @_deferred_test
    async def test_put_head_get(self) -> None:
        """
        put stores the exact bytes and fires with an ETag; head reports the size and
        that ETag; get with that ETag returns the bytes.
        """
        key = self.key("object.gz")
        body = _body(1000, 1) + b"\x00\xff\r\n"
        etag = await self.store.put(key, body)
        self.assertIsInstance(etag, str)
        self.assertEqual(await self.store.head(key), ObjectInfo(len(body), etag))
        self.assertEqual(await self.store.get(key, etag), body)

    @_deferred_test
    async def test_write_id(self) -> None:
        """
        A write ID given to put, or to create_upload and then complete, is what head
        reports for the object; an object written without one reports None.
        """
        key = self.key("object.gz")
        await self.store.put(key, b"one", write_id="writer-a")
        self.assertEqual((await self.store.head(key)).write_id, "writer-a")
        await self.store.put(key, b"two")
        self.assertIsNone((await self.store.head(key)).write_id)
        upload_id = await self.store.create_upload(key, "writer-b")
        etag = await self.store.upload_part(key, upload_id, 1, b"three")
        await self.store.complete_upload(key, upload_id, [CompletedPart(1, etag)])
        self.assertEqual((await self.store.head(key)).write_id, "writer-b")

    @_deferred_test
    async def test_put_empty(self) -> None:
        """
        An empty object can be stored and read back.
        """
        key = self.key("empty.gz")
        etag = await self.store.put(key, b"")
        self.assertEqual(await self.store.head(key), ObjectInfo(0, etag))
        self.assertEqual(await self.store.get(key, etag), b"")

    @_deferred_test
    async def test_odd_key(self) -> None:
        """
        Keys with spaces, non-ASCII letters and URL-special characters work.
        """
        key = self.key("dir with space/ü+%=&?#~.._x.gz")
        etag = await self.store.put(key, b"odd")
        self.assertEqual(await self.store.head(key), ObjectInfo(3, etag))
        self.assertEqual(await self.store.get(key, etag), b"odd")
        self.assertIsNone(await self.store.head(self.key("dir with space/ü")))

    @_deferred_test
    async def test_head_missing(self) -> None:
        """
        head of a key that does not exist is None.
        """
        self.assertIsNone(await self.store.head(self.key("missing.gz")))

    @_deferred_test
    async def test_put_if_none_match_new(self) -> None:
        """
        put with if_none_match writes a key that does not exist.
        """
        key = self.key("new.gz")
        etag = await self.store.put(key, b"first", if_none_match=True)
        self.assertEqual(await self.store.get(key, etag), b"first")

    @_deferred_test
    async def test_put_if_none_match_existing(self) -> None:
        """
        put with if_none_match on an existing key fails with PreconditionFailed and
        leaves the object as it was.
        """
        key = self.key("exists.gz")
        etag = await self.store.put(key, b"first")
        await self.fails_with_precondition(
            self.store.put(key, b"second", if_none_match=True)
        )
        self.assertEqual(await self.store.get(key, etag), b"first")

    @_deferred_test
    async def test_put_current_if_match(self) -> None:
        """
        put with the current ETag as if_match replaces the object.
        """
        key = self.key("replace.gz")
        etag = await self.store.put(key, b"first")
        new_etag = await self.store.put(key, b"second", if_match=etag)
        self.assertEqual(await self.store.get(key, new_etag), b"second")

    @_deferred_test
    async def test_put_stale_if_match(self) -> None:
        """
        put with a stale if_match fails with PreconditionFailed and leaves the newer
        object in place.
        """
        key = self.key("stale.gz")
        old = await self.store.put(key, b"first")
        current = await self.store.put(key, b"second")
        await self.fails_with_precondition(self.store.put(key, b"third", if_match=old))
        self.assertEqual(await self.store.get(key, current), b"second")

    @_deferred_test
    async def test_get_stale_if_match(self) -> None:
        """
        get with a stale if_match fails with PreconditionFailed.
        """
        key = self.key("stale-get.gz")
        old = await self.store.put(key, b"first")
        await self.store.put(key, b"second")
        await self.fails_with_precondition(self.store.get(key, old))

    @_deferred_test
    async def test_multipart(self) -> None:
        """
        create, upload parts (all but the last of the minimum size), complete: the
        object is the exact concatenation, and head reports its size and the ETag
        complete returned.
        """
        key = self.key("multipart.gz")
        bodies = [_body(self.min_part, 1), _body(self.min_part, 2), b"tail"]
        etag, _ = await self.upload(key, bodies, if_none_match=True)
        expected = b"".join(bodies)
        self.assertEqual(await self.store.head(key), ObjectInfo(len(expected), etag))
        self.assertEqual(await self.store.get(key, etag), expected)

    @_deferred_test
    async def test_reupload_part(self) -> None:
        """
        Uploading a part number again replaces that part; complete uses the ETag of
        the newest upload.
        """
        key = self.key("reupload.gz")
        first = _body(self.min_part, 1)
        upload_id = await self.store.create_upload(key)
        etag1 = await self.store.upload_part(key, upload_id, 1, first)
        await self.store.upload_part(key, upload_id, 2, b"old checkpoint")
        etag2 = await self.store.upload_part(key, upload_id, 2, b"new checkpoint, longer")
        etag = await self.store.complete_upload(
            key, upload_id, [CompletedPart(1, etag1), CompletedPart(2, etag2)]
        )
        self.assertEqual(
            await self.store.get(key, etag), first + b"new checkpoint, longer"
        )

    @_deferred_test
    async def test_complete_if_none_match_existing(self) -> None:
        """
        complete_upload with if_none_match when the key exists fails with
        PreconditionFailed and leaves the object as it was.
        """
        key = self.key("complete-exists.gz")
        existing = await self.store.put(key, b"first")
        upload_id = await self.store.create_upload(key)
        etag1 = await self.store.upload_part(key, upload_id, 1, b"part")
        await self.fails_with_precondition(
            self.store.complete_upload(
                key, upload_id, [CompletedPart(1, etag1)], if_none_match=True
            )
        )
        self.assertEqual(await self.store.get(key, existing), b"first")

    @_deferred_test
    async def test_complete_current_if_match(self) -> None:
        """
        complete_upload with the current ETag as if_match replaces the object.
        """
        key = self.key("complete-replace.gz")
        existing = await self.store.put(key, b"first")
        etag, _ = await self.upload(key, [b"second"], if_match=existing)
        self.assertEqual(await self.store.get(key, etag), b"second")

    @_deferred_test
    async def test_complete_stale_if_match(self) -> None:
        """
        complete_upload with a stale if_match fails with PreconditionFailed and
        leaves the newer object in place.
        """
        key = self.key("complete-stale.gz")
        old = await self.store.put(key, b"first")
        current = await self.store.put(key, b"second")
        upload_id = await self.store.create_upload(key)
        etag1 = await self.store.upload_part(key, upload_id, 1, b"third")
        await self.fails_with_precondition(
            self.store.complete_upload(key, upload_id, [CompletedPart(1, etag1)], if_match=old)
        )
        self.assertEqual(await self.store.get(key, current), b"second")

    @_deferred_test
    async def test_upload_part_copy(self) -> None:
        """
        upload_part_copy of an existing object (of the minimum part size) as part 1,
        more parts uploaded after it, complete with if_match of the base: the object
        is the base followed by the new bytes.
        """
        key = self.key("append.gz")
        base = _body(self.min_part, 3)
        base_etag = await self.store.put(key, base)
        upload_id = await self.store.create_upload(key)
        copied = await self.store.upload_part_copy(key, upload_id, 1, key, base_etag)
        self.assertIsInstance(copied, str)
        added = await self.store.upload_part(key, upload_id, 2, b"appended")
        etag = await self.store.complete_upload(
            key,
            upload_id,
            [CompletedPart(1, copied), CompletedPart(2, added)],
            if_match=base_etag,
        )
        self.assertEqual(await self.store.get(key, etag), base + b"appended")

    @_deferred_test
    async def test_upload_part_copy_from_other_key(self) -> None:
        """
        upload_part_copy reads the source key, not the upload's key.
        """
        key = self.key("target.gz")
        source = self.key("source dir/recovered ü.gz")
        base = _body(self.min_part, 4)
        source_etag = await self.store.put(source, base)
        upload_id = await self.store.create_upload(key)
        copied = await self.store.upload_part_copy(key, upload_id, 1, source, source_etag)
        etag = await self.store.complete_upload(
            key, upload_id, [CompletedPart(1, copied)], if_none_match=True
        )
        self.assertEqual(await self.store.get(key, etag), base)

    @_deferred_test
    async def test_upload_part_copy_stale_if_match(self) -> None:
        """
        upload_part_copy with a stale if_match fails with PreconditionFailed.
        """
        key = self.key("copy-stale.gz")
        old = await self.store.put(key, _body(self.min_part, 5))
        await self.store.put(key, _body(self.min_part, 6))
        upload_id = await self.store.create_upload(key)
        await self.fails_with_precondition(
            self.store.upload_part_copy(key, upload_id, 1, key, old)
        )

    @_deferred_test
    async def test_list_uploads(self) -> None:
        """
        list_uploads(prefix) reports the pending uploads under the prefix (key and
        upload ID, initiated as epoch seconds) and none outside it.
        """
        inside = self.key("in/a.gz")
        outside = self.key("out/b.gz")
        upload_in = await self.store.create_upload(inside)
        upload_out = await self.store.create_upload(outside)
        listed = await self.store.list_uploads(self.key("in/"))
        self.assertEqual([(u.key, u.upload_id) for u in listed], [(inside, upload_in)])
        self.assertIsInstance(listed[0].initiated, float)
        everything = await self.store.list_uploads(self.key(""))
        pairs = {(u.key, u.upload_id) for u in everything}
        self.assertIn((outside, upload_out), pairs)
        self.assertIn((inside, upload_in), pairs)

    @_deferred_test
    async def test_list_uploads_several_per_key(self) -> None:
        """
        Two pending uploads of one key are both listed.
        """
        key = self.key("twice.gz")
        first = await self.store.create_upload(key)
        second = await self.store.create_upload(key)
        listed = await self.store.list_uploads(self.key(""))
        self.assertEqual(
            sorted((u.key, u.upload_id) for u in listed),
            sorted([(key, first), (key, second)]),
        )

    @_deferred_test
    async def test_list_parts(self) -> None:
        """
        list_parts reports each uploaded part's number, ETag and size, in number
        order, the newest upload of a number only.
        """
        key = self.key("parts.gz")
        upload_id = await self.store.create_upload(key)
        etag1 = await self.store.upload_part(key, upload_id, 1, _body(self.min_part, 7))
        await self.store.upload_part(key, upload_id, 3, b"old")
        etag3 = await self.store.upload_part(key, upload_id, 3, b"newer")
        etag2 = await self.store.upload_part(key, upload_id, 2, b"two")
        parts = await self.store.list_parts(key, upload_id)
        self.assertEqual(
            [(p.number, p.etag, p.size) for p in parts],
            [(1, etag1, self.min_part), (2, etag2, 3), (3, etag3, 5)],
        )

    @_deferred_test
    async def test_abort(self) -> None:
        """
        abort_upload removes the upload: list_uploads no longer reports it, and the
        key was never written.
        """
        key = self.key("aborted.gz")
        kept_key = self.key("kept.gz")
        upload_id = await self.store.create_upload(key)
        kept = await self.store.create_upload(kept_key)
        await self.store.upload_part(key, upload_id, 1, b"part")
        await self.store.abort_upload(key, upload_id)
        listed = await self.store.list_uploads(self.key(""))
        self.assertEqual([(u.key, u.upload_id) for u in listed], [(kept_key, kept)])
        self.assertIsNone(await self.store.head(key))
