"""
CPU per request of loghandler's HTTP side alone (``LogSite``, ``LogChannel``,
``LogResource``, the registry over the discard store of ``NO_UPLOAD=1``), without a
network: keep-alive requests of one message each fed to one channel on a
``StringTransport``, one read per request, timed with ``time.process_time``.  For a
change to the per-request path (a timer, a header, a check), against another
checkout measured in the same run::

    git worktree add --detach /tmp/loghandler-base main~1
    .venv/bin/python bench/channel_cost.py --baseline-tree /tmp/loghandler-base

Each repetition runs this tree and the baseline tree (``PYTHONPATH``) in fresh
processes of this interpreter, one after the other, alternating which goes first;
2,000 requests warm up first.  Hypervisor steal (``/proc/stat``) is read around each
run, and a run that lost more than ``--max-steal`` of a core is run again (up to
twice).  Printed: each tree's median and lowest microseconds per request and the
ratio this tree / baseline of the medians and the median of the per-repetition
ratios; everything goes to ``--json`` (default ``bench/channel_cost.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WARM_UP = 2000


def measure(count: int) -> float:
    """Microseconds of CPU per request over ``count`` requests (after the warm-up)."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from loghandler.budget import MemoryBudget
    from loghandler.message import Limits
    from loghandler.registry import StreamRegistry, StreamSettings
    from loghandler.storage.discard import DiscardStore
    from loghandler.web import make_site

    clock = Clock()
    now_ms = int(time.time() * 1000)
    registry = StreamRegistry(
        DiscardStore(),
        clock,
        StreamSettings(part_size=5 << 20, lifetime_s=3600),
        MemoryBudget(1 << 30),
    )
    registry.ready = True
    site = make_site(registry, Limits(), lambda: now_ms, 65536, clock=clock)
    site.doStart()
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)

    def post(n: int) -> bytes:
        body = json.dumps(
            {"text": "msg %d" % n, "content_id": n + 1, "client_id": 1 + n % 10, "timestamp": now_ms}
        ).encode()
        return (
            b"POST /log HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    requests = [post(n) for n in range(WARM_UP + count)]
    for request in requests[:WARM_UP]:
        channel.dataReceived(request)
        transport.clear()
    started = time.process_time()
    for request in requests[WARM_UP:]:
        channel.dataReceived(request)
        transport.clear()
    seconds = time.process_time() - started
    channel.dataReceived(post(0))
    if not transport.value().startswith(b"HTTP/1.1 200 "):
        raise AssertionError("not answered 200: %r" % transport.value()[:200])
    return seconds / count * 1e6


def steal_cores() -> float:
    """The machine's steal jiffies so far, in core-seconds."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def run(tree: str, count: int, max_steal: float) -> dict[str, float]:
    """One measuring process with ``tree`` first on the path; its figure and steal."""
    env = dict(os.environ, PYTHONPATH=tree)
    best: dict[str, float] = {}
    for _ in range(3):
        before, wall = steal_cores(), time.monotonic()
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", str(count)],
            env=env, capture_output=True, text=True, check=True,
        )
        wall = time.monotonic() - wall
        steal = (steal_cores() - before) / wall
        attempt = {"us_per_request": float(out.stdout.strip()), "steal_cores": round(steal, 3)}
        if not best or steal < best["steal_cores"]:
            best = attempt
        if steal <= max_steal:
            break
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-tree", help="a checkout to compare with (PYTHONPATH)")
    parser.add_argument("--requests", type=int, default=50_000, help="per run (default 50000)")
    parser.add_argument("--repeat", type=int, default=10, help="runs per tree (default 10)")
    parser.add_argument("--max-steal", type=float, default=0.05, help="cores (default 0.05)")
    parser.add_argument("--json", default=os.path.join(HERE, "channel_cost.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("%.3f" % measure(args.child))
        return
    trees = {"this": ROOT}
    if args.baseline_tree:
        trees["baseline"] = os.path.abspath(args.baseline_tree)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for repetition in range(args.repeat):
        order = list(trees) if repetition % 2 == 0 else list(reversed(trees))
        for name in order:
            runs[name].append(run(trees[name], args.requests, args.max_steal))
        print(
            "repetition %d: %s"
            % (
                repetition + 1,
                ", ".join(
                    "%s %.1f us (steal %.2f)"
                    % (n, runs[n][-1]["us_per_request"], runs[n][-1]["steal_cores"])
                    for n in trees
                ),
            )
        )
    summary: dict[str, object] = {}
    for name, figures in runs.items():
        values = [f["us_per_request"] for f in figures]
        summary[name] = {"median_us": statistics.median(values), "lowest_us": min(values)}
        print("%-8s median %.1f us/request, lowest %.1f" % (name, statistics.median(values), min(values)))
    if "baseline" in runs:
        pairs = [
            t["us_per_request"] / b["us_per_request"] for t, b in zip(runs["this"], runs["baseline"])
        ]
        ratio = summary["this"]["median_us"] / summary["baseline"]["median_us"]  # type: ignore[index]
        summary["ratio_of_medians"] = ratio
        summary["median_of_ratios"] = statistics.median(pairs)
        print("this / baseline: %.3f (medians), %.3f (median of the repetitions' ratios)"
              % (ratio, statistics.median(pairs)))
    with open(args.json, "w") as f:
        json.dump({"command": sys.argv, "trees": trees, "runs": runs, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
