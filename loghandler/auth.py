"""
``AUTH_TOKENS_FILE``: which credential may write which client's log.

The file holds one credential a line: a bearer token and the client IDs it may
write, separated by white space; ``#`` starts a comment line::

    # token                                                        client IDs
    4f9c2a7e8b1d4e6f9a0b3c5d7e9f1a2b                                3
    Zk3mQ9vX2pL7rT5wY8nB4cF6hJ1dS0aG                                4,5,6
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08   *

A token is 16 or more characters of RFC 6750's token syntax (letters, digits and
``-._~+/``, then any ``=``); ``sha256:`` and 64 hex digits stands for the token
whose SHA-256 that is (``printf %s TOKEN | sha256sum``), so the file need not hold
the token itself.  The client IDs are integers separated by commas, or ``*`` for
every client.

With the file set, ``POST /log`` needs ``Authorization: Bearer <token>``
(RFC 6750): without a known one the answer is 401 with ``WWW-Authenticate``; a
message (or any line of a batch) for a ``client_id`` the token may not write is 403.
Tokens are compared by their SHA-256, in constant time (``hmac.compare_digest``,
against every credential), and never logged: errors name the line, not its text.

:class:`TokenFile` reloads the file on SIGHUP (:func:`reload_on_sighup`) and when it
changes on disk: it polls the file's device, inode, size and modification time every
:data:`POLL_INTERVAL_S` (a Kubernetes Secret update swaps a symlink and sends no
signal).  A file that cannot be read or parsed keeps the credentials loaded before,
and the error is logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import signal
from typing import Any, Optional, Sequence, Union

import attrs
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from loghandler.config import ConfigError

#: The setting, named in every error.
SETTING = "AUTH_TOKENS_FILE"
#: Seconds between looks at the file for a change.
POLL_INTERVAL_S = 5.0
#: The shortest token accepted in the file, in characters.
MIN_TOKEN_LENGTH = 16
#: ``realm`` of the ``WWW-Authenticate`` challenge.
REALM = "loghandler"

#: RFC 6750 section 2.1: b64token.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")
_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})\Z")
_TOKEN_BYTES = re.compile(rb"[A-Za-z0-9\-._~+/]+=*\Z")


@attrs.frozen
class Credential:
    """
    One line of the file.

    :ivar digest: SHA-256 of the token (32 bytes).
    :ivar clients: the client IDs it may write; None for every client (``*``).
    :ivar line: its line number in the file, from 1 (for the logs).
    """

    digest: bytes
    clients: Optional[frozenset[int]]
    line: int

    def allows(self, client_id: int) -> bool:
        """Whether this credential may write ``client_id``."""
        return self.clients is None or client_id in self.clients


@attrs.frozen
class Refusal:
    """
    Why a request has no valid credential: a 401.

    :ivar reason: the response's ``error`` text.
    :ivar code: RFC 6750's ``error`` attribute of the challenge (``invalid_token``,
        ``invalid_request``), or None when the request sent no bearer token at all.
    """

    reason: str
    code: Optional[str] = None

    @property
    def challenge(self) -> bytes:
        """The ``WWW-Authenticate`` value: ``Bearer realm="loghandler"[, error="..."]``."""
        return challenge(self.code)


def challenge(code: Optional[str] = None) -> bytes:
    """A ``WWW-Authenticate: Bearer`` value with RFC 6750's ``error`` when given."""
    value = 'Bearer realm="%s"' % REALM
    if code is not None:
        value += ', error="%s"' % code
    return value.encode("ascii")


#: The challenge sent with a 403 (RFC 6750 section 3.1).
FORBIDDEN_CHALLENGE = challenge("insufficient_scope")
_NO_TOKEN = Refusal("authentication required: send Authorization: Bearer <token>")
_INVALID = Refusal("invalid token", "invalid_token")


def forbidden_reason(client_id: int) -> str:
    """The 403 response's ``error`` text for ``client_id``."""
    return "this token may not write client_id %d" % client_id


def parse_tokens(text: str) -> tuple[Credential, ...]:
    """
    The credentials of a tokens file's text (the format is in the module's
    docstring).

    :raises ValueError: ``line N: what is wrong`` (never the line's text, which
        holds a token); or the file holds no credential.
    """
    credentials: list[Credential] = []
    seen: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(
                "line %d: expected a token and its client IDs (3,4 or *), %d fields"
                % (number, len(fields))
            )
        token, clients = fields
        hashed = _HASHED.match(token)
        if hashed:
            digest = bytes.fromhex(hashed.group(1))
        elif token.lower().startswith("sha256:"):
            raise ValueError("line %d: sha256: must be followed by 64 hex digits" % number)
        elif not _TOKEN.match(token):
            raise ValueError("line %d: a token is letters, digits and -._~+/ (then any =)" % number)
        elif len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                "line %d: the token is shorter than %d characters" % (number, MIN_TOKEN_LENGTH)
            )
        else:
            digest = hashlib.sha256(token.encode("ascii")).digest()
        if digest in seen:
            raise ValueError("line %d: the same token as line %d" % (number, seen[digest]))
        seen[digest] = number
        credentials.append(Credential(digest, _client_ids(clients, number), number))
    if not credentials:
        raise ValueError("holds no credential (a token and its client IDs a line)")
    return tuple(credentials)


