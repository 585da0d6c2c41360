"""
How ``twistd loghandler`` stops, and what its exit status tells a supervisor.

SIGTERM and SIGINT stop the reactor once; a second signal (systemd and a shell
both signalling, Ctrl-C twice) is logged and changes nothing, where twistd's own
handlers print a ``ReactorNotRunning`` traceback.  After the flush on stop
(DESIGN.md section 4), the exit status:

- death by the signal received (twistd re-raises it: 143 from a shell for
  SIGTERM, which systemd counts as a clean stop), when every acknowledged line
  was stored or staged;
- :data:`EXIT_LOST` (1) when some acknowledged line was neither stored nor staged
  by the deadline (with ``WORKERS``: when a worker said so, or did not flush).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from typing import Any, Callable, Optional

from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

#: The exit status of a stop that lost acknowledged lines.
EXIT_LOST = 1


class StopSignals:
    """
    SIGTERM and SIGINT stop ``reactor`` once; after the shutdown the exit status
    says whether ``lost()`` lines were lost (see the module).

    :param reactor: the global reactor, as twistd runs it.
    :param lost: after the stop: the acknowledged lines neither stored nor staged
        (a supervisor: its workers that lost lines).
    :param what: what ``lost()`` counts, for the log.
    :param set_handler: by default ``signal.signal``.
    :param at_exit: by default ``atexit.register``.
    :param exit: by default ``os._exit``.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        lost: Callable[[], int],
        what: str = "acknowledged lines were neither stored nor staged",
        set_handler: Optional[Callable[[int, Any], Any]] = None,
        at_exit: Optional[Callable[[Callable[[], None]], Any]] = None,
        exit: Optional[Callable[[int], Any]] = None,
    ) -> None:
        self._reactor = reactor
        self._lost = lost
        self._what = what
        self._set_handler = set_handler if set_handler is not None else signal.signal
        self._at_exit = at_exit if at_exit is not None else atexit.register
        self._exit = exit if exit is not None else os._exit
        #: The signal that stopped the process, if one did.
        self.received: int = 0

    def install(self) -> None:
        """Take SIGTERM and SIGINT over from twistd (call it once the reactor runs)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._set_handler(signum, self._handler)
        self._reactor.addSystemEventTrigger("after", "shutdown", self.stopped)

    def _handler(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.signalled, signum)

    def signalled(self, signum: int) -> None:
        """A stop signal, in the reactor's thread: stop, the first time."""
        name = signal.Signals(signum).name
        if self.received:
            self._log.info(
                "{signal} received again; already stopping (the flush takes at most"
                " SHUTDOWN_TIMEOUT_S)",
                event="stop_signal_again",
                signal=name,
            )
            return
        self.received = signum
        self._log.info("{signal} received; stopping", event="stop_signal", signal=name)
        # As twistd's own handlers do: twistd re-raises it once the reactor stopped.
        self._reactor._exitSignal = signum
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping

    def stopped(self) -> None:
        """After the shutdown (the flush is done): exit 1 if lines were lost."""
        lost = self._lost()
        if not lost:
            return
        self._log.error(
            "exit status {status}: {lost} {what} (see the errors above)",
            event="exit_lost",
            status=EXIT_LOST,
            lost=lost,
            what=self._what,
        )
        self._reactor._exitSignal = None  # twistd would die by the signal instead
        self._at_exit(self._exit_lost)

    def _exit_lost(self) -> None:
        """At interpreter exit, once twistd is done (its pid file removed, log closed)."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        self._exit(EXIT_LOST)
