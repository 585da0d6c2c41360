"""
Compression ratio of a key's stream against ``gzip -6`` of the same lines, for keys
busy, steady, quiet and bursty (issue 8, item 6: a quiet key stages its lines, a key
idle for ``IDLE_S`` closes its member and frees its compressor).

One key's hour is simulated on a ``task.Clock`` through the real registry, stream and
gzip framing with ``CHECKPOINT_S=10`` and ``QUEUE_TIMEOUT_MIN=60`` (one object per
key), over the ``NO_UPLOAD=1`` store, which counts the bytes of every part and tail:
the bytes the stream stores before any merge.  No network: exact byte counts.

Compared in the same run, on the same lines:

- ``gzip -6``: the lines joined, through Debian's ``gzip -6`` (the target: within 1%);
- ``one compressor``: the stream as before issue 8, item 6 (a compressor from the
  first line, never freed: ``stage_bytes=0``, ``idle_s=0``);
- ``now``: the defaults (``STAGE_BYTES`` staged, compressors freed after ``IDLE_S``).

Usage: ``.venv/bin/python bench/member_ratio.py [--minutes 60] [--text-bytes 60]``.
Prints a table and writes ``bench/member_ratio.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.task import Clock  # noqa: E402

from loghandler.budget import MemoryBudget  # noqa: E402
from loghandler.config import S3_MIN_PART_SIZE  # noqa: E402
from loghandler.gzipframe import STAGE_BYTES  # noqa: E402
from loghandler.registry import IDLE_S, StreamRegistry, StreamSettings  # noqa: E402
from loghandler.storage.discard import DiscardStore  # noqa: E402

from checkpoint_cost import feed  # noqa: E402  (bench/, the same load)

#: messages per second at second ``t`` of the hour, by scenario.
SCENARIOS: dict[str, Callable[[float], float]] = {
    "busy (100/s)": lambda t: 100.0,
    "steady (1/s)": lambda t: 1.0,
    "quiet (1 per 10 s)": lambda t: 0.1,
    "bursty (2 s of 200/s each minute)": lambda t: 200.0 if t % 60 < 2 else 0.0,
    "bursty (20 s of 5/s each minute)": lambda t: 5.0 if t % 60 < 20 else 0.0,
}


def run(rate: Callable[[float], float], seconds: int, text_bytes: int, new: bool) -> tuple[int, bytes]:
    """The bytes stored for one key fed at ``rate`` for ``seconds``, and its lines."""
    clock = Clock()
    store = DiscardStore()
    budget = MemoryBudget(1 << 40)
    registry = StreamRegistry(
        store,
        clock,
        StreamSettings(
            part_size=S3_MIN_PART_SIZE,
            lifetime_s=3600.0,
            budget_bytes=1 << 40,
            checkpoint_s=10.0,
            idle_s=IDLE_S if new else 0.0,
            stage_bytes=STAGE_BYTES if new else 0,
        ),
        budget,
        uniform=lambda a, b: b,
    )
    registry.start_checkpoints()
    lines: list[bytes] = []
    feed(registry, clock, rate, seconds, text_bytes, lines)
    registry.close_all()
    clock.advance(1)
    return store.bytes_discarded, b"".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--text-bytes", type=int, default=60)
    parser.add_argument("--out", default=os.path.join(HERE, "member_ratio.json"))
    args = parser.parse_args()
    seconds = args.minutes * 60
    results = []
    print(
        "%-36s %9s %11s %11s %11s %9s %9s"
        % ("key", "lines", "raw", "gzip -6", "one comp.", "now", "now/gzip")
    )
    for name, rate in SCENARIOS.items():
        old, data = run(rate, seconds, args.text_bytes, new=False)
        new, same = run(rate, seconds, args.text_bytes, new=True)
        assert same == data
        gzip6 = len(subprocess.run(["gzip", "-6", "-c"], input=data, capture_output=True, check=True).stdout)
        result = {
            "key": name,
            "lines": data.count(b"\n"),
            "raw_bytes": len(data),
            "gzip6_bytes": gzip6,
            "one_compressor_bytes": old,
            "now_bytes": new,
            "one_compressor_vs_gzip6": round(old / gzip6, 4),
            "now_vs_gzip6": round(new / gzip6, 4),
            "now_vs_one_compressor": round(new / old, 4),
        }
        results.append(result)
        print(
            "%-36s %9d %11d %11d %11d %9d %9.4f"
            % (name, result["lines"], len(data), gzip6, old, new, new / gzip6)
        )
    with open(args.out, "w") as f:
        json.dump(
            {"minutes": args.minutes, "text_bytes": args.text_bytes, "checkpoint_s": 10,
             "idle_s": IDLE_S, "stage_bytes": STAGE_BYTES, "results": results},
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
