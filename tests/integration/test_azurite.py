"""
The Azurite harness itself (:mod:`tests.integration.azurite`): a blob written and
read back through azure-storage-blob, restart keeping the data, reset emptying the
container, a stopped server refusing at once, and the skip-or-fail rule when Azurite
is missing.

Azurite runs once per test process (:func:`tests.integration.azurite.shared_azurite`)
and is reset before each test; the restart tests start servers of their own.  Without
Azurite or azure-storage-blob these tests skip, and fail when ``CI`` is set.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any
from unittest import SkipTest, mock

from twisted.trial.unittest import SynchronousTestCase

from tests.integration import azurite as azurite_harness
from tests.integration.azurite import (
    AZURITE_KEY,
    AzuriteServer,
    EmulatorMissing,
    require_azurite,
    require_blob_sdk,
    shared_azurite,
)


class BlobTests(SynchronousTestCase):
    """
    The shared server, through azure-storage-blob.
    """

    def setUp(self) -> None:
        self.azurite = shared_azurite()
        self.azurite.reset()
        self.service = self.azurite.blob_service_client()
        self.addCleanup(self.service.close)

    def test_addresses_and_env(self) -> None:
        """
        The endpoint, connection string and daemon settings name the development
        account on 127.0.0.1 and the server's port.
        """
        azurite = self.azurite
        endpoint = f"http://127.0.0.1:{azurite.port}/devstoreaccount1"
        self.assertEqual(azurite.endpoint_url, endpoint)
        self.assertEqual(
            azurite.connection_string,
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};",
        )
        self.assertEqual(
            azurite.env(),
            {
                "STORAGE": "azure",
                "AZURE_ACC": "devstoreaccount1",
                "AZURE_KEY": AZURITE_KEY,
                "AZURE_CONTAINER": "loghandler-test",
                "AZURE_BLOB_ENDPOINT": endpoint,
            },
        )

    def test_blob_round_trip(self) -> None:
        """
        A block blob and an append blob written through the SDK read back byte for
        byte; the append blob counts its committed blocks.
        """
        container = self.service.get_container_client(self.azurite.container)
        container.upload_blob("block/a.txt", b"hello azurite")
        self.assertEqual(
            container.download_blob("block/a.txt").readall(), b"hello azurite"
        )
        blob = container.get_blob_client("append/b.gz")
        blob.create_append_blob()
        first = blob.append_block(b"one\n")
        second = blob.append_block(b"two\n", appendpos_condition=4)
        # The SDK hands the append offset over as the header's text.
        self.assertEqual(
            (first["blob_append_offset"], second["blob_append_offset"]), ("0", "4")
        )
        self.assertEqual(second["blob_committed_block_count"], 2)
        properties = blob.get_blob_properties()
        self.assertEqual(
            (properties.size, properties.append_blob_committed_block_count), (8, 2)
        )
        self.assertEqual(blob.download_blob().readall(), b"one\ntwo\n")

    def test_reset_empties(self) -> None:
        """
        reset() removes every blob (committed or not) and every other container,
        and leaves the harness's container, empty.
        """
        container = self.service.get_container_client(self.azurite.container)
        container.upload_blob("x", b"x")
        container.get_blob_client("staged").stage_block("AAAA", b"uncommitted")
        self.service.create_container("other")
        names = [b.name for b in container.list_blobs(include=["uncommittedblobs"])]
        self.assertEqual(sorted(names), ["staged", "x"])
        self.azurite.reset()
        self.assertEqual(
            [c.name for c in self.service.list_containers()], [self.azurite.container]
        )
        self.assertEqual(list(container.list_blobs(include=["uncommittedblobs"])), [])

    def test_stopped_fails_fast(self) -> None:
        """
        After stop() the port refuses connections: a client without retries fails
        at once with ServiceRequestError; the next shared_azurite() starts it again
        on the same port, with the data kept.
        """
        from azure.core.exceptions import ServiceRequestError

        container = self.service.get_container_client(self.azurite.container)
        container.upload_blob("kept", b"kept")
        port = self.azurite.port
        self.azurite.stop()
        quick = self.azurite.blob_service_client(retry_total=0)
        self.addCleanup(quick.close)
        started = time.monotonic()
        self.assertRaises(
            ServiceRequestError,
            quick.get_blob_client(self.azurite.container, "kept").get_blob_properties,
        )
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertIs(shared_azurite(), self.azurite)
        self.assertEqual(self.azurite.port, port)
        self.assertEqual(container.download_blob("kept").readall(), b"kept")


class RestartTests(SynchronousTestCase):
    """
    Servers of their own, stopped and started again.
    """

    def _server(self, **kwargs: Any) -> AzuriteServer:
        server = AzuriteServer(**kwargs)
        self.addCleanup(server.close)
        server.start()
        return server

    def test_restart_keeps_blobs(self) -> None:
        """
        restart() comes back on the same port with the same data folder: the
        container and its blobs are still there, the append blob still appendable
        at its end.
        """
        server = self._server()
        port, location = server.port, server.location
        with server.blob_service_client() as service:
            blob = service.get_blob_client(server.container, "log.gz")
            blob.create_append_blob()
            blob.append_block(b"before\n")
        server.restart()
        self.assertEqual((server.port, server.location), (port, location))
        with server.blob_service_client() as service:
            blob = service.get_blob_client(server.container, "log.gz")
            blob.append_block(b"after\n", appendpos_condition=7)
            self.assertEqual(blob.download_blob().readall(), b"before\nafter\n")

    def test_in_memory_restart_loses_blobs(self) -> None:
        """
        In memory (``--inMemoryPersistence``), a restart starts empty but for the
        container start() creates.
        """
        server = self._server(in_memory=True)
        self.assertIsNone(server.location)
        with server.blob_service_client() as service:
            service.get_container_client(server.container).upload_blob("x", b"x")
        server.restart()
        with server.blob_service_client() as service:
            self.assertEqual(
                list(service.get_container_client(server.container).list_blob_names()),
                [],
            )

    def test_close_removes_temporary_location(self) -> None:
        """
        close() stops the server and removes the data folder it made; one given
        as ``location`` is kept.
        """
        server = self._server()
        location = server.location
        assert location is not None
        self.assertTrue(os.path.isdir(location))
        server.close()
        self.assertFalse(server.running)
        self.assertFalse(os.path.exists(location))
        given = self.mktemp()
        os.mkdir(given)
        server = self._server(location=given)
        server.close()
        self.assertTrue(os.listdir(given))  # Azurite's database stays


class MissingTests(SynchronousTestCase):
    """
    Skip without Azurite, fail in CI.
    """

    def _without_ci(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CI"})

    def _with_ci(self) -> None:
        self.patch(os, "environ", dict(os.environ, CI="true"))

    def test_missing_skips(self) -> None:
        """
        Without Azurite, or without node, and without CI, require_azurite raises
        SkipTest.
        """
        self._without_ci()
        self.assertRaises(SkipTest, require_azurite, "/nonexistent/azurite")
        self.assertRaises(SkipTest, AzuriteServer(install_dir="/nonexistent/azurite").start)
        self.patch(os, "environ", dict(os.environ, PATH="/nonexistent"))
        self.assertRaises(SkipTest, require_azurite)

    def test_missing_fails_in_ci(self) -> None:
        """
        Without Azurite and with CI=true, require_azurite (so shared_azurite and
        every Azure emulator test's setUp) raises EmulatorMissing, an
        AssertionError (a test failure, not a skip), saying why.
        """
        self.patch(azurite_harness, "azurite_dir", lambda: "/nonexistent/azurite")
        self.patch(azurite_harness, "_shared", None)
        self._with_ci()
        error = self.assertRaises(EmulatorMissing, require_azurite)
        self.assertIsInstance(error, AssertionError)
        self.assertNotIsInstance(error, SkipTest)
        self.assertIn("In CI an emulator test that would skip must fail instead", str(error))
        self.assertIn("/nonexistent/azurite", str(error))
        self.assertRaises(EmulatorMissing, shared_azurite)
        self.assertRaises(EmulatorMissing, AzuriteServer().start)

    def test_missing_node_fails_in_ci(self) -> None:
        """
        Without node on PATH and with CI=true, require_azurite fails too.
        """
        self.patch(os, "environ", dict(os.environ, CI="true", PATH="/nonexistent"))
        error = self.assertRaises(EmulatorMissing, require_azurite)
        self.assertIn("node is not on PATH", str(error))

    def test_missing_sdk(self) -> None:
        """
        Without azure-storage-blob the harness cannot make its container:
        SkipTest, or EmulatorMissing in CI.
        """
        with mock.patch.dict(sys.modules, {"azure.storage.blob": None}):
            self._without_ci()
            self.assertRaises(SkipTest, require_blob_sdk)
            self._with_ci()
            error = self.assertRaises(EmulatorMissing, require_blob_sdk)
        self.assertIn("azure-storage-blob is not installed", str(error))
