"""
HTTP throughput, CPU and memory of loghandler, as ratios against a bare twisted.web
server (``bench/baseline_server.py``) measured in the same run, with the Go original
beside them when its binary is given.

The command (``wrk`` is the Debian package; moto comes with ``.[test]``)::

    .venv/bin/python bench/http_throughput.py --workers 1,2 --repeat 2 \\
        --go-binary /tmp/bench-go/helloworld-data-handler

Systems, all started at once and loaded one at a time, interleaved (the order
rotates each repetition) so that a noisy minute hits all of them:

- ``baseline``: ``bench/baseline_server.py --workers N``, the same interpreter;
- ``loghandler/none``: ``twistd -n loghandler`` with ``NO_UPLOAD=1`` and ``WORKERS=N``;
- ``loghandler/moto``: the same against moto's S3 server (started here; one bucket per
  system);
- ``go/moto`` (``--go-binary PATH``): the specification's Go original against moto
  (``ADDR``, ``PORT``, ``AWS_*`` and ``AWS_ENDPOINT_URL`` in its environment; the
  upstream code has no endpoint setting and a body-copy bug: build it with both
  fixed, as FIELD-NOTES.md "The original Go server" says).

each for every interpreter of ``--python`` (default: this one; twistd is taken from the
same directory) and every ``--workers`` count.  Loads (``--loads``): ``c50`` (single
messages, 50 connections), ``c1`` (one connection), ``batch100`` (50 connections,
100 NDJSON lines a request; not sent to the Go original, which takes one message a
request).  ``bench/post.lua`` sends valid, unique messages (unique content_id over the
whole run of each system, 10 clients, current timestamps) and counts the 200 answers.

Each system gets a warm-up per load (``--warmup`` seconds, not reported), then
``--repeat`` windows of ``--seconds`` per load.  For each window:

- requests/s and messages/s (answers wrk counted, over the window);
- server CPU: user + system time (``/proc/PID/stat``, children reaped included) summed
  over the server's process tree (parent and workers), per request and per message;
- p50/p99 latency from wrk's ``done`` hook;
- peak RSS: the largest sum of ``VmRSS`` over the process tree, sampled every 0.2 s;
- wrk's own CPU (``getrusage`` of the wrk child), in cores;
- steal (``/proc/stat``, in cores) and foreign load (the machine's user, system and
  irq CPU minus that of the servers, moto, wrk and this script, in cores; softirq
  time, where loopback TCP is handled, is recorded apart).  A window with more than
  ``--max-steal`` or ``--max-foreign`` cores is run again, up to ``--retries`` times;
  the least disturbed attempt is kept, and marked ``*`` if it is still disturbed.

The table gives the median over the repetitions; ``ratio`` is requests/s over the
baseline's of the same interpreter, worker count and load (the Go original against
the first interpreter's one-worker baseline).  For ``batch100`` the ``msg x`` column
is messages/s over the same system's ``c50`` requests/s.

At the end every server gets SIGTERM (the seconds to exit are reported) and, for the
moto systems, every object in its bucket is read back, decompressed, and its
content_ids counted: ``stored`` unique ids must be at least the messages answered 200
(``acked``; wrk does not count answers that arrive after its window, so ``stored`` may
exceed it by up to the messages in flight when each window ends) and at most those sent, with no
duplicate and no id that was not sent.  Everything (each attempt of each window, the
check, the machine) goes to ``--json`` (default ``bench/http_throughput.json``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.integration.moto import MotoServer, free_port  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Load:
    """One wrk load: connections, wrk threads, messages per request."""

    name: str
    connections: int
    threads: int
    batch: int
    text_bytes: int = 0


LOADS = {
    "c50": Load("c50", 50, 2, 1),
    "c1": Load("c1", 1, 1, 1),
    "batch100": Load("batch100", 50, 2, 100),
    "large": Load("large", 50, 2, 1, 8000),
}


@dataclass
class System:
    """One server under test and what the run learnt about it."""

    name: str
    kind: str  # baseline, loghandler, go
    interpreter: str  # e.g. cpython3.11, pypy3.9, go
    workers: int
    storage: str  # none, moto
    command: list[str]
    env: dict[str, str]
    port: int
    bucket: str = ""
    process: Optional[subprocess.Popen[bytes]] = None
    log_path: str = ""
    next_id: int = 1
    sent: int = 0
    acked: int = 0
    windows: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.kind == "go":
            return "go original/%s" % self.storage
        return "%s/%s %s w%d" % (
            self.kind if self.kind != "loghandler" else "loghandler",
            self.storage, self.interpreter, self.workers)

    def loads(self, wanted: list[str]) -> list[str]:
        return [w for w in wanted if not (self.kind == "go" and LOADS[w].batch > 1)]


# -- /proc ---------------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (parent pid, CPU ticks: utime+stime+cutime+cstime)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return table


def tree(root: int, table: dict[int, tuple[int, int]]) -> list[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def tree_cpu(root: int, table: dict[int, tuple[int, int]]) -> float:
    """CPU seconds of ``root``'s process tree (reaped children included via cutime)."""
    return sum(table[pid][1] for pid in tree(root, table)) / HZ


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/statm" % pid) as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            pass
    return total


