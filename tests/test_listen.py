"""
Tests for :mod:`loghandler.listen`: ``LISTEN`` and ``ADDR``/``PORT`` as endpoint
strings, the one-line errors naming the variable, the supervisor's sockets (TCP,
Unix with its mode and lock file) and a worker's adoption of them (TLS wrapped as
the reactor's own ``listenSSL`` does).
"""

from __future__ import annotations

import io
import os
import socket
import stat
import sys
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from loghandler.config import Config, ConfigError, from_environ
from loghandler.listen import (
    ListenerService,
    ListenOn,
    _Adopt,
    listen_on,
    open_listening_socket,
    open_shared,
    server_endpoint,
)
from tests.tls import make_certificate


class DescriptionTests(SynchronousTestCase):
    """Which string, and which variable errors name."""

    def test_listen_wins(self) -> None:
        config = from_environ({"NO_UPLOAD": "1", "LISTEN": " unix:/run/x.sock ", "PORT": "80"})
        self.assertEqual(
            listen_on(config), ListenOn("unix:/run/x.sock", "LISTEN", "unix:/run/x.sock")
        )

    def test_addr_port(self) -> None:
        config = Config(addr="::1", port=8902)
        self.assertEqual(
            listen_on(config, 1024),
            ListenOn("tcp:8902:interface=\\:\\:1:backlog=1024", "ADDR/PORT", "::1:8902"),
        )


