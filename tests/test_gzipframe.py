"""
Tests for :mod:`loghandler.gzipframe`: ``GzipPartEncoder`` hands out parts that are
whole gzip members of at least the part size, as soon as the compressed bytes reach
it, and the joined parts and tail gunzip to the lines written (DESIGN.md section 3).
"""

from __future__ import annotations

import gzip
import os
import platform
import random
import zlib

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from loghandler.gzipframe import COMPRESSOR_BYTES, GzipPartEncoder
from tests.helpers import members

KiB = 1024


def _random_lines(count: int, size: int = 600, seed: int = 0) -> list[bytes]:
    """``count`` incompressible-ish lines: ``size`` random bytes as hex, then ``\\n``."""
    rng = random.Random(seed)
    return [rng.randbytes(size).hex().encode("ascii") + b"\n" for _ in range(count)]


class _Run:
    """The parts and tail of writing ``lines`` into one encoder."""

    def __init__(self, encoder: GzipPartEncoder, lines: list[bytes]) -> None:
        self.parts: list[bytes] = []
        #: index of the line whose write returned each part
        self.part_at: list[int] = []
        #: buffered_bytes after each write that returned None
        self.buffered_after_none: list[int] = []
        for index, line in enumerate(lines):
            part = encoder.write(line)
            if part is None:
                self.buffered_after_none.append(encoder.buffered_bytes)
            else:
                self.parts.append(part)
                self.part_at.append(index)
        self.tail = encoder.finish()


class _MemberAssertions(SynchronousTestCase):
    """Shared checks on gzip data."""

    def members(self, data: bytes) -> tuple[bytes, int]:
        """
        Decode ``data`` as a sequence of complete gzip members; fail on a truncated
        member or trailing bytes.  Returns the decoded bytes and the member count.
        """
        decoded = members(data)
        return b"".join(decoded), len(decoded)


