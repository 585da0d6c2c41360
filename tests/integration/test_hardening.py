"""
Hardening end to end: ``twistd loghandler`` as a subprocess.

- An address that cannot be bound (a port in use, an address that is not local)
  stops the start with one line naming ``ADDR/PORT`` and exit status 2, with ``-n``
  and as a daemon, with one process and with ``WORKERS=2``.
- The exit status after SIGTERM: death by SIGTERM when everything acknowledged was
  stored; 1 when storage stalled past ``SHUTDOWN_TIMEOUT_S`` and
  acknowledged lines were lost (one process and ``WORKERS=2``, against moto behind
  the fault proxy); a second SIGTERM during the flush is logged, no traceback.
- Over real sockets: a client trickling its request is cut with 408 once
  ``REQUEST_TIMEOUT_S`` has passed while another client is served; 414 and 431
  with JSON bodies; 413 at once to ``Expect: 100-continue`` over the limit; past
  ``MAX_CONNECTIONS`` a connection waits (in the listen backlog) and is served
  once another closes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.faultproxy import FaultProxy, FaultRule
from tests.integration.moto import shared_moto
from tests.integration.test_end_to_end import Daemon, message_body, post_all

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def one_message(content_id: int = 1) -> bytes:
    return message_body(content_id, 3, int(time.time() * 1000), "hello")


def post(daemon: Daemon, count: int) -> None:
    """POST ``count`` messages; each must be answered 200."""
    statuses = post_all(daemon.port, [one_message(n + 1) for n in range(count)], threads=1)
    assert statuses == [200] * count, statuses


class CannotListenTests(SynchronousTestCase):
    """An address that cannot be bound: one line, exit status 2, however started."""

    def setUp(self) -> None:
        self.busy = socket.socket()
        self.busy.bind(("127.0.0.1", 0))
        self.busy.listen(1)
        self.addCleanup(self.busy.close)
        self.port = self.busy.getsockname()[1]
        self.tmp = tempfile.mkdtemp(prefix="loghandler-listen-")

    def start(self, daemon: bool, **env: str) -> subprocess.CompletedProcess[bytes]:
        if daemon:
            args = [
                TWISTD,
                "--pidfile=" + os.path.join(self.tmp, "twistd.pid"),
                "--logfile=" + os.path.join(self.tmp, "twistd.log"),
                "loghandler",
            ]
        else:
            args = [TWISTD, "-n", "--pidfile=", "loghandler"]
        return subprocess.run(
            args,
            env={**os.environ, "NO_UPLOAD": "1", "ADDR": "127.0.0.1", "PORT": str(self.port), **env},
            capture_output=True,
            cwd=self.tmp,
            timeout=60,
        )

    def test_port_in_use(self) -> None:
        """
        ``-n`` or a daemon, one process or two workers: the one line on stderr
        (a daemon's whole, where twistd's parent cut it at 100 bytes), nothing else,
        exit status 2; no daemon left running.
        """
        line = b"loghandler: ADDR/PORT: cannot listen on 127.0.0.1:%d: Address already in use\n"
        for daemon in (False, True):
            for workers in ("1", "2"):
                done = self.start(daemon, WORKERS=workers)
                self.assertEqual(
                    (done.returncode, done.stdout, done.stderr),
                    (2, b"", line % self.port),
                    (daemon, workers),
                )
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "twistd.pid")))

    def test_admin_port_in_use(self) -> None:
        """
        ADMIN_PORT taken: the same one line naming ADMIN_ADDR/ADMIN_PORT and exit 2,
        with ``-n`` or as a daemon (whose parent waited forever for its child before),
        one process or two workers.
        """
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        main_port = free.getsockname()[1]
        free.close()
        line = (
            b"loghandler: ADMIN_ADDR/ADMIN_PORT: cannot listen on 127.0.0.1:%d:"
            b" Address already in use\n" % self.port
        )
        for daemon in (False, True):
            for workers in ("1", "2"):
                done = self.start(
                    daemon,
                    WORKERS=workers,
                    PORT=str(main_port),
                    ADMIN_ADDR="127.0.0.1",
                    ADMIN_PORT=str(self.port),
                )
                self.assertEqual(
                    (done.returncode, done.stdout, done.stderr), (2, b"", line), (daemon, workers)
                )
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "twistd.pid")))

    def test_address_not_local(self) -> None:
        """An ADDR no interface has (TEST-NET-1): the same one line, its reason."""
        for daemon in (False, True):
            done = self.start(daemon, ADDR="192.0.2.1")
            self.assertEqual(
                (done.returncode, done.stderr),
                (
                    2,
                    b"loghandler: ADDR/PORT: cannot listen on 192.0.2.1:%d: Cannot assign"
                    b" requested address\n" % self.port,
                ),
            )


class ExitStatusTests(SynchronousTestCase):
    """The exit status after SIGTERM tells whether acknowledged lines were lost."""

    def setUp(self) -> None:
        self.workdir = os.path.abspath(".")

    def start(self, **env: str) -> Daemon:
        daemon = Daemon(env, self.workdir)
        self.addCleanup(daemon.kill)
        return daemon

    def test_clean_stop_dies_by_sigterm(self) -> None:
        """Everything stored: death by SIGTERM, as twistd gives it (systemd: clean)."""
        moto = shared_moto()
        moto.reset()
        daemon = self.start(**moto.env(), SHUTDOWN_TIMEOUT_S="20")
        post(daemon, 20)
        daemon.process.send_signal(signal.SIGTERM)
        self.assertEqual(daemon.process.wait(60), -signal.SIGTERM, daemon.log())
        self.assertIn("flush on stop done", daemon.log())
        self.assertNotIn("exit status 1", daemon.log())

    def lost(self, workers: str) -> None:
        """
        Storage stalled past SHUTDOWN_TIMEOUT_S with lines held only in memory
        (CHECKPOINT_S=0): exit status 1, the loss logged; a second SIGTERM during
        the flush is logged, without a traceback.
        """
        moto = shared_moto()
        moto.reset()
        proxy = FaultProxy(moto.endpoint_url, region=moto.region, max_stall=120.0)
        proxy.start()
        self.addCleanup(proxy.stop)
        daemon = self.start(
            **proxy.env(moto.env()),
            SHUTDOWN_TIMEOUT_S="3",
            CHECKPOINT_S="0",
            WORKERS=workers,
        )
        post(daemon, 20)
        proxy.set_mode(FaultRule(fault="stall"))  # every storage request held
        daemon.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        daemon.process.send_signal(signal.SIGTERM)
        code = daemon.process.wait(60)
        log = daemon.log()
        self.assertEqual(code, 1, log + "\nproxy: %r" % proxy.stats())
        self.assertIn("exit status 1:", log)
        self.assertIn("SIGTERM received again", log)
        self.assertNotIn("Traceback", log)

    def test_lost_lines_exit_1(self) -> None:
        self.lost("1")

    def test_lost_lines_in_a_worker_exit_1(self) -> None:
        """With WORKERS=2 the supervisor exits 1 when a worker's flush lost lines."""
        self.lost("2")


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Read one response (with a Content-Length) from ``sock``: status, headers, body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("closed before a response: %r" % data)
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


