"""
The in-memory S3 and the discard store: the S3 client contract for
:class:`~loghandler.storage.memory.MemoryStore` (so unit tests run against the same
rules as S3 on moto), the rules it enforces beyond moto (If-Match and 409 on
CompleteMultipartUpload), its fault controls (fail, lose_answer, hold/release,
conflict, before), and :class:`~loghandler.storage.discard.DiscardStore` as an
:class:`~loghandler.interfaces.IObjectStore`.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseNeverReceived
from zope.interface.verify import verifyObject

from loghandler.interfaces import (
    Finished,
    IObjectStore,
    IObjectWriter,
    PreconditionFailed,
    StorageError,
)
from loghandler.registry import StreamRegistry, StreamSettings
from loghandler.retry import Fault, classify
from loghandler.storage.discard import DiscardStore
from loghandler.storage.memory import MemoryStore
from loghandler.storage.s3.api import MAX_WRITES, CompletedPart, IS3Client, ObjectInfo
from tests.contract import S3ClientContractMixin
from tests.helpers import message


class MemoryStoreContractTests(S3ClientContractMixin, TestCase):
    """The S3 client contract against MemoryStore with 1 KiB minimum parts."""

    def make_client(self) -> tuple[MemoryStore, int]:
        return MemoryStore(min_part_size=1024), 1024


class MemoryStoreCase(SynchronousTestCase):
    """A MemoryStore with 4-byte minimum parts on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(min_part_size=4, now=self.clock.seconds)

    def head(self, key: str) -> ObjectInfo:
        """HeadObject of an object that exists."""
        info = self.successResultOf(self.store.head(key))
        assert info is not None, key
        return info

    def upload(self, key: str, *bodies: bytes, writes: tuple[str, ...] = ()) -> tuple[str, list[CompletedPart]]:
        """Create an upload on ``key`` and upload ``bodies`` as parts 1, 2, ..."""
        upload_id = self.successResultOf(self.store.create_upload(key, writes))
        parts = [
            CompletedPart(n, self.successResultOf(self.store.upload_part(key, upload_id, n, body)))
            for n, body in enumerate(bodies, 1)
        ]
        return upload_id, parts


