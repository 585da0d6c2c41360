"""
Tests for :mod:`loghandler.auth`: the tokens file's format and its errors (which
never quote a token), the bearer check, reloads (SIGHUP, a change on disk, a
Kubernetes-style symlink swap, a broken file that keeps the old credentials), and
``POST /log`` through ``StubTreq`` with ``AUTH_TOKENS_FILE``: a table of cases with
status, ``WWW-Authenticate`` and body, and every log event free of the tokens.
"""

from __future__ import annotations

import hashlib
import os
import signal
from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from loghandler.admin import add_probes, local_probes
from loghandler.auth import (
    POLL_INTERVAL_S,
    Credential,
    Refusal,
    TokenFile,
    authenticate,
    parse_tokens,
    reload_on_sighup,
)
from loghandler.config import ConfigError, from_environ
from loghandler.metrics import Metrics
from tests.test_web import NDJSON, WebCase, body

#: Tokens of the tests: client 3's, every client's, client 5's (in the file only as
#: its SHA-256), and one that a rotation brings in.
CLIENT_3 = "client3-token-0123456789abcdef"
EVERY = "every-client-token-0123456789ab"
HASHED = "hashed-token-for-client-5-xyz012"
ROTATED = "rotated-token-client-3-abcdef01"
UNKNOWN = "unknown-token-0123456789abcdefg"
TOKENS = (CLIENT_3, EVERY, HASHED, ROTATED, UNKNOWN)

FILE = """\
# token                                  client IDs
%s  3
%s  *
sha256:%s  5,6
""" % (CLIENT_3, EVERY, hashlib.sha256(HASHED.encode()).hexdigest())

ROTATED_FILE = "%s 3\n%s *\n" % (ROTATED, EVERY)

NO_TOKEN = 'Bearer realm="loghandler"'
INVALID = 'Bearer realm="loghandler", error="invalid_token"'
SCOPE = 'Bearer realm="loghandler", error="insufficient_scope"'


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class ParseTests(SynchronousTestCase):
    """The file's format."""

    def test_credentials(self) -> None:
        """Plain and sha256: tokens, comma-separated IDs and *, comments and blank lines."""
        credentials = parse_tokens(FILE + "\n   \n# end\n")
        self.assertEqual(
            credentials,
            (
                Credential(digest(CLIENT_3), frozenset({3}), 2),
                Credential(digest(EVERY), None, 3),
                Credential(digest(HASHED), frozenset({5, 6}), 4),
            ),
        )
        self.assertTrue(credentials[1].allows(999))
        self.assertFalse(credentials[2].allows(3))

    def test_errors_name_the_line_never_the_token(self) -> None:
        """Each mistake is one message with its line number and without the line's text."""
        secret = "s3cret-token-value-0123456789"
        cases = [
            ("%s\n" % secret, "line 1: expected a token and its client IDs (3,4 or *), 1 fields"),
            (
                "%s 3 4\n" % secret,
                "line 1: expected a token and its client IDs (3,4 or *), 3 fields",
            ),
            ("# c\nshort-secret 3\n", "line 2: the token is shorter than 16 characters"),
            ("%s! 3\n" % secret, "line 1: a token is letters, digits and -._~+/ (then any =)"),
            ("sha256:%s 3\n" % secret, "line 1: sha256: must be followed by 64 hex digits"),
            (
                "%s 3,x\n" % secret,
                "line 1: client IDs are integers from 1 separated by commas, or *",
            ),
            ("%s 0\n" % secret, "line 1: client IDs are integers from 1 separated by commas, or *"),
            ("%s 3\n%s 4\n" % (secret, secret), "line 2: the same token as line 1"),
            (
                "%s 3\nsha256:%s 4\n" % (secret, hashlib.sha256(secret.encode()).hexdigest()),
                "line 2: the same token as line 1",
            ),
            ("# nothing\n\n", "holds no credential (a token and its client IDs a line)"),
        ]
        for text, message in cases:
            with self.assertRaises(ValueError) as caught:
                parse_tokens(text)
            self.assertEqual(str(caught.exception), message)
            self.assertNotIn("s3cret", str(caught.exception))