def _client_ids(text: str, number: int) -> Optional[frozenset[int]]:
    if text == "*":
        return None
    ids = set()
    for part in text.split(","):
        if not (part.isascii() and part.isdigit()) or int(part) < 1:
            raise ValueError(
                "line %d: client IDs are integers from 1 separated by commas, or *" % number
            )
        ids.add(int(part))
    return frozenset(ids)


def authenticate(
    credentials: Sequence[Credential], values: Optional[Sequence[bytes]]
) -> Union[Credential, Refusal]:
    """
    The credential of a request's ``Authorization`` header values, or why there is
    none.  The token's SHA-256 is compared with every credential's in constant time.
    """
    if not values:
        return _NO_TOKEN
    if len(values) > 1:
        return Refusal("more than one Authorization header", "invalid_request")
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return _NO_TOKEN
    token = token.strip()
    if not _TOKEN_BYTES.match(token):
        return _INVALID
    digest = hashlib.sha256(token).digest()
    found: Optional[Credential] = None
    for credential in credentials:
        if hmac.compare_digest(digest, credential.digest):
            found = credential
    return _INVALID if found is None else found


def _signature(path: str) -> Optional[tuple[int, int, int, int]]:
    """The file's (device, inode, size, mtime in ns), following symlinks; None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class TokenFile(Service):
    """
    The credentials of ``AUTH_TOKENS_FILE``, loaded now and reloaded on
    :meth:`reload` (SIGHUP) and, while the service runs, when a look every
    ``interval_s`` finds the file changed.

    :param path: the file.
    :param clock: for the looks.
    :param interval_s: seconds between looks.
    :raises ConfigError: (at construction) the file cannot be read or parsed.
    """

    _log = Logger()

    def __init__(self, path: str, clock: IReactorTime, interval_s: float = POLL_INTERVAL_S):
        self.path = path
        self._signature = _signature(path)
        try:
            self.credentials = self._read()
        except ValueError as e:
            raise ConfigError("%s: %s: %s" % (SETTING, path, e)) from None
        self._poll = LoopingCall(self.poll)
        self._poll.clock = clock
        self._interval_s = interval_s

    def _read(self) -> tuple[Credential, ...]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError("cannot read it: %s" % (e.strerror or e)) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
        return parse_tokens(text)

    def authenticate(self, values: Optional[Sequence[bytes]]) -> Union[Credential, Refusal]:
        """:func:`authenticate` against the credentials loaded."""
        return authenticate(self.credentials, values)

    def reload(self, why: str) -> bool:
        """
        Read the file again (``why``: for the log); whether its credentials are now
        in use.  A file that cannot be read or parsed keeps the old ones, logged as
        an error.
        """
        self._signature = _signature(self.path)
        try:
            credentials = self._read()
        except ValueError as e:
            self._log.error(
                "{setting} {path} ({why}): {error}; keeping the {count} credentials loaded before",
                event="tokens_refused",
                setting=SETTING,
                path=self.path,
                why=why,
                error=str(e),
                count=len(self.credentials),
            )
            return False
        self.credentials = credentials
        self._log.info(
            "{setting} {path} reloaded ({why}): {count} credentials",
            event="tokens_reloaded",
            setting=SETTING,
            path=self.path,
            why=why,
            count=len(credentials),
        )
        return True

    def poll(self) -> None:
        """Reload when the file's device, inode, size or modification time changed."""
        if _signature(self.path) != self._signature:
            self.reload("changed on disk")

    def startService(self) -> None:
        """Start looking for changes every ``interval_s``."""
        Service.startService(self)
        self._poll.start(self._interval_s, now=False)

    def stopService(self) -> None:
        """Stop looking."""
        Service.stopService(self)
        if self._poll.running:
            self._poll.stop()


_log = Logger()


def reload_on_sighup(reactor: Any, tokens: Optional[TokenFile]) -> None:
    """
    From now on SIGHUP reloads ``tokens`` (or logs that there is nothing to
    reload); it never stops the process.
    """

    def hangup() -> None:
        if tokens is None:
            _log.info("SIGHUP: no {setting} to reload", event="sighup", setting=SETTING)
        else:
            tokens.reload("SIGHUP")

    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(hangup))
