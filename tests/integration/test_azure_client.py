"""
The Azure client (:class:`~loghandler.storage.azure.client.AzureBlobClient`, the
azure-storage-blob SDK on a thread pool) against Azurite: each call's answer, and the
errors as the writer and the retry layer see them (status, Azure's error code, the
fault class).  Also a server that takes the connection and never answers: the call
fails after the timeout the retry layer gives it, since a thread cannot be cancelled.
"""

from __future__ import annotations

import gzip
import socket
import time
from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from loghandler.config import from_environ
from loghandler.interfaces import PreconditionFailed, StorageError
from loghandler.retry import Fault, classify
from loghandler.storage.azure.api import (
    APPEND_POSITION_NOT_MET,
    MAX_SIZE_NOT_MET,
    Appended,
    BlobState,
    IAppendBlobClient,
)
from loghandler.storage.azure.client import AzureBlobClient
from loghandler.storage.azure.settings import container_client
from tests.integration.azurite import shared_azurite

NAME = "chat/2020-03-30/content_logs_2020-03-30_3"


class AzureClientTests(TestCase):
    """One client on Azurite's fresh container."""

    timeout = 60

    def setUp(self) -> None:
        self.azurite = shared_azurite()
        self.azurite.reset()
        self.client = self.make_client(self.azurite.env())

    def make_client(self, env: dict[str, str], timeout: float = 10.0) -> AzureBlobClient:
        client = AzureBlobClient(
            container_client(from_environ(env), 4), reactor, 4, lambda: timeout
        )
        self.addCleanup(client.close)
        return client

    async def fails(self, call: Callable[[], "Deferred[Any]"]) -> StorageError:
        try:
            await call()
        except StorageError as e:
            return e
        raise AssertionError("no error")

    def test_interface(self) -> None:
        """The client provides IAppendBlobClient."""
        verifyObject(IAppendBlobClient, self.client)

    @defer.inlineCallbacks
    def test_append_blob_life(self) -> Any:
        """
        Missing -> None; created once (a second create answers False and leaves the
        data); appends land at the position asked; properties give length and blocks;
        reads give the range, shortened at the end, empty past it.
        """
        self.assertIsNone((yield self.client.properties(NAME)))
        self.assertTrue((yield self.client.create(NAME, "application/gzip")))
        first = gzip.compress(b"one\n")
        self.assertEqual((yield self.client.append(NAME, first, 0, 1 << 30)), Appended(0, 1))
        self.assertFalse((yield self.client.create(NAME, "application/gzip")))
        second = gzip.compress(b"two\n")
        self.assertEqual(
            (yield self.client.append(NAME, second, len(first), 1 << 30)),
            Appended(len(first), 2),
        )
        self.assertEqual(
            (yield self.client.properties(NAME)),
            BlobState(len(first) + len(second), 2, "AppendBlob"),
        )
        self.assertEqual((yield self.client.read(NAME, len(first), 10)), second[:10])
        self.assertEqual((yield self.client.read(NAME, len(first) + 5, 1000)), second[5:])
        self.assertEqual((yield self.client.read(NAME, 10_000, 10)), b"")
        blob = self.azurite.blob_service_client().get_blob_client(
            self.azurite.container, NAME
        )
        self.assertEqual(gzip.decompress(blob.download_blob().readall()), b"one\ntwo\n")
        self.assertEqual(
            blob.get_blob_properties().content_settings.content_type, "application/gzip"
        )

    def test_conditions(self) -> Deferred[None]:
        """
        A stale position: 412 AppendPositionConditionNotMet; past the size limit: 412
        MaxBlobSizeConditionNotMet; both PreconditionFailed, CONFLICT for the retry
        layer, and nothing appended.
        """

        async def run() -> None:
            await self.client.create(NAME, "application/gzip")
            body = gzip.compress(b"x\n")
            await self.client.append(NAME, body, 0, 1 << 30)
            stale = await self.fails(lambda: self.client.append(NAME, body, 0, 1 << 30))
            self.assertIsInstance(stale, PreconditionFailed)
            self.assertEqual((stale.status, stale.code), (412, APPEND_POSITION_NOT_MET))
            self.assertIs(classify(stale), Fault.CONFLICT)
            full = await self.fails(lambda: self.client.append(NAME, body, len(body), len(body)))
            self.assertEqual((full.status, full.code), (412, MAX_SIZE_NOT_MET))
            self.assertEqual(await self.client.properties(NAME), BlobState(len(body), 1))

        return defer.ensureDeferred(run())

    def test_missing_blob_and_container(self) -> Deferred[None]:
        """
        Appending to or reading a missing blob: 404 BlobNotFound (GONE); any call in
        a missing container: 404 ContainerNotFound, which lasts until an operator
        acts (PERMANENT).
        """

        async def run() -> None:
            body = gzip.compress(b"x\n")
            gone = await self.fails(lambda: self.client.append(NAME, body, 0, 1 << 30))
            self.assertEqual((gone.status, gone.code, classify(gone)), (404, "BlobNotFound", Fault.GONE))
            gone = await self.fails(lambda: self.client.read(NAME, 0, 10))
            self.assertEqual(gone.code, "BlobNotFound")
            other = self.make_client(dict(self.azurite.env(), AZURE_CONTAINER="nosuchcontainer"))
            for call in (other.check, lambda: other.properties(NAME)):
                missing = await self.fails(call)
                self.assertEqual(
                    (missing.status, missing.code, classify(missing)),
                    (404, "ContainerNotFound", Fault.PERMANENT),
                )
            await self.client.check()

        return defer.ensureDeferred(run())

    def test_wrong_key(self) -> Deferred[None]:
        """A wrong account key: 403, PERMANENT."""

        async def run() -> None:
            wrong = self.make_client(dict(self.azurite.env(), AZURE_KEY="d3Jvbmcga2V5"))
            error = await self.fails(wrong.check)
            self.assertEqual((error.status, classify(error)), (403, Fault.PERMANENT))
            # Azure says AuthenticationFailed; Azurite 3.35 AuthorizationFailure.
            self.assertIn(error.code, ("AuthenticationFailed", "AuthorizationFailure"))

        return defer.ensureDeferred(run())

    def test_refused_and_silent_server(self) -> Deferred[None]:
        """
        Nobody listening: status 0 at once (TRANSIENT, the SDK does not retry).  A
        server that accepts and never answers: status 0 after the call's timeout (1 s
        here), not the SDK's default of minutes.
        """

        async def run() -> None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = dict(self.azurite.env(), AZURE_BLOB_ENDPOINT=f"http://127.0.0.1:{port}/devstoreaccount1")
            refused = await self.fails(self.make_client(env).check)
            self.assertEqual((refused.status, classify(refused)), (0, Fault.TRANSIENT))
            silent = socket.socket()
            self.addCleanup(silent.close)
            silent.bind(("127.0.0.1", 0))
            silent.listen(8)
            env["AZURE_BLOB_ENDPOINT"] = "http://127.0.0.1:%d/devstoreaccount1" % silent.getsockname()[1]
            started = time.monotonic()
            timed_out = await self.fails(self.make_client(env, timeout=1.0).check)
            elapsed = time.monotonic() - started
            self.assertEqual((timed_out.status, classify(timed_out)), (0, Fault.TRANSIENT))
            self.assertTrue(0.9 < elapsed < 5, elapsed)

        return defer.ensureDeferred(run())


