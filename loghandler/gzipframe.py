"""
Incremental gzip framing (DESIGN.md section 3).

Lines are compressed as they come into one gzip member (RFC 1952) at a time.  Once a
member's compressed bytes reach the part size, the member is closed and handed out
as a whole part, so every part is one or more complete gzip members: any sequence of
parts, and so any prefix of an object's parts, is a valid gzip file (RFC 1952
section 2.2: a gzip file is a series of members).  Pure: no I/O.

Memory per encoder is kept small for quiet keys: a zlib compressor holds
:data:`COMPRESSOR_BYTES` (256 KiB of window and hash tables), so the first
``stage_bytes`` of each member are held as they came (staged) and compressed in
one go, by a compressor that lives only for that call, when a checkpoint needs them
(:meth:`GzipPartEncoder.snapshot`) or the member closes.  Only a member that grows
past ``stage_bytes`` gets a compressor of its own, and
:meth:`GzipPartEncoder.release_compressor` (an idle key) closes that member and
frees it; the next line starts a new member.  Deflate's output does not depend on
how its input is split into calls, so a busy key's bytes are exactly those of one
compressor fed line by line.
"""

from __future__ import annotations

import zlib
from typing import Optional

#: zlib's window bits (a 32 KiB window, as ``gzip -6``) and memLevel (its default).
_WINDOW_BITS = zlib.MAX_WBITS
_MEM_LEVEL = zlib.DEF_MEM_LEVEL
#: zlib's wbits for a gzip wrapper with that window.
_GZIP_WBITS = 16 + _WINDOW_BITS

#: Bytes one live zlib compressor allocates with these settings: its window, hash
#: chains and pending buffer, ``(1 << (windowBits + 2)) + (1 << (memLevel + 9))``
#: (zlib's zconf.h), 256 KiB, plus its ``deflate_state`` (about 6 KB; 268,314 bytes in
#: all as tracemalloc counts zlib 1.2.13's allocations from CPython 3.11).  CPython's
#: ``flush(Z_FINISH)`` frees them (``deflateEnd``).
COMPRESSOR_BYTES = (1 << (_WINDOW_BITS + 2)) + (1 << (_MEM_LEVEL + 9)) + 6_200

#: Uncompressed bytes a member holds staged before it gets a compressor of its own.
#: A quiet key's members are at least this large when they close early (idle), and
#: gzip members of 32 KiB of NDJSON store about 1.13x ``gzip -6`` of the same lines
#: (64 KiB: 1.07x; one 130-byte line per member: 6x).
STAGE_BYTES = 32 * 1024


