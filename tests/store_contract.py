"""
The behaviour every :class:`~loghandler.interfaces.IObjectStore` must have at the
writer seam, written once and run against each store and backend (the pattern of
:mod:`tests.contract`): the S3 store over the in-memory S3 and the Azure store over
the in-memory container in ``tests/test_store_contract.py``, the S3 store on moto and
the Azure store on Azurite in ``tests/integration/test_store_contract_emulators.py``.

The writers are driven the way the daemon drives them: by an
:class:`~loghandler.stream.ObjectStream` (parts cut by its gzip encoder, checkpoints
handed over as snapshots or, when ``checkpoints_are_parts``, as closed members), so
both checkpoint modes go through the same code.  Every test reads back the bytes that
landed, through the backend's own means (dicts, botocore, azure-storage-blob), not
through the code under test.

Mix :class:`ObjectStoreContractMixin` into a ``twisted.trial.unittest.TestCase`` and
implement :meth:`~ObjectStoreContractMixin.make_store`,
:meth:`~ObjectStoreContractMixin.read_object` and
:meth:`~ObjectStoreContractMixin.object_keys`; set ``clock`` (a ``task.Clock`` for
in-memory backends, which the mixin advances while it waits; the reactor for network
backends) and ``part_size``.  The backend's storage is fresh (or emptied) at the start
of each test and shared by every store :meth:`make_store` makes during the test, as
two processes share a bucket.
"""

from __future__ import annotations

import datetime
import zlib
from typing import Any, Callable, Coroutine, Optional, TypeVar
from unittest import SkipTest

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from loghandler.budget import MemoryBudget
from loghandler.interfaces import Finished, IObjectStore, IObjectWriter
from loghandler.keys import object_key
from loghandler.stream import ObjectStream
from tests.helpers import members, noise, noise_line, read_lines

__all__ = ["ObjectStoreContractMixin", "RecordingWriter"]

_T = TypeVar("_T")

#: Parts handed to the writer at once by the streams of these tests: more than any
#: test cuts, so that every part is handed over as soon as it is cut.
PARTS_IN_FLIGHT = 16

#: First line numbers of the two writers of the concurrent test (lines are told apart
#: by their number and their random text).
SECOND_WRITER = 1_000_000


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


@implementer(IObjectWriter)
class RecordingWriter:
    """
    An :class:`IObjectWriter` passing every call to ``writer`` and recording what the
    stream handed over and how :meth:`finish` ended (:class:`ObjectStream` keeps the
    :class:`Finished` to itself).

    :ivar parts: the length of each body handed to :meth:`part` (checkpoints of a
        ``checkpoints_are_parts`` writer included).
    :ivar checkpoints: the length of each body handed to :meth:`checkpoint`.
    :ivar finished: what :meth:`finish` fired with, once it did.
    """

    def __init__(self, writer: IObjectWriter) -> None:
        self._writer = writer
        self.key: str = writer.key
        self.checkpoints_are_parts: bool = writer.checkpoints_are_parts
        self.parts: list[int] = []
        self.checkpoints: list[int] = []
        self.finished: Optional[Finished] = None

    @property
    def full(self) -> bool:
        return bool(self._writer.full)

    def part(self, body: bytes) -> "Deferred[None]":
        self.parts.append(len(body))
        return self._writer.part(body)

    def checkpoint(self, body: bytes) -> "Deferred[bool]":
        self.checkpoints.append(len(body))
        return self._writer.checkpoint(body)

    def finish(
        self, tail: bytes, on_staged: Optional[Callable[[], None]] = None
    ) -> "Deferred[Finished]":
        def record(finished: Finished) -> Finished:
            self.finished = finished
            return finished

        return self._writer.finish(tail, on_staged).addCallback(record)

    def abandon(self) -> None:
        self._writer.abandon()