def hwm_bytes(pids: list[int]) -> int:
    """The sum of each process's own peak RSS (VmHWM)."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as f:
                match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        except OSError:
            continue
        if match:
            total += int(match.group(1)) * 1024
    return total


def machine_cpu() -> tuple[float, float, float]:
    """
    (busy, steal, softirq) CPU seconds of the whole machine since boot.  busy is user,
    nice, system and irq time; softirq (where much of loopback TCP is handled, for
    whichever process) is apart.
    """
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    busy = user + nice + system + irq
    return busy / HZ, steal / HZ, softirq / HZ


class RssSampler(threading.Thread):
    """Samples the summed VmRSS of some processes every 0.2 s; keeps the peak."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = rss_bytes(pids)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.2):
            self.peak = max(self.peak, rss_bytes(self.pids))

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, rss_bytes(self.pids))


# -- servers -------------------------------------------------------------------------


def interpreter_label(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import platform, sys; print(platform.python_implementation().lower()"
         " + '%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    )
    return out.stdout.strip()


def start(system: System, logdir: str) -> None:
    system.log_path = os.path.join(logdir, re.sub(r"[^\w.-]+", "_", system.label) + ".log")
    log = open(system.log_path, "wb")
    system.process = subprocess.Popen(
        system.command, env={**os.environ, **system.env}, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, cwd=logdir, start_new_session=True,
    )
    log.close()


def wait_ready(system: System, timeout: float = 60) -> None:
    """Until the port accepts and, with workers, all of them run."""
    import socket

    assert system.process is not None
    want = 1 + system.workers if system.workers > 1 else 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if system.process.poll() is not None:
            raise RuntimeError("%s exited at start; its log: %s\n%s" % (
                system.label, system.log_path, tail(system.log_path)))
        try:
            socket.create_connection(("127.0.0.1", system.port), 0.5).close()
            if len(tree(system.process.pid, process_table())) >= want:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("%s not ready in %d s (want %d processes); its log: %s" % (
        system.label, timeout, want, system.log_path))


def tail(path: str, limit: int = 3000) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")[-limit:]


# -- windows -------------------------------------------------------------------------


class Run:
    """The state of one benchmark run."""

    def __init__(self, args: argparse.Namespace, systems: list[System], moto: Optional[MotoServer]):
        self.args = args
        self.systems = systems
        self.moto = moto

    def own_pids(self) -> list[int]:
        roots = [s.process.pid for s in self.systems if s.process is not None]
        if self.moto is not None and self.moto._process is not None:  # noqa: SLF001
            roots.append(self.moto._process.pid)  # noqa: SLF001
        return roots

    def own_cpu(self, table: dict[int, tuple[int, int]]) -> float:
        return sum(tree_cpu(pid, table) for pid in self.own_pids())

    def moto_cpu(self, table: dict[int, tuple[int, int]]) -> float:
        if self.moto is None or self.moto._process is None:  # noqa: SLF001
            return 0.0
        return tree_cpu(self.moto._process.pid, table)  # noqa: SLF001

    def wait_quiet(self) -> float:
        """
        Wait (at most --quiet-wait s) until 0.5 s pass with foreign load and steal
        under the limits; the seconds waited.
        """
        waited = 0.0
        while waited < self.args.quiet_wait:
            busy0, steal0, _ = machine_cpu()
            own0 = self.own_cpu(process_table()) + time.process_time()
            time.sleep(0.5)
            busy1, steal1, _ = machine_cpu()
            own1 = self.own_cpu(process_table()) + time.process_time()
            foreign = max(0.0, (busy1 - busy0) - (own1 - own0)) / 0.5
            steal = (steal1 - steal0) / 0.5
            if foreign <= self.args.max_foreign and steal <= self.args.max_steal:
                break
            waited += 0.5
        return waited

    def wrk(self, system: System, load: Load, seconds: float) -> dict[str, Any]:
        """One wrk window against ``system``: its figures."""
        assert system.process is not None
        env = {**os.environ, "START": str(system.next_id), "THREADS": str(load.threads),
               "BATCH": str(load.batch), "TEXT_BYTES": str(load.text_bytes)}
        command = [
            "wrk", "-t%d" % load.threads, "-c%d" % load.connections, "-d%ds" % seconds,
            "--timeout", "10s", "-s", os.path.join(HERE, "post.lua"),
            "http://127.0.0.1:%d/log" % system.port,
        ]
        table = process_table()
        pids = tree(system.process.pid, table)
        sampler = RssSampler(pids)
        busy0, steal0, softirq0 = machine_cpu()
        server0 = tree_cpu(system.process.pid, table)
        own0 = self.own_cpu(table)
        moto0 = self.moto_cpu(table)
        self0 = time.process_time()
        rusage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        sampler.start()
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        rss = sampler.stop()
        rusage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        table = process_table()
        busy1, steal1, softirq1 = machine_cpu()
        server = tree_cpu(system.process.pid, table) - server0
        own = self.own_cpu(table) - own0
        moto = self.moto_cpu(table) - moto0
        self_cpu = time.process_time() - self0
        wrk_cpu = (rusage1.ru_utime + rusage1.ru_stime) - (rusage0.ru_utime + rusage0.ru_stime)
        if out.returncode != 0 or "RESULT" not in out.stdout:
            raise RuntimeError("wrk failed against %s: %s\n%s\nserver log: %s\n%s" % (
                system.label, out.stdout, out.stderr, system.log_path, tail(system.log_path)))
        result = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out.stdout.split("RESULT", 1)[1])}
        system.next_id = max(system.next_id, result["max_id"] + 1)
        system.sent += result["sent"]
        system.acked += result["ok"] * load.batch
        requests = max(1, result["requests"])
        foreign = max(0.0, (busy1 - busy0) - own - wrk_cpu - self_cpu)
        return {
            "seconds": seconds,
            "elapsed_s": round(elapsed, 3),
            "requests": result["requests"],
            "ok": result["ok"],
            "non2xx": result["non2xx"],
            "socket_errors": result["errors"],
            "sent_messages": result["sent"],
            "rps": result["requests"] / seconds,
            "messages_per_s": result["requests"] * load.batch / seconds,
            "server_cpu_s": round(server, 3),
            "server_cores": round(server / elapsed, 3),
            "cpu_us_per_request": server / requests * 1e6,
            "cpu_us_per_message": server / (requests * load.batch) * 1e6,
            "p50_ms": result["p50_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000,
            "peak_rss_mib": rss / 2**20,
            "processes": len(pids),
            "wrk_cores": round(wrk_cpu / elapsed, 3),
            "wrk_cpu_us_per_request": wrk_cpu / requests * 1e6,
            "moto_cores": round(moto / elapsed, 3),
            "steal_cores": round((steal1 - steal0) / elapsed, 3),
            "foreign_cores": round(foreign / elapsed, 3),
            "softirq_cores": round((softirq1 - softirq0) / elapsed, 3),
        }

    def window(self, system: System, load: Load, repetition: int) -> dict[str, Any]:
        """A measured window, run again while disturbed (at most --retries times)."""
        attempts = []
        for attempt in range(1 + self.args.retries):
            waited = self.wait_quiet()
            figures = self.wrk(system, load, self.args.seconds)
            figures["quiet_wait_s"] = waited
            attempts.append(figures)
            if not disturbed(figures, self.args) or attempt == self.args.retries:
                break
            print("  %s %s: disturbed (steal %.2f, foreign %.2f cores), again" % (
                system.label, load.name, figures["steal_cores"], figures["foreign_cores"]),
                flush=True)
        kept = min(attempts, key=lambda f: f["steal_cores"] + f["foreign_cores"])
        record = {"system": system.label, "load": load.name, "repetition": repetition,
                  "kept": attempts.index(kept), "attempts": attempts,
                  "disturbed": disturbed(kept, self.args)}
        system.windows.append(record)
        print("  %-34s %-8s %8.0f req/s %7.1f us/req  p99 %6.2f ms  steal %.2f foreign %.2f%s" % (
            system.label, load.name, kept["rps"], kept["cpu_us_per_request"], kept["p99_ms"],
            kept["steal_cores"], kept["foreign_cores"], " *" if record["disturbed"] else ""),
            flush=True)
        return record


def disturbed(figures: dict[str, Any], args: argparse.Namespace) -> bool:
    return bool(figures["steal_cores"] > args.max_steal or figures["foreign_cores"] > args.max_foreign)


# -- stop and check ------------------------------------------------------------------


def stop(system: System) -> None:
    """SIGTERM the server (its whole group), wait, note the seconds and peak memory."""
    assert system.process is not None
    pids = tree(system.process.pid, process_table())
    system.final["hwm_sum_mib"] = round(hwm_bytes(pids) / 2**20, 1)
    started = time.monotonic()
    system.process.send_signal(signal.SIGTERM)
    try:
        code = system.process.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(system.process.pid, signal.SIGKILL)
        code = system.process.wait()
    system.final["stop_s"] = round(time.monotonic() - started, 3)
    system.final["exit_code"] = code
    flush = re.search(r"flush on stop done in ([0-9.]+) s", tail(system.log_path, 10**6))
    if flush:
        system.final["flush_s"] = float(flush.group(1))


def check_storage(system: System, moto: MotoServer) -> dict[str, Any]:
    """Read back the system's bucket: the content_ids stored against those acknowledged."""
    client = moto.botocore_client()
    try:
        keys, objects_bytes = [], 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=system.bucket):
            for item in page.get("Contents", []):
                keys.append(item["Key"])
                objects_bytes += item["Size"]
        uploads = client.list_multipart_uploads(Bucket=system.bucket).get("Uploads", [])
        ids: set[int] = set()
        lines = 0
        unreadable = []
        data_keys = [k for k in keys if not k.startswith("_loghandler/")]
        for key in data_keys:
            data = client.get_object(Bucket=system.bucket, Key=key)["Body"].read()
            try:
                text = gzip.decompress(data)
            except (OSError, EOFError, ValueError) as e:
                unreadable.append("%s: %s" % (key, e))
                continue
            found = [int(x) for x in re.findall(rb'"content_id":(\d+)', text)]
            lines += len(found)
            ids.update(found)
    finally:
        client.close()
    foreign = sum(1 for i in ids if i >= system.next_id)
    check = {
        "objects": len(data_keys),
        "object_bytes": objects_bytes,
        "left_staged": len(keys) - len(data_keys),
        "pending_uploads": len(uploads),
        "unreadable_objects": unreadable,
        "acked": system.acked,
        "sent": system.sent,
        "stored_lines": lines,
        "stored_unique": len(ids),
        "duplicates": lines - len(ids),
        "ids_never_sent": foreign,
    }
    check["ok"] = bool(
        system.acked <= len(ids) <= system.sent and check["duplicates"] == 0
        and foreign == 0 and not unreadable
    )
    return check


