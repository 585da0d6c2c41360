"""
The store behind ``NO_UPLOAD=1``: every call succeeds and the bytes are counted and
dropped, so the whole pipeline (validation, compression, parts, completion) runs with
nothing sent anywhere and no credentials needed.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from loghandler.interfaces import CompletedPart, IObjectStore, ObjectInfo, PendingUpload, StoredPart


@implementer(IObjectStore)
class DiscardStore:
    """
    An :class:`IObjectStore` that keeps nothing: HEAD always finds no object.

    :ivar bytes_discarded: bytes of parts and objects dropped so far.
    """

    name = "discard"

    def __repr__(self) -> str:
        return "<DiscardStore: NO_UPLOAD=1, nothing is sent>"

    def __init__(self) -> None:
        self.bytes_discarded = 0
        self._ids = itertools.count(1)

    def head(self, key: str) -> Deferred[Optional[ObjectInfo]]:
        """No object ever exists."""
        return succeed(None)

    def get(self, key: str, if_match: str) -> Deferred[bytes]:
        """Never called, since no object exists; answers empty."""
        return succeed(b"")

    def put(
        self,
        key: str,
        body: bytes,
        if_match: Optional[str] = None,
        if_none_match: bool = False,
        write_id: Optional[str] = None,
    ) -> Deferred[str]:
        """Count and drop ``body``."""
        self.bytes_discarded += len(body)
        return succeed('"discarded"')

    def create_upload(self, key: str, write_id: Optional[str] = None) -> Deferred[str]:
        """A new upload ID."""
        return succeed("discard-%d" % next(self._ids))

    def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> Deferred[str]:
        """Count and drop ``body``."""
        self.bytes_discarded += len(body)
        return succeed('"discarded"')

    def upload_part_copy(
        self, key: str, upload_id: str, number: int, source_key: str, if_match: str
    ) -> Deferred[str]:
        """Nothing to copy."""
        return succeed('"discarded"')

    def complete_upload(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[CompletedPart],
        if_match: Optional[str] = None,
        if_none_match: bool = False,
    ) -> Deferred[str]:
        """Nothing to complete."""
        return succeed('"discarded"')

    def abort_upload(self, key: str, upload_id: str) -> Deferred[None]:
        """Nothing to abort."""
        return succeed(None)

    def list_uploads(self, prefix: str) -> Deferred[list[PendingUpload]]:
        """No uploads are kept."""
        return succeed([])

    def list_parts(self, key: str, upload_id: str) -> Deferred[list[StoredPart]]:
        """No parts are kept."""
        return succeed([])

    def check(self) -> Deferred[None]:
        """Always reachable."""
        return succeed(None)

    def close(self) -> Deferred[None]:
        """Nothing to release."""
        return succeed(None)
