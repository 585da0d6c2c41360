"""
HTTP: ``POST /log`` takes one JSON message (DESIGN.md section 1), or with
``Content-Type: application/x-ndjson`` a batch of them, one per line; everything else
is a JSON 404 (the probes and metrics are :mod:`loghandler.admin`'s).

Every answer is JSON.  200 ``{"ok": true}`` means the message is held for its object
(``{"ok": true, "accepted": N}`` for a batch); 400 / 413 name what is wrong (and for a
batch the line, from 1); 503 with ``Retry-After`` means try again later.  A request is
all-or-nothing: an error means nothing of it was kept.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any, Callable, Optional, Union

from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from loghandler.auth import FORBIDDEN_CHALLENGE, Credential, Refusal, TokenFile, forbidden_reason
from loghandler.connections import ConnectionGuard, default_max_connections
from loghandler.message import Limits, Rejection, batch_too_large, parse_message, too_large
from loghandler.metrics import Metrics
from loghandler.registry import Accepted, Busy, StreamRegistry
from loghandler.rejections import RejectionLog
from loghandler.stream import ObjectStream

_OK = b'{"ok":true}'
_HELD = b'{"ok":true,"durable":false}'

#: The Content-Type of a batch: one JSON message per line.
BATCH_CONTENT_TYPE = b"application/x-ndjson"


def is_batch(request: http.Request) -> bool:
    """Whether the request's Content-Type is ``application/x-ndjson`` (parameters ignored)."""
    values = request.requestHeaders.getRawHeaders(b"content-type")
    if not values:
        return False
    return values[0].split(b";", 1)[0].strip().lower() == BATCH_CONTENT_TYPE


def respond(
    request: Request, status: int, body: bytes, content_type: bytes = b"application/json"
) -> bytes:
    """
    Answer ``status`` with ``body`` (what ``render`` returns); to ``HEAD``, the
    headers ``GET`` would get (its Content-Length) and no body, which twisted.web
    would otherwise drop with a warning in the log.
    """
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [content_type])
    if request.method == b"HEAD":
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        return b""
    return body


def _peer_host(address: Any) -> str:
    """The host of a peer's address (``IPv4Address``...), or its text."""
    return str(getattr(address, "host", address))


def _note_rejection(request: Request, rejection: Rejection, line: Optional[int] = None) -> None:
    """A 4xx answer, for the site's :class:`~loghandler.rejections.RejectionLog`."""
    site = getattr(request.channel, "site", None)
    if isinstance(site, LogSite) and 400 <= rejection.status < 500:
        site.rejections.rejected(
            rejection.status,
            rejection.error,
            _peer_host(request.getClientAddress()),
            request.method,
            request.path,
            line,
        )


def _refuse(request: Request, rejection: Rejection) -> bytes:
    _note_rejection(request, rejection)
    return respond(request, rejection.status, rejection.to_json())


def _error(request: Request, status: int, error: str) -> bytes:
    return _refuse(request, Rejection(status, error))


def _refuse_line(request: Request, rejection: Rejection, line: int) -> bytes:
    _note_rejection(request, rejection, line)
    body = {"error": rejection.error, "field": rejection.field, "line": line}
    return respond(request, rejection.status, json.dumps(body).encode("ascii"))


def _unauthorized(request: Request, refusal: Refusal) -> bytes:
    request.responseHeaders.setRawHeaders(b"www-authenticate", [refusal.challenge])
    return _error(request, 401, refusal.reason)


def _forbidden(request: Request, client_id: int) -> Rejection:
    """The 403 for a message the request's token may not write; sets its challenge."""
    request.responseHeaders.setRawHeaders(b"www-authenticate", [FORBIDDEN_CHALLENGE])
    return Rejection(403, forbidden_reason(client_id), "client_id")


