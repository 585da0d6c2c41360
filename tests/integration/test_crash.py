"""
Crash tests (DESIGN.md section 6, issue 6): ``twistd -n loghandler`` daemons under
load against moto's S3 server are killed with SIGKILL (or stopped with SIGTERM while
storage stalls), a new instance is started on the same bucket, and the bucket is read
back straight from moto once the dead writer's staged data are merged.

The contract under test, with the short settings of these tests (``CHECKPOINT_S=1``,
``LEASE_S=2``, ``RECOVERY_INTERVAL_S=2``, ``QUEUE_TIMEOUT_MIN=600`` so that nothing
rotates):

- checkpoints: every ``CHECKPOINT_S`` a stream that received lines uploads its current
  part to its staging upload under ``_loghandler/staging/{writer_id}/...``;
- leases: each process rewrites ``_loghandler/writers/{writer_id}`` every ``LEASE_S``
  and deletes it after a clean stop; a writer whose lease is older than 3 x
  ``LEASE_S`` is gone;
- recovery: at start and every ``RECOVERY_INTERVAL_S``, what gone writers staged is
  merged into its ``chat/...`` keys, then deleted, within about 3 x ``LEASE_S`` +
  ``RECOVERY_INTERVAL_S`` of the kill;
- ``ACK=durable``: 200 only once the line is in storage; 202
  ``{"ok": true, "durable": false}`` after ``DURABLE_TIMEOUT_S`` otherwise.

What every test checks after recovery: every object under ``chat/`` is whole gzip
members of ``application/gzip``, in the right key; no line is stored twice; every line
stored was sent (and not refused with an error answer); the acknowledged lines that
must survive are found (per test, below); nothing is left under
``_loghandler/staging/``; no multipart upload is left anywhere; nothing is left under
``_loghandler/`` but the leases of live writers (the dead writer's lease is gone);
and once the new instances are stopped with SIGTERM, nothing at all is left under
``_loghandler/``.

- :meth:`CrashTests.test_control_clean_stop`: the harness's own control, needing no
  crash feature: the same load, then SIGTERM; every message answered 200 is read back
  once.
- :meth:`CrashTests.test_sigkill_under_load`: one daemon, ~300 messages/s over 10
  clients plus a client of 8 KB texts; SIGKILL after 8 s; a new instance.  Every
  message answered 200 more than ``CHECKPOINT_S`` + 1 s before the kill is found; the
  kill-to-merged time is within 3 x ``LEASE_S`` + ``RECOVERY_INTERVAL_S`` + 5 s.
- :meth:`CrashTests.test_durable_sigkill`: the same with ``ACK=durable``: every
  message answered 200 is found, whatever its age; 202s are allowed.
- :meth:`CrashTests.test_two_recoverers`: after the kill two instances start at once
  and both recover the dead writer (through the fault proxy, which enforces
  ``If-Match`` on CompleteMultipartUpload as S3 does and moto does not): each line
  once.
- :meth:`CrashTests.test_sigterm_storage_stalled_past_deadline`: the fault proxy
  stalls every storage request; SIGTERM; the stall outlasts ``SHUTDOWN_TIMEOUT_S``;
  then storage is back (the held requests go on) and a new instance starts: 0
  acknowledged messages lost, none twice.

Each test is bounded by trial's ``timeout`` (120 s): the blocking body runs in a
thread; the cleanups kill the daemons and stop the load, which ends its waits.  moto
runs once per process (:func:`shared_moto`: a skip when it is not installed, a
failure when ``CI`` is set).  Each run prints one ``CRASH SUMMARY`` line and appends
its figures to ``crash-report.json`` in trial's working directory.

The harness (:class:`Load`, :class:`CrashHarness`, :func:`sigkill_scenario`,
:func:`sigterm_stalled_scenario`) is shared with ``bench/crash.py``.
"""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import os
import random
import re
import signal
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.integration.faultproxy import FaultProxy, FaultRule
from tests.integration.moto import MotoServer, shared_moto
from tests.integration.test_faults import (
    Daemon,
    canonical_body,
    read_chat_object,
    utc_key,
    wait_exits,
)

#: Seconds a test may take in all (trial fails it after that).
TEST_TIMEOUT = 120

#: The settings of these tests (seconds).
CHECKPOINT_S = 1.0
LEASE_S = 2.0
RECOVERY_INTERVAL_S = 2.0

#: A checkpoint's upload round trip: a line acknowledged more than ``CHECKPOINT_S`` +
#: this before the kill must have reached storage.
UPLOAD_MARGIN_S = 1.0

#: Added to 3 x ``LEASE_S`` + ``RECOVERY_INTERVAL_S`` for the kill-to-merged bound:
#: the new instance's start, S3's whole-second LastModified, the merges themselves.
RECOVERY_MARGIN_S = 5.0

#: The clients of short texts, and the client of 8 KB texts (so ``MAX_CLIENT_ID=11``).
SMALL_CLIENTS = tuple(range(1, 11))
BIG_CLIENT = 11

#: Seconds between two looks at ``_loghandler/staging/`` while waiting for recovery.
UNSTAGED_POLL_S = 0.25

#: Where the daemon keeps its own data (DESIGN.md sections 5 and 6); written out here
#: rather than imported, so that the tests hold the implementation to the contract.
WORK_PREFIX = "_loghandler/"
STAGING_PREFIX = WORK_PREFIX + "staging/"
WRITERS_PREFIX = WORK_PREFIX + "writers/"

#: :attr:`Sent.status` of a message whose connection was refused: nothing was sent.
NOT_SENT = -1
#: :attr:`Sent.status` of a message sent without an answer (the daemon died): it may
#: or may not be kept.
NO_ANSWER = 0

#: The body of a 202 under ``ACK=durable``.
NOT_DURABLE = {"ok": True, "durable": False}


def _g(seconds: float) -> str:
    """A number of seconds as an environment value (``1``, ``0.5``)."""
    return f"{seconds:g}"


