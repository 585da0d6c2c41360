"""
Tests for the Azure writer (:mod:`loghandler.storage.azure.writer`) over the in-memory
Azure container (:class:`MemoryAppendBlobs`) on a ``task.Clock``: the bytes that land
in each blob, the calls made, the blocks, rollover names, and what two writers on one
blob do when answers are lost.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.gzipframe import GzipPartEncoder
from loghandler.interfaces import Abandoned, Finished, IObjectStore, IObjectWriter, StorageError
from loghandler.registry import StreamRegistry, StreamSettings
from loghandler.retry import RetryLayer
from loghandler.storage.azure.api import IAppendBlobClient
from loghandler.storage.azure.memory import MemoryAppendBlobs, MemoryBlob
from loghandler.storage.azure.writer import BLOCK_SUBFIELD, AzureObjectStore, block_id
from tests.helpers import message, noise, read_lines

KEY = "chat/2020-03-30/content_logs_2020-03-30_3"
WRITER_A = "a" * 32
WRITER_B = "b" * 32


def member(lines: list[bytes]) -> bytes:
    """One gzip member holding ``lines``, as the stream's encoder makes it."""
    encoder = GzipPartEncoder(1 << 30)
    encoder.write(b"".join(lines))
    return encoder.finish()


def extra_fields(blob: bytes) -> list[bytes]:
    """The ``Lh`` subfield data of every member header of ``blob`` (b"" if none)."""
    found = []
    while blob:
        assert blob[:3] == b"\x1f\x8b\x08"
        flags = blob[3]
        if flags & 4:
            xlen = int.from_bytes(blob[10:12], "little")
            extra = blob[12 : 12 + xlen]
            assert extra[:2] == BLOCK_SUBFIELD
            found.append(extra[4:])
        else:
            found.append(b"")
        d = zlib.decompressobj(31)
        d.decompress(blob)
        blob = d.unused_data
    return found


