"""
Memory of loghandler with many open keys, and the 200/503 split of a busy client
against a quiet one with ``CLIENT_BUDGET_BYTES`` (issue 8, item 6).

``many-keys`` rounds: ``twistd -n loghandler`` (one process, ``WORKERS=1``) with
``MAX_CLIENT_ID`` = the key count; every key (client ``1..N``, today's date) gets one
message every ``--period`` seconds (10 s), the keys' phases spread evenly over the
period, for ``--seconds`` (40 s: four checkpoint periods at ``CHECKPOINT_S=10``).
Once with ``NO_UPLOAD=1`` and once against moto's S3 server (started here).
Reported per round: the server's RSS before the load (the baseline, same process,
same run), its peak RSS (``VmHWM``), the peak of the budget held (``/healthz``
``buffered_bytes``, sampled every 0.5 s), the answers by status, how late the
sender fell behind its schedule, and the settings.

``fairness`` rounds (``NO_UPLOAD=1`` and moto): a busy client (client 1) sends
4 KB random-hex messages as fast as ``--busy-connections`` connections go, spread
over 8 dates (8 keys), while a quiet client (client 2) sends one message every
0.1 s; once with ``CLIENT_BUDGET_BYTES`` equal to the whole budget (no share) and
once with the default share, a quarter.  Reported: 200 and 503 per client.

The load generator is asyncio over raw keep-alive HTTP/1.1 connections, in this
process (it shares the machine's 2 cores with the server: the figures are
memory, not speed).

Usage::

    .venv/bin/python bench/many_keys.py [--keys 10,1000,10000] [--seconds 40]
        [--period 10] [--stores no-upload,s3] [--skip-fairness] [--out FILE]

Writes ``bench/many_keys.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.integration.moto import MotoServer, free_port  # noqa: E402

MiB = 1024 * 1024
DAY_MS = 86_400_000
WORDS = (
    "user login logout session error warning info debug request response timeout"
    " connected disconnected payment order item cart checkout failed succeeded retry"
    " cache miss hit database query slow fast the a of to in for on with"
).split()


def status_kib(pid: int, field: str) -> int:
    """``field`` (VmRSS, VmHWM) of /proc/PID/status, KiB; 0 once the process is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            match = re.search(r"%s:\s+(\d+) kB" % field, f.read())
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


def text(rng: random.Random, size: int) -> str:
    """About ``size`` bytes of log-like words."""
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


def request(body: bytes, port: int) -> bytes:
    return (
        b"POST /log HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body)
    )


class Connection:
    """One keep-alive HTTP/1.1 connection: send a request, read the status."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def call(self, data: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        match = re.search(rb"(?i)content-length:\s*(\d+)", head)
        body = await self.reader.readexactly(int(match.group(1))) if match else b""
        if re.search(rb"(?i)connection:\s*close", head):
            self.writer.close()
            self.writer = None
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def health(port: int) -> dict[str, Any]:
    connection = Connection(port)
    try:
        status, body = await connection.call(
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        report: dict[str, Any] = json.loads(body)
        report["status"] = status
        return report
    finally:
        connection.close()


class Sampler:
    """Samples the server's RSS and the budget held every 0.5 s."""

    def __init__(self, pid: int, port: int) -> None:
        self.pid = pid
        self.port = port
        self.peak_rss_kib = 0
        self.peak_held = 0
        self.last: dict[str, Any] = {}
        self.running = True

    async def run(self) -> None:
        while self.running:
            self.peak_rss_kib = max(self.peak_rss_kib, status_kib(self.pid, "VmRSS"))
            try:
                self.last = await health(self.port)
                self.peak_held = max(self.peak_held, int(self.last.get("buffered_bytes", 0)))
            except (OSError, ValueError, asyncio.IncompleteReadError):
                pass
            await asyncio.sleep(0.5)


#: A source tree the server imports loghandler from instead (``--server-tree``).
SERVER_TREE: Optional[str] = None


