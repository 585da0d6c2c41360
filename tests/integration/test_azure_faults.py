"""
Crash and fault tests with ``STORAGE=azure``: ``twistd -n loghandler`` daemons under
load against Azurite (:mod:`tests.integration.azurite`), killed, doubled, cut off
from storage or put behind :class:`tests.integration.faultproxy.FaultProxy`; then
every blob is read back straight from Azurite with azure-storage-blob and checked
line by line.

With Azure there is nothing staged and nothing to recover: every checkpoint is a
block appended to the key's append blob (``x-ms-blob-condition-appendpos``, the
block named in its first gzip header and read back on every refusal; see
``loghandler/storage/azure/writer.py``).  What every test checks: every blob is an
append blob of ``application/gzip``, whole gzip members ending in a newline, its
tagged members exactly its committed blocks, no block tag twice, rollover families
without gaps; every line in its own key; no line twice; no line that was never sent
or whose every request got an error answer; and the acknowledged lines that must
survive (per test) are there.

- :meth:`AzureFaultTests.test_sigkill_under_load` (a): ~300 messages/s over 10
  clients plus 8 KB texts at 150/s, ``CHECKPOINT_S=1``; SIGKILL after 6 s; a new
  daemon with the same settings takes 2 s more load and is stopped with SIGTERM.
  Every message answered 200 more than ``CHECKPOINT_S`` + 1 s before the kill is
  found once; the loss is measured in messages and in seconds (the age at the kill
  of the oldest lost acknowledged message), and no line is stored twice.
- :meth:`AzureFaultTests.test_durable_sigkill` (a): the same with ``ACK=durable``:
  every message answered 200 is found once.
- :meth:`AzureFaultTests.test_two_daemons_same_blobs` (b): two daemons append to the
  same three blobs at once (``CHECKPOINT_S=0.2``, streams rotated every ~2 s), then
  both get SIGTERM: every acknowledged message once; the blocks of both writers
  interleave in the blobs.
- :meth:`AzureFaultTests.test_azurite_restarted_under_load` (c): Azurite of its own
  is stopped with SIGTERM under load and started again 4 s later on the same port
  and data folder while the daemon keeps taking messages (200, or 503 as its budget
  allows); then SIGTERM: every acknowledged message once.
- :meth:`AzureFaultTests.test_fault_proxy_lost_answers_stalls_cuts` (d): two daemons
  through the fault proxy in front of Azurite, which loses 30% of the answers to
  writes after forwarding them, stalls requests (and answers), cuts answers, refuses
  requests and answers 5xx, then forwards cleanly; SIGTERM: every acknowledged
  message once, and the daemons' logs show blocks recognised by their read-back as
  landed though their answer was lost.

Only SIGTERM ever stops Azurite here: it saves its database every 5 s and on
SIGTERM, so a SIGKILL could lose blobs it acknowledged.  Each test is bounded by
trial's ``timeout`` (120 s): the blocking body runs in a thread and the cleanups
kill the daemons and stop the load, which ends its waits.  Each run prints one
``AZURE ... SUMMARY`` line and appends its figures to ``azure-faults-report.json`` in
trial's working directory.  The scenarios (:func:`sigkill_scenario`...) take an
:class:`AzureHarness` and are shared with ``bench/azure_crash.py``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.integration.azurite import AzuriteServer, shared_azurite
from tests.integration.faultproxy import FaultProxy, FaultRule
from tests.integration.test_azure_end_to_end import AzureContainer, write_report
from tests.integration.test_crash import (
    BIG_CLIENT,
    NO_ANSWER,
    UPLOAD_MARGIN_S,
    HarnessClosed,
    Load,
    Sent,
    check_bucket,
)
from tests.integration.test_faults import Daemon, Ledger, sender, utc_key, wait_exits

#: Seconds a test may take in all (trial fails it after that).
TEST_TIMEOUT = 120

#: The report every scenario's figures are appended to.
REPORT = "azure-faults-report.json"

#: The start of a twistd log entry (its timestamp); continuation lines do not have it.
_ENTRY = re.compile(r"^\d{4}-\d\d-\d\dT", re.M)


def log_entries(log: str) -> list[str]:
    """A twistd log split into its entries (a traceback stays with its entry)."""
    starts = [m.start() for m in _ENTRY.finditer(log)] + [len(log)]
    return [log[a:b] for a, b in zip(starts, starts[1:])]


def _g(seconds: float) -> str:
    """A number of seconds as an environment value (``1``, ``0.5``)."""
    return f"{seconds:g}"


# -- the harness ---------------------------------------------------------------------


class AzureHarness:
    """
    Daemons on one Azurite container (through ``proxy`` when given), their loads,
    and the reading back of the container.  Blocking; meant for a thread.

    :ivar azurite: the emulator.
    :ivar container: reads the container back (:class:`AzureContainer`).
    :ivar daemons: every daemon started, for :meth:`close`.
    """

    def __init__(
        self, azurite: AzuriteServer, workdir: str, proxy: Optional[FaultProxy] = None
    ) -> None:
        self.azurite = azurite
        self.workdir = workdir
        self.proxy = proxy
        self.container = AzureContainer(azurite)
        self.daemons: list[Daemon] = []
        self.loads: list[Load] = []
        self.senders: list[tuple[threading.Event, list[threading.Thread]]] = []
        self.closed = threading.Event()
        self._names = itertools.count(1)

    def close(self) -> None:
        """Stop every load and sender, SIGKILL every daemon still running."""
        self.closed.set()
        for load in self.loads:
            load.stop()
        for stop, _ in self.senders:
            stop.set()
        for daemon in self.daemons:
            daemon.kill()

    def sleep(self, seconds: float) -> None:
        """Sleep, ended early by :meth:`close`."""
        if self.closed.wait(max(0.0, seconds)):
            raise HarnessClosed()

    def env(self) -> dict[str, str]:
        """The daemons' Azure settings: Azurite's, or the proxy's address."""
        env = self.azurite.env()
        if self.proxy is not None:
            env["AZURE_BLOB_ENDPOINT"] = f"{self.proxy.url}/{self.azurite.account}"
        return env

    def start(self, name: str, count: int = 1, **settings: str) -> list[Daemon]:
        """Start ``count`` daemons at once; wait until each answers ``/healthz`` 200."""
        started = []
        for _ in range(count):
            if self.closed.is_set():
                raise HarnessClosed()
            daemon = Daemon(
                f"{name}{next(self._names)}", {**self.env(), **settings}, self.workdir
            )
            self.daemons.append(daemon)
            started.append(daemon)
        for daemon in started:
            daemon.wait_ready()
        return started

    def load(self, daemon: Daemon, first_id: int = 1, **options: Any) -> Load:
        """A :class:`Load` on ``daemon`` whose content_ids start at ``first_id``, started."""
        load = Load(daemon.port, first_id=first_id, **options)
        self.loads.append(load)
        load.start()
        return load

    def send(
        self, daemons: list[Daemon], ledger: Ledger, rate: float, per_daemon: int = 2
    ) -> tuple[threading.Event, list[threading.Thread]]:
        """
        Start :func:`~tests.integration.test_faults.sender` threads (``per_daemon``
        per daemon, each at ``rate`` messages a second, clients 1-3, client 1's
        texts 10 KB); set the event to stop them.
        """
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=sender,
                args=(d, ledger, stop, rate, 1000 * n + t),
                daemon=True,
                name=f"sender-{d.name}-{t}",
            )
            for n, d in enumerate(daemons)
            for t in range(per_daemon)
        ]
        self.senders.append((stop, threads))
        for thread in threads:
            thread.start()
        return stop, threads

    @staticmethod
    def stop_senders(stop: threading.Event, threads: list[threading.Thread]) -> list[str]:
        """Stop the senders :meth:`send` started and wait for them; the problems."""
        stop.set()
        for thread in threads:
            thread.join(15)
        if any(t.is_alive() for t in threads):
            return ["HARNESS: a sender did not stop"]
        return []

    def sigkill(self, daemon: Daemon) -> tuple[float, Optional[int]]:
        """SIGKILL ``daemon``: when (``time.monotonic()``) and its exit status."""
        killed_at = time.monotonic()
        daemon.process.send_signal(signal.SIGKILL)
        try:
            code: Optional[int] = daemon.process.wait(10)
        except Exception:
            code = None
        return killed_at, code

    def stop(self, daemons: list[Daemon], timeout: float) -> tuple[list[float], list[str]]:
        """
        SIGTERM ``daemons``, wait for their exits; the SIGTERM-to-exit seconds and the
        problems (an unclean exit, no ``flush on stop done``, a traceback).
        """
        for daemon in daemons:
            daemon.sigterm()
        try:
            exits = wait_exits(daemons, timeout)
        except AssertionError as e:
            return [], [f"a daemon did not stop cleanly after SIGTERM: {e}"]
        problems = []
        for daemon in daemons:
            if daemon.flush_seconds() is None:
                problems.append(
                    f"{daemon.name}: no 'flush on stop done' line\n{daemon.relevant_log()}"
                )
        return exits, problems

    def log_problems(self) -> list[str]:
        """
        Tracebacks and critical lines in any daemon's log.
        """
        problems = []
        for daemon in self.daemons:
            for entry in log_entries(daemon.log()):
                if "Traceback" in entry or "#critical]" in entry:
                    problems.append(f"{daemon.name}: a traceback or critical error:\n{entry[-4000:]}")
        return problems

    def logs(self, limit: int = 30) -> str:
        """The relevant lines of every daemon's log, for failure messages."""
        return "\n".join(d.relevant_log(limit) for d in self.daemons)

    def daemon_figures(self) -> dict[str, Any]:
        """Per daemon: flush seconds, exit seconds, retried calls, lost answers found."""
        return {
            d.name: {
                "flush_s": d.flush_seconds(),
                "exit_s": None if d.exit_seconds is None else round(d.exit_seconds, 2),
                "retried_calls": d.count(r"failed \(.*\); retry \d+ in"),
                "answer_lost_block_landed": d.count(r"was ours: an earlier attempt landed"),
                "rolled_over": d.count(r"takes no more blocks \("),
            }
            for d in self.daemons
        }