class FaultControlTests(MemoryStoreCase):
    """What the memory store offers tests to play S3's failures."""

    def test_provides_interface(self) -> None:
        """MemoryStore provides IS3Client."""
        self.assertTrue(verifyObject(IS3Client, self.store))

    def test_fail_does_not_land(self) -> None:
        """fail: the next calls of the operation fail with the error and change nothing."""
        error = StorageError("PutObject", 503, "SlowDown")
        self.store.fail("PutObject", error, times=2)
        for _ in range(2):
            self.assertIs(self.failureResultOf(self.store.put("k", b"x"), StorageError).value, error)
        self.assertEqual(self.store.objects, {})
        self.successResultOf(self.store.put("k", b"x"))
        self.assertEqual(self.store.body("k"), b"x")
        self.assertEqual(self.store.calls, [("PutObject", "k")] * 3)

    def test_fail_any_exception(self) -> None:
        """fail takes any exception, also types a client is not expected to raise."""
        self.store.fail("UploadPart", RuntimeError("boom"))
        upload_id = self.successResultOf(self.store.create_upload("k"))
        self.failureResultOf(self.store.upload_part("k", upload_id, 1, b"abcd"), RuntimeError)
        self.assertEqual(self.store.uploads[upload_id].parts, {})

    def test_lost_answer_lands(self) -> None:
        """
        lose_answer: the call is carried out, then answered with treq's
        ResponseNeverReceived (a transient fault: it is retried).
        """
        self.store.lose_answer("PutObject")
        failure = self.failureResultOf(self.store.put("k", b"x", writes=("w1",)), ResponseNeverReceived)
        self.assertIs(classify(failure.value), Fault.TRANSIENT)
        self.assertEqual(self.store.body("k"), b"x")
        self.assertEqual(self.store.objects["k"].writes, ("w1",))
        self.successResultOf(self.store.put("k", b"y"))
        self.assertEqual(self.store.body("k"), b"y")

    def test_lost_answer_of_complete(self) -> None:
        """A Complete whose answer is lost completed: the object is there, the upload gone."""
        upload_id, parts = self.upload("k", b"abcd", b"e")
        self.store.lose_answer("CompleteMultipartUpload")
        self.failureResultOf(self.store.complete_upload("k", upload_id, parts), ResponseNeverReceived)
        self.assertEqual(self.store.body("k"), b"abcde")
        failure = self.failureResultOf(self.store.complete_upload("k", upload_id, parts), StorageError)
        self.assertEqual((failure.value.status, failure.value.code), (404, "NoSuchUpload"))

    def test_hold_and_release(self) -> None:
        """hold keeps calls waiting, in order; release(n) runs the first n, release() all."""
        self.store.hold("PutObject")
        first, second = self.store.put("k", b"1"), self.store.put("k", b"2")
        self.assertEqual([(h.operation, h.key) for h in self.store.held], [("PutObject", "k")] * 2)
        self.assertNoResult(first)
        self.assertNotIn("k", self.store.objects)
        self.store.release(1)
        self.successResultOf(first)
        self.assertEqual(self.store.body("k"), b"1")
        self.assertNoResult(second)
        self.store.release()
        self.successResultOf(second)
        self.assertEqual(self.store.body("k"), b"2")
        self.successResultOf(self.store.put("k", b"3"))  # no longer held
        self.assertEqual(self.store.body("k"), b"3")

    def test_hold_cancel_release_still_lands(self) -> None:
        """
        A held call whose caller gave up (cancelled) still lands when released, as a
        request already sent may; its answer goes nowhere.
        """
        self.store.hold("PutObject")
        d = self.store.put("k", b"late")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertNotIn("k", self.store.objects)
        self.store.release()
        self.assertEqual(self.store.body("k"), b"late")

    def test_held_call_that_fails_when_released(self) -> None:
        """A held call is checked when it runs: a condition that broke meanwhile fails it."""
        self.store.hold("PutObject")
        d = self.store.put("k", b"mine", if_none_match=True)
        self.store.store("k", b"theirs")
        self.store.release()
        self.failureResultOf(d, PreconditionFailed)
        self.assertEqual(self.store.body("k"), b"theirs")

    def test_conflict(self) -> None:
        """
        conflict: the next conditional Complete answers 409 ConditionalRequestConflict
        (a CONFLICT fault) and discards the upload, writing nothing.
        """
        upload_id, parts = self.upload("k", b"abcd")
        self.store.conflict()
        failure = self.failureResultOf(
            self.store.complete_upload("k", upload_id, parts, if_none_match=True), StorageError
        )
        self.assertEqual((failure.value.status, failure.value.code), (409, "ConditionalRequestConflict"))
        self.assertIs(classify(failure.value), Fault.CONFLICT)
        self.assertNotIn(upload_id, self.store.uploads)
        self.assertNotIn("k", self.store.objects)
        failure = self.failureResultOf(
            self.store.complete_upload("k", upload_id, parts, if_none_match=True), StorageError
        )
        self.assertEqual(failure.value.code, "NoSuchUpload")

    def test_conflict_only_conditional(self) -> None:
        """An unconditional Complete is not taken by conflict(); the next conditional one is."""
        self.store.conflict()
        upload_id, parts = self.upload("k", b"abcd")
        self.successResultOf(self.store.complete_upload("k", upload_id, parts))
        etag = self.store.objects["k"].etag
        upload_id, parts = self.upload("k", b"efgh")
        failure = self.failureResultOf(
            self.store.complete_upload("k", upload_id, parts, if_match=etag), StorageError
        )
        self.assertEqual(failure.value.status, 409)
        self.assertEqual(self.store.body("k"), b"abcd")

    def test_before(self) -> None:
        """before runs its action once, just before the next call of the operation."""
        ran = []
        self.store.before("HeadObject", lambda: ran.append(self.store.store("k", b"other")))
        info = self.successResultOf(self.store.head("k"))
        self.assertEqual(info, ObjectInfo(5, ran[0], ()))
        self.successResultOf(self.store.head("k"))
        self.assertEqual(len(ran), 1)


