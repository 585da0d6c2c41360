"""
Fault tests: ``twistd -n loghandler`` daemons write to moto's S3 server through
:class:`tests.integration.faultproxy.FaultProxy`, which loses answers, refuses,
stalls, cuts and fails requests; afterwards every object is read back straight from
moto (not through the proxy) and checked line by line.

What is checked, in both tests: every acknowledged line (a ``200`` answer) is stored,
none twice across all objects, none in the wrong key, no line whose every request was
refused (``503``) is stored, every object under ``chat/`` is whole gzip members of
``application/gzip``, and nothing is left under ``_loghandler/`` (no staging object,
no multipart upload).  Multipart uploads left under ``chat/`` are printed, not
failed: a CreateMultipartUpload that lands after its caller gave up can leave an
empty one for the recovery sweep (DESIGN.md section 6).

- :meth:`FaultTests.test_two_daemons_lost_answers_refusals_stalls`: two daemons, same
  bucket and keys, short rotation, under load while the proxy cycles through its
  faults; a one-line summary (``FAULTS SUMMARY ...``) gives the figures.
- :meth:`FaultTests.test_sigterm_while_storage_stalls` and
  :meth:`FaultTests.test_sigterm_while_storage_refuses`: SIGTERM as storage stops
  answering, storage back a few seconds before ``SHUTDOWN_TIMEOUT_S``; the daemon
  must store everything and exit within the deadline (``FAULTS SIGTERM ...``).

The proxy (:class:`FaultProxy`) also answers
``404 NoSuchUpload`` where moto 5.2.5 answers a bare 500 (a part or Complete for an
upload that was aborted), as S3 does; the summary counts how often.  (moto also
ignores ``x-amz-copy-source-if-match`` on UploadPartCopy; harmless here, since the
proxy's If-Match check on the merge's CompleteMultipartUpload catches a changed key.)

Each test is bounded by trial's ``timeout`` (120 s): the blocking body runs in a
thread, and the cleanups kill the daemons and stop the proxy, which ends every wait
of that thread.  moto runs once per process (:func:`shared_moto`: a skip when it is
not installed, a failure when ``CI`` is set).  The figures of each run are also
written to ``faults-report.json`` in trial's working directory.
"""

from __future__ import annotations

import calendar
import http.client
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers import members
from tests.integration.faultproxy import FaultProxy, FaultRule
from tests.integration.moto import free_port, shared_moto

#: Seconds a test may take in all (trial fails it after that).
TEST_TIMEOUT = 120

#: The clients whose keys both daemons write.
CLIENTS = (1, 2, 3)

#: Hex characters of client 1's texts: its object passes S3's 5 MiB part size during
#: the first test, so its later merges go by multipart upload (UploadPartCopy and a
#: CompleteMultipartUpload with If-Match, which the proxy enforces and races with
#: 409), while clients 2 and 3 stay small (GET, re-compress, PutObject).
BIG_TEXT_HEX = 10_000

#: Log lines of a daemon worth showing in a failure message.
RELEVANT = re.compile(
    r"#(warn|error|critical)\]|Traceback|not stored|lost|had landed|merging .* again"
    r"|flush on stop|completing \d+ objects|Received SIGTERM"
)


