"""
JSON logs: ``twistd --logger loghandler.logs.json_observer loghandler`` writes every
log event to standard output as one JSON object per line (twistd's ``--logger``
takes a callable that returns the observer).

Each line holds, in this order:

- ``time``: the event's time, ISO 8601 in UTC with milliseconds
  (``2026-05-09T07:35:25.123Z``);
- ``level``: ``debug``, ``info``, ``warn``, ``error`` or ``critical``;
- ``namespace``: the logger's (``loghandler.stream.ObjectStream``);
- ``system``: twistd's ``log_system`` when the event has one (``-``, ``worker 2``);
- ``message``: the text, formatted as the text log shows it;
- ``failure`` for an event that carries one: ``{"type", "message", "traceback"}``;
- then every named field of the event (``key``, ``lines``, ``seconds``,
  ``event``...), under its own name; a field that has one of the names above gets
  ``_`` appended (``time_``).

Values that JSON cannot hold are written as text: bytes decoded as UTF-8 (with
backslash escapes), sets as lists, enums and log levels by name, NaN and infinities
as ``"nan"``, ``"inf"``, anything else as ``str(value)``.  The line is ASCII
(``ensure_ascii``).  An event that cannot be written at all (its ``str()`` raises)
is replaced by an ``error`` line saying so, never by an exception in the logging
path.

twistd's ``--logfile`` does not apply to an observer given with ``--logger``: run
in the foreground (``twistd -n``, under systemd, in a container) and let the
supervisor collect standard output.
"""

from __future__ import annotations

import datetime
import enum
import json
import math
import sys
import threading
from typing import IO, Any, Mapping

from twisted.logger import ILogObserver, LoggingFile, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.python.reflect import qual
from zope.interface import implementer

__all__ = ["JSONLineObserver", "event_as_json", "json_observer", "jsonable"]

#: The keys each line starts with; an event field of the same name gets ``_`` appended.
RESERVED = frozenset({"time", "level", "namespace", "system", "message", "failure"})

#: The keys twisted.python.log (the legacy API, which twistd and twisted.web still
#: use) puts in its events beside the ``log_`` ones: not fields.
_LEGACY_KEYS = frozenset(
    {"message", "time", "system", "isError", "format", "why", "failure", "printed", "logLevel"}
)

#: The class of twisted.logger's levels (constantly's, which has no type hints).
_NamedConstant = type(LogLevel.info)

#: Containers nested deeper than this are written as text.
_MAX_DEPTH = 6


def _text(value: object) -> str:
    """``str(value)``, or a placeholder naming its type when that raises."""
    try:
        return str(value)
    except Exception:
        return "<unprintable %s>" % type(value).__name__


def jsonable(value: object, depth: int = 0) -> Any:
    """
    ``value`` as what ``json.dumps`` writes without a ``default``: JSON's own types,
    the rest converted as the module docstring says.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, (_NamedConstant, enum.Enum)):
        return value.name
    if isinstance(value, Failure):
        return _failure(value)
    if depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            return {_text(k): jsonable(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [jsonable(v, depth + 1) for v in value]
    return _text(value)


def _failure(failure: Failure) -> dict[str, str]:
    """A failure's exception type (qualified name), message and traceback."""
    try:
        traceback = failure.getTraceback()
    except Exception:
        traceback = ""
    return {
        "type": _text(qual(failure.type)) if isinstance(failure.type, type) else "",
        "message": _text(failure.getErrorMessage()),
        "traceback": traceback,
    }


def _time(event: Mapping[str, Any]) -> str:
    """The event's ``log_time`` as ``2026-05-09T07:35:25.123Z``."""
    seconds = event.get("log_time")
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        import time

        seconds = time.time()
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


def _document(event: Mapping[str, Any]) -> dict[str, Any]:
    level = event.get("log_level")
    document: dict[str, Any] = {
        "time": _time(event),
        "level": level.name if isinstance(level, _NamedConstant) else "info",
        "namespace": _text(event.get("log_namespace", "")),
    }
    if "log_system" in event:
        document["system"] = _text(event["log_system"])
    message = formatEvent(dict(event))
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        document["message"] = message or _text(failure.getErrorMessage())
        document["failure"] = _failure(failure)
    else:
        document["message"] = message
    legacy = "isError" in event and "message" in event
    for name, value in event.items():
        if not isinstance(name, str) or name.startswith("log_"):
            continue
        if legacy and name in _LEGACY_KEYS:
            continue
        document[name + "_" if name in RESERVED else name] = jsonable(value)
    return document


def event_as_json(event: Mapping[str, Any]) -> str:
    """
    One log event as one line of JSON (no newline; see the module docstring for
    the keys).  Never raises: an event that cannot be written becomes an ``error``
    line that says why.
    """
    try:
        return json.dumps(_document(event), ensure_ascii=True, allow_nan=False)
    except Exception as e:  # a str() that raises inside a container, say
        return json.dumps(
            {
                "time": _time({}),
                "level": LogLevel.error.name,
                "namespace": __name__,
                "message": "a log event could not be written as JSON: %s" % _text(e),
                "event": "log_event_unwritable",
            },
            ensure_ascii=True,
        )


@implementer(ILogObserver)
class JSONLineObserver:
    """
    Writes each event to ``out`` as one line of :func:`event_as_json` and flushes;
    a lock keeps lines whole when threads log.

    :param out: a text file (standard output).
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def __call__(self, event: Mapping[str, Any]) -> None:
        """Write ``event``."""
        line = event_as_json(event) + "\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()


def json_observer() -> ILogObserver:
    """
    The observer for ``twistd --logger loghandler.logs.json_observer``: JSON lines
    on standard output (the one twistd's process has when it starts logging, before
    it redirects ``sys.stdout`` into the log).
    """
    out = sys.stdout
    if isinstance(out, LoggingFile) and sys.__stdout__ is not None:
        out = sys.__stdout__  # called after twistd redirected it: the real one
    return JSONLineObserver(out)