class Records:
    """The records of several loads as one (:func:`check_bucket` reads ``records``)."""

    def __init__(self, *loads: Load) -> None:
        self.records: dict[bytes, Sent] = {}
        for load in loads:
            self.records.update(load.records)


def interleavings(container: AzureContainer) -> int:
    """How many times the writer changes from one block to the next, over all blobs."""
    return sum(
        sum(1 for a, b in zip(w, w[1:]) if a != b)
        for w in (blob.writers() for blob in container.blobs.values())
    )


# -- checking against a ledger -------------------------------------------------------


def check_ledger(
    harness: AzureHarness, ledger: Ledger, figures: dict[str, Any], problems: list[str]
) -> None:
    """
    Read the container back and check it against ``ledger`` (of
    :func:`~tests.integration.test_faults.sender`): valid blobs, each line in its
    key, every acknowledged line once, none twice, none refused, none unknown.
    """
    chat, bad, total_bytes = harness.container.read_chat()
    found: Counter[bytes] = Counter()
    where: dict[bytes, list[str]] = defaultdict(list)
    misplaced: list[str] = []
    for name, lines in chat.items():
        for line in lines:
            found[line] += 1
            where[line].append(name)
            try:
                value = json.loads(line)
                wanted = utc_key(value["timestamp"], value["client_id"])
            except (ValueError, KeyError, TypeError):
                misplaced.append(f"{name}: not a message line {line[:120]!r}")
                continue
            if name != wanted:
                misplaced.append(f"{name}: content_id {value['content_id']} belongs in {wanted}")
    duplicates = [line for line, n in found.items() if n > 1]
    lost = [line for line in ledger.acked if line not in found]
    refused = [line for line in found if line in ledger.refused and line not in ledger.acked]
    unknown = [
        line
        for line in found
        if line not in ledger.acked and line not in ledger.refused and line not in ledger.in_doubt
    ]

    def describe(line: bytes) -> str:
        try:
            value = json.loads(line)
            head = f"content_id {value['content_id']} client {value['client_id']}"
        except (ValueError, KeyError, TypeError):
            head = repr(line[:100])
        return f"{head}; {ledger.at(line)}; found {found[line]}x in {where.get(line, [])}"

    figures.update(
        acknowledged=len(ledger.acked),
        refused=len(ledger.refused),
        in_doubt=len(ledger.in_doubt),
        answers={str(k): v for k, v in sorted(ledger.statuses.items())},
        retried_503=ledger.retried_503,
        found=sum(found.values()),
        duplicates=len(duplicates),
        lost=len(lost),
        found_though_refused=len(refused),
        unknown=len(unknown),
        blob_bytes=total_bytes,
        **harness.container.figures(),
    )
    for what, lines in (
        ("acknowledged lines LOST", lost),
        ("lines stored more than once", duplicates),
        ("lines stored though every request for them got an error answer", refused),
        ("lines stored that nobody sent", unknown),
    ):
        if lines:
            problems.append(
                f"{len(lines)} {what}, e.g.:\n" + "\n".join("  " + describe(x) for x in lines[:10])
            )
    if misplaced:
        problems.append(f"{len(misplaced)} lines in the wrong key:\n  " + "\n  ".join(misplaced[:10]))
    others = {status: n for status, n in ledger.statuses.items() if status not in (200, 503)}
    if others:
        problems.append(f"answers other than 200 and 503 (0: none): {others}")
    if bad:
        problems.append(
            "blobs that are not valid:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(bad.items()))
        )


