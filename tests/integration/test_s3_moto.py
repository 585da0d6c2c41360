"""
:class:`loghandler.storage.s3.client.S3Client` against moto's S3 server: the
IS3Client contract with S3's 5 MiB part minimum, cancellation on a real connection,
and Signature Version 4 checked by moto's IAM.

moto runs once per test process (:func:`tests.integration.moto.shared_moto`) and is
reset before each test.  Each test has its own ``HTTPConnectionPool``, closed in
cleanup.  Without moto these tests skip, and fail when ``CI`` is set.
"""

from __future__ import annotations

import os
from typing import Any
from unittest import SkipTest

from botocore.credentials import Credentials
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface.verify import verifyObject

from loghandler.interfaces import StorageError
from loghandler.storage.s3.api import CompletedPart, IS3Client, ObjectInfo
from loghandler.storage.s3.bucket_checks import conditional_complete_enforced
from loghandler.storage.s3.client import S3Client, build_s3_client
from loghandler.storage.s3.transport import SigV4Transport
from tests.contract import S3ClientContractMixin, body_of
from tests.integration import moto as moto_harness
from tests.integration.moto import EmulatorMissing, MotoServer, shared_moto

MiB = 1024 * 1024


def _client(test: TestCase, moto: MotoServer, access_key: str, secret_key: str) -> S3Client:
    """
    An S3Client on ``moto`` with the given key, on a connection pool of its own that
    is closed when ``test`` ends.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    test.addCleanup(pool.closeCachedConnections)
    return build_s3_client(
        reactor,
        bucket=moto.bucket,
        region=moto.region,
        endpoint_url=moto.endpoint_url,
        credentials=Credentials(access_key, secret_key),
        pool=pool,
    )


class S3ClientMotoContractTests(S3ClientContractMixin, TestCase):
    """
    The IS3Client contract for S3Client on moto, with S3's real 5 MiB minimum part.
    """

    def setUp(self) -> None:
        """
        Start (once) and reset moto.
        """
        self.moto = shared_moto()
        self.moto.reset()

    def make_client(self) -> tuple[Any, int]:
        """
        An S3Client on moto; 5 MiB parts.
        """
        return _client(self, self.moto, self.moto.access_key, self.moto.secret_key), 5 * MiB

    def test_complete_stale_if_match(self) -> None:  # type: ignore[override]
        """
        (Not run: moto does not enforce If-Match on CompleteMultipartUpload.)
        """

    test_complete_stale_if_match.skip = (  # type: ignore[attr-defined]
        "moto 5.2 does not enforce If-Match on CompleteMultipartUpload"
        " (a stale ETag still replaces the object)"
    )

    def test_upload_part_copy_stale_if_match(self) -> None:  # type: ignore[override]
        """
        (Not run: moto ignores x-amz-copy-source-if-match on UploadPartCopy.)
        """

    test_upload_part_copy_stale_if_match.skip = (  # type: ignore[attr-defined]
        "moto 5.2 ignores x-amz-copy-source-if-match on UploadPartCopy"
        " (moto/s3/responses.py upload_part_copy: a stale ETag still copies)"
    )

    def test_no_such_upload_writes(self) -> None:  # type: ignore[override]
        """
        (Not run: moto answers UploadPart and CompleteMultipartUpload of an unknown
        upload with a bare 500.)
        """

    test_no_such_upload_writes.skip = (  # type: ignore[attr-defined]
        "moto 5.2 answers UploadPart and CompleteMultipartUpload of an unknown or"
        " aborted upload with a bare 500 (a KeyError), not 404 NoSuchUpload"
    )


class S3ClientMotoTests(TestCase):
    """
    S3Client behaviour that needs a real server and connection.
    """

    def setUp(self) -> None:
        """
        Start (once) and reset moto; a client on it.
        """
        self.moto = shared_moto()
        self.moto.reset()
        self.client = _client(self, self.moto, self.moto.access_key, self.moto.secret_key)

    def test_provides_interface(self) -> None:
        """
        The built client provides IS3Client.
        """
        self.assertTrue(verifyObject(IS3Client, self.client))

    async def test_check_missing_bucket(self) -> None:
        """
        check() fails with 404 for a missing bucket (HeadBucket).
        """
        other = MotoServer(bucket="no-such-bucket")
        other.port = self.moto.port
        missing = _client(self, other, self.moto.access_key, self.moto.secret_key)
        error = await self.assertFailure(missing.check(), StorageError)
        self.assertEqual((error.operation, error.status), ("HeadBucket", 404))

    async def test_versioning_enabled(self) -> None:
        """
        versioning() reports "Enabled" once the bucket's versioning is switched on.
        """
        body = (
            b'<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            b"<Status>Enabled</Status></VersioningConfiguration>"
        )
        status, _, answer = self.moto.request(
            "PUT", f"/{self.moto.bucket}?versioning", body, {"Content-Type": "application/xml"}
        )
        self.assertEqual(status, 200, answer)
        self.assertEqual(await self.client.versioning(), "Enabled")

    async def test_stored_content_type_and_writes(self) -> None:
        """
        Objects are stored as application/gzip without Content-Encoding, with the
        write IDs as user metadata, whether put or completed from parts (read back
        with the harness's own signed GET).
        """
        await self.client.put("put.gz", b"\x1f\x8b", writes=("w1", "w2"))
        upload_id = await self.client.create_upload("parts.gz", ("w3",))
        etag = await self.client.upload_part("parts.gz", upload_id, 1, b"\x1f\x8b")
        await self.client.complete_upload("parts.gz", upload_id, [CompletedPart(1, etag)])
        for key, writes in (("put.gz", "w1,w2"), ("parts.gz", "w3")):
            status, headers, body = self.moto.request("GET", f"/{self.moto.bucket}/{key}")
            self.assertEqual(
                (
                    status,
                    headers.get("content-type"),
                    headers.get("content-encoding"),
                    headers.get("x-amz-meta-loghandler-writes"),
                    body,
                ),
                (200, "application/gzip", None, writes, b"\x1f\x8b"),
            )

    async def test_cancel_while_body_arrives(self) -> None:
        """
        Cancelling a GET of 20 MiB once its answer began (the next reactor turn after
        the headers) ends it with CancelledError and stops the transfer: the rest of
        the body never arrives.  The client keeps working.
        """
        key = "big.gz"
        size = 20 * MiB
        await self.client.put(key, body_of(size, 9))
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        received = [0]
        calls: list["defer.Deferred[bytes]"] = []

        def counting(reader: Any) -> Any:
            """``reader``, with the bytes it is given counted."""
            original = reader.dataReceived

            def dataReceived(data: bytes) -> None:
                received[0] += len(data)
                original(data)

            reader.dataReceived = dataReceived
            return reader

        class CancelOnHeaders:
            """treq; once an answer's headers arrived, cancel the call."""

            http = HTTPClient(Agent(reactor, pool=pool))

            def request(self, method: str, url: bytes, **kwargs: Any) -> "defer.Deferred[Any]":
                def arrived(response: Any) -> Any:
                    deliver = response.deliverBody
                    response.deliverBody = lambda reader: deliver(counting(reader))
                    reactor.callLater(0, calls[-1].cancel)
                    return response

                return self.http.request(method, url, **kwargs).addCallback(arrived)

        transport = SigV4Transport(
            CancelOnHeaders(),
            self.moto.endpoint_url,
            self.moto.region,
            Credentials(self.moto.access_key, self.moto.secret_key),
        )
        client = S3Client(transport, self.moto.bucket)
        calls.append(client.get(key))
        await self.assertFailure(calls[-1], defer.CancelledError)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertLess(received[0], size)
        self.assertEqual(await self.client.get(key, byte_range=(0, 4)), body_of(4, 9))


class S3ClientSigningTests(TestCase):
    """
    With moto's IAM authentication on, S3Client's Signature Version 4 is checked: the
    right secret works for every call, a wrong one gets 403 SignatureDoesNotMatch.
    """

    def setUp(self) -> None:
        """
        Reset moto, create an IAM user allowed s3:* and an access key for it (through
        botocore's IAM client, while authentication is still off), then switch
        authentication on; it is switched off again in cleanup.
        """
        self.moto = shared_moto()
        self.moto.reset()
        self.access_key, self.secret_key = self.moto.iam_user()
        self.moto.enable_iam_auth()
        self.addCleanup(self.moto.disable_iam_auth)

    async def test_right_secret(self) -> None:
        """
        Every call, with query strings, odd keys, metadata, ranges and conditional
        headers, passes moto's signature check with the right secret.
        """
        client = _client(self, self.moto, self.access_key, self.secret_key)
        key = "signed/dir with space/ü+%=&~!*'().gz"
        self.assertIsNone(await client.check())
        self.assertEqual(await client.versioning(), "")
        etag = await client.put(key, body_of(6 * MiB, 1), if_none_match=True, writes=("w1",))
        self.assertEqual(await client.head(key), ObjectInfo(6 * MiB, etag, ("w1",)))
        self.assertEqual(await client.get(key, etag, (1, 3)), body_of(6 * MiB, 1)[1:3])
        self.assertIsNone(await client.head("signed/missing.gz"))
        upload_id = await client.create_upload(key, ("w1", "w2"))
        copied = await client.upload_part_copy(key, upload_id, 1, key, etag, (0, 5 * MiB))
        part = await client.upload_part(key, upload_id, 2, b"part")
        self.assertEqual([p.number for p in await client.list_parts(key, upload_id)], [1, 2])
        self.assertEqual([u.upload_id for u in await client.list_uploads("signed/")], [upload_id])
        new_etag = await client.complete_upload(
            key, upload_id, [CompletedPart(1, copied), CompletedPart(2, part)], if_match=etag
        )
        self.assertEqual([o.etag for o in await client.list_objects("signed/")], [new_etag])
        other = await client.create_upload(key)
        await client.abort_upload(key, other)
        self.assertEqual(await client.list_uploads("signed/"), [])
        await client.delete(key)
        self.assertIsNone(await client.head(key))

    async def test_wrong_secret(self) -> None:
        """
        With a wrong secret, calls fail with 403 SignatureDoesNotMatch, one request
        each.
        """
        client = _client(self, self.moto, self.access_key, self.secret_key + "x")
        error = await self.assertFailure(client.put("signed/x.gz", b"body"), StorageError)
        self.assertEqual(
            (error.operation, error.status, error.code),
            ("PutObject", 403, "SignatureDoesNotMatch"),
        )
        error = await self.assertFailure(client.list_uploads("signed/"), StorageError)
        self.assertEqual((error.status, error.code), (403, "SignatureDoesNotMatch"))

    async def test_unknown_key(self) -> None:
        """
        An access key moto does not know fails with 403 InvalidAccessKeyId.
        """
        client = _client(self, self.moto, "AKIAUNKNOWN000000000", self.secret_key)
        error = await self.assertFailure(client.put("signed/x.gz", b"body"), StorageError)
        self.assertEqual((error.status, error.code), (403, "InvalidAccessKeyId"))


class HarnessTests(TestCase):
    """
    The moto harness itself: skip or fail when moto is missing, env, reset.
    """

    def test_missing_skips(self) -> None:
        """
        Without moto_server and without CI, require_moto_server raises SkipTest.
        """
        self.patch(moto_harness, "moto_server_path", lambda: "/nonexistent/moto_server")
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CI"})
        self.assertRaises(SkipTest, moto_harness.require_moto_server)
        self.assertRaises(SkipTest, MotoServer().start)

    def test_missing_fails_in_ci(self) -> None:
        """
        Without moto_server and with CI=true, require_moto_server (so shared_moto and
        every emulator test's setUp) raises EmulatorMissing, an AssertionError (a
        test failure, not a skip), saying why.
        """
        self.patch(moto_harness, "moto_server_path", lambda: "/nonexistent/moto_server")
        self.patch(moto_harness, "_shared", None)
        self.patch(os, "environ", dict(os.environ, CI="true"))
        error = self.assertRaises(EmulatorMissing, moto_harness.require_moto_server)
        self.assertIsInstance(error, AssertionError)
        self.assertNotIsInstance(error, SkipTest)
        self.assertIn("In CI an emulator test that would skip must fail instead", str(error))
        self.assertRaises(EmulatorMissing, shared_moto)

    def test_env_and_reset(self) -> None:
        """
        env() points at the running server and its bucket; reset() empties the
        bucket but keeps it.
        """
        moto = shared_moto()
        moto.reset()
        self.assertEqual(
            moto.env(),
            {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto.port}",
                "AWS_BUCKET": moto.bucket,
                "AWS_REGION": moto.region,
                "AWS_ACCESS_KEY": moto.access_key,
                "AWS_ACCESS_SECRET": moto.secret_key,
            },
        )
        path = f"/{moto.bucket}/x.gz"
        self.assertEqual(moto.request("PUT", path, b"x")[0], 200)
        self.assertEqual(moto.request("GET", path)[2], b"x")
        moto.reset()
        self.assertEqual(moto.request("GET", path)[0], 404)
        self.assertEqual(moto.request("HEAD", f"/{moto.bucket}")[0], 200)