def _all_durable(waits: "list[Deferred[bool]]") -> "Deferred[bool]":
    """
    True once every wait fired True, False if any fired False; cancelling it cancels
    them all (and it fails with the first failure).
    """
    if len(waits) == 1:
        return waits[0]

    def cancel(_: object) -> None:
        for wait in waits:
            wait.cancel()

    combined: Deferred[bool] = Deferred(cancel)

    def done(results: list[tuple[bool, Any]]) -> None:
        if combined.called:
            return
        for ok, value in results:
            if not ok:
                combined.errback(value)
                return
        combined.callback(all(value for _, value in results))

    DeferredList(waits, consumeErrors=True).addCallback(done)
    return combined


def _global_clock() -> IReactorTime:
    from twisted.internet import reactor

    return reactor


class BoundedBody(io.BytesIO):
    """
    A request body kept in memory up to ``limit`` bytes; past that the rest is
    discarded and :attr:`overflowed` is set (twisted.web would otherwise spool a large
    or chunked body to a temporary file on disk).

    :param limit: the most bytes kept.
    :param length: the Content-Length, or None for a chunked body.
    """

    def __init__(self, limit: int, length: Optional[int]) -> None:
        super().__init__()
        self.limit = limit
        self.overflowed = length is not None and length > limit

    def write(self, data: bytes) -> int:  # type: ignore[override]
        """Keep ``data`` unless the body went over the limit."""
        if self.overflowed or self.tell() + len(data) > self.limit:
            self.overflowed = True
            return len(data)
        return super().write(data)