# -- the load ------------------------------------------------------------------------


class Sent:
    """
    One message of the load: when it was sent and what came back.

    :ivar client_id: its client.
    :ivar content_id: its content_id, unique in the run.
    :ivar sent_at: ``time.monotonic()`` just before the request was written.
    :ivar answered_at: ``time.monotonic()`` when its answer (or error) came, or None.
    :ivar status: the HTTP status, :data:`NO_ANSWER` or :data:`NOT_SENT`.
    :ivar body: the answer's body when it was not a 200 (for checking 202s).
    """

    __slots__ = ("client_id", "content_id", "sent_at", "answered_at", "status", "body")

    def __init__(self, client_id: int, content_id: int, sent_at: float) -> None:
        self.client_id = client_id
        self.content_id = content_id
        self.sent_at = sent_at
        self.answered_at: Optional[float] = None
        self.status = NO_ANSWER
        self.body = b""

    @property
    def acknowledged(self) -> bool:
        """Answered 200 or 202: the daemon took the line."""
        return self.status in (200, 202)

    def latency(self) -> Optional[float]:
        """Seconds from sending to the answer, for answered messages."""
        if self.answered_at is None or self.status <= 0:
            return None
        return self.answered_at - self.sent_at


class Load:
    """
    Open-loop load on one daemon from threads with blocking keep-alive connections
    (``http.client``): ``rate`` messages a second spread over ``clients`` with short
    texts, plus ``big_rate`` a second of ``big_text_bytes``-character texts
    (base64 of random bytes: they compress to about 3/4) for ``big_client``.  Each
    client sends over ``connections`` connections, each taking every
    ``connections``-th slot of the client's schedule, so a slow answer (``ACK=durable``)
    does not slow the offered rate until all of a client's connections wait; a
    connection more than 1 s behind its schedule drops the backlog.  Every content_id
    is unique (counted from ``first_id``, so that two loads of one test differ); the lines are the canonical ones, so a stored line equals the body
    plus ``\\n``.

    :ivar records: stored line -> :class:`Sent`, for every message tried.
    :ivar started: ``time.monotonic()`` at :meth:`start`.
    :ivar stopped: ``time.monotonic()`` at :meth:`stop`.
    """

    def __init__(
        self,
        port: int,
        *,
        rate: float = 300.0,
        clients: tuple[int, ...] = SMALL_CLIENTS,
        big_rate: float = 150.0,
        big_client: int = BIG_CLIENT,
        big_text_bytes: int = 8192,
        connections: int = 4,
        seed: int = 0,
        first_id: int = 1,
    ) -> None:
        self.port = port
        self.rate = rate
        self.clients = clients
        self.big_rate = big_rate
        self.big_client = big_client
        self.big_text_bytes = big_text_bytes
        self.connections = connections
        self.seed = seed
        self.records: dict[bytes, Sent] = {}
        self.started = 0.0
        self.stopped: Optional[float] = None
        self._lock = threading.Lock()
        self._ids = itertools.count(first_id)  # content_ids, unique across loads
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start every sending thread."""
        self.started = time.monotonic()
        plan: list[tuple[int, float, bool]] = [
            (client, self.rate / len(self.clients), False) for client in self.clients
        ]
        if self.big_rate > 0:
            plan.append((self.big_client, self.big_rate, True))
        for n, (client, rate, big) in enumerate(plan):
            for slot in range(self.connections):
                thread = threading.Thread(
                    target=self._send,
                    args=(client, rate, slot, big, self.seed * 10_000 + n * 100 + slot),
                    name=f"load-{client}-{slot}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()

    def stop(self) -> None:
        """Stop sending (requests in flight finish or fail on their own)."""
        if self.stopped is None:
            self.stopped = time.monotonic()
        self._stop.set()

    def join(self, timeout: float = 15.0) -> bool:
        """Wait for the threads after :meth:`stop`; whether all ended."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _message(self, client_id: int, rng: random.Random, big: bool) -> tuple[Sent, bytes, bytes]:
        """A fresh message: its record, body and stored line."""
        with self._lock:
            content_id = next(self._ids)
        if big:
            raw = rng.randbytes(self.big_text_bytes * 3 // 4 + 3)
            text = "big %d " % content_id + base64.b64encode(raw).decode()[: self.big_text_bytes]
        else:
            text = "crash test %d from client %d é ✓" % (content_id, client_id)
        body = canonical_body(content_id, client_id, int(time.time() * 1000), text)
        record = Sent(client_id, content_id, 0.0)
        line = body + b"\n"
        with self._lock:
            self.records[line] = record
        return record, body, line

    def _send(self, client_id: int, rate: float, slot: int, big: bool, seed: int) -> None:
        """One connection's share of one client's schedule, until :meth:`stop`."""
        rng = random.Random(seed)
        interval = self.connections / rate
        next_at = self.started + slot / rate
        connection: Optional[http.client.HTTPConnection] = None
        try:
            while not self._stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                record, body, _ = self._message(client_id, rng, big)
                next_at += interval
                if next_at < time.monotonic() - 1.0:
                    next_at = time.monotonic()
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                    try:
                        connection.connect()
                    except OSError:
                        connection = None
                        record.sent_at = time.monotonic()
                        record.status = NOT_SENT
                        continue
                record.sent_at = time.monotonic()
                try:
                    connection.request(
                        "POST", "/log", body, {"Content-Type": "application/json"}
                    )
                    response = connection.getresponse()
                    answer = response.read()
                except (OSError, http.client.HTTPException):
                    record.answered_at = time.monotonic()
                    record.status = NO_ANSWER
                    connection.close()
                    connection = None
                    continue
                record.answered_at = time.monotonic()
                record.status = response.status
                if response.status != 200:
                    record.body = answer[:500]
        finally:
            if connection is not None:
                connection.close()

    def figures(self, until: Optional[float] = None) -> dict[str, Any]:
        """
        Messages tried and answers by status; the offered seconds; requests answered
        a second; p50/p99 latency of the 200s and of the 202s, in milliseconds.
        """
        end = until if until is not None else (self.stopped or time.monotonic())
        seconds = max(1e-9, end - self.started)
        records = list(self.records.values())
        statuses = Counter(r.status for r in records)
        answered = [r for r in records if r.status > 0]

        def percentiles(status: int) -> dict[str, Optional[float]]:
            values = sorted(
                latency
                for r in records
                if r.status == status and (latency := r.latency()) is not None
            )
            if not values:
                return {"p50_ms": None, "p99_ms": None}
            return {
                "p50_ms": round(1000 * values[int(0.50 * (len(values) - 1))], 2),
                "p99_ms": round(1000 * values[int(0.99 * (len(values) - 1))], 2),
            }

        return {
            "load_s": round(seconds, 2),
            "tried": len(records),
            "sent": len(records) - statuses[NOT_SENT],
            "answers": {str(k): v for k, v in sorted(statuses.items())},
            "acknowledged_200": statuses[200],
            "acknowledged_202": statuses[202],
            "no_answer": statuses[NO_ANSWER],
            "requests_per_s": round(len(answered) / seconds, 1),
            "offered_per_s": round(self.rate + self.big_rate, 1),
            "latency_200": percentiles(200),
            "latency_202": percentiles(202),
        }


# -- the harness ---------------------------------------------------------------------


class HarnessClosed(Exception):
    """The harness was closed (the test timed out or ended) while a wait was running."""


class CrashHarness:
    """
    Daemons on one moto bucket (through ``proxy`` when given), the reading back of the
    bucket, and the waits of the crash scenarios.  Blocking; meant for a thread.

    :ivar moto: the S3 server.
    :ivar s3: a botocore client straight to moto (not through the proxy).
    :ivar daemons: every daemon started, for :meth:`close`.
    """

    def __init__(
        self, moto: MotoServer, workdir: str, proxy: Optional[FaultProxy] = None
    ) -> None:
        self.moto = moto
        self.workdir = workdir
        self.proxy = proxy
        self.s3 = moto.botocore_client()
        self.daemons: list[Daemon] = []
        self.loads: list[Load] = []
        self.closed = threading.Event()
        self._names = itertools.count(1)

    def close(self) -> None:
        """Stop every load, SIGKILL every daemon still running, close the client."""
        self.closed.set()
        for load in self.loads:
            load.stop()
        for daemon in self.daemons:
            daemon.kill()
        self.s3.close()

    def check_open(self) -> None:
        """:raises HarnessClosed: after :meth:`close`."""
        if self.closed.is_set():
            raise HarnessClosed()

    def sleep(self, seconds: float) -> None:
        """Sleep, ended early by :meth:`close`."""
        if self.closed.wait(max(0.0, seconds)):
            raise HarnessClosed()

    # -- daemons -----------------------------------------------------------------------

    def start(self, name: str, count: int = 1, **settings: str) -> list[Daemon]:
        """
        Start ``count`` daemons at once with the moto (or proxy) settings and
        ``settings``; wait until each answers ``/healthz`` with 200.
        """
        env = self.moto.env()
        if self.proxy is not None:
            env = self.proxy.env(env)
        env.update(settings)
        started = []
        for _ in range(count):
            self.check_open()
            daemon = Daemon(f"{name}{next(self._names)}", env, self.workdir)
            self.daemons.append(daemon)
            started.append(daemon)
        for daemon in started:
            daemon.wait_ready()
        return started

    def load(self, daemon: Daemon, **options: Any) -> Load:
        """A :class:`Load` on ``daemon``, started."""
        load = Load(daemon.port, **options)
        self.loads.append(load)
        load.start()
        return load

    def sigkill(self, daemon: Daemon) -> tuple[float, Optional[int]]:
        """SIGKILL ``daemon``: when (``time.monotonic()``) and its exit status."""
        killed_at = time.monotonic()
        daemon.process.send_signal(signal.SIGKILL)
        try:
            code: Optional[int] = daemon.process.wait(10)
        except Exception:
            code = None
        return killed_at, code

    def stop_all(self, timeout: float) -> list[str]:
        """SIGTERM every daemon still running, wait; the problems (unclean exits)."""
        running = [d for d in self.daemons if d.process.poll() is None]
        for daemon in running:
            daemon.sigterm()
        if not running:
            return []
        try:
            wait_exits(running, timeout)
        except AssertionError as e:
            return [f"a daemon did not stop cleanly after SIGTERM: {e}"]
        return []

    # -- the bucket --------------------------------------------------------------------

    def objects(self, prefix: str) -> list[dict[str, Any]]:
        """Every object under ``prefix`` (botocore's listing entries)."""
        found: list[dict[str, Any]] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.moto.bucket, Prefix=prefix):
            found.extend(page.get("Contents", []))
        return found

    def uploads(self, prefix: str = "") -> list[tuple[str, str]]:
        """The multipart uploads in progress under ``prefix``: (key, upload ID)."""
        found: list[tuple[str, str]] = []
        kwargs: dict[str, Any] = {"Bucket": self.moto.bucket, "Prefix": prefix}
        while True:
            answer = self.s3.list_multipart_uploads(**kwargs)
            found.extend(
                (u["Key"], u["UploadId"])
                for u in answer.get("Uploads", [])
                if u["Key"].startswith(prefix)
            )
            if not answer.get("IsTruncated"):
                return found
            kwargs.update(
                KeyMarker=answer["NextKeyMarker"], UploadIdMarker=answer["NextUploadIdMarker"]
            )

    def leases(self) -> dict[str, str]:
        """Writer ID -> LastModified (ISO) of every lease object."""
        return {
            o["Key"][len(WRITERS_PREFIX) :]: o["LastModified"].isoformat()
            for o in self.objects(WRITERS_PREFIX)
        }

    def staged(self, with_parts: bool = True) -> dict[str, Any]:
        """
        What is under ``_loghandler/staging/``: its objects (key, size), its uploads
        (key, and with ``with_parts`` the part numbers and sizes), the writer IDs.
        """
        listed_uploads = self.uploads(STAGING_PREFIX)  # first: see unstaged()
        objects = [(o["Key"], o["Size"]) for o in self.objects(STAGING_PREFIX)]
        uploads = []
        for key, upload_id in listed_uploads:
            entry: dict[str, Any] = {"key": key}
            if with_parts:
                try:
                    answer = self.s3.list_parts(
                        Bucket=self.moto.bucket, Key=key, UploadId=upload_id
                    )
                    entry["parts"] = [(p["PartNumber"], p["Size"]) for p in answer.get("Parts", [])]
                except Exception as e:  # completed or aborted meanwhile
                    entry["parts"] = f"not listed: {e}"
            uploads.append(entry)
        writers = sorted(
            {k[len(STAGING_PREFIX) :].split("/", 1)[0] for k, _ in objects}
            | {u["key"][len(STAGING_PREFIX) :].split("/", 1)[0] for u in uploads}
        )
        return {"objects": objects, "uploads": uploads, "writers": writers}

    def unstaged(self) -> bool:
        """
        Whether nothing is under ``_loghandler/staging/``: no multipart upload, then
        no object, listed in that order.

        The order matters.  Staged data only move forward: from a staging upload
        (which recovery completes) to a staging object (which it merges into its
        key, then deletes) to nothing.  Listing the uploads first, an upload
        completed between the two listings is seen as its object by the second
        one.  Listed the other way round, it is seen by neither (the objects were
        listed before it made its object, the uploads after it ended), and the key
        was read before its merge landed: recovery merges a writer's keys one
        after the other, so the last one (``..._9``) lost all its lines whenever its
        completion fell between the two requests.  The recoverer lists in this
        order too (``Recoverer._list_staged``).
        """
        return not self.uploads(STAGING_PREFIX) and not self.objects(STAGING_PREFIX)

    def wait_unstaged(
        self, since: float, timeout: float, poll_s: float = UNSTAGED_POLL_S
    ) -> Optional[float]:
        """
        Poll every ``poll_s`` seconds until :meth:`unstaged` holds at two polls in a
        row; the seconds from ``since`` to the first of them, or None when it did
        not hold by ``timeout`` seconds from ``since``.

        The second poll is for moto, whose CompleteMultipartUpload is not atomic:
        it removes the upload, then stores the object, so one pair of listings can
        fall between the two and see neither.  By the next poll the object is
        listed, or it was merged and deleted, which happens only once its key's
        write landed.
        """
        first: Optional[float] = None
        while True:
            self.check_open()
            clean = self.unstaged()
            now = time.monotonic()
            if not clean:
                first = None
            elif first is None:
                first = now
            else:
                return first - since
            if first is None and now - since > timeout:
                return None
            self.sleep(poll_s)

    def leftovers(self, dead: set[str]) -> dict[str, Any]:
        """
        What should not be there: objects under ``_loghandler/`` that are not leases,
        the leases of the ``dead`` writer IDs, the live leases, every multipart upload.
        """
        uploads = self.uploads("")  # first: see unstaged()
        objects = self.objects(WORK_PREFIX)
        leases = {
            o["Key"][len(WRITERS_PREFIX) :]
            for o in objects
            if o["Key"].startswith(WRITERS_PREFIX)
        }
        return {
            "not_leases": [
                f"{o['Key']} ({o['Size']} bytes)"
                for o in objects
                if not o["Key"].startswith(WRITERS_PREFIX)
            ],
            "dead_leases": sorted(leases & dead),
            "live_leases": sorted(leases - dead),
            "uploads": [f"{k} {u}" for k, u in uploads],
        }

    def read_chat(self) -> tuple[dict[str, list[bytes]], dict[str, str], int]:
        """
        Every object under ``chat/``, read straight from moto: its lines by key, what is
        wrong with the ones that are not whole gzip members of ``application/gzip``
        ending in a newline, and the bytes of all.
        """
        lines: dict[str, list[bytes]] = {}
        bad: dict[str, str] = {}
        total = 0
        for entry in self.objects("chat/"):
            key = entry["Key"]
            data, key_lines, problem = read_chat_object(self.s3, self.moto.bucket, key)
            total += len(data)
            if problem is not None:
                bad[key] = problem
            if key_lines is not None:
                lines[key] = key_lines
        return lines, bad, total