class AzureWriterCase(SynchronousTestCase):
    """A memory container, stores over it, helpers to write whole streams."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.azure = MemoryAppendBlobs()
        self.store = self.make_store(WRITER_A)

    def make_store(self, writer_id: str, **kwargs: Any) -> AzureObjectStore:
        kwargs.setdefault(
            "retry", RetryLayer(self.clock, attempt_timeout=10.0, backoff=Backoff(1.0, 8.0))
        )
        return AzureObjectStore(self.azure, self.clock, writer_id=writer_id, **kwargs)

    def settle(self, seconds: float = 120.0) -> None:
        """Let retries and timeouts run."""
        for _ in range(int(seconds)):
            self.clock.advance(1.0)

    def write(
        self, blocks: list[list[bytes]], store: Optional[AzureObjectStore] = None
    ) -> Finished:
        """One writer: each list of lines a part, the last one the tail."""
        writer = (store or self.store).open(KEY)
        parts = [writer.part(member(lines)) for lines in blocks[:-1]]
        done = writer.finish(member(blocks[-1]) if blocks[-1] else b"")
        self.settle()
        for part in parts:
            self.successResultOf(part)
        result: Finished = self.successResultOf(done)
        return result

    def lines_of(self, name: str) -> list[bytes]:
        return read_lines(self.azure.body(name))


class AppendTests(AzureWriterCase):
    """One writer on its own."""

    def test_interfaces(self) -> None:
        """The store, writer and memory client provide their interfaces."""
        verifyObject(IObjectStore, self.store)
        verifyObject(IObjectWriter, self.store.open(KEY))
        verifyObject(IAppendBlobClient, self.azure)

    def test_parts_and_tail_are_blocks_in_order(self) -> None:
        """
        A new blob is created (application/gzip); each part and the tail is one
        block; the blob reads back as the lines in order, every block naming this
        writer and its sequence number in its first gzip header.
        """
        lines = noise(0, 30)
        finished = self.write([lines[:10], lines[10:20], lines[20:]])
        self.assertEqual(finished, Finished("merged", key=KEY))
        self.assertEqual(self.lines_of(KEY), lines)
        blob = self.azure.blobs[KEY]
        self.assertEqual(blob.content_type, "application/gzip")
        self.assertEqual(len(blob.blocks), 3)
        self.assertEqual(
            extra_fields(blob.body), [block_id(WRITER_A, n) for n in (1, 2, 3)]
        )
        self.assertEqual(
            [op for op, _ in self.azure.calls],
            ["GetBlobProperties", "CreateAppendBlob", "AppendBlock", "AppendBlock", "AppendBlock"],
        )

    def test_nothing_written_is_empty(self) -> None:
        """A stream with no data makes no call and no blob."""
        self.assertEqual(self.write([[]]), Finished("empty"))
        self.assertEqual((self.azure.calls, self.azure.blobs), ([], {}))

    def test_appends_to_existing_blob(self) -> None:
        """
        An existing blob is appended to, never reset: one Get Blob Properties for
        its length, one read of its first bytes, no create.
        """
        old = [message(n).to_line() for n in range(3)]
        self.azure.append_now(KEY, gzip.compress(b"".join(old)))
        lines = noise(10, 5)
        self.write([lines])
        self.assertEqual(self.lines_of(KEY), old + lines)
        self.assertEqual(
            self.azure.calls,
            [("GetBlobProperties", KEY), ("GetBlob", KEY), ("AppendBlock", KEY)],
        )  # GetBlob: its first 3 bytes, a gzip header (else it is another program's)

    def test_checkpoints_are_blocks(self) -> None:
        """
        Through the registry: every checkpoint of a stream that got lines appends
        the member closed at that moment; an idle stream appends nothing; each
        line is stored once and is durable once its block landed.
        """
        budget = MemoryBudget(1 << 30)
        registry = StreamRegistry(
            self.store,
            self.clock,
            StreamSettings(part_size=1 << 20, lifetime_s=3600, checkpoint_s=10),
            budget,
        )
        registry.start_checkpoints()
        sent = []
        for n in range(1, 40):
            line = message(n).to_line()
            accepted = registry.accept(message(n))
            sent.append(line)
            if n % 10 == 0:
                self.clock.advance(10)
                self.assertTrue(self.successResultOf(accepted.durable()))
        self.clock.advance(30)  # one checkpoint for the last 9 lines, then idle
        self.assertEqual(len(self.azure.blobs[KEY].blocks), 4)
        self.assertEqual(self.lines_of(KEY), sent)
        done = registry.close_all()
        self.settle()
        self.successResultOf(done)
        self.assertEqual(len(self.azure.blobs[KEY].blocks), 4)  # nothing left to append
        self.assertEqual(self.lines_of(KEY), sent)
        self.assertEqual(budget.held, 0)


class LostAnswerTests(AzureWriterCase):
    """Every way an append can end without an answer: nothing stored twice."""

    def test_lost_answer_is_read_back(self) -> None:
        """
        The append landed but its answer was lost: the retry gets 412
        AppendPositionConditionNotMet, reads the block's header back at the
        position it asked for, finds its own, and goes on: no duplicate.
        """
        self.azure.lose_answer("AppendBlock")
        lines = noise(0, 20)
        with capturedLogs() as events:
            self.write([lines[:10], lines[10:]])
        self.assertEqual(self.lines_of(KEY), lines)
        self.assertEqual(len(self.azure.blobs[KEY].blocks), 2)
        self.assertIn(("GetBlob", KEY), self.azure.calls)
        self.assertTrue(any("was ours" in e.get("log_format", "") for e in events))

    def test_other_writer_appended_meanwhile(self) -> None:
        """
        Another writer appended between two appends: 412, the block there is not
        ours, so the writer reads the new length and appends after it.
        """
        lines = noise(0, 20)
        other = [message(100).to_line()]
        writer = self.store.open(KEY)
        first = writer.part(member(lines[:10]))
        self.settle(1)
        self.successResultOf(first)
        self.azure.append_now(KEY, member(other))
        done = writer.finish(member(lines[10:]))
        self.settle()
        self.successResultOf(done)
        self.assertEqual(self.lines_of(KEY), lines[:10] + other + lines[10:])
        self.assertEqual(
            [op for op, _ in self.azure.calls][-4:],
            ["AppendBlock", "GetBlob", "GetBlobProperties", "AppendBlock"],
        )

    def test_lost_answer_then_other_writer(self) -> None:
        """
        Our block landed (answer lost), then another writer appended: our retry is
        refused, the read-back at our position finds our block (not the other's,
        which is after it): stored once; the next block goes after the other's.
        """
        lines = noise(0, 30)
        other = [message(100).to_line()]
        self.azure.lose_answer("AppendBlock")
        writer = self.store.open(KEY)
        first = writer.part(member(lines[:10]))  # lands, answer lost
        self.azure.append_now(KEY, member(other))
        self.settle()
        self.successResultOf(first)
        done = writer.finish(member(lines[10:]))
        self.settle()
        self.successResultOf(done)
        self.assertEqual(self.lines_of(KEY), lines[:10] + other + lines[10:])

    def test_identical_blocks_of_two_writers_are_told_apart(self) -> None:
        """
        Two writers append the very same lines (a client sent a message twice): the
        block header names the writer, so A's read-back after a lost-and-unlanded
        attempt does not take B's identical block for its own.
        """
        line = [message(7).to_line()]
        store_b = self.make_store(WRITER_B)
        # A's first attempt fails without landing (no answer); meanwhile B appends
        # the same line.  A's retry is refused; what is at A's position is B's.
        self.azure.fail("AppendBlock", StorageError("AppendBlock", 0, "ServiceResponseError"))
        writer_a = self.store.open(KEY)
        a = writer_a.finish(member(line))
        self.write([line], store=store_b)
        self.settle()
        self.assertEqual(self.successResultOf(a), Finished("merged", key=KEY))
        self.assertEqual(self.lines_of(KEY), line + line)

    def test_stalled_attempt_lands_after_retry(self) -> None:
        """
        An attempt stalls past its timeout, the retry lands first; when the stalled
        one is finally carried out it is refused (its position is taken): once.
        """
        lines = noise(0, 10)
        self.azure.hold("AppendBlock")
        writer = self.store.open(KEY)
        done = writer.finish(member(lines))
        self.clock.advance(0)
        self.assertEqual(len(self.azure.held), 1)
        self.settle(12)  # the attempt timed out; the retry is held too
        self.assertEqual(len(self.azure.held), 2)
        self.azure.release(1)  # the stalled first attempt lands now
        self.assertEqual(len(self.azure.blobs[KEY].blocks), 1)
        self.azure.release()  # the retry: refused, read back, ours
        self.settle()
        self.successResultOf(done)
        self.assertEqual(self.lines_of(KEY), lines)

    def test_lost_create_answer(self) -> None:
        """Create Append Blob landed, its answer lost: the retry finds it exists; fine."""
        self.azure.lose_answer("CreateAppendBlob")
        lines = noise(0, 5)
        self.write([lines])
        self.assertEqual(self.lines_of(KEY), lines)

    def test_blob_created_by_other_writer_meanwhile(self) -> None:
        """Between Get Blob Properties (missing) and Create, another writer created it."""
        other = [message(1).to_line()]
        self.azure.before("CreateAppendBlob", lambda: self.azure.append_now(KEY, member(other)))
        lines = noise(0, 5)
        self.write([lines])
        self.assertEqual(self.lines_of(KEY), other + lines)


class RolloverTests(AzureWriterCase):
    """Before a blob is full, the stream goes on in {key}.1, {key}.2..."""

    def test_rolls_over_at_max_blocks(self) -> None:
        """
        With 3 blocks a blob, 8 blocks go to KEY (3), KEY.1 (3), KEY.2 (2), in
        order, each line once; the finish names the last blob; the next writer of
        the key starts at KEY.2.
        """
        store = self.make_store(WRITER_A, max_blocks=3)
        lines = noise(0, 80)
        with capturedLogs() as events:
            finished = self.write([lines[n : n + 10] for n in range(0, 80, 10)], store=store)
        self.assertEqual(finished, Finished("merged", key=KEY + ".2"))
        self.assertEqual(
            {name: len(blob.blocks) for name, blob in self.azure.blobs.items()},
            {KEY: 3, KEY + ".1": 3, KEY + ".2": 2},
        )
        self.assertEqual(
            self.lines_of(KEY) + self.lines_of(KEY + ".1") + self.lines_of(KEY + ".2"), lines
        )
        self.assertEqual(
            [e["next_blob"] for e in events if "next_blob" in e], [KEY + ".1", KEY + ".2"]
        )
        self.azure.calls.clear()
        self.write([noise(100, 2)], store=store)
        self.assertEqual(self.azure.calls[0], ("GetBlobProperties", KEY + ".2"))

    def test_fresh_process_skips_full_blobs(self) -> None:
        """A new process finds KEY and KEY.1 full by their properties, appends to KEY.2."""
        for name in (KEY, KEY + ".1"):
            for n in range(3):
                self.azure.append_now(name, member([message(n).to_line()]))
        store = self.make_store(WRITER_B, max_blocks=3)
        lines = noise(0, 5)
        self.assertEqual(self.write([lines], store=store), Finished("merged", key=KEY + ".2"))
        self.assertEqual(self.lines_of(KEY + ".2"), lines)

    def test_service_block_limit(self) -> None:
        """
        The service refuses (409 BlockCountExceedsLimit) before the writer's own
        count says full (another writer filled the blob): it rolls over.
        """
        self.azure.max_blocks = 2
        lines = noise(0, 30)
        self.write([lines[:10], lines[10:20], lines[20:]])
        self.assertEqual(
            {name: len(blob.blocks) for name, blob in self.azure.blobs.items()},
            {KEY: 2, KEY + ".1": 1},
        )
        self.assertEqual(self.lines_of(KEY) + self.lines_of(KEY + ".1"), lines)

    def test_lost_answer_of_the_block_that_filled_the_blob(self) -> None:
        """
        The block that filled the blob landed with its answer lost: the retry is
        refused (409 full, or 412), and the read-back finds it: it is not appended
        again to KEY.1.
        """
        self.azure.max_blocks = 2
        self.azure.lose_answer("AppendBlock", after=1)
        lines = noise(0, 30)
        self.write([lines[:10], lines[10:20], lines[20:]])
        self.assertEqual(
            {name: len(blob.blocks) for name, blob in self.azure.blobs.items()},
            {KEY: 2, KEY + ".1": 1},
        )
        self.assertEqual(self.lines_of(KEY) + self.lines_of(KEY + ".1"), lines)

    def test_size_limit(self) -> None:
        """A block that would pass the size limit goes to the next blob."""
        lines = noise(0, 30)
        blocks = [lines[:10], lines[10:20], lines[20:]]
        sizes = [len(member(b)) + 30 for b in blocks]  # 30: the header's extra field
        limit = max(sizes) + 10  # one block a blob
        self.assertLess(limit, 2 * min(sizes))
        store = self.make_store(WRITER_A, max_blob_bytes=limit)
        self.write(blocks, store=store)
        names = [KEY, KEY + ".1", KEY + ".2"]
        self.assertEqual(sorted(self.azure.blobs), names)
        self.assertEqual([len(self.azure.blobs[n].body) for n in names], sizes)
        self.assertEqual([line for n in names for line in self.lines_of(n)], lines)

    def test_foreign_append_blob_is_skipped(self) -> None:
        """
        An append blob at the key that does not start with a gzip header (another
        program's): appending gzip after it would make it unreadable, so the
        stream goes on in KEY.1 and leaves it alone; one log line says so.
        """
        self.azure.append_now(KEY, b"plain text, not gzip\n")
        lines = noise(0, 5)
        with capturedLogs() as events:
            self.assertEqual(self.write([lines]), Finished("merged", key=KEY + ".1"))
        self.assertEqual(self.azure.body(KEY), b"plain text, not gzip\n")
        self.assertEqual(self.lines_of(KEY + ".1"), lines)
        (skip,) = [e for e in events if "skipped" in e]
        self.assertIn("not gzip", skip["skipped"])

    def test_block_blob_at_key_is_skipped(self) -> None:
        """A block blob at the key (put there by someone else) is left alone."""
        self.azure.blobs[KEY] = MemoryBlob(b"not ours", [], "BlockBlob")
        lines = noise(0, 5)
        self.assertEqual(self.write([lines]), Finished("merged", key=KEY + ".1"))
        self.assertEqual(self.azure.body(KEY), b"not ours")


class FailureTests(AzureWriterCase):
    """Blobs deleted, containers missing, the deadline."""

    def test_blob_deleted_from_outside(self) -> None:
        """
        The blob was deleted between two appends (404 BlobNotFound): logged, created
        again, the stream goes on there.
        """
        lines = noise(0, 20)
        writer = self.store.open(KEY)
        first = writer.part(member(lines[:10]))
        self.settle(1)
        self.successResultOf(first)
        del self.azure.blobs[KEY]
        with capturedLogs() as events:
            done = writer.finish(member(lines[10:]))
            self.settle()
        self.successResultOf(done)
        self.assertEqual(self.lines_of(KEY), lines[10:])
        self.assertTrue(any("deleted by someone else" in e.get("log_format", "") for e in events))

    def test_container_missing_is_a_problem_then_recovers(self) -> None:
        """
        404 ContainerNotFound is permanent: the store reports the problem (for
        /healthz), the data stay in memory, and go out once the container exists.
        """
        missing = StorageError("GetBlobProperties", 404, "ContainerNotFound", "")
        self.azure.fail("GetBlobProperties", missing, times=3)
        writer = self.store.open(KEY)
        lines = noise(0, 5)
        done = writer.finish(member(lines))
        self.clock.advance(0)
        self.assertIn("ContainerNotFound", self.store.problem or "")
        self.settle(300)
        self.successResultOf(done)
        self.assertIsNone(self.store.problem)
        self.assertEqual(self.lines_of(KEY), lines)

    def test_abandon_at_deadline(self) -> None:
        """Abandoned while an append stalls: the finish errbacks with Abandoned."""
        self.azure.hold("AppendBlock")
        writer = self.store.open(KEY)
        done: Deferred[Finished] = writer.finish(member(noise(0, 3)))
        self.clock.advance(0)
        writer.abandon()
        self.failureResultOf(done, Abandoned)
        self.failureResultOf(writer.part(member(noise(3, 1))), Abandoned)

    def test_deadline_caps_retries(self) -> None:
        """
        Storage refuses every connection after stopping(): nothing is tried past
        the deadline; the finish errbacks with Abandoned.
        """
        self.azure.fail(
            "GetBlobProperties", StorageError("GetBlobProperties", 0, "ServiceRequestError"), 100
        )
        writer = self.store.open(KEY)
        done = writer.finish(member(noise(0, 3)))
        self.store.stopping(self.clock.seconds() + 5)
        self.settle(6)
        self.failureResultOf(done, Abandoned)