class EncoderTests(_MemberAssertions):
    """Framing, sizes and state of ``GzipPartEncoder``."""

    def test_roundtrip_many_parts(self) -> None:
        """
        With 64 KiB parts and 600 KB of random hex lines, several parts come out; the
        joined parts and tail gunzip to the joined lines.
        """
        lines = _random_lines(1000)
        run = _Run(GzipPartEncoder(64 * KiB), lines)
        self.assertGreaterEqual(len(run.parts), 5)
        self.assertNotEqual(run.tail, b"")
        self.assertEqual(gzip.decompress(b"".join(run.parts) + run.tail), b"".join(lines))

    def test_each_part_one_whole_member(self) -> None:
        """Every part and the tail is exactly one complete gzip member on its own."""
        lines = _random_lines(1000, seed=1)
        run = _Run(GzipPartEncoder(64 * KiB), lines)
        decoded = []
        for chunk in run.parts + [run.tail]:
            data, count = self.members(chunk)
            self.assertEqual(count, 1)
            self.assertEqual(gzip.decompress(chunk), data)
            decoded.append(data)
        self.assertEqual(b"".join(decoded), b"".join(lines))

    def test_parts_hold_whole_lines(self) -> None:
        """Each part decodes to whole lines: the lines written up to the write that returned it."""
        lines = _random_lines(600, seed=2)
        run = _Run(GzipPartEncoder(64 * KiB), lines)
        start = 0
        for part, index in zip(run.parts, run.part_at):
            self.assertEqual(gzip.decompress(part), b"".join(lines[start : index + 1]))
            start = index + 1
        self.assertEqual(gzip.decompress(run.tail), b"".join(lines[start:]))

    def test_parts_at_least_part_size(self) -> None:
        """Every part except the tail is at least part_size bytes."""
        lines = _random_lines(1000, seed=3)
        run = _Run(GzipPartEncoder(64 * KiB), lines)
        self.assertTrue(run.parts)
        for part in run.parts:
            self.assertGreaterEqual(len(part), 64 * KiB)

    def test_part_as_soon_as_size_reached(self) -> None:
        """
        A part comes out on exactly the write at which the compressed output reaches
        part_size, and holds exactly that member's bytes (checked against a zlib
        compressor fed the same data).
        """
        part_size = 64 * KiB
        lines = _random_lines(800, seed=4)
        expected_parts = []
        expected_at = []
        reference = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        chunks: list[bytes] = []
        for index, line in enumerate(lines):
            chunks.append(reference.compress(line))
            if sum(map(len, chunks)) >= part_size:
                expected_parts.append(b"".join(chunks) + reference.flush())
                expected_at.append(index)
                reference = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
                chunks = []
        expected_tail = b"".join(chunks) + reference.flush()

        run = _Run(GzipPartEncoder(part_size), lines)
        self.assertGreaterEqual(len(expected_parts), 3)
        self.assertEqual(run.part_at, expected_at)
        self.assertEqual(run.parts, expected_parts)
        self.assertEqual(run.tail, expected_tail)

    def test_no_full_part_held_back(self) -> None:
        """After a write that returns None, fewer than part_size compressed bytes are held."""
        run = _Run(GzipPartEncoder(64 * KiB), _random_lines(1000, seed=5))
        self.assertTrue(run.buffered_after_none)
        for buffered in run.buffered_after_none:
            self.assertLess(buffered, 64 * KiB)

    def test_counts_compressed_not_raw_bytes(self) -> None:
        """
        Highly compressible data far larger than part_size yields no part: the size
        counts compressed bytes, never input bytes.
        """
        encoder = GzipPartEncoder(64 * KiB)
        line = b'{"text":"same","content_id":1,"client_id":1,"timestamp":1585526400000}\n'
        for _ in range(20_000):
            self.assertIsNone(encoder.write(line))
        self.assertLess(encoder.buffered_bytes, 64 * KiB)
        tail = encoder.finish()
        self.assertLess(len(tail), 64 * KiB)
        self.assertEqual(gzip.decompress(tail), line * 20_000)

    def test_single_huge_write(self) -> None:
        """One write larger than a part returns one part holding all of it."""
        data = os.urandom(300 * KiB)
        encoder = GzipPartEncoder(64 * KiB)
        part = encoder.write(data)
        assert part is not None
        self.assertGreaterEqual(len(part), 64 * KiB)
        self.assertEqual(self.members(part), (data, 1))
        self.assertEqual(encoder.finish(), b"")

    def test_finish_without_writes(self) -> None:
        """finish() on a fresh encoder returns b"", and again after that."""
        encoder = GzipPartEncoder(64 * KiB)
        self.assertEqual(encoder.finish(), b"")
        self.assertEqual(encoder.finish(), b"")

    def test_finish_after_empty_write(self) -> None:
        """Writing b"" leaves nothing pending: finish() returns b""."""
        encoder = GzipPartEncoder(64 * KiB)
        self.assertIsNone(encoder.write(b""))
        self.assertFalse(encoder.pending)
        self.assertEqual(encoder.finish(), b"")

    def test_empty_write_then_finish_holds_nothing(self) -> None:
        """
        After write(b"") and finish(), which hands out b"", nothing is held:
        buffered_bytes is 0, as after any finish().
        """
        encoder = GzipPartEncoder(64 * KiB)
        self.assertIsNone(encoder.write(b""))
        self.assertEqual(encoder.finish(), b"")
        self.assertEqual((encoder.pending, encoder.buffered_bytes), (False, 0))

    def test_finish_twice(self) -> None:
        """The second finish() after data returns b"": the tail is handed out once."""
        encoder = GzipPartEncoder(64 * KiB)
        encoder.write(b"a\n")
        self.assertEqual(gzip.decompress(encoder.finish()), b"a\n")
        self.assertEqual(encoder.finish(), b"")

    def test_usable_after_finish(self) -> None:
        """After finish() a new write starts a new member; both members decode together."""
        encoder = GzipPartEncoder(64 * KiB)
        self.assertIsNone(encoder.write(b"first\n"))
        first = encoder.finish()
        self.assertIsNone(encoder.write(b"second\n"))
        second = encoder.finish()
        self.assertEqual(self.members(first), (b"first\n", 1))
        self.assertEqual(self.members(second), (b"second\n", 1))
        self.assertEqual(self.members(first + second), (b"first\nsecond\n", 2))
        self.assertEqual(gzip.decompress(first + second), b"first\nsecond\n")

    def test_usable_after_part(self) -> None:
        """After a part is handed out, further writes go into a new member."""
        encoder = GzipPartEncoder(1 * KiB)
        data = os.urandom(64 * KiB)
        part = encoder.write(data)
        assert part is not None
        self.assertFalse(encoder.pending)
        self.assertEqual(encoder.buffered_bytes, 0)
        encoder.write(b"more\n")
        tail = encoder.finish()
        self.assertEqual(self.members(part + tail), (data + b"more\n", 2))

    def test_buffered_and_pending(self) -> None:
        """
        pending is True once data is written and False after finish or a part;
        buffered_bytes is the compressed output held so far (the 10-byte gzip header
        after a small write, without staging), 0 after finish.
        """
        encoder = GzipPartEncoder(64 * KiB, stage_bytes=0)
        self.assertEqual((encoder.pending, encoder.buffered_bytes), (False, 0))
        self.assertIsNone(encoder.write(b"a\n"))
        self.assertEqual((encoder.pending, encoder.buffered_bytes), (True, 10))
        self.assertIsNone(encoder.write(b"b\n"))
        self.assertEqual((encoder.pending, encoder.buffered_bytes), (True, 10))
        encoder.finish()
        self.assertEqual((encoder.pending, encoder.buffered_bytes), (False, 0))

    def test_buffered_bytes_tracks_output(self) -> None:
        """buffered_bytes equals the compressed bytes a zlib compressor has emitted for the same input."""
        encoder = GzipPartEncoder(10 * 1024 * KiB, stage_bytes=0)
        reference = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        emitted = 0
        for line in _random_lines(300, seed=6):
            self.assertIsNone(encoder.write(line))
            emitted += len(reference.compress(line))
            self.assertEqual(encoder.buffered_bytes, emitted)
        self.assertGreater(emitted, 10)

    def test_level(self) -> None:
        """The level argument is used: output equals zlib's at that level."""
        data = b"".join(b"line %d of the log\n" % i for i in range(5000))
        for level in (1, 9):
            encoder = GzipPartEncoder(10 * 1024 * KiB, level=level)
            encoder.write(data)
            reference = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            self.assertEqual(encoder.finish(), reference.compress(data) + reference.flush())