class EndpointErrorTests(SynchronousTestCase):
    """A string Twisted refuses is one ConfigError line naming LISTEN."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.mkdir(self.dir)
        self.key, self.cert = make_certificate(self.dir)

    def error(self, text: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            server_endpoint(object(), text)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_messages(self) -> None:
        missing = os.path.join(self.dir, "missing.pem")
        usage = (
            "LISTEN: not a usable Twisted server endpoint string (tcp:PORT,"
            " ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem, unix:PATH): "
        )
        self.assertEqual(
            self.error("foo:443"), usage + "Unknown endpoint type: 'foo'; got 'foo:443'"
        )
        self.assertEqual(
            self.error("tcp:http"),
            usage + "invalid literal for int() with base 10: 'http'; got 'tcp:http'",
        )
        self.assertEqual(
            self.error("ssl:8443:privateKey=%s" % missing),
            "LISTEN: cannot read %s: No such file or directory (in 'ssl:8443:privateKey=%s')"
            % (missing, missing),
        )
        not_pem = os.path.join(self.dir, "not.pem")
        with open(not_pem, "w") as f:
            f.write("not a key\n")
        self.assertTrue(
            self.error("ssl:8443:privateKey=%s:certKey=%s" % (not_pem, self.cert)).startswith(
                "LISTEN: cannot load the private key and certificate (PEM): "
            )
        )

    def test_good_strings(self) -> None:
        for text in (
            "tcp:8902",
            "tcp6:8902:interface=\\:\\:1",
            "unix:/run/loghandler.sock:mode=660",
            "ssl:8443:privateKey=%s:certKey=%s" % (self.key, self.cert),
        ):
            server_endpoint(object(), text)


class SharedSocketTests(SynchronousTestCase):
    """The supervisor's listening socket for each shareable endpoint type."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)

    def open(self, text: str) -> Any:
        opened = open_shared(ListenOn(text, "LISTEN", text))
        self.addCleanup(opened.close)
        return opened

    def test_tcp(self) -> None:
        opened = self.open("tcp:0:interface=127.0.0.1:backlog=7")
        self.assertEqual(opened.socket.family, socket.AF_INET)
        socket.create_connection(opened.socket.getsockname()).close()

    def test_ssl_opens_tcp(self) -> None:
        key, cert = make_certificate(self.dir)
        opened = self.open("ssl:0:interface=\\:\\:1:privateKey=%s:certKey=%s" % (key, cert))
        self.assertEqual(opened.socket.family, socket.AF_INET6)

    def test_unix_mode_lock_and_cleanup(self) -> None:
        """mode= is applied; the lock file is held; close removes both."""
        path = os.path.join(self.dir, "s.sock")
        opened = self.open("unix:%s:mode=600" % path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertTrue(os.path.islink(path + ".lock"))
        with self.assertRaises(SystemExit) as caught:
            open_shared(ListenOn("unix:" + path, "LISTEN", "unix:" + path))
        self.assertEqual(caught.exception.code, 2)
        self.assertEqual(
            self.stderr.getvalue(),
            "loghandler: LISTEN: cannot listen on unix:%s: another process holds %s.lock\n"
            % (path, path),
        )
        opened.close()
        self.assertFalse(os.path.lexists(path))
        self.assertFalse(os.path.lexists(path + ".lock"))

    def test_unix_stale_socket_removed(self) -> None:
        """A socket file and lock left by a process that is gone are taken over."""
        path = os.path.join(self.dir, "s.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        os.symlink("999999999", path + ".lock")  # no such process
        self.open("unix:" + path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o666)
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.close()

    def test_not_shareable(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            open_shared(ListenOn("stdio:", "LISTEN", "stdio:"))
        self.assertEqual(
            str(caught.exception),
            "LISTEN: with WORKERS above 1 only tcp:, tcp6:, ssl: and unix: endpoints (the"
            " workers share the supervisor's socket), got 'stdio:'",
        )

    def test_busy_port(self) -> None:
        busy = open_listening_socket("127.0.0.1", 0)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        with self.assertRaises(SystemExit):
            open_shared(ListenOn("tcp:%d:interface=127.0.0.1" % port, "LISTEN", "L"))
        self.assertEqual(
            self.stderr.getvalue(),
            "loghandler: LISTEN: cannot listen on L: Address already in use\n",
        )


class FakeSocketReactor:
    """``adoptStreamPort`` recorded; ``listenTCP`` refusing, as for a port in use."""

    def __init__(self) -> None:
        self.adopted: list[tuple[int, int, Any]] = []

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> str:
        os.fstat(fd)  # still open
        self.adopted.append((fd, family, factory))
        return "port"


class AdoptTests(SynchronousTestCase):
    """A worker accepts on the inherited socket through the endpoint string."""

    def setUp(self) -> None:
        self.reactor = FakeSocketReactor()
        self.factory = Factory.forProtocol(Protocol)
        self.listening = open_listening_socket("127.0.0.1", 0)
        self.addCleanup(self.listening.close)

    def adopt(self, text: str) -> Any:
        fd = os.dup(self.listening.fileno())
        endpoint = server_endpoint(_Adopt(self.reactor, fd, socket.AF_INET), text)
        port = self.successResultOf(endpoint.listen(self.factory))
        self.assertEqual(port, "port")
        with self.assertRaises(OSError):
            os.fstat(fd)  # closed once adopted
        [(adopted_fd, family, factory)] = self.reactor.adopted
        self.assertEqual((adopted_fd, family), (fd, socket.AF_INET))
        return factory

    def test_tcp(self) -> None:
        self.assertIs(self.adopt("tcp:8902"), self.factory)

    def test_ssl_wraps_the_factory_in_tls(self) -> None:
        """As the reactor's listenSSL: TLSMemoryBIOFactory around the site's factory."""
        dir = self.mktemp()
        os.mkdir(dir)
        key, cert = make_certificate(dir)
        factory = self.adopt("ssl:8443:privateKey=%s:certKey=%s" % (key, cert))
        self.assertIsInstance(factory, TLSMemoryBIOFactory)
        self.assertIs(factory.wrappedFactory, self.factory)


class ListenerServiceTests(SynchronousTestCase):
    """WORKERS=1: a port that cannot be listened on is one line and exit status 2."""

    def test_busy(self) -> None:
        from twisted.internet import reactor

        busy = open_listening_socket("127.0.0.1", 0)
        self.addCleanup(busy.close)
        config = from_environ(
            {"NO_UPLOAD": "1", "ADDR": "127.0.0.1", "PORT": str(busy.getsockname()[1])}
        )
        on = listen_on(config)
        service = ListenerService(
            server_endpoint(reactor, on.text), Factory.forProtocol(Protocol), on
        )
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            service.privilegedStartService()
        self.assertEqual(caught.exception.code, 2)
        self.assertEqual(
            stderr.getvalue(),
            "loghandler: ADDR/PORT: cannot listen on 127.0.0.1:%d: Address already in use\n"
            % busy.getsockname()[1],
        )
