"""
Tests for :mod:`loghandler.stopping`: SIGTERM and SIGINT stop the reactor once (a
second signal is logged, never a traceback), and after the shutdown the exit
status is death by the signal when nothing was lost, 1 when lines were lost.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.internet.error import ReactorNotRunning
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from loghandler.stopping import EXIT_LOST, StopSignals


class FakeReactor:
    """What StopSignals uses of the reactor; ``callFromThread`` runs at once."""

    def __init__(self) -> None:
        self._exitSignal: Any = None
        self.stops = 0
        self.triggers: list[tuple[str, str, Callable[[], None]]] = []
        self.running = True

    def callFromThread(self, f: Callable[..., None], *args: Any) -> None:
        f(*args)

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], None]) -> None:
        self.triggers.append((phase, event, f))

    def stop(self) -> None:
        if not self.running:
            raise ReactorNotRunning()
        self.running = False
        self.stops += 1


class StopSignalsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.lost = 0
        self.handlers: dict[int, Any] = {}
        self.at_exit: list[Callable[[], None]] = []
        self.exits: list[int] = []
        self.stopping = StopSignals(
            self.reactor,
            lambda: self.lost,
            set_handler=self.handlers.__setitem__,
            at_exit=self.at_exit.append,
            exit=self.exits.append,
        )
        self.stopping.install()

    def shut_down(self) -> None:
        """The reactor's shutdown: the "after" triggers run."""
        for phase, event, f in self.reactor.triggers:
            self.assertEqual((phase, event), ("after", "shutdown"))
            f()

    def test_takes_sigterm_and_sigint(self) -> None:
        self.assertEqual(sorted(self.handlers), sorted([signal.SIGTERM, signal.SIGINT]))

    def test_first_signal_stops_and_is_re_raised(self) -> None:
        """SIGTERM stops the reactor; twistd is told to die by it (nothing lost)."""
        with capturedLogs() as events:
            self.handlers[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual(self.reactor.stops, 1)
        self.assertEqual(self.reactor._exitSignal, signal.SIGTERM)
        self.assertEqual([e["event"] for e in events], ["stop_signal"])
        self.shut_down()
        self.assertEqual((self.reactor._exitSignal, self.at_exit), (signal.SIGTERM, []))

    def test_second_signal_changes_nothing(self) -> None:
        """
        A second SIGTERM, or SIGINT after it, is logged as such: no second stop, no
        traceback, the first signal kept.
        """
        self.handlers[signal.SIGTERM](signal.SIGTERM, None)
        with capturedLogs() as events:
            self.handlers[signal.SIGTERM](signal.SIGTERM, None)
            self.handlers[signal.SIGINT](signal.SIGINT, None)
        self.assertEqual(self.reactor.stops, 1)
        self.assertEqual(self.reactor._exitSignal, signal.SIGTERM)
        self.assertEqual(
            [(e["event"], e["signal"]) for e in events],
            [("stop_signal_again", "SIGTERM"), ("stop_signal_again", "SIGINT")],
        )
        self.assertFalse([e for e in events if e.get("log_failure")])

    def test_reactor_stopping_already(self) -> None:
        """A signal while the reactor stops for another reason is no error."""
        self.reactor.running = False
        self.handlers[signal.SIGINT](signal.SIGINT, None)
        self.assertEqual(self.reactor._exitSignal, signal.SIGINT)

    def test_lost_lines_exit_1(self) -> None:
        """
        Lines lost: twistd is told not to die by the signal, and once the
        interpreter exits the status is 1; logged with the count.
        """
        self.handlers[signal.SIGTERM](signal.SIGTERM, None)
        self.lost = 7
        with capturedLogs() as events:
            self.shut_down()
        self.assertIsNone(self.reactor._exitSignal)
        (event,) = events
        self.assertEqual((event["event"], event["lost"], event["status"]), ("exit_lost", 7, 1))
        self.assertEqual(self.exits, [])
        (registered,) = self.at_exit
        registered()
        self.assertEqual(self.exits, [EXIT_LOST])

    def test_no_signal_nothing_lost(self) -> None:
        """Stopped otherwise, nothing lost: the exit status is twistd's."""
        self.shut_down()
        self.assertEqual((self.reactor._exitSignal, self.at_exit), (None, []))
