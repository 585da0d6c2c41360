"""
:mod:`tests.integration.faultproxy` against moto's real S3 server: every fault as a
client sees it, what lands in moto behind it, the If-Match enforcement on
CompleteMultipartUpload, the statistics, the control API and the child-process form.

moto runs once per test process (:func:`tests.integration.moto.shared_moto`: a skip
when it is not installed, a failure in CI) and is reset before each test; each test
has a proxy of its own, stopped in cleanup.  Requests go through ``http.client`` (one
connection per request unless a test says otherwise) or treq on a connection pool of
the test's own, signed with botocore as :meth:`MotoServer.request` signs them.
Every network wait is bounded (5 s a request); the whole test at most ``timeout``.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import threading
import time
from typing import Any, Callable, Optional

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from tests.integration.faultproxy import (
    FaultProxy,
    FaultProxyClient,
    FaultProxyProcess,
    FaultRule,
    S3Target,
    s3_operation,
)
from tests.integration.moto import MotoServer, shared_moto

MiB = 1024 * 1024

#: Seconds any one request of these tests may take.
REQUEST_TIMEOUT = 5.0

Answer = tuple[int, dict[str, str], bytes]


def signed_headers(
    region: str, method: str, url: str, body: bytes, headers: Optional[dict[str, str]] = None
) -> dict[str, str]:
    """
    ``headers`` plus botocore's Signature Version 4 headers for this request.
    """
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    all_headers = {"Content-Type": "application/octet-stream"}
    all_headers.update(headers or {})
    request = AWSRequest(method=method, url=url, data=body, headers=all_headers)
    S3SigV4Auth(Credentials("testing", "testing"), "s3", region).add_auth(request)
    return dict(request.headers.items())


class S3Client:
    """
    Synchronous signed S3 requests to ``127.0.0.1:port`` (the proxy or moto) with
    ``http.client``.

    :ivar port: where to send them.
    :ivar region: what to sign for.
    :ivar bucket: the bucket paths are relative to.
    """

    def __init__(self, port: int, region: str, bucket: str) -> None:
        """
        :param port: see :ivar:`port`.
        :param region: see :ivar:`region`.
        :param bucket: see :ivar:`bucket`.
        """
        self.port = port
        self.region = region
        self.bucket = bucket

    def connection(self) -> http.client.HTTPConnection:
        """
        A new connection (keep-alive: reuse it for several :meth:`request` calls).
        """
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Optional[dict[str, str]] = None,
        conn: Optional[http.client.HTTPConnection] = None,
    ) -> Answer:
        """
        One signed request of ``/{bucket}{path}``.

        :param conn: a connection to use and leave open (default: a new one, closed).
        :returns: ``(status, headers with lowercase names, body)``.
        :raises OSError: / :raises http.client.HTTPException: when the connection
            fails (a refused, closed or cut answer).
        """
        target = f"/{self.bucket}{path}"
        url = f"http://127.0.0.1:{self.port}{target}"
        own = conn is None
        c = self.connection() if conn is None else conn
        try:
            c.request(method, target, body=body,
                      headers=signed_headers(self.region, method, url, body, headers))
            response = c.getresponse()
            data = response.read()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                data,
            )
        finally:
            if own:
                c.close()

    def put(self, key: str, body: bytes, headers: Optional[dict[str, str]] = None) -> Answer:
        """
        PutObject.
        """
        return self.request("PUT", "/" + key, body, headers)

    def get(self, key: str) -> Answer:
        """
        GetObject.
        """
        return self.request("GET", "/" + key)

    def create_upload(self, key: str) -> str:
        """
        CreateMultipartUpload; its upload id.
        """
        status, _, body = self.request("POST", f"/{key}?uploads")
        assert status == 200, (status, body)
        match = re.search(rb"<UploadId>([^<]+)</UploadId>", body)
        assert match is not None, body
        return match.group(1).decode()

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        """
        UploadPart; its ETag.
        """
        status, headers, body = self.request(
            "PUT", f"/{key}?partNumber={number}&uploadId={upload_id}", data
        )
        assert status == 200, (status, body)
        return headers["etag"]

    def complete(
        self,
        key: str,
        upload_id: str,
        etags: list[str],
        headers: Optional[dict[str, str]] = None,
    ) -> Answer:
        """
        CompleteMultipartUpload of parts 1.. with ``etags``.
        """
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
            for n, etag in enumerate(etags, 1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        return self.request(
            "POST", f"/{key}?uploadId={upload_id}", body,
            {"Content-Type": "application/xml", **(headers or {})},
        )

    def list_parts(self, key: str, upload_id: str) -> int:
        """
        ListParts: its status (404 once the upload is gone).
        """
        return self.request("GET", f"/{key}?uploadId={upload_id}")[0]


def error_code(body: bytes) -> Optional[str]:
    """
    The ``<Code>`` of an S3 error document, if any.
    """
    match = re.search(rb"<Code>([^<]+)</Code>", body)
    return match.group(1).decode() if match else None


def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    """
    Poll ``condition`` every 10 ms until it holds.

    :raises AssertionError: when it does not within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {condition}")
        time.sleep(0.01)