class AzureClientAccessTests(TestCase):
    """Credentials and the end of the client's life, on Azurite."""

    timeout = 60

    def setUp(self) -> None:
        self.azurite = shared_azurite()
        self.azurite.reset()

    def test_container_sas(self) -> Deferred[None]:
        """
        A container SAS with read, add, create and write permissions (what the
        writer needs) passes the start check and appends; the client's repr (in
        the start line and in every check line) shows no signature.
        """
        from datetime import datetime, timedelta, timezone

        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        sas = generate_container_sas(
            self.azurite.account,
            self.azurite.container,
            account_key=self.azurite.key,
            permission=ContainerSasPermissions(read=True, add=True, create=True, write=True),
            expiry=datetime.now(timezone.utc) + timedelta(hours=1),
        )
        env = {
            "STORAGE": "azure",
            "AZURE_CONTAINER": self.azurite.container,
            "AZURE_CONNECTION_STRING": "BlobEndpoint=%s;SharedAccessSignature=%s"
            % (self.azurite.endpoint_url, sas),
        }
        client = AzureBlobClient(container_client(from_environ(env), 2), reactor, 2, lambda: 10.0)
        self.addCleanup(client.close)
        self.assertNotIn("sig=", repr(client))
        self.assertIn(self.azurite.container, repr(client))

        async def run() -> None:
            await client.check()
            self.assertTrue(await client.create(NAME, "application/gzip"))
            body = gzip.compress(b"sas\n")
            self.assertEqual(await client.append(NAME, body, 0, 1 << 30), Appended(0, 1))

        return defer.ensureDeferred(run())

    def test_close_does_not_wait_for_a_hung_call(self) -> Deferred[None]:
        """
        A server that takes the connection and never answers: a call hangs in its
        thread (for its 30 s timeout), yet close() fires within about a second, and
        the pool's threads are daemon threads, which do not hold the exit.
        """
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = dict(
            self.azurite.env(),
            AZURE_BLOB_ENDPOINT="http://127.0.0.1:%d/devstoreaccount1" % silent.getsockname()[1],
        )
        client = AzureBlobClient(container_client(from_environ(env), 2), reactor, 2, lambda: 30.0)
        hung = client.properties(NAME)
        hung.addErrback(lambda _: None)  # it fails when the socket closes at cleanup

        async def run() -> None:
            await deferLater(reactor, 0.3, lambda: None)
            threads = [t for t in client._pool.threads if t.is_alive()]
            self.assertTrue(threads and all(t.daemon for t in threads))
            started = time.monotonic()
            await client.close()
            self.assertLess(time.monotonic() - started, 3.0)
            self.assertFalse(hung.called)

        return defer.ensureDeferred(run())
