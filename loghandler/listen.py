"""
Where the server listens: ``LISTEN``, a Twisted server endpoint string
(``tcp:8902:interface=10.0.0.5``, ``ssl:8443:privateKey=key.pem:certKey=cert.pem``,
``unix:/run/loghandler.sock``), parsed by Twisted's own ``serverFromString``; without
it, ``ADDR`` and ``PORT`` as ``tcp:PORT:interface=ADDR``.

With ``WORKERS`` above 1 the supervisor opens the listening socket and the workers
accept on it.  Both parse the same string with Twisted's parsers and hand the
endpoint a stand-in for the reactor, which receives the endpoint's own
``listenTCP`` / ``listenSSL`` / ``listenUNIX`` call (``IReactorTCP``,
``IReactorSSL``, ``IReactorUNIX``) with the options parsed: in the supervisor
:class:`_Bind` opens the socket (:func:`open_listening_socket`,
:func:`open_unix_socket`), in a worker :class:`_Adopt` accepts on the inherited one
(``IReactorSocket.adoptStreamPort``), for ``ssl:`` through
``TLSMemoryBIOFactory`` with the context factory the ``ssl:`` parser built from the
key and certificate, as the reactor's own ``listenSSL`` does; for ``unix:`` through
:class:`_SharedUnixPort`, which keeps the socket file's ``mode`` and leaves the file
to the supervisor.  Each worker reads the key and certificate itself.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from typing import Any, Optional, Union

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import tcp, unix
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    quoteStringArgument,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.lockfile import FilesystemLock

from loghandler.config import Config, ConfigError

#: The endpoint types a supervisor of ``WORKERS`` can open and its workers share.
SHAREABLE = (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint, UNIXServerEndpoint)

#: Exit status of a server that cannot listen (as for any refused setting).
EXIT_CONFIG = 2

#: The listen backlog of ``ADDR``/``PORT``: connections the kernel holds until they
#: are accepted (at ``MAX_CONNECTIONS`` they wait there; Twisted's default is 50).
LISTEN_BACKLOG = 1024


def listen_description(addr: str, port: int) -> str:
    """The endpoint string for ``ADDR`` and ``PORT``: ``tcp:8902:interface=0.0.0.0``."""
    return "tcp:%d:interface=%s" % (port, quoteStringArgument(addr))


@attrs.frozen
class ListenOn:
    """
    Where to listen, from the configuration (:func:`listen_on`).

    :ivar text: the endpoint string.
    :ivar setting: the variable that gave it, named in errors: ``LISTEN`` or
        ``ADDR/PORT``.
    :ivar shown: how errors show it: the string, or ``ADDR:PORT``.
    """

    text: str
    setting: str
    shown: str


def listen_on(config: Config, backlog: Optional[int] = None) -> ListenOn:
    """
    ``LISTEN`` when set, else ``ADDR``/``PORT`` as :func:`listen_description` (with
    ``backlog``, when given, as its listen queue length).
    """
    if config.listen is not None:
        return ListenOn(config.listen, "LISTEN", config.listen)
    text = listen_description(config.addr, config.port)
    if backlog is not None:
        text += ":backlog=%d" % backlog
    return ListenOn(text, "ADDR/PORT", "%s:%d" % (config.addr, config.port))


def server_endpoint(reactor: Any, text: str, setting: str = "LISTEN") -> IStreamServerEndpoint:
    """
    ``serverFromString(reactor, text)``: for ``ssl:`` this reads the key and the
    certificate.

    :raises ConfigError: one line naming ``setting``: not an endpoint string, a
        malformed option, a key or certificate that cannot be read or loaded.
    """
    try:
        return serverFromString(reactor, text)  # type: ignore[no-any-return]
    except OSError as e:
        where = " %s" % e.filename if e.filename else ""
        raise ConfigError(
            f"{setting}: cannot read{where}: {e.strerror or e} (in {text!r})"
        ) from None
    except Exception as e:  # the parsers raise ValueError, TypeError, OpenSSL's Error...
        why = str(e) or type(e).__name__
        if type(e).__module__.startswith("OpenSSL"):
            raise ConfigError(
                f"{setting}: cannot load the private key and certificate (PEM): {why}; got {text!r}"
            ) from None
        raise ConfigError(
            f"{setting}: not a usable Twisted server endpoint string (tcp:PORT,"
            f" ssl:PORT:privateKey=KEY.pem:certKey=CERT.pem, unix:PATH): {why}; got {text!r}"
        ) from None


def _cannot_listen(on: ListenOn, error: Union[OSError, CannotListenError]) -> "SystemExit":
    """Write the one line for a socket that cannot be opened; the exit to raise."""
    if isinstance(error, CannotListenError):
        reason: Any = error.socketError
        reason = getattr(reason, "strerror", None) or reason
    else:
        reason = error.strerror or error
    sys.stderr.write("loghandler: %s: cannot listen on %s: %s\n" % (on.setting, on.shown, reason))
    return SystemExit(EXIT_CONFIG)


class ListenerService(StreamServerEndpointService):
    """
    ``StreamServerEndpointService`` that listens in ``privilegedStartService`` and,
    when the endpoint cannot listen (address in use, no permission), writes one line
    naming ``setting`` and exits with status 2 instead of a traceback.

    :param on: where, for that line.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Any, on: ListenOn):
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self._on = on

    def privilegedStartService(self) -> None:
        """
        Listen now (before twistd drops privileges); exit 2 if that fails.  A
        factory with a ``listening(port)`` method (a ``LogSite``, which stops
        reading the port at ``MAX_CONNECTIONS``) is given the port.
        """
        try:
            super().privilegedStartService()
        except (CannotListenError, OSError) as e:
            raise _cannot_listen(self._on, e) from None
        listening = getattr(self.factory, "listening", None)
        if listening is not None and self._waitingForPort is not None:
            self._waitingForPort.addCallback(lambda port: (listening(port), port)[1])