# -- checking ------------------------------------------------------------------------


def check_bucket(
    harness: CrashHarness,
    load: Load,
    event_at: float,
    must_find: Callable[[Sent], bool],
    must_find_text: str,
    figures: dict[str, Any],
    problems: list[str],
) -> None:
    """
    Read ``chat/`` back and check it against ``load``'s records: valid objects, each
    line in its key, no line twice, no line that was not sent or was refused, every
    record for which ``must_find`` holds found.  Fills ``figures`` (found, lost,
    ages of lost acknowledged lines in seconds before ``event_at``) and appends to
    ``problems``.
    """
    chat, bad, total_bytes = harness.read_chat()
    found: Counter[bytes] = Counter()
    where: dict[bytes, list[str]] = defaultdict(list)
    misplaced: list[str] = []
    for key, key_lines in chat.items():
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
    records = load.records

    def describe(line: bytes) -> str:
        record = records.get(line)
        if record is None:
            return f"{line[:100]!r} (never sent); found {found[line]}x in {where.get(line, [])}"
        return (
            f"content_id {record.content_id} client {record.client_id}: sent"
            f" {event_at - record.sent_at:.2f} s before the event, answered {record.status},"
            f" found {found[line]}x in {where.get(line, [])}"
        )

    duplicates = [line for line, n in found.items() if n > 1]
    unknown = [line for line in found if line not in records]
    refused = [
        line
        for line in found
        if line in records and records[line].status not in (200, 202, NO_ANSWER)
    ]
    acknowledged = [(line, r) for line, r in records.items() if r.acknowledged]
    lost = [(line, r) for line, r in acknowledged if line not in found]
    must = [(line, r) for line, r in records.items() if must_find(r)]
    must_lost = [(line, r) for line, r in must if line not in found]
    lost_ages = sorted(event_at - r.sent_at for _, r in lost)
    figures.update(
        objects=len(chat),
        object_bytes=total_bytes,
        found=sum(found.values()),
        distinct_found=len(found),
        duplicates=len(duplicates),
        unknown=len(unknown),
        found_though_refused=len(refused),
        lost_acknowledged=len(lost),
        lost_200=sum(1 for _, r in lost if r.status == 200),
        lost_202=sum(1 for _, r in lost if r.status == 202),
        must_find=len(must),
        must_find_lost=len(must_lost),
        # The newest lost acknowledged line (the smallest age) and the oldest (the
        # loss window: at most CHECKPOINT_S plus an upload when checkpoints work).
        newest_lost_age_s=round(lost_ages[0], 2) if lost_ages else None,
        oldest_lost_age_s=round(lost_ages[-1], 2) if lost_ages else None,
        lost_by_client=dict(sorted(Counter(r.client_id for _, r in lost).items())),
        found_not_acknowledged=sum(
            1 for line in found if line in records and not records[line].acknowledged
        ),
    )
    if must_lost:
        must_lost.sort(key=lambda item: item[1].sent_at)
        problems.append(
            f"{len(must_lost)} of {len(must)} messages {must_find_text} are LOST"
            f" ({len(lost)} of {len(acknowledged)} acknowledged ones lost in all, the"
            f" oldest sent {figures['oldest_lost_age_s']} s before the event), e.g.:\n"
            + "\n".join(
                "  " + describe(line)
                for line, _ in (
                    must_lost if len(must_lost) <= 10 else must_lost[:5] + must_lost[-5:]
                )
            )
        )
    if duplicates:
        problems.append(
            f"{len(duplicates)} lines stored more than once, e.g.:\n"
            + "\n".join("  " + describe(line) for line in duplicates[:10])
        )
    if unknown:
        problems.append(
            f"{len(unknown)} lines stored that were never sent, e.g.:\n"
            + "\n".join("  " + describe(line) for line in unknown[:10])
        )
    if refused:
        problems.append(
            f"{len(refused)} lines stored though their request got an error answer, e.g.:\n"
            + "\n".join("  " + describe(line) for line in refused[:10])
        )
    if misplaced:
        problems.append(
            f"{len(misplaced)} lines in the wrong key:\n  " + "\n  ".join(misplaced[:10])
        )
    if bad:
        problems.append(
            "objects that are not valid:\n"
            + "\n".join(f"  {k}: {v}" for k, v in sorted(bad.items()))
        )
    not_durable = [
        r for r in records.values() if r.status == 202 and _json(r.body) != NOT_DURABLE
    ]
    if not_durable:
        problems.append(
            f"{len(not_durable)} 202 answers whose body is not {json.dumps(NOT_DURABLE)},"
            f" e.g. {not_durable[0].body[:200]!r}"
        )


