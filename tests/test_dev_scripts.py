"""
Tests for the development scripts: ``scripts/read_objects.py`` choosing S3 or Azure
from ``.dev/emulator.env`` and reading blobs, and ``scripts/dev_server.py``'s command
line.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import os
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
