"""
contrib/Dockerfile built and run for real with podman (or docker), end to end: the
image's ``twistd --nodaemon loghandler``, as its non-root user on a read-only root
file system, takes messages and stores them in moto on SIGTERM (``podman stop``),
exiting 0.

What this machine needs, and how the test copes without it:

- No registry image can be pulled here (only PyPI, Debian and npm are reachable), so
  unless ``python:3.12-slim-bookworm`` (the Dockerfile's ``PYTHON_IMAGE``) or
  ``CONTAINER_BASE_IMAGE`` is already in the engine's store, the test makes a base
  image of its own: a minimal Debian of the host's release by ``debootstrap`` with
  ``python3``, ``python3-venv`` and ``python-is-python3`` (about 90 s; kept as
  ``localhost/loghandler-test-base:<release>`` for the next run).
- podman's default runtime, crun, refuses cgroups in hybrid mode, and raising a
  container's rlimits needs CAP_SYS_RESOURCE, which this sandbox lacks: when a
  trivial container does not run, the test tries runc with lowered rlimits (nofile
  and nproc 4096).
- The build's pip reaches PyPI through this machine's TLS proxy: podman's build
  gets the host's /etc/ssl/certs, which the Debian base's pip reads.
- Containers share the host's network (``--network=host``), so that the daemon
  reaches moto and the test reaches the daemon on 127.0.0.1 only.

Skipped, with the reason, when no engine is installed or none can run a container
(not root, no debootstrap, the runtimes refused).
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from typing import Optional

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests import contrib_files as files
from tests.helpers import bucket_objects, read_lines
from tests.integration.moto import free_port, shared_moto
from tests.integration.test_end_to_end import canonical, key, message_body, post_all

#: The Dockerfile's default base image.
DEFAULT_BASE = "python:3.12-slim-bookworm"
#: The image the test builds.
IMAGE = "localhost/loghandler:test"
#: Options that let a container start in this sandbox (see the module docstring).
SANDBOX_GLOBAL = ["--runtime", "runc"]
SANDBOX_RUN = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def run(command: list[str], timeout: float = 120, check: bool = True) -> str:
    """
    Run ``command``; its output (stdout and stderr).

    :raises AssertionError: it exited non-zero and ``check`` is true (with its output).
    """
    done = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
    )
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    if check and done.returncode != 0:
        raise AssertionError("%s exited %d:\n%s" % (" ".join(command), done.returncode, output[-4000:]))
    return output


def succeeds(command: list[str], timeout: float = 120) -> bool:
    """Whether ``command`` exits 0."""
    try:
        return subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
        ).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def os_release() -> dict[str, str]:
    """/etc/os-release as a dict."""
    values = {}
    with open("/etc/os-release") as f:
        for line in f:
            name, _, value = line.strip().partition("=")
            values[name] = value.strip('"')
    return values


class Engine:
    """
    A container engine's command and the options this machine needs for it.

    :ivar command: ``["podman"]`` or ``["podman", "--runtime", "runc"]``, or docker.
    :ivar run_options: options for ``build`` and ``run`` (lowered rlimits, or none).
    """

    def __init__(self) -> None:
        """
        :raises SkipTest: no engine installed, or its daemon is not there.
        """
        podman, docker = shutil.which("podman"), shutil.which("docker")
        if podman and succeeds([podman, "info"]):
            self.command = [podman]
        elif docker and succeeds([docker, "info"]):
            self.command = [docker]
        else:
            raise SkipTest(
                "no container engine that works: podman %s, docker %s (the client alone"
                " answers docker --version; `docker info` needs its daemon)"
                % ("found" if podman else "not installed", "found" if docker else "not installed")
            )
        self.run_options: list[str] = []

    def image_exists(self, image: str) -> bool:
        """Whether ``image`` is in the engine's store."""
        return succeeds(self.command + ["image", "inspect", image])

    def fit(self, image: str) -> None:
        """
        Find the options with which a container of ``image`` runs here: none, else
        (podman) runc and lowered rlimits.

        :raises SkipTest: neither runs one.
        """
        trial = ["run", "--rm", "--network=host"]
        if succeeds(self.command + trial + [image, "true"]):
            return
        output = run(self.command + trial + [image, "true"], check=False)
        if self.command[0].endswith("podman") and shutil.which("runc"):
            if succeeds(self.command + SANDBOX_GLOBAL + trial + SANDBOX_RUN + [image, "true"]):
                self.command = self.command + SANDBOX_GLOBAL
                self.run_options = SANDBOX_RUN
                return
        raise SkipTest("%s cannot run a container here: %s" % (self.command[0], output[-500:]))


