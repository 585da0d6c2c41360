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


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (``512Mi``, ``1Gi``, ``300M``) in bytes."""
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "K": 1000, "M": 1000**2, "G": 1000**3}
    match = re.fullmatch(r"([0-9]+)([KMG]i?)?", text)
    assert match is not None, text
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


class KubernetesTests(SynchronousTestCase):
    """contrib/kubernetes/ against the code (the schemas: test_contrib_tools.py)."""

    def setUp(self) -> None:
        objects = files.manifests()
        self.assertEqual(
            set(objects),
            {"ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service"},
        )
        self.settings: dict[str, str] = objects["ConfigMap"]["data"]
        self.deployment = objects["Deployment"]
        self.pod = self.deployment["spec"]["template"]
        (self.container,) = self.pod["spec"]["containers"]
        self.service = objects["Service"]
        self.secret = objects["Secret"]
        self.budget = objects["PodDisruptionBudget"]
        self.ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}

    def setting(self, name: str) -> str:
        """A setting as the pods get it: the ConfigMap's value, else the default's text."""
        if name in self.settings:
            return self.settings[name]
        (setting,) = [s for s in SETTINGS if s.env == name]
        return setting.default_text

    def test_settings(self) -> None:
        """
        Every variable the pods get (the ConfigMap's, the container's env, the
        Secret's) is a loghandler setting; the credentials come from the Secret
        alone, marked secret in loghandler.config; and the ConfigMap with them is a
        configuration loghandler accepts.
        """
        env_names = {e["name"] for e in self.container.get("env", [])}
        secret_keys = set(self.secret["stringData"])
        for names in (set(self.settings), env_names, secret_keys):
            self.assertEqual(names - SETTING_NAMES, set())
        secrets = {s.env for s in SETTINGS if s.secret}
        self.assertEqual(set(self.settings) & secrets, set())
        self.assertTrue(secret_keys <= secrets, secret_keys)
        for entry in self.container["env"]:
            reference = entry["valueFrom"]["secretKeyRef"]
            self.assertEqual(reference["name"], self.secret["metadata"]["name"])
            self.assertEqual(reference["key"], entry["name"])
            self.assertIn(reference["key"], secret_keys)
        (source,) = self.container["envFrom"]
        self.assertEqual(source["configMapRef"]["name"], "loghandler")
        config = from_environ({**self.settings, **self.secret["stringData"]})
        self.assertEqual(config.port, DEFAULT_PORT)

    def test_ports(self) -> None:
        """
        The messages' port is PORT (its default, 8902), which the Service exposes;
        the probes and the Prometheus annotation use ADMIN_PORT, which it does not.
        """
        self.assertEqual(self.ports["http"], DEFAULT_PORT)
        self.assertEqual(int(self.setting("PORT")), DEFAULT_PORT)
        admin = int(self.setting("ADMIN_PORT"))
        self.assertEqual(self.ports["admin"], admin)
        self.assertNotEqual(admin, DEFAULT_PORT)
        (port,) = self.service["spec"]["ports"]
        self.assertEqual((port["port"], port["targetPort"]), (DEFAULT_PORT, "http"))
        for probe in ("livenessProbe", "readinessProbe"):
            self.assertEqual(self.container[probe]["httpGet"]["port"], "admin", probe)
        annotations = self.pod["metadata"]["annotations"]
        self.assertEqual(annotations["prometheus.io/scrape"], "true")
        self.assertEqual(int(annotations["prometheus.io/port"]), admin)
        self.assertEqual(annotations["prometheus.io/path"], "/metrics")

    def test_probe_paths(self) -> None:
        """
        Liveness on /livez (a storage outage restarts no pod), readiness on /readyz.
        (That loghandler answers them on ADMIN_PORT: test_init_script.py.)
        """
        self.assertEqual(self.container["livenessProbe"]["httpGet"]["path"], "/livez")
        self.assertEqual(self.container["readinessProbe"]["httpGet"]["path"], "/readyz")

    def test_grace(self) -> None:
        """
        terminationGracePeriodSeconds, counted from the start of the preStop pause,
        is above the pause plus SHUTDOWN_TIMEOUT_S (plus the supervisor's
        :data:`KILL_GRACE_S` with WORKERS above 1): the kubelet's SIGKILL never cuts
        a flush that keeps its deadline.
        """
        command = self.container["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(command[0], "sleep")
        pause = float(command[1])
        self.assertGreaterEqual(pause, 5)
        flush = float(self.setting("SHUTDOWN_TIMEOUT_S"))
        if self.setting("WORKERS") != "1":
            flush += KILL_GRACE_S
        grace = self.pod["spec"]["terminationGracePeriodSeconds"]
        self.assertGreater(grace, pause + flush)

    def test_memory(self) -> None:
        """The memory limit is above BUFFER_BUDGET_BYTES, and the request at least it."""
        budget = int(self.setting("BUFFER_BUDGET_BYTES"))
        resources = self.container["resources"]
        self.assertGreater(quantity_bytes(resources["limits"]["memory"]), budget)
        self.assertGreaterEqual(quantity_bytes(resources["requests"]["memory"]), budget)

    def test_selectors(self) -> None:
        """The Deployment, the Service and the budget select the pods' labels."""
        labels = self.pod["metadata"]["labels"]
        for selector in (
            self.deployment["spec"]["selector"]["matchLabels"],
            self.service["spec"]["selector"],
            self.budget["spec"]["selector"]["matchLabels"],
        ):
            self.assertEqual(selector, labels)

    def test_image_user(self) -> None:
        """
        The pod runs as the image's user (non-root, the Dockerfile's USER) on a
        read-only root file system, without privileges.
        """
        user = [a for i, a in files.dockerfile_instructions() if i == "USER"][-1]
        security = self.pod["spec"]["securityContext"]
        self.assertTrue(security["runAsNonRoot"])
        self.assertEqual("%d:%d" % (security["runAsUser"], security["runAsGroup"]), user)
        container = self.container["securityContext"]
        self.assertTrue(container["readOnlyRootFilesystem"])
        self.assertFalse(container["allowPrivilegeEscalation"])
        self.assertEqual(container["capabilities"]["drop"], ["ALL"])
