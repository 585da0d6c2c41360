"""
The streams and registry on the real reactor, through the S3 writer
(:class:`~loghandler.storage.s3.writer.S3ObjectStore`) and the S3 HTTP client on
moto: rotation by the reactor timer, then a second stream merged after the first
(the small path: GET both, one re-compressed member, PutObject with If-Match); a
stream of more than two real 5 MiB parts staged by multipart upload and merged;
then a small stream merged after that large object (the UploadPartCopy path).
Every object is read back and compared line by line; nothing is left staged.  With
server-side encryption asked for (``S3_SSE``), moto stores every object the writer
creates encrypted.

Needs ``build_s3_client`` and ``aws_credentials``
(:mod:`loghandler.storage.s3.client`, :mod:`loghandler.storage.s3.credentials`).
"""

from __future__ import annotations

import os
from typing import Optional

from botocore.credentials import Credentials
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from loghandler.budget import MemoryBudget
from loghandler.config import MiB
from loghandler.keys import key_for
from loghandler.message import Message
from loghandler.registry import Busy, StreamRegistry, StreamSettings
from loghandler.storage.s3.client import S3Client, ServerSideEncryption, build_s3_client
from loghandler.storage.s3.credentials import aws_credentials
from loghandler.storage.s3.transport import SigV4Transport
from loghandler.storage.s3.writer import STAGING_PREFIX, S3ObjectStore
from tests.helpers import DAY_START_MS, members, message, read_lines
from tests.integration.moto import shared_moto

LIFETIME = 0.3
KEY = key_for(DAY_START_MS, 3)


class StreamOnMotoTests(TestCase):
    """Objects written by the registry to moto, read back line by line."""

    def setUp(self) -> None:
        self.moto = shared_moto()
        self.moto.reset()
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.client = build_s3_client(
            reactor,
            bucket=self.moto.bucket,
            region=self.moto.region,
            endpoint_url=self.moto.endpoint_url,
            credentials=aws_credentials(self.moto.access_key, self.moto.secret_key),
            pool=pool,
        )
        self.budget = MemoryBudget(256 * MiB)
        self.store = S3ObjectStore(self.client, reactor, self.budget, part_size=5 * MiB)
        self.registry = self.make_registry(LIFETIME)

    def make_registry(self, lifetime: float) -> StreamRegistry:
        """A registry over the store, flushed at cleanup."""
        registry = StreamRegistry(
            self.store,
            reactor,
            StreamSettings(part_size=5 * MiB, lifetime_s=lifetime),
            self.budget,
        )
        self.addCleanup(registry.close_all)
        return registry

    async def object_body(self, key: str = KEY) -> bytes:
        """The bytes of ``key`` as stored."""
        info = await self.client.head(key)
        assert info is not None, key
        body: bytes = await self.client.get(key, info.etag)
        self.assertEqual(len(body), info.size)
        return body

    async def assertNothingStaged(self) -> None:
        """No staging object and no multipart upload is left in the bucket."""
        self.assertEqual(await self.client.list_objects(STAGING_PREFIX), [])
        self.assertEqual(await self.client.list_uploads(""), [])

    async def rotated(self) -> None:
        """Wait past the stream lifetime and for the completions it started."""
        await deferLater(reactor, LIFETIME + 0.1, lambda: None)
        for _ in range(200):
            if not self.registry.completing:
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail("completion did not finish")

    async def test_rotation_then_merge(self) -> None:
        """
        The reactor timer completes the object with no new message; a later stream
        of the key is merged after it, and the object stays one gzip member.
        """
        first = [message(n, timestamp=DAY_START_MS) for n in range(1, 51)]
        for m in first:
            self.registry.accept(m)
        await self.rotated()
        self.assertEqual(read_lines(await self.object_body()), [m.to_line() for m in first])
        second = [message(n, timestamp=DAY_START_MS) for n in range(51, 101)]
        with capturedLogs() as events:
            for m in second:
                self.registry.accept(m)
            await self.rotated()
        body = await self.object_body()
        self.assertEqual(read_lines(body), [m.to_line() for m in first + second])
        self.assertEqual(len(members(body)), 1)
        self.assertTrue(
            any(e.get("method") == "PutObject" for e in events),
            [e.get("log_format") for e in events],
        )
        await self.assertNothingStaged()
        self.assertEqual(self.budget.held, 0)

    async def test_multipart_then_copy_merge(self) -> None:
        """
        A stream with more than 10 MiB of compressed data stages 5 MiB parts (moto
        enforces the minimum) and merges them into the key; the next stream is
        merged after that object by copying it in (UploadPartCopy).
        """
        registry = self.make_registry(lifetime=60)
        big = [Message(os.urandom(20_000).hex(), n, 3, DAY_START_MS) for n in range(1, 700)]
        for m in big:
            while True:
                try:
                    registry.accept(m)
                    break
                except Busy:
                    # Backpressure: parts wait for upload; retry as a client would.
                    await deferLater(reactor, 0.02, lambda: None)
        with capturedLogs() as events:
            await registry.close_all()
        self.assertTrue(
            any(e.get("method") == "multipart upload" for e in events),
            [e.get("log_format") for e in events],
        )
        info = await self.client.head(KEY)
        assert info is not None
        self.assertGreater(info.size, 10 * MiB)
        self.registry.accept(message(5000, timestamp=DAY_START_MS))
        with capturedLogs() as events:
            await self.rotated()
        self.assertTrue(
            any(e.get("method") == "multipart upload" for e in events),
            [e.get("log_format") for e in events],
        )
        body = await self.object_body()
        self.assertEqual(
            read_lines(body), [m.to_line() for m in big] + [message(5000, timestamp=DAY_START_MS).to_line()]
        )
        await self.assertNothingStaged()
        self.assertEqual(self.budget.held, 0)