# -- scenarios -----------------------------------------------------------------------


def sigkill_scenario(
    harness: AzureHarness,
    *,
    label: str = "sigkill",
    ack: str = "accepted",
    seconds: float = 6.5,
    checkpoint_s: float = 1.0,
    after_seconds: float = 2.0,
    durable_timeout_s: float = 5.0,
    load_options: Optional[dict[str, Any]] = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[str]]:
    """
    One daemon under load for ``seconds``, SIGKILL; a new daemon with the same
    settings takes ``after_seconds`` more load and is stopped with SIGTERM; read
    back and check.

    With ``ack="accepted"`` every message answered 200 more than ``checkpoint_s`` +
    :data:`~tests.integration.test_crash.UPLOAD_MARGIN_S` before the kill must be
    found; with ``ack="durable"`` every message answered 200.  Every message the new
    daemon answered 200 must be found.  The figures give the loss: acknowledged
    messages lost, and the ages at the kill of the newest and oldest of them.

    :returns: the figures and the problems found (empty: all held).
    """
    settings = {
        "QUEUE_TIMEOUT_MIN": "600",
        "MAX_CLIENT_ID": str(BIG_CLIENT),
        "CHECKPOINT_S": _g(checkpoint_s),
        "ACK": ack,
        "DURABLE_TIMEOUT_S": _g(durable_timeout_s),
        "SHUTDOWN_TIMEOUT_S": "10",
    }
    figures: dict[str, Any] = {"test": label, "ack": ack, "settings": settings}
    problems: list[str] = []
    (victim,) = harness.start("victim", **settings)
    load = harness.load(victim, **(load_options or {}))
    harness.sleep(seconds)
    killed_at, code = harness.sigkill(victim)
    load.stop()
    figures["victim_exit_status"] = code
    if code != -signal.SIGKILL:
        problems.append(f"HARNESS: the victim did not die of SIGKILL: exit status {code}")
    if not load.join():
        problems.append("HARNESS: a load thread did not stop")
    figures.update(load.figures(until=killed_at))
    log(f"AZURE {label}: killed after {killed_at - load.started:.1f} s of load; {load.figures(killed_at)}")
    if figures["acknowledged_200"] == 0:
        problems.append("HARNESS: no message was answered 200 before the kill")

    (restarted,) = harness.start("restarted", **settings)
    figures["kill_to_ready_s"] = round(time.monotonic() - killed_at, 2)
    after = harness.load(restarted, first_id=10_000_000, **(load_options or {}))
    harness.sleep(after_seconds)
    after.stop()
    after.join()
    figures["after_kill"] = after.figures()
    exits, stop_problems = harness.stop([restarted], 20.0)
    problems.extend(stop_problems)
    figures["restarted_sigterm_to_exit_s"] = round(exits[0], 2) if exits else None
    figures["restarted_flush_s"] = restarted.flush_seconds()

    window = checkpoint_s + UPLOAD_MARGIN_S
    second = {id(r) for r in after.records.values()}
    durable = ack == "durable"

    def must_find(r: Sent) -> bool:
        """Whether the container must hold ``r``'s line: every 200 with ACK=durable, else a
        200 from the new daemon or sent more than the checkpoint window before the kill."""
        return r.status == 200 and (
            durable or id(r) in second or killed_at - r.sent_at > window
        )

    if durable:
        must_text = "answered 200 (ACK=durable)"
    else:
        must_text = (
            f"answered 200 by the new daemon, or sent more than {window:g} s before the kill"
        )
        if figures["acknowledged_202"] or after.figures()["acknowledged_202"]:
            problems.append("answers 202 with ACK=accepted")
    records = Records(load, after)
    if len(records.records) != len(load.records) + len(after.records):
        problems.append("HARNESS: the two loads sent a line alike")
    check_bucket(harness.container, records, killed_at, must_find, must_text, figures, problems)  # type: ignore[arg-type]
    figures.update(harness.container.figures())
    figures["in_flight_at_kill"] = sum(1 for r in load.records.values() if r.status == NO_ANSWER)
    figures["lost_window_bound_s"] = window
    problems.extend(harness.log_problems())
    figures["daemons"] = harness.daemon_figures()
    figures["problems"] = len(problems)
    return figures, problems


