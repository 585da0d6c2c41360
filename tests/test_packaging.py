"""
Packaging: the twistd plugin is found, and a plain wheel of the project ships it
without a ``twisted/plugins/__init__.py`` (which would hide Twisted's own plugins).
"""

from __future__ import annotations

import os
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
        """A wheel built from the tree holds the plugin module and every package."""
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--quiet", "-w", out, ROOT],
                check=True,
                capture_output=True,
            )
            (wheel,) = [name for name in os.listdir(out) if name.endswith(".whl")]
            names = set(zipfile.ZipFile(os.path.join(out, wheel)).namelist())
        self.assertIn("twisted/plugins/loghandler_plugin.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        for module in ("loghandler/tap.py", "loghandler/storage/s3.py", "loghandler/stream.py"):
            self.assertIn(module, names)
