"""
No secret in the logs, end to end: ``twistd -n --logger loghandler.logs.json_observer
loghandler`` as a subprocess, every line of its standard output (and anything on its
standard error) collected, each line a JSON object, and each searched for the
run's secrets, raw, URL-encoded and base64-encoded, and for the shapes of
credentials whatever their value (a SigV4 ``Authorization``, ``X-Amz-Signature``,
``X-Amz-Security-Token``, Azure ``SharedKey``, a SAS ``sig=``, ``AccountKey=``, a
bearer token).

The runs:

- S3 on moto with IAM authentication on and the keys of an IAM user (moto checks
  every signature), ``WORKERS=2`` (the workers' events reach the supervisor's JSON
  with their fields and a ``worker`` field), ``AUTH_TOKENS_FILE``: messages with the
  right bearer token, with a wrong one (401), and 500 invalid bodies (logged at the
  bounded pace: at most 10 lines a worker, the rest counted in
  ``rejections_suppressed`` lines whose counts add up);
- S3 with the right access key and a wrong secret (403 SignatureDoesNotMatch: the
  start check fails and is logged, messages are answered 503);
- S3 with botocore's credential chain and a session token (``AWS_SESSION_TOKEN``);
- Azure on Azurite with the account key; with a wrong key (403
  AuthenticationFailed); and with a SAS connection string to an address that
  refuses connections (requests names the URL, SAS and all, in its error).
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from typing import Any, Iterator, Optional

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.azurite import shared_azurite
from tests.integration.moto import free_port, shared_moto
from tests.integration.test_end_to_end import message_body

#: Credentials' shapes that must never be in a log line, whatever their value.
SHAPES = [
    re.compile(r"AWS4-HMAC-SHA256"),
    re.compile(r"(?i)x-amz-(signature|security-token|credential)"),
    re.compile(r"(?i)\bsig=(?!<hidden>)"),
    re.compile(r"(?i)\bSharedKey(Lite)?\s+\w+:"),
    re.compile(r"(?i)\bAccountKey=(?!<hidden>)"),
    re.compile(r"(?i)\bSharedAccessSignature=(?!<hidden>)"),
    re.compile(r"(?i)\bBearer\s+(?!<token>)[A-Za-z0-9\-._~+/]{8,}"),
]


def forms(secret: str) -> set[str]:
    """``secret`` as it might be written: raw, URL-encoded, base64 (and decoded)."""
    found = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    found.add(base64.b64encode(secret.encode()).decode())
    try:
        decoded = base64.b64decode(secret, validate=True)
    except ValueError:
        decoded = b""
    if len(decoded) >= 8:
        found.add(decoded.hex())
        try:
            found.add(decoded.decode("ascii"))
        except UnicodeDecodeError:
            pass
    return {f for f in found if len(f) >= 6}


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


class JSONDaemon:
    """
    ``twistd -n --logger loghandler.logs.json_observer loghandler``, its standard
    output and error in files of ``workdir``.
    """

    def __init__(self, env: dict[str, str], workdir: str) -> None:
        self.port = free_port()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.out_path = os.path.join(workdir, "json-%d.out" % self.port)
        self.err_path = os.path.join(workdir, "json-%d.err" % self.port)
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.process = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "--logger", "loghandler.logs.json_observer", "loghandler"],
            env={**os.environ, **env, "ADDR": "127.0.0.1", "PORT": str(self.port)},
            stdout=self._out,
            stderr=self._err,
            cwd=workdir,
        )
        self._wait_answering()

    def output(self) -> str:
        with open(self.out_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def errors(self) -> str:
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def events(self) -> list[dict[str, Any]]:
        """Every line of the output, parsed; a line that is not JSON fails the test."""
        events = []
        for number, line in enumerate(self.output().splitlines(), 1):
            try:
                event = json.loads(line)
            except ValueError:
                raise AssertionError("line %d is not JSON: %r" % (number, line[:500]))
            if not isinstance(event, dict):
                raise AssertionError("line %d is not an object: %r" % (number, line[:500]))
            events.append(event)
        return events

    def _wait_answering(self) -> None:
        """Until ``/healthz`` answers at all (storage may be failing on purpose)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("twistd exited at start:\n" + self.output() + self.errors())
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/healthz")
                connection.getresponse().read()
                connection.close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("twistd did not answer in 30 s:\n" + self.output())

    def wait_for(self, event: str, count: int = 1, timeout: float = 30.0) -> None:
        """Until ``count`` lines with ``"event": event`` are written."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output().count('"event": "%s"' % event) >= count:
                return
            time.sleep(0.1)
        raise AssertionError("no %s event in %g s:\n%s" % (event, timeout, self.output()))

    def post(self, body: bytes, token: Optional[str] = None) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = "Bearer " + token
        connection.request("POST", "/log", body, headers)
        response = connection.getresponse()
        response.read()
        connection.close()
        return response.status

    def stop(self) -> None:
        """SIGTERM; wait for the exit."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self._out.close()
        self._err.close()
        if code not in (0, -signal.SIGTERM):
            raise AssertionError("twistd exited with %r:\n%s" % (code, self.output()))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for f in (self._out, self._err):
            if not f.closed:
                f.close()


