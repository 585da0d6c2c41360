"""
What a hard crash costs: loghandler under load against moto's S3 server, killed with
SIGKILL, then a new instance on the same bucket recovers what the dead one staged
(DESIGN.md section 6, issue 6).  Run once with ``ACK=accepted`` and once with
``ACK=durable``.

Usage::

    .venv/bin/python bench/crash.py                  # the issue's figures, ~3 minutes
    .venv/bin/python bench/crash.py --seconds 12 --checkpoint-s 10 --out crash-bench.json

Defaults follow the issue: 300 messages/s over 10 clients plus one client of 8 KB
texts at 150/s (1.2 MB/s), SIGKILL after 12 s of load, one new instance started at
once; the daemon's own defaults for ``CHECKPOINT_S`` (10), ``LEASE_S`` (10),
``RECOVERY_INTERVAL_S`` (30) and ``DURABLE_TIMEOUT_S`` (10); nothing rotates
(``QUEUE_TIMEOUT_MIN=600``).  The load is open-loop from threads with keep-alive
connections (8 per client by default), so a slow ``ACK=durable`` answer does not
lower the offered rate until all of a client's connections wait.

Prints, per ACK mode, one ``CRASH SUMMARY`` line and then the figures, and writes all
of them as JSON to ``--out`` (default ``crash-bench.json``): messages sent,
acknowledged (200 and 202 separately), found after recovery, lost (acknowledged and
not found), the age in seconds before the kill of the newest and of the oldest lost
acknowledged message (the oldest is the loss window: about ``CHECKPOINT_S`` plus an
upload), p50/p99 latency of the 200s and requests answered per second, and the
seconds from the kill to nothing left staged (everything merged).  The checks of
``tests/integration/test_crash.py`` run too; what failed is listed under
``problems`` and makes the exit status 1.

The scenario, load generator and read-back are those of
``tests/integration/test_crash.py`` (imported, not copied).  The daemons' logs stay in
a temporary directory, printed at the start.  On these shared 2-core VMs, read the
figures next to the machine's load: the load generator, moto and the daemon share it.
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

from loghandler.config import Config  # noqa: E402
from tests.integration.moto import MotoServer  # noqa: E402
from tests.integration.test_crash import (  # noqa: E402
    BIG_CLIENT,
    SMALL_CLIENTS,
    CrashHarness,
    sigkill_scenario,
    summary,
)

#: The figures written per ACK mode, in this order.
REPORTED = (
    "ack",
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
    "latency_200",
    "latency_202",
    "requests_per_s",
    "offered_per_s",
    "load_s",
    "kill_to_ready_s",
    "kill_to_merged_s",
    "kill_to_merged_bound_s",
    "staged_at_kill",
    "daemons",
)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line (see the module's docstring)."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="load before SIGKILL")
    parser.add_argument("--rate", type=float, default=300.0, help="messages/s over 10 clients")
    parser.add_argument("--big-rate", type=float, default=150.0, help="8 KB messages/s")
    parser.add_argument("--big-bytes", type=int, default=8192, help="characters per big text")
    parser.add_argument("--connections", type=int, default=8, help="connections per client")
    parser.add_argument("--checkpoint-s", type=float, default=defaults.checkpoint_s)
    parser.add_argument("--lease-s", type=float, default=defaults.lease_s)
    parser.add_argument("--recovery-interval-s", type=float, default=defaults.recovery_interval_s)
    parser.add_argument("--durable-timeout-s", type=float, default=defaults.durable_timeout_s)
    parser.add_argument(
        "--acks", default="accepted,durable", help="ACK modes to run, comma-separated"
    )
    parser.add_argument("--out", default="crash-bench.json", help="where to write the JSON")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the SIGKILL scenario per ACK mode; print and write the figures."""
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="crash-bench-")
    print(f"daemon logs in {workdir}", flush=True)
    runs: list[dict[str, Any]] = []
    all_problems = 0
    with MotoServer() as moto:
        for ack in [a.strip() for a in args.acks.split(",") if a.strip()]:
            moto.reset()
            harness = CrashHarness(moto, workdir)
            started = time.monotonic()
            try:
                figures, problems = sigkill_scenario(
                    harness,
                    label=f"bench_{ack}",
                    ack=ack,
                    seconds=args.seconds,
                    checkpoint_s=args.checkpoint_s,
                    lease_s=args.lease_s,
                    recovery_interval_s=args.recovery_interval_s,
                    durable_timeout_s=args.durable_timeout_s,
                    unstaged_timeout=3 * args.lease_s + args.recovery_interval_s + 60.0,
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
            "seconds_before_kill": args.seconds,
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
        print(json.dumps({k: run[k] for k in REPORTED if k not in ("daemons", "staged_at_kill")}))
    return 1 if all_problems else 0


if __name__ == "__main__":
    sys.exit(main())
