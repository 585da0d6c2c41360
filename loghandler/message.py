"""
Request body bytes to a validated :class:`Message`, or a :class:`Rejection`; and a
message to its canonical NDJSON line.  Pure: no I/O, the time is passed in.

The rules are DESIGN.md section 1.  A body is one JSON object (RFC 8259) in UTF-8 with
exactly the fields ``text`` (non-empty string), ``content_id`` (integer 1 to
1,000,000,000), ``client_id`` (integer 1 to the configured maximum) and ``timestamp``
(integer, Unix epoch milliseconds, within the accepted window).  ``true``, ``3.0``,
``1e3``, ``"3"`` and ``null`` are not integers.
"""

from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple, NoReturn, Optional

import attrs

MAX_CONTENT_ID = 1_000_000_000
FIELDS = ("text", "content_id", "client_id", "timestamp")
_FIELD_SET = frozenset(FIELDS)
#: A str as a JSON string, non-ASCII kept (what ``JSONEncoder(ensure_ascii=False)``
#: calls for a str, without its Python-level dispatch).
_encode_string: Callable[[str], str] = json.encoder.encode_basestring


@attrs.frozen
class Limits:
    """
    What a message may hold.

    :ivar max_client_id: the largest accepted ``client_id``.
    :ivar max_age_ms: how far before now a timestamp may lie, in ms.
    :ivar max_ahead_ms: how far after now a timestamp may lie, in ms.
    """

    max_client_id: int = 10
    max_age_ms: int = 7 * 24 * 3600 * 1000
    max_ahead_ms: int = 3600 * 1000


class Message(NamedTuple):
    """
    One accepted log message (a named tuple: made for every request, it costs a
    third of a frozen attrs class to build).

    :ivar text: the message text, a non-empty ``str`` without lone surrogates.
    :ivar content_id: 1 to 1,000,000,000.
    :ivar client_id: 1 to the configured maximum.
    :ivar timestamp: Unix epoch milliseconds.
    """

    text: str
    content_id: int
    client_id: int
    timestamp: int

    def to_line(self) -> bytes:
        """
        The canonical NDJSON line: compact JSON with the four fields in the order
        ``text, content_id, client_id, timestamp``, non-ASCII as raw UTF-8 (only what
        JSON requires is escaped), ending in ``\\n``.
        """
        return (
            '{"text":%s,"content_id":%d,"client_id":%d,"timestamp":%d}\n'
            % (_encode_string(self.text), self.content_id, self.client_id, self.timestamp)
        ).encode("utf-8")


@attrs.frozen
class Rejection(Exception):
    """
    Why a request was refused.

    :ivar status: the HTTP status: 400, or 413 for a body over the size limit.
    :ivar error: a human-readable reason.
    :ivar field: the offending field's name, or None when the body as a whole is wrong.
    """

    status: int
    error: str
    field: Optional[str] = None

    def to_json(self) -> bytes:
        """The response body: ``{"error": "...", "field": "..." or null}``."""
        return json.dumps({"error": self.error, "field": self.field}).encode("ascii")


class _Float:
    """A JSON number with a fraction or exponent: never an integer here."""

    __slots__ = ()


_FLOAT = _Float()


def _reject(error: str, field: Optional[str] = None) -> NoReturn:
    raise Rejection(400, error, field)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            _reject("duplicate field", _shorten(name))
        result[name] = value
    return result


def _constant(name: str) -> NoReturn:
    _reject(f"body is not valid JSON: {name} is not a JSON value")


def _shorten(name: str) -> str:
    name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return name if len(name) <= 64 else name[:61] + "..."


_decode = json.JSONDecoder(
    object_pairs_hook=_pairs, parse_float=lambda _: _FLOAT, parse_constant=_constant
).decode


def _integer(document: dict[str, Any], field: str, low: int, high: int) -> int:
    value = document[field]
    if type(value) is not int:
        _reject(f"{field} must be an integer", field)
    if not low <= value <= high:
        _reject(f"{field} must be from {low} to {high}", field)
    return value


def parse_message(body: bytes, now_ms: int, limits: Limits) -> Message:
    """
    Validate one request body.

    :param body: the raw request body (already within the size limit).
    :param now_ms: the server's clock, Unix epoch milliseconds.
    :param limits: the accepted ranges.
    :returns: the message.
    :raises Rejection: with status 400 and the reason, for any body that breaks a rule.
    """
    try:
        source = body.decode("utf-8")
    except UnicodeDecodeError:
        _reject("body is not valid UTF-8")
    if not source.strip():
        _reject("body is empty")
    try:
        document = _decode(source)
    except Rejection:
        raise
    except RecursionError:
        _reject("body is not valid JSON: nested too deeply")
    except json.JSONDecodeError as e:
        if source.startswith("\ufeff"):
            _reject("body starts with a UTF-8 byte order mark (EF BB BF); send the JSON without it")
        _reject(f"body is not valid JSON: {e}")
    except ValueError:
        # int() refuses integers of over 4300 digits (sys.get_int_max_str_digits()).
        _reject("body is not valid JSON: integer too long")
    if type(document) is not dict:
        _reject("body must be a JSON object")
    if len(document) != 4 or not _FIELD_SET.issuperset(document):
        for name in document:
            if name not in _FIELD_SET:
                _reject("unknown field", _shorten(name))
        for name in FIELDS:
            if name not in document:
                _reject("missing field", name)
    text = document["text"]
    if type(text) is not str:
        _reject("text must be a string", "text")
    if not text:
        _reject("text must not be empty", "text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        _reject("text must not contain lone surrogates", "text")
    content_id = _integer(document, "content_id", 1, MAX_CONTENT_ID)
    client_id = _integer(document, "client_id", 1, limits.max_client_id)
    timestamp = document["timestamp"]
    if type(timestamp) is not int:
        _reject("timestamp must be an integer (Unix epoch milliseconds)", "timestamp")
    if not now_ms - limits.max_age_ms <= timestamp <= now_ms + limits.max_ahead_ms:
        _reject(
            "timestamp is outside the accepted window (%s back, %s ahead)"
            % (_duration(limits.max_age_ms), _duration(limits.max_ahead_ms)),
            "timestamp",
        )
    return Message(text, content_id, client_id, timestamp)


def _duration(ms: int) -> str:
    """``604800000`` -> ``7 days``, ``3600000`` -> ``1 hour``, ``5400000`` -> ``90 minutes``."""
    for unit, size in (("day", 86_400_000), ("hour", 3_600_000), ("minute", 60_000)):
        if ms % size == 0:
            count = ms // size
            return "%d %s%s" % (count, unit, "" if count == 1 else "s")
    return "%g seconds" % (ms / 1000)


def too_large(limit: int) -> Rejection:
    """The 413 rejection for a message body over ``limit`` bytes (``MAX_BODY_BYTES``)."""
    return Rejection(413, f"body is larger than {limit} bytes (MAX_BODY_BYTES)")


def batch_too_large(limit: int) -> Rejection:
    """The 413 rejection for a batch body over ``limit`` bytes (``BATCH_MAX_BYTES``)."""
    return Rejection(413, f"batch body is larger than {limit} bytes (BATCH_MAX_BYTES)")