class AuthenticateTests(SynchronousTestCase):
    """The ``Authorization`` header against the credentials."""

    def setUp(self) -> None:
        self.credentials = parse_tokens(FILE)

    def check(self, values: Optional[list[bytes]]) -> Any:
        return authenticate(self.credentials, values)

    def test_bearer(self) -> None:
        """The scheme in any case; the credential of the token, hashed in the file or not."""
        self.assertEqual(self.check([b"Bearer " + CLIENT_3.encode()]).line, 2)
        self.assertEqual(self.check([b"bearer  " + EVERY.encode() + b" "]).line, 3)
        self.assertEqual(self.check([b"BEARER " + HASHED.encode()]).line, 4)

    def test_refusals(self) -> None:
        """No header or another scheme: no error code; a bad token: invalid_token."""
        no_token = Refusal("authentication required: send Authorization: Bearer <token>")
        invalid = Refusal("invalid token", "invalid_token")
        for values, refusal in [
            (None, no_token),
            ([], no_token),
            ([b"Basic dXNlcjpwYXNz"], no_token),
            ([b"Bearer"], invalid),
            ([b"Bearer " + UNKNOWN.encode()], invalid),
            ([b"Bearer " + CLIENT_3.encode()[:-1]], invalid),
            ([b"Bearer a b"], invalid),
            ([b"Bearer " + hashlib.sha256(HASHED.encode()).hexdigest().encode()], invalid),
            (
                [b"Bearer " + CLIENT_3.encode(), b"Bearer " + CLIENT_3.encode()],
                Refusal("more than one Authorization header", "invalid_request"),
            ),
        ]:
            self.assertEqual(self.check(values), refusal, values)
        self.assertEqual(invalid.challenge, INVALID.encode())


class TokenFileCase(SynchronousTestCase):
    """A tokens file in a temporary directory, loaded on a Clock."""

    def setUp(self) -> None:
        self.load(Clock())

    def load(self, clock: Clock) -> None:
        """Write the file and load it on ``clock``."""
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.path = os.path.join(self.dir, "tokens")
        self.write(FILE)
        self.clock = clock
        self.tokens = TokenFile(self.path, self.clock)

    def write(self, text: str, path: Optional[str] = None) -> None:
        """Replace the file (a new inode, as editors and Secret updates do)."""
        path = path or self.path
        with open(path + ".new", "w") as f:
            f.write(text)
        os.replace(path + ".new", path)

    def lines(self) -> list[int]:
        return [c.line for c in self.tokens.credentials]