class LogSecretsTests(SynchronousTestCase):
    """Every event of the run, searched for the run's secrets."""

    def setUp(self) -> None:
        self.workdir = os.path.abspath(".")
        self.now_ms = int(time.time() * 1000)

    def start(self, env: dict[str, str]) -> JSONDaemon:
        daemon = JSONDaemon({"SHUTDOWN_TIMEOUT_S": "10", **env}, self.workdir)
        self.addCleanup(daemon.kill)
        return daemon

    def check(self, daemon: JSONDaemon, secrets: list[str]) -> list[dict[str, Any]]:
        """
        Stop ``daemon``; each of its lines is JSON and none holds a secret in any of
        its forms or a credential's shape.  Its events.
        """
        daemon.stop()
        events = daemon.events()
        self.assertGreater(len(events), 5)
        for event in events:
            for key in ("time", "level", "namespace", "message"):
                self.assertIn(key, event)
        needles = set().union(*(forms(s) for s in secrets))
        texts = [daemon.output(), daemon.errors()] + ["\n".join(strings(event)) for event in events]
        for text in texts:
            for needle in needles:
                at = text.find(needle)
                if at >= 0:
                    self.fail("a secret in the log: ..." + text[max(0, at - 300) : at + 300])
            for shape in SHAPES:
                match = shape.search(text)
                self.assertIsNone(
                    match, match and text[max(0, match.start() - 300) : match.end() + 300]
                )
        return events

    def messages(self, count: int) -> list[bytes]:
        return [message_body(i + 1, 1 + i % 3, self.now_ms) for i in range(count)]

    # -- S3 ----------------------------------------------------------------------------

    def iam_user(self) -> tuple[str, str]:
        """An IAM user of moto allowed s3:*, and IAM authentication on: its keys."""
        keys = self.moto.iam_user()
        self.moto.enable_iam_auth()
        self.addCleanup(self.moto.disable_iam_auth)
        return keys

    def fresh_moto(self) -> None:
        self.moto = shared_moto()
        self.moto.reset()

    def test_s3_workers_tokens_and_bad_requests(self) -> None:
        """
        IAM-checked keys, two workers, bearer tokens right and wrong, a flood of
        invalid bodies: no secret in any line; the workers' events carry ``worker``;
        the rejections are logged at the bounded pace and add up.
        """
        self.fresh_moto()
        access_key, secret_key = self.iam_user()
        token = "Zk3mQ9vX2pL7rT5wY8nB4cF6hJ1dS0aG-tok"
        wrong_token = "Qw8eR7tY6uI5oP4aS3dF2gH1jK0lZx-wrong"
        tokens = os.path.join(self.workdir, "tokens-%d" % os.getpid())
        with open(tokens, "w") as f:
            f.write("%s *\n" % token)
        daemon = self.start(
            {
                **self.moto.env(),
                "AWS_ACCESS_KEY": access_key,
                "AWS_ACCESS_SECRET": secret_key,
                "WORKERS": "2",
                "AUTH_TOKENS_FILE": tokens,
                "CHECKPOINT_S": "0.5",
            }
        )
        daemon.wait_for("storage_reachable", count=2)  # each worker's
        statuses = Counter(daemon.post(body, token) for body in self.messages(40))
        statuses.update(daemon.post(body, wrong_token) for body in self.messages(5))
        statuses.update(daemon.post(b'{"text": 1}', token) for _ in range(500))
        self.assertEqual(statuses, Counter({200: 40, 401: 5, 400: 500}))
        events = self.check(daemon, [secret_key, token, wrong_token])
        # Each worker's events, with their fields, a worker field and its system.
        started = [e for e in events if e.get("event") == "started"]
        self.assertEqual(sorted(e["worker"] for e in started), [1, 2])
        for event in started:
            self.assertEqual(event["namespace"], "loghandler.tap")
            self.assertEqual(event["system"], "worker %d" % event["worker"])
            self.assertEqual((event["addr"], event["ack"]), ("127.0.0.1", "accepted"))
        completed = [e for e in events if e.get("event") == "object_completed"]
        self.assertTrue(completed)
        for event in completed:
            self.assertIn(event["worker"], (1, 2))
            self.assertIsInstance(event["lines"], int)
            self.assertIsInstance(event["seconds"], float)
        self.assertTrue([e for e in events if e.get("event") == "worker_started"])
        # At most 10 lines a worker, and the counts add up to every rejection.
        rejected = [e for e in events if e.get("event") == "request_rejected"]
        suppressed = [e for e in events if e.get("event") == "rejections_suppressed"]
        for worker in (1, 2):
            self.assertLessEqual(len([e for e in rejected if e["worker"] == worker]), 10)
        self.assertEqual(len(rejected) + sum(e["suppressed"] for e in suppressed), 505)
        self.assertEqual(
            Counter(e["status"] for e in rejected)
            + sum(
                (Counter({int(s): n for s, n in e["by_status"].items()}) for e in suppressed),
                Counter(),
            ),
            Counter({401: 5, 400: 500}),
        )

    def test_s3_wrong_secret(self) -> None:
        """403 SignatureDoesNotMatch at the start check, logged, 503 to messages."""
        self.fresh_moto()
        access_key, secret_key = self.iam_user()
        wrong = secret_key[:-4] + "Wr0n"
        daemon = self.start(
            {**self.moto.env(), "AWS_ACCESS_KEY": access_key, "AWS_ACCESS_SECRET": wrong}
        )
        daemon.wait_for("storage_unreachable")
        self.assertEqual(daemon.post(self.messages(1)[0]), 503)
        events = self.check(daemon, [secret_key, wrong])
        [unreachable, *_] = [e for e in events if e.get("event") == "storage_unreachable"]
        self.assertIn("403", unreachable["error"])

    def test_s3_session_token(self) -> None:
        """botocore's chain from the environment, with a session token."""
        self.fresh_moto()
        secret = "ses+Secret/Key0123456789abcdefghijklmnop"
        session_token = "FwoGZXIvYXdzEJr//////////wEaDJ+session+token/value=="
        env = {k: v for k, v in self.moto.env().items() if not k.startswith("AWS_ACCESS_")}
        daemon = self.start(
            {
                **env,
                "AWS_ACCESS_KEY_ID": "ASIAEXAMPLESESSION01",
                "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_SESSION_TOKEN": session_token,
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true",
                "CHECKPOINT_S": "0.5",
            }
        )
        daemon.wait_for("storage_reachable")
        self.assertEqual({daemon.post(b) for b in self.messages(10)}, {200})
        self.check(daemon, [secret, session_token])

    # -- Azure -------------------------------------------------------------------------

    def test_azure_key(self) -> None:
        """Shared key on Azurite: no key and no SharedKey signature in the log."""
        azurite = shared_azurite()
        azurite.reset()
        daemon = self.start({**azurite.env(), "CHECKPOINT_S": "0.5"})
        daemon.wait_for("storage_reachable")
        self.assertEqual({daemon.post(b) for b in self.messages(20)}, {200})
        events = self.check(daemon, [azurite.key])
        self.assertTrue([e for e in events if e.get("event") == "object_completed"])

    def test_azure_wrong_key(self) -> None:
        """403 AuthenticationFailed at the start check, logged without the key."""
        azurite = shared_azurite()
        azurite.reset()
        wrong = base64.b64encode(
            b"not the account key, 64 bytes long......................"
        ).decode()
        daemon = self.start({**azurite.env(), "AZURE_KEY": wrong})
        daemon.wait_for("storage_unreachable")
        self.assertEqual(daemon.post(self.messages(1)[0]), 503)
        events = self.check(daemon, [wrong, azurite.key])
        [unreachable, *_] = [e for e in events if e.get("event") == "storage_unreachable"]
        self.assertIn("403", unreachable["error"])

    def test_azure_sas_unreachable(self) -> None:
        """
        A SAS connection string to an address that refuses connections: the error
        (requests names the URL it asked for, query and all) is logged without it.
        """
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        azurite = shared_azurite()
        sas = generate_container_sas(
            azurite.account,
            azurite.container,
            account_key=azurite.key,
            permission=ContainerSasPermissions(read=True, add=True, create=True, write=True),
            expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1),
        )
        signature = urllib.parse.parse_qs(sas)["sig"][0]
        endpoint = "http://127.0.0.1:%d/%s" % (free_port(), azurite.account)
        daemon = self.start(
            {
                "STORAGE": "azure",
                "AZURE_CONTAINER": azurite.container,
                "AZURE_CONNECTION_STRING": "BlobEndpoint=%s;SharedAccessSignature=%s"
                % (endpoint, sas),
            }
        )
        daemon.wait_for("storage_unreachable")
        events = self.check(daemon, [sas, signature, azurite.key])
        [unreachable, *_] = [e for e in events if e.get("event") == "storage_unreachable"]
        self.assertIn("?<query hidden>", unreachable["error"])
