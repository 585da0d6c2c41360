"""
Fault injection for the in-memory stores (:class:`~loghandler.storage.memory.MemoryStore`
for S3, :class:`~loghandler.storage.azure.memory.MemoryAppendBlobs` for Azure): every
call goes through :meth:`ScriptedCalls._call`, which carries it out, fails it, loses
its answer or holds it, as the test scripted, per operation name (``UploadPart``,
``AppendBlock``...):

- :meth:`~ScriptedCalls.fail`: an error before the call lands;
- :meth:`~ScriptedCalls.lose_answer`: the call lands, then the answer is lost (the
  connection dropped after the write);
- :meth:`~ScriptedCalls.hold`: the call stalls until :meth:`~ScriptedCalls.release`;
  a caller that gives up cancels its Deferred, but the call still lands when
  released, as a request already sent may;
- :meth:`~ScriptedCalls.before`: run code first, to play another writer;
- :attr:`~ScriptedCalls.chaos`: a function choosing the fault of each call that no
  script applies to (the model-based tests).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

#: A fault step (:meth:`ScriptedCalls.lose_answer`, :attr:`ScriptedCalls.chaos`):
#: carry the call out, then lose its answer.
LOST = Exception("answer lost")
#: A :attr:`ScriptedCalls.chaos` step: hold the call until :meth:`ScriptedCalls.release`.
STALL = Exception("stall")


def lost_answer() -> ResponseNeverReceived:
    """The exception treq raises when the connection drops before the answer."""
    return ResponseNeverReceived([Failure(ConnectionLost("connection lost"))])


@attrs.define
class Held:
    """
    A stalled call.

    :ivar operation: its operation name.
    :ivar key: its key.
    :ivar run: carries the call out (lands it).
    :ivar result: the caller's Deferred (it may have cancelled it).
    """

    operation: str
    key: str
    run: Callable[[], Any]
    result: Deferred[Any]


class ScriptedCalls:
    """
    The scripted faults of an in-memory store (see the module docstring).

    :ivar calls: (operation, key) of every call, in order.
    :ivar held: the stalled calls, oldest first.
    :ivar chaos: when set, called with the operation name for each call that no
        scripted fault applies to: None (answer), an exception (fail before
        landing), :data:`LOST` or :data:`STALL` (or a store's own steps, see
        :meth:`_chaos_step`).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.held: list[Held] = []
        # operation -> what its next calls do: None (answer), an exception (fail
        # before landing) or LOST (land, then lose the answer).
        self._script: dict[str, list[Optional[BaseException]]] = {}
        self._holding: set[str] = set()
        self._before: dict[str, list[Callable[[], None]]] = {}
        self.chaos: Optional[Callable[[str], Optional[BaseException]]] = None

    def fail(self, operation: str, error: BaseException, times: int = 1, after: int = 0) -> None:
        """
        Make ``times`` calls of ``operation`` fail with ``error``, unlanded, once
        ``after`` more calls of it (beyond those already scripted) went through.
        """
        self._script.setdefault(operation, []).extend([None] * after + [error] * times)

    def lose_answer(self, operation: str, times: int = 1, after: int = 0) -> None:
        """
        Carry out ``times`` calls of ``operation`` (after ``after`` more, as for
        :meth:`fail`) but answer them with :func:`lost_answer`, as when the
        connection drops after the write landed.
        """
        self._script.setdefault(operation, []).extend([None] * after + [LOST] * times)

    def hold(self, operation: str) -> None:
        """Keep calls of ``operation`` waiting in :attr:`held` until :meth:`release`."""
        self._holding.add(operation)

    def release(self, count: Optional[int] = None) -> None:
        """
        Stop holding; carry out the first ``count`` held calls (all by default), also
        those whose caller gave up (their effect lands, their answer goes nowhere).
        """
        if count is None:
            self._holding.clear()
            count = len(self.held)
        ready, self.held = self.held[:count], self.held[count:]
        for held in ready:
            try:
                value = held.run()
            except Exception:
                if not held.result.called:
                    held.result.errback(Failure())
            else:
                if not held.result.called:
                    held.result.callback(value)

    def before(self, operation: str, action: Callable[[], None]) -> None:
        """Run ``action`` once, just before the next call of ``operation``."""
        self._before.setdefault(operation, []).append(action)

    def _chaos_step(self, step: Optional[BaseException]) -> Optional[BaseException]:
        """A store's own chaos steps, turned into state; returns the step left."""
        return step

    def _call(self, operation: str, key: str, run: Callable[[], Any]) -> Deferred[Any]:
        self.calls.append((operation, key))
        for action in self._before.pop(operation, []):
            action()
        script = self._script.get(operation)
        step = script.pop(0) if script else None
        if step is None and self.chaos is not None:
            step = self._chaos_step(self.chaos(operation))
        if step is not None and step is not LOST and step is not STALL:
            return fail(step)
        if operation in self._holding or step is STALL:
            result: Deferred[Any] = Deferred()
            self.held.append(Held(operation, key, run, result))
            return result
        try:
            value = run()
        except Exception as e:
            return fail(e)
        if step is LOST:
            return fail(lost_answer())
        return succeed(value)
