"""
Where the daemon keeps its own data in the bucket, and how a staging upload numbers
its parts (DESIGN.md sections 5 and 6).  Shared by the writer, which stages, and by
recovery, which finishes what a gone writer staged.  Pure: no I/O.

Keys under ``_loghandler/`` (readers use ``chat/``):

- ``_loghandler/staging/{writer_id}/{key}/{sequence}``: one stream's staging upload,
  then staging object;
- ``_loghandler/writers/{writer_id}``: a writer's lease;
- ``_loghandler/queue/{key}/{writer_id}/{sequence}``: an empty marker saying that
  the staging object ``_loghandler/staging/{writer_id}/{key}/{sequence}`` waits for
  the key's merger (listed by key, which the staging keys cannot be);
- ``_loghandler/merging/{key}``: the key's merge lock, held by the one writer that
  merges the key's queue (:mod:`~loghandler.storage.s3.keymerge`);
- ``_loghandler/probe/{writer_id}``: the start-up probe of the bucket.

Part numbers of a staging upload.  A stream's data are a sequence of *segments*: each
segment is one part of the stream (at least the part size, whole gzip members) or,
for the last, its tail.  While a segment is being filled, checkpoints upload it as it
stands.  Segment ``k`` (from 1) may use the part numbers
``NUMBERS_PER_SEGMENT * (k - 1) + 1`` to ``NUMBERS_PER_SEGMENT * k``, in increasing
order: every upload of the segment replaces the previous one at the same number,
until an upload attempt ends without an answer (it may still land, later, with older
data); from then on the segment's uploads use the next number of its range.  So,
in every range, the highest number that holds a part holds the newest landed upload
of that segment: completion lists exactly that part of each range.  The writer uploads
one segment at a time, in order, so the chosen part of every range but the last is
the segment's final upload (at least the part size), as S3 requires of every part
but the last.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, TypeVar

import attrs

#: The daemon's working area in the bucket.
WORK_PREFIX = "_loghandler/"

#: Staging uploads and objects: ``{STAGING_PREFIX}{writer_id}/{key}/{sequence}``.
STAGING_PREFIX = WORK_PREFIX + "staging/"

#: Leases: ``{WRITERS_PREFIX}{writer_id}``.
WRITERS_PREFIX = WORK_PREFIX + "writers/"

#: Start-up probes: ``{PROBE_PREFIX}{writer_id}``.
PROBE_PREFIX = WORK_PREFIX + "probe/"

#: Queue markers: ``{QUEUE_PREFIX}{key}/{writer_id}/{sequence}``.
QUEUE_PREFIX = WORK_PREFIX + "queue/"

#: Merge locks: ``{MERGING_PREFIX}{key}``.
MERGING_PREFIX = WORK_PREFIX + "merging/"

#: S3's largest part number (https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html).
MAX_PART_NUMBER = 10_000

#: Part numbers each segment may use: 10, so that 1,000 segments of at least 5 MiB
#: (4.9 GiB) fit in S3's 10,000 part numbers, beyond the 4 GiB rollover size.
NUMBERS_PER_SEGMENT = 10

#: Segments one staging upload can take.
MAX_SEGMENTS = MAX_PART_NUMBER // NUMBERS_PER_SEGMENT


def staging_key(writer_id: str, key: str, sequence: int) -> str:
    """``_loghandler/staging/{writer_id}/{key}/{sequence}``."""
    return f"{STAGING_PREFIX}{writer_id}/{key}/{sequence}"


@attrs.frozen
class StagingKey:
    """
    A staging key taken apart.

    :ivar writer_id: the writer that staged it.
    :ivar key: the object key its data belong to (``chat/...``).
    :ivar sequence: which stream of that key, for that writer (from 1).
    """

    writer_id: str
    key: str
    sequence: int


def parse_staging_key(staging: str) -> Optional[StagingKey]:
    """
    The parts of a key made by :func:`staging_key`, or None for any other key (not
    under :data:`STAGING_PREFIX`, no writer ID, no key, or a sequence that is not a
    positive decimal number).
    """
    if not staging.startswith(STAGING_PREFIX):
        return None
    writer_id, slash, rest = staging[len(STAGING_PREFIX) :].partition("/")
    key, slash2, sequence = rest.rpartition("/")
    if not (writer_id and slash and key and slash2 and sequence.isdigit()):
        return None
    number = int(sequence)
    if number < 1 or sequence != str(number):
        return None
    return StagingKey(writer_id, key, number)


def queue_prefix(key: str) -> str:
    """``_loghandler/queue/{key}/``: where the queue markers of ``key`` are."""
    return f"{QUEUE_PREFIX}{key}/"


def queue_key(staging: StagingKey) -> str:
    """``_loghandler/queue/{key}/{writer_id}/{sequence}``: the marker of ``staging``."""
    return f"{queue_prefix(staging.key)}{staging.writer_id}/{staging.sequence}"


def parse_queue_key(marker: str) -> Optional[StagingKey]:
    """
    The staging key a queue marker stands for, or None for any other key (not under
    :data:`QUEUE_PREFIX`, or without a key, writer ID and positive sequence).
    """
    if not marker.startswith(QUEUE_PREFIX):
        return None
    parts = marker[len(QUEUE_PREFIX) :].rsplit("/", 2)
    if len(parts) != 3:
        return None
    key, writer_id, sequence = parts
    if not (key and writer_id and sequence.isdigit()) or sequence != str(int(sequence)):
        return None
    if int(sequence) < 1:
        return None
    return StagingKey(writer_id, key, int(sequence))


def merge_lock_key(key: str) -> str:
    """``_loghandler/merging/{key}``: the merge lock of ``key``."""
    return MERGING_PREFIX + key


def merge_lock_of(lock: str) -> Optional[str]:
    """The object key a merge lock is for, or None for any other key."""
    if not lock.startswith(MERGING_PREFIX) or lock == MERGING_PREFIX:
        return None
    return lock[len(MERGING_PREFIX) :]


def lease_key(writer_id: str) -> str:
    """``_loghandler/writers/{writer_id}``."""
    return WRITERS_PREFIX + writer_id


def lease_writer(key: str) -> Optional[str]:
    """The writer ID of a lease key, or None for any other key."""
    if not key.startswith(WRITERS_PREFIX):
        return None
    writer_id = key[len(WRITERS_PREFIX) :]
    return writer_id if writer_id and "/" not in writer_id else None


def segment_numbers(segment: int) -> range:
    """The part numbers segment ``segment`` (from 1) may use."""
    if not 1 <= segment <= MAX_SEGMENTS:
        raise ValueError(f"segment {segment} out of 1..{MAX_SEGMENTS}")
    first = NUMBERS_PER_SEGMENT * (segment - 1) + 1
    return range(first, first + NUMBERS_PER_SEGMENT)


def segment_of(number: int) -> int:
    """The segment a part number belongs to."""
    if not 1 <= number <= MAX_PART_NUMBER:
        raise ValueError(f"part number {number} out of 1..{MAX_PART_NUMBER}")
    return (number - 1) // NUMBERS_PER_SEGMENT + 1


_P = TypeVar("_P")


def newest_per_segment(parts: Iterable[_P], number_of: Callable[[_P], int]) -> list[_P]:
    """
    Of ``parts`` (anything with a part number, such as ListParts' ``StoredPart``),
    the one with the highest number in each segment, in number order: what
    completion lists.
    """
    chosen: dict[int, _P] = {}
    for part in parts:
        number = number_of(part)
        segment = segment_of(number)
        current = chosen.get(segment)
        if current is None or number_of(current) < number:
            chosen[segment] = part
    return [chosen[segment] for segment in sorted(chosen)]


def superseded(numbers: Sequence[int]) -> list[int]:
    """The numbers of ``numbers`` that :func:`newest_per_segment` leaves out."""
    kept = set(newest_per_segment(numbers, lambda n: n))
    return sorted(n for n in numbers if n not in kept)