class LogResource(Resource):
    """
    ``/log``: POST one message, or with ``Content-Type: application/x-ndjson`` a batch
    of them, one per line (a final newline is allowed; a blank line elsewhere is an
    error with its number; each line is held to ``max_body_bytes``).  A batch is
    validated whole before any of it is taken.

    :param registry: takes accepted messages.
    :param limits: what a message may hold.
    :param now_ms: the clock, Unix epoch milliseconds.
    :param max_body_bytes: the body size limit (413 above).
    :param durable_timeout_s: with ``ACK=durable``, the seconds to wait for the
        message to reach storage before answering 202; None for ``ACK=accepted``.
    :param clock: for that timeout.
    :param batch_max_bytes: the body size limit of a batch (413 above).
    :param batch_max_lines: the most messages in a batch (413 above).
    :param metrics: counts messages by result (``loghandler_messages_total``) and
        the bytes of accepted bodies; a new one by default.
    :param auth: with ``AUTH_TOKENS_FILE``, the credentials: a POST needs a bearer
        token among them (401) that may write each message's ``client_id`` (403).
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        registry: StreamRegistry,
        limits: Limits,
        now_ms: Callable[[], int],
        max_body_bytes: int,
        durable_timeout_s: Optional[float] = None,
        clock: Optional[IReactorTime] = None,
        batch_max_bytes: int = 1024 * 1024,
        batch_max_lines: int = 1000,
        metrics: Optional[Metrics] = None,
        auth: Optional[TokenFile] = None,
    ) -> None:
        super().__init__()
        self._auth = auth
        metrics = metrics if metrics is not None else Metrics()
        self._messages = metrics.messages
        self._accepted = metrics.accepted
        self._received_bytes = metrics.received_bytes
        self._registry = registry
        self._limits = limits
        self._now_ms = now_ms
        self._max_body_bytes = max_body_bytes
        self._durable_timeout_s = durable_timeout_s
        self._clock: IReactorTime = clock if clock is not None else _global_clock()
        self._batch_max_bytes = batch_max_bytes
        self._batch_max_lines = batch_max_lines

    def render(self, request: Request) -> Union[bytes, int]:
        """Dispatch: POST on ``/log`` itself, 404 below it, 405 for other methods."""
        if request.postpath and request.postpath != [b""]:
            self._refused("not_found")
            return _error(request, 404, "not found")
        if request.method != b"POST":
            self._refused("method")
            request.responseHeaders.setRawHeaders(b"allow", [b"POST"])
            return _error(request, 405, "method not allowed; use POST")
        return self.render_POST(request)

    def _refused(self, result: str, messages: int = 1) -> None:
        """Count ``messages`` refused for ``result`` (``loghandler_messages_total``)."""
        self._messages.labels(result=result).inc(messages)

    def _rejected(self, rejection: Rejection, messages: int = 1) -> None:
        """Count ``messages`` refused by ``rejection``: too_large for a 413, else invalid."""
        self._refused("too_large" if rejection.status == 413 else "invalid", messages)

    def render_POST(self, request: Request) -> Union[bytes, int]:
        """Check the token, validate the body and hand the message to its stream."""
        credential = None
        if self._auth is not None:
            found = self._auth.authenticate(request.requestHeaders.getRawHeaders(b"authorization"))
            if isinstance(found, Refusal):
                self._refused("unauthorized")
                return _unauthorized(request, found)
            credential = found
        content = request.content
        if isinstance(content, io.BytesIO):
            body = content.getvalue()
        else:
            body = content.read() if content is not None else b""
        if request.batch if isinstance(request, LogRequest) else is_batch(request):
            overflowed = getattr(content, "overflowed", False)
            return self._render_batch(request, body, overflowed, credential)
        if getattr(content, "overflowed", False) or len(body) > self._max_body_bytes:
            self._refused("too_large")
            return _refuse(request, too_large(self._max_body_bytes))
        try:
            message = parse_message(body, self._now_ms(), self._limits)
        except Rejection as rejection:
            self._rejected(rejection)
            return _refuse(request, rejection)
        if credential is not None and not credential.allows(message.client_id):
            self._refused("forbidden")
            return _refuse(request, _forbidden(request, message.client_id))
        try:
            accepted = self._registry.accept(message)
        except Exception as e:
            return self._not_taken(
                request, e, "accepting a message failed", "the message was not kept", 1
            )
        self._accepted.inc()
        self._received_bytes.inc(len(body))
        if self._durable_timeout_s is None:
            return respond(request, 200, _OK)
        return self._answer_when_durable(request, accepted.durable())

    def _render_batch(
        self, request: Request, body: bytes, overflowed: bool, credential: Optional[Credential]
    ) -> Union[bytes, int]:
        """
        Validate every line (and that ``credential``, if any, may write its
        ``client_id``), then hand all the messages to their streams, or none.
        """
        if overflowed or len(body) > self._batch_max_bytes:
            self._refused("too_large")
            return _refuse(request, batch_too_large(self._batch_max_bytes))
        lines = body.split(b"\n")
        if len(lines) > 1 and lines[-1] == b"":
            del lines[-1]  # the final newline
        if len(lines) > self._batch_max_lines:
            self._refused("too_large", len(lines))
            return _error(
                request,
                413,
                f"batch has more than {self._batch_max_lines} lines (BATCH_MAX_LINES)",
            )
        now_ms = self._now_ms()
        messages = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                if len(lines) == 1:
                    self._refused("invalid")
                    return _error(request, 400, "body is empty")
                self._refused("invalid", len(lines))
                return _refuse_line(request, Rejection(400, "line is empty"), number)
            if len(line) > self._max_body_bytes:
                self._refused("too_large", len(lines))
                error = f"line is larger than {self._max_body_bytes} bytes (MAX_BODY_BYTES)"
                return _refuse_line(request, Rejection(413, error), number)
            try:
                message = parse_message(line, now_ms, self._limits)
            except Rejection as rejection:
                self._rejected(rejection, len(lines))
                return _refuse_line(request, rejection, number)
            if credential is not None and not credential.allows(message.client_id):
                self._refused("forbidden", len(lines))
                return _refuse_line(request, _forbidden(request, message.client_id), number)
            messages.append(message)
        try:
            accepted = self._registry.accept_batch(messages)
        except Exception as e:
            return self._not_taken(
                request, e, "accepting a batch failed", "the batch was not kept whole", len(lines)
            )
        self._accepted.inc(len(accepted))
        self._received_bytes.inc(len(body))
        ok = b'{"ok":true,"accepted":%d}' % len(accepted)
        if self._durable_timeout_s is None:
            return respond(request, 200, ok)
        last: dict[ObjectStream, Accepted] = {}
        for one in accepted:
            last[one.stream] = one  # each stream's highest line
        return self._answer_when_durable(
            request,
            _all_durable([one.durable() for one in last.values()]),
            ok,
            "storage failed; messages of the batch were not stored",
        )

    def _not_taken(
        self, request: Request, error: Exception, failed: str, kept: str, messages: int
    ) -> bytes:
        """
        The answer when the registry did not take a request of ``messages``
        messages: 503 with ``Retry-After`` for :class:`Busy`, else 500
        (``internal error; {kept}``), logged with its traceback as ``failed`` (call
        it inside the ``except``).
        """
        if isinstance(error, Busy):
            self._refused(error.result, messages)
            request.responseHeaders.setRawHeaders(b"retry-after", [b"%d" % error.retry_after])
            return _error(request, 503, error.reason)
        self._refused("error", messages)
        self._log.failure("{failed}", event="request_failed", failed=failed)
        return _error(request, 500, "internal error; " + kept)

    def _answer_when_durable(
        self,
        request: Request,
        durable: "Deferred[bool]",
        ok: bytes = _OK,
        lost: str = "storage failed; the message was not stored",
    ) -> Union[bytes, int]:
        """
        ``ACK=durable``: 200 (``ok``) once ``durable`` fires True, 202 after the
        timeout, 500 (``lost``) if it fires False.
        """
        assert self._durable_timeout_s is not None
        if durable.called:  # already in storage (or lost)
            outcome: list[bool] = []
            durable.addCallback(outcome.append)
            return self._durable_answer(request, outcome[0], ok, lost)
        durable.addTimeout(self._durable_timeout_s, self._clock)

        def answer(stored: bool) -> None:
            if not request.finished and not request._disconnected:
                request.write(self._durable_answer(request, stored, ok, lost))
                request.finish()

        def late(failure: Failure) -> None:
            failure.trap(TimeoutError, CancelledError)
            if not request.finished and not request._disconnected:
                request.write(respond(request, 202, _HELD))
                request.finish()

        durable.addCallbacks(answer, late)
        durable.addErrback(
            lambda f: self._log.failure("answering a durable request", f, event="request_failed")
        )
        request.notifyFinish().addErrback(lambda _: durable.cancel())
        return NOT_DONE_YET

    def _durable_answer(self, request: Request, stored: bool, ok: bytes, lost: str) -> bytes:
        if stored:
            return respond(request, 200, ok)
        return _error(request, 500, lost)


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _error(request, 404, "not found")


class Root(Resource):
    """The site's root: JSON 404 for any path not put under it."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        """Anything not registered is a JSON 404."""
        return _NotFound()

    def render(self, request: Request) -> bytes:
        """``/`` itself is not a resource either."""
        return _error(request, 404, "not found")