def start_server(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    tree = {"PYTHONPATH": SERVER_TREE} if SERVER_TREE else {}
    process = subprocess.Popen(
        [twistd, "-n", "--pidfile=", "loghandler"],
        env={**os.environ, "ADDR": "127.0.0.1", "PORT": str(port), **tree, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("server exited at start")
        try:
            if asyncio.run(health(port)).get("status") == 200:
                return process
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not become ready in time")


def stop_server(process: subprocess.Popen[bytes]) -> float:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return time.monotonic() - started


async def many_keys_load(
    port: int, pid: int, keys: int, period: float, seconds: float, connections: int
) -> dict[str, Any]:
    """One message per key every ``period`` s for ``seconds``; returns the counts."""
    rng = random.Random(keys)
    queue: asyncio.Queue[Optional[bytes]] = asyncio.Queue()
    statuses: dict[int, int] = {}
    lateness: list[float] = []
    sampler = Sampler(pid, port)
    sampling = asyncio.ensure_future(sampler.run())
    start = time.monotonic() + 0.5
    content_id = 0

    async def sender() -> None:
        connection = Connection(port)
        try:
            while True:
                data = await queue.get()
                if data is None:
                    return
                try:
                    status, _ = await connection.call(data)
                except (OSError, asyncio.IncompleteReadError):
                    connection.close()
                    connection = Connection(port)
                    status = 0
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            connection.close()

    senders = [asyncio.ensure_future(sender()) for _ in range(connections)]
    rounds = int(seconds / period)
    for k in range(rounds):
        for i in range(keys):
            due = start + k * period + i * period / keys
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lateness.append(-delay)
            content_id += 1
            body = json.dumps(
                {
                    "text": text(rng, 60),
                    "content_id": content_id,
                    "client_id": i + 1,
                    "timestamp": int(time.time() * 1000),
                },
                separators=(",", ":"),
            ).encode()
            queue.put_nowait(request(body, port))
            while queue.qsize() > 5 * connections:  # the server is behind: wait for it
                await asyncio.sleep(0.01)
    for _ in senders:
        queue.put_nowait(None)
    await asyncio.gather(*senders)
    await asyncio.sleep(1.0)
    sampler.running = False
    await sampling
    return {
        "sent": content_id,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "answered_503": statuses.get(503, 0),
        "peak_rss_mib": round(sampler.peak_rss_kib / 1024, 1),
        "peak_budget_held_mib": round(sampler.peak_held / MiB, 2),
        "budget_held_at_end_mib": round(int(sampler.last.get("buffered_bytes", 0)) / MiB, 2),
        "open_objects_at_end": sampler.last.get("open_objects"),
        "seconds": round(time.monotonic() - start, 1),
        "max_lateness_s": round(max(lateness, default=0.0), 2),
    }


async def fairness_load(port: int, seconds: float, busy_connections: int) -> dict[str, Any]:
    """A busy client (1) on 8 dates as fast as it goes, a quiet client (2) every 0.1 s."""
    counts = {"busy": {}, "quiet": {}}  # type: dict[str, dict[int, int]]
    end = time.monotonic() + seconds
    ids = iter(range(1, 10**9))

    def body(client: int, size: int, days_back: int) -> bytes:
        rng = random.getrandbits
        text_ = "%x" % rng(size * 4) if size else "quiet line"
        return request(
            json.dumps(
                {
                    "text": text_,
                    "content_id": next(ids),
                    "client_id": client,
                    "timestamp": int(time.time() * 1000) - days_back * DAY_MS,
                },
                separators=(",", ":"),
            ).encode(),
            port,
        )

    async def busy(n: int) -> None:
        connection = Connection(port)
        k = n
        while time.monotonic() < end:
            k += 1
            status, _ = await connection.call(body(1, 4096, k % 8 if k % 8 < 7 else 0))
            counts["busy"][status] = counts["busy"].get(status, 0) + 1
        connection.close()

    async def quiet() -> None:
        connection = Connection(port)
        while time.monotonic() < end:
            status, _ = await connection.call(body(2, 0, 0))
            counts["quiet"][status] = counts["quiet"].get(status, 0) + 1
            await asyncio.sleep(0.1)
        connection.close()

    await asyncio.gather(quiet(), *[busy(n) for n in range(busy_connections)])
    return {who: {str(k): v for k, v in sorted(c.items())} for who, c in counts.items()}


def run_many_keys(args: argparse.Namespace, store: str, keys: int) -> dict[str, Any]:
    settings = {
        "MAX_CLIENT_ID": str(max(keys, 10)),
        "CHECKPOINT_S": str(args.checkpoint_s),
        "BUFFER_BUDGET_BYTES": str(args.budget_mib * MiB),
        "QUEUE_TIMEOUT_MIN": "60",
        "WORKERS": "1",
    }
    with MotoServer() if store == "s3" else _NoMoto() as moto:
        env = dict(settings, **(moto.env() if store == "s3" else {"NO_UPLOAD": "1"}))
        port = free_port()
        process = start_server(env, port)
        try:
            time.sleep(1.0)
            baseline_kib = status_kib(process.pid, "VmRSS")
            result = asyncio.run(
                many_keys_load(
                    port, process.pid, keys, args.period, args.seconds, args.connections
                )
            )
            result["peak_rss_mib"] = round(
                max(result["peak_rss_mib"] * 1024, status_kib(process.pid, "VmHWM")) / 1024, 1
            )
        finally:
            result_stop = stop_server(process)
    result.update(
        store=store,
        keys=keys,
        baseline_rss_mib=round(baseline_kib / 1024, 1),
        rss_per_key_kib=round((result["peak_rss_mib"] * 1024 - baseline_kib) / keys, 1),
        stop_s=round(result_stop, 2),
        settings=settings,
        period_s=args.period,
    )
    return result


def run_fairness(args: argparse.Namespace, store: str, share: Optional[int]) -> dict[str, Any]:
    budget = args.fair_budget_mib * MiB
    settings = {
        "BUFFER_BUDGET_BYTES": str(budget),
        "CLIENT_BUDGET_BYTES": str(share if share is not None else budget),
        "WORKERS": "1",
    }
    with MotoServer() if store == "s3" else _NoMoto() as moto:
        env = dict(settings, **(moto.env() if store == "s3" else {"NO_UPLOAD": "1"}))
        port = free_port()
        process = start_server(env, port)
        try:
            result = asyncio.run(fairness_load(port, args.fair_seconds, args.busy_connections))
        finally:
            stop_server(process)
    return {"store": store, "settings": settings, **result}


class _NoMoto:
    def __enter__(self) -> "_NoMoto":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default="10,1000,10000")
    parser.add_argument("--stores", default="no-upload,s3")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--period", type=float, default=10.0)
    parser.add_argument("--checkpoint-s", type=float, default=10.0)
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--skip-fairness", action="store_true")
    parser.add_argument("--fair-budget-mib", type=int, default=32)
    parser.add_argument("--fair-seconds", type=float, default=20.0)
    parser.add_argument("--busy-connections", type=int, default=8)
    parser.add_argument("--out", default=os.path.join(HERE, "many_keys.json"))
    parser.add_argument(
        "--server-tree",
        help="run the server from this source tree (PYTHONPATH), e.g. a git worktree of"
        " an older commit, as a baseline in the same run",
    )
    args = parser.parse_args()
    global SERVER_TREE
    SERVER_TREE = args.server_tree
    stores = args.stores.split(",")
    results: dict[str, Any] = {"many_keys": [], "fairness": []}
    for store in stores:
        for keys in [int(k) for k in args.keys.split(",")]:
            print("many keys: %s, %d keys ..." % (store, keys), file=sys.stderr)
            results["many_keys"].append(run_many_keys(args, store, keys))
    if not args.skip_fairness:
        for store in stores:
            for share in (None, max(args.fair_budget_mib * MiB // 4, 10 * MiB)):
                print("fairness: %s, share %s ..." % (store, share), file=sys.stderr)
                results["fairness"].append(run_fairness(args, store, share))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(
        "%-9s %6s %8s %9s %10s %9s %8s %7s %6s %7s"
        % ("store", "keys", "sent", "base MiB", "peak MiB", "KiB/key", "held MiB", "503",
           "other", "late s")
    )
    for r in results["many_keys"]:
        other = sum(v for k, v in r["statuses"].items() if k not in ("200", "503"))
        print(
            "%-9s %6d %8d %9.1f %10.1f %9.1f %8.2f %7d %6d %7.2f"
            % (r["store"], r["keys"], r["sent"], r["baseline_rss_mib"], r["peak_rss_mib"],
               r["rss_per_key_kib"], r["peak_budget_held_mib"], r["answered_503"], other,
               r["max_lateness_s"])
        )
    for r in results["fairness"]:
        print(
            "fairness %-9s budget %s share %s: busy %s quiet %s"
            % (r["store"], r["settings"]["BUFFER_BUDGET_BYTES"],
               r["settings"]["CLIENT_BUDGET_BYTES"], r["busy"], r["quiet"])
        )


if __name__ == "__main__":
    main()