class SocketTests(SynchronousTestCase):
    """One daemon (NO_UPLOAD=1, REQUEST_TIMEOUT_S=2, MAX_CONNECTIONS=4) over raw sockets."""

    def setUp(self) -> None:
        self.daemon = Daemon(
            {"NO_UPLOAD": "1", "REQUEST_TIMEOUT_S": "2", "MAX_CONNECTIONS": "4"},
            os.path.abspath("."),
        )
        self.addCleanup(self.daemon.kill)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def test_trickling_client_cut_while_others_are_served(self) -> None:
        """
        A client sending its request a byte every 0.2 s gets 408 (JSON) and the
        connection closed, not before REQUEST_TIMEOUT_S after its first byte;
        meanwhile another client's 20 messages are answered 200.
        """
        slow = self.connect()
        request = b"POST /log HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
        started = time.monotonic()
        stop = threading.Event()

        def trickle() -> None:
            for byte in request:
                if stop.is_set():
                    return
                try:
                    slow.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)

        thread = threading.Thread(target=trickle)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(stop.set)
        post(self.daemon, 20)
        status, headers, body = read_response(slow, timeout=20)
        elapsed = time.monotonic() - started
        stop.set()
        self.assertEqual(status, 408)
        self.assertEqual(
            json.loads(body),
            {"error": "request did not come whole within 2 s (REQUEST_TIMEOUT_S)", "field": None},
        )
        self.assertGreaterEqual(elapsed, 2.0)
        self.assertTrue(closed(slow))

    def test_head_limits(self) -> None:
        """A request line over 16 KiB: 414; a header block over 16 KiB: 431; each JSON."""
        sock = self.connect()
        sock.sendall(b"GET /" + b"x" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(sock)
        self.assertEqual((status, headers["content-type"]), (414, "application/json"))
        self.assertEqual(json.loads(body)["error"], "request line is longer than 16384 bytes")
        self.assertTrue(closed(sock))
        sock = self.connect()
        fields = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"y" * 100) for n in range(200))
        sock.sendall(b"POST /log HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        status, _, body = read_response(sock)
        self.assertEqual(status, 431)
        self.assertEqual(
            json.loads(body)["error"], "request header block is larger than 16384 bytes"
        )

    def test_expect_continue_over_the_limit(self) -> None:
        """Expect: 100-continue with 10 MB announced: 413 at once, no 100, closed."""
        sock = self.connect()
        sock.sendall(
            b"POST /log HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10000000\r\n\r\n"
        )
        status, headers, body = read_response(sock)
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"], "body is larger than 65536 bytes (MAX_BODY_BYTES)")
        self.assertEqual(headers["connection"], "close")
        self.assertTrue(closed(sock))

    def test_max_connections(self) -> None:
        """
        Four connections open (MAX_CONNECTIONS=4): a fifth is accepted by the kernel
        but not served until one of the four closes; then it is answered.  Logged.
        """
        idle = [self.connect() for _ in range(4)]
        time.sleep(0.5)
        fifth = self.connect()
        body = one_message()
        fifth.sendall(
            b"POST /log HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        fifth.settimeout(1.5)
        with self.assertRaises(socket.timeout):
            fifth.recv(1)
        idle[0].close()
        status, _, _ = read_response(fifth)
        self.assertEqual(status, 200)
        self.assertIn("MAX_CONNECTIONS: 4 connections open", self.daemon.log())
