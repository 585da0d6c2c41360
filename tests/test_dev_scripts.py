"""
Tests for the development scripts: ``scripts/read_objects.py`` choosing S3 or Azure
from ``.dev/emulator.env`` and reading blobs, and ``scripts/dev_server.py``'s command
line and its one-per-clone lock.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import os
import signal
import subprocess
import sys
from types import ModuleType, SimpleNamespace
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def _script(name: str) -> ModuleType:
    """Import ``scripts/{name}.py`` (the folder is no package)."""
    spec = importlib.util.spec_from_file_location("_script_" + name, os.path.join(SCRIPTS, name + ".py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


read_objects = _script("read_objects")
dev_server = _script("dev_server")


class SettingsTests(SynchronousTestCase):
    """``settings`` reads .dev/emulator.env, else the environment; ``is_azure`` picks the store."""

    def write(self, text: str) -> str:
        path = str(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_azure_file(self) -> None:
        """``STORAGE=azure`` in the file means Azure; a value may hold ``=``."""
        env = read_objects.settings(
            self.write("STORAGE=azure\nAZURE_ACC=devstoreaccount1\nAZURE_KEY=abc==\n"), environ={}
        )
        self.assertTrue(read_objects.is_azure(env))
        self.assertEqual(env["AZURE_KEY"], "abc==")

    def test_s3_file_wins_over_environment(self) -> None:
        """A file without ``STORAGE`` (moto's) means S3, whatever the environment says."""
        path = self.write("AWS_BUCKET=loghandler-dev\nAWS_REGION=us-east-1\n")
        env = read_objects.settings(path, environ={"STORAGE": "azure"})
        self.assertFalse(read_objects.is_azure(env))
        self.assertEqual(env, {"AWS_BUCKET": "loghandler-dev", "AWS_REGION": "us-east-1"})

    def test_no_file(self) -> None:
        """Without the file, the environment decides."""
        missing = self.mktemp()
        self.assertTrue(read_objects.is_azure(read_objects.settings(missing, environ={"STORAGE": "azure"})))
        self.assertFalse(read_objects.is_azure(read_objects.settings(missing, environ={})))


class FakeContainer:
    """Just what ``azure_show`` calls of a ``ContainerClient``."""

    def __init__(self, blobs: dict[str, list[bytes]]) -> None:
        self.blobs = blobs

    def list_blobs(self) -> list[Any]:
        return [SimpleNamespace(name=n, size=sum(map(len, b))) for n, b in self.blobs.items()]

    def get_blob_client(self, name: str) -> Any:
        props = SimpleNamespace(append_blob_committed_block_count=len(self.blobs[name]))
        return SimpleNamespace(get_blob_properties=lambda: props)

    def download_blob(self, name: str) -> Any:
        return SimpleNamespace(readall=lambda: b"".join(self.blobs[name]))


class AzureShowTests(SynchronousTestCase):
    """``azure_show`` lists blobs with their committed blocks and prints every member's lines."""

    def run_show(self, container: FakeContainer, argv: list[str]) -> bytes:
        out = io.TextIOWrapper(io.BytesIO(), write_through=True)
        with contextlib.redirect_stdout(out):
            self.assertEqual(read_objects.azure_show(container, argv), 0)
        out.flush()
        return out.buffer.getvalue()

    def test_list(self) -> None:
        blocks = [gzip.compress(b'{"a":1}\n'), gzip.compress(b'{"a":2}\n')]
        listing = self.run_show(FakeContainer({"k/x": blocks}), []).decode()
        self.assertEqual(listing.split(), [str(sum(map(len, blocks))), "2", "blocks", "k/x"])

    def test_empty(self) -> None:
        self.assertIn(b"no blobs yet", self.run_show(FakeContainer({}), []))

    def test_print_all_members(self) -> None:
        blocks = [gzip.compress(b'{"a":1}\n'), gzip.compress(b'{"a":2}\n')]
        self.assertEqual(self.run_show(FakeContainer({"k/x": blocks}), ["k/x"]), b'{"a":1}\n{"a":2}\n')


class DevServerArgsTests(SynchronousTestCase):
    """``scripts/dev-server``'s command line."""

    def test_azure_flag(self) -> None:
        self.assertTrue(dev_server.parse_args(["--azure"]).azure)
        self.assertFalse(dev_server.parse_args([]).azure)

    def test_help_exits_zero(self) -> None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as caught:
            dev_server.parse_args(["--help"])
        self.assertEqual(caught.exception.code, 0)
        self.assertIn("--azure", out.getvalue())

    def test_unknown_argument_fails(self) -> None:
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as caught:
            dev_server.parse_args(["--nope"])
        self.assertEqual(caught.exception.code, 2)


class DevServerLockTests(SynchronousTestCase):
    """
    One ``scripts/dev-server`` per clone: a second start says in one line where the
    running one serves and exits 1, without starting an emulator or touching
    ``.dev/emulator.env``; the lock of a dead run is taken over.
    """

    def setUp(self) -> None:
        self.dev_dir = self.mktemp()
        self.lock_path = os.path.join(self.dev_dir, "dev-server.lock")

    def hold(self, info: dict[str, str]) -> int:
        """Take the lock in this process, as a running dev-server holds it."""
        fd = dev_server.take_lock(self.dev_dir)
        self.addCleanup(os.close, fd)
        dev_server.record(fd, info)
        return fd

    def no_emulator(self, azure: bool) -> Any:
        """Stands in for start_emulator: a refused start must not get there."""
        self.fail("a second dev-server started an emulator")

    def test_second_start_refused(self) -> None:
        """
        With the lock held, main() exits with one line naming the running pid,
        loghandler's and the emulator's addresses; the emulator settings stay.
        """
        self.hold(
            {
                "pid": "4242",
                "loghandler": "http://127.0.0.1:8902/log",
                "emulator": "moto (S3) on http://127.0.0.1:40000",
            }
        )
        env_file = os.path.join(self.dev_dir, "emulator.env")
        with open(env_file, "w") as f:
            f.write("AWS_ENDPOINT_URL=http://127.0.0.1:40000\n")
        self.patch(dev_server, "start_emulator", self.no_emulator)
        with self.assertRaises(SystemExit) as caught:
            dev_server.main([], self.dev_dir)
        message = caught.exception.code
        assert isinstance(message, str)  # sys.exit(text): printed to stderr, status 1
        self.assertEqual(message.splitlines(), [message])
        self.assertEqual(
            message,
            "scripts/dev-server is already running in this clone (pid 4242): loghandler on"
            " http://127.0.0.1:8902/log, moto (S3) on http://127.0.0.1:40000; stop it"
            " (Ctrl-C there) or use scripts/read-objects",
        )
        with open(env_file) as f:
            self.assertEqual(f.read(), "AWS_ENDPOINT_URL=http://127.0.0.1:40000\n")

    def test_second_start_while_first_starts(self) -> None:
        """Before the first one's emulator is up, the line says it is starting."""
        self.hold({"pid": "7", "loghandler": "http://127.0.0.1:9000/log"})
        with self.assertRaises(dev_server.AlreadyRunning) as caught:
            dev_server.take_lock(self.dev_dir)
        self.assertIn(
            "(pid 7): loghandler on http://127.0.0.1:9000/log, its emulator still starting",
            str(caught.exception),
        )

    def test_stale_file_replaced(self) -> None:
        """
        A lock file left by a dead run (nobody holds the lock) is taken, and its
        content replaced whole by the new run's.
        """
        os.makedirs(self.dev_dir)
        with open(self.lock_path, "w") as f:
            f.write("pid=999999\nloghandler=http://127.0.0.1:8902/log\nemulator=moto (S3) on x\n")
        fd = self.hold({"pid": "1"})
        with open(self.lock_path) as f:
            self.assertEqual(f.read(), "pid=1\n")
        self.assertIsInstance(fd, int)

    def test_lock_released_when_the_holder_dies(self) -> None:
        """
        A dev-server process that holds the lock refuses the next start; once it is
        killed (SIGKILL: no cleanup of its own), the next start takes the lock.
        """
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os, sys, time\n"
                f"sys.path.insert(0, {SCRIPTS!r})\n"
                "import dev_server\n"
                f"fd = dev_server.take_lock({self.dev_dir!r})\n"
                "dev_server.record(fd, {'pid': str(os.getpid()), 'loghandler': 'http://h:1/log'})\n"
                "print('locked', flush=True)\n"
                "time.sleep(60)\n",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )

        def reap() -> None:
            if holder.poll() is None:
                holder.kill()
            holder.wait()
            assert holder.stdout is not None
            holder.stdout.close()

        self.addCleanup(reap)
        assert holder.stdout is not None
        self.assertEqual(holder.stdout.readline(), "locked\n")
        with self.assertRaises(dev_server.AlreadyRunning) as caught:
            dev_server.take_lock(self.dev_dir)
        self.assertIn(f"(pid {holder.pid}): loghandler on http://h:1/log", str(caught.exception))
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        self.hold({"pid": str(os.getpid())})
        with open(self.lock_path) as f:
            self.assertEqual(f.read(), f"pid={os.getpid()}\n")
