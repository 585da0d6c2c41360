"""
What a hard crash costs with ``STORAGE=azure``: loghandler under load against
Azurite, killed with SIGKILL, then a new daemon with the same settings takes more
load and is stopped with SIGTERM; the container is read back and every line checked.
Run with ``ACK=accepted`` and ``ACK=durable``.

Usage::

    .venv/bin/python bench/azure_crash.py                  # ~1 minute
    .venv/bin/python bench/azure_crash.py --checkpoint-s 10 --seconds 25 --runs 3

Defaults: 300 messages/s over 10 clients plus one client of 8 KB texts at 150/s
(1.2 MB/s), ``CHECKPOINT_S=1``, SIGKILL after 6.5 s of load; nothing rotates
(``QUEUE_TIMEOUT_MIN=600``).  With ``--runs N`` each ACK mode runs N times, the kill
moved by ``CHECKPOINT_S / N`` each time, so that the kill falls at different points
of the checkpoint period.

Prints, per run, one ``AZURE SUMMARY`` line, and writes all figures as JSON to
``--out`` (default ``azure-crash-bench.json``): messages sent, acknowledged (200 and
202), found, lost (acknowledged and not found) and the age in seconds before the
kill of the newest and of the oldest lost acknowledged message (the oldest is the
loss window: up to ``CHECKPOINT_S`` plus an append), duplicates (must be 0), p50/p99
latency of the 200s, requests answered per second.  The checks of
``tests/integration/test_azure_faults.py`` run too; what failed is listed under
``problems`` and makes the exit status 1.

The scenario, load generator and read-back are those of
``tests/integration/test_azure_faults.py`` (imported, not copied).  Azurite runs
from ``tests/integration/azurite`` (``scripts/_venv.sh`` installs it), with its data
in a temporary folder; the daemons' logs stay in a temporary directory, printed at
the start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.integration.azurite import AzuriteServer  # noqa: E402
from tests.integration.test_azure_faults import (  # noqa: E402
    AzureHarness,
    sigkill_scenario,
    summary,
)
from tests.integration.test_crash import BIG_CLIENT, SMALL_CLIENTS  # noqa: E402

#: The figures written per run, in this order.
REPORTED = (
    "ack",
    "seconds_before_kill",
    "sent",
    "acknowledged_200",
    "acknowledged_202",
    "no_answer",
    "distinct_found",
    "duplicates",
    "lost_acknowledged",
    "lost_200",
    "lost_202",
    "newest_lost_age_s",
    "oldest_lost_age_s",
    "lost_window_bound_s",
    "latency_200",
    "requests_per_s",
    "offered_per_s",
    "blocks_total",
    "blocks_by_writer",
    "kill_to_ready_s",
)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.5, help="load before SIGKILL")
    parser.add_argument("--after-seconds", type=float, default=2.0, help="load on the new daemon")
    parser.add_argument("--rate", type=float, default=300.0, help="messages/s over 10 clients")
    parser.add_argument("--big-rate", type=float, default=150.0, help="8 KB messages/s")
    parser.add_argument("--big-bytes", type=int, default=8192, help="characters per big text")
    parser.add_argument("--connections", type=int, default=8, help="connections per client")
    parser.add_argument("--checkpoint-s", type=float, default=1.0)
    parser.add_argument("--durable-timeout-s", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=1, help="runs per ACK mode")
    parser.add_argument(
        "--acks", default="accepted,durable", help="ACK modes to run, comma-separated"
    )
    parser.add_argument("--out", default="azure-crash-bench.json", help="where to write the JSON")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the SIGKILL scenario per ACK mode and run; print and write the figures."""
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="azure-crash-bench-")
    print(f"daemon logs in {workdir}", flush=True)
    runs: list[dict[str, Any]] = []
    all_problems = 0
    with AzuriteServer() as azurite:
        for ack in [a.strip() for a in args.acks.split(",") if a.strip()]:
            for n in range(args.runs):
                azurite.reset()
                seconds = args.seconds + n * args.checkpoint_s / args.runs
                harness = AzureHarness(azurite, workdir)
                started = time.monotonic()
                try:
                    figures, problems = sigkill_scenario(
                        harness,
                        label=f"bench_{ack}_{n + 1}",
                        ack=ack,
                        seconds=seconds,
                        checkpoint_s=args.checkpoint_s,
                        after_seconds=args.after_seconds,
                        durable_timeout_s=args.durable_timeout_s,
                        load_options={
                            "rate": args.rate,
                            "clients": SMALL_CLIENTS,
                            "big_rate": args.big_rate,
                            "big_client": BIG_CLIENT,
                            "big_text_bytes": args.big_bytes,
                            "connections": args.connections,
                        },
                        log=lambda line: print(line, flush=True),
                    )
                finally:
                    harness.close()
                figures["wall_s"] = round(time.monotonic() - started, 1)
                figures["seconds_before_kill"] = round(seconds, 3)
                print(summary(figures), flush=True)
                run = {k: figures.get(k) for k in REPORTED}
                run["settings"] = figures.get("settings")
                run["problems"] = problems
                runs.append(run)
                all_problems += len(problems)
                for problem in problems:
                    print(f"PROBLEM ({ack}): {problem[:2000]}", flush=True)
    report = {
        "command": " ".join([os.path.relpath(__file__, ROOT)] + list(argv or sys.argv[1:])),
        "load": {
            "messages_per_s": args.rate,
            "clients": len(SMALL_CLIENTS),
            "big_messages_per_s": args.big_rate,
            "big_text_bytes": args.big_bytes,
            "connections_per_client": args.connections,
        },
        "runs": runs,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, sort_keys=False, default=str)
    print(f"wrote {args.out}")
    for run in runs:
        print(json.dumps({k: run[k] for k in REPORTED if k != "blocks_by_writer"}))
    return 1 if all_problems else 0


if __name__ == "__main__":
    sys.exit(main())