def listener(
    config: Config, reactor: Any, factory: Any, adopt: Optional[tuple[int, int]] = None
) -> ListenerService:
    """
    The listening service for ``factory``: on ``LISTEN`` (or ``ADDR``/``PORT``), or
    with ``adopt`` (a worker of ``WORKERS``), on the inherited listening socket
    ``(fd, family)``, through the same endpoint string.

    :raises ConfigError: the endpoint string is not usable (:func:`server_endpoint`).
    """
    on = listen_on(config, LISTEN_BACKLOG)
    stand_in = reactor if adopt is None else _Adopt(reactor, adopt[0], adopt[1])
    return ListenerService(server_endpoint(stand_in, on.text, on.setting), factory, on)


def admin_listener(config: Config, reactor: Any, factory: Any) -> ListenerService:
    """
    The listening service of the probes and metrics: ``ADMIN_ADDR``/``ADMIN_PORT``
    (which must be set), plain TCP; one line naming them and exit 2 when it cannot
    listen.
    """
    on = admin_on(config)
    assert on is not None
    return ListenerService(server_endpoint(reactor, on.text, on.setting), factory, on)


def admin_on(config: Config) -> Optional[ListenOn]:
    """Where the probes' and metrics' own listener listens: ``ADMIN_ADDR``/``ADMIN_PORT``, or None."""
    if config.admin_port is None:
        return None
    text = listen_description(config.admin_addr, config.admin_port)
    return ListenOn(text, "ADMIN_ADDR/ADMIN_PORT", "%s:%d" % (config.admin_addr, config.admin_port))


class _Adopt:
    """
    A worker's stand-in for the reactor, handed to the endpoint: its ``listen*``
    call accepts on the inherited listening socket ``fd`` of address family
    ``family`` (the reactor takes its own copy; ``fd`` is closed once adopted).
    """

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family

    def _adopt(self, factory: Any) -> Any:
        port = self._reactor.adoptStreamPort(self._fd, self._family, factory)
        os.close(self._fd)
        return port

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        """``IReactorTCP.listenTCP``: accept on the inherited socket."""
        return self._adopt(factory)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        """``IReactorSSL.listenSSL``: accept on the inherited socket, with TLS."""
        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0
    ) -> Any:
        """``IReactorUNIX.listenUNIX``: accept on the inherited socket, keeping its mode."""
        port = _SharedUnixPort._fromListeningDescriptor(self._reactor, self._fd, factory)
        port.mode = mode
        port.startListening()
        os.close(self._fd)
        return port


class _SharedUnixPort(unix.Port):
    """
    A worker's port on the supervisor's Unix socket.  What ``adoptStreamPort``
    would make (``unix.Port._fromListeningDescriptor``), except that it keeps the
    socket file's mode (an adopted ``unix.Port`` sets it to 0666 as it starts) and
    leaves the file when it stops (the supervisor removes it once every worker is
    done; each worker removing it would fail all but the first).
    """

    def connectionLost(self, reason: Any) -> None:
        """Stop listening; the socket file stays."""
        tcp.Port.connectionLost(self, reason)


class ListeningSocket:
    """
    A listening socket the supervisor opened, and what closing it undoes: the
    socket file and the lock file (``unix:`` with ``lockfile=1``, Twisted's
    default).

    :ivar socket: the non-blocking listening socket.
    """

    def __init__(
        self, sock: socket.socket, path: Optional[str] = None, lock: Optional[FilesystemLock] = None
    ) -> None:
        self.socket = sock
        self._path = path
        self._lock = lock

    def close(self) -> None:
        """Close the socket; remove its file (if still there) and release its lock."""
        self.socket.close()
        if self._path is not None:
            try:
                if stat.S_ISSOCK(os.stat(self._path).st_mode):
                    os.unlink(self._path)
            except OSError:
                pass  # a worker's port removed it as it stopped
        if self._lock is not None:
            self._lock.unlock()
            self._lock = None