class LogRequest(Request):
    """
    A request of the :class:`LogSite`: its body is kept by
    :meth:`LogSite.getContentFile` with the limit of its kind (a batch,
    ``application/x-ndjson``, or a single message), and the site's own paths
    (``/log``, the probes) are served without twisted.web's resource traversal.
    The headers are in when twisted.web calls :meth:`gotLength`.

    :ivar batch: whether the Content-Type is ``application/x-ndjson``.
    """

    batch = False

    def gotLength(self, length: Optional[int]) -> None:
        """
        Called by twisted.web once the headers are in.  A Content-Length over the
        limit with ``Expect: 100-continue`` is answered 413 at once, without
        ``100 Continue`` and without reading the body, and the connection closed.
        """
        site = getattr(self.channel, "site", None)
        if isinstance(site, LogSite):
            self.batch = is_batch(self)
            self.content = content = site.getContentFile(length, self.batch)
            if content.overflowed and _expects_continue(self):
                # twisted.web sends 100 Continue after this call unless Expect is gone.
                self.requestHeaders.removeHeader(b"expect")
                channel = self.channel
                if isinstance(channel, LogChannel):
                    site.metrics.messages.labels(result="too_large").inc()
                    channel.refuse(site.too_large(self.batch))
        else:
            super().gotLength(length)

    def process(self) -> None:
        """
        Serve an exact path of the site's routes directly (a cached ``Date``
        header, no ``Server`` header); anything else as twisted.web would.
        """
        channel = self.channel
        if isinstance(channel, LogChannel):
            channel.reading_since = None  # read whole: REQUEST_TIMEOUT_S is met
        site = getattr(channel, "site", None)
        if not isinstance(site, LogSite) or (route := site.routes.get(self.path)) is None:
            super().process()
            return
        self.site = site
        self.responseHeaders.setRawHeaders(b"date", [site.date_header()])
        self.prepath = [self.path[1:]]
        self.postpath = []
        try:
            self.render(route)
        except BaseException:
            self.processingFailed(Failure())


