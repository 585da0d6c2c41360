"""
contrib/'s deployment files against the code: the systemd unit's stop timeout is
above the flush deadline, the settings they set are loghandler's own and valid, the
image runs ``twistd --nodaemon loghandler`` on the default port as a non-root user.
The programs that read these files check them too, in tests/integration/
(test_contrib_tools.py: systemd-analyze, shellcheck, hadolint; test_init_script.py
and test_container.py run them).
"""

from __future__ import annotations

import fnmatch
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from loghandler.config import SETTINGS, Config, from_environ
from loghandler.supervisor import EXIT_CONFIG, KILL_GRACE_S
from tests import contrib_files as files

SETTING_NAMES = frozenset(s.env for s in SETTINGS)
DEFAULT_PORT = Config().port
SHUTDOWN_TIMEOUT_S = Config().shutdown_timeout_s


class SystemdUnitTests(SynchronousTestCase):
    """contrib/systemd/loghandler.service."""

    def test_runs_twistd_in_the_foreground(self) -> None:
        """
        ``Type=simple`` with ``twistd --nodaemon --pidfile= loghandler``: systemd
        supervises the process itself, and no twistd.pid is written (the file system
        is read-only to it).
        """
        self.assertEqual(files.unit_value("Type"), "simple")
        words = files.unit_value("ExecStart").split()
        self.assertTrue(words[0].endswith("/twistd"), words)
        self.assertIn("--nodaemon", words)
        self.assertIn("--pidfile=", words)
        self.assertEqual(words[-1], "loghandler")

    def test_reload(self) -> None:
        """``systemctl reload`` sends SIGHUP (the daemon reads AUTH_TOKENS_FILE again)."""
        self.assertEqual(files.unit_value("ExecReload"), "/bin/kill -HUP $MAINPID")

    def test_settings_from_the_defaults_file(self) -> None:
        """The settings come from /etc/default/loghandler, as for the init script."""
        self.assertEqual(files.unit_value("EnvironmentFile"), "/etc/default/loghandler")

    def test_stop_waits_for_the_flush(self) -> None:
        """
        SIGTERM to the main process only (the supervisor of ``WORKERS`` stops its
        workers), and ``TimeoutStopSec`` above the default ``SHUTDOWN_TIMEOUT_S``
        plus the supervisor's :data:`KILL_GRACE_S`, so that systemd's SIGKILL never
        cuts a flush that keeps its deadline.
        """
        self.assertEqual(files.unit_value("KillSignal"), "SIGTERM")
        self.assertEqual(files.unit_value("KillMode"), "mixed")
        timeout = files.systemd_seconds(files.unit_value("TimeoutStopSec"))
        self.assertGreater(timeout, SHUTDOWN_TIMEOUT_S + KILL_GRACE_S)

    def test_restarts(self) -> None:
        """
        Restarted on failure (exit 75, fenced, included), but not after a setting
        was refused (exit 2): restarting would not help.
        """
        self.assertEqual(files.unit_value("Restart"), "on-failure")
        self.assertIn(str(EXIT_CONFIG), files.unit_value("RestartPreventExitStatus").split())

    def test_hardened(self) -> None:
        """
        It runs as a user of its own with no privileges, a read-only system and no
        home directories, and only IP and local sockets.
        """
        for key, value in [
            ("DynamicUser", "yes"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
        ]:
            self.assertEqual(files.unit_value(key), value, key)
        self.assertEqual(
            set(files.unit_value("RestrictAddressFamilies").split()),
            {"AF_INET", "AF_INET6", "AF_UNIX"},
        )


class DefaultsFileTests(SynchronousTestCase):
    """contrib/default/loghandler, read by the init script and by systemd."""

    def test_names(self) -> None:
        """
        Every variable it sets, or shows commented out, is a loghandler setting or one
        of the init script's own (which the script's header lists).
        """
        text = files.read(files.DEFAULTS)
        shown = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
        self.assertGreater(len(shown), 10)
        self.assertEqual(shown - SETTING_NAMES - files.INIT_SCRIPT_SETTINGS, set())
        header = files.read(files.INIT_SCRIPT)
        for name in files.INIT_SCRIPT_SETTINGS:
            self.assertIn("#   %s " % name, header)

    def test_valid(self) -> None:
        """
        What it sets is a configuration loghandler accepts, and keeps to plain
        ``NAME=value`` (no quotes, no ``$``), which sh and systemd read alike.
        """
        values = files.defaults_file()
        for name, value in values.items():
            self.assertNotRegex(value, r"[\"'$`\\ ]", name)
        config = from_environ({k: v for k, v in values.items() if k in SETTING_NAMES})
        self.assertEqual(config.port, DEFAULT_PORT)

    def test_stop_timeout_text(self) -> None:
        """
        The file's note on stop timeouts matches the unit: the same TimeoutStopSec.
        """
        timeout = files.unit_value("TimeoutStopSec")
        self.assertIn("TimeoutStopSec (%s s in the unit)" % timeout, files.read(files.DEFAULTS))


class DockerfileTests(SynchronousTestCase):
    """contrib/Dockerfile and the build context's .dockerignore."""

    def setUp(self) -> None:
        self.instructions = files.dockerfile_instructions()

    def last(self, instruction: str) -> str:
        """The arguments of the last ``instruction``."""
        values = [a for i, a in self.instructions if i == instruction]
        self.assertTrue(values, instruction)
        return values[-1]

    def test_command(self) -> None:
        """``twistd --nodaemon --pidfile= loghandler`` from the virtualenv, on SIGTERM stopped."""
        self.assertEqual(
            files.dockerfile_exec_form(self.last("CMD")),
            ["twistd", "--nodaemon", "--pidfile=", "loghandler"],
        )
        self.assertEqual(self.last("STOPSIGNAL"), "SIGTERM")
        self.assertIn("PATH=/opt/loghandler/bin:$PATH", self.last("ENV"))

    def test_port(self) -> None:
        """It exposes the default PORT."""
        self.assertIn(str(DEFAULT_PORT), self.last("EXPOSE").split())

    def test_non_root(self) -> None:
        """The final stage runs as the numeric user it creates, not as root."""
        user = self.last("USER")
        uid = user.split(":")[0]
        self.assertTrue(uid.isdigit() and int(uid) > 0, user)
        self.assertIn("--uid %s" % uid, self.last("RUN"))

    def test_install(self) -> None:
        """
        ``pip install . -c constraints/cpython.txt``, and the plugin cache built at
        build time (README.rst, Install).
        """
        build = [a for i, a in self.instructions if i == "RUN" and "pip install" in a]
        self.assertEqual(len(build), 1)
        self.assertRegex(build[0], r"pip install .* \. -c constraints/cpython\.txt")
        self.assertIn("getPlugins(IPlugin)", build[0])
        self.assertIn("getPlugins(IPlugin)", files.read(os.path.join(files.ROOT, "README.rst")))

    def test_context(self) -> None:
        """
        .dockerignore lets in what each COPY from the context takes, and keeps out
        the virtualenvs, the tests and git.
        """
        patterns = [
            line.strip()
            for line in files.read(files.DOCKERIGNORE).splitlines()
            if line.strip() and not line.startswith("#")
        ]

        def included(path: str) -> bool:
            keep = True
            for pattern in patterns:
                negated = pattern.startswith("!")
                pattern = pattern.lstrip("!").rstrip("/")
                if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                    keep = negated
            return keep

        copied = []
        for instruction, arguments in self.instructions:
            if instruction == "COPY" and not arguments.startswith("--from"):
                copied.extend(arguments.split()[:-1])
        self.assertGreater(len(copied), 3)
        for source in copied:
            source = source.rstrip("/")
            self.assertTrue(os.path.exists(os.path.join(files.ROOT, source)), source)
            self.assertTrue(included(source), source)
        for path in (".venv", ".git", "tests", "_trial_temp", "loghandler.egg-info"):
            self.assertFalse(included(path), path)