def two_daemons_scenario(
    harness: AzureHarness,
    *,
    seconds: float = 8.0,
    rate: float = 60.0,
    checkpoint_s: float = 0.2,
    queue_timeout_min: float = 0.03,
    label: str = "two_daemons",
) -> tuple[dict[str, Any], list[str]]:
    """
    Two daemons on the same blobs at once (same clients, same date), both under load
    for ``seconds``, both stopped with SIGTERM; every acknowledged line once.
    """
    settings = {
        "CHECKPOINT_S": _g(checkpoint_s),
        "QUEUE_TIMEOUT_MIN": _g(queue_timeout_min),
        "SHUTDOWN_TIMEOUT_S": "20",
    }
    figures: dict[str, Any] = {"test": label, "settings": settings}
    problems: list[str] = []
    daemons = harness.start("daemon", count=2, **settings)
    ledger = Ledger()
    stop, threads = harness.send(daemons, ledger, rate)
    harness.sleep(seconds)
    problems.extend(harness.stop_senders(stop, threads))
    exits, stop_problems = harness.stop(daemons, 35.0)
    problems.extend(stop_problems)
    figures["sigterm_to_exit_s"] = [round(e, 2) for e in exits]
    check_ledger(harness, ledger, figures, problems)
    figures["writer_changes"] = interleavings(harness.container)
    if len(figures["blocks_by_writer"]) != 2 or figures["writer_changes"] == 0:
        problems.append(
            f"HARNESS: the two daemons' blocks did not interleave: {figures['blocks_by_writer']},"
            f" {figures['writer_changes']} writer changes"
        )
    problems.extend(harness.log_problems())
    figures["daemons"] = harness.daemon_figures()
    figures["problems"] = len(problems)
    return figures, problems