def _expects_continue(request: http.Request) -> bool:
    """Whether the request asks ``Expect: 100-continue`` (RFC 9110 section 10.1.1)."""
    values = request.requestHeaders.getRawHeaders(b"expect")
    if not values:
        return False
    return values[0].strip().lower() == b"100-continue"


#: The longest request line (method, target, version) in bytes: 414 above it.
MAX_REQUEST_LINE_BYTES = 16384
#: The largest header block (request line and header fields) in bytes: 431 above it.
MAX_HEADER_BYTES = 16384
#: The most header fields in one request: 431 above it.
MAX_HEADER_FIELDS = 500

#: Reason phrases of the answers a :class:`LogChannel` writes itself (RFC 9110, RFC 6585).
_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


class LogChannel(http.HTTPChannel):
    """
    HTTP/1.1 for the :class:`LogSite`: the connection's own and peer addresses are
    read once per connection, not once per request (twisted.web asks the socket
    for each request).  A request that cannot be read is answered in JSON and the
    connection closed: 414 for a request line over :data:`MAX_REQUEST_LINE_BYTES`,
    431 for a header block over :data:`MAX_HEADER_BYTES` or more than
    :data:`MAX_HEADER_FIELDS` fields, 400 for one that is not HTTP (twisted.web
    closes the connection silently or answers a bare 400).
    """

    MAX_LENGTH = MAX_REQUEST_LINE_BYTES  # any one line of the head
    totalHeadersSize = MAX_HEADER_BYTES
    maxHeaders = MAX_HEADER_FIELDS

    _host: Any = None
    _peer: Any = None
    #: When the first byte of the request being read came (None: between requests).
    reading_since: Optional[float] = None
    #: When the guard first saw the connection idle.
    idle_since: Optional[float] = None
    #: When the connection was cut (answered and closing).
    cut_at: Optional[float] = None
    _guard: Optional[ConnectionGuard] = None

    def connectionMade(self) -> None:
        """Counted by the site's guard (which may stop accepting at the cap)."""
        super().connectionMade()
        site = getattr(self, "site", None)
        if isinstance(site, LogSite):
            self._guard = site.guard
            self._seconds = site.guard.clock.seconds  # type: ignore[method-assign]
            site.guard.opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """No longer counted."""
        super().connectionLost(reason)
        if self._guard is not None:
            self._guard.closed(self)

    def _seconds(self) -> float:
        return 0.0  # replaced by the guard's clock once connected

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the client: the first of a request starts its deadline."""
        if self.reading_since is None:
            self.reading_since = self._seconds()
            self.idle_since = None
        super().dataReceived(data)

    def cut_request(self, timeout_s: float) -> None:
        """
        The request did not come whole within ``timeout_s``: answer 408 and close,
        or close at once when the client does not read what it was sent.
        """
        rejection = Rejection(
            408, "request did not come whole within %g s (REQUEST_TIMEOUT_S)" % timeout_s
        )
        if self._waitingForTransport:
            self._rejected(rejection)
            self.abort()
        else:
            self.refuse(rejection)

    def cut_idle(self) -> None:
        """Idle too long between requests: close (no answer is owed)."""
        self.loseConnection()

    def abort(self) -> None:
        """Close at once, dropping what was not sent."""
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def refuse(self, rejection: Rejection) -> None:
        """
        Answer ``rejection`` (its status and JSON body) outside the request
        machinery, with ``Connection: close``, and close the connection once it is
        written: for a request whose body or head will not be read.  Logged by the
        site's :class:`~loghandler.rejections.RejectionLog`, with the method and
        path when the request line was read.
        """
        self._rejected(rejection)
        body = rejection.to_json()
        assert self.transport is not None
        self.cut_at = self._seconds()  # the guard aborts it if it does not close
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s"
            % (rejection.status, _REASONS.get(rejection.status, b"Error"), len(body), body)
        )
        self.loseConnection()

    def _rejected(self, rejection: Rejection) -> None:
        """Tell the site's :class:`~loghandler.rejections.RejectionLog`."""
        site = getattr(self, "site", None)
        if isinstance(site, LogSite):
            if rejection.status != 413:  # a message refused: loghandler_messages_total
                site.metrics.refused_requests.labels(status=str(rejection.status)).inc()
            site.rejections.rejected(
                rejection.status,
                rejection.error,
                _peer_host(self.getPeer()),
                getattr(self, "_command", None) or b"",  # twisted.web's, once read
                getattr(self, "_path", None) or b"",
            )

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line of the head is over :data:`MAX_REQUEST_LINE_BYTES`: 414 or 431."""
        if self._receivedHeaderSize == 0:  # no line of this request yet: its request line
            self.refuse(
                Rejection(414, "request line is longer than %d bytes" % self.MAX_LENGTH)
            )
        else:
            self._refuse_head()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's answer to a request it cannot parse: 431, or 400, in JSON."""
        if (
            self._receivedHeaderSize > self.totalHeadersSize
            or self._receivedHeaderCount > self.maxHeaders
        ):
            self._refuse_head()
        else:
            self.refuse(Rejection(400, "malformed HTTP request"))

    def _refuse_head(self) -> None:
        if self._receivedHeaderCount > self.maxHeaders:
            error = "more than %d header fields" % self.maxHeaders
        else:
            error = "request header block is larger than %d bytes" % self.totalHeadersSize
        self.refuse(Rejection(431, error))

    def getHost(self) -> Any:
        """The local address, read once."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> Any:
        """The peer's address, read once."""
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer


