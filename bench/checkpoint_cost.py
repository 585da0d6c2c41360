"""
What checkpoints cost per open stream per day: UploadPart requests and bytes uploaded,
against the bytes the object finally holds, for a choice of ``CHECKPOINT_S``.

One stream's day is simulated on a ``task.Clock`` through the real registry, stream,
gzip framing and S3 writer, over the in-memory S3 (:class:`MemoryStore`), which
counts every call; no network, so the figures are exact counts, not timings.  The
baseline in the same run is ``CHECKPOINT_S=0`` (no checkpoints).

Usage::

    .venv/bin/python bench/checkpoint_cost.py [--checkpoint-s 10] [--rates 3,30,300]
        [--hours 24] [--text-bytes 60] [--queue-timeout-min 60]

``--rates``: messages per second of the stream (one client, one key); each message's
text is ``--text-bytes`` of words drawn from a small vocabulary (log-like, compresses
about 4-6x).  ``--hours`` shorter than 24 is scaled up to a day.  Streams rotate
every ``--queue-timeout-min`` as the daemon's do (each rotation starts a new staging
upload, so a quiet stream's checkpoints stay small).  Bytes uploaded count every
UploadPart and PutObject body (checkpoints, parts, merges).  Prints one line per rate
and writes ``bench/checkpoint_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Callable, Optional, Union

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.task import Clock  # noqa: E402

from loghandler.budget import MemoryBudget  # noqa: E402
from loghandler.config import S3_MIN_PART_SIZE  # noqa: E402
from loghandler.message import Message  # noqa: E402
from loghandler.registry import StreamRegistry, StreamSettings  # noqa: E402
from loghandler.retry import RetryLayer  # noqa: E402
from loghandler.storage.memory import MemoryStore  # noqa: E402
from loghandler.storage.s3.writer import S3ObjectStore  # noqa: E402

WORDS = (
    "user login logout session error warning info debug request response timeout"
    " connected disconnected payment order item cart checkout failed succeeded retry"
    " cache miss hit database query slow fast the a of to in for on with"
).split()
DAY_S = 86_400


def feed(
    registry: StreamRegistry,
    clock: Clock,
    rate: Union[float, Callable[[float], float]],
    seconds: int,
    text_bytes: int,
    lines: Optional[list[bytes]] = None,
) -> tuple[int, int]:
    """
    ``rate`` messages/s of one key for ``seconds`` (a number, or a function of the
    second since the start), each ``text_bytes`` of words, into ``registry``, time
    passing on ``clock`` in steps of 0.1 s; each line is appended to ``lines``.

    :returns: the messages and their NDJSON bytes.
    """
    rng = random.Random(7)
    content_id = 0
    owed = 0.0
    raw = 0
    for tick in range(seconds * 10):
        owed += (rate(tick / 10) if callable(rate) else rate) / 10.0
        while owed >= 1:
            owed -= 1
            content_id += 1
            words = []
            while sum(len(w) + 1 for w in words) < text_bytes:
                words.append(rng.choice(WORDS))
            # One key for the whole day: the timestamp only chooses the key.
            message = Message(" ".join(words), content_id, 3, 1_600_000_000_000)
            registry.accept(message)
            line = message.to_line()
            raw += len(line)
            if lines is not None:
                lines.append(line)
        clock.advance(0.1)
    return content_id, raw


def simulate(
    rate: float, checkpoint_s: float, seconds: int, text_bytes: int, lifetime_s: float
) -> dict[str, float]:
    """One stream at ``rate`` messages/s for ``seconds``; the calls and bytes it made."""
    clock = Clock()
    clock.advance(1_600_000_000)
    s3 = MemoryStore(now=clock.seconds)
    counted = {"UploadPart": 0, "PutObject": 0, "bytes": 0}
    upload_part, put = s3.upload_part, s3.put

    def counting_part(key: str, upload_id: str, number: int, body: bytes):  # type: ignore[no-untyped-def]
        counted["UploadPart"] += 1
        counted["bytes"] += len(body)
        return upload_part(key, upload_id, number, body)

    def counting_put(key: str, body: bytes, *args, **kwargs):  # type: ignore[no-untyped-def]
        counted["PutObject"] += 1
        counted["bytes"] += len(body)
        return put(key, body, *args, **kwargs)

    s3.upload_part = counting_part  # type: ignore[method-assign]
    s3.put = counting_put  # type: ignore[method-assign]
    budget = MemoryBudget(1 << 34)
    store = S3ObjectStore(s3, clock, budget, retry=RetryLayer(clock))
    registry = StreamRegistry(
        store,
        clock,
        StreamSettings(
            part_size=S3_MIN_PART_SIZE, lifetime_s=lifetime_s, checkpoint_s=checkpoint_s
        ),
        budget,
        uniform=lambda a, b: b,
    )
    registry.start_checkpoints()
    content_id, raw = feed(registry, clock, rate, seconds, text_bytes)
    registry.close_all()
    clock.advance(60)
    (key,) = [k for k in s3.objects if k.startswith("chat/")]
    stored = len(s3.objects[key].body)
    leases = [k for k in s3.objects if not k.startswith(("chat/", "_loghandler/writers/"))]
    assert not leases and not s3.uploads, (leases, s3.uploads)
    scale = DAY_S / seconds
    return {
        "rate": rate,
        "checkpoint_s": checkpoint_s,
        "messages_per_day": content_id * scale,
        "raw_bytes_per_day": raw * scale,
        "stored_bytes_per_day": stored * scale,
        "upload_part_requests_per_day": counted["UploadPart"] * scale,
        "put_object_requests_per_day": counted["PutObject"] * scale,
        "bytes_uploaded_per_day": counted["bytes"] * scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-s", type=float, default=10.0)
    parser.add_argument("--rates", default="3,30,300")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--text-bytes", type=int, default=60)
    parser.add_argument("--queue-timeout-min", type=float, default=60.0)
    args = parser.parse_args()
    seconds = int(args.hours * 3600)
    results = []
    for rate in [float(r) for r in args.rates.split(",")]:
        started = time.process_time()
        lifetime = args.queue_timeout_min * 60
        base = simulate(rate, 0.0, seconds, args.text_bytes, lifetime)
        with_ = simulate(rate, args.checkpoint_s, seconds, args.text_bytes, lifetime)
        extra_requests = with_["upload_part_requests_per_day"] - base["upload_part_requests_per_day"]
        uploaded = with_["bytes_uploaded_per_day"]
        size_ratio = with_["stored_bytes_per_day"] / base["stored_bytes_per_day"]
        results.append({"baseline": base, "checkpoints": with_})
        print(
            f"{rate:7g} msg/s: stored {with_['stored_bytes_per_day'] / 2**20:8.1f} MiB/day"
            f" (x{size_ratio:.4f} of no checkpoints); checkpoints every {args.checkpoint_s:g} s"
            f" add {extra_requests:6.0f} UploadPart/day; uploaded {uploaded / 2**30:6.2f} GiB/day"
            f" (x{uploaded / with_['stored_bytes_per_day']:.1f} the bytes stored;"
            f" without checkpoints {base['bytes_uploaded_per_day'] / 2**30:.2f} GiB)"
            f" [{time.process_time() - started:.0f} s CPU]"
        )
    with open(os.path.join(HERE, "checkpoint_cost.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