class BucketChecksMotoTests(TestCase):
    """
    The start-up probe of conditional CompleteMultipartUpload against the real moto
    (which ignores If-Match there) and through the fault proxy (which enforces it,
    as S3 does).
    """

    def setUp(self) -> None:
        """Start (once) and reset moto."""
        self.moto = shared_moto()
        self.moto.reset()

    async def test_moto_does_not_enforce(self) -> None:
        """moto completes despite a stale If-Match: the probe says so, leaves nothing."""
        client = _client(self, self.moto, self.moto.access_key, self.moto.secret_key)
        self.assertFalse(await conditional_complete_enforced(client, "_loghandler/probe/t"))
        self.assertEqual(await client.list_objects("_loghandler/"), [])
        self.assertEqual(await client.list_uploads("_loghandler/"), [])

    async def test_proxy_enforces(self) -> None:
        """Through the fault proxy (S3's rule) the probe's Complete is refused."""
        from tests.integration.faultproxy import FaultProxy

        proxy = FaultProxy(self.moto.endpoint_url, region=self.moto.region)
        proxy.start()
        self.addCleanup(proxy.stop)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        client = build_s3_client(
            reactor,
            bucket=self.moto.bucket,
            region=self.moto.region,
            endpoint_url=proxy.endpoint_url,
            credentials=Credentials(self.moto.access_key, self.moto.secret_key),
            pool=pool,
        )
        self.assertTrue(await conditional_complete_enforced(client, "_loghandler/probe/t"))
        self.assertEqual(await client.list_uploads("_loghandler/"), [])
