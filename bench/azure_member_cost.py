"""
What checkpoints cost on Azure, where each checkpoint appends the gzip member closed
at that moment (an append blob cannot replace data): the size of the blob against
one member per part (``CHECKPOINT_S=0``, the baseline measured in the same run),
and the blocks appended per day, which count against the 50,000 blocks a blob holds
(shared by all the daemons writing it).

One key's day is simulated on a ``task.Clock`` through the real registry, stream,
gzip framing and Azure writer, over the in-memory container
(:class:`MemoryAppendBlobs`); no network, so the figures are exact counts and sizes,
not timings.

Usage::

    .venv/bin/python bench/azure_member_cost.py [--checkpoint-s 5,10,30,60]
        [--rates 0.3,3,30,300] [--hours 2] [--text-bytes 60] [--queue-timeout-min 60]

``--rates``: messages per second of one key (one client, one day); each message's
text is ``--text-bytes`` of words from a small vocabulary (log-like).  ``--hours``
shorter than 24 is scaled up to a day.  Prints a table and writes
``bench/azure_member_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.task import Clock  # noqa: E402

from loghandler.budget import MemoryBudget  # noqa: E402
from loghandler.config import S3_MIN_PART_SIZE  # noqa: E402
from loghandler.registry import StreamRegistry, StreamSettings  # noqa: E402
from loghandler.retry import RetryLayer  # noqa: E402
from loghandler.storage.azure.api import MAX_BLOCKS  # noqa: E402
from loghandler.storage.azure.memory import MemoryAppendBlobs  # noqa: E402
from loghandler.storage.azure.writer import AzureObjectStore  # noqa: E402

from checkpoint_cost import feed  # noqa: E402  (bench/, the same load)

DAY_S = 86_400


def simulate(
    rate: float, checkpoint_s: float, seconds: int, text_bytes: int, lifetime_s: float
) -> dict[str, float]:
    """One key at ``rate`` messages/s for ``seconds``: the blob's size and blocks."""
    clock = Clock()
    clock.advance(1_600_000_000)
    azure = MemoryAppendBlobs()
    store = AzureObjectStore(azure, clock, retry=RetryLayer(clock))
    registry = StreamRegistry(
        store,
        clock,
        StreamSettings(
            part_size=S3_MIN_PART_SIZE, lifetime_s=lifetime_s, checkpoint_s=checkpoint_s
        ),
        MemoryBudget(1 << 34),
        uniform=lambda a, b: b,
    )
    registry.start_checkpoints()
    content_id, raw = feed(registry, clock, rate, seconds, text_bytes)
    registry.close_all()
    clock.advance(60)
    assert list(azure.blobs) == ["chat/2020-09-13/content_logs_2020-09-13_3"], list(azure.blobs)
    (blob,) = azure.blobs.values()
    scale = DAY_S / seconds
    return {
        "rate": rate,
        "checkpoint_s": checkpoint_s,
        "messages_per_day": content_id * scale,
        "raw_bytes_per_day": raw * scale,
        "stored_bytes_per_day": len(blob.body) * scale,
        "blocks_per_day": len(blob.blocks) * scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-s", default="5,10,30,60")
    parser.add_argument("--rates", default="0.3,3,30,300")
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--text-bytes", type=int, default=60)
    parser.add_argument("--queue-timeout-min", type=float, default=60.0)
    args = parser.parse_args()
    seconds = int(args.hours * 3600)
    lifetime = args.queue_timeout_min * 60
    intervals = [float(c) for c in args.checkpoint_s.split(",")]
    results = []
    print(
        "| msg/s per key | CHECKPOINT_S | stored MiB/day | x one member per part"
        " | blocks/day (one daemon) | daemons before a day's blob rolls over |"
    )
    print("|---|---|---|---|---|---|")
    for rate in [float(r) for r in args.rates.split(",")]:
        started = time.process_time()
        base = simulate(rate, 0.0, seconds, args.text_bytes, lifetime)
        rows = [base] + [
            simulate(rate, interval, seconds, args.text_bytes, lifetime) for interval in intervals
        ]
        for row in rows:
            row["size_ratio"] = row["stored_bytes_per_day"] / base["stored_bytes_per_day"]
            # A blob holds one day: how many daemons writing it fill 50,000 blocks.
            daemons = MAX_BLOCKS / row["blocks_per_day"] if row["blocks_per_day"] else float("inf")
            print(
                f"| {rate:g} | {row['checkpoint_s']:g}{' (baseline)' if row is base else ''}"
                f" | {row['stored_bytes_per_day'] / 2**20:.2f} | x{row['size_ratio']:.3f}"
                f" | {row['blocks_per_day']:.0f} | {daemons:.1f} |"
            )
        results.append(rows)
        print(f"<!-- {rate:g} msg/s: {time.process_time() - started:.0f} s CPU -->")
    with open(os.path.join(HERE, "azure_member_cost.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
