"""
:class:`loghandler.storage.s3.S3Store` against moto's S3 server: the store contract,
S3's 5 MiB part minimum, and Signature Version 4 checked by moto's IAM.

moto runs once per test process (:func:`tests.integration.moto.shared_moto`) and is
reset before each test.  Each test has its own ``HTTPConnectionPool``, closed in
cleanup.
"""

from __future__ import annotations

import json
import os
from typing import Any
from unittest import SkipTest

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from loghandler.interfaces import CompletedPart, ObjectInfo, StorageError
from loghandler.storage.s3 import S3Store, build_s3_store
from tests.contract import ObjectStoreContractMixin
from tests.integration import moto as moto_harness
from tests.integration.moto import EmulatorMissing, MotoServer, shared_moto

MiB = 1024 * 1024


def _store(
    test: TestCase, moto: MotoServer, access_key: str, secret_key: str
) -> S3Store:
    """
    An S3Store on ``moto`` with the given key, on a connection pool of its own that
    is closed when ``test`` ends.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    test.addCleanup(pool.closeCachedConnections)
    return build_s3_store(
        reactor,
        bucket=moto.bucket,
        region=moto.region,
        endpoint_url=moto.endpoint_url,
        access_key=access_key,
        secret_key=secret_key,
        pool=pool,
    )


class S3StoreMotoContractTests(ObjectStoreContractMixin, TestCase):
    """
    The IObjectStore contract for S3Store on moto, with S3's real 5 MiB minimum part.
    """

    def setUp(self) -> None:
        """
        Start (once) and reset moto.
        """
        self.moto = shared_moto()
        self.moto.reset()

    def make_store(self) -> tuple[Any, int]:
        """
        An S3Store on moto; 5 MiB parts.
        """
        return _store(self, self.moto, self.moto.access_key, self.moto.secret_key), 5 * MiB

    def test_complete_stale_if_match(self) -> None:  # type: ignore[override]
        """
        (Not run: moto does not enforce If-Match on CompleteMultipartUpload.)
        """

    test_complete_stale_if_match.skip = (  # type: ignore[attr-defined]
        "moto does not enforce If-Match on CompleteMultipartUpload"
        " (a stale ETag still replaces the object)"
    )

    def test_upload_part_copy_stale_if_match(self) -> None:  # type: ignore[override]
        """
        (Not run: moto 5.2.5 ignores x-amz-copy-source-if-match on UploadPartCopy.)
        """

    test_upload_part_copy_stale_if_match.skip = (  # type: ignore[attr-defined]
        "moto ignores x-amz-copy-source-if-match on UploadPartCopy"
        " (a stale ETag still copies the current object)"
    )


class S3StoreMotoTests(TestCase):
    """
    S3Store behaviour that only a real S3 implementation shows.
    """

    def setUp(self) -> None:
        """
        Start (once) and reset moto; a store on it.
        """
        self.moto = shared_moto()
        self.moto.reset()
        self.store = _store(self, self.moto, self.moto.access_key, self.moto.secret_key)

    async def test_entity_too_small(self) -> None:
        """
        A non-last part under 5 MiB makes CompleteMultipartUpload fail with
        StorageError code EntityTooSmall (status 400), and nothing is written.
        """
        key = "small/parts.gz"
        upload_id = await self.store.create_upload(key)
        etag1 = await self.store.upload_part(key, upload_id, 1, b"x" * (5 * MiB - 1))
        etag2 = await self.store.upload_part(key, upload_id, 2, b"tail")
        error = await self.assertFailure(
            self.store.complete_upload(
                key, upload_id, [CompletedPart(1, etag1), CompletedPart(2, etag2)]
            ),
            StorageError,
        )
        self.assertEqual(
            (error.operation, error.status, error.code),
            ("CompleteMultipartUpload", 400, "EntityTooSmall"),
        )
        self.assertIsNone(await self.store.head(key))

    async def test_no_such_upload(self) -> None:
        """
        ListParts and AbortMultipartUpload of an unknown upload fail with
        StorageError code NoSuchUpload (404).  (moto answers UploadPart and
        CompleteMultipartUpload of an unknown upload with a bare 500.)
        """
        error = await self.assertFailure(
            self.store.list_parts("k.gz", "no-such-upload"), StorageError
        )
        self.assertEqual(
            (error.operation, error.status, error.code), ("ListParts", 404, "NoSuchUpload")
        )
        error = await self.assertFailure(
            self.store.abort_upload("k.gz", "no-such-upload"), StorageError
        )
        self.assertEqual((error.status, error.code), (404, "NoSuchUpload"))

    async def test_check_bucket(self) -> None:
        """
        check() passes for the existing bucket and fails with 404 for a missing one
        (HeadBucket), without retrying.
        """
        self.assertIsNone(await self.store.check())
        other = MotoServer(bucket="no-such-bucket")
        other.port = self.moto.port
        missing = _store(self, other, self.moto.access_key, self.moto.secret_key)
        error = await self.assertFailure(missing.check(), StorageError)
        self.assertEqual((error.operation, error.status), ("HeadBucket", 404))

    async def test_get_missing(self) -> None:
        """
        GetObject of a missing key fails with StorageError code NoSuchKey (404).
        """
        error = await self.assertFailure(self.store.get("missing.gz", '"x"'), StorageError)
        self.assertEqual((error.status, error.code), (404, "NoSuchKey"))

    async def test_stored_content_type(self) -> None:
        """
        Objects are stored as application/gzip without Content-Encoding, whether
        put or completed from parts (read back with the harness's own signed GET).
        """
        await self.store.put("put.gz", b"\x1f\x8b")
        upload_id = await self.store.create_upload("parts.gz")
        etag = await self.store.upload_part("parts.gz", upload_id, 1, b"\x1f\x8b")
        await self.store.complete_upload("parts.gz", upload_id, [CompletedPart(1, etag)])
        for key in ("put.gz", "parts.gz"):
            status, headers, body = self.moto.request("GET", f"/{self.moto.bucket}/{key}")
            self.assertEqual(
                (status, headers.get("content-type"), headers.get("content-encoding"), body),
                (200, "application/gzip", None, b"\x1f\x8b"),
            )


class S3StoreSigningTests(TestCase):
    """
    With moto's IAM authentication on, S3Store's Signature Version 4 is checked: the
    right secret works for every operation, a wrong one gets 403
    SignatureDoesNotMatch.
    """

    def setUp(self) -> None:
        """
        Reset moto, create an IAM user allowed s3:* and an access key for it (through
        botocore's IAM client, while authentication is still off), then switch
        authentication on; it is switched off again in cleanup.
        """
        import botocore.session

        self.moto = shared_moto()
        self.moto.reset()
        iam = botocore.session.get_session().create_client(
            "iam",
            region_name="us-east-1",
            endpoint_url=self.moto.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        self.addCleanup(iam.close)
        iam.create_user(UserName="loghandler")
        iam.put_user_policy(
            UserName="loghandler",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="loghandler")["AccessKey"]
        self.access_key = key["AccessKeyId"]
        self.secret_key = key["SecretAccessKey"]
        self.moto.enable_iam_auth()
        self.addCleanup(self.moto.disable_iam_auth)

    async def test_right_secret(self) -> None:
        """
        Every operation, with query strings, odd keys and conditional headers, passes
        moto's signature check with the right secret.
        """
        store = _store(self, self.moto, self.access_key, self.secret_key)
        key = "signed/dir with space/ü+%=&~.gz"
        etag = await store.put(key, b"body", if_none_match=True)
        self.assertEqual(await store.head(key), ObjectInfo(4, etag))
        self.assertEqual(await store.get(key, etag), b"body")
        self.assertIsNone(await store.head("signed/missing.gz"))
        upload_id = await store.create_upload(key)
        part = await store.upload_part(key, upload_id, 1, b"part")
        self.assertEqual([p.number for p in await store.list_parts(key, upload_id)], [1])
        self.assertEqual(
            [u.upload_id for u in await store.list_uploads("signed/")], [upload_id]
        )
        new_etag = await store.complete_upload(
            key, upload_id, [CompletedPart(1, part)], if_match=etag
        )
        self.assertEqual(await store.get(key, new_etag), b"part")
        other = await store.create_upload(key)
        await store.abort_upload(key, other)
        self.assertEqual(await store.list_uploads("signed/"), [])

    async def test_wrong_secret(self) -> None:
        """
        With a wrong secret, S3 operations fail with 403 SignatureDoesNotMatch, and
        are not retried.
        """
        store = _store(self, self.moto, self.access_key, self.secret_key + "x")
        error = await self.assertFailure(store.put("signed/x.gz", b"body"), StorageError)
        self.assertEqual(
            (error.operation, error.status, error.code),
            ("PutObject", 403, "SignatureDoesNotMatch"),
        )
        error = await self.assertFailure(store.list_uploads("signed/"), StorageError)
        self.assertEqual((error.status, error.code), (403, "SignatureDoesNotMatch"))

    async def test_unknown_key(self) -> None:
        """
        An access key moto does not know fails with 403 InvalidAccessKeyId.
        """
        store = _store(self, self.moto, "AKIAUNKNOWN000000000", self.secret_key)
        error = await self.assertFailure(store.put("signed/x.gz", b"body"), StorageError)
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
        Without moto_server and with CI set, require_moto_server raises
        EmulatorMissing, an AssertionError (a test failure), saying why.
        """
        self.patch(moto_harness, "moto_server_path", lambda: "/nonexistent/moto_server")
        self.patch(os, "environ", dict(os.environ, CI="true"))
        error = self.assertRaises(EmulatorMissing, moto_harness.require_moto_server)
        self.assertIsInstance(error, AssertionError)
        self.assertIn("In CI an emulator test that would skip must fail instead", str(error))

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
