"""
What many writers (pods, workers) of one key cost per rotation window: storage
requests by operation, bytes copied and 412/409 answers, for W writers per key.

Each window, every writer's stream (the real :class:`ObjectStream` over the real
:class:`S3ObjectWriter` of its own :class:`S3ObjectStore`, writer ID and retry
layer) takes its lines, then completes as at rotation: its staging upload is
completed and its data are merged into the key, by whatever protocol the code
implements.  All writers share one in-memory S3 (:class:`MemoryStore`, which
enforces S3's conditions) behind a client that adds a simulated latency on a
``task.Clock``: a request lands ``latency/2`` after it is sent and is answered
``latency/2`` later; a request carrying or copying bytes takes ``--part-ms`` more
per part size of bytes (so a merge that copies a big base takes longer, and so
overlaps more with the others).  No network: the figures are exact counts of the
code's requests, reproducible by ``--seed``, not timings of this machine.

The key's object grows window by window (the base every merge copies), so each
figure is given per window; the last window is the largest.  At the end every line
is checked to be stored once under ``chat/``, every object whole gzip members, and
the staging area empty.

Sizes are scaled down (the in-memory store copies real bytes): a part is
``--part-kib`` (S3: 5 MiB) and each writer's stream holds about ``--staged-parts``
parts of gzip per window, so the counts are those of ``part size x that`` per pod
and window at full scale; bytes scale with the part size.

Rotation times: ``--spread-s 0`` (default) completes every writer's stream at the
same instant, as when every pod stops at once (a deploy) or its windows line up;
the registry draws each stream's lifetime in ``[0.9, 1] x QUEUE_TIMEOUT_MIN``, so
``--spread-s 360`` is the spread of pods started together with the default hour.

Usage::

    .venv/bin/python bench/merge_scaling.py [--writers 1,2,8,32] [--windows 4]
        [--latency-ms 20] [--part-ms 50] [--part-kib 64] [--staged-parts 1.5]
        [--spread-s 0] [--seed 1] [--json bench/merge_scaling.json]

Prints one row per writer count (the last window, and the mean over the windows)
and writes every window's counts to the JSON file.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import random
import sys
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from loghandler.backoff import Backoff  # noqa: E402
from loghandler.budget import MemoryBudget  # noqa: E402
from loghandler.interfaces import StorageError  # noqa: E402
from loghandler.message import Message  # noqa: E402
from loghandler.retry import RetryLayer  # noqa: E402
from loghandler.storage.memory import MemoryStore  # noqa: E402
from loghandler.storage.s3.writer import S3ObjectStore  # noqa: E402
from loghandler.stream import ObjectStream  # noqa: E402

KEY_TIMESTAMP_MS = 1_600_000_000_000
CLIENT_ID = 3


class Counters:
    """What the writers asked of storage in one window."""

    def __init__(self) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self.conflicts: collections.Counter[str] = collections.Counter()
        self.copied = 0  # UploadPartCopy source bytes
        self.got = 0  # GetObject bytes (a merge re-uploads them)
        self.uploaded = 0  # UploadPart and PutObject bodies

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "requests": sum(self.requests.values()),
            "by_operation": dict(sorted(self.requests.items())),
            "conflicts_412_409": sum(self.conflicts.values()),
            "conflicts_by_operation": dict(sorted(self.conflicts.items())),
            "bytes_copied": self.copied + self.got,
            "upload_part_copy_bytes": self.copied,
            "get_bytes": self.got,
            "uploaded_bytes": self.uploaded,
        }


class LatencyClient:
    """
    An ``IS3Client`` over a shared :class:`MemoryStore`: every call lands half its
    latency after it is sent and is answered the other half later, on ``clock``;
    every call is counted in :attr:`counters`.
    """

    name = "memory+latency"

    def __init__(
        self, s3: MemoryStore, clock: Clock, latency_s: float, part_s: float, part_size: int
    ) -> None:
        self._s3 = s3
        self._clock = clock
        self._latency = latency_s
        self._per_byte = part_s / part_size
        self.counters = Counters()

    def _send(self, operation: str, size: int, call: Callable[[], "Deferred[Any]"]) -> "Deferred[Any]":
        self.counters.requests[operation] += 1
        answer: Deferred[Any] = Deferred()
        half = self._latency / 2 + size * self._per_byte

        def land() -> None:
            d = call()
            d.addBoth(lambda result: self._clock.callLater(self._latency / 2, deliver, result))

        def deliver(result: Any) -> None:
            if isinstance(result, Failure) and isinstance(result.value, StorageError):
                if result.value.status in (409, 412):
                    self.counters.conflicts[operation] += 1
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                if operation == "GetObject":
                    self.counters.got += len(result)
                answer.callback(result)

        self._clock.callLater(half, land)
        return answer

    def _size(self, key: str, byte_range: Any) -> int:
        if byte_range is not None:
            return byte_range[1] - byte_range[0]
        obj = self._s3.objects.get(key)
        return len(obj.body) if obj is not None else 0

    def head(self, key: str) -> "Deferred[Any]":
        return self._send("HeadObject", 0, lambda: self._s3.head(key))

    def get(self, key: str, if_match: Any = None, byte_range: Any = None) -> "Deferred[Any]":
        size = self._size(key, byte_range)
        return self._send("GetObject", size, lambda: self._s3.get(key, if_match, byte_range))

    def put(self, key: str, body: bytes, **kwargs: Any) -> "Deferred[Any]":
        self.counters.uploaded += len(body)
        return self._send("PutObject", len(body), lambda: self._s3.put(key, body, **kwargs))

    def create_upload(self, key: str, writes: Any = ()) -> "Deferred[Any]":
        return self._send(
            "CreateMultipartUpload", 0, lambda: self._s3.create_upload(key, writes)
        )

    def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> "Deferred[Any]":
        self.counters.uploaded += len(body)
        return self._send(
            "UploadPart", len(body), lambda: self._s3.upload_part(key, upload_id, number, body)
        )

    def upload_part_copy(
        self, key: str, upload_id: str, number: int, source: str, if_match: str, byte_range: Any = None
    ) -> "Deferred[Any]":
        size = self._size(source, byte_range)
        self.counters.copied += size
        return self._send(
            "UploadPartCopy",
            size,
            lambda: self._s3.upload_part_copy(key, upload_id, number, source, if_match, byte_range),
        )

    def complete_upload(self, key: str, upload_id: str, parts: Any, **kwargs: Any) -> "Deferred[Any]":
        return self._send(
            "CompleteMultipartUpload",
            0,
            lambda: self._s3.complete_upload(key, upload_id, parts, **kwargs),
        )

    def abort_upload(self, key: str, upload_id: str) -> "Deferred[Any]":
        return self._send("AbortMultipartUpload", 0, lambda: self._s3.abort_upload(key, upload_id))

    def delete(self, key: str) -> "Deferred[Any]":
        return self._send("DeleteObject", 0, lambda: self._s3.delete(key))

    def list_uploads(self, prefix: str) -> "Deferred[Any]":
        return self._send("ListMultipartUploads", 0, lambda: self._s3.list_uploads(prefix))

    def list_parts(self, key: str, upload_id: str) -> "Deferred[Any]":
        return self._send("ListParts", 0, lambda: self._s3.list_parts(key, upload_id))

    def list_objects(self, prefix: str) -> "Deferred[Any]":
        return self._send("ListObjectsV2", 0, lambda: self._s3.list_objects(prefix))

    def versioning(self) -> "Deferred[Any]":
        return self._send("GetBucketVersioning", 0, self._s3.versioning)

    def check(self) -> "Deferred[Any]":
        return self._send("HeadBucket", 0, self._s3.check)

    def close(self) -> "Deferred[Any]":
        return self._s3.close()


def lines_for(writer: int, window: int, count: int, rng: random.Random) -> list[bytes]:
    """``count`` unique NDJSON lines (about 100 bytes of hex text: compress ~2x)."""
    out = []
    for i in range(count):
        content_id = (window * 1000 + writer) * 100_000 + i + 1
        text = "%0100x" % rng.getrandbits(400)
        out.append(Message(text, content_id, CLIENT_ID, KEY_TIMESTAMP_MS).to_line())
    return out


def run_until(clock: Clock, done: Callable[[], bool], limit_s: float) -> None:
    """Jump from timer to timer until ``done()``."""
    end = clock.seconds() + limit_s
    while not done():
        if not clock.calls:
            raise AssertionError("nothing scheduled and not done")
        step = max(0.0, clock.calls[0].getTime() - clock.seconds())
        if clock.seconds() + step > end:
            raise AssertionError("not done within %g s" % limit_s)
        clock.advance(step)


def simulate(
    writers: int,
    windows: int,
    latency_s: float,
    part_s: float,
    part_size: int,
    lines_per_window: int,
    spread_s: float,
    seed: int,
) -> dict[str, Any]:
    """``writers`` writers of one key through ``windows`` rotation windows."""
    rng = random.Random(seed)
    clock = Clock()
    clock.advance(1_600_000_000)
    s3 = MemoryStore(min_part_size=part_size, now=clock.seconds)
    client = LatencyClient(s3, clock, latency_s, part_s, part_size)
    budget = MemoryBudget(1 << 40)
    stores = []
    for w in range(writers):
        retry = RetryLayer(clock, backoff=Backoff(0.2, 30.0, uniform=rng.uniform))
        store = S3ObjectStore(
            client, clock, budget, part_size=part_size, writer_id="w%03d" % w, retry=retry
        )
        store.merger.conflict_backoff = Backoff(
            store.merger.conflict_backoff.base, store.merger.conflict_backoff.cap, uniform=rng.uniform
        )
        stores.append(store)
    key = "chat/2020-09-13/content_logs_2020-09-13_%d" % CLIENT_ID
    expected: list[bytes] = []
    results = []
    for window in range(windows):
        client.counters = Counters()
        started = clock.seconds()
        streams = []
        for w, store in enumerate(stores):
            stream = ObjectStream(store.open(key), clock, part_size, 2, budget)
            for line in lines_for(w, window, lines_per_window, rng):
                stream.write(line)
                expected.append(line)
            streams.append(stream)
        run_until(clock, lambda: not clock.calls, 3600)  # parts of the window land
        closed: list[Deferred[None]] = []
        for stream in streams:
            delay = rng.uniform(0, spread_s)
            clock.callLater(delay, lambda s=stream: closed.append(s.close()))
        run_until(clock, lambda: len(closed) == writers and all(d.called for d in closed), 36_000)
        base = sum(len(o.body) for k, o in s3.objects.items() if k.startswith("chat/"))
        row = client.counters.as_dict()
        row.update(window=window + 1, seconds=clock.seconds() - started, key_bytes_after=base)
        results.append(row)
    run_until(clock, lambda: not clock.calls, 3600)
    stored = []
    for k, obj in s3.objects.items():
        if k.startswith("chat/"):
            stored.extend(gzip.decompress(obj.body).splitlines(keepends=True))
    counts = collections.Counter(stored)
    twice = sum(1 for n in counts.values() if n > 1)
    missing = len(set(expected) - set(counts))
    left = sorted(k for k in s3.objects if k.startswith("_loghandler/staging/"))
    assert not twice and not missing and set(counts) <= set(expected), (twice, missing)
    assert not left and not s3.uploads, (left[:3], list(s3.uploads.values())[:3])
    return {"writers": writers, "windows": results, "lines": len(expected)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", default="1,2,8,32")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--part-ms", type=float, default=50.0)
    parser.add_argument("--part-kib", type=int, default=64)
    parser.add_argument("--staged-parts", type=float, default=1.5)
    parser.add_argument("--spread-s", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=os.path.join(HERE, "merge_scaling.json"))
    args = parser.parse_args()
    part_size = args.part_kib * 1024
    # A line of 100 hex digits and its JSON is about 170 bytes, about 64 gzipped.
    lines_per_window = max(1, int(args.staged_parts * part_size / 64))
    runs = []
    print(
        f"part {args.part_kib} KiB, ~{args.staged_parts:g} parts per writer and window,"
        f" latency {args.latency_ms:g} ms, +{args.part_ms:g} ms per part of bytes,"
        f" spread {args.spread_s:g} s, {args.windows} windows, seed {args.seed}"
    )
    header = (
        f"{'W':>3} {'req/win':>8} {'req/win/W':>9} {'412+409':>8} {'copied MiB/win':>14}"
        f" {'copied/base':>11} {'last win: req':>13} {'copied MiB':>10} {'s':>6}  CPU"
    )
    print(header)
    for writers in [int(w) for w in args.writers.split(",")]:
        cpu = time.process_time()
        run = simulate(
            writers,
            args.windows,
            args.latency_ms / 1000,
            args.part_ms / 1000,
            part_size,
            lines_per_window,
            args.spread_s,
            args.seed,
        )
        run["cpu_s"] = time.process_time() - cpu
        runs.append(run)
        wins = run["windows"]
        n = len(wins)
        req = sum(w["requests"] for w in wins) / n
        conflicts = sum(w["conflicts_412_409"] for w in wins) / n
        copied = sum(w["bytes_copied"] for w in wins) / n
        # Bytes copied per byte the key held before the window (after window 1).
        ratios = [
            wins[i]["bytes_copied"] / wins[i - 1]["key_bytes_after"] for i in range(1, n)
        ]
        last = wins[-1]
        print(
            f"{writers:>3} {req:>8.1f} {req / writers:>9.2f} {conflicts:>8.1f}"
            f" {copied / 2**20:>14.2f} {sum(ratios) / max(1, len(ratios)):>11.2f}"
            f" {last['requests']:>13} {last['bytes_copied'] / 2**20:>10.2f}"
            f" {last['seconds']:>6.1f}  {run['cpu_s']:.0f} s"
        )
    with open(args.json, "w") as f:
        json.dump({"settings": vars(args), "runs": runs}, f, indent=1)
    print("written", args.json)


if __name__ == "__main__":
    main()