class TokenFileTests(TokenFileCase):
    """Loading and reloading ``AUTH_TOKENS_FILE``."""

    def test_start_errors_name_the_setting(self) -> None:
        """A missing or broken file at start is a ConfigError naming AUTH_TOKENS_FILE."""
        missing = os.path.join(self.dir, "missing")
        with self.assertRaises(ConfigError) as caught:
            TokenFile(missing, self.clock)
        self.assertEqual(
            str(caught.exception),
            "AUTH_TOKENS_FILE: %s: cannot read it: No such file or directory" % missing,
        )
        self.write("x" * 20 + " 3 4\n")
        with self.assertRaises(ConfigError) as caught:
            TokenFile(self.path, self.clock)
        self.assertEqual(
            str(caught.exception),
            "AUTH_TOKENS_FILE: %s: line 1: expected a token and its client IDs (3,4 or *),"
            " 3 fields" % self.path,
        )
        with open(self.path, "wb") as f:
            f.write(b"\xff" * 20 + b" 3\n")
        with self.assertRaises(ConfigError) as caught:
            TokenFile(self.path, self.clock)
        self.assertTrue(str(caught.exception).endswith(": not UTF-8 text"))

    def test_setting(self) -> None:
        """AUTH_TOKENS_FILE is optional; blank is unset."""
        self.assertIsNone(from_environ({"NO_UPLOAD": "1"}).auth_tokens_file)
        self.assertIsNone(
            from_environ({"NO_UPLOAD": "1", "AUTH_TOKENS_FILE": " "}).auth_tokens_file
        )
        config = from_environ({"NO_UPLOAD": "1", "AUTH_TOKENS_FILE": self.path})
        self.assertEqual(config.auth_tokens_file, self.path)

    def test_reload_on_change(self) -> None:
        """A look every POLL_INTERVAL_S: a changed file is loaded, an unchanged one not."""
        self.tokens.startService()
        self.addCleanup(self.tokens.stopService)
        with capturedLogs() as events:
            self.clock.advance(POLL_INTERVAL_S)
            self.assertEqual(events, [])
            self.write(ROTATED_FILE)
            self.clock.advance(POLL_INTERVAL_S - 0.1)
            self.assertEqual(self.lines(), [2, 3, 4])
            self.clock.advance(0.1)
        self.assertEqual(self.lines(), [1, 2])
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["AUTH_TOKENS_FILE %s reloaded (changed on disk): 2 credentials" % self.path],
        )

    def test_in_place_edit_of_the_same_size(self) -> None:
        """An edit in place that keeps the size is seen by its modification time."""
        self.tokens.startService()
        self.addCleanup(self.tokens.stopService)
        with open(self.path, "r+") as f:
            f.write(FILE.replace("3\n", "4\n", 1))
        stat = os.stat(self.path)
        os.utime(self.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        self.clock.advance(POLL_INTERVAL_S)
        self.assertEqual(self.tokens.credentials[0].clients, frozenset({4}))

    def test_kubernetes_secret_symlink_swap(self) -> None:
        """
        A Secret volume: tokens -> ..data/tokens, ..data -> a timestamped directory;
        an update swaps ..data: the new file is loaded.
        """
        for name, text in (("..2024_01", FILE), ("..2024_02", ROTATED_FILE)):
            os.mkdir(os.path.join(self.dir, name))
            with open(os.path.join(self.dir, name, "tokens"), "w") as f:
                f.write(text)
        os.symlink("..2024_01", os.path.join(self.dir, "..data"))
        link = os.path.join(self.dir, "secret-tokens")
        os.symlink("..data/tokens", link)
        tokens = TokenFile(link, self.clock)
        tokens.startService()
        self.addCleanup(tokens.stopService)
        self.assertEqual(len(tokens.credentials), 3)
        os.symlink("..2024_02", os.path.join(self.dir, "..data_tmp"))
        os.replace(os.path.join(self.dir, "..data_tmp"), os.path.join(self.dir, "..data"))
        self.clock.advance(POLL_INTERVAL_S)
        self.assertEqual(len(tokens.credentials), 2)

    def test_broken_file_keeps_the_old_credentials(self) -> None:
        """
        A broken or missing file on reload keeps what was loaded, logged once per
        change as an error that names the line but not the token.
        """
        self.tokens.startService()
        self.addCleanup(self.tokens.stopService)
        with capturedLogs() as events:
            self.write(FILE + "%s 3 4\n" % ROTATED)
            self.clock.advance(POLL_INTERVAL_S * 3)
            os.remove(self.path)
            self.clock.advance(POLL_INTERVAL_S * 3)
            self.assertFalse(self.tokens.reload("SIGHUP"))
        self.assertEqual(self.lines(), [2, 3, 4])
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "AUTH_TOKENS_FILE %s (changed on disk): line 5: expected a token and its"
                " client IDs (3,4 or *), 3 fields; keeping the 3 credentials loaded before"
                % self.path,
                "AUTH_TOKENS_FILE %s (changed on disk): cannot read it: No such file or"
                " directory; keeping the 3 credentials loaded before" % self.path,
                "AUTH_TOKENS_FILE %s (SIGHUP): cannot read it: No such file or directory;"
                " keeping the 3 credentials loaded before" % self.path,
            ],
        )
        self.assertTrue(all(e["log_level"].name == "error" for e in events))
        self.write(ROTATED_FILE)
        self.clock.advance(POLL_INTERVAL_S)
        self.assertEqual(self.lines(), [1, 2])

    def test_sighup_reloads(self) -> None:
        """SIGHUP reloads the file (through the reactor's thread), and stops nothing."""
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        calls: list[Any] = []

        class Reactor:
            def callFromThread(self, f: Any, *args: Any) -> None:
                calls.append((f, args))

        reload_on_sighup(Reactor(), self.tokens)
        self.write(ROTATED_FILE)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(self.lines(), [2, 3, 4])
        with capturedLogs() as events:
            for f, args in calls:
                f(*args)
        self.assertEqual(self.lines(), [1, 2])
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["AUTH_TOKENS_FILE %s reloaded (SIGHUP): 2 credentials" % self.path],
        )
        calls.clear()
        reload_on_sighup(Reactor(), None)
        os.kill(os.getpid(), signal.SIGHUP)
        with capturedLogs() as events:
            for f, args in calls:
                f(*args)
        self.assertEqual(
            [formatEvent(e) for e in events], ["SIGHUP: no AUTH_TOKENS_FILE to reload"]
        )


