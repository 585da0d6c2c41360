"""
The streams and registry on the real reactor against S3Store on moto: rotation by the
reactor timer followed by an append (GetObject path), a multipart upload of real
5 MiB parts, and an append to a 5 MiB+ object by UploadPartCopy.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from loghandler.config import MiB
from loghandler.keys import key_for
from loghandler.message import Message
from loghandler.registry import Busy, StreamRegistry, StreamSettings
from loghandler.storage.s3 import build_s3_store
from tests.helpers import DAY_START_MS, message, read_lines
from tests.integration.moto import shared_moto

LIFETIME = 0.3
KEY = key_for(DAY_START_MS, 3)


class StreamOnMotoTests(TestCase):
    """Objects written by the registry to moto, read back byte for byte."""

    def setUp(self) -> None:
        self.moto = shared_moto()
        self.moto.reset()
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.store = build_s3_store(
            reactor,
            bucket=self.moto.bucket,
            region=self.moto.region,
            endpoint_url=self.moto.endpoint_url,
            access_key=self.moto.access_key,
            secret_key=self.moto.secret_key,
            pool=pool,
        )
        self.registry = self.make_registry(LIFETIME)

    def make_registry(self, lifetime: float) -> StreamRegistry:
        registry = StreamRegistry(
            self.store, reactor, StreamSettings(part_size=5 * MiB, lifetime_s=lifetime)
        )
        self.addCleanup(registry.close_all)
        return registry

    async def object_lines(self, key: str = KEY) -> list[bytes]:
        info = await self.store.head(key)
        assert info is not None, key
        return read_lines(await self.store.get(key, info.etag))

    async def rotated(self) -> None:
        """Wait past the stream lifetime and for the completions it started."""
        await deferLater(reactor, LIFETIME + 0.1, lambda: None)
        for _ in range(100):
            if not self.registry._closing:
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail("completion did not finish")

    async def test_rotation_then_append(self) -> None:
        """
        The reactor timer completes the object with no new message; a later stream
        for the key appends (GetObject and PutObject with If-Match).
        """
        first = [message(n) for n in range(1, 51)]
        for m in first:
            self.registry.accept(m)
        await self.rotated()
        self.assertEqual(await self.object_lines(), [m.to_line() for m in first])
        second = [message(n) for n in range(51, 101)]
        for m in second:
            self.registry.accept(m)
        await self.rotated()
        self.assertEqual(await self.object_lines(), [m.to_line() for m in first + second])

    async def test_multipart_then_copy_append(self) -> None:
        """
        A stream with more than 10 MiB of compressed data uploads 5 MiB parts (moto
        enforces the minimum) and completes; the next stream appends by copying the
        object in as part 1.
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
        await registry.close_all()
        info = await self.store.head(KEY)
        assert info is not None
        self.assertGreater(info.size, 10 * MiB)
        # A multipart ETag ends in the number of parts: at least two of 5 MiB and
        # more, then the tail.
        self.assertGreaterEqual(int(info.etag.strip('"').rsplit("-", 1)[1]), 3, info.etag)
        self.registry.accept(message(5000))
        await self.rotated()
        lines = await self.object_lines()
        self.assertEqual(lines, [m.to_line() for m in big] + [message(5000).to_line()])
