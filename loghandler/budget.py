"""
The global memory budget (DESIGN.md section 4): bytes held in memory for all objects
(compressed part buffers, lines staged uncompressed, zlib compressors, parts waiting
or in flight, tails being completed).  Past it, new messages get 503 instead of an
unbounded queue.  Each client's streams also count in a share of their own
(:class:`Share`, ``CLIENT_BUDGET_BYTES``), so one busy client is refused at its
share while the others are still taken.
"""

from __future__ import annotations


class MemoryBudget:
    """
    A shared byte counter with a limit.

    :param limit: bytes that may be held before :attr:`exhausted` turns true.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @property
    def exhausted(self) -> bool:
        """Whether the bytes held reached the limit."""
        return self.held >= self.limit

    def change(self, delta: int) -> None:
        """Count ``delta`` more bytes (negative: fewer)."""
        self.held += delta


class Share(MemoryBudget):
    """
    One client's part of a :class:`MemoryBudget`: what is counted here is counted in
    ``parent`` too.

    :param limit: bytes the client may hold before :attr:`exhausted` turns true.
    :param parent: the global budget.
    :param client_id: the client's ID.
    """

    def __init__(self, limit: int, parent: MemoryBudget, client_id: int) -> None:
        super().__init__(limit)
        self.parent = parent
        self.client_id = client_id
        #: Streams counting in this share (open or completing).
        self.streams = 0

    def change(self, delta: int) -> None:
        """Count ``delta`` more bytes here and in the parent (negative: fewer)."""
        self.held += delta
        self.parent.change(delta)