def azurite_restart_scenario(
    harness: AzureHarness,
    *,
    before_s: float = 2.0,
    outage_s: float = 4.0,
    after_s: float = 3.0,
    rate: float = 80.0,
    label: str = "azurite_restarted",
) -> tuple[dict[str, Any], list[str]]:
    """
    One daemon under load; Azurite (the harness's own) stopped with SIGTERM after
    ``before_s``, started again on the same port and data folder ``outage_s``
    later; ``after_s`` more load; SIGTERM.  Every acknowledged line once.
    """
    azurite = harness.azurite
    settings = {"CHECKPOINT_S": "0.5", "QUEUE_TIMEOUT_MIN": "600", "SHUTDOWN_TIMEOUT_S": "25"}
    figures: dict[str, Any] = {"test": label, "settings": settings}
    problems: list[str] = []
    (daemon,) = harness.start("daemon", **settings)
    ledger = Ledger()
    stop, threads = harness.send([daemon], ledger, rate)
    harness.sleep(before_s)
    acked_before = len(ledger.acked)
    down_at = time.monotonic()
    azurite.stop()
    figures["azurite_sigterm_to_exit_s"] = round(time.monotonic() - down_at, 2)
    harness.sleep(outage_s - (time.monotonic() - down_at))
    statuses_down = Counter(ledger.statuses)
    acked_down = len(ledger.acked)
    up_from = time.monotonic()
    azurite.start()
    up_at = time.monotonic()
    figures["azurite_start_s"] = round(up_at - up_from, 2)
    figures["outage_s"] = round(up_at - down_at, 2)
    harness.sleep(after_s)
    problems.extend(harness.stop_senders(stop, threads))
    figures["acknowledged_while_down"] = acked_down - acked_before
    figures["answers_until_back"] = {str(k): v for k, v in sorted(statuses_down.items())}
    exits, stop_problems = harness.stop([daemon], 40.0)
    problems.extend(stop_problems)
    figures["sigterm_to_exit_s"] = round(exits[0], 2) if exits else None
    check_ledger(harness, ledger, figures, problems)
    figures["daemons"] = harness.daemon_figures()
    if figures["daemons"][daemon.name]["retried_calls"] == 0:
        problems.append("HARNESS: the daemon never retried: did it see the outage?")
    if figures["acknowledged_while_down"] == 0:
        problems.append("HARNESS: no message was acknowledged while Azurite was down")
    problems.extend(harness.log_problems())
    figures["problems"] = len(problems)
    return figures, problems


