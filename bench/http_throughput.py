"""
HTTP throughput and memory of loghandler, as ratios against a minimal twisted.web
server measured in the same run (``bench/baseline_server.py``).

Scenarios, each a fresh server process loaded by ``wrk`` (Debian package ``wrk``) on
127.0.0.1 with keep-alive connections:

- ``baseline``: the minimal server.
- ``no-upload``: ``twistd -n loghandler`` with ``NO_UPLOAD=1`` (validation,
  compression and parts, nothing sent).
- ``s3``: loghandler against moto's S3 server (started here), short messages.
- ``s3-large``: the same with 8 KB random-hex texts, so 5 MiB parts are uploaded
  (SHA-256 of each part is computed on a thread, off the reactor).
- ``batch-100``: ``NO_UPLOAD=1``, batches of 100 messages a request
  (``Content-Type: application/x-ndjson``, ``bench/post_batch.lua``).

Server CPU per request is the server process's own CPU time (user + system, from
``/proc/PID/stat``) over the round, divided by its requests; for ``batch-100`` it is
also given per message.

Usage: ``.venv/bin/python bench/http_throughput.py [--seconds 10] [--connections 32]``.
Each scenario is measured in three rounds after a warm-up; the median round is
reported.  Prints one line per scenario: requests/s, messages/s, the ratio to the
baseline, server CPU microseconds per request and per message, p50/p99 latency, the server's peak RSS (VmHWM), non-2xx answers and the seconds from
SIGTERM to exit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import timeit
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.integration.moto import MotoServer, free_port  # noqa: E402


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("server exited at start")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen in time")


def peak_rss_mib(pid: int) -> float:
    with open("/proc/%d/status" % pid) as f:
        match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    return int(match.group(1)) / 1024 if match else float("nan")


def cpu_seconds(pid: int) -> float:
    """The process's own CPU time so far (user + system), seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    port: int, seconds: int, connections: int, text_bytes: int, pid: int, batch: int = 1
) -> dict[str, float]:
    env = {**os.environ, "TEXT_BYTES": str(text_bytes), "BATCH": str(batch)}
    script = "post.lua" if batch == 1 else "post_batch.lua"
    cpu_before = cpu_seconds(pid)
    out = subprocess.run(
        [
            "wrk", "-t1", "-c%d" % connections, "-d%ds" % seconds,
            "-s", os.path.join(HERE, script), "http://127.0.0.1:%d/log" % port,
        ],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    cpu = cpu_seconds(pid) - cpu_before
    result = dict(re.findall(r"(\w+)=(\d+)", out.split("RESULT", 1)[1]))
    requests = max(1, int(result["requests"]))
    return {
        "rps": requests / seconds,
        "messages_per_s": requests * batch / seconds,
        "cpu_us_per_request": cpu / requests * 1e6,
        "cpu_us_per_message": cpu / (requests * batch) * 1e6,
        "non2xx": int(result["non2xx"]),
        "p50_ms": int(result["p50_us"]) / 1000,
        "p99_ms": int(result["p99_us"]) / 1000,
    }


def scenario(
    command: list[str],
    env: dict[str, str],
    port: int,
    args: argparse.Namespace,
    text_bytes: int,
    batch: int = 1,
) -> dict[str, float]:
    process = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        wait_port(port, process)
        run_wrk(port, 2, args.connections, text_bytes, process.pid, batch)  # warm-up
        rounds = [
            run_wrk(port, args.seconds, args.connections, text_bytes, process.pid, batch)
            for _ in range(3)
        ]
        result = sorted(rounds, key=lambda r: r["rps"])[1]  # the median round
        result["non2xx"] = sum(r["non2xx"] for r in rounds)
        result["rss_mib"] = peak_rss_mib(process.pid)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        result["stop_s"] = time.monotonic() - started
        return result
    finally:
        if process.poll() is None:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    python = sys.executable
    twistd = os.path.join(os.path.dirname(python), "twistd")
    results: dict[str, dict[str, float]] = {}

    port = free_port()
    results["baseline"] = scenario(
        [python, os.path.join(HERE, "baseline_server.py"), str(port)], {}, port, args, 0
    )
    daemon = [twistd, "-n", "--pidfile=", "loghandler"]
    port = free_port()
    results["no-upload"] = scenario(
        daemon, {"NO_UPLOAD": "1", "ADDR": "127.0.0.1", "PORT": str(port)}, port, args, 0
    )
    port = free_port()
    results["batch-100"] = scenario(
        daemon, {"NO_UPLOAD": "1", "ADDR": "127.0.0.1", "PORT": str(port)}, port, args, 0, 100
    )
    with MotoServer(bucket="bench") as moto:
        for name, text_bytes in (("s3", 0), ("s3-large", 8000)):
            moto.reset()
            port = free_port()
            env = {**moto.env(), "ADDR": "127.0.0.1", "PORT": str(port),
                   "SHUTDOWN_TIMEOUT_S": "60", "BUFFER_BUDGET_BYTES": str(1 << 30)}
            results[name] = scenario(daemon, env, port, args, text_bytes)

    base = results["baseline"]["rps"]
    print("%-10s %9s %9s %6s %9s %9s %7s %7s %8s %7s %6s" % (
        "scenario", "req/s", "msg/s", "ratio", "CPU us/r", "CPU us/m", "p50 ms", "p99 ms",
        "RSS MiB", "non2xx", "stop s"))
    for name, r in results.items():
        print("%-10s %9.0f %9.0f %6.2f %9.1f %9.1f %7.2f %7.2f %8.1f %7d %6.2f" % (
            name, r["rps"], r["messages_per_s"], r["rps"] / base, r["cpu_us_per_request"],
            r["cpu_us_per_message"], r["p50_ms"], r["p99_ms"], r["rss_mib"], r["non2xx"],
            r["stop_s"]))
    part = os.urandom(5 * 1024 * 1024)
    ms = min(timeit.repeat(lambda: hashlib.sha256(part).hexdigest(), number=5, repeat=3)) / 5 * 1000
    print("SHA-256 of a 5 MiB part: %.1f ms (on a thread in loghandler)" % ms)


if __name__ == "__main__":
    main()