class _Stream:
    """One stream under test: the :class:`ObjectStream`, its recorder, its lines."""

    def __init__(self, store: IObjectStore, key: str, clock: IReactorTime, part_size: int) -> None:
        self.writer = RecordingWriter(store.open(key))
        self.budget = MemoryBudget(2**40)
        self.stream = ObjectStream(self.writer, clock, part_size, PARTS_IN_FLIGHT, self.budget)
        self.lines: list[bytes] = []

    def write(self, lines: list[bytes]) -> None:
        """Write ``lines`` to the stream."""
        for line in lines:
            self.stream.write(line)
            self.lines.append(line)

    def fill_parts(self, parts: int, first: int) -> list[bytes]:
        """
        Write poorly compressible lines numbered from ``first`` until the stream's
        encoder cut ``parts`` parts (the last line written ends the last part); the
        lines written.
        """
        written = []
        number = first
        while parts:
            before = self.stream.buffered_bytes
            line = noise_line(number)
            number += 1
            self.write([line])
            written.append(line)
            if self.stream.buffered_bytes < before:  # the member was closed: a part
                parts -= 1
        return written


class ObjectStoreContractMixin:
    """
    Tests of the :class:`~loghandler.interfaces.IObjectStore` /
    :class:`~loghandler.interfaces.IObjectWriter` contract, through
    :class:`~loghandler.stream.ObjectStream`.

    Subclasses (which also derive from ``twisted.trial.unittest.TestCase``) set
    :attr:`clock` and :attr:`part_size` and implement :meth:`make_store`,
    :meth:`read_object` and :meth:`object_keys` (and, where the backend can tell,
    :meth:`content_type` and :meth:`unfinished`).  Every test writes keys of its own
    date (:meth:`key`), derived from the test's name.
    """

    # Provided by trial's TestCase.
    assertEqual: Callable[..., None]
    assertGreater: Callable[..., None]
    assertGreaterEqual: Callable[..., None]
    assertIn: Callable[..., None]
    assertIsNone: Callable[..., None]
    assertTrue: Callable[..., None]
    fail: Callable[..., Any]
    id: Callable[[], str]

    #: For the stores and streams: a ``task.Clock`` (the mixin advances it while it
    #: waits) or the reactor.
    clock: IReactorTime
    #: The smallest part the store takes, bytes: the streams' part size.
    part_size: int
    #: Why the store cannot be made to roll over in a test (S3 rolls over at 4 GiB),
    #: or None when :meth:`make_store` takes ``max_blocks``.
    rollover_unsupported: Optional[str] = None
    #: Why two writers of one key may not complete at the same instant on this
    #: backend (an emulator that lacks a condition the real store enforces), or
    #: None.  When set, :meth:`test_two_writers_at_once` closes them one after the
    #: other; their parts and checkpoints still interleave.
    concurrent_completion_unsupported: Optional[str] = None

    # -- what a backend provides ----------------------------------------------------

    def make_store(self, **options: Any) -> IObjectStore:
        """
        A new store (a new writer ID: another process) over this test's storage,
        closed when the test ends.

        :param options: ``max_blocks`` (committed blocks after which a blob rolls
            over; only when :attr:`rollover_unsupported` is None).
        """
        raise NotImplementedError

    async def read_object(self, key: str) -> bytes:
        """The whole object (S3) or blob (Azure) ``key`` as stored."""
        raise NotImplementedError

    async def object_keys(self, prefix: str) -> list[str]:
        """Every object or blob whose name starts with ``prefix``, sorted."""
        raise NotImplementedError

    async def content_type(self, key: str) -> Optional[str]:
        """The Content-Type ``key`` is served with, or None where the backend cannot tell."""
        return None

    async def unfinished(self) -> list[str]:
        """
        What the stores began and did not finish (S3: multipart uploads still open),
        as names; [] where the backend has nothing of the kind.
        """
        return []

    # -- helpers ----------------------------------------------------------------------

    def date(self, offset: int = 0) -> str:
        """
        A date of this test's own (``YYYY-MM-DD``, from its name), plus ``offset``
        days: keys of different tests never meet, even on a shared emulator.
        """
        name = self.id().rsplit(".", 1)[-1]
        days = zlib.crc32(name.encode()) % 20_000 + offset
        return (datetime.date(2000, 1, 1) + datetime.timedelta(days=days)).isoformat()

    def key(self, client_id: int = 3, offset: int = 0) -> str:
        """The object key of this test's date (plus ``offset`` days) and ``client_id``."""
        return object_key(self.date(offset), client_id)

    def open_stream(self, store: IObjectStore, key: str) -> _Stream:
        """A stream of ``key`` through a writer of ``store``."""
        return _Stream(store, key, self.clock, self.part_size)

    async def wait(self, d: "Deferred[_T]") -> _T:
        """
        Wait for ``d``: on a ``task.Clock``, advancing it (retries and merge
        conflicts wait on the clock) until ``d`` fired.
        """
        clock = self.clock
        if isinstance(clock, Clock):
            fired: list[bool] = []

            def mark(result: object) -> object:
                fired.append(True)
                return result

            d.addBoth(mark)
            for _ in range(100_000):  # 10,000 s of clock time
                if fired:
                    break
                clock.advance(0.1)
            else:
                self.fail("did not fire on the clock: %r" % (d,))
        return await d

    async def close(self, *streams: _Stream) -> list[Finished]:
        """Close ``streams`` at once and wait for them all; how each writer finished."""
        await self.wait(defer.gatherResults([s.stream.close() for s in streams]))
        results = []
        for s in streams:
            self.assertEqual(s.stream.durable_lines, len(s.lines))
            assert s.writer.finished is not None, "the stream did not finish its writer"
            results.append(s.writer.finished)
        return results

    async def checkpoint(self, s: _Stream) -> None:
        """Checkpoint ``s`` and wait until every line written so far is durable."""
        await self.wait(s.stream.wait_durable(len(s.lines)))
        self.assertEqual(s.stream.durable_lines, len(s.lines))

    async def object_lines(self, key: str) -> list[bytes]:
        """The lines of object ``key``, checking that it is whole gzip members."""
        body = await self.read_object(key)
        self.assertGreater(len(members(body)), 0)
        return read_lines(body)

    def assertInterleaving(
        self, merged: list[bytes], *sources: list[bytes]
    ) -> None:
        """
        ``merged`` holds every line of every source exactly once and nothing else,
        each source's lines in their order.
        """
        self.assertEqual(len(merged), sum(len(s) for s in sources))
        self.assertEqual(sorted(merged), sorted(line for s in sources for line in s))
        self.assertEqual(len(set(merged)), len(merged))
        for source in sources:
            wanted = set(source)
            self.assertEqual([line for line in merged if line in wanted], source)

    # -- the contract -------------------------------------------------------------------

    def test_provides_interfaces(self) -> None:
        """
        The store provides IObjectStore and its writers IObjectWriter; a writer's
        key is the key it was opened for.
        """
        store = self.make_store()
        self.assertTrue(verifyObject(IObjectStore, store))
        writer = store.open(self.key())
        self.assertTrue(verifyObject(IObjectWriter, writer))
        self.assertEqual(writer.key, self.key())
        self.assertIn(writer.checkpoints_are_parts, (True, False))

    @_deferred_test
    async def test_parts_and_tail(self) -> None:
        """
        A stream of two parts and a tail: the object at the stream's key holds
        exactly its lines, in order, as whole gzip members (Content-Type
        application/gzip where the backend tells); the writer finished "merged"
        into that key.
        """
        key = self.key()
        s = self.open_stream(self.make_store(), key)
        s.fill_parts(2, first=1)
        s.write(noise(10_000_000, 25))
        (finished,) = await self.close(s)
        self.assertEqual(finished, Finished("merged", key=key))
        self.assertEqual(len(s.writer.parts), 2)  # the tail goes to finish
        self.assertEqual(await self.object_lines(key), s.lines)
        self.assertEqual(await self.object_keys("chat/"), [key])
        content_type = await self.content_type(key)
        if content_type is not None:
            self.assertEqual(content_type, "application/gzip")

    @_deferred_test
    async def test_empty_stream(self) -> None:
        """
        A stream without lines finishes "empty" and stores nothing: no object, nothing
        left unfinished.
        """
        key = self.key()
        s = self.open_stream(self.make_store(), key)
        (finished,) = await self.close(s)
        self.assertEqual(finished, Finished("empty"))
        self.assertEqual(await self.object_keys(""), [])
        self.assertEqual(await self.unfinished(), [])

    @_deferred_test
    async def test_later_streams_append(self) -> None:
        """
        A second stream of the key (same store) and a third (a new store: another
        process, or this one restarted) go after what the key holds: nothing is
        overwritten, every line is there once, in order.
        """
        key = self.key()
        store = self.make_store()
        first = self.open_stream(store, key)
        first.fill_parts(1, first=1)
        first.write(noise(500_000, 10))
        self.assertEqual(await self.close(first), [Finished("merged", key=key)])
        self.assertEqual(await self.object_lines(key), first.lines)

        second = self.open_stream(store, key)
        second.write(noise(1_000_000, 20))
        self.assertEqual(await self.close(second), [Finished("merged", key=key)])
        self.assertEqual(await self.object_lines(key), first.lines + second.lines)

        third = self.open_stream(self.make_store(), key)
        third.write(noise(2_000_000, 5))
        self.assertEqual(await self.close(third), [Finished("merged", key=key)])
        self.assertEqual(
            await self.object_lines(key), first.lines + second.lines + third.lines
        )
        self.assertEqual(await self.object_keys("chat/"), [key])

    @_deferred_test
    async def test_checkpoints(self) -> None:
        """
        After each checkpoint every line written so far is durable (for a writer that
        keeps every byte, ``checkpoints_are_parts``, already readable in the object;
        else staged, the key untouched until the end); checkpoints before, between
        and after parts store no line twice: the object holds every line exactly
        once, in order.
        """
        key = self.key()
        s = self.open_stream(self.make_store(), key)

        async def checkpointed() -> None:
            await self.checkpoint(s)
            if s.writer.checkpoints_are_parts:
                self.assertEqual(await self.object_lines(key), s.lines)
            else:
                self.assertEqual(await self.object_keys("chat/"), [])

        s.write(noise(1, 10))
        await checkpointed()
        s.write(noise(100, 10))
        await checkpointed()
        await checkpointed()  # nothing new: nothing stored twice
        s.fill_parts(1, first=1_000)
        s.write(noise(500_000, 7))
        await checkpointed()
        s.write(noise(600_000, 3))
        await checkpointed()
        s.write(noise(700_000, 4))  # the tail: lines after the last checkpoint
        self.assertEqual(await self.close(s), [Finished("merged", key=key)])
        # Counted once all done: a checkpoint's lines are durable (the waiter fires)
        # a moment before the stream counts it.
        self.assertEqual(s.stream.checkpoints, 4)
        self.assertEqual(await self.object_lines(key), s.lines)
        self.assertEqual(await self.object_keys("chat/"), [key])

    @_deferred_test
    async def test_two_writers_at_once(self) -> None:
        """
        Two stores (two writer IDs: two processes) write one key at the same time,
        parts and checkpoints interleaved, and finish at the same time (one after
        the other where :attr:`concurrent_completion_unsupported` says why): the key
        holds every line of both exactly once, each writer's lines in their order.
        """
        key = self.key()
        a = self.open_stream(self.make_store(), key)
        b = self.open_stream(self.make_store(), key)
        a.write(noise(1, 10))
        b.write(noise(SECOND_WRITER + 1, 10))
        await self.wait(
            defer.gatherResults(
                [a.stream.wait_durable(len(a.lines)), b.stream.wait_durable(len(b.lines))]
            )
        )
        a.fill_parts(1, first=100)
        b.write(noise(SECOND_WRITER + 100, 5))
        await self.checkpoint(b)
        a.write(noise(500_000, 5))
        await self.checkpoint(a)
        b.fill_parts(1, first=SECOND_WRITER + 1_000)
        a.write(noise(600_000, 5))
        b.write(noise(SECOND_WRITER + 600_000, 5))
        await self.checkpoint(a)
        a.write(noise(700_000, 3))
        b.write(noise(SECOND_WRITER + 700_000, 4))
        if self.concurrent_completion_unsupported is None:
            finished = await self.close(a, b)
        else:
            finished = await self.close(a) + await self.close(b)
        self.assertEqual(finished, [Finished("merged", key=key)] * 2)
        self.assertInterleaving(await self.object_lines(key), a.lines, b.lines)
        self.assertEqual(await self.object_keys("chat/"), [key])

    @_deferred_test
    async def test_key_layout(self) -> None:
        """
        Streams of two clients on two dates leave exactly the objects
        ``chat/{date}/content_logs_{date}_{client_id}`` in the store, each holding
        its own lines, and nothing else (nothing staged left over, nothing
        unfinished).
        """
        store = self.make_store()
        streams = {}
        for offset in (0, 1):
            date = self.date(offset)
            for client_id in (3, 1234567):
                key = object_key(date, client_id)
                self.assertEqual(key, f"chat/{date}/content_logs_{date}_{client_id}")
                streams[key] = self.open_stream(store, key)
                streams[key].write(noise(client_id * 1000 + offset * 100, 5))
        await self.checkpoint(streams[self.key()])
        finished = await self.close(*streams.values())
        self.assertEqual(finished, [Finished("merged", key=key) for key in streams])
        self.assertEqual(await self.object_keys(""), sorted(streams))
        for key, s in streams.items():
            self.assertEqual(await self.object_lines(key), s.lines)
        self.assertEqual(await self.unfinished(), [])

    @_deferred_test
    async def test_rollover(self) -> None:
        """
        A store that rolls over after 3 blocks: a stream of 7 parts and a tail goes
        to the key, then ``{key}.1``, then ``{key}.2``, every line once and in order
        across them, each a whole gzip file; the writer finished into ``{key}.2``;
        the next stream of the key, from another store, goes on in ``{key}.2`` and
        rolls over to ``{key}.3``.
        """
        if self.rollover_unsupported is not None:
            raise SkipTest(self.rollover_unsupported)
        key = self.key()
        store = self.make_store(max_blocks=3)
        s = self.open_stream(store, key)
        s.fill_parts(7, first=1)
        s.write(noise(500_000, 5))
        self.assertEqual(await self.close(s), [Finished("merged", key=f"{key}.2")])
        self.assertEqual(len(s.writer.parts), 7)  # and the tail
        names = [key, f"{key}.1", f"{key}.2"]
        self.assertEqual(await self.object_keys("chat/"), names)
        lines = [await self.object_lines(name) for name in names]
        self.assertEqual(lines[0] + lines[1] + lines[2], s.lines)
        self.assertEqual([len(members(await self.read_object(n))) for n in names], [3, 3, 2])

        later = self.open_stream(self.make_store(max_blocks=3), key)
        later.write(noise(1_000_000, 5))
        await self.checkpoint(later)
        later.write(noise(2_000_000, 5))
        self.assertEqual(await self.close(later), [Finished("merged", key=f"{key}.3")])
        self.assertEqual(await self.object_keys("chat/"), names + [f"{key}.3"])
        self.assertEqual(await self.object_lines(f"{key}.2"), lines[2] + later.lines[:5])
        self.assertEqual(await self.object_lines(f"{key}.3"), later.lines[5:])