def fault_proxy_scenario(
    harness: AzureHarness, *, rate: float = 50.0, label: str = "fault_proxy"
) -> tuple[dict[str, Any], list[str]]:
    """
    Two daemons through the harness's fault proxy (same blobs) under load while the
    proxy goes through its faults; SIGTERM; every acknowledged line once.
    """
    proxy = harness.proxy
    assert proxy is not None
    settings = {"CHECKPOINT_S": "0.3", "QUEUE_TIMEOUT_MIN": "0.03", "SHUTDOWN_TIMEOUT_S": "20"}
    figures: dict[str, Any] = {"test": label, "settings": settings}
    problems: list[str] = []
    daemons = harness.start("daemon", count=2, **settings)
    proxy.reset_stats()
    ledger = Ledger()
    stop, threads = harness.send(daemons, ledger, rate)
    phases: list[tuple[str, float, tuple[FaultRule, ...]]] = [
        ("clean", 1.5, ()),
        # the write lands, its answer is lost: the read-back must recognise the block
        ("drop_answer", 4.0, (FaultRule(fault="drop_answer", probability=0.3, seed=1, methods=("PUT",)),)),
        (
            "stall",
            3.0,
            (
                # held before forwarding, then forwarded
                FaultRule(fault="stall", probability=0.2, seed=2, seconds=1.5),
                # forwarded, its answer held, then the connection closed: lost late
                FaultRule(
                    fault="stall", probability=0.2, seed=3, seconds=1.5, at="response", then="close"
                ),
            ),
        ),
        ("cut", 3.0, (FaultRule(fault="cut", probability=0.3, seed=4),)),
        (
            "refuse_5xx",
            2.0,
            (
                FaultRule(fault="refuse", probability=0.2, seed=5),
                FaultRule(fault="error5xx", status=503, probability=0.2, seed=6),
                FaultRule(fault="error5xx", status=500, probability=0.1, seed=7),
            ),
        ),
        ("clean", 2.0, ()),
    ]
    timeline = []
    try:
        for name, seconds, rules in phases:
            timeline.append(f"{name}@{time.monotonic() - ledger.started:.1f}s")
            proxy.set_mode(*rules)
            harness.sleep(seconds)
    finally:
        proxy.clear_mode()
        proxy.release()
        problems.extend(harness.stop_senders(stop, threads))
    exits, stop_problems = harness.stop(daemons, 35.0)
    problems.extend(stop_problems)
    stats = proxy.stats()
    figures.update(
        phases=timeline,
        sigterm_to_exit_s=[round(e, 2) for e in exits],
        faults=stats["fault_totals"],
        faults_by_operation=stats["faults"],
        requests=stats["requests"],
    )
    check_ledger(harness, ledger, figures, problems)
    figures["writer_changes"] = interleavings(harness.container)
    figures["daemons"] = harness.daemon_figures()
    recognised = sum(d["answer_lost_block_landed"] for d in figures["daemons"].values())
    figures["answer_lost_block_landed"] = recognised
    if stats["fault_totals"]["drop_answer"] == 0 or recognised == 0:
        problems.append(
            f"HARNESS: {stats['fault_totals']['drop_answer']} answers dropped, {recognised}"
            " blocks recognised by their read-back: the lost-answer path was not exercised"
        )
    problems.extend(harness.log_problems())
    figures["problems"] = len(problems)
    return figures, problems


def summary(figures: dict[str, Any]) -> str:
    """One line of the figures that matter."""
    keys = (
        "ack",
        "tried",
        "acknowledged",
        "acknowledged_200",
        "acknowledged_202",
        "in_flight_at_kill",
        "found",
        "duplicates",
        "lost",
        "lost_acknowledged",
        "must_find",
        "must_find_lost",
        "newest_lost_age_s",
        "oldest_lost_age_s",
        "lost_window_bound_s",
        "requests_per_s",
        "latency_200",
        "blobs",
        "blocks_total",
        "blocks_by_writer",
        "writer_changes",
        "acknowledged_while_down",
        "answers_until_back",
        "outage_s",
        "answer_lost_block_landed",
        "faults",
        "sigterm_to_exit_s",
        "restarted_flush_s",
        "wall_s",
        "problems",
    )
    shown = {k: figures[k] for k in keys if k in figures}
    return f"AZURE SUMMARY {figures.get('test')}: " + json.dumps(shown, sort_keys=True)


