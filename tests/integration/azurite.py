"""
Azurite, Azure Storage's emulator, as a child process serving Blob Storage for tests
and scripts.

Azurite is an npm package, pinned in ``tests/integration/azurite/package.json`` and
its lock file; ``scripts/_venv.sh`` installs it with ``npm ci`` into
``tests/integration/azurite/node_modules`` (when ``npm`` is there; ``.ci/run``
installs Node first when it is missing).  Its blob service is started as
``node .../azurite/dist/src/blob/main.js --blobHost 127.0.0.1 --blobPort PORT
--disableTelemetry --skipApiVersionCheck`` with ``--location DIR`` (a temporary
folder by default) or ``--inMemoryPersistence``, polled until it answers HTTP (at
most ``timeout`` seconds, 20 by default), and given a container.  The calls here are
synchronous (azure-storage-blob's synchronous client), so they work from a script,
from trial's ``setUp`` and from a module level.

In a trial test::

    from tests.integration.azurite import shared_azurite

    class MyTests(TestCase):
        def setUp(self):
            self.azurite = shared_azurite()  # once per process, SkipTest if absent
            self.azurite.reset()             # no containers but a fresh, empty one

        def test_x(self):
            service = self.azurite.blob_service_client()
            self.addCleanup(service.close)
            ...

For a daemon run as a subprocess (``twistd -n loghandler``), pass
``env={**os.environ, **azurite.env()}``; :meth:`AzuriteServer.env` gives
``STORAGE=azure``, ``AZURE_ACC``, ``AZURE_KEY``, ``AZURE_CONTAINER`` and
``AZURE_BLOB_ENDPOINT``.

From a script::

    with AzuriteServer() as azurite:
        print(azurite.connection_string)

When Azurite (or ``node``) is not installed, :func:`require_azurite` (and so
:meth:`AzuriteServer.start` and :func:`shared_azurite`) raises ``SkipTest`` --
unless the environment variable ``CI`` is set (non-empty), where it raises
:class:`~tests.integration.moto.EmulatorMissing`, an ``AssertionError``: in CI an
emulator test that would skip must fail instead.  The same holds for
azure-storage-blob, which the harness needs to create and empty the container
(:func:`require_blob_sdk`).

Data and restarts: by default Azurite keeps its data in a temporary folder
(``--location``), so :meth:`AzuriteServer.restart` (stop, then start on the same
port with the same folder) keeps every container and blob; the folder is removed by
:meth:`AzuriteServer.close` (``with`` and ``atexit`` call it).  Azurite writes its
metadata database on a clean exit (SIGTERM) and otherwise every 5 s: after a SIGKILL
a blob written 6 s before was there, one written just before was gone.  With
``in_memory=True`` (``--inMemoryPersistence``) a restart starts empty.

Measured here (Azurite 3.35.0 on Node 20, azure-storage-blob 12.31, 2-core VM):
Azurite answers 0.55-0.75 s after the spawn, and :meth:`AzuriteServer.start` with its
container takes 0.6-1.0 s; SIGTERM to exit takes about 0.03 s.  On Debian 12's own
Node 18 (what ``.ci/run`` installs where there is no Node) Azurite 3.35 works too
(``npm ci`` warns EBADENGINE for a few @azure packages), answers in 1.3-1.6 s, and
its exit waits for idle keep-alive connections to time out
(``--blobKeepAliveTimeout``, 5 s): about 5 s while a client is open.

Azurite facts tests may rely on (same versions):

- ``--skipApiVersionCheck`` is needed: the SDK sends ``x-ms-version: 2026-10-06``,
  which Azurite 3.35 otherwise refuses (400 InvalidHeaderValue); it answers with
  ``2025-11-05``.
- Append blocks are accepted up to 100 MiB whatever the ``x-ms-version`` (Azure
  itself allows only 4 MiB before 2022-11-02); 100 MiB + 1 byte gets 413
  RequestEntityTooLarge.
- The 50,000 committed blocks of an append blob are enforced: the 50,001st
  ``append_block`` gets 409 BlockCountExceedsLimit.  One synchronous client appends
  about 200-400 small blocks a second (50,000 in 138 s in memory).
- A stale ``appendpos_condition`` gets 412 AppendPositionConditionNotMet;
  ``create_append_blob(if_none_match="*")`` on an existing blob 409
  BlobAlreadyExists; a download starting past the end 416 InvalidRange; a missing
  blob 404 BlobNotFound, a missing container 404 ContainerNotFound.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import IO, Any, Optional, Sequence
from unittest import SkipTest

from tests.integration.moto import EmulatorMissing, free_port

__all__ = [
    "AZURITE_KEY",
    "AzuriteServer",
    "EmulatorMissing",
    "azurite_dir",
    "require_azurite",
    "require_blob_sdk",
    "shared_azurite",
]

#: Azurite's well-known development account and its published key.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

# The blob service's entry point inside the npm install folder.
_MAIN = os.path.join("node_modules", "azurite", "dist", "src", "blob", "main.js")
_CI_PREFIX = "In CI an emulator test that would skip must fail instead: "


def azurite_dir() -> str:
    """
    The folder Azurite is installed in (its ``package.json`` and ``node_modules``):
    ``tests/integration/azurite`` next to this module.
    """
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "azurite")


def _missing(reason: str) -> BaseException:
    """
    ``EmulatorMissing`` when ``CI`` is set, else ``SkipTest``, for ``reason``.
    """
    if os.environ.get("CI"):
        return EmulatorMissing(_CI_PREFIX + reason)
    return SkipTest(reason)


def require_azurite(install_dir: Optional[str] = None) -> list[str]:
    """
    The command that runs Azurite's blob service: ``[node, .../blob/main.js]``.

    :param install_dir: the npm install folder (default :func:`azurite_dir`).
    :raises SkipTest: when ``node`` or Azurite is missing and ``CI`` is not set.
    :raises EmulatorMissing: when either is missing and ``CI`` is set.
    """
    folder = install_dir if install_dir is not None else azurite_dir()
    main = os.path.join(folder, _MAIN)
    node = shutil.which("node")
    if node is None:
        raise _missing("node is not on PATH (Azurite needs Node.js; .ci/run installs it)")
    if not os.path.isfile(main):
        raise _missing(
            f"Azurite is not installed at {main} "
            f"(npm ci --no-audit --no-fund --prefix {folder}; scripts/_venv.sh does it)"
        )
    return [node, main]


def require_blob_sdk() -> None:
    """
    Make sure azure-storage-blob can be imported: the harness creates and empties
    containers with it.

    :raises SkipTest: when it cannot and ``CI`` is not set.
    :raises EmulatorMissing: when it cannot and ``CI`` is set.
    """
    try:
        importlib.import_module("azure.storage.blob")
    except ImportError as e:
        raise _missing(
            f"azure-storage-blob is not installed ({e}; pip install azure-storage-blob)"
        ) from None


class AzuriteServer:
    """
    One Azurite blob service child process on ``127.0.0.1`` with one container.

    :ivar account: the storage account, Azurite's development account
        ``devstoreaccount1``.
    :ivar key: its published key (base64).
    :ivar container: the container :meth:`start` and :meth:`reset` create.
    :ivar port: the TCP port, once started (0 before); kept by :meth:`restart`.
    :ivar location: the data folder (``None`` when in memory, and until the first
        start when it is a temporary one).
    """

    def __init__(
        self,
        *,
        container: str = "loghandler-test",
        location: Optional[str] = None,
        in_memory: bool = False,
        install_dir: Optional[str] = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """
        :param container: see :ivar:`container`.
        :param location: a folder for Azurite's data, kept after :meth:`close`;
            default a temporary folder made at the first start and removed by
            :meth:`close`.
        :param in_memory: keep data in memory only (``--inMemoryPersistence``): a
            restart loses it.  Not with ``location``.
        :param install_dir: the npm install folder (default :func:`azurite_dir`).
        :param extra_args: more options for Azurite, such as ``["--loose"]``.
        """
        if in_memory and location is not None:
            raise ValueError("in_memory=True keeps no data in a location")
        self.account = AZURITE_ACCOUNT
        self.key = AZURITE_KEY
        self.container = container
        self.location = location
        self.port = 0
        self._in_memory = in_memory
        self._own_location = False
        self._install_dir = install_dir
        self._extra_args = list(extra_args)
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._output: Optional[IO[bytes]] = None

    # -- addresses -----------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """
        ``http://127.0.0.1:{port}/devstoreaccount1``, the blob service's URL (the
        value for ``AZURE_BLOB_ENDPOINT``).
        """
        return f"http://127.0.0.1:{self.port}/{self.account}"

    @property
    def connection_string(self) -> str:
        """
        An Azure Storage connection string for this server (for
        ``BlobServiceClient.from_connection_string``).
        """
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={self.account};"
            f"AccountKey={self.key};"
            f"BlobEndpoint={self.endpoint_url};"
        )

    def env(self) -> dict[str, str]:
        """
        The environment variables that point loghandler at this server and its
        container: ``STORAGE=azure``, ``AZURE_ACC``, ``AZURE_KEY``,
        ``AZURE_CONTAINER`` and ``AZURE_BLOB_ENDPOINT``.
        """
        return {
            "STORAGE": "azure",
            "AZURE_ACC": self.account,
            "AZURE_KEY": self.key,
            "AZURE_CONTAINER": self.container,
            "AZURE_BLOB_ENDPOINT": self.endpoint_url,
        }

    # -- life cycle ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        """
        Whether the child process was started and has not exited.
        """
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """
        Start Azurite, wait until it answers HTTP, create the container.

        The first start takes a free port (up to three tries: another process may
        take it first); a later start (after :meth:`stop`) uses the same port and
        data folder again, so :attr:`endpoint_url` and :meth:`env` stay valid.

        :param timeout: seconds to wait for the first answer, per try.
        :raises SkipTest: / :raises EmulatorMissing: see :func:`require_azurite`
            and :func:`require_blob_sdk`.
        :raises RuntimeError: when it does not answer in time or exits (for
            instance when the port of a restart was taken meanwhile); the message
            holds the end of its output.
        """
        if self.running:
            return
        command = require_azurite(self._install_dir)
        require_blob_sdk()
        if self._in_memory:
            storage = ["--inMemoryPersistence"]
        else:
            if self.location is None:
                self.location = tempfile.mkdtemp(prefix="azurite-")
                self._own_location = True
            storage = ["--location", self.location]
        if self._output is None:
            self._output = tempfile.TemporaryFile()
        _live.add(self)
        fixed_port = self.port != 0
        last_error: Optional[Exception] = None
        for _ in range(1 if fixed_port else 3):
            if not fixed_port:
                self.port = free_port()
            self._output.write(f"--- azurite on port {self.port}\n".encode())
            self._output.flush()
            self._process = subprocess.Popen(
                [
                    *command,
                    "--blobHost", "127.0.0.1",
                    "--blobPort", str(self.port),
                    "--disableTelemetry",
                    "--skipApiVersionCheck",
                    *storage,
                    *self._extra_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for the daemon under test must not
                # stop the emulator first.
                start_new_session=True,
            )
            try:
                self._wait_ready(timeout)
            except RuntimeError as e:
                last_error = e
                self.stop()
                continue
            try:
                self.create_container()
            except BaseException:
                self.stop()
                raise
            return
        assert last_error is not None
        raise last_error

    def _wait_ready(self, timeout: float) -> None:
        """
        Poll ``GET /`` every 20 ms until any HTTP answer comes (Azurite answers 400
        InvalidQueryParameterValue).

        :raises RuntimeError: when the process exits or ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Azurite exited with {self._process.returncode}:\n{self.output()}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=0.5):
                    return
            except urllib.error.HTTPError:
                return  # it answered
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Azurite on port {self.port} did not answer within {timeout} s:\n"
                    f"{self.output()}"
                )
            time.sleep(0.02)

    def output(self, limit: int = 4000) -> str:
        """
        The last ``limit`` characters Azurite wrote to stdout and stderr (its
        access log included), over all starts until :meth:`close`.
        """
        if self._output is None:
            return ""
        self._output.seek(0)
        text = self._output.read().decode("utf-8", "replace")
        return text[-limit:]

    def stop(self, timeout: float = 10.0) -> None:
        """
        Stop Azurite (SIGTERM, then SIGKILL after ``timeout`` seconds) and wait for
        it.  The port, the data folder and the output are kept for :meth:`start`
        and :meth:`restart`.  Harmless when it is not running.
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self, timeout: float = 20.0) -> None:
        """
        Stop Azurite and start it again on the same port with the same data folder:
        containers and blobs are kept (unless ``in_memory``).

        :raises RuntimeError: see :meth:`start`.
        """
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """
        Stop Azurite for good: remove the temporary data folder (not one given as
        ``location``) and the output.  A later :meth:`start` begins afresh on a new
        port.
        """
        self.stop()
        _live.discard(self)
        if self._own_location and self.location is not None:
            shutil.rmtree(self.location, ignore_errors=True)
            self.location = None
            self._own_location = False
        if self._output is not None:
            self._output.close()
            self._output = None
        self.port = 0

    def __enter__(self) -> "AzuriteServer":
        """
        Start Azurite (``with AzuriteServer() as azurite:``).
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
        :meth:`close` it.
        """
        self.close()

    # -- state ---------------------------------------------------------------------

    def blob_service_client(self, **kwargs: Any) -> Any:
        """
        An azure-storage-blob ``BlobServiceClient`` straight to this server with the
        development key, for setup and for reading back what the daemon stored; the
        caller closes it.

        :param kwargs: client settings (``retry_total``, ``connection_timeout``,
            ``read_timeout``...), by default ``retry_total=3``,
            ``connection_timeout=5`` and ``read_timeout=30``.
        """
        from azure.storage.blob import BlobServiceClient

        settings: dict[str, Any] = {
            "retry_total": 3,
            "connection_timeout": 5,
            "read_timeout": 30,
        }
        settings.update(kwargs)
        return BlobServiceClient.from_connection_string(self.connection_string, **settings)

    def create_container(self, name: Optional[str] = None) -> None:
        """
        Create the container ``name`` (default :ivar:`container`).  An existing one
        is fine.
        """
        from azure.core.exceptions import ResourceExistsError

        with self.blob_service_client() as service:
            try:
                service.create_container(name or self.container)
            except ResourceExistsError:
                pass

    def reset(self) -> None:
        """
        Delete every container (with its blobs, committed or not) and create
        :ivar:`container` again, empty.  Starts Azurite if needed.  Takes about
        15 ms.
        """
        self.start()
        with self.blob_service_client() as service:
            for item in service.list_containers():
                service.delete_container(item.name)
            service.create_container(self.container)


# Every server started and not closed: closed at exit, as each runs in a session of
# its own and would outlive the test process.
_live: set[AzuriteServer] = set()


@atexit.register
def _close_all() -> None:
    for server in list(_live):
        server.close()


_shared: Optional[AzuriteServer] = None


def shared_azurite() -> AzuriteServer:
    """
    The process-wide :class:`AzuriteServer`, started on first use (and again if it
    was stopped) and closed when the interpreter exits (``atexit``).  Tests call
    :meth:`AzuriteServer.reset` in ``setUp`` to start from an empty container; a
    test that stops it (to simulate an outage) starts it again in its cleanup, or
    leaves that to the next :func:`shared_azurite` call.

    :raises SkipTest: / :raises EmulatorMissing: see :func:`require_azurite` and
        :func:`require_blob_sdk`.
    """
    global _shared
    if _shared is None:
        require_azurite()
        require_blob_sdk()
        server = AzuriteServer()
        server.start()
        _shared = server
    elif not _shared.running:
        _shared.start()
    return _shared


if __name__ == "__main__":
    # Run Azurite by hand: prints its environment, stops on Ctrl-C.
    with AzuriteServer() as _azurite:
        for _name, _value in _azurite.env().items():
            print(f"{_name}={_value}")
        print(f"AZURE_STORAGE_CONNECTION_STRING={_azurite.connection_string}")
        sys.stdout.flush()
        try:
            while _azurite.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