def base_image(engine: Engine) -> str:
    """
    The base image to build on: ``CONTAINER_BASE_IMAGE``, the Dockerfile's default
    when present, else a Debian made by debootstrap (see the module docstring).

    :raises SkipTest: none of these can be had.
    """
    chosen = os.environ.get("CONTAINER_BASE_IMAGE")
    if chosen:
        return chosen
    if engine.image_exists(DEFAULT_BASE):
        return DEFAULT_BASE
    release = os_release().get("VERSION_CODENAME") or "bookworm"
    made = "localhost/loghandler-test-base:%s" % release
    if engine.image_exists(made):
        return made
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.getuid() != 0:
        raise SkipTest(
            "no base image: %s cannot be pulled here, and debootstrap (as root) is not"
            " there to make one" % DEFAULT_BASE
        )
    rootfs = tempfile.mkdtemp(prefix="loghandler-base-", dir="/var/tmp")
    try:
        run(
            [debootstrap, "--variant=minbase",
             "--include=python3,python3-venv,python-is-python3,ca-certificates",
             release, rootfs, "http://deb.debian.org/debian"],
            timeout=900,
        )
        shutil.rmtree(os.path.join(rootfs, "var", "cache", "apt", "archives"), ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        subprocess.run(
            engine.command + ["import", "-", made], stdin=tar.stdout, check=True,
            capture_output=True, timeout=600,
        )
        tar.stdout.close()
        if tar.wait() != 0:
            raise AssertionError("tar of the debootstrap tree failed")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return made


class ContainerTests(SynchronousTestCase):
    """The image from contrib/Dockerfile against moto."""

    def setUp(self) -> None:
        self.engine = Engine()
        base = base_image(self.engine)
        self.engine.fit(base)
        self.moto = shared_moto()
        self.moto.reset()
        self.s3 = self.moto.botocore_client()
        self.addCleanup(self.s3.close)
        build = ["build", "--network=host"] + self.engine.run_options
        if self.engine.command[0].endswith("podman") and os.path.isdir("/etc/ssl/certs"):
            # This machine reaches PyPI through a TLS proxy whose certificate is in
            # the host's bundle; Debian's pip (the debootstrap base) reads that path.
            build += ["--volume", "/etc/ssl/certs:/etc/ssl/certs:ro"]
        if base != DEFAULT_BASE:
            build += ["--build-arg", "PYTHON_IMAGE=%s" % base]
        run(
            self.engine.command + build + ["-f", files.DOCKERFILE, "-t", IMAGE, files.ROOT],
            timeout=1200,
        )
        self.name = "loghandler-test-%d" % os.getpid()
        self.addCleanup(run, self.engine.command + ["rm", "-f", self.name], 60, False)

    def wait_ready(self, port: int) -> None:
        """Poll /healthz until 200 (the store was reached)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/healthz")
                status = connection.getresponse().status
                connection.close()
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.fail("no 200 from /healthz in 60 s:\n" + self.logs())

    def logs(self) -> str:
        """The container's output."""
        return run(self.engine.command + ["logs", self.name], 60, False)

    def objects(self) -> dict[str, bytes]:
        """The objects in the bucket outside ``_loghandler/``, by key."""
        return bucket_objects(self.s3, self.moto.bucket)

    def test_post_then_stop(self) -> None:
        """
        The container (read-only root, the image's user) serves POST /log; nothing is
        stored before the stop; ``stop`` (SIGTERM) completes every object, the
        container exits 0, and the bucket holds exactly the lines sent.
        """
        port = free_port()
        environment: list[str] = []
        for name, value in {**self.moto.env(), "ADDR": "127.0.0.1", "PORT": str(port)}.items():
            environment += ["-e", "%s=%s" % (name, value)]
        run(
            self.engine.command
            + ["run", "-d", "--name", self.name, "--network=host", "--read-only"]
            + self.engine.run_options
            + environment
            + [IMAGE],
            timeout=120,
        )
        self.wait_ready(port)
        self.assertEqual(
            run(self.engine.command + ["exec", self.name, "id", "-u"]).strip(), "10001"
        )
        now = int(time.time() * 1000)
        sent = [(1 + n % 2, message_body(n, 1 + n % 2, now)) for n in range(1, 41)]
        self.assertEqual(post_all(port, [body for _, body in sent]), [200] * len(sent))
        self.assertEqual(self.objects(), {})

        run(self.engine.command + ["stop", "-t", "40", self.name], timeout=120)
        exit_code: Optional[str] = run(
            self.engine.command + ["inspect", "--format", "{{.State.ExitCode}}", self.name]
        ).strip()
        logs = self.logs()
        self.assertEqual(exit_code, "0", logs)
        self.assertIn("flush on stop done", logs)
        self.assertNotIn("Traceback", logs)
        self.assertNotIn("plugin cache", logs)
        expected: dict[str, Counter[bytes]] = {}
        for client, body in sent:
            expected.setdefault(key(now, client), Counter())[canonical(body).encode()] += 1
        stored = {k: Counter(read_lines(v)) for k, v in self.objects().items()}
        self.assertEqual(stored, expected)
