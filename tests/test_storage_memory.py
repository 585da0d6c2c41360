"""
The in-memory store and the discard store: the store contract for the memory store
(so unit tests run against the same rules as S3 on moto), and what the memory store
enforces beyond moto (If-Match on CompleteMultipartUpload), plus its test controls.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from loghandler.interfaces import CompletedPart, IObjectStore, PreconditionFailed, StorageError
from loghandler.storage.discard import DiscardStore
from loghandler.storage.memory import MemoryStore
from tests.contract import ObjectStoreContractMixin


class MemoryStoreContractTests(ObjectStoreContractMixin, TestCase):
    """The store contract against MemoryStore with 1 KiB minimum parts."""

    def make_store(self) -> tuple[MemoryStore, int]:
        return MemoryStore(min_part_size=1024), 1024


class MemoryStoreTests(SynchronousTestCase):
    """What the memory store adds for tests."""

    def test_lost_answer_still_writes(self) -> None:
        """lose_answer: the call is carried out but answered with a StorageError."""
        store = MemoryStore()
        store.lose_answer("PutObject")
        failure = self.failureResultOf(store.put("k", b"x"), StorageError)
        self.assertEqual(failure.value.status, 0)
        self.assertEqual(store.body("k"), b"x")
        self.successResultOf(store.put("k", b"y"))

    def test_hold_and_release(self) -> None:
        """hold keeps calls waiting; release runs them in order."""
        store = MemoryStore()
        store.hold("PutObject")
        first, second = store.put("k", b"1"), store.put("k", b"2")
        self.assertNoResult(first)
        self.assertNotIn("k", store.objects)
        store.release(1)
        self.successResultOf(first)
        self.assertEqual(store.body("k"), b"1")
        store.release()
        self.successResultOf(second)
        self.assertEqual(store.body("k"), b"2")

    def test_complete_if_match_enforced(self) -> None:
        """A stale If-Match on CompleteMultipartUpload is refused (moto lets it pass)."""
        store = MemoryStore(min_part_size=1)
        self.successResultOf(store.put("k", b"base"))
        upload_id = self.successResultOf(store.create_upload("k"))
        etag = self.successResultOf(store.upload_part("k", upload_id, 1, b"new"))
        self.failureResultOf(
            store.complete_upload("k", upload_id, [CompletedPart(1, etag)], if_match='"stale"'),
            PreconditionFailed,
        )
        self.assertEqual(store.body("k"), b"base")


class DiscardStoreTests(SynchronousTestCase):
    """NO_UPLOAD's store."""

    def test_counts_and_keeps_nothing(self) -> None:
        """It provides IObjectStore, counts the bytes and never finds an object."""
        store = DiscardStore()
        self.assertTrue(verifyObject(IObjectStore, store))
        self.successResultOf(store.put("k", b"abc", if_none_match=True))
        upload_id = self.successResultOf(store.create_upload("k"))
        self.successResultOf(store.upload_part("k", upload_id, 2, b"defg"))
        self.assertEqual(store.bytes_discarded, 7)
        self.assertIsNone(self.successResultOf(store.head("k")))