class InThread:
    """
    A blocking call run in a thread of its own: its result or exception afterwards.
    """

    def __init__(self, call: Callable[[], Any]) -> None:
        """
        Start ``call`` now.
        """
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self._call = call
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """
        Run the call, keeping what it gives.
        """
        try:
            self.result = self._call()
        except BaseException as e:
            self.error = e

    @property
    def running(self) -> bool:
        """
        Whether the call has not returned yet.
        """
        return self._thread.is_alive()

    def join(self, timeout: float = REQUEST_TIMEOUT) -> Any:
        """
        Wait for the call; its result.

        :raises AssertionError: it is still running after ``timeout`` seconds.
        :raises BaseException: what the call raised.
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


class ProxyTestCase(TestCase):
    """
    A reset moto, a started proxy in front of it (stopped in cleanup), and signed
    clients of both.
    """

    timeout = 20

    def setUp(self) -> None:
        """
        Start (once) and reset moto, start a proxy.
        """
        self.moto: MotoServer = shared_moto()
        self.moto.reset()
        self.proxy = self.make_proxy()
        self.client = S3Client(self.proxy.port, self.moto.region, self.moto.bucket)
        self.direct = S3Client(self.moto.port, self.moto.region, self.moto.bucket)

    def make_proxy(self, **kwargs: Any) -> FaultProxy:
        """
        A started proxy in front of moto, stopped in cleanup.
        """
        proxy = FaultProxy(self.moto.endpoint_url, region=self.moto.region, **kwargs)
        proxy.start()
        self.addCleanup(proxy.stop)
        return proxy

    def pool(self, retry: bool = True) -> HTTPConnectionPool:
        """
        A persistent treq connection pool of this test's own, closed in cleanup.
        """
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.retryAutomatically = retry
        self.addCleanup(pool.closeCachedConnections)
        return pool

    async def treq_request(
        self, pool: HTTPConnectionPool, method: str, path: str, body: bytes = b""
    ) -> Answer:
        """
        One signed request of ``/{bucket}{path}`` through the proxy with treq:
        ``(status, headers with lowercase names, body)``.
        """
        url = f"{self.proxy.url}/{self.moto.bucket}{path}"
        signed = signed_headers(self.moto.region, method, url, body)
        headers = Headers({k: [v] for k, v in signed.items()})
        response = await treq.request(
            method, url, data=body or None, pool=pool, timeout=REQUEST_TIMEOUT,
            headers=headers,
        )
        content = await treq.content(response)
        answer_headers = {
            k.decode().lower(): v[-1].decode()
            for k, v in response.headers.getAllRawHeaders()
        }
        return response.code, answer_headers, content


class ForwardingTests(ProxyTestCase):
    """
    With no rule the proxy is transparent.
    """

    def test_treq_multipart_keepalive(self) -> Deferred[None]:
        """
        A multipart upload with a 5 MiB and a 1 MiB part, its Complete and a GET
        of the object, all through treq's persistent pool, arrive whole, on one
        kept-alive client connection; every operation is counted as forwarded.
        """

        async def run() -> None:
            pool = self.pool()
            pool.maxPersistentPerHost = 1
            key = "logs/big.gz"
            status, _, body = await self.treq_request(pool, "POST", f"/{key}?uploads")
            self.assertEqual(status, 200, body)
            match = re.search(rb"<UploadId>([^<]+)</UploadId>", body)
            assert match is not None
            upload_id = match.group(1).decode()
            data = [random.Random(1).randbytes(5 * MiB), b"tail" * (MiB // 4)]
            etags = []
            for n, part in enumerate(data, 1):
                status, headers, body = await self.treq_request(
                    pool, "PUT", f"/{key}?partNumber={n}&uploadId={upload_id}", part
                )
                self.assertEqual(status, 200, body)
                etags.append(headers["etag"])
            xml = "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
                for n, etag in enumerate(etags, 1)
            )
            status, _, body = await self.treq_request(
                pool, "POST", f"/{key}?uploadId={upload_id}",
                f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode(),
            )
            self.assertEqual((status, error_code(body)), (200, None), body)
            status, _, body = await self.treq_request(pool, "GET", f"/{key}")
            self.assertEqual(status, 200)
            self.assertEqual(body, b"".join(data))
            stats = self.proxy.stats()
            self.assertEqual(stats["connections"], 1)
            self.assertEqual(
                stats["forwarded"],
                {"CreateMultipartUpload": 1, "UploadPart": 2,
                 "CompleteMultipartUpload": 1, "GetObject": 1},
            )
            self.assertEqual(sum(stats["fault_totals"].values()), 0)

        return ensureDeferred(run())

    def test_http_client_keepalive_and_head(self) -> None:
        """
        PUT, HEAD and GET on one ``http.client`` connection: the HEAD keeps moto's
        Content-Length and sends no body, and the connection stays usable.
        """
        conn = self.client.connection()
        self.addCleanup(conn.close)
        status, headers, _ = self.client.request("PUT", "/k", b"12345", conn=conn)
        self.assertEqual(status, 200)
        status, headers, body = self.client.request("HEAD", "/k", conn=conn)
        self.assertEqual((status, headers["content-length"], body), (200, "5", b""))
        self.assertEqual(self.client.request("GET", "/k", conn=conn)[2], b"12345")
        self.assertEqual(self.proxy.stats()["connections"], 1)


class RefuseTests(ProxyTestCase):
    """
    ``refuse`` closes without answering or forwarding; ``refuse_connections`` closes
    the listener.
    """

    def test_refuse_next_request(self) -> None:
        """
        ``times=1``: the next PUT gets its connection closed with no answer and
        does not reach moto; the one after passes.
        """
        self.proxy.set_mode(FaultRule(fault="refuse", times=1))
        self.assertRaises(http.client.RemoteDisconnected, self.client.put, "a", b"1")
        self.assertEqual(self.direct.get("a")[0], 404)
        self.assertEqual(self.client.put("a", b"2")[0], 200)
        stats = self.proxy.stats()
        self.assertEqual(stats["faults"]["refuse"], {"PutObject": 1})
        self.assertEqual(stats["forwarded"], {"PutObject": 1})
        self.assertEqual(stats["requests"], {"PutObject": 2})

    def test_refuse_with_reset(self) -> None:
        """
        ``reset=True`` closes with a RST: the client sees a connection reset.
        """
        self.proxy.set_mode(FaultRule(fault="refuse", reset=True))
        self.assertRaises(ConnectionResetError, self.client.get, "a")

    def test_refuse_treq(self) -> Deferred[None]:
        """
        treq (on a fresh pooled connection) sees ``ResponseNeverReceived``.
        """

        async def run() -> None:
            self.proxy.set_mode(FaultRule(fault="refuse", times=1, methods=("GET",)))
            with self.assertRaises(ResponseNeverReceived):
                await self.treq_request(self.pool(), "GET", "/a")

        return ensureDeferred(run())

    def test_refuse_connections(self) -> None:
        """
        ``refuse_connections(0.5)``: a connect is refused at once, an idle
        keep-alive connection is closed, and after the window the proxy accepts on
        the same port again.
        """
        conn = self.client.connection()
        self.addCleanup(conn.close)
        self.assertEqual(self.client.put("a", b"1")[0], 200)
        self.client.request("GET", "/a", conn=conn)
        started = time.monotonic()
        self.proxy.refuse_connections(0.5)
        self.assertRaises(ConnectionRefusedError, self.client.get, "a")
        assert conn.sock is not None
        conn.sock.settimeout(REQUEST_TIMEOUT)
        self.assertEqual(conn.sock.recv(1), b"")  # closed by the proxy
        wait_for(lambda: time.monotonic() - started > 0.5)
        wait_for(lambda: _connects(self.proxy.port), timeout=2.0)
        self.assertEqual(self.client.get("a")[2], b"1")
        self.assertEqual(self.proxy.stats()["refused_windows"], 1)


class StallTests(ProxyTestCase):
    """
    ``stall`` holds a request for a while, or until released, then goes on.
    """

    def test_stall_seconds_then_forward(self) -> None:
        """
        A 0.4 s stall delays the GET by at least that, then it is answered
        normally; the stall is counted.
        """
        self.direct.put("a", b"x")
        self.proxy.set_mode(FaultRule(fault="stall", seconds=0.4, operations=("GetObject",)))
        started = time.monotonic()
        self.assertEqual(self.client.get("a")[:3:2], (200, b"x"))
        self.assertGreaterEqual(time.monotonic() - started, 0.4)
        self.assertEqual(self.proxy.stats()["faults"]["stall"], {"GetObject": 1})

    def test_stall_until_released(self) -> None:
        """
        ``seconds=None`` holds the request (visible as ``stalled`` in the stats)
        until the control API's release; then it is forwarded.
        """
        self.proxy.set_mode(FaultRule(fault="stall"))
        call = InThread(lambda: self.client.put("a", b"x"))
        wait_for(lambda: self.proxy.stats()["stalled"] == 1)
        time.sleep(0.2)
        self.assertTrue(call.running)
        self.assertEqual(self.direct.get("a")[0], 404)
        self.assertEqual(FaultProxyClient(self.proxy.url).release(), 1)
        self.assertEqual(call.join()[0], 200)
        self.assertEqual(self.direct.get("a")[2], b"x")

    def test_stall_bounded_by_max_stall(self) -> None:
        """
        An unreleased stall ends after the proxy's ``max_stall`` seconds.
        """
        proxy = self.make_proxy(max_stall=0.5)
        client = S3Client(proxy.port, self.moto.region, self.moto.bucket)
        proxy.set_mode(FaultRule(fault="stall"))
        started = time.monotonic()
        self.assertEqual(client.put("a", b"x")[0], 200)
        self.assertTrue(0.5 <= time.monotonic() - started < 3.0)

    def test_stall_response_then_close(self) -> None:
        """
        ``at="response", then="close"``: the PUT lands in moto, the answer is held,
        then the connection is closed without it.
        """
        self.proxy.set_mode(FaultRule(fault="stall", seconds=0.2, at="response", then="close"))
        self.assertRaises(http.client.RemoteDisconnected, self.client.put, "a", b"x")
        self.assertEqual(self.direct.get("a")[2], b"x")

    def test_stall_then_cut(self) -> None:
        """
        ``then="cut"``: after the stall the GET is forwarded and its answer cut.
        """
        self.direct.put("a", b"y" * 1000)
        self.proxy.set_mode(FaultRule(fault="stall", seconds=0.1, then="cut"))
        self.assertRaises(http.client.IncompleteRead, self.client.get, "a")
        self.assertEqual(self.proxy.stats()["faults"]["stall"], {"GetObject": 1})


class CutTests(ProxyTestCase):
    """
    ``cut`` forwards, then sends part of the answer and closes.
    """

    def test_cut_body(self) -> None:
        """
        A GET's answer stops half-way through the body: ``IncompleteRead`` with
        half of it.
        """
        data = bytes(range(256)) * 256
        self.direct.put("a", data)
        self.proxy.set_mode(FaultRule(fault="cut", times=1))
        with self.assertRaises(http.client.IncompleteRead) as caught:
            self.client.get("a")
        self.assertEqual(caught.exception.partial, data[: len(data) // 2])
        self.assertEqual(self.proxy.stats()["faults"]["cut"], {"GetObject": 1})
        self.assertEqual(self.proxy.stats()["forwarded"], {"GetObject": 1})

    def test_cut_empty_answer_lands_write(self) -> None:
        """
        A PUT's answer (no body) is cut inside its status line: the client gets no
        valid answer, the object is in moto.
        """
        self.proxy.set_mode(FaultRule(fault="cut", methods="PUT"))
        self.assertRaises(http.client.BadStatusLine, self.client.put, "a", b"x")
        self.assertEqual(self.direct.get("a")[2], b"x")

    def test_cut_at(self) -> None:
        """
        ``cut_at`` sends exactly that many bytes of the answer.
        """
        self.direct.put("a", b"z" * 100)
        self.proxy.set_mode(FaultRule(fault="cut", cut_at=12))
        url = f"{self.proxy.url}/{self.moto.bucket}/a"
        headers = signed_headers(self.moto.region, "GET", url, b"")
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        with socket.create_connection(("127.0.0.1", self.proxy.port), 5) as sock:
            sock.sendall(
                f"GET /{self.moto.bucket}/a HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{self.proxy.port}\r\n{head}\r\n".encode()
            )
            received = b""
            while chunk := sock.recv(4096):
                received += chunk
        self.assertEqual(received, b"HTTP/1.1 200")

    def test_cut_treq(self) -> Deferred[None]:
        """
        treq sees ``ResponseFailed`` for a cut body.
        """

        async def run() -> None:
            self.direct.put("a", b"q" * 10000)
            self.proxy.set_mode(FaultRule(fault="cut"))
            with self.assertRaises(ResponseFailed):
                await self.treq_request(self.pool(retry=False), "GET", "/a")

        return ensureDeferred(run())


class ErrorTests(ProxyTestCase):
    """
    ``error5xx`` answers S3's XML errors without forwarding.
    """

    def test_slowdown_on_upload_part(self) -> None:
        """
        ``status=503`` on UploadPart: 503 ``SlowDown`` with an ``<Error>`` document,
        the part never reaches moto, the connection stays usable, other operations
        pass.
        """
        upload_id = self.client.create_upload("k")
        self.proxy.set_mode(FaultRule(fault="error5xx", status=503, operations="UploadPart"))
        connections = self.proxy.stats()["connections"]
        conn = self.client.connection()
        self.addCleanup(conn.close)
        status, headers, body = self.client.request(
            "PUT", f"/k?partNumber=1&uploadId={upload_id}", b"p" * 1000, conn=conn
        )
        self.assertEqual((status, error_code(body)), (503, "SlowDown"))
        self.assertEqual(headers["content-type"], "application/xml")
        self.assertTrue(body.startswith(b"<?xml"))
        listing = self.direct.request("GET", f"/k?uploadId={upload_id}")[2]
        self.assertNotIn(b"<Part>", listing)
        self.assertEqual(self.client.request("PUT", "/other", b"o", conn=conn)[0], 200)
        stats = self.proxy.stats()
        self.assertEqual(stats["faults"]["error5xx"], {"UploadPart": 1})
        self.assertNotIn("UploadPart", stats["forwarded"])
        self.assertEqual(stats["connections"], connections + 1)

    def test_aborted_upload_answers_no_such_upload(self) -> None:
        """
        UploadPart of an aborted upload: moto itself answers a bare 500; through the
        proxy the client gets S3's 404 NoSuchUpload, and the stats count it.
        """
        upload_id = self.client.create_upload("k")
        self.direct.request("DELETE", f"/k?uploadId={upload_id}")
        path = f"/k?partNumber=1&uploadId={upload_id}"
        self.assertEqual(self.direct.request("PUT", path, b"p")[0], 500)
        status, _, body = self.client.request("PUT", path, b"p")
        self.assertEqual((status, error_code(body)), (404, "NoSuchUpload"))
        self.assertEqual(self.proxy.stats()["conditions"]["moto_500_as_nosuchupload"], 1)

    def test_internal_error_next_two(self) -> None:
        """
        ``status=500, times=2``: two 500 ``InternalError`` answers, then normal ones.
        """
        self.proxy.set_mode(FaultRule(fault="error5xx", status=500, times=2))
        answers = [self.client.put("a", b"x") for _ in range(3)]
        self.assertEqual(
            [(s, error_code(b)) for s, _, b in answers],
            [(500, "InternalError"), (500, "InternalError"), (200, None)],
        )

    def test_seeded_probability(self) -> None:
        """
        ``probability=0.5, seed=7`` faults exactly the HEADs where
        ``random.Random(7).random() < 0.5``; GETs, filtered out, draw nothing.
        """
        self.direct.put("a", b"x")
        self.proxy.set_mode(
            FaultRule(fault="error5xx", probability=0.5, seed=7, methods=("HEAD",))
        )
        expected = []
        rng = random.Random(7)
        observed = []
        for _ in range(16):
            expected.append(503 if rng.random() < 0.5 else 200)
            observed.append(self.client.request("HEAD", "/a")[0])
            self.assertEqual(self.client.get("a")[0], 200)
        self.assertEqual(observed, expected)
        self.assertIn(200, observed)
        self.assertIn(503, observed)


class DropAnswerTests(ProxyTestCase):
    """
    ``drop_answer`` lets a write land and loses its answer.
    """

    def test_put_lands_without_answer(self) -> None:
        """
        The PUT reaches moto (the object is there) but the client's connection is
        closed without an answer.
        """
        self.proxy.set_mode(FaultRule(fault="drop_answer", times=1))
        self.assertRaises(http.client.RemoteDisconnected, self.client.put, "a", b"landed")
        self.assertEqual(self.direct.get("a")[:3:2], (200, b"landed"))
        stats = self.proxy.stats()
        self.assertEqual(stats["faults"]["drop_answer"], {"PutObject": 1})
        self.assertEqual(stats["forwarded"], {"PutObject": 1})

    def test_reads_are_not_dropped(self) -> None:
        """
        A rule without filters applies to writes only: GET and HEAD pass and do not
        use up ``times``; the next DELETE lands unanswered.
        """
        self.direct.put("a", b"x")
        self.proxy.set_mode(FaultRule(fault="drop_answer", times=1))
        self.assertEqual(self.client.get("a")[0], 200)
        self.assertEqual(self.client.request("HEAD", "/a")[0], 200)
        self.assertRaises(
            http.client.RemoteDisconnected, self.client.request, "DELETE", "/a"
        )
        self.assertEqual(self.direct.get("a")[0], 404)

    def test_complete_lands_without_answer_treq(self) -> Deferred[None]:
        """
        treq's CompleteMultipartUpload gets ``ResponseNeverReceived`` while the
        object exists in moto and the upload is gone.
        """

        async def run() -> None:
            upload_id = self.client.create_upload("k")
            etag = self.client.upload_part("k", upload_id, 1, b"part")
            self.proxy.set_mode(
                FaultRule(fault="drop_answer", operations=("CompleteMultipartUpload",))
            )
            xml = f"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag}</ETag></Part></CompleteMultipartUpload>"
            with self.assertRaises(ResponseNeverReceived):
                await self.treq_request(
                    self.pool(), "POST", f"/k?uploadId={upload_id}", xml.encode()
                )
            self.assertEqual(self.direct.get("k")[2], b"part")
            self.assertEqual(self.direct.list_parts("k", upload_id), 404)

        return ensureDeferred(run())


class IfMatchTests(ProxyTestCase):
    """
    The proxy enforces ``If-Match`` on CompleteMultipartUpload, which moto ignores.
    """

    def upload(self, key: str, data: bytes) -> tuple[str, list[str]]:
        """
        A multipart upload of one part through the proxy: its id and part ETags.
        """
        upload_id = self.client.create_upload(key)
        return upload_id, [self.client.upload_part(key, upload_id, 1, data)]

    def test_stale_etag_412_then_current_passes(self) -> None:
        """
        After the object changed, a Complete with its old ETag gets 412
        ``PreconditionFailed``, forwards nothing (the object and the upload stay);
        with the current ETag it replaces the object.
        """
        old = self.client.put("k", b"v1")[1]["etag"]
        current = self.client.put("k", b"v2")[1]["etag"]
        upload_id, etags = self.upload("k", b"v3")
        status, _, body = self.client.complete("k", upload_id, etags, {"If-Match": old})
        self.assertEqual((status, error_code(body)), (412, "PreconditionFailed"))
        self.assertIn(b"<Condition>If-Match</Condition>", body)
        self.assertEqual(self.direct.get("k")[2], b"v2")
        self.assertEqual(self.direct.list_parts("k", upload_id), 200)
        status, _, body = self.client.complete("k", upload_id, etags, {"If-Match": current})
        self.assertEqual((status, error_code(body)), (200, None), body)
        self.assertEqual(self.direct.get("k")[2], b"v3")
        conditions = self.proxy.stats()["conditions"]
        self.assertEqual(
            (conditions["if_match_checked"], conditions["precondition_failed"],
             conditions["if_match_passed"]),
            (2, 1, 1),
        )
        self.assertEqual(self.proxy.stats()["forwarded"]["CompleteMultipartUpload"], 1)

    def test_missing_key_412(self) -> None:
        """
        If-Match on a key that does not exist: 412, nothing created.
        """
        upload_id, etags = self.upload("k", b"v")
        status, _, body = self.client.complete("k", upload_id, etags, {"If-Match": '"abc"'})
        self.assertEqual((status, error_code(body)), (412, "PreconditionFailed"))
        self.assertEqual(self.direct.get("k")[0], 404)

    def test_multipart_etag_matches(self) -> None:
        """
        A multipart object's ETag (``"...-1"``) is matched too, without quotes as
        well.
        """
        upload_id, etags = self.upload("k", b"v1")
        self.assertEqual(self.client.complete("k", upload_id, etags)[0], 200)
        etag = self.direct.request("HEAD", "/k")[1]["etag"]
        self.assertTrue(etag.endswith('-1"'), etag)
        upload_id, etags = self.upload("k", b"v2")
        status, _, body = self.client.complete(
            "k", upload_id, etags, {"If-Match": etag.strip('"')}
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(self.direct.get("k")[2], b"v2")

    def test_disabled_passes_stale(self) -> None:
        """
        With enforcement off (control API ``config``) the proxy forwards a stale
        If-Match and moto replaces the object, as without the proxy.
        """
        FaultProxyClient(self.proxy.url).configure(enforce_if_match=False)
        self.client.put("k", b"v1")
        upload_id, etags = self.upload("k", b"v2")
        status, _, _ = self.client.complete("k", upload_id, etags, {"If-Match": '"stale"'})
        self.assertEqual(status, 200)
        self.assertEqual(self.direct.get("k")[2], b"v2")

    def test_check_and_complete_hold_the_key(self) -> None:
        """
        While a conditional Complete is checked and forwarded (held here by a stall
        ``at="locked"``), a PutObject of the same key waits; it lands after the
        Complete, so the Complete's check saw the state it replaced.  A PUT of
        another key does not wait.
        """
        etag = self.client.put("k", b"v1")[1]["etag"]
        upload_id, etags = self.upload("k", b"v2")
        self.proxy.set_mode(
            FaultRule(fault="stall", at="locked", operations=("CompleteMultipartUpload",))
        )
        complete = InThread(
            lambda: self.client.complete("k", upload_id, etags, {"If-Match": etag})
        )
        wait_for(lambda: self.proxy.stats()["stalled"] == 1)
        put = InThread(lambda: self.client.put("k", b"v3"))
        self.assertEqual(self.client.put("other", b"o")[0], 200)
        # Both PUTs arrived; only "other" (and the first "k") went on to moto.
        wait_for(lambda: self.proxy.stats()["requests"]["PutObject"] == 3)
        time.sleep(0.2)
        self.assertTrue(put.running)
        self.assertEqual(self.proxy.stats()["forwarded"]["PutObject"], 2)
        self.assertEqual(self.direct.get("k")[2], b"v1")
        self.proxy.release()
        self.assertEqual(complete.join()[0], 200)
        self.assertEqual(put.join()[0], 200)
        self.assertEqual(self.direct.get("k")[2], b"v3")

    def test_concurrent_conditional_complete_409(self) -> None:
        """
        A conditional Complete of a key while another conditional write of it is in
        progress gets 409 ``ConditionalRequestConflict`` and its upload is aborted
        in moto; the first one then completes.
        """
        etag = self.client.put("k", b"v1")[1]["etag"]
        first_id, first_etags = self.upload("k", b"first")
        second_id, second_etags = self.upload("k", b"second")
        self.proxy.set_mode(FaultRule(
            fault="stall", at="locked", times=1, operations=("CompleteMultipartUpload",)
        ))
        first = InThread(
            lambda: self.client.complete("k", first_id, first_etags, {"If-Match": etag})
        )
        wait_for(lambda: self.proxy.stats()["stalled"] == 1)
        status, _, body = self.client.complete(
            "k", second_id, second_etags, {"If-Match": etag}
        )
        self.assertEqual((status, error_code(body)), (409, "ConditionalRequestConflict"))
        self.assertEqual(self.direct.list_parts("k", second_id), 404)
        self.proxy.release()
        self.assertEqual(first.join()[0], 200)
        self.assertEqual(self.direct.get("k")[2], b"first")
        conditions = self.proxy.stats()["conditions"]
        self.assertEqual(
            (conditions["conditional_conflict"], conditions["uploads_aborted"]), (1, 1)
        )


class ControlTests(ProxyTestCase):
    """
    The control API and the statistics.
    """

    def test_control_api_round_trip(self) -> None:
        """
        Rules set through ``POST /_faultproxy/mode`` apply and show their remaining
        count; stats read through the API equal the in-process ones; a bad rule is
        a 400; ``reset`` clears rules and counts; control requests are not counted.
        """
        control = FaultProxyClient(self.proxy.url)
        rules = control.set_mode({"fault": "error5xx", "status": 500, "times": 1})
        self.assertEqual(rules[0]["remaining"], 1)
        self.assertEqual(self.client.put("a", b"x")[0], 500)
        self.assertEqual(control.rules()[0]["remaining"], 0)
        self.assertEqual(control.stats(), self.proxy.stats())
        self.assertEqual(control.stats()["faults"]["error5xx"], {"PutObject": 1})
        with self.assertRaises(RuntimeError) as caught:
            control.set_mode({"fault": "explode"})
        self.assertIn("400", str(caught.exception))
        control.add_rules(FaultRule(fault="refuse", key_prefix="logs/"))
        self.assertEqual(self.client.put("a", b"x")[0], 200)
        self.assertRaises(http.client.RemoteDisconnected, self.client.put, "logs/b", b"x")
        control.reset()
        self.assertEqual(control.rules(), [])
        self.assertEqual(self.proxy.stats()["requests"], {})

    def test_refuse_connections_through_control_api(self) -> None:
        """
        ``POST /_faultproxy/refuse-connections`` answers, then connections are
        refused for the window, then accepted.
        """
        control = FaultProxyClient(self.proxy.url)
        control.refuse_connections(0.5)
        self.assertFalse(_connects(self.proxy.port))
        wait_for(lambda: _connects(self.proxy.port), timeout=3.0)
        self.assertEqual(control.stats()["refused_windows"], 1)

    def test_stop_is_prompt(self) -> None:
        """
        ``stop`` with a stalled request and an idle keep-alive connection returns
        within a second; both connections are closed, the stalled one unanswered.
        """
        proxy = self.make_proxy()
        client = S3Client(proxy.port, self.moto.region, self.moto.bucket)
        idle = client.connection()
        self.addCleanup(idle.close)
        client.request("PUT", "/a", b"x", conn=idle)
        proxy.set_mode(FaultRule(fault="stall"))
        stalled = InThread(lambda: client.put("b", b"y"))
        wait_for(lambda: proxy.stats()["stalled"] == 1)
        started = time.monotonic()
        proxy.stop()
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertRaises(http.client.RemoteDisconnected, stalled.join)
        assert idle.sock is not None
        self.assertEqual(idle.sock.recv(1), b"")
        self.assertFalse(_connects(proxy.port))
        self.assertEqual(self.direct.get("b")[0], 404)


class ProcessTests(ProxyTestCase):
    """
    ``python -m tests.integration.faultproxy`` as a child process.
    """

    def test_child_process(self) -> None:
        """
        The child prints its port, forwards, takes rules and serves stats through
        the control API, and exits 0 on SIGTERM.
        """
        child = FaultProxyProcess(self.moto.endpoint_url)
        child.start()
        self.addCleanup(child.stop)
        client = S3Client(child.port, self.moto.region, self.moto.bucket)
        self.assertEqual(client.put("a", b"x")[0], 200)
        child.client.set_mode(FaultRule(fault="error5xx", status=503, times=1))
        self.assertEqual(error_code(client.get("a")[2]), "SlowDown")
        self.assertEqual(client.get("a")[2], b"x")
        stats = child.client.stats()
        self.assertEqual(stats["forwarded"], {"PutObject": 1, "GetObject": 1})
        self.assertEqual(stats["faults"]["error5xx"], {"GetObject": 1})
        self.assertEqual(child.stop(), 0, child.stderr())


class PureTests(SynchronousTestCase):
    """
    Operation names and rule checks, without a network.
    """

    def test_operations(self) -> None:
        """
        Path-style requests are named as the S3 API names them.
        """
        cases = [
            ("GET", "/", False, "ListBuckets"),
            ("PUT", "/b", False, "CreateBucket"),
            ("HEAD", "/b", False, "HeadBucket"),
            ("GET", "/b?list-type=2&prefix=x", False, "ListObjectsV2"),
            ("GET", "/b?uploads&prefix=x", False, "ListMultipartUploads"),
            ("POST", "/b?delete", False, "DeleteObjects"),
            ("PUT", "/b/k/x.gz", False, "PutObject"),
            ("PUT", "/b/k", True, "CopyObject"),
            ("PUT", "/b/k?partNumber=2&uploadId=u", False, "UploadPart"),
            ("PUT", "/b/k?partNumber=2&uploadId=u", True, "UploadPartCopy"),
            ("POST", "/b/k?uploads", False, "CreateMultipartUpload"),
            ("POST", "/b/k?uploadId=u", False, "CompleteMultipartUpload"),
            ("DELETE", "/b/k?uploadId=u", False, "AbortMultipartUpload"),
            ("GET", "/b/k?uploadId=u", False, "ListParts"),
            ("DELETE", "/b/k", False, "DeleteObject"),
            ("GET", "/b/k", False, "GetObject"),
            ("HEAD", "/b/k", False, "HeadObject"),
        ]
        for method, target, copy, name in cases:
            self.assertEqual(s3_operation(method, S3Target.parse(target), copy), name,
                             (method, target))
        self.assertEqual(S3Target.parse("/b/a%20b/c").key, "a b/c")

    def test_rule_validation(self) -> None:
        """
        Unknown faults and fields, and out-of-range values, are refused; a rule
        survives its JSON form.
        """
        self.assertRaises(ValueError, FaultRule, fault="nope")
        self.assertRaises(ValueError, FaultRule, fault="error5xx", status=502)
        self.assertRaises(ValueError, FaultRule, fault="stall", at="later")
        self.assertRaises(ValueError, FaultRule, fault="refuse", probability=2.0)
        self.assertRaises(ValueError, FaultRule.from_json, {"fault": "cut", "x": 1})
        rule = FaultRule(fault="stall", seconds=1.5, methods="put", operations=("PutObject",))
        self.assertEqual(rule.methods, ("PUT",))
        self.assertEqual(FaultRule.from_json(rule.to_json()), rule)


def _connects(port: int) -> bool:
    """
    Whether a TCP connection to ``127.0.0.1:port`` is accepted.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
