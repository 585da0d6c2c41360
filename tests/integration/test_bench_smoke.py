"""
Smoke test of ``bench/http_throughput.py``: it runs end to end (baseline, loghandler
against moto, one 1-second window with one connection) and writes its JSON, and its
read-back finds every message answered 200 stored.  No figure is asserted: speed is
the benchmark's business, not the test suite's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.moto import require_moto_server

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class BenchSmokeTests(SynchronousTestCase):
    """The benchmark's command runs and checks storage."""

    def test_runs_end_to_end(self) -> None:
        if shutil.which("wrk") is None:
            if os.environ.get("CI"):
                self.fail("wrk is not installed; .ci/run installs it (apt-get install wrk)")
            raise SkipTest("wrk is not installed (apt-get install wrk)")
        require_moto_server()
        out = os.path.abspath(self.mktemp())
        os.makedirs(out)
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "http_throughput.py"),
             "--seconds", "1", "--warmup", "1", "--repeat", "1", "--loads", "c1",
             "--storage", "moto", "--retries", "0", "--quiet-wait", "0",
             "--json", os.path.join(out, "bench.json"), "--logs", out],
            capture_output=True, text=True, timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(os.path.join(out, "bench.json")) as f:
            report = json.load(f)
        rows = {(row["system"], row["load"]): row for row in report["table"]}
        self.assertEqual(
            sorted(rows),
            [("baseline/none %s w1" % self.interpreter(), "c1"),
             ("loghandler/moto %s w1" % self.interpreter(), "c1")],
        )
        for row in rows.values():
            self.assertGreater(row["requests"], 0)
            self.assertGreater(row["server_cpu_s"], 0)
        [loghandler] = [s for s in report["systems"] if s["label"].startswith("loghandler/")]
        check = loghandler["final"]["storage_check"]
        self.assertTrue(check["ok"], check)
        self.assertGreater(check["acked"], 0)
        self.assertIn("storage: acked", result.stdout)

    @staticmethod
    def interpreter() -> str:
        import platform

        return platform.python_implementation().lower() + "%d.%d" % sys.version_info[:2]