# -- report --------------------------------------------------------------------------


def median_figures(system: System, load: str) -> Optional[dict[str, Any]]:
    kept = [w["attempts"][w["kept"]] for w in system.windows if w["load"] == load and w["repetition"] >= 0]
    if not kept:
        return None
    out: dict[str, Any] = {}
    for name, value in kept[0].items():
        if isinstance(value, (int, float)):
            out[name] = statistics.median(k[name] for k in kept)
    out["windows"] = len(kept)
    out["disturbed_windows"] = sum(
        1 for w in system.windows if w["load"] == load and w["repetition"] >= 0 and w["disturbed"])
    return out


def summarize(systems: list[System], loads: list[str]) -> list[dict[str, Any]]:
    rows = []
    baselines = {(s.interpreter, s.workers): s for s in systems if s.kind == "baseline"}
    first_baseline = next((s for s in systems if s.kind == "baseline" and s.workers == 1), None)
    for load in loads:
        for system in systems:
            figures = median_figures(system, load)
            if figures is None:
                continue
            base = baselines.get((system.interpreter, system.workers))
            if system.kind == "go":
                base = first_baseline
            base_figures = median_figures(base, load) if base is not None else None
            row = {"system": system.label, "load": load, **figures}
            row["ratio"] = figures["rps"] / base_figures["rps"] if base_figures else None
            if LOADS[load].batch > 1:
                single = median_figures(system, "c50")
                row["messages_vs_c50_requests"] = (
                    figures["messages_per_s"] / single["rps"] if single else None)
            rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], systems: list[System]) -> None:
    head = "%-34s %-8s %8s %9s %6s %8s %8s %7s %7s %7s %6s %6s %6s %s" % (
        "system", "load", "req/s", "msg/s", "ratio", "CPU us/r", "CPU us/m", "p50 ms",
        "p99 ms", "RSS MiB", "wrk c", "steal", "frgn", "")
    print(head)
    print("-" * len(head))
    for row in rows:
        extra = []
        if row.get("messages_vs_c50_requests"):
            extra.append("msg x %.1f" % row["messages_vs_c50_requests"])
        if row["non2xx"] or row["socket_errors"]:
            extra.append("non2xx %d errors %d" % (row["non2xx"], row["socket_errors"]))
        if row["disturbed_windows"]:
            extra.append("*%d disturbed" % row["disturbed_windows"])
        print("%-34s %-8s %8.0f %9.0f %6s %8.1f %8.1f %7.2f %7.2f %7.1f %6.2f %6.2f %6.2f %s" % (
            row["system"], row["load"], row["rps"], row["messages_per_s"],
            "%.2f" % row["ratio"] if row["ratio"] is not None else "-",
            row["cpu_us_per_request"], row["cpu_us_per_message"], row["p50_ms"], row["p99_ms"],
            row["peak_rss_mib"], row["wrk_cores"], row["steal_cores"], row["foreign_cores"],
            " ".join(extra)))
    print()
    for system in systems:
        final = system.final
        line = "%-34s stop %.2f s, peak RSS (sum of VmHWM) %.1f MiB" % (
            system.label, final.get("stop_s", float("nan")), final.get("hwm_sum_mib", float("nan")))
        check = final.get("storage_check")
        if check:
            line += "; storage: acked %d, stored %d unique (sent %d), duplicates %d, never sent %d, " \
                    "objects %d, staged left %d, uploads left %d: %s" % (
                        check["acked"], check["stored_unique"], check["sent"], check["duplicates"],
                        check["ids_never_sent"], check["objects"], check["left_staged"],
                        check["pending_uploads"], "OK" if check["ok"] else "FAILED")
        print(line)