async def checkpoint_then_merge(test: TestCase, store: S3ObjectStore, budget: MemoryBudget) -> None:
    """
    Two streams of :data:`KEY` through ``store``: the first checkpointed (its staging
    upload created) and merged into a new object, then a small one, staged by
    PutObject, merged into that object; ``test`` checks that the object holds both
    streams' lines, in order.
    """
    settings = StreamSettings(part_size=5 * MiB, lifetime_s=60, checkpoint_s=60)
    first = [message(n, timestamp=DAY_START_MS) for n in range(1, 21)]
    registry = StreamRegistry(store, reactor, settings, budget)
    accepted = [registry.accept(m) for m in first]
    test.assertTrue(await accepted[-1].durable())  # a checkpoint: the staging upload
    test.assertEqual(len(await store.client.list_uploads(STAGING_PREFIX)), 1)
    await registry.close_all()
    second = [message(n, timestamp=DAY_START_MS) for n in range(21, 31)]
    registry = StreamRegistry(store, reactor, settings, budget)
    for m in second:
        registry.accept(m)
    await registry.close_all()
    info = await store.client.head(KEY)
    assert info is not None
    body: bytes = await store.client.get(KEY, info.etag)
    test.assertEqual(read_lines(body), [m.to_line() for m in first + second])


#: The KMS key the encrypted tests ask for (moto records it without checking it).
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"

#: What HeadObject answered for a key: status, x-amz-server-side-encryption and
#: x-amz-server-side-encryption-aws-kms-key-id.
Encryption = tuple[int, Optional[str], Optional[str]]


class HeadBeforeDelete(S3Client):
    """
    An S3Client that HEADs every object before it deletes it and keeps what the
    answer says of its encryption in ``deleted`` (staging objects, queue markers and
    merge locks live only until their merge deletes them).
    """

    def __init__(self, transport: SigV4Transport, bucket: str, encryption: ServerSideEncryption):
        super().__init__(transport, bucket, encryption=encryption)
        self.heads = transport
        self.deleted: dict[str, Encryption] = {}

    async def encryption_of(self, key: str) -> Encryption:
        """What HeadObject of ``key`` answers of its server-side encryption."""
        answer = await self.heads.send("HEAD", self.path(key))
        return (
            answer.status,
            answer.header("x-amz-server-side-encryption"),
            answer.header("x-amz-server-side-encryption-aws-kms-key-id"),
        )

    def delete(self, key: str) -> "Deferred[None]":
        """Record the object's encryption, then DeleteObject."""

        async def run() -> None:
            self.deleted[key] = await self.encryption_of(key)
            await S3Client.delete(self, key)

        return Deferred.fromCoroutine(run())


class EncryptedOnMotoTests(TestCase):
    """
    ``S3_SSE=aws:kms`` with ``S3_SSE_KMS_KEY_ID``: the staging objects (from a
    multipart staging upload and from a PutObject), the merge's lock and the merged
    object are stored encrypted with that key, as moto's HeadObject answers.
    """

    async def test_staging_and_merged_objects_encrypted(self) -> None:
        """
        A stream checkpointed (its staging upload created) and then merged into a new
        key, then a small stream (staged by PutObject) merged into that object: every
        object HEADed before its deletion and the merged object answer
        ``aws:kms`` and the key; the lines are all there.
        """
        moto = shared_moto()
        moto.reset()
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        transport = SigV4Transport(
            HTTPClient(Agent(reactor, pool=pool)),
            moto.endpoint_url,
            moto.region,
            Credentials(moto.access_key, moto.secret_key),
        )
        client = HeadBeforeDelete(transport, moto.bucket, ServerSideEncryption("aws:kms", KMS_KEY))
        budget = MemoryBudget(256 * MiB)
        store = S3ObjectStore(client, reactor, budget, part_size=5 * MiB)
        await checkpoint_then_merge(self, store, budget)
        self.assertEqual(await client.encryption_of(KEY), (200, "aws:kms", KMS_KEY))
        staged = [key for key in client.deleted if key.startswith(STAGING_PREFIX)]
        self.assertEqual(len(staged), 2, client.deleted)
        self.assertEqual(
            client.deleted, {key: (200, "aws:kms", KMS_KEY) for key in client.deleted}
        )
        self.assertEqual(await client.list_objects(STAGING_PREFIX), [])