def _json(data: bytes) -> Any:
    """``json.loads(data)``, or None when it is not JSON."""
    try:
        return json.loads(data)
    except ValueError:
        return None


def check_leftovers(
    harness: CrashHarness,
    dead: set[str],
    live: int,
    wait: float,
    figures: dict[str, Any],
    problems: list[str],
) -> None:
    """
    Within ``wait`` seconds, nothing under ``_loghandler/`` but the leases of at most
    ``live`` live writers (none of the ``dead`` ones), and no multipart upload.
    """
    deadline = time.monotonic() + wait
    while True:
        left = harness.leftovers(dead)
        clean = (
            not left["not_leases"]
            and not left["dead_leases"]
            and not left["uploads"]
            and len(left["live_leases"]) <= live
        )
        if clean or time.monotonic() > deadline:
            break
        harness.sleep(0.25)
    figures["leftovers_while_live"] = left
    if left["not_leases"]:
        problems.append(
            "objects left under _loghandler/ besides leases:\n  "
            + "\n  ".join(left["not_leases"][:20])
        )
    if left["dead_leases"]:
        problems.append(f"the dead writer's lease is still there: {left['dead_leases']}")
    if len(left["live_leases"]) > live:
        problems.append(f"more leases than live writers ({live}): {left['live_leases']}")
    if left["uploads"]:
        problems.append(
            "multipart uploads left:\n  " + "\n  ".join(left["uploads"][:20])
        )