class RuleTests(MemoryStoreCase):
    """S3's rules, as the memory store keeps them."""

    def test_writes_set_at_put(self) -> None:
        """PutObject sets the write IDs, the newest MAX_WRITES of those given."""
        writes = tuple("w%d" % n for n in range(MAX_WRITES + 4))
        self.successResultOf(self.store.put("k", b"x", writes=writes))
        self.assertEqual(self.head("k").writes, writes[-MAX_WRITES:])
        self.successResultOf(self.store.put("k", b"y"))
        self.assertEqual(self.head("k").writes, ())

    def test_writes_set_at_create_only(self) -> None:
        """
        A multipart object gets the write IDs its upload was created with, not those of
        the object it replaces, nor any given later.
        """
        self.successResultOf(self.store.put("k", b"old", writes=("w1",)))
        upload_id, parts = self.upload("k", b"abcd", b"e", writes=("w1", "w2"))
        self.store.objects["k"].writes = ("changed",)  # another writer, after the create
        self.successResultOf(self.store.complete_upload("k", upload_id, parts))
        self.assertEqual(self.head("k").writes, ("w1", "w2"))
        upload_id, parts = self.upload("k", b"abcd")
        self.successResultOf(self.store.complete_upload("k", upload_id, parts))
        self.assertEqual(self.head("k").writes, ())

    def test_copy_keeps_target_upload_writes(self) -> None:
        """A part copied from an object does not carry that object's write IDs along."""
        self.successResultOf(self.store.put("src", b"abcdefgh", writes=("src-write",)))
        etag = self.store.objects["src"].etag
        upload_id = self.successResultOf(self.store.create_upload("k", ("mine",)))
        copied = self.successResultOf(
            self.store.upload_part_copy("k", upload_id, 1, "src", etag, (2, 6))
        )
        self.successResultOf(self.store.complete_upload("k", upload_id, [CompletedPart(1, copied)]))
        self.assertEqual(self.store.body("k"), b"cdef")
        self.assertEqual(self.store.objects["k"].writes, ("mine",))

    def test_ranged_get(self) -> None:
        """GetObject of a range gives those bytes (end exclusive), under If-Match too."""
        etag = self.successResultOf(self.store.put("k", b"0123456789"))
        self.assertEqual(self.successResultOf(self.store.get("k", byte_range=(2, 5))), b"234")
        self.assertEqual(self.successResultOf(self.store.get("k", etag, (8, 20))), b"89")
        self.assertEqual(self.successResultOf(self.store.get("k", etag)), b"0123456789")
        self.failureResultOf(self.store.get("k", '"stale"', (0, 1)), PreconditionFailed)
        failure = self.failureResultOf(self.store.get("k", byte_range=(10, 12)), StorageError)
        self.assertEqual((failure.value.status, failure.value.code), (416, "InvalidRange"))
        failure = self.failureResultOf(self.store.get("missing", byte_range=(0, 1)), StorageError)
        self.assertEqual((failure.value.status, failure.value.code), (404, "NoSuchKey"))

    def test_delete(self) -> None:
        """DeleteObject removes the object; deleting a missing key succeeds too."""
        self.successResultOf(self.store.put("k", b"x"))
        self.successResultOf(self.store.delete("k"))
        self.assertIsNone(self.successResultOf(self.store.head("k")))
        self.successResultOf(self.store.delete("k"))
        self.assertEqual(self.store.calls[-2:], [("HeadObject", "k"), ("DeleteObject", "k")])

    def test_complete_if_match_enforced(self) -> None:
        """A stale If-Match on CompleteMultipartUpload is refused (moto lets it pass)."""
        self.successResultOf(self.store.put("k", b"base"))
        upload_id, parts = self.upload("k", b"new")
        self.failureResultOf(
            self.store.complete_upload("k", upload_id, parts, if_match='"stale"'),
            PreconditionFailed,
        )
        self.assertEqual(self.store.body("k"), b"base")
        self.assertIn(upload_id, self.store.uploads, "a 412 leaves the upload")

    def test_entity_too_small(self) -> None:
        """Every part but the last must reach min_part_size (EntityTooSmall)."""
        upload_id, parts = self.upload("k", b"abc", b"defg")
        failure = self.failureResultOf(self.store.complete_upload("k", upload_id, parts), StorageError)
        self.assertEqual((failure.value.status, failure.value.code), (400, "EntityTooSmall"))
        self.assertIs(classify(failure.value), Fault.INVALID)

    def test_last_modified_and_initiated(self) -> None:
        """Objects and uploads take the store's clock."""
        self.clock.advance(42)
        self.successResultOf(self.store.put("k", b"x"))
        (listed,) = self.successResultOf(self.store.list_objects(""))
        self.assertEqual(listed.last_modified, 42)
        self.successResultOf(self.store.create_upload("u"))
        (pending,) = self.successResultOf(self.store.list_uploads(""))
        self.assertEqual((pending.key, pending.initiated), ("u", 42))


class DiscardStoreTests(SynchronousTestCase):
    """NO_UPLOAD's store: an IObjectStore that keeps nothing."""

    def test_provides_interfaces(self) -> None:
        """It provides IObjectStore; its writers provide IObjectWriter."""
        store = DiscardStore()
        self.assertTrue(verifyObject(IObjectStore, store))
        self.assertTrue(verifyObject(IObjectWriter, store.open("chat/k")))
        self.assertIsNone(store.problem)
        self.assertEqual(store.name, "discard")

    def test_counts_and_keeps_nothing(self) -> None:
        """Parts and tails are counted and dropped; finish says the object was merged."""
        store = DiscardStore()
        writer = store.open("chat/k")
        self.assertEqual(writer.key, "chat/k")
        self.assertIsNone(self.successResultOf(writer.part(b"abc")))
        self.assertIsNone(self.successResultOf(writer.part(b"defg")))
        self.assertEqual(
            self.successResultOf(writer.finish(b"hi")), Finished("merged", key="chat/k")
        )
        self.assertEqual(store.bytes_discarded, 9)
        writer.abandon()

    def test_lifecycle(self) -> None:
        """check, stopping and close succeed at once."""
        store = DiscardStore()
        self.successResultOf(store.check())
        store.stopping(25.0)
        self.successResultOf(store.close())

    def test_behind_a_registry(self) -> None:
        """The whole pipeline runs over it: messages taken, compressed and dropped."""
        clock = Clock()
        store = DiscardStore()
        registry = StreamRegistry(store, clock, StreamSettings(part_size=1024, lifetime_s=60))
        for n in range(1, 50):
            registry.accept(message(n))
        self.successResultOf(registry.close_all())
        self.assertGreater(store.bytes_discarded, 0)
        self.assertEqual(registry.budget.held, 0)
