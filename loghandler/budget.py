"""
The global memory budget (DESIGN.md section 4): bytes held in memory for all objects
(compressed part buffers, parts waiting or in flight, tails being completed).  Past it,
new messages get 503 instead of an unbounded queue.
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