def check_after_clean_stop(
    harness: CrashHarness, figures: dict[str, Any], problems: list[str]
) -> None:
    """After every daemon stopped with SIGTERM: nothing under ``_loghandler/``, no upload."""
    left = harness.leftovers(set())
    figures["leftovers_after_stop"] = left
    everything = left["not_leases"] + [WRITERS_PREFIX + w for w in left["live_leases"]]
    if everything or left["uploads"]:
        problems.append(
            "after a clean stop of every daemon, left under _loghandler/:\n  "
            + "\n  ".join(everything[:20] + left["uploads"][:20])
        )


def crash_settings(
    *,
    checkpoint_s: float = CHECKPOINT_S,
    lease_s: float = LEASE_S,
    recovery_interval_s: float = RECOVERY_INTERVAL_S,
    **more: str,
) -> dict[str, str]:
    """The daemon settings of a crash run (nothing rotates: ``QUEUE_TIMEOUT_MIN=600``)."""
    return {
        "QUEUE_TIMEOUT_MIN": "600",
        "MAX_CLIENT_ID": str(BIG_CLIENT),
        "CHECKPOINT_S": _g(checkpoint_s),
        "LEASE_S": _g(lease_s),
        "RECOVERY_INTERVAL_S": _g(recovery_interval_s),
        "SHUTDOWN_TIMEOUT_S": "10",
        **more,
    }