def _compress(data: bytes, level: int) -> bytes:
    """``data`` as one whole gzip member, as a compressor with our settings writes it."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS, _MEM_LEVEL)
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH)


class GzipPartEncoder:
    """
    Compress data into gzip members cut at part boundaries.

    :param part_size: compressed bytes at which the current member is closed and
        handed out as a part (S3's minimum part is 5 MiB; the part handed out is at
        least this large).
    :param level: zlib compression level, 1 (fast) to 9 (small).
    :param stage_bytes: uncompressed bytes of a member held as they came before a
        compressor is started for it (0: at once).
    """

    def __init__(self, part_size: int, level: int = 6, stage_bytes: int = STAGE_BYTES) -> None:
        self._part_size = part_size
        self._level = level
        self._stage_limit = stage_bytes
        self._compressor: Optional["zlib._Compress"] = None
        self._staged = bytearray()
        # Compressed bytes of the part being filled: closed members, then the live
        # member's output so far.
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._pending = 0

    @property
    def buffered_bytes(self) -> int:
        """Compressed bytes held for the part being filled."""
        return self._buffered

    @property
    def staged_bytes(self) -> int:
        """Uncompressed bytes held for the member being filled, not compressed yet."""
        return len(self._staged)

    @property
    def holds_compressor(self) -> bool:
        """Whether a live compressor (:data:`COMPRESSOR_BYTES` of memory) is held."""
        return self._compressor is not None

    @property
    def memory_bytes(self) -> int:
        """
        Bytes this encoder holds: compressed bytes, staged bytes and, while it holds
        one, the compressor's :data:`COMPRESSOR_BYTES`.
        """
        held = self._buffered + len(self._staged)
        return held + COMPRESSOR_BYTES if self._compressor is not None else held

    @property
    def pending(self) -> bool:
        """Whether data was written since the last part or tail was handed out."""
        return self._pending > 0

    def write(self, data: bytes) -> Optional[bytes]:
        """
        Compress ``data`` (bytes, typically whole NDJSON lines).

        :returns: a complete part (bytes of whole gzip members, at least ``part_size``
            long) when this write filled one, else None.
        """
        if not data:
            return None
        self._pending += len(data)
        compressor = self._compressor
        if compressor is None:
            staged = self._staged
            staged += data
            if len(staged) < self._stage_limit:
                return None
            compressor = self._compressor = zlib.compressobj(
                self._level, zlib.DEFLATED, _GZIP_WBITS, _MEM_LEVEL
            )
            data = bytes(staged)
            self._staged = bytearray()
        out = compressor.compress(data)
        if out:
            self._chunks.append(out)
            self._buffered += len(out)
            if self._buffered >= self._part_size:
                return self.finish()
        return None

    @property
    def pending_bytes(self) -> int:
        """Uncompressed bytes written since the last part or tail was handed out."""
        return self._pending

    def snapshot(self) -> bytes:
        """
        The part being filled as it stands, as whole gzip members: the compressed
        bytes so far plus the trailer of a *copy* of the compressor, finished
        (``compressobj.copy()``, then ``flush(Z_FINISH)``), or the staged bytes
        compressed as one member.  The live member is not cut: later writes, parts
        and :meth:`finish` are byte for byte what they would be without snapshots
        (DESIGN.md section 6, checkpoints).  Empty when nothing was written since
        the last part.
        """
        if not self._pending:
            return b""
        if self._compressor is not None:
            trailer = self._compressor.copy().flush(zlib.Z_FINISH)
        elif self._staged:
            trailer = _compress(bytes(self._staged), self._level)
        else:
            trailer = b""
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return (self._chunks[0] if self._chunks else b"") + trailer

    def release_compressor(self) -> None:
        """
        Close the live member, if a compressor holds one, and free the compressor
        (a key gone quiet): its bytes stay in the part being filled as a whole
        member, and the next write starts a new member.  Staged bytes stay staged.
        """
        if self._compressor is not None:
            self._close_member()

    def compact(self) -> None:
        """
        Close the member being filled, compressing staged bytes into it (memory
        running short: a quiet key's staged lines take 5-7x their compressed size),
        and free the compressor.  The next write starts a new member.
        """
        self._close_member()

    def _close_member(self) -> None:
        if self._compressor is not None:
            tail = self._compressor.flush(zlib.Z_FINISH)
            self._compressor = None
        elif self._staged:
            tail = _compress(bytes(self._staged), self._level)
            self._staged = bytearray()
        else:
            return
        self._chunks.append(tail)
        self._buffered += len(tail)

    def finish(self) -> bytes:
        """
        Close the current member and hand out everything held: the object's tail
        (possibly shorter than a part).  Empty when nothing was written since the last
        part.  The encoder can be written to again afterwards; a new member starts.
        """
        if not self._pending:
            return b""
        self._close_member()
        body = b"".join(self._chunks)
        self._chunks = []
        self._buffered = 0
        self._pending = 0
        return body


#: FLG bit of the extra field (RFC 1952 section 2.3.1).
_FEXTRA = 0x04
#: Bytes of the fixed gzip member header: ID1 ID2 CM FLG MTIME(4) XFL OS.
_HEADER_BYTES = 10


def with_extra_field(body: bytes, subfield_id: bytes, data: bytes) -> bytes:
    """
    ``body`` (bytes starting with a gzip member, as zlib writes it: no optional
    fields) with an extra field (RFC 1952 section 2.3.1.1) in its first member's
    header: one subfield ``subfield_id`` (2 bytes, SI1 SI2) holding ``data``.
    Decompressors skip it; the data decode as before.  The header grows by
    ``6 + len(data)`` bytes.

    :raises ValueError: ``body`` does not start with a gzip header without flags,
        or ``subfield_id`` is not 2 bytes, or ``data`` is over 65,531 bytes.
    """
    if len(subfield_id) != 2 or len(data) > 0xFFFF - 4:
        raise ValueError("a subfield ID is 2 bytes and its data at most 65,531")
    if len(body) < _HEADER_BYTES or body[:3] != b"\x1f\x8b\x08" or body[3] != 0:
        raise ValueError("not a gzip member header without optional fields")
    subfield = subfield_id + len(data).to_bytes(2, "little") + data
    return b"".join(
        (
            body[:3],
            bytes((_FEXTRA,)),
            body[4:_HEADER_BYTES],
            len(subfield).to_bytes(2, "little"),
            subfield,
            body[_HEADER_BYTES:],
        )
    )
