"""
moto's S3 server as a child process, for tests and scripts.

``moto_server`` (the console script installed next to the emulators' interpreter,
:func:`emulator_python`) is started on ``127.0.0.1`` and a free port, polled until it
answers (at most ``timeout`` seconds, 20 by default), and given a bucket.  All calls here are synchronous (plain
``urllib``), so they work from a script, from trial's ``setUp`` and from a module
level; they take a few milliseconds once the server runs.

In a trial test::

    from tests.integration.moto import shared_moto

    class MyTests(TestCase):
        def setUp(self):
            self.moto = shared_moto()   # started once per process, SkipTest if absent
            self.moto.reset()           # empty state, fresh bucket

        def test_x(self):
            client = build_s3_client(
                reactor,
                bucket=self.moto.bucket,
                region=self.moto.region,
                endpoint_url=self.moto.endpoint_url,
                credentials=Credentials(self.moto.access_key, self.moto.secret_key),
            )
            self.addCleanup(client.close)
            ...

For a daemon run as a subprocess (``twistd -n loghandler``), pass
``env={**os.environ, **moto.env()}``; :meth:`MotoServer.env` gives
``AWS_ENDPOINT_URL``, ``AWS_BUCKET``, ``AWS_REGION``, ``AWS_ACCESS_KEY`` and
``AWS_ACCESS_SECRET``.

From a script::

    with MotoServer() as moto:
        print(moto.env())

When ``moto_server`` is not installed, :func:`require_moto_server` (and so
:meth:`MotoServer.start` and :func:`shared_moto`) raises ``SkipTest`` -- unless the
environment variable ``CI`` is set (non-empty), where it raises
:class:`EmulatorMissing`, an ``AssertionError``: in CI an emulator test that would
skip must fail instead.

moto facts this relies on (see /work/shared/FIELD-NOTES.md): it answers in about
0.5 s; ``POST /moto-api/reset`` clears all state (buckets included, so
:meth:`MotoServer.reset` creates the bucket again); it accepts any signature unless
IAM authentication is switched on (:meth:`MotoServer.enable_iam_auth`); it enforces
the 5 MiB minimum of non-last parts; it does not enforce ``If-Match`` on
CompleteMultipartUpload; and every upload's ``Initiated`` is 2010-11-10T20:48:33Z.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import IO, Any, Optional
from unittest import SkipTest

__all__ = [
    "EmulatorMissing",
    "MotoServer",
    "emulator_python",
    "free_port",
    "moto_server_path",
    "require_moto_server",
    "shared_moto",
]


class EmulatorMissing(AssertionError):
    """
    An emulator is not installed while ``CI`` is set: the test fails instead of
    skipping.
    """


def emulator_python() -> str:
    """
    The interpreter whose virtualenv runs the storage emulators (``moto_server``,
    and :mod:`tests.integration.faultproxy` in front of it): the environment variable
    ``EMULATOR_PYTHON`` when it is set (non-empty), else ``sys.executable``.

    ``PYTHON=pypy3 scripts/run-tests`` sets it to CPython's ``.venv/bin/python``, so
    that loghandler and the tests run on PyPy against the same emulated storage as
    on CPython: the last moto for Python 3.9 (5.1.22) answers 403
    SignatureDoesNotMatch to a signed PutObject that 5.2 accepts
    (``S3ClientSigningTests.test_right_secret``), and the fault proxy, a threaded
    ``http.server``, forwards several times slower on PyPy, enough to push two
    daemons' flush on stop past its deadline in ``test_faults``.
    """
    return os.environ.get("EMULATOR_PYTHON") or sys.executable


def moto_server_path() -> str:
    """
    Where ``moto_server`` should be: next to :func:`emulator_python`.
    """
    return os.path.join(os.path.dirname(emulator_python()), "moto_server")


def require_moto_server() -> str:
    """
    The path of the ``moto_server`` script.

    :raises SkipTest: when it is not installed and ``CI`` is not set.
    :raises EmulatorMissing: when it is not installed and ``CI`` is set.
    """
    path = moto_server_path()
    if os.access(path, os.X_OK):
        return path
    reason = f"moto_server is not installed at {path} (pip install 'moto[server]')"
    if os.environ.get("CI"):
        raise EmulatorMissing(
            "In CI an emulator test that would skip must fail instead: " + reason
        )
    raise SkipTest(reason)


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class MotoServer:
    """
    One ``moto_server`` child process on ``127.0.0.1`` with one bucket.

    :ivar region: the region the bucket is created in and requests are signed for.
    :ivar bucket: the bucket's name.
    :ivar access_key: an access key id moto accepts (any is fine while IAM
        authentication is off).
    :ivar secret_key: its secret.
    :ivar port: the TCP port, once started (0 before).
    """

    def __init__(
        self,
        *,
        region: str = "eu-west-1",
        bucket: str = "loghandler-test",
        extra_env: Optional[dict[str, str]] = None,
    ) -> None:
        """
        :param region: see :ivar:`region`.
        :param bucket: see :ivar:`bucket`.
        :param extra_env: extra environment variables for the server, such as
            ``{"S3_UPLOAD_PART_MIN_SIZE": "1024"}``.
        """
        self.region = region
        self.bucket = bucket
        self.access_key = "testing"
        self.secret_key = "testing"
        self.port = 0
        self._extra_env = dict(extra_env or {})
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._output: Optional[IO[bytes]] = None

    # -- life cycle --------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """
        ``http://127.0.0.1:{port}``, the value for ``AWS_ENDPOINT_URL``.
        """
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """
        Whether the child process was started and has not exited.
        """
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """
        Start the server on a free port, wait until it answers HTTP, create the
        bucket.  Tries up to three ports (another process may take the free one).

        :param timeout: seconds to wait for the first answer, per try.
        :raises SkipTest: / :raises EmulatorMissing: see :func:`require_moto_server`.
        :raises RuntimeError: when it does not answer in time or exits; the message
            holds the end of its output.
        """
        if self.running:
            return
        path = require_moto_server()
        last_error: Optional[Exception] = None
        for _ in range(3):
            self.port = free_port()
            self._output = tempfile.TemporaryFile()
            env = dict(os.environ)
            env.update(self._extra_env)
            self._process = subprocess.Popen(
                [path, "-H", "127.0.0.1", "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own session: a Ctrl-C meant for the daemon under test (or for
                # scripts/dev-server's loghandler) must not stop the emulator first.
                start_new_session=True,
            )
            try:
                self._wait_ready(timeout)
            except RuntimeError as e:
                last_error = e
                self.stop()
                continue
            try:
                self.create_bucket()
            except BaseException:
                self.stop()
                raise
            return
        assert last_error is not None
        raise last_error

    def _wait_ready(self, timeout: float) -> None:
        """
        Poll ``GET /`` every 50 ms until any HTTP answer comes.

        :raises RuntimeError: when the process exits or ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with {self._process.returncode}:\n{self.output()}"
                )
            try:
                with urllib.request.urlopen(self.endpoint_url + "/", timeout=0.5):
                    return
            except urllib.error.HTTPError:
                return  # it answered
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto_server on port {self.port} did not answer within {timeout} s:\n"
                    f"{self.output()}"
                )
            time.sleep(0.05)

    def output(self, limit: int = 4000) -> str:
        """
        The last ``limit`` characters the server wrote to stdout and stderr.
        """
        if self._output is None:
            return ""
        self._output.seek(0)
        text = self._output.read().decode("utf-8", "replace")
        return text[-limit:]

    def stop(self) -> None:
        """
        Terminate the server (SIGTERM, then SIGKILL after 5 s) and wait for it.
        Harmless when it is not running.
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> "MotoServer":
        """
        Start the server (``with MotoServer() as moto:``).
        """
        self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        """
        Stop the server.
        """
        self.stop()

    # -- state -------------------------------------------------------------------

    def _post(self, path: str, body: bytes = b"") -> bytes:
        """
        POST ``body`` (as text/plain) to ``path`` of the moto API; the answer's body.
        """
        request = urllib.request.Request(
            self.endpoint_url + path,
            data=body,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            data: bytes = answer.read()
            return data

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Optional[dict[str, str]] = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """
        One S3 request signed with :ivar:`access_key` (botocore's ``S3SigV4Auth``),
        synchronously: for checks and setup that should not go through the code under
        test, such as reading back what the daemon wrote
        (``moto.request("GET", f"/{moto.bucket}/{key}")``).

        :param path: the URL path (already percent-encoded) and query, e.g.
            ``/loghandler-test?list-type=2&prefix=logs%2F``.
        :param headers: extra headers, signed too.  Content-Type defaults to
            ``application/octet-stream`` (urllib's default would make moto's Flask
            swallow the body as form data).
        :returns: ``(status, headers with lowercase names, body)``, error statuses
            included.
        """
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        url = self.endpoint_url + path
        all_headers = {"Content-Type": "application/octet-stream"}
        all_headers.update(headers or {})
        signed = AWSRequest(method=method, url=url, data=body, headers=all_headers)
        credentials = Credentials(self.access_key, self.secret_key)
        S3SigV4Auth(credentials, "s3", self.region).add_auth(signed)
        request = urllib.request.Request(
            url, data=body or None, method=method, headers=dict(signed.headers.items())
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return (
                    answer.status,
                    {k.lower(): v for k, v in answer.headers.items()},
                    answer.read(),
                )
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def create_bucket(self, name: Optional[str] = None) -> None:
        """
        CreateBucket ``name`` (default :ivar:`bucket`) in :ivar:`region`, signed with
        :ivar:`access_key`.  An existing bucket of ours is fine.

        :raises RuntimeError: on any other error.
        """
        name = name or self.bucket
        body = b""
        if self.region != "us-east-1":
            body = (
                "<CreateBucketConfiguration><LocationConstraint>"
                f"{self.region}</LocationConstraint></CreateBucketConfiguration>"
            ).encode()
        status, _, answer = self.request(
            "PUT", f"/{name}", body, {"Content-Type": "application/xml"}
        )
        if status != 200 and b"BucketAlreadyOwnedByYou" not in answer:
            raise RuntimeError(f"CreateBucket {name} on moto failed: {status} {answer!r}")

    def reset(self) -> None:
        """
        Clear all of moto's state (``POST /moto-api/reset``: objects, uploads, buckets,
        IAM users) and create the bucket again.  Starts the server if needed.
        """
        self.start()
        self._post("/moto-api/reset")
        self.create_bucket()

    def enable_iam_auth(self, free_actions: int = 0) -> None:
        """
        Switch moto's IAM authentication on at run time (``POST /moto-api/reset-auth``,
        the run-time form of ``INITIAL_NO_AUTH_ACTION_COUNT``): after ``free_actions``
        more unauthenticated actions, every request must be signed by a known IAM
        access key whose user's policies allow the action.
        """
        self._post("/moto-api/reset-auth", str(free_actions).encode())

    def disable_iam_auth(self) -> None:
        """
        Accept any signature again (the default).
        """
        self._post("/moto-api/reset-auth", b"inf")

    def iam_user(self, policy: Optional[dict[str, Any]] = None) -> tuple[str, str]:
        """
        Create the IAM user ``loghandler`` with ``policy`` (an IAM policy document;
        by default ``s3:*`` on everything) and an access key for it, through
        botocore's IAM client with the root key (call it while authentication is
        off, before :meth:`enable_iam_auth`): ``(access key ID, secret key)``.
        """
        import botocore.session

        if policy is None:
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
            }
        iam = botocore.session.get_session().create_client(
            "iam",
            region_name="us-east-1",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )
        try:
            iam.create_user(UserName="loghandler")
            iam.put_user_policy(
                UserName="loghandler", PolicyName="loghandler", PolicyDocument=json.dumps(policy)
            )
            key = iam.create_access_key(UserName="loghandler")["AccessKey"]
        finally:
            iam.close()
        return key["AccessKeyId"], key["SecretAccessKey"]

    def botocore_client(self) -> Any:
        """
        A botocore S3 client straight to this server (no proxy), with its key, for
        reading back what the daemon stored; the caller closes it.
        """
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def env(self) -> dict[str, str]:
        """
        The environment variables that point loghandler at this server:
        ``AWS_ENDPOINT_URL``, ``AWS_BUCKET``, ``AWS_REGION``, ``AWS_ACCESS_KEY`` and
        ``AWS_ACCESS_SECRET``.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_BUCKET": self.bucket,
            "AWS_REGION": self.region,
            "AWS_ACCESS_KEY": self.access_key,
            "AWS_ACCESS_SECRET": self.secret_key,
        }


_shared: Optional[MotoServer] = None


def shared_moto() -> MotoServer:
    """
    The process-wide :class:`MotoServer`, started on first use and stopped when the
    interpreter exits (``atexit``).  Tests call :meth:`MotoServer.reset` in ``setUp``
    to start from an empty bucket; a test that switches IAM authentication on must
    switch it off in its cleanup.

    :raises SkipTest: / :raises EmulatorMissing: see :func:`require_moto_server`.
    """
    global _shared
    if _shared is None:
        require_moto_server()
        server = MotoServer()
        server.start()
        atexit.register(server.stop)
        _shared = server
    elif not _shared.running:
        _shared.start()
    return _shared


if __name__ == "__main__":
    # Run a server by hand: prints its environment, stops on Ctrl-C.
    with MotoServer() as _moto:
        for _name, _value in _moto.env().items():
            print(f"{_name}={_value}")
        sys.stdout.flush()
        try:
            while _moto.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