class LogSite(Site):
    """
    The ``Site`` for the log resources: request bodies stay in memory and are cut at
    the size limit (``batch_max_bytes`` for a batch), POST form parsing is off (it
    costs ~70 µs a request in Twisted's ``email``-based Content-Type parse), and no
    access-log line is formatted unless asked for.

    :param resource: the root resource.
    :param max_body_bytes: the body size limit.
    :param access_log: whether to log a line per request.
    :param batch_max_bytes: the body size limit of a batch.
    :param metrics: counts the bodies refused before they are read (413 to
        ``Expect: 100-continue``) in ``loghandler_messages_total``; a new one by
        default.
    :param request_timeout_s: ``REQUEST_TIMEOUT_S`` (0: none).
    :param max_connections: ``MAX_CONNECTIONS`` of this process; None: derived
        from ``RLIMIT_NOFILE`` (:func:`default_max_connections`).
    :param clock: for the connections' timeouts and the
        :class:`~loghandler.rejections.RejectionLog` of its 4xx answers,
        :attr:`rejections` (the global reactor by default; its windows end on a
        timer only while the site listens).
    """

    requestFactory = LogRequest
    protocol = LogChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        max_body_bytes: int,
        access_log: bool = False,
        batch_max_bytes: int = 1024 * 1024,
        metrics: Optional[Metrics] = None,
        request_timeout_s: float = 30.0,
        max_connections: Optional[int] = None,
        clock: Optional[IReactorTime] = None,
        **kwargs: Any,
    ) -> None:
        # No timer per connection: the guard's sweep times connections out.
        super().__init__(resource, parsePOSTFormSubmission=False, timeout=None, **kwargs)
        #: The connections' timeouts and cap.
        self.guard = ConnectionGuard(
            clock if clock is not None else _global_clock(),
            request_timeout_s,
            max_connections if max_connections is not None else default_max_connections(),
        )
        self.metrics = metrics if metrics is not None else Metrics()
        connections = self.guard.connections
        self.metrics.open_connections.set_function(lambda: len(connections))
        #: Logs the 4xx answers at a bounded pace.
        self.rejections = RejectionLog(clock if clock is not None else _global_clock())
        #: Exact request paths served without resource traversal.
        self.routes: dict[bytes, IResource] = {}
        self._date = b""
        self._date_second = -1
        self._max_body_bytes = max_body_bytes
        self._batch_max_bytes = batch_max_bytes
        self._access_log = access_log

    def buildProtocol(self, addr: Any) -> Any:
        """A channel, or None (the connection closed at once) past ``MAX_CONNECTIONS``."""
        if not self.guard.admit():
            return None
        return super().buildProtocol(addr)

    def listening(self, port: Any) -> None:
        """The port this site listens on, which the guard pauses at the cap."""
        self.guard.listening(port)

    def route(self, path: bytes, resource: IResource) -> None:
        """Serve ``resource`` at exactly ``path`` (``b"/log"``) without traversal."""
        self.routes[path] = resource

    def date_header(self) -> bytes:
        """The ``Date`` header's value (RFC 9110), formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._date_second:
            self._date = http.datetimeToString(now)
            self._date_second = second
        return self._date

    def too_large(self, batch: bool) -> Rejection:
        """The 413 of a body over the limit of its kind (a batch or one message)."""
        if batch:
            return batch_too_large(self._batch_max_bytes)
        return too_large(self._max_body_bytes)

    def getContentFile(self, length: Optional[int], batch: bool = False) -> BoundedBody:
        """Called (by :class:`LogRequest`) for each request body."""
        return BoundedBody(self._batch_max_bytes if batch else self._max_body_bytes, length)

    def startFactory(self) -> None:
        """
        The site listens: rejection windows end on time, the guard's sweeps
        start.
        """
        super().startFactory()
        self.rejections.start()
        self.guard.start()

    def stopFactory(self) -> None:
        """
        The site stops listening: the last window's suppressed rejections are
        logged, the sweeps stop.
        """
        self.rejections.stop()
        self.guard.stop()
        super().stopFactory()

    def log(self, request: http.Request) -> None:
        """Write an access-log line only when ``ACCESS_LOG=1``."""
        if self._access_log:
            super().log(request)


def make_site(
    registry: StreamRegistry,
    limits: Limits,
    now_ms: Callable[[], int],
    max_body_bytes: int,
    access_log: bool = False,
    durable_timeout_s: Optional[float] = None,
    clock: Optional[IReactorTime] = None,
    batch_max_bytes: int = 1024 * 1024,
    batch_max_lines: int = 1000,
    metrics: Optional[Metrics] = None,
    auth: Optional[TokenFile] = None,
    request_timeout_s: float = 30.0,
    max_connections: Optional[int] = None,
) -> LogSite:
    """
    The ingest side: root, ``/log`` and the site (:func:`loghandler.admin.add_probes`
    adds the probes and metrics).  ``durable_timeout_s`` (with ``clock``) turns on
    ``ACK=durable``; ``metrics`` counts the messages (a new one by default);
    ``auth`` (``AUTH_TOKENS_FILE``) guards ``POST /log`` only, never the probes;
    ``request_timeout_s`` and ``max_connections`` (None: derived) are the
    connections' limits (:class:`ConnectionGuard`).
    """
    if metrics is None:
        metrics = Metrics()
    root = Root()
    log = LogResource(
        registry,
        limits,
        now_ms,
        max_body_bytes,
        durable_timeout_s,
        clock,
        batch_max_bytes,
        batch_max_lines,
        metrics,
        auth,
    )
    root.putChild(b"log", log)
    site = LogSite(
        root,
        max_body_bytes,
        access_log,
        batch_max_bytes,
        metrics,
        request_timeout_s,
        max_connections,
        clock,
    )
    site.route(b"/log", log)
    return site