# -- scenarios -----------------------------------------------------------------------


def sigkill_scenario(
    harness: CrashHarness,
    *,
    label: str = "sigkill",
    ack: str = "accepted",
    seconds: float = 8.0,
    recoverers: int = 1,
    checkpoint_s: float = CHECKPOINT_S,
    lease_s: float = LEASE_S,
    recovery_interval_s: float = RECOVERY_INTERVAL_S,
    durable_timeout_s: float = 5.0,
    unstaged_timeout: Optional[float] = None,
    load_options: Optional[dict[str, Any]] = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[str]]:
    """
    One daemon under load for ``seconds``, SIGKILL, ``recoverers`` new instances
    started at once; wait until nothing is staged; read back and check.

    With ``ack="accepted"`` every message answered 200 more than ``checkpoint_s`` +
    :data:`UPLOAD_MARGIN_S` before the kill must be found; with ``ack="durable"``
    every message answered 200.  The kill-to-merged time must be within 3 x
    ``lease_s`` + ``recovery_interval_s`` + :data:`RECOVERY_MARGIN_S`.

    :returns: the figures and the problems found (empty: all held).
    """
    settings = crash_settings(
        checkpoint_s=checkpoint_s,
        lease_s=lease_s,
        recovery_interval_s=recovery_interval_s,
        ACK=ack,
        DURABLE_TIMEOUT_S=_g(durable_timeout_s),
    )
    bound = 3 * lease_s + recovery_interval_s + RECOVERY_MARGIN_S
    if unstaged_timeout is None:
        unstaged_timeout = bound + 20.0
    figures: dict[str, Any] = {
        "test": label,
        "ack": ack,
        "settings": settings,
        "recoverers": recoverers,
        "kill_to_merged_bound_s": bound,
    }
    problems: list[str] = []
    (victim,) = harness.start("victim", **settings)
    load = harness.load(victim, **(load_options or {}))
    harness.sleep(seconds)

    leases_before = harness.leases()
    staged_at_kill = harness.staged()
    killed_at, code = harness.sigkill(victim)
    load.stop()
    figures["victim_exit_status"] = code
    if code != -signal.SIGKILL:
        problems.append(f"HARNESS: the victim did not die of SIGKILL: exit status {code}")
    if not load.join():
        problems.append("HARNESS: a load thread did not stop")
    figures.update(load.figures(until=killed_at))
    figures["leases_before_kill"] = leases_before
    figures["staged_at_kill"] = {
        "objects": len(staged_at_kill["objects"]),
        "uploads": len(staged_at_kill["uploads"]),
        "writers": staged_at_kill["writers"],
        "parts": {u["key"]: u.get("parts") for u in staged_at_kill["uploads"]},
    }
    log(
        f"CRASH {label}: killed after {killed_at - load.started:.1f} s of load;"
        f" {load.figures(killed_at)}"
    )
    if figures["acknowledged_200"] + figures["acknowledged_202"] == 0:
        problems.append("HARNESS: no message was acknowledged before the kill")
    if len(leases_before) != 1:
        problems.append(
            f"one lease under {WRITERS_PREFIX} expected while the victim ran, found"
            f" {sorted(leases_before)}"
        )
    if not staged_at_kill["uploads"] and not staged_at_kill["objects"]:
        problems.append(
            f"nothing was staged under {STAGING_PREFIX} at the kill, after {seconds:g} s of"
            f" load with CHECKPOINT_S={checkpoint_s:g}: no checkpoint was uploaded"
        )
    dead = set(leases_before) | set(staged_at_kill["writers"])

    restarted = harness.start("recoverer", count=recoverers, **settings)
    figures["kill_to_ready_s"] = round(time.monotonic() - killed_at, 2)
    merged = harness.wait_unstaged(killed_at, unstaged_timeout)
    figures["kill_to_merged_s"] = None if merged is None else round(merged, 2)
    if merged is None:
        left = harness.staged(with_parts=False)
        problems.append(
            f"still staged {unstaged_timeout:g} s after the kill (bound {bound:g} s):"
            f" {len(left['objects'])} objects, {len(left['uploads'])} uploads of writers"
            f" {left['writers']}"
        )
    elif merged > bound:
        problems.append(
            f"the dead writer's data took {merged:.1f} s from the kill to be merged, over"
            f" 3 x LEASE_S + RECOVERY_INTERVAL_S + {RECOVERY_MARGIN_S:g} s = {bound:g} s"
        )

    window = checkpoint_s + UPLOAD_MARGIN_S
    durable = ack == "durable"

    def must_find(r: Sent) -> bool:
        """Whether the bucket must hold ``r``'s line: every 200 with ACK=durable, else a
        200 sent more than the checkpoint window before the kill."""
        return r.status == 200 and (durable or killed_at - r.sent_at > window)

    if durable:
        must_text = "answered 200 (ACK=durable)"
    else:
        must_text = f"answered 200 and sent more than {window:g} s before the kill"
        if figures["acknowledged_202"]:
            problems.append(f"{figures['acknowledged_202']} answers 202 with ACK=accepted")
    check_bucket(harness, load, killed_at, must_find, must_text, figures, problems)
    check_leftovers(harness, dead, len(restarted), recovery_interval_s + 3.0, figures, problems)
    problems.extend(harness.stop_all(15.0))
    check_after_clean_stop(harness, figures, problems)
    figures["daemons"] = daemon_figures(harness)
    figures["problems"] = len(problems)
    return figures, problems