class MemoryTests(_MemberAssertions):
    """
    Staging and freeing the compressor: a quiet member holds its lines uncompressed
    and no compressor; a member past ``stage_bytes`` holds one, counted in
    ``memory_bytes``, until it is finished or released.
    """

    def test_staged_lines_hold_no_compressor(self) -> None:
        """
        Lines under ``stage_bytes`` are held as they came: no compressor, no
        compressed bytes, memory_bytes is their length; the snapshot and the tail
        are one whole member of them, the bytes a compressor fed line by line writes.
        """
        lines = [b"line %d of a quiet key\n" % n for n in range(100)]
        encoder = GzipPartEncoder(64 * KiB, stage_bytes=32 * KiB)
        reference = GzipPartEncoder(64 * KiB, stage_bytes=0)
        for line in lines:
            self.assertIsNone(encoder.write(line))
            reference.write(line)
        size = len(b"".join(lines))
        self.assertEqual(
            (encoder.holds_compressor, encoder.buffered_bytes, encoder.staged_bytes),
            (False, 0, size),
        )
        self.assertEqual(encoder.memory_bytes, size)
        self.assertEqual(self.members(encoder.snapshot()), (b"".join(lines), 1))
        self.assertEqual(encoder.snapshot(), reference.snapshot())
        self.assertEqual(encoder.finish(), reference.finish())
        self.assertEqual(encoder.memory_bytes, 0)

    def test_compressor_past_stage_bytes_same_bytes(self) -> None:
        """
        Past ``stage_bytes`` a compressor is held (memory_bytes counts
        COMPRESSOR_BYTES); parts, snapshots and tail are byte for byte those of an
        encoder that compresses from the first line.
        """
        lines = _random_lines(800, size=150, seed=3)
        encoder = GzipPartEncoder(16 * KiB, stage_bytes=8 * KiB)
        reference = GzipPartEncoder(16 * KiB, stage_bytes=0)
        parts = []
        for n, line in enumerate(lines):
            part = encoder.write(line)
            self.assertEqual(part, reference.write(line))
            if part is not None:
                parts.append(part)
            if n % 50 == 7:
                self.assertEqual(encoder.snapshot(), reference.snapshot())
            if encoder.holds_compressor:
                self.assertEqual(
                    encoder.memory_bytes,
                    encoder.buffered_bytes + COMPRESSOR_BYTES,
                )
        self.assertGreater(len(parts), 3)
        self.assertEqual(encoder.finish(), reference.finish())
        self.assertFalse(encoder.holds_compressor)

    def test_release_compressor_closes_member(self) -> None:
        """
        release_compressor closes the live member and frees the compressor (memory
        back to the compressed bytes); the part buffer keeps the member, the next
        lines start a new member, and the tail holds both members, whole.
        """
        first = _random_lines(60, size=150, seed=1)
        second = [b"later line %d\n" % n for n in range(3)]
        encoder = GzipPartEncoder(1024 * KiB, stage_bytes=4 * KiB)
        for line in first:
            encoder.write(line)
        self.assertTrue(encoder.holds_compressor)
        encoder.release_compressor()
        self.assertFalse(encoder.holds_compressor)
        self.assertEqual(encoder.memory_bytes, encoder.buffered_bytes)
        self.assertEqual(self.members(encoder.snapshot()), (b"".join(first), 1))
        encoder.release_compressor()  # nothing held: nothing changes
        for line in second:
            encoder.write(line)
        self.assertEqual(encoder.staged_bytes, len(b"".join(second)))
        encoder.release_compressor()  # staged lines stay staged
        self.assertEqual(encoder.staged_bytes, len(b"".join(second)))
        self.assertEqual(self.members(encoder.snapshot()), (b"".join(first + second), 2))
        self.assertEqual(self.members(encoder.finish()), (b"".join(first + second), 2))

    def test_compressor_bytes_is_what_zlib_allocates(self) -> None:
        """
        COMPRESSOR_BYTES is within 2% of what tracemalloc counts for a live
        compressor with the encoder's settings (CPython allocates zlib's state with
        PyMem_RawMalloc, which tracemalloc traces).
        """
        if platform.python_implementation() != "CPython":
            raise self.skipTest("tracemalloc counts zlib's allocations on CPython only")
        import tracemalloc  # not at the top: PyPy has no _tracemalloc to import

        encoder = GzipPartEncoder(64 * KiB, stage_bytes=0)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            encoder.write(b"x\n")
            held = tracemalloc.get_traced_memory()[0] - before
            encoder.release_compressor()
            freed = held - (tracemalloc.get_traced_memory()[0] - before)
        finally:
            tracemalloc.stop()
        self.assertLess(abs(held / COMPRESSOR_BYTES - 1), 0.02)
        self.assertLess(abs(freed / COMPRESSOR_BYTES - 1), 0.02)