# -- main ----------------------------------------------------------------------------


def build_systems(args: argparse.Namespace, storages: list[str]) -> list[System]:
    systems = []
    for python in args.python:
        label = interpreter_label(python)
        twistd = os.path.join(os.path.dirname(python), "twistd")
        for workers in args.workers:
            port = free_port()
            systems.append(System(
                "baseline", "baseline", label, workers, "none",
                [python, os.path.join(HERE, "baseline_server.py"), str(port), "--workers", str(workers)],
                {}, port))
            for storage in storages:
                port = free_port()
                env = {"ADDR": "127.0.0.1", "PORT": str(port), "WORKERS": str(workers)}
                if storage == "none":
                    env["NO_UPLOAD"] = "1"
                else:
                    env.update({"SHUTDOWN_TIMEOUT_S": "60", "BUFFER_BUDGET_BYTES": str(1 << 30)})
                systems.append(System(
                    "loghandler", "loghandler", label, workers, storage,
                    [twistd, "-n", "--pidfile=", "loghandler"], env, port))
    if args.go_binary:
        port = free_port()
        systems.append(System(
            "go", "go", "go", 1, "moto", [os.path.abspath(args.go_binary)],
            {"ADDR": "127.0.0.1", "PORT": str(port), "STORAGE": "aws"}, port))
    return systems


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", action="append", default=None,
                        help="interpreter for the servers (repeatable; default: this one); "
                        "twistd is taken from its directory")
    parser.add_argument("--workers", default="1",
                        help="comma-separated worker counts (WORKERS=N; baseline --workers N)")
    parser.add_argument("--storage", default="none,moto", help="comma-separated: none (NO_UPLOAD=1), moto (default: both)")
    parser.add_argument("--loads", default="c50,c1,batch100",
                        help="comma-separated: %s" % ", ".join(LOADS))
    parser.add_argument("--go-binary", help="the Go original's binary, measured against moto")
    parser.add_argument("--seconds", type=int, default=10, help="per measured window (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds per system and load (default 3)")
    parser.add_argument("--repeat", type=int, default=2, help="windows per system and load (default 2)")
    parser.add_argument("--max-steal", type=float, default=0.05, help="cores (default 0.05)")
    parser.add_argument("--max-foreign", type=float, default=0.15, help="cores (default 0.15)")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a disturbed window (default 2)")
    parser.add_argument("--quiet-wait", type=float, default=20,
                        help="seconds to wait for a quiet machine before a window (default 20)")
    parser.add_argument("--json", default=os.path.join(HERE, "http_throughput.json"),
                        help="results file (default bench/http_throughput.json, git-ignored)")
    parser.add_argument("--logs", help="directory for the servers' logs (default: a temporary one)")
    args = parser.parse_args()
    args.python = [os.path.abspath(p) if os.sep in p else shutil.which(p) or p
                   for p in (args.python or [sys.executable])]
    args.workers = [int(w) for w in args.workers.split(",")]
    loads = args.loads.split(",")
    storages = args.storage.split(",")
    for name in loads:
        if name not in LOADS:
            sys.exit("--loads: unknown load %r (known: %s)" % (name, ", ".join(LOADS)))
    for name in storages:
        if name not in ("none", "moto"):
            sys.exit("--storage: none or moto, not %r" % name)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")

    # SIGTERM stops the servers and moto too (the finally below), like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit("stopped by SIGTERM"))
    logdir = args.logs or tempfile.mkdtemp(prefix="bench-http-")
    os.makedirs(logdir, exist_ok=True)
    systems = build_systems(args, storages)
    needs_moto = any(s.storage == "moto" for s in systems)
    moto = MotoServer(bucket="bench") if needs_moto else None
    run = Run(args, systems, moto)
    started_at = time.time()
    load_avg_before = os.getloadavg()
    try:
        if moto is not None:
            moto.start()
        for i, system in enumerate(systems):
            if system.storage == "moto":
                assert moto is not None
                system.bucket = "bench-%d" % i
                moto.create_bucket(system.bucket)
                system.env.update({**moto.env(), "AWS_BUCKET": system.bucket})
            start(system, logdir)
        for system in systems:
            wait_ready(system)
            if system.workers > 1:
                processes = len(tree(system.process.pid, process_table()))  # type: ignore[union-attr]
                if processes < system.workers + 1:
                    raise RuntimeError("%s: %d process(es) for %d workers (is WORKERS supported?)"
                                       % (system.label, processes, system.workers))
        print("servers up (logs in %s); warm-up %d s per system and load" % (logdir, args.warmup),
              flush=True)
        for load in loads:
            for system in systems:
                if load in system.loads(loads):
                    run.wrk(system, LOADS[load], args.warmup)
        for repetition in range(args.repeat):
            print("repetition %d" % (repetition + 1), flush=True)
            for load in loads:
                order = systems[repetition % len(systems):] + systems[:repetition % len(systems)]
                for system in order:
                    if load in system.loads(loads):
                        run.window(system, LOADS[load], repetition)
        for system in systems:
            stop(system)
            if system.storage == "moto":
                assert moto is not None
                system.final["storage_check"] = check_storage(system, moto)
    finally:
        for system in systems:
            if system.process is not None and system.process.poll() is None:
                os.killpg(system.process.pid, signal.SIGKILL)
                system.process.wait()
        if moto is not None:
            moto.stop()

    rows = summarize(systems, loads)
    print()
    print_table(rows, systems)
    with open(args.json, "w") as f:
        json.dump({
            "command": sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
            "seconds": round(time.time() - started_at),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_before": load_avg_before, "loadavg_after": os.getloadavg()},
            "settings": {k: v for k, v in vars(args).items()},
            "table": rows,
            "systems": [{"label": s.label, "command": s.command,
                         "env": {k: v for k, v in s.env.items() if "SECRET" not in k},
                         "final": s.final, "windows": s.windows} for s in systems],
        }, f, indent=1)
    print("\nresults: %s" % args.json)
    failed = [s.label for s in systems if s.final.get("storage_check", {}).get("ok") is False]
    if failed:
        sys.exit("storage check FAILED for: %s" % ", ".join(failed))


if __name__ == "__main__":
    main()
