"""
The seam between the streams and storage (DESIGN.md section 7): an
:class:`IObjectStore` opens one :class:`IObjectWriter` per stream, and the writer
stages the stream's gzip parts and finally makes them part of the object key.  How
(S3's staging upload and merge, Azure's append blob) is the store's business: part
numbers, conditions and the 10,000-part limit live in the writer, not the stream.

Also the errors storage calls raise, shared by every store and classified by the one
retry layer (:mod:`loghandler.retry`).
"""

from __future__ import annotations

from typing import Callable, Optional

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


class StorageError(Exception):
    """
    A storage call got an error answer, or no usable answer.

    :ivar operation: the call that failed, such as ``UploadPart``.
    :ivar status: the HTTP status, or 0 when no answer came.
    :ivar code: the store's error code (``NoSuchUpload``, ``SlowDown``...), or "".
    :ivar message: the store's message, or "".
    """

    def __init__(self, operation: str, status: int = 0, code: str = "", message: str = ""):
        super().__init__(f"{operation} failed: {status} {code} {message}".strip())
        self.operation = operation
        self.status = status
        self.code = code
        self.message = message


class PreconditionFailed(StorageError):
    """
    412 Precondition Failed: an ``If-Match``, ``If-None-Match: *`` or
    ``x-amz-copy-source-if-match`` condition (or Azure's ``appendpos`` or
    ``maxsize``) did not hold, because another writer changed the object first.
    ``code`` is the store's error code (S3: ``PreconditionFailed``; Azure:
    ``AppendPositionConditionNotMet``, ``ConditionNotMet``...).
    """

    def __init__(self, operation: str, message: str = "", code: str = "PreconditionFailed"):
        super().__init__(operation, 412, code, message)


class Abandoned(Exception):
    """
    The shutdown deadline passed (or the writer was abandoned) before this storage
    work was done; nothing more is tried.
    """


@attrs.frozen
class Finished:
    """
    How :meth:`IObjectWriter.finish` ended.

    :ivar outcome: ``"merged"`` (the data are part of ``key``), ``"staged"`` (the data
        are stored in the daemon's working area, ``staged_key``, and recovery merges
        them), ``"queued"`` (S3: stored in ``staged_key`` and left to the key's
        merger, another writer, which merges them soon;
        :mod:`loghandler.storage.s3.keymerge`), or ``"empty"`` (nothing was written).
    :ivar key: the object key merged into (the stream's key or a rollover
        ``{key}.N``), or None.
    :ivar staged_key: where the data wait when ``outcome`` is ``"staged"`` or
        ``"queued"``, else None.
    """

    outcome: str
    key: Optional[str] = None
    staged_key: Optional[str] = None


class IObjectWriter(Interface):
    """
    The writer of one stream's data into one object key.  Calls: any number of
    :meth:`part` and :meth:`checkpoint`, then one :meth:`finish` after every
    ``part`` Deferred fired; or :meth:`abandon` at any time.
    """

    key = Attribute("The object key the data go to (str).")
    full = Attribute(
        "True when the writer can take no more parts (S3: 10,000 parts or the"
        " rollover size staged): the stream must finish now."
    )
    checkpoints_are_parts = Attribute(
        "False when a checkpoint replaces the previous one (S3 uploads the segment's"
        " part again): the stream hands :meth:`checkpoint` a snapshot of the member it"
        " fills.  True when the store keeps every byte it is given and replaces"
        " nothing (an Azure append blob): the stream checkpoints by closing its gzip"
        " member and handing it to :meth:`part`, whatever its size."
    )

    def part(body: bytes) -> "Deferred[None]":
        """
        Store ``body`` (bytes of whole gzip members, at least the store's part size
        unless :attr:`checkpoints_are_parts`) as the next piece of the stream's data.  Fires with None once it is stored;
        every failure is retried (no piece is ever skipped).

        :raises Abandoned: (errback) the writer was abandoned first.
        """

    def checkpoint(body: bytes) -> "Deferred[bool]":
        """
        Store ``body`` (whole gzip members: everything since the last :meth:`part`,
        as it stands) so that it survives a crash of this process, in place of the
        previous checkpoint; the next :meth:`part` or :meth:`finish` replaces it.
        Stored after every ``part`` handed over before it.

        :returns: a Deferred firing with True once stored, or False when the store
            took no checkpoint (the data are stored by the next ``part`` or
            ``finish`` only).
        :raises Abandoned: (errback) the writer was abandoned first.
        """

    def finish(
        tail: bytes, on_staged: Optional[Callable[[], None]] = None
    ) -> "Deferred[Finished]":
        """
        Store ``tail`` (whole gzip members, any size, possibly empty) after the parts
        and make the stream's data part of the object key.  ``on_staged`` is called
        once all the data are stored (staged), before they are merged: from then on
        nothing of the stream needs to be held in memory.

        :returns: a Deferred firing with a :class:`Finished`.
        :raises Abandoned: (errback) abandoned before the data were stored at all;
            the caller reports them lost.
        """

    def abandon() -> None:
        """
        Stop: calls in flight are cancelled and their Deferreds errback with
        :class:`Abandoned`, except a :meth:`finish` whose data are already staged,
        which fires with ``Finished("staged", ...)``.
        """


class IObjectStore(Interface):
    """
    Where objects are written: opens a writer per stream.
    """

    name = Attribute("A short name for logs: 's3', 'memory', 'discard'.")
    problem = Attribute(
        "None while storage works; else a short text saying why it fails for good"
        " (access denied, no such bucket), for /healthz."
    )
    failing = Attribute(
        "None while storage calls succeed; else ``(since, reason)``: the clock's"
        " seconds of the first call that failed for want of storage (refused, timed"
        " out, 5xx, access denied) with none succeeding since, and the last such"
        " failure (``'PutObject: 503 SlowDown'``), for the readiness probe."
    )

    def open(key: str) -> IObjectWriter:
        """
        A writer for one stream of ``key`` (an object key such as
        ``chat/2020-03-30/content_logs_2020-03-30_3``).  Opening sends nothing.
        """

    def check() -> "Deferred[None]":
        """
        Fire when the store can be reached with these credentials; errback with
        :class:`StorageError` if not.
        """

    def stopping(deadline: float) -> None:
        """
        The flush on stop began and must end by ``deadline`` (the clock's seconds):
        retries that sleep are woken now, and no attempt may outlast the deadline.
        """

    def close() -> "Deferred[None]":
        """
        Release connections; called once when the server stops, after the flush.
        """