# -- the tests -----------------------------------------------------------------------


class AzureFaultTests(TestCase):
    """Daemons against Azurite under crashes and faults (see the module docstring)."""

    timeout = TEST_TIMEOUT

    def setUp(self) -> None:
        self.workdir = os.path.abspath(".")

    def harness(self, azurite: Optional[AzuriteServer] = None, proxy: bool = False) -> AzureHarness:
        """A harness on the shared Azurite (reset), or on ``azurite``; with a proxy if asked."""
        if azurite is None:
            azurite = shared_azurite()
            azurite.reset()
        fault_proxy = None
        if proxy:
            fault_proxy = FaultProxy(
                f"http://127.0.0.1:{azurite.port}",
                enforce_if_match=False,
                max_stall=25.0,
                credentials=None,
            )
            fault_proxy.start()
            self.addCleanup(fault_proxy.stop)
        harness = self.harness_ = AzureHarness(azurite, self.workdir, fault_proxy)
        self.addCleanup(harness.close)
        return harness

    def run_scenario(
        self, body: Callable[[], tuple[dict[str, Any], list[str]]]
    ) -> "Deferred[None]":
        """
        Run the blocking scenario in a thread (so that trial's ``timeout`` can end
        it), record its figures, and fail with every problem at once.
        """

        def run() -> None:
            started = time.monotonic()
            figures, problems = body()
            figures["wall_s"] = round(time.monotonic() - started, 1)
            print(summary(figures))
            write_report(self.workdir, REPORT, figures)
            if problems:
                self.fail(
                    f"{len(problems)} problems:\n\n"
                    + "\n\n".join(problems)
                    + "\n\n"
                    + summary(figures)
                    + f"\n(all figures in {REPORT})\n\ndaemon logs (warnings, errors, flush):\n"
                    + self.harness_.logs()
                )

        return deferToThread(run)

    def test_sigkill_under_load(self) -> "Deferred[None]":
        """
        (a) SIGKILL after 6 s of ~300 messages/s over 10 clients plus 8 KB texts at
        150/s (``CHECKPOINT_S=1``), then a new daemon with the same settings: every
        message answered 200 more than ``CHECKPOINT_S`` + 1 s before the kill is
        stored once, as is everything the new daemon answered 200; nothing twice.
        """
        harness = self.harness()
        return self.run_scenario(lambda: sigkill_scenario(harness, label="azure_sigkill"))

    def test_durable_sigkill(self) -> "Deferred[None]":
        """
        (a) As :meth:`test_sigkill_under_load` with ``ACK=durable``: every message
        answered 200 is stored once.
        """
        harness = self.harness()
        return self.run_scenario(
            lambda: sigkill_scenario(
                harness,
                label="azure_durable_sigkill",
                ack="durable",
                load_options={"connections": 8},
            )
        )

    def test_two_daemons_same_blobs(self) -> "Deferred[None]":
        """
        (b) Two daemons append to the same three blobs at once for 8 s, then both
        get SIGTERM: every acknowledged message once.
        """
        harness = self.harness()
        return self.run_scenario(lambda: two_daemons_scenario(harness))

    def test_azurite_restarted_under_load(self) -> "Deferred[None]":
        """
        (c) Azurite stopped (SIGTERM) and started again on the same port and data
        folder 4 s later, under load; then SIGTERM: every acknowledged message once.
        """
        azurite = AzuriteServer()
        self.addCleanup(azurite.close)
        azurite.start()
        harness = self.harness(azurite)
        return self.run_scenario(lambda: azurite_restart_scenario(harness))

    def test_fault_proxy_lost_answers_stalls_cuts(self) -> "Deferred[None]":
        """
        (d) Two daemons through the fault proxy: lost answers after forwarding,
        stalls, cut answers, refusals, 5xx; then SIGTERM: every acknowledged
        message once, and the read-back recognised blocks whose answer was lost.
        """
        harness = self.harness(proxy=True)
        return self.run_scenario(lambda: fault_proxy_scenario(harness))
