"""
Rejected requests (4xx answers: a body that is not a valid message, too large, an
unknown path or method, an unreadable head) in the log at a bounded pace, so that a
flood of bad input cannot flood the log.

Within each window of :data:`WINDOW_S` seconds (starting at the first rejection)
the first :data:`LINES_PER_WINDOW` rejections are logged one line each (event
``request_rejected``: ``status``, ``error``, ``method``, ``path`` without its query,
``peer``, and ``line`` for a batch); the rest are only counted, and one
``rejections_suppressed`` line says how many, by status, when the window ends
(at its end while the site listens; otherwise with the next rejection, or at
stop).  So a flood writes at most ``LINES_PER_WINDOW + 1`` lines a window, and the
lines plus the suppressed counts add up to every rejection.  Every rejection is
also counted in the metrics (``loghandler_messages_total``).
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["LINES_PER_WINDOW", "WINDOW_S", "RejectionLog"]

#: Rejections logged one line each per window.
LINES_PER_WINDOW = 10
#: The window's length in seconds.
WINDOW_S = 60.0
#: The most characters of a path written in a line.
PATH_CHARS = 200


class RejectionLog:
    """
    Logs rejected requests at a bounded pace (see the module docstring).

    :param clock: for the windows, and their end while :meth:`start` ed.
    :param lines: rejections logged one line each per window.
    :param window_s: the window's length in seconds.
    :ivar total: every rejection seen.
    :ivar suppressed_total: those not logged one line each.
    """

    _log = Logger()

    def __init__(
        self, clock: IReactorTime, lines: int = LINES_PER_WINDOW, window_s: float = WINDOW_S
    ) -> None:
        self._clock = clock
        self._lines = lines
        self._window_s = window_s
        self._started = False
        self._window_start: Optional[float] = None
        self._logged = 0
        self._suppressed: Counter[int] = Counter()
        self._timer: Optional[IDelayedCall] = None
        self.total = 0
        self.suppressed_total = 0

    def start(self) -> None:
        """End each window on time from now on (the site listens)."""
        self._started = True

    def stop(self) -> None:
        """End the current window now (its summary, if any, is logged); no more timers."""
        self._started = False
        if self._window_start is not None:
            self._end_window()

    def rejected(
        self,
        status: int,
        error: str,
        peer: str = "",
        method: bytes = b"",
        path: bytes = b"",
        line: Optional[int] = None,
    ) -> None:
        """
        One request answered ``status`` (4xx) with ``error``.

        :param peer: the client's address.
        :param method: / :param path: the request's (empty when its head could not
            be read); a query string is not written.
        :param line: the batch line at fault, from 1.
        """
        now = self._clock.seconds()
        if self._window_start is not None and now - self._window_start >= self._window_s:
            self._end_window()
        if self._window_start is None:
            self._window_start = now
        self.total += 1
        if self._logged < self._lines:
            self._logged += 1
            self._log.info(
                "rejected {method} {path} from {peer}: {status} {error}{at_line}",
                event="request_rejected",
                status=status,
                error=error,
                method=method.decode("ascii", "replace"),
                path=path.split(b"?", 1)[0][:PATH_CHARS].decode("utf-8", "backslashreplace"),
                peer=peer,
                line=line,
                at_line="" if line is None else " (line %d)" % line,
            )
            return
        self._suppressed[status] += 1
        self.suppressed_total += 1
        if self._started and self._timer is None:
            delay = max(0.0, self._window_start + self._window_s - now)
            self._timer = self._clock.callLater(delay, self._end_window)

    def _end_window(self) -> None:
        """Log the window's summary when rejections were suppressed; start afresh."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        assert self._window_start is not None
        if self._suppressed:
            seconds = min(self._clock.seconds() - self._window_start, self._window_s)
            self._log.warn(
                "suppressed {suppressed} more rejected requests in {seconds:.0f} s"
                " after the first {logged} ({by_status})",
                event="rejections_suppressed",
                suppressed=sum(self._suppressed.values()),
                seconds=seconds,
                logged=self._logged,
                by_status={str(s): n for s, n in sorted(self._suppressed.items())},
            )
        self._window_start = None
        self._logged = 0
        self._suppressed = Counter()