class PostWithTokensTests(WebCase, TokenFileCase):
    """``POST /log`` with ``AUTH_TOKENS_FILE``: the table of cases."""

    def setUp(self) -> None:
        WebCase.setUp(self)
        self.load(self.clock)
        self.metrics = Metrics()
        self.serve_site(metrics=self.metrics, auth=self.tokens)
        # The probes, as build_service adds them: they need no token.
        probes = local_probes(self.registry, 30.0, self.metrics.registry)
        add_probes(self.site.resource, probes, self.site)

    def post(
        self, client: int, authorization: Any = None, batch: Optional[list[int]] = None
    ) -> Any:
        """POST a message for ``client`` (or a batch for those IDs); (status, challenge, body)."""
        headers: dict[bytes, list[bytes]] = {}
        if authorization is not None:
            values = authorization if isinstance(authorization, list) else [authorization]
            headers[b"authorization"] = [v.encode() for v in values]
        data = body(client_id=client)
        if batch is not None:
            headers.update(NDJSON)
            data = b"\n".join(body(client_id=c, content_id=n) for n, c in enumerate(batch, 1))
        status, answer_headers, answer = self.request("POST", "/log", data, headers)
        challenge = answer_headers.getRawHeaders(b"www-authenticate")
        return status, challenge[0].decode() if challenge else None, answer

    def test_table(self) -> None:
        """Each case's status, WWW-Authenticate and body; nothing refused is stored."""
        forbidden = {"error": "this token may not write client_id 4", "field": "client_id"}
        required = {
            "error": "authentication required: send Authorization: Bearer <token>",
            "field": None,
        }
        ok = {"ok": True}
        cases: list[tuple[str, Any, Any]] = [
            ("no header", (3,), (401, NO_TOKEN, required)),
            ("wrong scheme", (3, "Basic dXNlcjpwYXNz"), (401, NO_TOKEN, required)),
            (
                "unknown token",
                (3, "Bearer " + UNKNOWN),
                (401, INVALID, {"error": "invalid token", "field": None}),
            ),
            (
                "two headers",
                (3, ["Bearer " + CLIENT_3] * 2),
                (
                    401,
                    'Bearer realm="loghandler", error="invalid_request"',
                    {"error": "more than one Authorization header", "field": None},
                ),
            ),
            ("client 3's token writing 3", (3, "Bearer " + CLIENT_3), (200, None, ok)),
            ("client 3's token writing 4", (4, "Bearer " + CLIENT_3), (403, SCOPE, forbidden)),
            (
                "client 3's token, batch of 3, 4",
                (3, "Bearer " + CLIENT_3, [3, 4]),
                (403, SCOPE, dict(forbidden, line=2)),
            ),
            (
                "client 3's token, batch of 3, 3",
                (3, "Bearer " + CLIENT_3, [3, 3]),
                (200, None, {"ok": True, "accepted": 2}),
            ),
            ("* token writing 4", (4, "Bearer " + EVERY), (200, None, ok)),
            ("hashed token writing 5", (5, "bearer " + HASHED), (200, None, ok)),
            (
                "hashed token writing 3",
                (3, "Bearer " + HASHED),
                (403, SCOPE, dict(forbidden, error="this token may not write client_id 3")),
            ),
        ]
        with capturedLogs() as events:
            for name, args, want in cases:
                self.assertEqual(self.post(*args), want, name)
            status, _, _ = self.request("GET", "/healthz")
            self.assertEqual(status, 200)
        self.successResultOf(self.registry.close_all())
        stored = {key.rsplit("_", 1)[1]: len(self.mem.body(key)) > 0 for key in self.mem.objects}
        self.assertEqual(stored, {"3": True, "4": True, "5": True})
        self.assert_no_token_in(events)
        results = {
            result: self.metrics.get("loghandler_messages_total", {"result": result})
            for result in ("accepted", "unauthorized", "forbidden")
        }
        # A batch counts its 2 lines, refused or accepted.
        self.assertEqual(results, {"accepted": 5, "unauthorized": 4, "forbidden": 4})

    def test_rotation(self) -> None:
        """A rotated file (SIGHUP or change on disk) takes effect for the next request."""
        self.tokens.startService()
        self.addCleanup(self.tokens.stopService)
        self.write(ROTATED_FILE)
        self.assertEqual(self.post(3, "Bearer " + ROTATED)[0], 401)
        self.assertTrue(self.tokens.reload("SIGHUP"))
        self.assertEqual(self.post(3, "Bearer " + ROTATED)[0], 200)
        self.assertEqual(self.post(3, "Bearer " + CLIENT_3)[0], 401)
        self.write(FILE)
        self.clock.advance(POLL_INTERVAL_S)
        self.assertEqual(self.post(3, "Bearer " + CLIENT_3)[0], 200)

    def assert_no_token_in(self, events: list[dict[str, Any]]) -> None:
        text = "\n".join(formatEvent(e) + repr(e) for e in events)
        for token in TOKENS:
            self.assertNotIn(token, text)


class NoTokensTests(WebCase):
    """Without AUTH_TOKENS_FILE nothing changes: an Authorization header is ignored."""

    def test_no_setting_no_check(self) -> None:
        status, headers, _ = self.request("POST", "/log", body())
        self.assertEqual(status, 200)
        self.assertIsNone(headers.getRawHeaders(b"www-authenticate"))
        status, _, _ = self.request(
            "POST", "/log", body(), {b"authorization": [b"Bearer " + UNKNOWN.encode()]}
        )
        self.assertEqual(status, 200)