class PropertyTests(_MemberAssertions):
    """Random lines and part sizes."""

    @settings(database=None, deadline=None, max_examples=150)
    @given(
        lines=st.lists(
            st.one_of(
                st.binary(max_size=3000),
                st.binary(max_size=30).map(lambda b: b * 50),
            ),
            max_size=60,
        ),
        part_size=st.integers(min_value=1 * KiB, max_value=64 * KiB),
    )
    def test_roundtrip(self, lines: list[bytes], part_size: int) -> None:
        """
        For any lines and part size, the joined parts and tail decompress to the joined
        input, each part is one whole member of at least part_size bytes, and no write
        that returned None left part_size bytes held.
        """
        encoder = GzipPartEncoder(part_size)
        run = _Run(encoder, lines)
        joined = b"".join(run.parts) + run.tail
        self.assertEqual(gzip.decompress(joined), b"".join(lines))
        for part in run.parts:
            self.assertGreaterEqual(len(part), part_size)
            self.assertEqual(self.members(part)[1], 1)
        if run.tail:
            self.assertEqual(self.members(run.tail)[1], 1)
        for buffered in run.buffered_after_none:
            self.assertLess(buffered, part_size)
        self.assertFalse(encoder.pending)

    @settings(database=None, deadline=None, max_examples=150)
    @given(
        steps=st.lists(
            st.one_of(
                st.binary(min_size=1, max_size=3000),
                st.binary(min_size=1, max_size=30).map(lambda b: b * 50),
                st.sampled_from(["release", "snapshot", "compact"]),
            ),
            max_size=80,
        ),
        part_size=st.integers(min_value=1 * KiB, max_value=64 * KiB),
        stage_bytes=st.integers(min_value=0, max_value=16 * KiB),
    )
    def test_roundtrip_with_staging_and_releases(
        self, steps: list[object], part_size: int, stage_bytes: int
    ) -> None:
        """
        For any lines, part size, staging size and releases of the compressor
        and compactions in between: every part, snapshot and tail is whole members; the parts and tail
        decompress to the lines; a snapshot holds every line since the last part;
        memory_bytes is the compressed bytes, the staged bytes and the compressor.
        """
        encoder = GzipPartEncoder(part_size, stage_bytes=stage_bytes)
        written: list[bytes] = []
        since_part: list[bytes] = []
        out: list[bytes] = []
        for step in steps:
            if step == "release":
                encoder.release_compressor()
                self.assertFalse(encoder.holds_compressor)
            elif step == "compact":
                encoder.compact()
                self.assertEqual((encoder.holds_compressor, encoder.staged_bytes), (False, 0))
            elif step == "snapshot":
                self.assertEqual(self.members(encoder.snapshot())[0], b"".join(since_part))
            else:
                assert isinstance(step, bytes)
                written.append(step)
                since_part.append(step)
                part = encoder.write(step)
                if part is not None:
                    self.members(part)
                    self.assertGreaterEqual(len(part), part_size)
                    out.append(part)
                    since_part = []
            self.assertEqual(
                encoder.memory_bytes,
                encoder.buffered_bytes
                + encoder.staged_bytes
                + (COMPRESSOR_BYTES if encoder.holds_compressor else 0),
            )
        out.append(encoder.finish())
        self.assertEqual(self.members(b"".join(out))[0], b"".join(written))
        self.assertEqual(encoder.memory_bytes, 0)