def sigterm_stalled_scenario(
    harness: CrashHarness,
    proxy: FaultProxy,
    *,
    label: str = "sigterm_stalled",
    seconds: float = 6.0,
    shutdown_timeout_s: float = 4.0,
    stall_past_deadline_s: float = 3.0,
    load_options: Optional[dict[str, Any]] = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[str]]:
    """
    One daemon through ``proxy`` under load for ``seconds``; the load stops, every
    storage request stalls (held by the proxy), SIGTERM at once; the daemon must exit
    by ``shutdown_timeout_s`` (+3 s); the stall lasts ``stall_past_deadline_s`` past
    the deadline; then the proxy forwards again (the held requests go on) and a new
    instance starts.  Once nothing is staged, every message answered 200 is found,
    none twice.

    :returns: the figures and the problems found.
    """
    settings = crash_settings(SHUTDOWN_TIMEOUT_S=_g(shutdown_timeout_s))
    figures: dict[str, Any] = {"test": label, "ack": "accepted", "settings": settings}
    problems: list[str] = []
    (victim,) = harness.start("victim", **settings)
    load = harness.load(victim, **(load_options or {}))
    harness.sleep(seconds)
    load.stop()
    if not load.join():
        problems.append("HARNESS: a load thread did not stop")
    stall_from = time.monotonic()
    proxy.set_mode(FaultRule(fault="stall"))  # until released
    leases_before = harness.leases()
    victim.sigterm()
    figures.update(load.figures())
    log(f"CRASH {label}: SIGTERM with storage stalled; {load.figures()}")
    exit_seconds: Optional[float] = None
    try:
        # Lines not checkpointed when storage stalled are not stored by the deadline
        # (as far as the victim can tell: a stalled upload may land once released):
        # then its exit status is 1 and its log says so.
        (exit_seconds,) = wait_exits([victim], shutdown_timeout_s + 15.0, lost_ok=True)
    except AssertionError as e:
        problems.append(f"the victim did not stop cleanly: {e}")
    figures["victim_exit_status"] = victim.process.returncode
    figures["sigterm_to_exit_s"] = None if exit_seconds is None else round(exit_seconds, 2)
    if exit_seconds is not None and exit_seconds > shutdown_timeout_s + 3.0:
        problems.append(
            f"SIGTERM to exit took {exit_seconds:.1f} s, over SHUTDOWN_TIMEOUT_S="
            f"{shutdown_timeout_s:g} + 3 s"
        )
    assert victim.sigterm_at is not None
    harness.sleep(victim.sigterm_at + shutdown_timeout_s + stall_past_deadline_s - time.monotonic())
    proxy.clear_mode()
    released = proxy.release()
    harness.sleep(0.3)
    released += proxy.release()  # one that picked the rule just as the first release came
    back_at = time.monotonic()
    figures["stall_s"] = round(back_at - stall_from, 2)
    figures["stalled_requests_released"] = released
    figures["staged_after_stop"] = {
        k: (len(v) if k != "writers" else v) for k, v in harness.staged(with_parts=False).items()
    }
    dead = set(leases_before) | set(figures["staged_after_stop"]["writers"])

    restarted = harness.start("recoverer", **settings)
    bound = 3 * LEASE_S + RECOVERY_INTERVAL_S + RECOVERY_MARGIN_S
    merged = harness.wait_unstaged(back_at, bound + 20.0)
    figures["back_to_merged_s"] = None if merged is None else round(merged, 2)
    if merged is None:
        left = harness.staged(with_parts=False)
        problems.append(
            f"still staged {bound + 20:g} s after storage came back: {len(left['objects'])}"
            f" objects, {len(left['uploads'])} uploads of writers {left['writers']}"
        )
    check_bucket(
        harness,
        load,
        victim.sigterm_at,
        lambda r: r.status == 200,
        "answered 200 before SIGTERM",
        figures,
        problems,
    )
    check_leftovers(harness, dead, len(restarted), RECOVERY_INTERVAL_S + 3.0, figures, problems)
    problems.extend(harness.stop_all(15.0))
    check_after_clean_stop(harness, figures, problems)
    figures["daemons"] = daemon_figures(harness)
    figures["problems"] = len(problems)
    return figures, problems


def clean_stop_scenario(
    harness: CrashHarness,
    *,
    seconds: float = 3.0,
    load_options: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, Any], list[str]]:
    """
    The harness's own control: the same load for ``seconds``, then SIGTERM (a clean
    stop, which completes every object): every message answered 200 is found once and
    nothing is left under ``_loghandler/``.  It needs none of the crash features, so
    it shows that sending, stopping and reading back work.

    :returns: the figures and the problems found.
    """
    settings = crash_settings()
    figures: dict[str, Any] = {"test": "control_clean_stop", "settings": settings}
    problems: list[str] = []
    (daemon,) = harness.start("control", **settings)
    load = harness.load(daemon, **(load_options or {}))
    harness.sleep(seconds)
    load.stop()
    if not load.join():
        problems.append("HARNESS: a load thread did not stop")
    figures.update(load.figures())
    stopped_at = time.monotonic()
    problems.extend(harness.stop_all(15.0))
    figures["sigterm_to_exit_s"] = round(time.monotonic() - stopped_at, 2)
    check_bucket(
        harness, load, stopped_at, lambda r: r.status == 200, "answered 200", figures, problems
    )
    if figures["acknowledged_200"] < 0.9 * figures["tried"]:
        problems.append(
            f"HARNESS: only {figures['acknowledged_200']} of {figures['tried']} answered 200"
        )
    check_after_clean_stop(harness, figures, problems)
    figures["problems"] = len(problems)
    return figures, problems


def daemon_figures(harness: CrashHarness) -> dict[str, Any]:
    """
    Per daemon, from its log: merges into ``chat/`` keys, and its recovery lines
    (``recovery: ...``, shown as logged), to see who recovered what.
    """
    result: dict[str, Any] = {}
    for daemon in harness.daemons:
        log = daemon.log()
        result[daemon.name] = {
            "merged": len(re.findall(r": merged \S+ \(\d+ bytes\) by", log)),
            "recovery": [
                m.group(1)[:300] for m in re.finditer(r"\] (recovery: .*)$", log, re.M)
            ][:10],
        }
    return result


