"""
Incremental gzip framing (DESIGN.md section 3).

Lines are compressed as they come into one gzip member (RFC 1952) at a time.  Once a
member's compressed bytes reach the part size, the member is closed and handed out
as a whole part, so every part is one or more complete gzip members: any sequence of
parts, and so any prefix of an object's parts, is a valid gzip file (RFC 1952
section 2.2: a gzip file is a series of members).  Pure: no I/O.
"""

from __future__ import annotations

import zlib
from typing import Optional

#: zlib's wbits for a gzip wrapper with a 32 KiB window.
_GZIP_WBITS = 16 + zlib.MAX_WBITS


class GzipPartEncoder:
    """
    Compress data into gzip members cut at part boundaries.

    :param part_size: compressed bytes at which the current member is closed and
        handed out as a part (S3's minimum part is 5 MiB; the part handed out is at
        least this large).
    :param level: zlib compression level, 1 (fast) to 9 (small).
    """

    def __init__(self, part_size: int, level: int = 6) -> None:
        self._part_size = part_size
        self._level = level
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._pending = 0

    @property
    def buffered_bytes(self) -> int:
        """Compressed bytes held for the part being filled."""
        return self._buffered

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
        out = self._compressor.compress(data)
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
        (``compressobj.copy()``, then ``flush(Z_FINISH)``).  The live member is not
        cut: later writes, parts and :meth:`finish` are byte for byte what they
        would be without snapshots (DESIGN.md section 6, checkpoints).  Empty when
        nothing was written since the last part.
        """
        if not self._pending:
            return b""
        trailer = self._compressor.copy().flush(zlib.Z_FINISH)
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return (self._chunks[0] if self._chunks else b"") + trailer

    def finish(self) -> bytes:
        """
        Close the current member and hand out everything held: the object's tail
        (possibly shorter than a part).  Empty when nothing was written since the last
        part.  The encoder can be written to again afterwards; a new member starts.
        """
        if not self._pending:
            return b""
        self._chunks.append(self._compressor.flush(zlib.Z_FINISH))
        body = b"".join(self._chunks)
        self._chunks = []
        self._buffered = 0
        self._pending = 0
        self._compressor = zlib.compressobj(self._level, zlib.DEFLATED, _GZIP_WBITS)
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
