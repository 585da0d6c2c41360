"""
Tests for :mod:`loghandler.message`: request bodies become a validated ``Message``
or a ``Rejection`` carrying the exact status, error text and field (DESIGN.md
section 1), and an accepted message becomes one canonical NDJSON line.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from loghandler.message import (
    FIELDS,
    MAX_CONTENT_ID,
    Limits,
    Message,
    Rejection,
    parse_message,
    too_large,
)

#: The server clock used throughout: 2020-03-30T00:00:00.000Z.
NOW = 1_585_526_400_000
LIMITS = Limits()
MAX_AGE = LIMITS.max_age_ms
MAX_AHEAD = LIMITS.max_ahead_ms

_SETTINGS = settings(database=None, deadline=None, max_examples=300)

_NOT_INT = {
    "content_id": "content_id must be an integer",
    "client_id": "client_id must be an integer",
    "timestamp": "timestamp must be an integer (Unix epoch milliseconds)",
}
_WINDOW = "timestamp is outside the accepted window (7 days back, 1 hour ahead)"


def body(**fields: Any) -> bytes:
    """
    A body whose fields default to a valid message; a field given as a ``bytes``
    value is inserted as raw JSON text, any other value is ``json.dumps``-ed.
    """
    values: dict[str, Any] = {"text": "hi", "content_id": 7, "client_id": 3, "timestamp": NOW}
    values.update(fields)
    parts = []
    for name, value in values.items():
        raw = value if isinstance(value, bytes) else json.dumps(value).encode("ascii")
        parts.append(b'"' + name.encode("ascii") + b'":' + raw)
    return b"{" + b",".join(parts) + b"}"


def without(name: str) -> bytes:
    """A valid body with the field ``name`` left out."""
    values: dict[str, Any] = {"text": "hi", "content_id": 7, "client_id": 3, "timestamp": NOW}
    del values[name]
    return json.dumps(values).encode("ascii")


def _json_error(reason: str) -> tuple[int, str, None]:
    return (400, "body is not valid JSON: " + reason, None)


_INVALID_UTF8 = (400, "body is not valid UTF-8", None)
_NOT_OBJECT = (400, "body must be a JSON object", None)
_EMPTY = (400, "body is empty", None)

#: (name, body, (status, error, field)) for bodies that must be refused.
BAD_BODIES: list[tuple[str, bytes, tuple[int, str, Optional[str]]]] = [
    ("empty", b"", _EMPTY),
    ("spaces_only", b"   ", _EMPTY),
    ("json_whitespace_only", b" \r\n\t ", _EMPTY),
    ("lone_continuation_byte", body(text=b'"a\x80b"'), _INVALID_UTF8),
    ("overlong_slash", body(text=b'"\xc0\xaf"'), _INVALID_UTF8),
    ("overlong_nul", body(text=b'"\xe0\x80\x80"'), _INVALID_UTF8),
    ("truncated_sequence", body(text=b'"\xe4\xb8"'), _INVALID_UTF8),
    ("truncated_at_end", body()[:-1] + b"\xf0\x9f\x98", _INVALID_UTF8),
    ("cesu8_surrogate", body(text=b'"\xed\xa0\x80"'), _INVALID_UTF8),
    ("cesu8_surrogate_pair", body(text=b'"\xed\xa0\xbd\xed\xb8\x80"'), _INVALID_UTF8),
    ("byte_ff", body(text=b'"\xff"'), _INVALID_UTF8),
    ("utf16_le_bom", body().decode("ascii").encode("utf-16"), _INVALID_UTF8),
    ("utf16_be_bom", b"\xfe\xff" + body().decode("ascii").encode("utf-16-be"), _INVALID_UTF8),
    (
        "utf8_bom",
        b"\xef\xbb\xbf" + body(),
        (400, "body starts with a UTF-8 byte order mark (EF BB BF); send the JSON without it", None),
    ),
    ("not_json", b"hello", _json_error("Expecting value")),
    ("truncated_object", body()[:-1], _json_error("Expecting ',' delimiter")),
    ("single_quotes", b"{'text': 'a'}", _json_error("Expecting property name enclosed in double quotes")),
    ("trailing_garbage", body() + b" x", _json_error("Extra data")),
    ("two_objects", body() + body(), _json_error("Extra data")),
    ("two_objects_ndjson", body() + b"\n" + body(), _json_error("Extra data")),
    ("top_level_array", b"[" + body() + b"]", _NOT_OBJECT),
    ("top_level_empty_array", b"[]", _NOT_OBJECT),
    ("top_level_string", b'"hi"', _NOT_OBJECT),
    ("top_level_number", b"42", _NOT_OBJECT),
    ("top_level_null", b"null", _NOT_OBJECT),
    ("top_level_true", b"true", _NOT_OBJECT),
    ("top_level_nan", b"NaN", _json_error("NaN is not a JSON value")),
    ("nan_field", body(timestamp=b"NaN"), _json_error("NaN is not a JSON value")),
    ("infinity_field", body(content_id=b"Infinity"), _json_error("Infinity is not a JSON value")),
    ("minus_infinity_field", body(client_id=b"-Infinity"), _json_error("-Infinity is not a JSON value")),
    (
        "duplicate_valid_field",
        body()[:-1] + b',"client_id":3}',
        (400, "duplicate field", "client_id"),
    ),
    (
        "duplicate_text",
        b'{"text":"a","text":"b","content_id":7,"client_id":3,"timestamp":%d}' % NOW,
        (400, "duplicate field", "text"),
    ),
    ("duplicate_unknown_field", b'{"x":1,"x":2}', (400, "duplicate field", "x")),
    ("unknown_field", body(extra=1), (400, "unknown field", "extra")),
    ("unknown_field_only", b'{"Text":"hi"}', (400, "unknown field", "Text")),
    (
        "unknown_field_long_name",
        body(**{"y" * 100: 1}),
        (400, "unknown field", "y" * 61 + "..."),
    ),
    ("empty_object", b"{}", (400, "missing field", "text")),
    ("missing_text", without("text"), (400, "missing field", "text")),
    ("missing_content_id", without("content_id"), (400, "missing field", "content_id")),
    ("missing_client_id", without("client_id"), (400, "missing field", "client_id")),
    ("missing_timestamp", without("timestamp"), (400, "missing field", "timestamp")),
    ("text_number", body(text=5), (400, "text must be a string", "text")),
    ("text_null", body(text=None), (400, "text must be a string", "text")),
    ("text_list", body(text=["a"]), (400, "text must be a string", "text")),
    ("text_object", body(text={"a": "b"}), (400, "text must be a string", "text")),
    ("text_true", body(text=True), (400, "text must be a string", "text")),
    ("text_false", body(text=False), (400, "text must be a string", "text")),
    ("text_empty", body(text=""), (400, "text must not be empty", "text")),
    ("text_lone_high_surrogate", body(text=b'"\\ud800"'), (400, "text must not contain lone surrogates", "text")),
    ("text_lone_low_surrogate", body(text=b'"\\udfff"'), (400, "text must not contain lone surrogates", "text")),
    (
        "text_high_surrogate_then_letter",
        body(text=b'"\\ud83dA"'),
        (400, "text must not contain lone surrogates", "text"),
    ),
    (
        "text_high_surrogate_then_escaped_letter",
        body(text=b'"\\ud83d\\u0041"'),
        (400, "text must not contain lone surrogates", "text"),
    ),
    (
        "text_swapped_surrogate_pair",
        body(text=b'"\\ude00\\ud83d"'),
        (400, "text must not contain lone surrogates", "text"),
    ),
    ("text_raw_newline", body(text=b'"a\nb"'), _json_error("Invalid control character at")),
    ("text_raw_nul", body(text=b'"a\x00b"'), _json_error("Invalid control character at")),
    ("text_raw_tab", body(text=b'"a\tb"'), _json_error("Invalid control character at")),
    ("text_bad_escape", body(text=b'"\\x41"'), _json_error("Invalid \\escape")),
    (
        "content_id_over_4300_digits",
        body(content_id=b"1" * 4301),
        _json_error("integer too long"),
    ),
    ("nested_arrays_100000", b"[" * 100_000, _json_error("nested too deeply")),
    ("nested_objects_100000", b'{"a":' * 100_000, _json_error("nested too deeply")),
    ("nested_arrays_in_text", body(text=b"[" * 100_000 + b"]" * 100_000), _json_error("nested too deeply")),
    (
        "content_id_zero",
        body(content_id=0),
        (400, "content_id must be from 1 to 1000000000", "content_id"),
    ),
    (
        "content_id_negative",
        body(content_id=-1),
        (400, "content_id must be from 1 to 1000000000", "content_id"),
    ),
    (
        "content_id_minus_zero",
        body(content_id=b"-0"),
        (400, "content_id must be from 1 to 1000000000", "content_id"),
    ),
    (
        "content_id_too_large",
        body(content_id=MAX_CONTENT_ID + 1),
        (400, "content_id must be from 1 to 1000000000", "content_id"),
    ),
    (
        "content_id_400_digits",
        body(content_id=b"9" * 400),
        (400, "content_id must be from 1 to 1000000000", "content_id"),
    ),
    ("client_id_zero", body(client_id=0), (400, "client_id must be from 1 to 10", "client_id")),
    ("client_id_eleven", body(client_id=11), (400, "client_id must be from 1 to 10", "client_id")),
    ("client_id_negative", body(client_id=-3), (400, "client_id must be from 1 to 10", "client_id")),
    ("timestamp_too_old", body(timestamp=NOW - MAX_AGE - 1), (400, _WINDOW, "timestamp")),
    ("timestamp_too_far_ahead", body(timestamp=NOW + MAX_AHEAD + 1), (400, _WINDOW, "timestamp")),
    ("timestamp_negative", body(timestamp=-1), (400, _WINDOW, "timestamp")),
    ("timestamp_zero", body(timestamp=0), (400, _WINDOW, "timestamp")),
    ("timestamp_in_seconds", body(timestamp=NOW // 1000), (400, _WINDOW, "timestamp")),
    ("timestamp_400_digits", body(timestamp=b"9" * 400), (400, _WINDOW, "timestamp")),
    ("timestamp_float", body(timestamp=b"%d.5" % NOW), (400, _NOT_INT["timestamp"], "timestamp")),
]

# Each integer field given as a JSON value that is not an integer.
for _field in ("content_id", "client_id", "timestamp"):
    for _label, _raw in [
        ("true", b"true"),
        ("false", b"false"),
        ("float_3_0", b"3.0"),
        ("exponent_1e3", b"1e3"),
        ("exponent_1E3", b"1E3"),
        ("string_3", b'"3"'),
        ("null", b"null"),
        ("empty_list", b"[]"),
        ("empty_object", b"{}"),
    ]:
        BAD_BODIES.append(
            ("%s_%s" % (_field, _label), body(**{_field: _raw}), (400, _NOT_INT[_field], _field))
        )


def _make_bad_body_test(
    name: str, raw: bytes, expected: tuple[int, str, Optional[str]]
) -> Callable[[Any], None]:
    def test(self: "BadBodyTests") -> None:
        self.assertRejected(raw, expected)

    test.__name__ = "test_" + name
    test.__doc__ = "The body case %r is refused with exactly %r." % (name, expected)
    return test


class BadBodyTests(SynchronousTestCase):
    """
    Every body in ``BAD_BODIES`` is refused with the exact status, error text and
    field listed beside it; no other exception escapes ``parse_message``.
    """

    def assertRejected(self, raw: bytes, expected: tuple[int, str, Optional[str]]) -> None:
        """``parse_message(raw)`` raises a Rejection equal, field by field, to ``expected``."""
        try:
            result = parse_message(raw, NOW, LIMITS)
        except Rejection as e:
            if expected[1].startswith(_json_error("")[1]) and e.error != expected[1]:
                # JSON syntax errors end with the position json reports; PyPy's json
                # also names the character ("Invalid control character '\\n' at",
                # "Invalid \\escape: 'x'").
                text = expected[1]
                if text.endswith(" at"):
                    pattern = re.escape(text[:-3]) + r"(?: '[^']+')? at"
                else:
                    pattern = re.escape(text) + r"(?:: '[^']+')?"
                self.assertRegex(
                    e.error, "^" + pattern + r": line \d+ column \d+ \(char \d+\)$"
                )
                self.assertEqual((e.status, e.field), (expected[0], expected[2]))
            else:
                self.assertEqual((e.status, e.error, e.field), expected)
        else:
            self.fail("accepted %r as %r" % (raw[:80], result))

    def test_table_is_large_and_names_unique(self) -> None:
        """The table has at least 45 cases and no two share a name."""
        names = [name for name, _, _ in BAD_BODIES]
        self.assertGreaterEqual(len(names), 45)
        self.assertEqual(len(names), len(set(names)))


for _name, _raw_body, _expected in BAD_BODIES:
    setattr(BadBodyTests, "test_" + _name, _make_bad_body_test(_name, _raw_body, _expected))


class GoodBodyTests(SynchronousTestCase):
    """Accepted bodies become the exact canonical NDJSON line."""

    def line(self, raw: bytes, limits: Limits = LIMITS, now: int = NOW) -> bytes:
        """The canonical line of an accepted body."""
        message = parse_message(raw, now, limits)
        self.assertIsInstance(message, Message)
        return message.to_line()

    def test_fields_and_values(self) -> None:
        """A valid body gives a Message holding exactly its four values."""
        self.assertEqual(
            parse_message(body(text="hello"), NOW, LIMITS),
            Message("hello", 7, 3, NOW),
        )

    def test_field_order_canonical(self) -> None:
        """Whatever the input order, the line lists text, content_id, client_id, timestamp."""
        raw = b'{"timestamp":%d,"client_id":2,"content_id":7,"text":"hello"}' % NOW
        self.assertEqual(
            self.line(raw),
            b'{"text":"hello","content_id":7,"client_id":2,"timestamp":%d}\n' % NOW,
        )

    def test_pretty_printed_gives_one_compact_line(self) -> None:
        """An indented, multi-line body becomes one compact line without spaces."""
        raw = (
            b'{\n    "client_id": 2,\n    "text": "a b",\n'
            b'    "content_id": 1000000000,\n    "timestamp": %d\n}\n' % NOW
        )
        self.assertEqual(
            self.line(raw),
            b'{"text":"a b","content_id":1000000000,"client_id":2,"timestamp":%d}\n' % NOW,
        )

    def test_surrounding_whitespace_accepted(self) -> None:
        """JSON whitespace before and after the object is allowed."""
        self.assertEqual(
            self.line(b" \r\n\t" + body(text="x") + b"\r\n "),
            b'{"text":"x","content_id":7,"client_id":3,"timestamp":%d}\n' % NOW,
        )

    def test_non_ascii_raw_utf8(self) -> None:
        """é and 中文, escaped or raw in the body, are stored as raw UTF-8."""
        expected = b'{"text":"\xc3\xa9 \xe4\xb8\xad\xe6\x96\x87","content_id":7,"client_id":3,"timestamp":%d}\n' % NOW
        self.assertEqual(self.line(body(text=b'"\\u00e9 \\u4e2d\\u6587"')), expected)
        self.assertEqual(self.line(body(text=b'"' + "é 中文".encode("utf-8") + b'"')), expected)

    def test_emoji_surrogate_pair_escape(self) -> None:
        """The escape pair \\ud83d\\ude00 becomes the raw 4-byte UTF-8 of U+1F600."""
        self.assertEqual(
            self.line(body(text=b'"\\ud83d\\ude00"')),
            b'{"text":"\xf0\x9f\x98\x80","content_id":7,"client_id":3,"timestamp":%d}\n' % NOW,
        )

    def test_raw_emoji(self) -> None:
        """A raw 4-byte UTF-8 emoji is kept as it is."""
        self.assertEqual(
            self.line(body(text=b'"\xf0\x9f\x98\x80"')),
            b'{"text":"\xf0\x9f\x98\x80","content_id":7,"client_id":3,"timestamp":%d}\n' % NOW,
        )

    def test_only_required_escapes(self) -> None:
        """
        Quote, backslash and control characters are escaped (\\n, \\r, \\t, \\b, \\f or
        \\u00XX); DEL and everything else stays raw.
        """
        text = 'a"b\\c\nd\re\tf\x08g\x0ch\x00i\x01j\x1fk\x7fl'
        self.assertEqual(
            self.line(body(text=text)),
            b'{"text":"a\\"b\\\\c\\nd\\re\\tf\\bg\\fh\\u0000i\\u0001j\\u001fk\x7fl",'
            b'"content_id":7,"client_id":3,"timestamp":%d}\n' % NOW,
        )

    def test_line_separator_raw(self) -> None:
        """U+2028 and U+2029 stay raw UTF-8; they are not newlines in NDJSON."""
        self.assertEqual(
            self.line(body(text=b'"a\\u2028b\\u2029c"')),
            b'{"text":"a\xe2\x80\xa8b\xe2\x80\xa9c","content_id":7,"client_id":3,"timestamp":%d}\n' % NOW,
        )

    def test_slash_not_escaped(self) -> None:
        """Both "/" and "\\/" in the body are stored as a plain "/"."""
        self.assertEqual(
            self.line(body(text=b'"a/b\\/c"')),
            b'{"text":"a/b/c","content_id":7,"client_id":3,"timestamp":%d}\n' % NOW,
        )

    def test_integer_edges(self) -> None:
        """content_id 1 and 1,000,000,000 and client_id 1 and 10 are accepted."""
        self.assertEqual(
            self.line(body(content_id=1, client_id=1)),
            b'{"text":"hi","content_id":1,"client_id":1,"timestamp":%d}\n' % NOW,
        )
        self.assertEqual(
            self.line(body(content_id=MAX_CONTENT_ID, client_id=10)),
            b'{"text":"hi","content_id":1000000000,"client_id":10,"timestamp":%d}\n' % NOW,
        )

    def test_window_oldest_edge_inclusive(self) -> None:
        """A timestamp exactly max_age before now is accepted; 1 ms older is not."""
        oldest = NOW - MAX_AGE
        self.assertEqual(parse_message(body(timestamp=oldest), NOW, LIMITS).timestamp, oldest)
        with self.assertRaises(Rejection) as raised:
            parse_message(body(timestamp=oldest - 1), NOW, LIMITS)
        self.assertEqual((raised.exception.status, raised.exception.field), (400, "timestamp"))

    def test_window_newest_edge_inclusive(self) -> None:
        """A timestamp exactly max_ahead after now is accepted; 1 ms later is not."""
        newest = NOW + MAX_AHEAD
        self.assertEqual(parse_message(body(timestamp=newest), NOW, LIMITS).timestamp, newest)
        with self.assertRaises(Rejection) as raised:
            parse_message(body(timestamp=newest + 1), NOW, LIMITS)
        self.assertEqual((raised.exception.status, raised.exception.field), (400, "timestamp"))

    def test_window_follows_now_and_limits(self) -> None:
        """The window is relative to now_ms and sized by the limits, with their hours in the error."""
        limits = Limits(max_age_ms=5_400_000, max_ahead_ms=1_800_000)
        now = NOW + 123
        self.assertEqual(
            parse_message(body(timestamp=now - 5_400_000), now, limits).timestamp,
            now - 5_400_000,
        )
        self.assertEqual(
            parse_message(body(timestamp=now + 1_800_000), now, limits).timestamp,
            now + 1_800_000,
        )
        for outside in (now - 5_400_001, now + 1_800_001):
            with self.assertRaises(Rejection) as raised:
                parse_message(body(timestamp=outside), now, limits)
            self.assertEqual(
                (raised.exception.status, raised.exception.error, raised.exception.field),
                (
                    400,
                    "timestamp is outside the accepted window (90 minutes back, 30 minutes ahead)",
                    "timestamp",
                ),
            )

    def test_max_client_id_limit(self) -> None:
        """Limits(max_client_id=...) moves the upper bound both ways."""
        self.assertEqual(
            parse_message(body(client_id=3), NOW, Limits(max_client_id=3)).client_id, 3
        )
        with self.assertRaises(Rejection) as raised:
            parse_message(body(client_id=4), NOW, Limits(max_client_id=3))
        self.assertEqual(
            (raised.exception.status, raised.exception.error, raised.exception.field),
            (400, "client_id must be from 1 to 3", "client_id"),
        )
        self.assertEqual(
            parse_message(body(client_id=500), NOW, Limits(max_client_id=500)).client_id, 500
        )


class RejectionTests(SynchronousTestCase):
    """The rejection values and their response bodies."""

    def test_to_json_with_field(self) -> None:
        """to_json is a JSON object with exactly the keys error and field."""
        rejection = Rejection(400, 'client_id must be "ok" \u00e9', "client_id")
        self.assertEqual(
            json.loads(rejection.to_json()),
            {"error": 'client_id must be "ok" \u00e9', "field": "client_id"},
        )

    def test_to_json_without_field(self) -> None:
        """A body-wide rejection gives field null."""
        self.assertEqual(
            json.loads(Rejection(400, "body is empty").to_json()),
            {"error": "body is empty", "field": None},
        )

    def test_to_json_of_parsed_rejection(self) -> None:
        """A rejection from parse_message serializes to its error and field."""
        with self.assertRaises(Rejection) as raised:
            parse_message(body(extra="x"), NOW, LIMITS)
        self.assertEqual(
            json.loads(raised.exception.to_json()), {"error": "unknown field", "field": "extra"}
        )

    def test_too_large(self) -> None:
        """too_large(65536) is a 413 naming the limit and MAX_BODY_BYTES, with no field."""
        rejection = too_large(65536)
        self.assertEqual(
            (rejection.status, rejection.error, rejection.field),
            (413, "body is larger than 65536 bytes (MAX_BODY_BYTES)", None),
        )
        self.assertEqual(
            json.loads(rejection.to_json()),
            {"error": "body is larger than 65536 bytes (MAX_BODY_BYTES)", "field": None},
        )


def _check_line(case: SynchronousTestCase, message: Message) -> list[tuple[str, Any]]:
    """
    Assert the canonical-line invariants for ``message`` and return the line's
    (name, value) pairs in order.
    """
    line = message.to_line()
    text = line.decode("utf-8")
    case.assertTrue(line.endswith(b"\n"))
    case.assertEqual(line.count(b"\n"), 1)
    pairs = json.loads(text, object_pairs_hook=list)
    case.assertEqual(
        pairs,
        [
            ("text", message.text),
            ("content_id", message.content_id),
            ("client_id", message.client_id),
            ("timestamp", message.timestamp),
        ],
    )
    compact = json.dumps(dict(pairs), ensure_ascii=False, separators=(",", ":")) + "\n"
    case.assertEqual(text, compact)
    return pairs


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_non_int_values = _json_values.filter(lambda v: type(v) is not int)
_non_str_values = _json_values.filter(lambda v: type(v) is not str)


@st.composite
def _near_messages(draw: st.DrawFn) -> bytes:
    """JSON objects close to a message: usually the right names, values of any kind."""
    names = draw(
        st.lists(
            st.one_of(st.sampled_from(FIELDS), st.text(max_size=4)), max_size=6, unique=True
        )
    )
    document: dict[str, Any] = {}
    for name in names:
        document[name] = draw(
            st.one_of(
                _json_values,
                st.integers(min_value=NOW - MAX_AGE - 2, max_value=NOW + MAX_AHEAD + 2),
                st.integers(min_value=-1, max_value=12),
            )
        )
    return json.dumps(document, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@st.composite
def _valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """The four fields of a valid message, as a dict in canonical order."""
    return {
        "text": draw(st.text(min_size=1).filter(_encodable)),
        "content_id": draw(st.integers(min_value=1, max_value=MAX_CONTENT_ID)),
        "client_id": draw(st.integers(min_value=1, max_value=LIMITS.max_client_id)),
        "timestamp": draw(st.integers(min_value=NOW - MAX_AGE, max_value=NOW + MAX_AHEAD)),
    }


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dumps(draw: st.DrawFn, document: dict[str, Any]) -> bytes:
    """``document`` serialized with a random key order, indentation and ensure_ascii."""
    order = draw(st.permutations(list(document)))
    shuffled = {name: document[name] for name in order}
    indent = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=4), st.just("\t")))
    ensure_ascii = draw(st.booleans())
    return json.dumps(shuffled, indent=indent, ensure_ascii=ensure_ascii).encode("utf-8")


class PropertyTests(SynchronousTestCase):
    """Properties over generated bodies."""

    def _line_or_400(self, raw: bytes) -> Optional[Message]:
        try:
            message = parse_message(raw, NOW, LIMITS)
        except Rejection as e:
            self.assertEqual(e.status, 400)
            self.assertIsInstance(e.error, str)
            self.assertTrue(e.error)
            json.loads(e.to_json())
            return None
        _check_line(self, message)
        return message

    @_SETTINGS
    @given(st.binary(max_size=512))
    def test_any_bytes_line_or_400(self, raw: bytes) -> None:
        """
        Any bytes give either a Message whose line is one valid UTF-8 JSON line with the
        four fields in order, or a 400 Rejection; nothing else is raised.
        """
        self._line_or_400(raw)

    @_SETTINGS
    @given(_near_messages())
    def test_near_messages_line_or_400(self, raw: bytes) -> None:
        """
        JSON objects with message-like field names and arbitrary values give either a
        valid canonical line or a 400 Rejection; nothing else is raised.
        """
        self._line_or_400(raw)

    @_SETTINGS
    @given(st.data())
    def test_valid_roundtrip(self, data: st.DataObject) -> None:
        """
        A valid message serialized with any key order, indentation and ensure_ascii
        parses, and its canonical line loads back to the same four values in order.
        """
        document = data.draw(_valid_documents())
        raw = _dumps(data.draw, document)
        message = parse_message(raw, NOW, LIMITS)
        pairs = _check_line(self, message)
        self.assertEqual(pairs, list(document.items()))

    @_SETTINGS
    @given(st.data())
    def test_wrong_type_names_field(self, data: st.DataObject) -> None:
        """
        A valid body with one field replaced by a JSON value of the wrong type is a 400
        naming that field with its type error.
        """
        document = data.draw(_valid_documents())
        field = data.draw(st.sampled_from(FIELDS))
        if field == "text":
            document[field] = data.draw(_non_str_values)
            expected = (400, "text must be a string", "text")
        else:
            document[field] = data.draw(_non_int_values)
            expected = (400, _NOT_INT[field], field)
        raw = json.dumps(document).encode("ascii")
        with self.assertRaises(Rejection) as raised:
            parse_message(raw, NOW, LIMITS)
        self.assertEqual(
            (raised.exception.status, raised.exception.error, raised.exception.field), expected
        )