def summary(figures: dict[str, Any]) -> str:
    """One line of the figures that matter, for the test output and the bench."""
    keys = (
        "ack",
        "tried",
        "sent",
        "acknowledged_200",
        "acknowledged_202",
        "no_answer",
        "found",
        "duplicates",
        "lost_acknowledged",
        "must_find",
        "must_find_lost",
        "newest_lost_age_s",
        "oldest_lost_age_s",
        "requests_per_s",
        "latency_200",
        "kill_to_merged_s",
        "back_to_merged_s",
        "sigterm_to_exit_s",
        "staged_at_kill",
        "problems",
    )
    shown = {k: figures[k] for k in keys if k in figures}
    if "staged_at_kill" in shown:
        staged = shown["staged_at_kill"]
        shown["staged_at_kill"] = {k: staged[k] for k in ("objects", "uploads", "writers")}
    if "daemons" in figures:
        shown["merged_by"] = {name: d["merged"] for name, d in figures["daemons"].items()}
    return f"CRASH SUMMARY {figures.get('test')}: " + json.dumps(shown, sort_keys=True)


# -- the tests -----------------------------------------------------------------------


class CrashTests(TestCase):
    """
    Daemons killed under load against moto; after recovery by a new instance, every
    line that must survive is stored exactly once (see the module's docstring).
    """

    timeout = TEST_TIMEOUT

    def setUp(self) -> None:
        self.moto = shared_moto()
        self.moto.reset()
        self.workdir = os.path.abspath(".")
        self.proxy: Optional[FaultProxy] = None

    def harness(self, through_proxy: bool = False) -> CrashHarness:
        """A harness on the test's bucket (through a fresh fault proxy if asked)."""
        if through_proxy:
            self.proxy = FaultProxy(self.moto.endpoint_url, region=self.moto.region, max_stall=60.0)
            self.proxy.start()
            self.addCleanup(self.proxy.stop)
        harness = self.harness_ = CrashHarness(self.moto, self.workdir, self.proxy)
        self.addCleanup(harness.close)
        return harness

    def run_scenario(
        self, body: Callable[[], tuple[dict[str, Any], list[str]]]
    ) -> "Deferred[None]":
        """
        Run the blocking scenario in a thread (so that trial's ``timeout`` can end
        it), record its figures, and fail with every problem at once.
        """

        def run() -> None:
            started = time.monotonic()
            figures, problems = body()
            figures["wall_s"] = round(time.monotonic() - started, 1)
            print(summary(figures))
            self.report(figures)
            if problems:
                self.fail(
                    f"{len(problems)} problems:\n\n"
                    + "\n\n".join(problems)
                    + "\n\n"
                    + summary(figures)
                    + "\n(all figures in crash-report.json)\n\ndaemon logs (warnings, errors,"
                    " flush):\n"
                    + "\n".join(d.relevant_log(30) for d in self.harness_.daemons)
                )

        return deferToThread(run)

    def report(self, figures: dict[str, Any]) -> None:
        """Append ``figures`` to ``crash-report.json`` in trial's working directory."""
        path = os.path.join(self.workdir, "crash-report.json")
        try:
            with open(path) as f:
                runs = json.load(f)
        except (OSError, ValueError):
            runs = []
        runs.append(figures)
        with open(path, "w") as f:
            json.dump(runs, f, indent=2, sort_keys=True, default=str)

    def test_control_clean_stop(self) -> "Deferred[None]":
        """
        The harness's control, which needs no crash feature: 3 s of the same load,
        SIGTERM; every message answered 200 is read back once, every object valid,
        nothing left under ``_loghandler/``.
        """
        harness = self.harness()
        return self.run_scenario(lambda: clean_stop_scenario(harness))

    def test_sigkill_under_load(self) -> "Deferred[None]":
        """
        SIGKILL after 8 s of ~300 messages/s over 10 clients plus 8 KB texts at
        1.2 MB/s, then a new instance: every message answered 200 more than
        ``CHECKPOINT_S`` + 1 s before the kill is stored once, every object is valid
        gzip, nothing is stored twice or unsent, all is merged within 3 x ``LEASE_S``
        + ``RECOVERY_INTERVAL_S`` (+5 s) of the kill, and nothing is left but live
        leases.
        """
        harness = self.harness()
        return self.run_scenario(lambda: sigkill_scenario(harness, label="sigkill_under_load"))

    def test_durable_sigkill(self) -> "Deferred[None]":
        """
        As :meth:`test_sigkill_under_load` with ``ACK=durable``: every message
        answered 200 is stored once; 202s (``{"ok": true, "durable": false}``) are
        allowed.
        """
        harness = self.harness()
        return self.run_scenario(
            lambda: sigkill_scenario(
                harness, label="durable_sigkill", ack="durable", load_options={"connections": 8}
            )
        )

    def test_two_recoverers(self) -> "Deferred[None]":
        """
        After the kill two instances start at once and both find the dead writer's
        staged data (through the fault proxy, which enforces ``If-Match`` on
        CompleteMultipartUpload): every line is stored once.
        """
        harness = self.harness(through_proxy=True)
        return self.run_scenario(
            lambda: sigkill_scenario(harness, label="two_recoverers", recoverers=2)
        )

    def test_sigterm_storage_stalled_past_deadline(self) -> "Deferred[None]":
        """
        SIGTERM while every storage request stalls, past ``SHUTDOWN_TIMEOUT_S``; the
        daemon exits by its deadline; storage comes back and a new instance starts:
        every message answered 200 is stored, none twice, nothing is left.
        """
        harness = self.harness(through_proxy=True)
        assert self.proxy is not None
        proxy = self.proxy
        return self.run_scenario(lambda: sigterm_stalled_scenario(harness, proxy))
