"""
The store behind ``NO_UPLOAD=1``: every writer takes its parts and tail, counts the
bytes and drops them, so the whole pipeline (validation, compression, parts,
completion) runs with nothing sent anywhere and no credentials needed.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from loghandler.interfaces import Finished, IObjectStore, IObjectWriter


@implementer(IObjectWriter)
class DiscardWriter:
    """
    An :class:`IObjectWriter` that drops what it is given.

    :param store: counts the bytes dropped.
    :param key: the object key.
    """

    full = False
    checkpoints_are_parts = False

    def __init__(self, store: "DiscardStore", key: str) -> None:
        self._store = store
        self.key = key

    def part(self, body: bytes) -> "Deferred[None]":
        """Count and drop ``body``."""
        self._store.bytes_discarded += len(body)
        return succeed(None)

    def finish(
        self, tail: bytes, on_staged: Optional[Callable[[], None]] = None
    ) -> "Deferred[Finished]":
        """Count and drop ``tail``; the object counts as merged."""
        self._store.bytes_discarded += len(tail)
        if on_staged is not None:
            on_staged()
        return succeed(Finished("merged", key=self.key))

    def checkpoint(self, body: bytes) -> "Deferred[bool]":
        """Drop ``body``: nothing survives a crash, nothing is kept."""
        return succeed(True)

    def abandon(self) -> None:
        """Nothing is in flight."""


@implementer(IObjectStore)
class DiscardStore:
    """
    An :class:`IObjectStore` that keeps nothing.

    :ivar bytes_discarded: bytes of parts and tails dropped so far.
    """

    name = "discard"
    problem: Optional[str] = None
    failing: Optional[tuple[float, str]] = None

    def __init__(self) -> None:
        self.bytes_discarded = 0

    def __repr__(self) -> str:
        return "<DiscardStore: NO_UPLOAD=1, nothing is sent>"

    def open(self, key: str) -> DiscardWriter:
        """A writer that drops what it is given."""
        return DiscardWriter(self, key)

    def check(self) -> "Deferred[None]":
        """Always reachable."""
        return succeed(None)

    def stopping(self, deadline: float) -> None:
        """Nothing waits."""

    def close(self) -> "Deferred[None]":
        """Nothing to release."""
        return succeed(None)
