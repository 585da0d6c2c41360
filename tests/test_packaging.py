"""
Packaging: the twistd plugin is found, and a plain wheel of the project ships it
without a ``twisted/plugins/__init__.py`` (which would hide Twisted's own plugins).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PluginTests(SynchronousTestCase):
    """What ``twistd`` sees."""

    def test_plugin_found(self) -> None:
        """``twistd loghandler`` is a service maker pointing at loghandler.tap."""
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("loghandler", makers)
        self.assertEqual(makers["loghandler"].module, "loghandler.tap")
        self.assertIn("web", makers)  # Twisted's own plugins are still visible

    def test_wheel_contents(self) -> None:
        """
        A wheel built from a clean copy of the tree (no stale ``build/``) holds the
        plugin module and exactly the tree's modules: every package, the
        ``loghandler.storage.s3`` one included, and nothing that is gone (such as
        the former ``loghandler/append.py`` or ``loghandler/storage/s3.py``).
        """
        with tempfile.TemporaryDirectory() as work:
            source = os.path.join(work, "src")
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
            for name in ("loghandler", "twisted"):
                shutil.copytree(os.path.join(ROOT, name), os.path.join(source, name), ignore=ignore)
            for name in ("setup.py", "README.rst"):
                shutil.copy(os.path.join(ROOT, name), source)
            out = os.path.join(work, "dist")
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--quiet", "-w", out, source],
                check=True,
                capture_output=True,
            )
            (wheel,) = [name for name in os.listdir(out) if name.endswith(".whl")]
            names = set(zipfile.ZipFile(os.path.join(out, wheel)).namelist())
            modules = {
                os.path.relpath(os.path.join(folder, name), source).replace(os.sep, "/")
                for folder, _, files in os.walk(source)
                if "build" not in os.path.relpath(folder, source).split(os.sep)
                and ".egg-info" not in folder
                for name in files
                if name.endswith(".py") and name != "setup.py"
            }
        self.assertIn("twisted/plugins/loghandler_plugin.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        for module in (
            "loghandler/tap.py",
            "loghandler/retry.py",
            "loghandler/stream.py",
            "loghandler/storage/s3/__init__.py",
            "loghandler/storage/s3/writer.py",
            "loghandler/storage/s3/client.py",
        ):
            self.assertIn(module, names)
        self.assertEqual({n for n in names if n.endswith(".py")}, modules)