def open_listening_socket(addr: str, port: int, backlog: int = 50) -> socket.socket:
    """
    A non-blocking TCP socket listening on ``addr`` (IPv4 or IPv6; ``""``: every
    IPv4 address, as Twisted's ``listenTCP``) and ``port`` (0: any free port), with
    ``SO_REUSEADDR`` as Twisted's own listeners set it.

    :raises OSError: the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((addr, port))
        listening.listen(backlog)
        listening.setblocking(False)
    except OSError:
        listening.close()
        raise
    return listening


def open_unix_socket(path: str, backlog: int, mode: int, lock: bool) -> ListeningSocket:
    """
    A non-blocking ``AF_UNIX`` stream socket listening on ``path`` with the file
    mode ``mode``, as Twisted's ``listenUNIX`` opens it: with ``lock``, the lock
    file ``path.lock`` is taken first and a socket file left by a process that is
    gone is removed.

    :raises OSError: the path cannot be bound.
    :raises CannotListenError: another live process holds the lock.
    """
    lockfile = None
    if lock:
        lockfile = FilesystemLock(path + ".lock")
        if not lockfile.lock():
            raise CannotListenError(None, path, "another process holds %s.lock" % path)
        if not lockfile.clean:
            try:
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.remove(path)
            except OSError:
                pass  # nothing left; bind says if something is in the way
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listening.bind(path)
        if not path.startswith("\0"):
            os.chmod(path, mode)
        listening.listen(backlog)
        listening.setblocking(False)
    except OSError:
        listening.close()
        if lockfile is not None:
            lockfile.unlock()
        raise
    return ListeningSocket(listening, None if path.startswith("\0") else path, lockfile)


class _Bind:
    """
    The supervisor's stand-in for the reactor, handed to the endpoint: its
    ``listen*`` call opens the listening socket with the options the endpoint
    string gave, and returns it (a :class:`ListeningSocket`).
    """

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        """``IReactorTCP.listenTCP``: open a TCP socket."""
        return ListeningSocket(open_listening_socket(interface, port, backlog))

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        """``IReactorSSL.listenSSL``: open a TCP socket (the workers speak TLS on it)."""
        return self.listenTCP(port, factory, backlog, interface)

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0
    ) -> Any:
        """``IReactorUNIX.listenUNIX``: open a Unix socket."""
        return open_unix_socket(address, backlog, mode, bool(wantPID))


def shared_endpoint(on: ListenOn) -> IStreamServerEndpoint:
    """
    The endpoint of ``on`` for the supervisor of ``WORKERS``: its ``listen`` opens
    the socket the workers share (and returns a :class:`ListeningSocket`).

    :raises ConfigError: not a usable endpoint string, or one whose socket workers
        cannot share (only ``tcp:``, ``tcp6:``, ``ssl:`` and ``unix:``).
    """
    endpoint = server_endpoint(_Bind(), on.text, on.setting)
    if not isinstance(endpoint, SHAREABLE):
        raise ConfigError(
            f"{on.setting}: with WORKERS above 1 only tcp:, tcp6:, ssl: and unix: endpoints"
            f" (the workers share the supervisor's socket), got {on.text!r}"
        )
    return endpoint


def check_listen(on: ListenOn) -> None:
    """
    Open the socket of ``on`` and close it again, so that an address that cannot
    be bound (in use, not local, no permission) stops ``twistd loghandler`` with
    its one line and exit status 2 from ``makeService``, before twistd daemonizes
    (after that, the line would go to the log while twistd's parent printed its own
    message, cut at 100 bytes, and exit status 1).  The listener opens it for real
    as it starts.  Endpoints other than ``tcp:``, ``tcp6:``, ``ssl:`` and ``unix:``
    are left to the listener.

    :raises SystemExit: (2, after one line on stderr naming the setting).
    """
    try:
        shared_endpoint(on)
    except ConfigError:
        return  # not one this opens; the listener refuses it, or opens it
    open_shared(on).close()


def open_shared(on: ListenOn) -> ListeningSocket:
    """
    The supervisor's listening socket for ``on``.

    :raises ConfigError: as :func:`shared_endpoint`.
    :raises SystemExit: (2, after one line on stderr naming the setting) the socket
        cannot be opened (address in use, no permission).
    """
    endpoint = shared_endpoint(on)
    opened: list[Any] = []
    endpoint.listen(None).addBoth(opened.append)  # type: ignore[arg-type]
    result = opened[0]
    if isinstance(result, ListeningSocket):
        return result
    error = result.value
    if isinstance(error, (OSError, CannotListenError)):
        raise _cannot_listen(on, error)
    result.raiseException()
    raise AssertionError("unreachable")
