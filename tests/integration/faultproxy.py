"""
A fault-injecting HTTP reverse proxy in front of moto's S3 server, for fault tests.

The proxy listens on ``127.0.0.1`` only, on a port the OS chooses, and forwards every
request to one upstream (``http://127.0.0.1:PORT``, moto's server) unless a fault rule
says otherwise.  It runs in threads of its own (one accepting thread, one thread per
client connection), so it never blocks the reactor of the test that starts it, and it
works the same way as a child process.

In-process, from a trial test::

    from tests.integration.faultproxy import FaultProxy, FaultRule

    proxy = FaultProxy(moto.endpoint_url)
    proxy.start()                     # listening when it returns
    self.addCleanup(proxy.stop)       # bounded: about 0.1 s, at most ``timeout``
    store = build_s3_store(..., endpoint_url=proxy.endpoint_url)
    proxy.set_mode(FaultRule(fault="drop_answer", times=1,
                             operations=("CompleteMultipartUpload",)))
    ...
    proxy.stats()["faults"]["drop_answer"]  # {"CompleteMultipartUpload": 1}

As a child process (``python -m tests.integration.faultproxy --upstream
http://127.0.0.1:PORT --port 0`` prints its port on stdout's first line and runs until
SIGTERM or SIGINT), driven from another process through the control API under
``/_faultproxy/`` (S3 bucket names cannot begin with ``_``, so moto never sees that
path; control requests are neither faulted nor counted)::

    with FaultProxyProcess(moto.endpoint_url) as child:
        child.client.set_mode(FaultRule(fault="error5xx", status=503, times=2))
        env = {**os.environ, **moto.env(), "AWS_ENDPOINT_URL": child.url}
        ...
        child.client.stats()

Control API (JSON in and out):

``GET /_faultproxy/stats``
    :meth:`FaultProxy.stats`.
``POST /_faultproxy/stats/reset``
    :meth:`FaultProxy.reset_stats`.
``GET /_faultproxy/mode``
    ``{"rules": [...]}``: the rules, each with ``remaining`` (``null``: unlimited).
``POST /_faultproxy/mode``
    Replace the rules: one rule object, a list of them, ``{"rules": [...]}``, or
    ``{"fault": "none"}`` / ``[]`` for none.  Answers like ``GET``.
``POST /_faultproxy/rules``
    Append rules (same body forms).
``DELETE /_faultproxy/mode``
    No rules.
``POST /_faultproxy/release``
    End every stall now: ``{"released": N}``.
``POST /_faultproxy/refuse-connections``
    ``{"seconds": S, "drop_existing": true}``: stop listening for ``S`` seconds
    (``0`` listens again now); see :meth:`FaultProxy.refuse_connections`.  The control
    API is unreachable meanwhile, as every other request.
``POST /_faultproxy/reset``
    No rules, stalls released, statistics cleared.
``GET`` / ``POST /_faultproxy/config``
    ``{"enforce_if_match": bool}``.

A rule (:class:`FaultRule`) names a fault and when it fires: always, for the next
``times`` matching requests, or with ``probability`` drawn from ``random.Random(seed)``
(both: each matching request draws, and at most ``times`` fire), for the requests
whose method, S3 operation (:func:`s3_operation`) and key match its filters.  The
first rule that fires decides; one fault per request.  The faults:

``refuse``
    Read the request, forward nothing, close the connection without an answer.  And
    :meth:`FaultProxy.refuse_connections`: no listener at all for a while (connection
    refused).
``stall``
    Hold the request ``seconds`` (``null``: until :meth:`FaultProxy.release`, at most
    ``max_stall``), ``at`` one of ``request`` (before anything), ``locked`` (after the
    key's write lock and the If-Match check: a conditional write in progress) or
    ``response`` (forwarded, moto's answer held); ``then`` ``forward`` (go on
    normally), ``close`` (close without an answer; after ``at: response`` the write
    has landed) or ``cut`` (forward, then as ``cut``).
``cut``
    Forward, then send only the first ``cut_at`` bytes of the answer (default: the
    head and half the body, or half the status line when the body is empty) and close.
``error5xx``
    Answer ``status`` 500 (``InternalError``) or 503 (``SlowDown``) with S3's XML error
    document, forward nothing, keep the connection.
``drop_answer``
    Writes only (PUT, POST, DELETE): forward the whole request, let moto answer, close
    the connection without sending the answer (a lost answer after a landed write).

``refuse``, ``cut``, ``drop_answer`` and ``stall`` with ``then: close`` close with a
FIN, or with a RST when ``reset`` is true.

What moto does not enforce, the proxy does (:attr:`FaultProxy.enforce_if_match`, on
by default): a CompleteMultipartUpload (``POST /bucket/key?uploadId=...``) carrying
``If-Match`` is checked with a HEAD of the key upstream; a different ETag or a
missing key gets ``412 PreconditionFailed`` and nothing is forwarded (the upload stays,
as on S3).  Every write that replaces or removes the object at a key (PutObject,
CopyObject, CompleteMultipartUpload, DeleteObject) holds a lock for that key while it
is checked and forwarded, so check-then-forward is atomic against the other writes
through the proxy.  A conditional Complete (``If-Match`` or ``If-None-Match``) that
arrives while another conditional write of the same key is in progress gets
``409 ConditionalRequestConflict`` and its upload is aborted upstream, as S3 discards
it.  (See https://docs.aws.amazon.com/AmazonS3/latest/API/API_CompleteMultipartUpload.html
and https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-requests.html.)

Limitations: path-style addressing only (``/bucket/key``; moto on 127.0.0.1 is
addressed so); plain HTTP; bodies are buffered whole in memory, both ways; one
upstream connection per request (``Connection: close`` upstream); UploadPart,
CreateMultipartUpload and AbortMultipartUpload do not take the key lock (they do not
change the object, and part uploads stay parallel); DeleteObjects (``POST
?delete``) takes no lock.  Twisted's ``HTTPConnectionPool`` retries an idempotent
request (GET, HEAD, DELETE) once when a reused connection closes without an answer,
so a ``refuse``/``cut`` of ``times=1`` on such a request may go unseen by a treq
caller unless its pool has ``retryAutomatically = False``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler
from types import FrameType, TracebackType
from typing import IO, Any, Optional, Sequence, Union

import attrs
from twisted.logger import Logger

from tests.integration.moto import emulator_python

__all__ = [
    "CONTROL_PREFIX",
    "FAULTS",
    "FaultProxy",
    "FaultProxyClient",
    "FaultProxyProcess",
    "FaultRule",
    "S3Target",
    "main",
    "s3_operation",
]

#: The fault names a :class:`FaultRule` accepts.
FAULTS = ("refuse", "stall", "cut", "error5xx", "drop_answer")

#: Where the control API lives (S3 bucket names cannot begin with ``_``).
CONTROL_PREFIX = "/_faultproxy"

#: Methods that write (the only ones ``drop_answer`` applies to).
WRITE_METHODS = frozenset({"PUT", "POST", "DELETE"})

#: Operations that replace or remove the object at a key: they take its lock.
LOCKED_OPERATIONS = frozenset(
    {"PutObject", "CopyObject", "CompleteMultipartUpload", "DeleteObject"}
)

_STALL_AT = ("request", "locked", "response")
_STALL_THEN = ("forward", "close", "cut")
_ERROR_CODES = {500: "InternalError", 503: "SlowDown"}
_ERROR_MESSAGES = {
    "InternalError": "We encountered an internal error. Please try again.",
    "SlowDown": "Please reduce your request rate.",
    "PreconditionFailed": "At least one of the pre-conditions you specified did not hold",
    "ConditionalRequestConflict": (
        "A conflicting conditional operation is currently in progress against this"
        " resource. Please try again."
    ),
}
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
    }
)
_CREDENTIAL_SCOPE = re.compile(r"Credential=[^/,\s]+/\d{8}/([^/,\s]+)/s3/")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- values --------------------------------------------------------------------------


@attrs.frozen
class S3Target:
    """
    A path-style S3 request target, parsed.

    :ivar raw: the request target exactly as received (path and query, encoded).
    :ivar path: its path, still percent-encoded.
    :ivar query: its query, decoded, every name with its list of values (``?uploads``
        gives ``{"uploads": [""]}``).
    :ivar bucket: the first path segment, decoded, or ``None`` for ``/``.
    :ivar key: the rest of the path, decoded, or ``None`` when empty.
    """

    raw: str
    path: str
    query: dict[str, list[str]]
    bucket: Optional[str]
    key: Optional[str]

    @classmethod
    def parse(cls, target: str) -> "S3Target":
        """
        Parse a request target (origin form ``/b/k?x=y``, or absolute form
        ``http://host/b/k``).
        """
        parts = urllib.parse.urlsplit(target)
        path = parts.path or "/"
        raw = path + ("?" + parts.query if parts.query else "")
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        bucket_part, _, key_part = path.lstrip("/").partition("/")
        bucket = urllib.parse.unquote(bucket_part) or None
        key = urllib.parse.unquote(key_part) or None
        return cls(raw=raw, path=path, query=query, bucket=bucket, key=key)


def s3_operation(method: str, target: S3Target, copy_source: bool = False) -> str:
    """
    The S3 API operation a path-style request is, by method, path and query: one of
    ``ListBuckets``, ``CreateBucket``, ``HeadBucket``, ``DeleteBucket``,
    ``ListObjects``, ``ListObjectsV2``, ``ListMultipartUploads``, ``DeleteObjects``,
    ``PutObject``, ``CopyObject``, ``UploadPart``, ``UploadPartCopy``,
    ``CreateMultipartUpload``, ``CompleteMultipartUpload``, ``AbortMultipartUpload``,
    ``ListParts``, ``GetObject``, ``HeadObject``, ``DeleteObject``; for other
    sub-resources ``<METHOD>Bucket`` or ``<METHOD>Object`` (``GETBucket``...).

    :param copy_source: whether the request has ``x-amz-copy-source``.
    """
    q = target.query
    if target.bucket is None:
        return "ListBuckets" if method == "GET" else method + "Service"
    if target.key is None:
        if method == "PUT":
            return "CreateBucket" if not q else "PUTBucket"
        if method == "HEAD":
            return "HeadBucket"
        if method == "DELETE":
            return "DeleteBucket" if not q else "DELETEBucket"
        if method == "POST":
            return "DeleteObjects" if "delete" in q else "POSTBucket"
        if method == "GET":
            if "uploads" in q:
                return "ListMultipartUploads"
            if q.get("list-type") == ["2"]:
                return "ListObjectsV2"
            if not (set(q) - {"prefix", "delimiter", "marker", "max-keys", "encoding-type"}):
                return "ListObjects"
        return method + "Bucket"
    upload = "uploadId" in q
    if method == "PUT":
        if upload and "partNumber" in q:
            return "UploadPartCopy" if copy_source else "UploadPart"
        if not q:
            return "CopyObject" if copy_source else "PutObject"
    elif method == "POST":
        if "uploads" in q:
            return "CreateMultipartUpload"
        if upload:
            return "CompleteMultipartUpload"
    elif method == "DELETE":
        if upload:
            return "AbortMultipartUpload"
        if not (set(q) - {"versionId"}):
            return "DeleteObject"
    elif method == "GET":
        if upload:
            return "ListParts"
        if all(n.startswith("response-") or n in ("versionId", "partNumber") for n in q):
            return "GetObject"
    elif method == "HEAD":
        return "HeadObject"
    return method + "Object"


def _tuple_upper(value: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """
    A method filter as an upper-case tuple (a single string is one method).
    """
    if isinstance(value, str):
        value = (value,)
    return tuple(v.upper() for v in value)


def _tuple(value: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """
    An operation filter as a tuple (a single string is one operation).
    """
    if isinstance(value, str):
        value = (value,)
    return tuple(value)


@attrs.frozen(kw_only=True)
class FaultRule:
    """
    One fault and when it fires (see the module's docstring for each fault).

    :ivar fault: one of :data:`FAULTS`.
    :ivar times: fire for the next this many matching requests, then never (``None``:
        no limit).
    :ivar probability: fire for a matching request with this probability, drawn from
        ``random.Random(seed)`` (``None``: always).
    :ivar seed: the seed of the rule's random generator.
    :ivar methods: only these HTTP methods (empty: any).
    :ivar operations: only these S3 operations, as :func:`s3_operation` names them
        (empty: any).
    :ivar key_prefix: only requests whose decoded key starts with this.
    :ivar seconds: ``stall``: how long, in seconds (``None``: until released, at most
        the proxy's ``max_stall``).
    :ivar at: ``stall``: ``request``, ``locked`` or ``response``.
    :ivar then: ``stall``: ``forward``, ``close`` or ``cut``.
    :ivar status: ``error5xx``: 500 or 503.
    :ivar code: ``error5xx``: the S3 error code (default ``InternalError`` for 500,
        ``SlowDown`` for 503).
    :ivar cut_at: ``cut``: how many bytes of the answer (head included) to send,
        at most all but one (``None``: the head and half the body, or half the
        status line when the body is empty or the request a HEAD).
    :ivar reset: close with a RST instead of a FIN.
    :raises ValueError: on an unknown fault or an invalid parameter.
    """

    fault: str
    times: Optional[int] = None
    probability: Optional[float] = None
    seed: int = 0
    methods: tuple[str, ...] = attrs.field(default=(), converter=_tuple_upper)
    operations: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    key_prefix: Optional[str] = None
    seconds: Optional[float] = None
    at: str = "request"
    then: str = "forward"
    status: int = 503
    code: Optional[str] = None
    cut_at: Optional[int] = None
    reset: bool = False

    def __attrs_post_init__(self) -> None:
        """
        Check the parameters.
        """
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, not {self.fault!r}")
        if self.times is not None and (not isinstance(self.times, int) or self.times < 0):
            raise ValueError(f"times must be a non-negative integer, not {self.times!r}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], not {self.probability!r}")
        if self.seconds is not None and not self.seconds >= 0:
            raise ValueError(f"seconds must be >= 0, not {self.seconds!r}")
        if self.at not in _STALL_AT:
            raise ValueError(f"at must be one of {_STALL_AT}, not {self.at!r}")
        if self.then not in _STALL_THEN:
            raise ValueError(f"then must be one of {_STALL_THEN}, not {self.then!r}")
        if self.fault == "error5xx" and self.status not in _ERROR_CODES:
            raise ValueError(f"status must be 500 or 503, not {self.status!r}")
        if self.cut_at is not None and self.cut_at < 0:
            raise ValueError(f"cut_at must be >= 0, not {self.cut_at!r}")

    @property
    def error_code(self) -> str:
        """
        The S3 error code ``error5xx`` answers with.
        """
        return self.code or _ERROR_CODES.get(self.status, "InternalError")

    def matches(self, method: str, operation: str, key: Optional[str]) -> bool:
        """
        Whether a request passes the filters (``drop_answer`` matches writes only).
        """
        if self.fault == "drop_answer" and method not in WRITE_METHODS:
            return False
        if self.methods and method not in self.methods:
            return False
        if self.operations and operation not in self.operations:
            return False
        if self.key_prefix is not None and not (key or "").startswith(self.key_prefix):
            return False
        return True

    def to_json(self) -> dict[str, Any]:
        """
        The rule as a JSON object (every field; lists for the filters).
        """
        data = attrs.asdict(self)
        data["methods"] = list(self.methods)
        data["operations"] = list(self.operations)
        return data

    @classmethod
    def from_json(cls, data: Any) -> "FaultRule":
        """
        A rule from a JSON object with the field names above.

        :raises ValueError: not an object, an unknown field or an invalid value.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a rule must be a JSON object, not {data!r}")
        known = {a.name for a in attrs.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown rule fields: {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(str(e)) from e


def rules_from_json(data: Any) -> list[FaultRule]:
    """
    Rules from a control-API body: one rule object, a list of them,
    ``{"rules": [...]}``, or ``{"fault": "none"}`` for none.

    :raises ValueError: on anything else.
    """
    if isinstance(data, dict) and set(data) == {"rules"}:
        data = data["rules"]
    if isinstance(data, dict) and data.get("fault") == "none":
        return []
    if isinstance(data, dict):
        return [FaultRule.from_json(data)]
    if isinstance(data, list):
        return [FaultRule.from_json(item) for item in data]
    raise ValueError("expected a rule, a list of rules or {\"rules\": [...]}")


#: The operations whose unknown upload moto answers with a bare 500.
_UPLOAD_OPERATIONS = frozenset({"UploadPart", "UploadPartCopy", "CompleteMultipartUpload"})


def s3_error_document(code: str, message: str, resource: str, extra: str = "") -> bytes:
    """
    S3's XML error document (https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html).
    """
    from xml.sax.saxutils import escape

    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"{extra}<Resource>{escape(resource)}</Resource>"
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId>"
        "<HostId>faultproxy</HostId></Error>"
    ).encode()


def _etags(value: str) -> set[str]:
    """
    The entity tags of an ``If-Match`` value or an ``ETag`` header, without quotes
    or weakness marks.
    """
    out = set()
    for item in value.split(","):
        item = item.strip()
        if item.startswith("W/"):
            item = item[2:]
        out.add(item.strip('"'))
    out.discard("")
    return out


# -- state ---------------------------------------------------------------------------


@attrs.define
class _ArmedRule:
    """
    A rule in use: its remaining count and random generator.
    """

    rule: FaultRule
    remaining: Optional[int]
    rng: random.Random

    @classmethod
    def arm(cls, rule: FaultRule) -> "_ArmedRule":
        """
        A fresh count and a generator seeded with the rule's seed.
        """
        return cls(rule=rule, remaining=rule.times, rng=random.Random(rule.seed))

    def fire(self, method: str, operation: str, key: Optional[str]) -> bool:
        """
        Whether the rule fires for this request (counting it if so).  Draws from the
        generator only for a matching request while the count lasts.
        """
        if self.remaining == 0 or not self.rule.matches(method, operation, key):
            return False
        p = self.rule.probability
        if p is not None and self.rng.random() >= p:
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True


@attrs.define
class _Answer:
    """
    An upstream answer, read whole.
    """

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


@attrs.define(eq=False)
class _Connection:
    """
    One accepted client connection.

    :ivar busy: a request is being handled (not idle between requests).
    :ivar close_after: close it after the current request.
    """

    sock: socket.socket
    address: Any
    busy: bool = False
    close_after: bool = False
    thread: Optional[threading.Thread] = None


@attrs.define(eq=False)
class _KeyState:
    """
    The write lock of one key, how many requests use it, how many conditional writes
    are in progress.
    """

    lock: threading.Lock = attrs.field(factory=threading.Lock)
    users: int = 0
    conditional: int = 0


class _Stats:
    """
    Thread-safe counters (see :meth:`FaultProxy.stats`).
    """

    def __init__(self) -> None:
        """
        All counts zero.
        """
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """
        All counts zero.
        """
        with self._lock:
            self._by_op: dict[str, Counter[str]] = {
                "requests": Counter(),
                "forwarded": Counter(),
                "upstream_errors": Counter(),
            }
            self._faults: dict[str, Counter[str]] = {f: Counter() for f in FAULTS}
            self._conditions: Counter[str] = Counter()
            self._scalars: Counter[str] = Counter()

    def count(self, section: str, operation: str) -> None:
        """
        One more in ``section`` (``requests``, ``forwarded``, ``upstream_errors``)
        for ``operation``.
        """
        with self._lock:
            self._by_op[section][operation] += 1

    def fault(self, fault: str, operation: str) -> None:
        """
        One more ``fault`` injected on ``operation``.
        """
        with self._lock:
            self._faults[fault][operation] += 1

    def condition(self, name: str) -> None:
        """
        One more of a conditional-write outcome.
        """
        with self._lock:
            self._conditions[name] += 1

    def scalar(self, name: str) -> None:
        """
        One more of a per-proxy event (``connections``, ``refused_windows``).
        """
        with self._lock:
            self._scalars[name] += 1

    def snapshot(self) -> dict[str, Any]:
        """
        A copy as plain JSON-friendly dicts.
        """
        with self._lock:
            data: dict[str, Any] = {k: dict(v) for k, v in self._by_op.items()}
            data["faults"] = {k: dict(v) for k, v in self._faults.items()}
            data["fault_totals"] = {k: sum(v.values()) for k, v in self._faults.items()}
            data["conditions"] = {
                name: self._conditions[name]
                for name in (
                    "if_match_checked",
                    "if_match_passed",
                    "precondition_failed",
                    "conditional_conflict",
                    "uploads_aborted",
                    "check_errors",
                    "moto_500_as_nosuchupload",
                )
            }
            data["connections"] = self._scalars["connections"]
            data["refused_windows"] = self._scalars["refused_windows"]
            return data


class _Closed(Exception):
    """
    The client connection is to be closed without (further) answer.
    """


# -- the proxy -----------------------------------------------------------------------


class FaultProxy:
    """
    The proxy: start, set rules, read statistics, stop.  Thread-safe; every method
    returns promptly (``refuse_connections`` within about 50 ms, ``stop`` within
    ``timeout``).

    :ivar upstream: the upstream base URL.
    :ivar port: the listening port once started (0 before).
    :ivar enforce_if_match: whether ``If-Match`` on CompleteMultipartUpload is
        enforced (see the module's docstring).
    :ivar max_stall: the longest any stall or connection refusal lasts, in seconds.
    """

    _log = Logger()
    host = "127.0.0.1"

    def __init__(
        self,
        upstream: str,
        *,
        port: int = 0,
        enforce_if_match: bool = True,
        max_stall: float = 30.0,
        upstream_timeout: float = 30.0,
        client_timeout: float = 60.0,
        credentials: Optional[tuple[str, str]] = ("testing", "testing"),
        region: str = "us-east-1",
    ) -> None:
        """
        :param upstream: ``http://HOST:PORT`` of the S3 server (moto's).
        :param port: the port to listen on (0: one the OS chooses).
        :param enforce_if_match: see :ivar:`enforce_if_match`.
        :param max_stall: see :ivar:`max_stall`.
        :param upstream_timeout: seconds of silence after which an upstream request
            fails (the client then gets 502).
        :param client_timeout: seconds of client silence after which its connection is
            closed (an idle keep-alive connection too).
        :param credentials: access key and secret that sign the proxy's own requests
            (the If-Match HEAD, the abort after a 409) with botocore when it is
            installed; ``None``: unsigned.  Plain moto accepts any.
        :param region: the region to sign for when the client's own ``Authorization``
            does not name one.
        """
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://HOST:PORT, not {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._upstream_host = parts.hostname
        self._upstream_port = parts.port or 80
        self._upstream_netloc = parts.netloc
        self.port = port
        self.enforce_if_match = enforce_if_match
        self.max_stall = max_stall
        self.upstream_timeout = upstream_timeout
        self.client_timeout = client_timeout
        self.credentials = credentials
        self.region = region

        self._mutex = threading.Lock()
        self._rules: list[_ArmedRule] = []
        self._connections: set[_Connection] = set()
        self._upstream_socks: set[socket.socket] = set()
        self._keys: dict[tuple[str, str], _KeyState] = {}
        self._stats = _Stats()
        self._stall_cond = threading.Condition()
        self._release_generation = 0
        self._stalled = 0
        self._refuse_until = 0.0
        self._listener: Optional[socket.socket] = None
        self._listener_closed = threading.Event()
        self._accept_thread: Optional[threading.Thread] = None
        self._started = False
        self._stopping = threading.Event()

    # -- life cycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """
        ``http://127.0.0.1:{port}``.
        """
        return f"http://{self.host}:{self.port}"

    endpoint_url = url

    def env(self, moto_env: dict[str, str]) -> dict[str, str]:
        """
        ``moto_env`` (:meth:`tests.integration.moto.MotoServer.env`) with
        ``AWS_ENDPOINT_URL`` pointing at the proxy.
        """
        return {**moto_env, "AWS_ENDPOINT_URL": self.url}

    def start(self) -> int:
        """
        Listen on ``127.0.0.1`` and start serving; the proxy accepts connections when
        this returns.

        :returns: the port.
        :raises RuntimeError: when started before.
        :raises OSError: when the port cannot be bound.
        """
        if self._started:
            raise RuntimeError("a FaultProxy starts once")
        self._started = True
        self._listener = self._listen(self.port)
        self.port = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self.port

    def stop(self, timeout: float = 5.0) -> None:
        """
        Stop: close the listener and every connection (client and upstream), end the
        stalls (a stalled request's connection is closed without answer), wait at
        most ``timeout`` seconds for the threads.  Harmless when not started or
        already stopped.
        """
        if not self._started or self._stopping.is_set():
            return
        deadline = time.monotonic() + timeout
        self._stopping.set()
        with self._stall_cond:
            self._stall_cond.notify_all()
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        with self._mutex:
            connections = list(self._connections)
            upstream = list(self._upstream_socks)
        for sock in [c.sock for c in connections] + upstream:
            _shutdown(sock)
        for c in connections:
            if c.thread is not None:
                c.thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "FaultProxy":
        """
        Start (``with FaultProxy(url) as proxy:``).
        """
        self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        """
        Stop.
        """
        self.stop()

    # -- control ---------------------------------------------------------------------

    def set_mode(self, *rules: FaultRule) -> None:
        """
        Replace the rules (none: forward everything).  Counts and generators start
        afresh.
        """
        with self._mutex:
            self._rules = [_ArmedRule.arm(r) for r in rules]

    def add_rules(self, *rules: FaultRule) -> None:
        """
        Append rules after the current ones.
        """
        with self._mutex:
            self._rules.extend(_ArmedRule.arm(r) for r in rules)

    def clear_mode(self) -> None:
        """
        No rules.
        """
        self.set_mode()

    def rules(self) -> list[dict[str, Any]]:
        """
        The rules as JSON objects, each with ``remaining`` (``None``: unlimited).
        """
        with self._mutex:
            return [{**a.rule.to_json(), "remaining": a.remaining} for a in self._rules]

    def release(self) -> int:
        """
        End every stall in progress now (each goes on as its rule's ``then`` says).

        :returns: how many were stalled.
        """
        with self._stall_cond:
            self._release_generation += 1
            self._stall_cond.notify_all()
            return self._stalled

    def refuse_connections(self, seconds: float, drop_existing: bool = True) -> None:
        """
        Close the listening socket for ``seconds`` (at most :ivar:`max_stall`), then
        listen on the same port again: meanwhile a connect gets ECONNREFUSED.  Returns
        once the socket is closed.  ``seconds == 0`` listens again now.

        :param drop_existing: also close the open client connections: idle ones now,
            busy ones after their answer (``Connection: close``), so keep-alive
            clients must reconnect.
        :raises ValueError: ``seconds`` out of ``[0, max_stall]``.
        :raises RuntimeError: not running.
        """
        if not 0 <= seconds <= self.max_stall:
            raise ValueError(f"seconds must be in [0, {self.max_stall}], not {seconds!r}")
        if not self._started or self._stopping.is_set():
            raise RuntimeError("the proxy is not running")
        with self._mutex:
            if seconds == 0:
                self._refuse_until = 0.0
                return
            self._refuse_until = max(self._refuse_until, time.monotonic() + seconds)
            idle = []
            if drop_existing:
                for c in self._connections:
                    if c.busy:
                        c.close_after = True
                    else:
                        idle.append(c.sock)
        self._stats.scalar("refused_windows")
        self._log.info("faultproxy {port}: refusing connections for {seconds} s",
                       port=self.port, seconds=seconds)
        for sock in idle:
            _shutdown(sock)
        self._listener_closed.wait(1.0)

    def stats(self) -> dict[str, Any]:
        """
        The counts so far::

            {"requests": {op: n},         # S3 requests received (control excluded)
             "forwarded": {op: n},        # answered by upstream
             "upstream_errors": {op: n},  # upstream failed: the client got 502
             "faults": {fault: {op: n}},  # faults injected, every fault named
             "fault_totals": {fault: n},
             "conditions": {"if_match_checked": n, "if_match_passed": n,
                            "precondition_failed": n, "conditional_conflict": n,
                            "uploads_aborted": n, "check_errors": n,
                            "moto_500_as_nosuchupload": n},
             "connections": n,            # client connections accepted
             "refused_windows": n,        # refuse_connections calls
             "stalled": n}                # requests stalled right now

        ``op`` is the :func:`s3_operation` name.  A stall counts when it begins.
        """
        data = self._stats.snapshot()
        data["stalled"] = self._stalled
        return data

    def reset_stats(self) -> None:
        """
        All counts zero.
        """
        self._stats.reset()

    def reset(self) -> None:
        """
        No rules, every stall released, statistics cleared, listening again.
        """
        self.clear_mode()
        self.release()
        with self._mutex:
            self._refuse_until = 0.0
        self.reset_stats()

    # -- listening -------------------------------------------------------------------

    def _listen(self, port: int) -> socket.socket:
        """
        A listening socket on 127.0.0.1:``port``.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._listener_closed.clear()
        return sock

    def _accept_loop(self) -> None:
        """
        Accept connections (polling every 50 ms), close and reopen the listener for
        :meth:`refuse_connections`, until stopped.
        """
        warned = False
        while not self._stopping.is_set():
            with self._mutex:
                refuse_for = self._refuse_until - time.monotonic()
            if refuse_for > 0:
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                self._listener_closed.set()
                time.sleep(min(0.02, refuse_for))
                continue
            if self._listener is None:
                try:
                    self._listener = self._listen(self.port)
                except OSError as e:
                    if not warned:
                        self._log.warn("faultproxy {port}: cannot listen again: {error}"
                                       " (retrying every 50 ms)", port=self.port, error=e)
                        warned = True
                    time.sleep(0.05)
                    continue
                warned = False
            try:
                readable, _, _ = select.select([self._listener], [], [], 0.05)
                if not readable:
                    continue
                sock, address = self._listener.accept()
            except OSError:
                continue
            self._spawn(sock, address)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._listener_closed.set()

    def _spawn(self, sock: socket.socket, address: Any) -> None:
        """
        Serve one accepted connection in a thread of its own.
        """
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = _Connection(sock=sock, address=address)
        thread = threading.Thread(
            target=self._serve, args=(connection,), name=f"faultproxy-{self.port}-conn",
            daemon=True,
        )
        connection.thread = thread
        with self._mutex:
            self._connections.add(connection)
        self._stats.scalar("connections")
        thread.start()

    def _serve(self, connection: _Connection) -> None:
        """
        Handle the requests of one connection until it closes.
        """
        try:
            _Handler(connection, self)
        except OSError:
            pass  # the client went away, or stop() shut the socket
        except Exception:
            self._log.failure("faultproxy {port}: connection handler failed", port=self.port)
        finally:
            with self._mutex:
                self._connections.discard(connection)
            try:
                connection.sock.close()
            except OSError:
                pass

    def _set_busy(self, connection: _Connection, busy: bool) -> bool:
        """
        Mark a connection busy or idle.

        :returns: whether it is to be closed after this request.
        """
        with self._mutex:
            connection.busy = busy
            return connection.close_after or self._stopping.is_set()

    def _closing(self, connection: _Connection) -> bool:
        """
        Whether a connection is to be closed after its current request.
        """
        with self._mutex:
            return connection.close_after or self._stopping.is_set()

    # -- one request -----------------------------------------------------------------

    def _handle(self, h: "_Handler") -> None:
        """
        Handle one parsed request: control API, or fault rules and forwarding.
        """
        try:
            body = _read_body(h)
        except (ValueError, OSError):
            h.close_connection = True
            return
        target = S3Target.parse(h.path)
        if target.path == CONTROL_PREFIX or target.path.startswith(CONTROL_PREFIX + "/"):
            self._control(h, target, body)
            return
        method = h.command
        operation = s3_operation(method, target, "x-amz-copy-source" in h.headers)
        self._stats.count("requests", operation)
        rule = self._pick_rule(method, operation, target.key)
        try:
            self._apply(h, method, target, operation, body, rule)
        except _Closed as closed:
            _close(h, reset=bool(closed.args and closed.args[0]))
        except OSError:
            h.close_connection = True

    def _pick_rule(self, method: str, operation: str, key: Optional[str]) -> Optional[FaultRule]:
        """
        The first rule that fires for this request, if any.
        """
        with self._mutex:
            for armed in self._rules:
                if armed.fire(method, operation, key):
                    return armed.rule
        return None

    def _apply(
        self,
        h: "_Handler",
        method: str,
        target: S3Target,
        operation: str,
        body: bytes,
        rule: Optional[FaultRule],
    ) -> None:
        """
        Inject ``rule``'s fault around forwarding the request.

        :raises _Closed: close the connection without (more of an) answer.
        """
        fault = rule.fault if rule is not None else None
        if rule is not None:
            self._log.info(
                "faultproxy {port}: {fault} on {operation} {method} {target}",
                port=self.port, fault=fault, operation=operation, method=method,
                target=target.raw,
            )
        if rule is not None and fault == "refuse":
            self._stats.fault("refuse", operation)
            raise _Closed(rule.reset)
        if rule is not None and fault == "error5xx":
            self._stats.fault("error5xx", operation)
            code = rule.error_code
            self._send_error(h, rule.status, code, target)
            return
        if rule is not None and fault == "stall" and rule.at == "request":
            self._stall(rule, operation)
            if rule.then == "close":
                raise _Closed(rule.reset)
        answer = self._exchange(h, method, target, operation, body, rule)
        if answer is None:
            return
        if rule is not None and fault == "stall" and rule.at == "response":
            self._stall(rule, operation)
            if rule.then == "close":
                raise _Closed(rule.reset)
        if rule is not None and (fault == "cut" or (fault == "stall" and rule.then == "cut")):
            if fault == "cut":
                self._stats.fault("cut", operation)
            raw = self._render(h, answer.status, answer.reason, answer.headers, answer.body)
            head_len = raw.index(b"\r\n\r\n") + 4
            if rule.cut_at is not None:
                keep = rule.cut_at
            elif len(raw) > head_len and h.command != "HEAD":
                keep = head_len + (len(raw) - head_len) // 2
            else:
                # Within the status line: a truncated header block that ends at EOF
                # passes for a whole one with some clients (http.client).
                keep = raw.index(b"\r\n") // 2
            h.wfile.write(raw[: min(keep, len(raw) - 1)])
            raise _Closed(rule.reset)
        if rule is not None and fault == "drop_answer":
            self._stats.fault("drop_answer", operation)
            raise _Closed(rule.reset)
        h.wfile.write(self._render(h, answer.status, answer.reason, answer.headers, answer.body))

    def _stall(self, rule: FaultRule, operation: str) -> None:
        """
        Hold the calling thread ``rule.seconds`` (or until released, at most
        :ivar:`max_stall`).

        :raises _Closed: the proxy is stopping.
        """
        self._stats.fault("stall", operation)
        seconds = self.max_stall if rule.seconds is None else min(rule.seconds, self.max_stall)
        deadline = time.monotonic() + seconds
        with self._stall_cond:
            generation = self._release_generation
            self._stalled += 1
            try:
                while not self._stopping.is_set() and generation == self._release_generation:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._stall_cond.wait(left)
            finally:
                self._stalled -= 1
        if self._stopping.is_set():
            raise _Closed(False)

    def _exchange(
        self,
        h: "_Handler",
        method: str,
        target: S3Target,
        operation: str,
        body: bytes,
        rule: Optional[FaultRule],
    ) -> Optional[_Answer]:
        """
        Forward the request (under its key's lock when it changes the object, with the
        conditional-write checks), or answer it here.

        :returns: the upstream answer to send, or ``None`` when answered already.
        :raises _Closed: as the rule says.
        """
        stall_locked = rule is not None and rule.fault == "stall" and rule.at == "locked"
        headers = list(h.headers.items())
        if operation not in LOCKED_OPERATIONS or target.bucket is None or target.key is None:
            if stall_locked:
                assert rule is not None
                self._stall(rule, operation)
                if rule.then == "close":
                    raise _Closed(rule.reset)
            return self._forward_counted(h, method, target.raw, headers, body, operation)
        if_match = h.headers.get("If-Match")
        conditional = if_match is not None or h.headers.get("If-None-Match") is not None
        is_complete = operation == "CompleteMultipartUpload"
        name = (target.bucket, target.key)
        claimed = False
        with self._mutex:
            state = self._keys.setdefault(name, _KeyState())
            state.users += 1
            conflict = conditional and is_complete and state.conditional > 0
            if conditional and not conflict:
                state.conditional += 1
                claimed = True
        try:
            if conflict:
                self._stats.condition("conditional_conflict")
                self._abort_upload(h, target)
                self._send_error(h, 409, "ConditionalRequestConflict", target)
                return None
            if not self._acquire(state.lock):
                if self._stopping.is_set():
                    raise _Closed(False)
                self._send_error(h, 503, "SlowDown", target)
                return None
            try:
                if is_complete and if_match is not None and self.enforce_if_match:
                    self._stats.condition("if_match_checked")
                    verdict = self._check_if_match(h, target, if_match)
                    if verdict is None:
                        self._stats.condition("check_errors")
                        self._send_error(h, 503, "SlowDown", target)
                        return None
                    if not verdict:
                        self._stats.condition("precondition_failed")
                        self._send_error(
                            h, 412, "PreconditionFailed", target,
                            extra="<Condition>If-Match</Condition>",
                        )
                        return None
                    self._stats.condition("if_match_passed")
                if stall_locked:
                    assert rule is not None
                    self._stall(rule, operation)
                    if rule.then == "close":
                        raise _Closed(rule.reset)
                return self._forward_counted(h, method, target.raw, headers, body, operation)
            finally:
                state.lock.release()
        finally:
            with self._mutex:
                if claimed:
                    state.conditional -= 1
                state.users -= 1
                if state.users == 0:
                    del self._keys[name]

    def _acquire(self, lock: threading.Lock) -> bool:
        """
        Take a key lock, waiting at most ``max_stall + upstream_timeout`` seconds and
        giving up when the proxy stops.
        """
        deadline = time.monotonic() + self.max_stall + self.upstream_timeout
        while not self._stopping.is_set() and time.monotonic() < deadline:
            if lock.acquire(timeout=0.1):
                return True
        return False

    def _check_if_match(self, h: "_Handler", target: S3Target, if_match: str) -> Optional[bool]:
        """
        HEAD the key upstream and compare its ETag with ``If-Match``.

        :returns: whether it matches (a missing key does not), ``None`` when the HEAD
            failed otherwise.
        """
        try:
            answer = self._internal(h, "HEAD", target.path)
        except (OSError, http.client.HTTPException):
            return None
        if answer.status == 404:
            return False
        if answer.status != 200:
            return None
        etag = next((v for k, v in answer.headers if k.lower() == "etag"), "")
        wanted = _etags(if_match)
        return "*" in wanted or bool(_etags(etag) & wanted)

    def _abort_upload(self, h: "_Handler", target: S3Target) -> None:
        """
        AbortMultipartUpload upstream for the upload a Complete names (best effort).
        """
        upload_id = target.query.get("uploadId", [""])[0]
        query = urllib.parse.urlencode({"uploadId": upload_id}, quote_via=urllib.parse.quote)
        try:
            answer = self._internal(h, "DELETE", target.path + "?" + query)
        except (OSError, http.client.HTTPException):
            return
        if answer.status in (200, 204):
            self._stats.condition("uploads_aborted")

    def _internal(self, h: "_Handler", method: str, path: str) -> _Answer:
        """
        A request of the proxy's own upstream, signed with :ivar:`credentials` (for
        the region the client signed for) when botocore is installed.
        """
        headers = {"Host": self._upstream_netloc}
        if self.credentials is not None:
            try:
                from botocore.auth import S3SigV4Auth
                from botocore.awsrequest import AWSRequest
                from botocore.credentials import Credentials
            except ImportError:
                pass
            else:
                match = _CREDENTIAL_SCOPE.search(h.headers.get("Authorization", ""))
                region = match.group(1) if match else self.region
                request = AWSRequest(method=method, url=self.upstream + path, headers=headers)
                S3SigV4Auth(Credentials(*self.credentials), "s3", region).add_auth(request)
                headers = dict(request.headers.items())
        return self._forward(method, path, list(headers.items()), b"")

    def _forward_counted(
        self,
        h: "_Handler",
        method: str,
        raw_target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        operation: str,
    ) -> Optional[_Answer]:
        """
        Forward the client's request; on an upstream failure answer 502 here.
        """
        try:
            answer = self._forward(method, raw_target, headers, body)
        except (OSError, http.client.HTTPException) as e:
            if self._stopping.is_set():
                raise _Closed(False) from e
            self._stats.count("upstream_errors", operation)
            self._log.warn("faultproxy {port}: upstream failed on {operation}: {error}",
                           port=self.port, operation=operation, error=e)
            status, reason = 502, "Bad Gateway"
            body = s3_error_document("BadGateway", f"faultproxy: upstream failed: {e}",
                                     raw_target)
            h.wfile.write(self._render(
                h, status, reason, [("Content-Type", "application/xml")], body
            ))
            return None
        self._stats.count("forwarded", operation)
        return self._faithful_no_such_upload(h, answer, raw_target, operation)

    def _faithful_no_such_upload(
        self, h: "_Handler", answer: _Answer, raw_target: str, operation: str
    ) -> _Answer:
        """
        Hide one more gap of moto's: UploadPart, UploadPartCopy or
        CompleteMultipartUpload of an upload that was aborted or completed gets a
        bare HTML 500 from moto 5.2.5 (a ``KeyError`` in ``dest_bucket.multiparts``),
        where S3 answers ``404 NoSuchUpload``
        (https://docs.aws.amazon.com/AmazonS3/latest/API/API_UploadPart.html).  On
        such a 500 ask moto (ListParts, which does answer NoSuchUpload) and, when the
        upload is gone, answer S3's 404 instead (counted in the stats' conditions as
        ``moto_500_as_nosuchupload``).
        """
        if answer.status != 500 or operation not in _UPLOAD_OPERATIONS:
            return answer
        target = S3Target.parse(raw_target)
        upload_id = target.query.get("uploadId", [""])[0]
        try:
            check = self._internal(
                h, "GET", target.path + "?uploadId=" + urllib.parse.quote(upload_id, safe="")
            )
        except (OSError, http.client.HTTPException):
            return answer
        if check.status != 404 or b"NoSuchUpload" not in check.body:
            return answer
        self._stats.condition("moto_500_as_nosuchupload")
        answer.status, answer.reason = 404, "Not Found"
        answer.body = s3_error_document(
            "NoSuchUpload",
            "The specified upload does not exist. The upload ID may be invalid, or the"
            " upload may have been aborted or completed.",
            target.path,
            f"<UploadId>{upload_id}</UploadId>",
        )
        answer.headers = [("Content-Type", "application/xml")]
        return answer

    def _forward(
        self, method: str, raw_target: str, headers: list[tuple[str, str]], body: bytes
    ) -> _Answer:
        """
        One request upstream on a connection of its own, the answer read whole.
        Hop-by-hop headers are dropped; ``Host`` is kept as the client sent it (it is
        signed).

        :raises OSError: / :raises http.client.HTTPException: on upstream failure.
        """
        conn = http.client.HTTPConnection(
            self._upstream_host, self._upstream_port, timeout=self.upstream_timeout
        )
        try:
            conn.connect()
            assert conn.sock is not None
            sock: socket.socket = conn.sock
            with self._mutex:
                if self._stopping.is_set():
                    raise ConnectionAbortedError("the proxy is stopping")
                self._upstream_socks.add(sock)
            try:
                conn.putrequest(method, raw_target, skip_host=True, skip_accept_encoding=True)
                has_host = False
                for name, value in headers:
                    lower = name.lower()
                    if lower in _HOP_BY_HOP:
                        continue
                    has_host = has_host or lower == "host"
                    conn.putheader(name, value)
                if not has_host:
                    conn.putheader("Host", self._upstream_netloc)
                if body or method in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.putheader("Connection", "close")
                conn.endheaders(body or None)
                response = conn.getresponse()
                data = response.read()
                return _Answer(
                    status=response.status,
                    reason=response.reason,
                    headers=response.getheaders(),
                    body=data,
                )
            finally:
                with self._mutex:
                    self._upstream_socks.discard(sock)
        finally:
            conn.close()

    # -- answers ---------------------------------------------------------------------

    def _render(
        self,
        h: "_Handler",
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> bytes:
        """
        A whole HTTP/1.1 answer: status line, headers (hop-by-hop dropped,
        ``Content-Length`` set, except a HEAD's, which is kept), body (none for HEAD,
        1xx, 204, 304).
        """
        no_body = h.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        lines = [f"HTTP/1.1 {status} {reason}"]
        for name, value in headers:
            lower = name.lower()
            if lower == "content-length" and h.command == "HEAD":
                lines.append(f"{name}: {value}")
            elif lower not in _HOP_BY_HOP:
                lines.append(f"{name}: {value}")
        if h.command != "HEAD" and status not in (204, 304):
            lines.append(f"Content-Length: {len(body)}")
        if h.close_connection or self._closing(h.connection_state):
            h.close_connection = True
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + (b"" if no_body else body)

    def _send_error(
        self, h: "_Handler", status: int, code: str, target: S3Target, extra: str = ""
    ) -> None:
        """
        Answer with S3's XML error document; the connection stays open.
        """
        reasons = {409: "Conflict", 412: "Precondition Failed", 500: "Internal Server Error",
                   503: "Slow Down"}
        body = s3_error_document(code, _ERROR_MESSAGES.get(code, code), target.path, extra)
        headers = [
            ("Content-Type", "application/xml"),
            ("x-amz-request-id", uuid.uuid4().hex[:16].upper()),
            ("Server", "faultproxy"),
        ]
        h.wfile.write(self._render(h, status, reasons.get(status, "Error"), headers, body))

    def _send_json(self, h: "_Handler", status: int, data: Any) -> None:
        """
        A control-API answer.
        """
        body = json.dumps(data, sort_keys=True).encode()
        h.wfile.write(self._render(
            h, status, "OK" if status == 200 else "Error",
            [("Content-Type", "application/json")], body,
        ))

    def _control(self, h: "_Handler", target: S3Target, body: bytes) -> None:
        """
        The control API (see the module's docstring).
        """
        name = target.path[len(CONTROL_PREFIX):].strip("/")
        method = h.command
        try:
            data = json.loads(body) if body.strip() else None
            result: Any
            if (method, name) == ("GET", "stats"):
                result = self.stats()
            elif (method, name) in (("POST", "stats/reset"), ("DELETE", "stats")):
                self.reset_stats()
                result = self.stats()
            elif (method, name) == ("GET", "mode"):
                result = {"rules": self.rules()}
            elif (method, name) == ("POST", "mode"):
                self.set_mode(*rules_from_json(data))
                result = {"rules": self.rules()}
            elif (method, name) == ("POST", "rules"):
                self.add_rules(*rules_from_json(data))
                result = {"rules": self.rules()}
            elif (method, name) == ("DELETE", "mode"):
                self.clear_mode()
                result = {"rules": []}
            elif (method, name) == ("POST", "release"):
                result = {"released": self.release()}
            elif (method, name) == ("POST", "refuse-connections"):
                data = data or {}
                self.refuse_connections(
                    float(data["seconds"]), bool(data.get("drop_existing", True))
                )
                result = {"refusing": float(data["seconds"])}
            elif (method, name) == ("POST", "reset"):
                self.reset()
                result = self.stats()
            elif (method, name) == ("POST", "config"):
                if not isinstance(data, dict) or set(data) - {"enforce_if_match"}:
                    raise ValueError('expected {"enforce_if_match": bool}')
                if "enforce_if_match" in data:
                    self.enforce_if_match = bool(data["enforce_if_match"])
                result = {"enforce_if_match": self.enforce_if_match}
            elif (method, name) == ("GET", "config"):
                result = {"enforce_if_match": self.enforce_if_match}
            else:
                self._send_json(h, 404, {"error": f"no control {method} {target.path}"})
                return
        except (ValueError, TypeError, KeyError) as e:
            self._send_json(h, 400, {"error": str(e)})
            return
        self._send_json(h, 200, result)


class _Handler(BaseHTTPRequestHandler):
    """
    The HTTP/1.1 server side of one client connection (keep-alive, ``Expect:
    100-continue``); every method goes to :meth:`FaultProxy._handle`.
    """

    protocol_version = "HTTP/1.1"
    server_version = "faultproxy"

    def __init__(self, connection: _Connection, proxy: FaultProxy) -> None:
        """
        Serve ``connection`` until it closes (runs in the constructor, as
        ``socketserver`` handlers do).
        """
        self.connection_state = connection
        self.proxy = proxy
        super().__init__(connection.sock, connection.address, proxy)  # type: ignore[arg-type]

    def setup(self) -> None:
        """
        Buffered reading, unbuffered writing, the proxy's client timeout.
        """
        super().setup()
        self.connection.settimeout(self.proxy.client_timeout)

    def handle_one_request(self) -> None:
        """
        One request; the connection counts as idle again afterwards.
        """
        try:
            super().handle_one_request()
        finally:
            if self.proxy._set_busy(self.connection_state, False):
                self.close_connection = True

    def parse_request(self) -> bool:
        """
        The request line came: the connection is busy.
        """
        closing = self.proxy._set_busy(self.connection_state, True)
        ok = super().parse_request()
        if closing:
            self.close_connection = True
        return ok

    def _dispatch(self) -> None:
        """
        Any method.
        """
        self.proxy._handle(self)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        """
        Quiet (the proxy logs faults itself).
        """


def _read_body(h: _Handler) -> bytes:
    """
    The request body: ``Content-Length`` bytes, or a chunked body decoded.

    :raises ValueError: a malformed length or chunk, or the client closed early.
    """
    if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            line = h.rfile.readline(1024)
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while h.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunk = h.rfile.read(size)
            if len(chunk) != size:
                raise ValueError("short chunk")
            chunks.append(chunk)
            h.rfile.readline(1024)
    length = int(h.headers.get("Content-Length") or 0)
    if length < 0:
        raise ValueError("negative Content-Length")
    data = h.rfile.read(length) if length else b""
    if len(data) != length:
        raise ValueError("short body")
    return data


def _shutdown(sock: socket.socket) -> None:
    """
    Shut a socket both ways (a FIN; wakes its reader), ignoring errors.
    """
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close(h: _Handler, reset: bool) -> None:
    """
    Close the client connection without (more of an) answer: a FIN now, or a RST
    when the socket is closed (``SO_LINGER`` 0).
    """
    h.close_connection = True
    sock = h.connection_state.sock
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- another process -----------------------------------------------------------------


class FaultProxyClient:
    """
    The control API of a proxy in another process (synchronous, ``urllib``).

    :ivar url: the proxy's ``http://127.0.0.1:PORT``.
    """

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        """
        :param url: the proxy's base URL.
        :param timeout: seconds per control request.
        """
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, method: str, name: str, data: Any = None) -> Any:
        """
        One control request; the decoded JSON answer.

        :raises RuntimeError: on a 4xx answer (its error message).
        """
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(
            f"{self.url}{CONTROL_PREFIX}/{name}", data=body, method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"faultproxy control {method} {name}: {e.code} {e.read()!r}") from e

    def set_mode(self, *rules: Union[FaultRule, dict[str, Any]]) -> list[dict[str, Any]]:
        """
        Replace the rules (none: forward everything); the rules now in force.
        """
        result = self._call("POST", "mode", {"rules": [_rule_json(r) for r in rules]})
        return list(result["rules"])

    def add_rules(self, *rules: Union[FaultRule, dict[str, Any]]) -> list[dict[str, Any]]:
        """
        Append rules; the rules now in force.
        """
        result = self._call("POST", "rules", {"rules": [_rule_json(r) for r in rules]})
        return list(result["rules"])

    def clear_mode(self) -> None:
        """
        No rules.
        """
        self._call("DELETE", "mode")

    def rules(self) -> list[dict[str, Any]]:
        """
        The rules in force, each with ``remaining``.
        """
        return list(self._call("GET", "mode")["rules"])

    def stats(self) -> dict[str, Any]:
        """
        :meth:`FaultProxy.stats`.
        """
        result: dict[str, Any] = self._call("GET", "stats")
        return result

    def reset_stats(self) -> None:
        """
        All counts zero.
        """
        self._call("POST", "stats/reset")

    def release(self) -> int:
        """
        End every stall now; how many there were.
        """
        return int(self._call("POST", "release")["released"])

    def refuse_connections(self, seconds: float, drop_existing: bool = True) -> None:
        """
        :meth:`FaultProxy.refuse_connections` (the control API too is unreachable for
        ``seconds``).
        """
        self._call(
            "POST", "refuse-connections", {"seconds": seconds, "drop_existing": drop_existing}
        )

    def reset(self) -> None:
        """
        No rules, stalls released, statistics cleared.
        """
        self._call("POST", "reset")

    def configure(self, *, enforce_if_match: bool) -> None:
        """
        Switch If-Match enforcement on CompleteMultipartUpload on or off.
        """
        self._call("POST", "config", {"enforce_if_match": enforce_if_match})


def _rule_json(rule: Union[FaultRule, dict[str, Any]]) -> dict[str, Any]:
    """
    A rule as JSON (a dict as it is: the proxy checks it).
    """
    if isinstance(rule, FaultRule):
        return rule.to_json()
    return rule


class FaultProxyProcess:
    """
    ``python -m tests.integration.faultproxy`` as a child process (on
    :func:`tests.integration.moto.emulator_python`), which also exits
    when this process dies (its stdin, a pipe from here, closes).

    :ivar port: its port once started (0 before).
    """

    def __init__(self, upstream: str, extra_args: Sequence[str] = ()) -> None:
        """
        :param upstream: the S3 server's base URL.
        :param extra_args: more command-line options (``--max-stall 5``...).
        """
        self.upstream = upstream
        self.extra_args = list(extra_args)
        self.port = 0
        self.process: Optional[subprocess.Popen[bytes]] = None
        self._stderr: Optional[IO[bytes]] = None

    @property
    def url(self) -> str:
        """
        ``http://127.0.0.1:{port}``.
        """
        return f"http://127.0.0.1:{self.port}"

    @property
    def client(self) -> FaultProxyClient:
        """
        A control client for it.
        """
        return FaultProxyClient(self.url)

    def start(self, timeout: float = 10.0) -> int:
        """
        Start it and read its port from the first line of its stdout.

        :returns: the port.
        :raises RuntimeError: when no port line comes within ``timeout`` seconds.
        """
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [emulator_python(), "-m", "tests.integration.faultproxy",
             "--upstream", self.upstream, "--port", "0", "--exit-on-stdin-eof",
             *self.extra_args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            cwd=_ROOT,
        )
        assert self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else b""
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"faultproxy did not print its port: {line!r}")
        self.port = int(line)
        return self.port

    def stderr(self) -> str:
        """
        What it wrote to stderr so far.
        """
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def stop(self, timeout: float = 5.0) -> Optional[int]:
        """
        SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status.
        """
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
        return process.returncode

    def __enter__(self) -> "FaultProxyProcess":
        """
        Start.
        """
        self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        """
        Stop.
        """
        self.stop()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Run a proxy until SIGTERM or SIGINT: print its port as stdout's first line, log
    to stderr.

    :returns: the exit status (0 after a clean stop).
    """
    parser = argparse.ArgumentParser(
        prog="python -m tests.integration.faultproxy",
        description="Fault-injecting reverse proxy for an S3 server (moto), on 127.0.0.1.",
    )
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of moto")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any)")
    parser.add_argument("--max-stall", type=float, default=30.0,
                        help="longest stall or refusal, seconds")
    parser.add_argument("--upstream-timeout", type=float, default=30.0)
    parser.add_argument("--no-if-match", action="store_true",
                        help="do not enforce If-Match on CompleteMultipartUpload")
    parser.add_argument("--rules", default=None,
                        help="initial rules as JSON (the control API's body forms)")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="also stop when stdin closes (the parent died)")
    args = parser.parse_args(argv)

    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    proxy = FaultProxy(
        args.upstream,
        port=args.port,
        enforce_if_match=not args.no_if_match,
        max_stall=args.max_stall,
        upstream_timeout=args.upstream_timeout,
    )
    if args.rules:
        proxy.set_mode(*rules_from_json(json.loads(args.rules)))
    done = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        """
        Stop on SIGTERM / SIGINT.
        """
        done.set()

    def watch_stdin() -> None:
        """
        Stop when stdin reaches its end.
        """
        fd = sys.stdin.fileno()
        while os.read(fd, 65536):  # unbuffered: no lock held at interpreter exit
            pass
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.exit_on_stdin_eof:
        threading.Thread(target=watch_stdin, daemon=True).start()
    port = proxy.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    while not done.wait(0.2):
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
