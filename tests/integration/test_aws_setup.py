"""
The bucket setup that README.rst documents, against moto's server: the IAM policy of
``contrib/aws/iam-policy.json`` (with moto's IAM authentication on) lets the daemon
make every S3 call it makes, where it makes them, and refuses a delete outside
``_loghandler/``; the lifecycle rules of ``contrib/aws/lifecycle.json`` are taken by
PutBucketLifecycleConfiguration as written.

moto runs once per test process (:func:`tests.integration.moto.shared_moto`) and is
reset before each test.  Without moto these tests skip, and fail when ``CI`` is set.
"""

from __future__ import annotations

import json
import os
from typing import Any

from botocore.credentials import Credentials
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from loghandler.budget import MemoryBudget
from loghandler.config import MiB
from loghandler.interfaces import StorageError
from loghandler.retry import RetryLayer
from loghandler.storage.s3.api import CompletedPart
from loghandler.storage.s3.client import S3Client, build_s3_client
from loghandler.storage.s3.lease import Lease
from loghandler.storage.s3.writer import STAGING_PREFIX, S3ObjectStore
from tests.integration.moto import MotoServer, shared_moto
from tests.integration.test_stream_moto import checkpoint_then_merge

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AWS = os.path.join(ROOT, "contrib", "aws")


def document(name: str, bucket: str = "BUCKET") -> Any:
    """``contrib/aws/{name}`` parsed, with the placeholder BUCKET replaced."""
    with open(os.path.join(AWS, name), encoding="utf-8") as f:
        return json.loads(f.read().replace("arn:aws:s3:::BUCKET", f"arn:aws:s3:::{bucket}"))


def botocore_client(moto: MotoServer, service: str) -> Any:
    """A botocore client for ``service`` on moto, with moto's root key."""
    import botocore.session

    return botocore.session.get_session().create_client(
        service,
        region_name=moto.region,
        endpoint_url=moto.endpoint_url,
        aws_access_key_id=moto.access_key,
        aws_secret_access_key=moto.secret_key,
    )


class IAMPolicyTests(TestCase):
    """
    An IAM user with exactly ``contrib/aws/iam-policy.json`` (on moto's bucket) runs
    the daemon's S3 calls; moto's IAM authorizes each request by its action and
    resource.
    """

    def setUp(self) -> None:
        """
        Reset moto, create the user with the policy and an access key (while
        authentication is off), then switch authentication on; off again in cleanup.
        """
        self.moto = shared_moto()
        self.moto.reset()
        policy = document("iam-policy.json", self.moto.bucket)
        # moto authorizes HeadBucket as "s3:HeadBucket", an action IAM does not have;
        # AWS authorizes it with s3:ListBucket, which the policy grants
        # (https://docs.aws.amazon.com/AmazonS3/latest/API/API_HeadBucket.html).
        policy["Statement"].append(
            {
                "Effect": "Allow",
                "Action": "s3:HeadBucket",
                "Resource": f"arn:aws:s3:::{self.moto.bucket}",
            }
        )
        access_key, secret_key = self.moto.iam_user(policy)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.client: S3Client = build_s3_client(
            reactor,
            bucket=self.moto.bucket,
            region=self.moto.region,
            endpoint_url=self.moto.endpoint_url,
            credentials=Credentials(access_key, secret_key),
            pool=pool,
        )
        self.moto.enable_iam_auth()
        self.addCleanup(self.moto.disable_iam_auth)

    async def test_every_call_in_both_prefixes(self) -> None:
        """
        Every IS3Client call the daemon makes succeeds under ``chat/`` and under
        ``_loghandler/``: the bucket check, versioning, listings, HEAD and GET,
        PutObject, a multipart upload with UploadPartCopy, Complete and Abort; and
        DeleteObject under ``_loghandler/``.
        """
        client = self.client
        self.assertIsNone(await client.check())
        self.assertEqual(await client.versioning(), "")
        for prefix in ("chat/", "_loghandler/staging/w/chat/"):
            key = prefix + "2020-03-30/content_logs_2020-03-30_3"
            body = b"\x1f\x8b" + os.urandom(5 * MiB)
            etag = await client.put(key, body, if_none_match=True, writes=("w1",))
            info = await client.head(key)
            assert info is not None
            self.assertEqual(info.etag, etag)
            self.assertEqual(await client.get(key, etag, (0, 2)), b"\x1f\x8b")
            upload = await client.create_upload(key, ("w1", "w2"))
            copied = await client.upload_part_copy(key, upload, 1, key, etag)
            part = await client.upload_part(key, upload, 2, b"tail")
            self.assertEqual(len(await client.list_parts(key, upload)), 2)
            self.assertEqual(len(await client.list_uploads(prefix)), 1)
            await client.complete_upload(
                key, upload, [CompletedPart(1, copied), CompletedPart(2, part)], if_match=etag
            )
            other = await client.create_upload(key)
            await client.abort_upload(key, other)
            self.assertEqual([o.key for o in await client.list_objects(prefix)], [key])
        await client.delete("_loghandler/staging/w/chat/2020-03-30/content_logs_2020-03-30_3")
        self.assertEqual(await client.list_objects("_loghandler/"), [])

    async def test_no_delete_under_chat(self) -> None:
        """
        DeleteObject of a stored object under ``chat/`` is refused (403
        AccessDenied), and so is a write outside the two prefixes.
        """
        key = "chat/2020-03-30/content_logs_2020-03-30_3"
        await self.client.put(key, b"data")
        error = await self.assertFailure(self.client.delete(key), StorageError)
        self.assertEqual((error.status, error.code), (403, "AccessDenied"))
        error = await self.assertFailure(self.client.put("other/x", b"data"), StorageError)
        self.assertEqual((error.status, error.code), (403, "AccessDenied"))
        self.assertIsNotNone(await self.client.head(key))

    async def test_daemon_write_path(self) -> None:
        """
        The real write path under the policy: the lease taken and released, a stream
        checkpointed into its staging upload and merged into a new key, a second
        stream staged by PutObject and merged into that object; the lines are all
        there and nothing is left staged.
        """
        retry = RetryLayer(reactor)
        lease = Lease(self.client, retry, reactor, "feedc0de", 10.0, lambda: None)
        budget = MemoryBudget(256 * MiB)
        store = S3ObjectStore(
            self.client, reactor, budget, part_size=5 * MiB, writer_id="feedc0de",
            retry=retry, lease=lease,
        )
        await store.check()
        await checkpoint_then_merge(self, store, budget)
        await store.close()
        self.assertIsNone(store.problem)
        self.assertEqual(await self.client.list_objects(STAGING_PREFIX), [])
        self.assertEqual(await self.client.list_objects("_loghandler/writers/"), [])


class LifecycleTests(TestCase):
    """``contrib/aws/lifecycle.json`` on moto's bucket."""

    def test_rules_taken_as_written(self) -> None:
        """
        PutBucketLifecycleConfiguration takes the rules; GetBucketLifecycleConfiguration
        gives them back unchanged.
        """
        moto = shared_moto()
        moto.reset()
        s3 = botocore_client(moto, "s3")
        self.addCleanup(s3.close)
        rules = document("lifecycle.json")
        s3.put_bucket_lifecycle_configuration(Bucket=moto.bucket, LifecycleConfiguration=rules)
        got = s3.get_bucket_lifecycle_configuration(Bucket=moto.bucket)["Rules"]
        self.assertEqual(sorted(got, key=lambda r: r["ID"]), sorted(rules["Rules"], key=lambda r: r["ID"]))
