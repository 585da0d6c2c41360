"""
contrib/init.d/loghandler run for real: every path it uses is a setting, so these
tests give it a defaults file (``LOGHANDLER_DEFAULTS``) that puts the pidfile, the
log and the working directory in a temporary directory, runs the daemon as the
current user (``DAEMON_USER=``) from this virtualenv's twistd, against moto.  They
check its output and exit status per LSB for start, stop, restart, try-restart,
reload (SIGHUP: AUTH_TOKENS_FILE read again), force-reload and status, the pidfile,
and that stop waits for the flush: the object is in the bucket once stop returns, and
not before; and that stop and restart exit 1 when the daemon lost lines in its flush.
"""

from __future__ import annotations

import http.client
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Optional

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.contrib_files import INIT_SCRIPT, manifests
from tests.helpers import bucket_objects, read_lines
from tests.integration.faultproxy import FaultProxy, FaultRule
from tests.integration.moto import free_port, shared_moto
from tests.integration.test_end_to_end import canonical, key, message_body, post_all

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie of ours counts as gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class InitScriptTests(SynchronousTestCase):
    """The init script against a real daemon, as the current user."""

    def setUp(self) -> None:
        self.moto = shared_moto()
        self.moto.reset()
        self.s3 = self.moto.botocore_client()
        self.addCleanup(self.s3.close)
        self.dir = tempfile.mkdtemp(prefix="initd-", dir=os.path.abspath("."))
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.pidfile = os.path.join(self.dir, "run", "loghandler.pid")
        self.logfile = os.path.join(self.dir, "log", "loghandler.log")
        self.settings = {
            "TWISTD": TWISTD,
            "PIDFILE": self.pidfile,
            "LOGFILE": self.logfile,
            "RUNDIR": self.dir,
            "DAEMON_USER": "",
            "ADDR": "127.0.0.1",
            "PORT": str(self.port),
            "SHUTDOWN_TIMEOUT_S": "10",
            "QUEUE_TIMEOUT_MIN": "60",
            **self.moto.env(),
        }
        self.defaults = os.path.join(self.dir, "default-loghandler")
        self.write_defaults()
        self.addCleanup(self.kill_daemon)

    def write_defaults(self, **changes: str) -> None:
        """Write the defaults file: :attr:`settings` with ``changes``."""
        self.settings.update(changes)
        with open(self.defaults, "w") as f:
            f.write("# written by %s\n" % self.id())
            for name, value in self.settings.items():
                f.write("%s=%s\n" % (name, value))

    def script(self, action: str) -> tuple[int, str, str]:
        """
        ``sh contrib/init.d/loghandler ACTION`` with only ``PATH`` and
        ``LOGHANDLER_DEFAULTS`` in its environment, as init gives it; its exit status,
        stdout and stderr.
        """
        done = subprocess.run(
            ["sh", INIT_SCRIPT, action],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LOGHANDLER_DEFAULTS": self.defaults},
            capture_output=True,
            timeout=120,
            cwd="/",
        )
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    def pid(self) -> int:
        """The pid in the pidfile."""
        with open(self.pidfile) as f:
            return int(f.read())

    def log(self) -> str:
        """The daemon's log file."""
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def kill_daemon(self) -> None:
        """Cleanup: SIGKILL a daemon a failed test left running."""
        try:
            pid = self.pid()
        except (OSError, ValueError):
            return
        if alive(pid):
            os.kill(pid, signal.SIGKILL)

    def start(self) -> int:
        """``start``, checked: exit 0, its line, the pidfile; waits for /healthz 200."""
        status, out, err = self.script("start")
        self.assertEqual(status, 0, out + err + self.log())
        pid = self.pid()
        self.assertEqual(out, "loghandler started (pid %d)\n" % pid)
        self.assertTrue(alive(pid))
        self.wait_ready()
        return pid

    def wait_ready(self, path: str = "/healthz", port: Optional[int] = None) -> None:
        """
        Poll ``path`` on ``port`` (default PORT) until it answers 200 (the store was
        reached).
        """
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=2)
                connection.request("GET", path)
                if connection.getresponse().status == 200:
                    connection.close()
                    return
                connection.close()
            except OSError:
                pass
            time.sleep(0.1)
        self.fail("no 200 from %s in 30 s:\n%s" % (path, self.log()))

    def assertStatus(self, expected: int, line: str) -> None:
        """``status`` exits ``expected`` and prints ``line``."""
        status, out, err = self.script("status")
        self.assertEqual((status, out, err), (expected, line + "\n", ""))

    def objects(self) -> dict[str, bytes]:
        """The objects in the bucket outside ``_loghandler/``, by key."""
        return bucket_objects(self.s3, self.moto.bucket)

    def test_start_status_stop_flushes(self) -> None:
        """
        Not running: status 3.  start: 0, the pidfile holds the daemon's pid, status
        0; a second start says so and exits 0.  Messages POSTed are in no object
        until stop; stop exits 0 once the daemon has completed the object (it holds
        every line), the pidfile is gone; status 3 again.
        """
        self.assertStatus(3, "loghandler is not running")
        pid = self.start()
        self.assertStatus(0, "loghandler is running (pid %d)" % pid)
        self.assertEqual(self.script("start"), (0, "loghandler is already running (pid %d)\n" % pid, ""))

        now = int(time.time() * 1000)
        sent = [(1 + n % 3, message_body(n, 1 + n % 3, now)) for n in range(1, 61)]
        bodies = [body for _, body in sent]
        self.assertEqual(post_all(self.port, bodies), [200] * len(bodies))
        self.assertEqual(self.objects(), {})

        status, out, err = self.script("stop")
        self.assertEqual((status, out, err), (0, "loghandler stopped\n", ""))
        self.assertFalse(alive(pid))
        self.assertFalse(os.path.exists(self.pidfile))
        self.assertIn("flush on stop done", self.log())
        self.assertNotIn("Traceback", self.log())
        stored = {k: Counter(read_lines(v)) for k, v in self.objects().items()}
        expected: dict[str, Counter[bytes]] = {}
        for client, body in sent:
            expected.setdefault(key(now, client), Counter())[canonical(body).encode()] += 1
        self.assertEqual(stored, expected)
        self.assertStatus(3, "loghandler is not running")
        self.assertEqual(self.script("stop"), (0, "loghandler is not running\n", ""))

    def test_manifests_probes(self) -> None:
        """
        With ADMIN_PORT set, as contrib/kubernetes/ sets it, the daemon answers the
        Deployment's probe paths and the Prometheus annotation's path there with
        200, and on PORT with 404.
        """
        objects = manifests()
        container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
        annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
        paths = [
            container["livenessProbe"]["httpGet"]["path"],
            container["readinessProbe"]["httpGet"]["path"],
            annotations["prometheus.io/path"],
        ]
        admin = free_port()
        self.write_defaults(ADMIN_ADDR="127.0.0.1", ADMIN_PORT=str(admin))
        self.assertEqual(self.script("start")[0], 0, self.log())
        self.wait_ready(container["readinessProbe"]["httpGet"]["path"], admin)
        for path in paths:
            self.assertEqual(self.get(admin, path), 200, path)
            self.assertEqual(self.get(self.port, path), 404, path)
        self.assertEqual(self.script("stop")[0], 0)

    def get(self, port: int, path: str) -> int:
        """GET ``path`` on ``port``; the status."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        connection.close()
        return response.status

    def test_restarts(self) -> None:
        """
        restart, try-restart and force-reload each replace a running daemon with a new
        one (a new pid, running); try-restart of a stopped daemon leaves it stopped
        and exits 0.
        """
        pids = [self.start()]
        for action in ("restart", "try-restart", "force-reload"):
            status, out, err = self.script(action)
            self.assertEqual(status, 0, out + err + self.log())
            pid = self.pid()
            self.assertEqual(out, "loghandler stopped\nloghandler started (pid %d)\n" % pid)
            self.assertNotIn(pid, pids)
            self.assertFalse(alive(pids[-1]))
            self.assertTrue(alive(pid))
            pids.append(pid)
            self.wait_ready()
        self.assertEqual(self.script("stop")[0], 0)
        self.assertEqual(self.script("try-restart"), (0, "", ""))
        self.assertStatus(3, "loghandler is not running")

    def test_stale_pidfile(self) -> None:
        """
        A pidfile whose process is gone: status 1 and says so; stop removes it and
        exits 0; start over one starts.
        """
        gone = subprocess.Popen(["true"])
        gone.wait()
        os.makedirs(os.path.dirname(self.pidfile))
        with open(self.pidfile, "w") as f:
            f.write("%d\n" % gone.pid)
        self.assertStatus(1, "loghandler is not running, but its pidfile %s remains" % self.pidfile)
        self.assertEqual(self.script("stop"), (0, "loghandler is not running\n", ""))
        self.assertFalse(os.path.exists(self.pidfile))
        with open(self.pidfile, "w") as f:
            f.write("%d\n" % gone.pid)
        self.start()
        self.assertEqual(self.script("stop")[0], 0)

    def test_refused_setting(self) -> None:
        """
        A setting loghandler refuses: start exits 6 (not configured) with
        loghandler's one line naming the variable, and nothing runs.
        """
        self.write_defaults(PORT="eighty")
        status, out, err = self.script("start")
        self.assertEqual(status, 6, out + err)
        self.assertRegex(err, r"\Aloghandler: PORT: .*'eighty'\n")
        self.assertIn("a setting was refused", err)
        self.assertFalse(os.path.exists(self.pidfile))
        self.assertStatus(3, "loghandler is not running")

    def test_twistd_missing(self) -> None:
        """TWISTD not there: start exits 5 (not installed) and names the setting."""
        self.write_defaults(TWISTD=os.path.join(self.dir, "no-such-twistd"))
        status, out, err = self.script("start")
        self.assertEqual(status, 5)
        self.assertIn("no-such-twistd is not installed (set TWISTD in %s)" % self.defaults, err)

    def test_actions(self) -> None:
        """
        An unknown action exits 2 with the usage; reload of a daemon that is not
        running exits 7 (not running).
        """
        status, out, err = self.script("frobnicate")
        self.assertEqual(status, 2)
        self.assertIn("Usage: ", err)
        self.assertEqual(self.script("reload"), (7, "", "loghandler is not running\n"))

    def test_reload_reads_tokens(self) -> None:
        """
        reload sends SIGHUP: the same daemon reads AUTH_TOKENS_FILE again (its log
        says so), and a token added to the file is taken at once.
        """
        tokens = os.path.join(self.dir, "tokens")
        old, new = "OldToken-0123456789abcdef", "NewToken-0123456789abcdef"
        with open(tokens, "w") as f:
            f.write("%s 1\n" % old)
        self.write_defaults(AUTH_TOKENS_FILE=tokens)
        pid = self.start()
        body = message_body(1, 1, int(time.time() * 1000))
        self.assertEqual(self.post(body, old), 200)
        self.assertEqual(self.post(body, new), 401)
        with open(tokens, "w") as f:
            f.write("%s 1\n%s 1\n" % (old, new))
        self.assertEqual(
            self.script("reload"),
            (0, "loghandler: AUTH_TOKENS_FILE reloaded (pid %d); other settings take a restart\n" % pid, ""),
        )
        deadline = time.monotonic() + 10
        while "reloaded (SIGHUP)" not in self.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertIn("AUTH_TOKENS_FILE %s reloaded (SIGHUP): 2 credentials" % tokens, self.log())
        self.assertEqual(self.post(body, new), 200)
        self.assertEqual(self.pid(), pid)
        self.assertEqual(self.script("stop")[0], 0)

    def post(self, body: bytes, token: str) -> int:
        """POST ``body`` to /log with a bearer ``token``; the status."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        connection.request(
            "POST", "/log", body,
            {"Content-Type": "application/json", "Authorization": "Bearer " + token},
        )
        status = connection.getresponse().status
        connection.close()
        return status

    def refusing_storage(self) -> FaultProxy:
        """
        Point the daemon at a fault proxy in front of moto (``AWS_ENDPOINT_URL``),
        with ``SHUTDOWN_TIMEOUT_S=2``, for :meth:`storage_down`.
        """
        proxy = FaultProxy(self.moto.endpoint_url, region=self.moto.region)
        proxy.start()
        self.addCleanup(proxy.stop)
        self.write_defaults(**proxy.env(self.moto.env()), SHUTDOWN_TIMEOUT_S="2")
        return proxy

    def storage_down(self, proxy: FaultProxy, down: bool) -> None:
        """
        Storage refuses connections (``down``), or works again.  A keep-alive
        connection the proxy still serves gets 503s meanwhile.
        """
        if down:
            proxy.set_mode(FaultRule(fault="error5xx", status=503))
            proxy.refuse_connections(25)
        else:
            proxy.refuse_connections(0)
            proxy.clear_mode()

    def test_stop_lost_lines(self) -> None:
        """
        Storage refuses connections when stop sends SIGTERM: the daemon's flush on
        stop cannot store the acknowledged lines it holds and it exits 1 (its log:
        event exit_lost); stop says so in one line on stderr and exits 1, the daemon
        is gone.  restart then starts a new daemon and exits 1 too.  A later stop
        that loses nothing exits 0: only what the daemon logged after this SIGTERM
        counts.
        """
        proxy = self.refusing_storage()
        lost = (
            "loghandler stopped, but acknowledged lines were lost (neither stored nor"
            " staged in the flush on stop; see %s)\n" % self.logfile
        )
        now = int(time.time() * 1000)
        pid = self.start()
        self.assertEqual(post_all(self.port, [message_body(n, 1, now) for n in range(1, 11)]), [200] * 10)
        self.storage_down(proxy, True)
        self.assertEqual(self.script("stop"), (1, "", lost), self.log())
        self.assertFalse(alive(pid))
        self.assertIn("acknowledged lines were neither stored nor staged", self.log())
        self.assertStatus(3, "loghandler is not running")

        self.storage_down(proxy, False)
        pid = self.start()
        self.assertEqual(post_all(self.port, [message_body(n, 1, now) for n in range(1, 11)]), [200] * 10)
        self.storage_down(proxy, True)
        status, out, err = self.script("restart")
        self.assertFalse(alive(pid))
        new = self.pid()
        self.assertEqual((status, out, err), (1, "loghandler started (pid %d)\n" % new, lost), self.log())
        self.assertTrue(alive(new))

        self.storage_down(proxy, False)
        self.wait_ready()
        self.assertEqual(self.script("stop"), (0, "loghandler stopped\n", ""), self.log())

    def test_stop_timeout(self) -> None:
        """
        A daemon still running STOP_TIMEOUT_S after SIGTERM is killed: stop says so
        and exits 1.  (A stand-in twistd that ignores SIGTERM.)
        """
        fake = os.path.join(self.dir, "bin", "twistd")
        os.makedirs(os.path.dirname(fake))
        with open(fake, "w") as f:
            f.write(
                "#!/bin/sh\n"
                "# a twistd whose daemon ignores SIGTERM\n"
                'for a; do case "$a" in --pidfile=*) pidfile="${a#--pidfile=}";; esac; done\n'
                "sh -c 'trap \"\" TERM; while :; do sleep 0.1; done' fake-twistd"
                " </dev/null >/dev/null 2>&1 &\n"
                'echo $! > "$pidfile"\n'
            )
        os.chmod(fake, 0o755)
        self.write_defaults(TWISTD=fake, STOP_TIMEOUT_S="1")
        status, out, err = self.script("start")
        pid = self.pid()
        self.assertEqual((status, out), (0, "loghandler started (pid %d)\n" % pid))
        status, out, err = self.script("stop")
        self.assertEqual(status, 1)
        self.assertIn("still running 1 s after SIGTERM; sending SIGKILL", err)
        time.sleep(0.2)
        self.assertFalse(alive(pid))

    def nobody(self) -> "pwd.struct_passwd":
        """The user ``nobody``, for the tests of DAEMON_USER: they need root."""
        if os.getuid() != 0:
            raise SkipTest("needs root: the script switches users only when run by root")
        try:
            return pwd.getpwnam("nobody")
        except KeyError:
            raise SkipTest("no user nobody") from None

    def test_as_root_passes_daemon_user(self) -> None:
        """
        Started by root with DAEMON_USER set, the script gives that user the pidfile's
        and the log's directories and tells twistd to run as it (``--uid``,
        ``--gid``: its own group).  (A stand-in twistd that records its arguments.)
        """
        nobody = self.nobody()
        fake = os.path.join(self.dir, "bin", "twistd")
        arguments = os.path.join(self.dir, "arguments")
        os.makedirs(os.path.dirname(fake))
        with open(fake, "w") as f:
            f.write('#!/bin/sh\nprintf "%%s\\n" "$@" > %s\n' % arguments)
        os.chmod(fake, 0o755)
        self.write_defaults(TWISTD=fake, DAEMON_USER="nobody")
        status, out, err = self.script("start")
        self.assertEqual(status, 1)
        self.assertIn("not running after its start", err)
        with open(arguments) as f:
            words = f.read().split()
        self.assertEqual(
            words,
            [
                "--pidfile=" + self.pidfile,
                "--logfile=" + self.logfile,
                "--rundir=" + self.dir,
                "--uid=nobody",
                "--gid=%d" % nobody.pw_gid,
                "loghandler",
            ],
        )
        for path in (self.pidfile, self.logfile):
            self.assertEqual(os.stat(os.path.dirname(path)).st_uid, nobody.pw_uid)

    def test_as_root_runs_as_daemon_user(self) -> None:
        """
        Started by root with DAEMON_USER set, the daemon runs as that user (twistd
        --uid/--gid): it serves, and at stop it removes its pidfile itself in the
        directory the script gave that user.  Skipped where that user cannot read
        this interpreter's files (a Python under /root: the daemon would fail to
        import what it loads late, such as ``encodings.idna`` for its first
        connection).
        """
        nobody = self.nobody()
        probe = subprocess.run(
            ["setpriv", "--reuid=%d" % nobody.pw_uid, "--regid=%d" % nobody.pw_gid,
             "--clear-groups", sys.executable, "-c",
             "import sys, encodings.idna, loghandler.tap; print(sys.version)"],
            capture_output=True,
        )
        if probe.returncode != 0 or probe.stdout.decode().strip() != sys.version:
            raise SkipTest(
                "user nobody cannot run this interpreter (%s) as it is: %r"
                % (sys.executable, (probe.stdout + probe.stderr)[-300:])
            )
        self.write_defaults(DAEMON_USER="nobody", RUNDIR="/")
        pid = self.start()
        with open("/proc/%d/status" % pid) as f:
            ids = {line.split(":")[0]: line.split()[1:] for line in f if line.startswith(("Uid", "Gid"))}
        self.assertEqual(ids["Uid"], [str(nobody.pw_uid)] * 4)
        self.assertEqual(ids["Gid"], [str(nobody.pw_gid)] * 4)
        self.assertEqual(self.script("stop"), (0, "loghandler stopped\n", ""))
        self.assertFalse(os.path.exists(self.pidfile))
        self.assertNotIn("Traceback", self.log())
