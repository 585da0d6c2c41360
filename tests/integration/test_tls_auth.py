"""
End to end, issue 10: ``twistd -n loghandler`` with ``LISTEN=ssl:...`` (a self-signed
certificate made by the test) and ``AUTH_TOKENS_FILE``, in one process and with
``WORKERS=2``, against moto; and with ``LISTEN=unix:...``.

Messages POSTed over HTTPS with a token land in their clients' objects; plain HTTP
to the TLS port gets no answer; every auth case answers its status, challenge and
body (the table is written to ``auth-table.rst`` in trial's working directory:
``./scripts/run-tests tests.integration.test_tls_auth && cat
_trial_temp/auth-table.rst``); the tokens file is reloaded on SIGHUP (passed on by
the supervisor to its workers) and when it changes on disk, and a broken file keeps
the old credentials; no log event of a run holds a token.  A refused ``LISTEN`` or
tokens file stops the start with one line and exit status 2.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Optional

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import read_lines
from tests.integration.moto import free_port, shared_moto
from tests.integration.test_end_to_end import Daemon, canonical, key, message_body
from tests.integration.test_workers import wait_for
from tests.test_auth import (
    CLIENT_3,
    EVERY,
    FILE as TOKENS_FILE,
    HASHED,
    ROTATED,
    ROTATED_FILE,
    TOKENS,
    UNKNOWN,
)
from tests.tls import make_certificate


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request(
    connect: Callable[[], http.client.HTTPConnection],
    method: str,
    path: str,
    body: Optional[bytes] = None,
    headers: Optional[dict[str, str]] = None,
) -> tuple[int, Optional[str], Any]:
    """One request on a new connection: (status, WWW-Authenticate, JSON body)."""
    connection = connect()
    try:
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("WWW-Authenticate"), json.loads(response.read())
    finally:
        connection.close()


class TLSAndTokensTests(SynchronousTestCase):
    """HTTPS with bearer tokens, and a Unix socket, against moto."""

    def setUp(self) -> None:
        self.moto = shared_moto()
        self.moto.reset()
        self.s3 = self.moto.botocore_client()
        self.addCleanup(self.s3.close)
        self.workdir = os.path.abspath(".")
        self.dir = os.path.abspath(self.mktemp())
        os.mkdir(self.dir)
        self.key, self.cert = make_certificate(self.dir)
        self.tokens_path = os.path.join(self.dir, "tokens")
        self.write_tokens(TOKENS_FILE)
        self.expected: dict[str, Counter[str]] = defaultdict(Counter)
        self.next_id = 1
        self.now = int(time.time() * 1000)

    def write_tokens(self, text: str) -> None:
        """Replace the tokens file (a new inode, as a Secret update or an editor)."""
        with open(self.tokens_path + ".new", "w") as f:
            f.write(text)
        os.replace(self.tokens_path + ".new", self.tokens_path)

    def https(self, port: int) -> Callable[[], http.client.HTTPConnection]:
        context = ssl.create_default_context(cafile=self.cert)
        return lambda: http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)

    def start_tls(self, workers: int, args: tuple[str, ...] = ()) -> Daemon:
        port = free_port()
        listen = "ssl:%d:interface=127.0.0.1:privateKey=%s:certKey=%s" % (port, self.key, self.cert)
        daemon = Daemon(
            {
                **self.moto.env(),
                "LISTEN": listen,
                "AUTH_TOKENS_FILE": self.tokens_path,
                "WORKERS": str(workers),
                "ACCESS_LOG": "1",
                "SHUTDOWN_TIMEOUT_S": "20",
            },
            self.workdir,
            port=port,
            connect=self.https(port),
            args=args,
        )
        self.addCleanup(daemon.kill)
        if workers > 1:
            wait_for(
                "%d workers ready" % workers,
                lambda: (
                    request(daemon.connect, "GET", "/healthz")[2].get("workers_running") == workers
                ),
            )
        return daemon

    def post(
        self,
        daemon: Daemon,
        clients: list[int],
        authorization: Optional[str],
        stored: bool,
    ) -> tuple[int, Optional[str], Any]:
        """
        POST one message per client (a batch when more than one); when ``stored``,
        expect them in their objects.
        """
        bodies = []
        for client in clients:
            bodies.append(message_body(self.next_id, client, self.now))
            self.next_id += 1
        headers = {"Content-Type": "application/json"}
        if len(bodies) > 1:
            headers["Content-Type"] = "application/x-ndjson"
        if authorization is not None:
            headers["Authorization"] = authorization
        data = b"\n".join(b.replace(b"\n", b" ") for b in bodies)
        answer = request(daemon.connect, "POST", "/log", data, headers)
        if stored:
            for client, body in zip(clients, bodies):
                self.expected[key(self.now, client)][canonical(body)] += 1
        return answer

    def check_bucket(self) -> None:
        """Every object holds its acknowledged lines exactly once, no other line."""
        listing = self.s3.list_objects_v2(Bucket=self.moto.bucket)
        keys = sorted(o["Key"] for o in listing.get("Contents", []) if o["Key"].startswith("chat/"))
        self.assertEqual(keys, sorted(self.expected))
        for object_key, want in self.expected.items():
            data = self.s3.get_object(Bucket=self.moto.bucket, Key=object_key)["Body"].read()
            got = Counter(line.decode("utf-8") for line in read_lines(data))
            self.assertEqual(got, want, object_key)

    def assert_plain_http_fails(self, port: int) -> None:
        """Plain HTTP to the TLS port gets no HTTP answer."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with self.assertRaises((http.client.HTTPException, OSError)):
            connection.request("GET", "/healthz")
            connection.getresponse()
        connection.close()

    def assert_no_token_logged(self, log: str) -> None:
        """No token, nor its SHA-256, is in any log event of the run."""
        for token in TOKENS:
            self.assertNotIn(token, log)
            self.assertNotIn(hashlib.sha256(token.encode()).hexdigest(), log)

    def reloaded(self, daemon: Daemon, why: str, count: int) -> None:
        """Wait for ``count`` reloads for ``why`` in the log (one per process)."""
        wait_for(
            "%d reloads (%s)" % (count, why),
            lambda: daemon.log().count("reloaded (%s)" % why) >= count,
        )

    def test_one_process(self) -> None:
        """
        The table of auth cases over HTTPS, with reloads on SIGHUP and on a change
        on disk and a broken file on reload; the accepted messages land in moto.
        """
        daemon = self.start_tls(1)
        self.assert_plain_http_fails(daemon.port)
        required = {
            "error": "authentication required: send Authorization: Bearer <token>",
            "field": None,
        }
        no_token = 'Bearer realm="loghandler"'
        invalid = 'Bearer realm="loghandler", error="invalid_token"'
        scope = 'Bearer realm="loghandler", error="insufficient_scope"'
        forbidden = {"error": "this token may not write client_id 4", "field": "client_id"}
        ok = {"ok": True}
        table: list[tuple[str, str, tuple[int, Optional[str], Any]]] = []

        def case(
            name: str,
            clients: list[int],
            token: Optional[str],
            want: tuple[int, Optional[str], Any],
            shown: str,
        ) -> None:
            answer = self.post(daemon, clients, token, stored=want[0] == 200)
            self.assertEqual(answer, want, name)
            what = "POST %s, %s" % (
                "client_id %d" % clients[0]
                if len(clients) == 1
                else "batch of client_id " + ", ".join(map(str, clients)),
                shown,
            )
            table.append((name, what, answer))

        case("no header", [3], None, (401, no_token, required), "no Authorization")
        case("wrong scheme", [3], "Basic dXNlcjpwYXNz", (401, no_token, required), "Basic ...")
        invalid_body = {"error": "invalid token", "field": None}
        case(
            "unknown token", [3], "Bearer " + UNKNOWN, (401, invalid, invalid_body), "unknown token"
        )
        case("token for client 3", [3], "Bearer " + CLIENT_3, (200, None, ok), "client 3's token")
        case(
            "token for client 3 writing client 4",
            [4],
            "Bearer " + CLIENT_3,
            (403, scope, forbidden),
            "client 3's token",
        )
        case(
            "batch with one line for client 4",
            [3, 4, 3],
            "Bearer " + CLIENT_3,
            (403, scope, dict(forbidden, line=2)),
            "client 3's token",
        )
        case("* token", [7], "Bearer " + EVERY, (200, None, ok), "the * token")
        case(
            "hashed token",
            [5],
            "Bearer " + HASHED,
            (200, None, ok),
            "client 5's token (sha256: in the file)",
        )
        # Rotation: client 3's new token replaces the old; SIGHUP reloads.
        self.write_tokens(ROTATED_FILE)
        daemon.process.send_signal(signal.SIGHUP)
        self.reloaded(daemon, "SIGHUP", 1)
        case(
            "reload on SIGHUP: new token",
            [3],
            "Bearer " + ROTATED,
            (200, None, ok),
            "client 3's new token",
        )
        case(
            "reload on SIGHUP: old token",
            [3],
            "Bearer " + CLIENT_3,
            (401, invalid, invalid_body),
            "client 3's old token",
        )
        # A change on disk, no signal: client 3's new token may write client 4 too.
        self.write_tokens(ROTATED_FILE.replace(" 3\n", " 3,4\n"))
        self.reloaded(daemon, "changed on disk", 1)
        case(
            "reload on file change",
            [4],
            "Bearer " + ROTATED,
            (200, None, ok),
            "client 3's new token, now 3,4",
        )
        # A broken file: the credentials loaded before stay.
        self.write_tokens(ROTATED_FILE + "%s 6 7\n" % UNKNOWN)
        wait_for("the broken file refused", lambda: "keeping the 2 credentials" in daemon.log())
        case(
            "broken file on reload",
            [4],
            "Bearer " + ROTATED,
            (200, None, ok),
            "client 3's new token, file broken",
        )
        status, challenge, health = request(daemon.connect, "GET", "/healthz")
        self.assertEqual((status, challenge, health["status"]), (200, None, "ok"))
        table.append(
            (
                "probe",
                "GET /healthz, no Authorization",
                (status, challenge, {"status": "ok", "...": "..."}),
            )
        )
        daemon.stop()
        log = daemon.log()
        self.assertIn("line 3: expected a token and its client IDs (3,4 or *), 3 fields", log)
        self.assertNotIn("Traceback", log)
        self.assert_no_token_logged(log)
        self.check_bucket()
        write_table(table)

    def test_two_workers(self) -> None:
        """
        WORKERS=2 over TLS: the supervisor's socket, TLS in each worker; SIGHUP to
        the supervisor reloads the tokens in both workers; every JSON log event is
        free of tokens.
        """
        daemon = self.start_tls(2, ("--logger=loghandler.logs.json_observer",))
        self.assert_plain_http_fails(daemon.port)
        for n in range(40):
            self.assertEqual(self.post(daemon, [3], "Bearer " + CLIENT_3, stored=True)[0], 200)
            self.assertEqual(
                self.post(daemon, [1 + n % 10], "Bearer " + EVERY, stored=True)[0], 200
            )
            self.assertEqual(self.post(daemon, [4], "Bearer " + CLIENT_3, stored=False)[0], 403)
            self.assertEqual(self.post(daemon, [3], "Bearer " + UNKNOWN, stored=False)[0], 401)
        self.write_tokens(ROTATED_FILE)
        daemon.process.send_signal(signal.SIGHUP)
        self.reloaded(daemon, "SIGHUP", 2)
        for _ in range(10):  # whichever worker answers
            self.assertEqual(self.post(daemon, [3], "Bearer " + ROTATED, stored=True)[0], 200)
            self.assertEqual(self.post(daemon, [3], "Bearer " + CLIENT_3, stored=False)[0], 401)
        daemon.stop()
        log = daemon.log()
        events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        self.assertGreater(len(events), 20)
        self.assertEqual(
            sorted(e["worker"] for e in events if e.get("event") == "tokens_reloaded"), [1, 2]
        )
        self.assertEqual([e for e in events if e["level"] in ("error", "critical")], [])
        self.assert_no_token_logged(log)
        self.check_bucket()

    def test_unix_socket(self) -> None:
        """
        LISTEN=unix:... with WORKERS=2: messages POSTed on the socket land in moto;
        the socket file keeps its mode; it is gone after the stop.
        """
        short = tempfile.mkdtemp(prefix="lh-")  # a socket path holds at most 107 bytes
        self.addCleanup(shutil.rmtree, short, True)
        path = os.path.join(short, "loghandler.sock")
        daemon = Daemon(
            {**self.moto.env(), "LISTEN": "unix:%s:mode=600" % path, "WORKERS": "2"},
            self.workdir,
            connect=lambda: UnixHTTPConnection(path),
        )
        self.addCleanup(daemon.kill)
        wait_for(
            "2 workers ready",
            lambda: request(daemon.connect, "GET", "/healthz")[2].get("workers_running") == 2,
        )
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        for n in range(50):
            self.assertEqual(self.post(daemon, [1 + n % 10], None, stored=True)[0], 200)
        daemon.stop()
        log = daemon.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled error", log)
        self.assertFalse(os.path.lexists(path))
        self.assertFalse(os.path.lexists(path + ".lock"))
        self.check_bucket()


