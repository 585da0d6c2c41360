"""
Exponential backoff with full jitter ("Exponential Backoff And Jitter", AWS
Architecture Blog, 2015): the wait before retry ``n`` is uniform in
``[0, min(cap, base * 2**n))`` seconds.
"""

from __future__ import annotations

import random
from typing import Callable

import attrs


@attrs.frozen
class Backoff:
    """
    :ivar base: seconds of the first retry's upper bound.
    :ivar cap: the largest wait in seconds.
    :ivar uniform: draws a float in ``[a, b]``; injectable for tests.
    """

    base: float = 0.1
    cap: float = 10.0
    uniform: Callable[[float, float], float] = random.uniform

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0 for the first retry)."""
        return self.uniform(0.0, min(self.cap, self.base * 2 ** min(attempt, 32)))