def utc_key(timestamp_ms: int, client_id: int) -> str:
    """The key a line belongs in, computed independently of ``loghandler.keys``."""
    date = time.strftime("%Y-%m-%d", time.gmtime(timestamp_ms // 1000))
    return f"chat/{date}/content_logs_{date}_{client_id}"


def canonical_body(content_id: int, client_id: int, timestamp: int, text: str) -> bytes:
    """
    A request body that is already the canonical line (without its newline): compact
    JSON, the four fields in the stored order, raw UTF-8.
    """
    return json.dumps(
        {"text": text, "content_id": content_id, "client_id": client_id, "timestamp": timestamp},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")


def read_chat_object(
    s3: Any, bucket: str, key: str
) -> tuple[bytes, Optional[list[bytes]], Optional[str]]:
    """
    One object under ``chat/`` read with botocore's client ``s3``: its bytes, its
    lines (None when it is not whole gzip members), and what is wrong with it, if
    anything (not ``application/gzip``, a ``Content-Encoding``, not whole gzip
    members, no final newline), else None.
    """
    answer = s3.get_object(Bucket=bucket, Key=key)
    data: bytes = answer["Body"].read()
    problem: Optional[str] = None
    if answer.get("ContentType") != "application/gzip" or "ContentEncoding" in answer:
        problem = "Content-Type %r, Content-Encoding %r" % (
            answer.get("ContentType"),
            answer.get("ContentEncoding"),
        )
    try:
        text = b"".join(members(data))
    except Exception as e:  # zlib.error or a truncated member
        return data, None, f"not whole gzip members: {e!r} ({len(data)} bytes)"
    if text and not text.endswith(b"\n"):
        problem = "does not end with a newline"
    return data, text.splitlines(keepends=True), problem


#: Operations moto answers with a bare 500 (a KeyError in moto 5.2.5) when their
#: upload does not exist, where S3 answers 404 NoSuchUpload.


class Daemon:
    """
    One ``twistd -n loghandler`` child process on a free port, its output in a file.

    :ivar name: a label for messages.
    :ivar port: its HTTP port.
    :ivar log_path: where its output goes.
    """

    def __init__(self, name: str, env: dict[str, str], workdir: str) -> None:
        """Start it (does not wait: see :meth:`wait_ready`)."""
        self.name = name
        self.port = free_port()
        self.log_path = os.path.join(workdir, f"twistd-faults-{name}-{self.port}.log")
        self._log = open(self.log_path, "wb")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.process = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "loghandler"],
            env={**os.environ, **env, "ADDR": "127.0.0.1", "PORT": str(self.port)},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        self.sigterm_at: Optional[float] = None
        self.exit_seconds: Optional[float] = None

    def log(self) -> str:
        """Everything it wrote so far."""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def relevant_log(self, limit: int = 60) -> str:
        """Its warnings, errors and flush lines (the last ``limit``), for messages."""
        lines = [line for line in self.log().splitlines() if RELEVANT.search(line)]
        if len(lines) > limit:
            lines = [f"... {len(lines) - limit} earlier lines left out"] + lines[-limit:]
        return "\n".join(f"  [{self.name}] {line}" for line in lines)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``/healthz`` until it answers 200 (storage reached)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited at start:\n{self.log()}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                try:
                    connection.request("GET", "/healthz")
                    if connection.getresponse().status == 200:
                        return
                finally:
                    connection.close()
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready within {timeout} s:\n{self.log()}")

    def sigterm(self) -> None:
        """Send SIGTERM (once) and note when."""
        if self.sigterm_at is None:
            self.sigterm_at = time.monotonic()
            self.process.send_signal(signal.SIGTERM)

    def exited(self) -> bool:
        """Whether it has exited (noting when, the first time it is seen)."""
        if self.process.poll() is None:
            return False
        if self.exit_seconds is None and self.sigterm_at is not None:
            self.exit_seconds = time.monotonic() - self.sigterm_at
        return True

    def check_exit(self, lost_ok: bool = False) -> float:
        """
        After :meth:`exited`: the seconds from SIGTERM to exit.

        :param lost_ok: exit status 1 is expected too, when the log says the flush
            lost lines (``exit status 1: ...``), and death by SIGTERM only when it
            names no line lost.
        :raises AssertionError: an exit status other than a clean SIGTERM's (or,
            with ``lost_ok``, one the log does not account for).
        """
        assert self.exit_seconds is not None
        if not self._log.closed:
            self._log.close()
        code = self.process.returncode
        # twistd re-raises SIGTERM on itself after a clean shutdown; 1: lines lost.
        if lost_ok:
            lost = self.count(r"not stored by the shutdown deadline: \d+ lines") > 0
            said = self.count(r"exit status 1: \d+ acknowledged lines") > 0
            expected = (1,) if lost else (0, -signal.SIGTERM)
            if code not in expected or said != lost:
                raise AssertionError(
                    f"{self.name} exited with {code}, lines lost: {lost}, exit status 1"
                    f" logged: {said}:\n{self.relevant_log()}"
                )
        elif code not in (0, -signal.SIGTERM):
            raise AssertionError(f"{self.name} exited with {code}:\n{self.relevant_log()}")
        return self.exit_seconds


    def kill(self) -> None:
        """SIGKILL if still running (cleanup)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if not self._log.closed:
            self._log.close()

    def flush_seconds(self) -> Optional[float]:
        """The ``flush on stop done in X s`` figure of its log, if any."""
        match = re.search(r"flush on stop done in ([0-9.]+) s", self.log())
        return float(match.group(1)) if match else None

    def late_retries(self, deadline_s: float) -> list[str]:
        """
        The retries its log shows scheduled, after SIGTERM, to wait past the shutdown
        deadline (``deadline_s`` after the ``Received SIGTERM`` line; the log's
        timestamps have whole seconds), each as one line with its offsets.
        """
        log = self.log()
        term = re.search(r"^(\S+) \[twisted\.internet\.base#info\] Received SIGTERM", log, re.M)
        if term is None:
            return []
        start = _log_time(term.group(1))
        late = []
        for m in re.finditer(
            r"^(\S+) \[loghandler\.retry\.RetryLayer#warn\] (\S+) (\S+) failed \((.*)\);"
            r" retry (\d+) in ([0-9.]+) s$",
            log,
            re.M,
        ):
            at = _log_time(m.group(1)) - start
            until = at + float(m.group(6))
            if at >= 0 and until > deadline_s:
                late.append(
                    f"{m.group(2)} {m.group(3)}: retry {m.group(5)} drawn at SIGTERM+{at:.0f}s"
                    f" to wait {m.group(6)} s, until SIGTERM+{until:.1f}s, past the"
                    f" {deadline_s:g} s deadline (after: {m.group(4)[:60]})"
                )
        return late

    def count(self, pattern: str) -> int:
        """How many lines of its log match ``pattern``."""
        return len(re.findall(pattern, self.log()))


def _log_time(stamp: str) -> float:
    """A twistd log line's timestamp (``2026-12-02T06:44:27+0000``) in epoch seconds."""
    return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z")))


def wait_exits(daemons: list["Daemon"], timeout: float, lost_ok: bool = False) -> list[float]:
    """
    Wait for every daemon to exit after its SIGTERM, polling every 20 ms so that each
    exit is timed on its own; the seconds from SIGTERM to exit of each.

    :param lost_ok: see :meth:`Daemon.check_exit`.
    :raises AssertionError: one is still running ``timeout`` seconds after its
        SIGTERM (all still running are then killed), or exited uncleanly.
    """
    while True:
        running = [d for d in daemons if not d.exited()]
        if not running:
            return [d.check_exit(lost_ok) for d in daemons]
        late = [d for d in running if time.monotonic() - (d.sigterm_at or 0.0) > timeout]
        if late:
            for d in running:
                d.kill()
            raise AssertionError(
                "still running %g s after SIGTERM (killed): %s\n%s"
                % (timeout, [d.name for d in late], "\n".join(d.relevant_log() for d in late))
            )
        time.sleep(0.02)


class Ledger:
    """
    What the senders were told, line by line (thread-safe).

    :ivar acked: line -> (daemon name, seconds since the start) of its 200.
    :ivar refused: lines whose every request got an error answer (nothing kept).
    :ivar in_doubt: lines whose request got no answer (may or may not be kept).
    :ivar statuses: answers by status code (0: none).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.started = time.monotonic()
        self.acked: dict[bytes, tuple[str, float]] = {}
        self.refused: set[bytes] = set()
        self.in_doubt: set[bytes] = set()
        self.statuses: Counter[int] = Counter()
        self.retried_503 = 0

    def next_id(self) -> int:
        """A content_id no other message of this test has."""
        with self._lock:
            return next(self._ids)

    def answer(self, status: int) -> None:
        with self._lock:
            self.statuses[status] += 1

    def retrying(self) -> None:
        """One more 503 retried."""
        with self._lock:
            self.retried_503 += 1

    def settle(self, line: bytes, outcome: str, daemon: str) -> None:
        with self._lock:
            if outcome == "acked":
                self.acked[line] = (daemon, round(time.monotonic() - self.started, 2))
            elif outcome == "refused":
                self.refused.add(line)
            else:
                self.in_doubt.add(line)

    def at(self, line: bytes) -> str:
        """Who acknowledged ``line`` when, for messages."""
        daemon, seconds = self.acked.get(line, ("-", -1.0))
        return f"acked by {daemon} at t={seconds}s"


def make_message(ledger: Ledger, client_id: int, rng: random.Random) -> tuple[bytes, bytes]:
    """A fresh message for ``client_id``: its body and its stored line."""
    content_id = ledger.next_id()
    if client_id == 1:
        text = "big %d é %s" % (content_id, rng.randbytes(BIG_TEXT_HEX // 2).hex())
    else:
        text = "msg %d é ✓ from the fault test" % content_id
    body = canonical_body(content_id, client_id, int(time.time() * 1000), text)
    return body, body + b"\n"


def post_one(connection: http.client.HTTPConnection, body: bytes) -> int:
    """POST one body on a keep-alive connection; the status."""
    connection.request("POST", "/log", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status


def sender(
    daemon: Daemon,
    ledger: Ledger,
    stop: threading.Event,
    rate: float,
    seed: int,
    clients: tuple[int, ...] = CLIENTS,
    limit: Optional[int] = None,
) -> None:
    """
    POST fresh messages to ``daemon`` at about ``rate`` a second until ``stop`` is set
    (or ``limit`` messages were sent), over one keep-alive connection.  A 503 is
    retried with a fresh request of the same body, up to 3 times, 0.2 s apart; any
    other non-200 answer counts as refused; no answer, as in doubt.
    """
    rng = random.Random(seed)
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    interval = 1.0 / rate
    next_at = time.monotonic()
    sent = 0
    try:
        while not stop.is_set() and (limit is None or sent < limit):
            client_id = clients[sent % len(clients)]
            body, line = make_message(ledger, client_id, rng)
            sent += 1
            outcome = "refused"
            for attempt in range(4):
                try:
                    status = post_one(connection, body)
                except (OSError, http.client.HTTPException):
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
                    ledger.answer(0)
                    outcome = "in_doubt"
                    break
                ledger.answer(status)
                if status == 200:
                    outcome = "acked"
                    break
                if status != 503 or attempt == 3 or stop.is_set():
                    break
                ledger.retrying()
                time.sleep(0.2)
            ledger.settle(line, outcome, daemon.name)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            else:
                next_at = time.monotonic()
    finally:
        connection.close()


class FaultTests(TestCase):
    """
    Daemons through the fault proxy; every acknowledged line stored exactly once.
    """

    timeout = TEST_TIMEOUT

    def setUp(self) -> None:
        self.moto = shared_moto()
        self.moto.reset()
        self.workdir = os.path.abspath(".")
        self.s3 = self.moto.botocore_client()
        self.addCleanup(self.s3.close)
        self.proxy = FaultProxy(
            self.moto.endpoint_url, region=self.moto.region, max_stall=25.0
        )
        self.proxy.start()
        self.addCleanup(self.proxy.stop)
        self.daemons: list[Daemon] = []

    def in_thread(self, body: Callable[[], None]) -> "Deferred[None]":
        """
        Run the blocking ``body`` off the reactor thread, so that trial's ``timeout``
        can end the test; the cleanups then kill the daemons, which ends its waits.
        """
        return deferToThread(body)

    def start_daemons(self, count: int, **env: str) -> list[Daemon]:
        """Start ``count`` daemons through the proxy, in parallel; wait until ready."""
        daemons = []
        for n in range(count):
            daemon = Daemon(
                f"daemon{n + 1}", {**self.proxy.env(self.moto.env()), **env}, self.workdir
            )
            self.addCleanup(daemon.kill)
            daemons.append(daemon)
        for daemon in daemons:
            daemon.wait_ready()
        self.daemons.extend(daemons)
        return daemons

    def logs(self) -> str:
        """The relevant lines of every daemon's log, for failure messages."""
        return "\n".join(d.relevant_log() for d in self.daemons)

    # -- reading back ------------------------------------------------------------

    def read_bucket(self) -> dict[str, Any]:
        """
        Every object under ``chat/`` read straight from moto: its lines (bytes) by
        key; gzip errors and wrong content types by key; what is left under
        ``_loghandler/`` (objects, uploads) and the uploads under ``chat/``.
        """
        bucket = self.moto.bucket
        paginator = self.s3.get_paginator("list_objects_v2")
        keys: list[str] = []
        for page in paginator.paginate(Bucket=bucket, Prefix="chat/"):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        leftover_objects = [
            f"{o['Key']} ({o['Size']} bytes)"
            for page in paginator.paginate(Bucket=bucket, Prefix="_loghandler/")
            for o in page.get("Contents", [])
        ]
        lines: dict[str, list[bytes]] = {}
        bad: dict[str, str] = {}
        for key in keys:
            _, key_lines, problem = read_chat_object(self.s3, bucket, key)
            if problem is not None:
                bad[key] = problem
            if key_lines is not None:
                lines[key] = key_lines
        return {
            "lines": lines,
            "bad": bad,
            "leftover_objects": leftover_objects,
            "leftover_uploads": self.uploads("_loghandler/"),
            "chat_uploads": self.uploads("chat/"),
        }

    def uploads(self, prefix: str) -> list[str]:
        """The multipart uploads in progress under ``prefix``, as ``key uploadId``."""
        found: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.moto.bucket, "Prefix": prefix}
        while True:
            answer = self.s3.list_multipart_uploads(**kwargs)
            found.extend(
                f"{u['Key']} {u['UploadId']}"
                for u in answer.get("Uploads", [])
                if u["Key"].startswith(prefix)  # in case the prefix were ignored
            )
            if not answer.get("IsTruncated"):
                return found
            kwargs.update(
                KeyMarker=answer["NextKeyMarker"], UploadIdMarker=answer["NextUploadIdMarker"]
            )

    def verify(
        self, ledger: Ledger, figures: dict[str, Any], diagnosis: Callable[[], str] = lambda: ""
    ) -> None:
        """
        Read the bucket back and check it against ``ledger`` (see the module's
        docstring); fill ``figures``; fail with every problem at once, with the lines,
        keys and the daemons' relevant log lines.
        """
        bucket = self.read_bucket()
        found: Counter[bytes] = Counter()
        where: dict[bytes, list[str]] = defaultdict(list)
        misplaced: list[str] = []
        for key, key_lines in bucket["lines"].items():
            for line in key_lines:
                found[line] += 1
                where[line].append(key)
                try:
                    value = json.loads(line)
                    wanted = utc_key(value["timestamp"], value["client_id"])
                except (ValueError, KeyError, TypeError):
                    misplaced.append(f"{key}: not a message line {line[:120]!r}")
                    continue
                if key != wanted:
                    misplaced.append(f"{key}: content_id {value['content_id']} belongs in {wanted}")
        duplicates = {line: n for line, n in found.items() if n > 1}
        lost = [line for line in ledger.acked if line not in found]
        unexpected = [line for line in found if line in ledger.refused and line not in ledger.acked]
        unknown = [
            line
            for line in found
            if line not in ledger.acked and line not in ledger.refused and line not in ledger.in_doubt
        ]

        def describe(line: bytes) -> str:
            try:
                value = json.loads(line)
                head = "content_id %s client %s ts %s -> %s" % (
                    value["content_id"],
                    value["client_id"],
                    value["timestamp"],
                    utc_key(value["timestamp"], value["client_id"]),
                )
            except (ValueError, KeyError, TypeError):
                head = repr(line[:120])
            return f"{head}; {ledger.at(line)}; found {found[line]}x in {where.get(line, [])}"

        figures.update(
            acknowledged=len(ledger.acked),
            refused=len(ledger.refused),
            in_doubt=len(ledger.in_doubt),
            found=sum(found.values()),
            distinct_found=len(found),
            duplicates=len(duplicates),
            lost=len(lost),
            unexpected=len(unexpected) + len(unknown),
            objects=len(bucket["lines"]),
            answers={str(k): v for k, v in sorted(ledger.statuses.items())},
            retried_503=ledger.retried_503,
            chat_uploads_left=bucket["chat_uploads"],
        )
        if bucket["chat_uploads"]:
            print(
                "FAULTS NOTE %d multipart upload(s) left under chat/ (for the recovery"
                " sweep, not failed): %s" % (len(bucket["chat_uploads"]), bucket["chat_uploads"])
            )
        problems = []
        if lost:
            problems.append(
                f"{len(lost)} acknowledged lines LOST, e.g.:\n"
                + "\n".join("  " + describe(line) for line in lost[:20])
            )
        if duplicates:
            problems.append(
                f"{len(duplicates)} lines stored more than once, e.g.:\n"
                + "\n".join("  " + describe(line) for line in list(duplicates)[:20])
            )
        if unexpected:
            problems.append(
                f"{len(unexpected)} lines stored though every request for them got an error"
                " answer, e.g.:\n" + "\n".join("  " + describe(line) for line in unexpected[:10])
            )
        if unknown:
            problems.append(
                f"{len(unknown)} lines nobody sent, e.g.:\n"
                + "\n".join("  " + describe(line) for line in unknown[:10])
            )
        if misplaced:
            problems.append(f"{len(misplaced)} lines in the wrong key:\n  " + "\n  ".join(misplaced[:10]))
        if bucket["bad"]:
            problems.append(
                "objects that are not valid: \n"
                + "\n".join(f"  {k}: {v}" for k, v in sorted(bucket["bad"].items()))
            )
        if bucket["leftover_objects"]:
            problems.append(
                "objects left under _loghandler/:\n  " + "\n  ".join(bucket["leftover_objects"])
            )
        if bucket["leftover_uploads"]:
            problems.append(
                "multipart uploads left under _loghandler/:\n  "
                + "\n  ".join(bucket["leftover_uploads"])
            )
        self.report(figures)
        if problems:
            self.fail(
                "\n\n".join(problems)
                + "\n\nfigures: "
                + json.dumps(figures, sort_keys=True)
                + diagnosis()
                + "\n\ndaemon logs (warnings, errors, flush):\n"
                + self.logs()
            )

    def report(self, figures: dict[str, Any]) -> None:
        """Append ``figures`` to ``faults-report.json`` in trial's working directory."""
        path = os.path.join(self.workdir, "faults-report.json")
        try:
            with open(path) as f:
                runs = json.load(f)
        except (OSError, ValueError):
            runs = []
        runs.append(figures)
        with open(path, "w") as f:
            json.dump(runs, f, indent=2, sort_keys=True)

    def daemon_figures(self) -> dict[str, Any]:
        """Per daemon: flush seconds, SIGTERM-to-exit seconds, retries and merge redos."""
        return {
            d.name: {
                "flush_s": d.flush_seconds(),
                "exit_s": None if d.exit_seconds is None else round(d.exit_seconds, 2),
                "retried_calls": d.count(r"failed \(.*\); retry \d+ in"),
                "merge_redone": d.count(r"merging \S+ again"),
                "merge_had_landed": d.count(r"had landed already"),
                "merged": d.count(r": merged \S+ \(\d+ bytes\) by"),
                "merged_multipart": d.count(r": merged \S+ \(\d+ bytes\) by multipart upload"),
            }
            for d in self.daemons
        }

    # -- 1 -------------------------------------------------------------------------

    def test_two_daemons_lost_answers_refusals_stalls(self) -> "Deferred[None]":
        """
        Two daemons (same bucket, same three keys, streams completed every ~2 s,
        ``SHUTDOWN_TIMEOUT_S=20``) take about 150 messages a second each for ~26 s
        while the proxy loses 30% of the answers to writes, then answers 5xx, then
        refuses requests and connections, stalls every request, cuts answers, and
        finally forwards cleanly; then SIGTERM.  Every acknowledged line is stored
        exactly once in its key, every object is valid gzip, nothing is left under
        ``_loghandler/``.
        """
        return self.in_thread(self._two_daemons)

    def _two_daemons(self) -> None:
        started = time.monotonic()
        shutdown_timeout = 20.0
        daemons = self.start_daemons(
            2, QUEUE_TIMEOUT_MIN="0.03", SHUTDOWN_TIMEOUT_S=str(int(shutdown_timeout))
        )
        proxy = self.proxy
        proxy.reset_stats()
        ledger = Ledger()
        stop = threading.Event()
        senders = [
            threading.Thread(
                target=sender, args=(d, ledger, stop, 75.0, 1000 * n + t), daemon=True
            )
            for n, d in enumerate(daemons)
            for t in range(2)
        ]
        for thread in senders:
            thread.start()

        writes = ("PUT", "POST")

        def refuse_connections() -> None:
            proxy.clear_mode()
            proxy.refuse_connections(2.0)

        phases: list[tuple[str, float, Callable[[], None]]] = [
            ("clean", 2.0, proxy.clear_mode),
            (
                "drop_answer",
                4.0,
                lambda: proxy.set_mode(
                    FaultRule(fault="drop_answer", probability=0.3, seed=1, methods=writes)
                ),
            ),
            (
                "error5xx",
                3.0,
                lambda: proxy.set_mode(
                    FaultRule(fault="error5xx", status=503, probability=0.15, seed=2),
                    FaultRule(fault="error5xx", status=500, probability=0.15, seed=3),
                ),
            ),
            (
                "refuse",
                1.5,
                lambda: proxy.set_mode(FaultRule(fault="refuse", probability=0.3, seed=4)),
            ),
            ("refuse_connections", 2.5, refuse_connections),
            ("stall", 3.5, lambda: proxy.set_mode(FaultRule(fault="stall", seconds=3.0))),
            ("cut", 4.0, lambda: proxy.set_mode(FaultRule(fault="cut", probability=0.3, seed=5))),
            ("clean", 5.0, proxy.clear_mode),
        ]
        timeline = []
        try:
            for name, seconds, enter in phases:
                timeline.append(f"{name}@{time.monotonic() - ledger.started:.1f}s")
                enter()
                time.sleep(seconds)
        finally:
            proxy.clear_mode()
            proxy.release()
            stop.set()
            for thread in senders:
                thread.join(15)
        self.assertFalse(any(t.is_alive() for t in senders), "a sender did not stop")
        send_seconds = time.monotonic() - ledger.started

        for daemon in daemons:
            daemon.sigterm()
        exits = wait_exits(daemons, shutdown_timeout + 15)
        stats = proxy.stats()
        proxy.reset()

        figures: dict[str, Any] = {
            "test": "two_daemons",
            "send_s": round(send_seconds, 1),
            "phases": timeline,
            "faults": stats["fault_totals"],
            "faults_by_operation": stats["faults"],
            "conditions": stats["conditions"],
            "upstream_errors": stats["upstream_errors"],
            "requests": sum(stats["requests"].values()),
            "refused_windows": stats["refused_windows"],
            "moto_500_as_nosuchupload": stats["conditions"]["moto_500_as_nosuchupload"],
            "daemons": self.daemon_figures(),
        }
        try:
            self.verify(ledger, figures)
        finally:
            figures["wall_s"] = round(time.monotonic() - started, 1)
            print(
                "FAULTS SUMMARY two daemons: acknowledged %s, found %s, duplicates %s, lost %s,"
                " unexpected %s, in doubt %s, objects %s, answers %s; faults injected %s"
                " (precondition_failed %s, conditional_conflict %s); merges redone %s,"
                " lost answers recognised %s, multipart merges %s; moto 500 answered as"
                " NoSuchUpload %s; exits %s s; wall %s s"
                % (
                    figures.get("acknowledged"),
                    figures.get("found"),
                    figures.get("duplicates"),
                    figures.get("lost"),
                    figures.get("unexpected"),
                    figures.get("in_doubt"),
                    figures.get("objects"),
                    figures.get("answers"),
                    json.dumps(stats["fault_totals"], sort_keys=True),
                    stats["conditions"]["precondition_failed"],
                    stats["conditions"]["conditional_conflict"],
                    sum(d["merge_redone"] for d in figures["daemons"].values()),
                    sum(d["merge_had_landed"] for d in figures["daemons"].values()),
                    sum(d["merged_multipart"] for d in figures["daemons"].values()),
                    stats["conditions"]["moto_500_as_nosuchupload"],
                    [round(e, 2) for e in exits],
                    figures["wall_s"],
                )
            )
        for daemon in daemons:
            log = daemon.log()
            self.assertIn("flush on stop done", log, daemon.relevant_log())
            self.assertNotIn("Traceback", log, daemon.relevant_log())
        self.assertGreater(figures["acknowledged"], 1000)
        self.assertGreater(sum(stats["fault_totals"].values()), 0)

    # -- 2 -------------------------------------------------------------------------

    def test_sigterm_while_storage_stalls(self) -> "Deferred[None]":
        """
        One daemon (``SHUTDOWN_TIMEOUT_S=20``) holds acknowledged lines, some already
        merged into their keys; every storage request then stalls (held by the proxy)
        and the daemon gets SIGTERM right after; 15 s later the stalls end.  Every
        acknowledged line is stored exactly once, nothing is left under
        ``_loghandler/``, and the daemon exits within the deadline (+3 s).
        """
        return self.in_thread(lambda: self._sigterm_during_outage("stall"))

    def test_sigterm_while_storage_refuses(self) -> "Deferred[None]":
        """
        As :meth:`test_sigterm_while_storage_stalls`, but the proxy refuses
        connections (ECONNREFUSED; its open connections closed) for 15 s: the
        daemon's retries with backoff must still store everything once storage is back,
        within the deadline.
        """
        return self.in_thread(lambda: self._sigterm_during_outage("refuse"))

    def _sigterm_during_outage(self, kind: str) -> None:
        started = time.monotonic()
        shutdown_timeout = 20.0
        outage = shutdown_timeout - 5.0
        margin = 3.0
        (daemon,) = self.start_daemons(
            1, QUEUE_TIMEOUT_MIN="0.05", SHUTDOWN_TIMEOUT_S=str(int(shutdown_timeout))
        )
        proxy = self.proxy
        ledger = Ledger()
        never = threading.Event()
        # A first batch, completed and merged into its keys by rotation (~3 s) ...
        sender(daemon, ledger, never, 300.0, 1, limit=600)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if len(self.s3.list_objects_v2(Bucket=self.moto.bucket, Prefix="chat/").get("Contents", [])) >= 3:
                break
            time.sleep(0.2)
        # ... then a second one, held in the open streams.
        sender(daemon, ledger, never, 300.0, 2, limit=600)
        self.assertEqual(len(ledger.acked), 1200, dict(ledger.statuses))
        proxy.reset_stats()

        if kind == "stall":
            proxy.set_mode(FaultRule(fault="stall"))  # until released
        else:
            proxy.refuse_connections(outage)
        outage_began = time.monotonic()
        daemon.sigterm()
        time.sleep(max(0.0, outage_began + outage - time.monotonic()))
        if kind == "stall":
            proxy.clear_mode()
            released = proxy.release()
            time.sleep(0.3)
            proxy.release()  # one that picked the rule just as the first release came
        else:
            released = 0
            proxy.refuse_connections(0)
        back_after = time.monotonic() - outage_began
        try:
            (exit_seconds,) = wait_exits([daemon], shutdown_timeout + 15)
        finally:
            stats = proxy.stats()
        figures: dict[str, Any] = {
            "test": f"sigterm_while_storage_{kind}s",
            "outage_s": round(back_after, 2),
            "stalled_released": released,
            "faults": stats["fault_totals"],
            "moto_500_as_nosuchupload": stats["conditions"]["moto_500_as_nosuchupload"],
            "daemons": self.daemon_figures(),
        }
        def diagnosis() -> str:
            late = daemon.late_retries(shutdown_timeout)
            if not late:
                return ""
            return (
                f"\n\nstorage was back {back_after:.1f} s after SIGTERM, yet these retries"
                f" were scheduled past the {shutdown_timeout:g} s deadline (full-jitter"
                " backoff, cap 30 s; the flush does not shorten it), so their data never"
                " reached storage:\n  " + "\n  ".join(late)
            )

        figures["late_retries"] = len(daemon.late_retries(shutdown_timeout))
        try:
            self.verify(ledger, figures, diagnosis)
        finally:
            figures["wall_s"] = round(time.monotonic() - started, 1)
            print(
                "FAULTS SIGTERM while storage %ss: acknowledged %s, found %s, duplicates %s,"
                " lost %s; storage back after %.1f s; SIGTERM to exit %.2f s (deadline %g s);"
                " flush on stop %s s; retries scheduled past the deadline %s; faults %s; wall %s s"
                % (
                    kind,
                    figures.get("acknowledged"),
                    figures.get("found"),
                    figures.get("duplicates"),
                    figures.get("lost"),
                    back_after,
                    exit_seconds,
                    shutdown_timeout,
                    daemon.flush_seconds(),
                    figures["late_retries"],
                    json.dumps(stats["fault_totals"], sort_keys=True),
                    figures["wall_s"],
                )
            )
        self.assertLessEqual(
            exit_seconds, shutdown_timeout + margin, f"exit took too long:\n{daemon.relevant_log()}"
        )
        self.assertIsNotNone(
            daemon.flush_seconds(),
            f"no 'flush on stop done' line: the flush missed its deadline\n{daemon.relevant_log()}",
        )
        self.assertGreater(sum(stats["fault_totals"].values()) + stats["refused_windows"], 0)