def write_table(rows: list[tuple[str, str, tuple[int, Optional[str], Any]]]) -> None:
    """The auth cases as an RST table, in ``auth-table.rst`` (trial's working directory)."""
    header = ("case", "request", "status", "WWW-Authenticate", "body")
    lines = [
        (name, what, str(status), challenge or "", json.dumps(body))
        for name, what, (status, challenge, body) in rows
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)

    def row(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    text = "\n".join([rule, row(header), rule, *map(row, lines), rule]) + "\n"
    with open("auth-table.rst", "w") as f:
        f.write(text)


class RefusedSettingsTests(SynchronousTestCase):
    """A refused LISTEN or AUTH_TOKENS_FILE: one line on stderr, exit status 2."""

    def run_twistd(self, **env: str) -> tuple[int, str]:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = subprocess.run(
            [twistd, "-n", "--pidfile=", "loghandler"],
            env={**os.environ, "NO_UPLOAD": "1", **env},
            capture_output=True,
            timeout=60,
        )
        return result.returncode, result.stderr.decode() + result.stdout.decode()

    def test_refused(self) -> None:
        dir = os.path.abspath(self.mktemp())
        os.mkdir(dir)
        key, cert = make_certificate(dir)
        tokens = os.path.join(dir, "tokens")
        with open(tokens, "w") as f:
            f.write("%s 3\n%s 4\n" % (CLIENT_3, CLIENT_3))
        for workers in ("1", "2"):
            for env, line in [
                (
                    {"LISTEN": "tls-ish:8443"},
                    "loghandler: LISTEN: not a usable Twisted server endpoint string (tcp:PORT,"
                    " ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem, unix:PATH): Unknown"
                    " endpoint type: 'tls-ish'; got 'tls-ish:8443'\n",
                ),
                (
                    {"LISTEN": "ssl:0:privateKey=%s/none.pem:certKey=%s" % (dir, cert)},
                    "loghandler: LISTEN: cannot read %s/none.pem: No such file or directory"
                    " (in 'ssl:0:privateKey=%s/none.pem:certKey=%s')\n" % (dir, dir, cert),
                ),
                (
                    {"LISTEN": "ssl:0:privateKey=%s:certKey=%s" % (tokens, cert)},
                    "loghandler: LISTEN: cannot load the private key and certificate (PEM): ",
                ),
                (
                    {"AUTH_TOKENS_FILE": tokens, "LISTEN": "tcp:0"},
                    "loghandler: AUTH_TOKENS_FILE: %s: line 2: the same token as line 1\n" % tokens,
                ),
            ]:
                code, output = self.run_twistd(WORKERS=workers, **env)
                self.assertEqual(code, 2, output)
                self.assertTrue(output.startswith(line), (workers, output))
                self.assertEqual(output.count("\n"), 1, output)
                self.assertNotIn(CLIENT_3, output)
