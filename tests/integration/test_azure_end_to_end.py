"""
End to end with ``STORAGE=azure``: ``twistd -n loghandler`` as a subprocess against
Azurite (Azure Storage's emulator, :mod:`tests.integration.azurite`), the blobs read
back with azure-storage-blob, straight from Azurite.

- :meth:`AzureEndToEndTests.test_two_dates_ten_clients_then_appends`: 20,000
  messages over 10 clients and 2 UTC dates (plus invalid requests, answered 4xx),
  SIGTERM; the container holds exactly the 20 blobs
  ``chat/{date}/content_logs_{date}_{client}``, each an append blob of
  ``application/gzip`` without ``Content-Encoding``, whole gzip members ending in a
  newline, with every acknowledged message once in its own client's and date's blob
  and no other line.  Each block starts with a gzip member whose extra field names
  it (subfield ``Lh``: writer ID and sequence number): the tagged members of a blob
  are exactly its committed blocks, and no tag is seen twice.  A second daemon on the
  same blobs appends: each blob's old bytes are a prefix of its new bytes (the first
  run's lines once, the second run's after them).
- :meth:`AzureEndToEndTests.test_rollover_small_max_blocks`: ``AZURE_MAX_BLOCKS=5``
  and ``CHECKPOINT_S=0.2``: two streams (one sender each, so the acceptance order is
  the sending order) cross the limit several times; the blobs of a key are ``key``,
  ``key.1``, ``key.2``... without a gap, none holds more than 5 committed blocks and
  each but the last exactly 5 (one writer at a time), and the lines of the family,
  read in that order, are the acknowledged messages in the order they were sent.  A
  second daemon continues in the family's last blob, not in a new one.

The figures (messages, blobs, committed blocks per blob, bytes, the daemon's ``flush
on stop done in X s``) are written to ``azure-e2e-report.json`` in trial's working
directory and printed as ``AZURE E2E ...`` lines.

The blob-reading helpers (:func:`read_container`, :class:`AzureBlob`,
:func:`member_tags`, :class:`AzureContainer`) are shared with
``tests/integration/test_azure_faults.py``.  Azurite runs once per process
(:func:`~tests.integration.azurite.shared_azurite`: a skip when it is not installed,
a failure when ``CI`` is set).
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import random
import re
import time
import zlib
from collections import Counter, defaultdict
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.azurite import AzuriteServer, shared_azurite
from tests.integration.test_end_to_end import (
    CLIENTS,
    MS_PER_DAY,
    Daemon,
    bad_body,
    canonical,
    key,
    message_body,
    post_all,
)
from tests.integration.test_faults import canonical_body

#: The gzip extra subfield (SI1 SI2) the Azure writer names each block with, written
#: out here rather than imported so that the test holds the writer to it.
BLOCK_SUBFIELD = b"Lh"
#: Its data: the writer ID (16 bytes) and the block's sequence number (8 bytes).
BLOCK_TAG_BYTES = 24

#: A blob name: the key (no dot in it) and the rollover generation, if any.
BLOB_NAME = re.compile(r"(?P<key>chat/[^.]+)(?:\.(?P<generation>[1-9][0-9]*))?\Z")

_FEXTRA = 4


# -- reading the container back ------------------------------------------------------


def gzip_member_offsets(data: bytes) -> list[int]:
    """
    Where each gzip member of ``data`` starts.

    :raises ValueError: the data end inside a member or hold trailing garbage.
    """
    offsets = []
    position = 0
    while position < len(data):
        offsets.append(position)
        decompressor = zlib.decompressobj(31)
        try:
            decompressor.decompress(data[position:])
        except zlib.error as e:
            raise ValueError(f"not gzip at byte {position}: {e}") from None
        if not decompressor.eof:
            raise ValueError(f"truncated gzip member at byte {position}")
        position = len(data) - len(decompressor.unused_data)
    return offsets


def member_tag(data: bytes, offset: int) -> Optional[bytes]:
    """
    The data of the ``Lh`` subfield in the header of the member at ``offset``
    (RFC 1952 section 2.3.1.1), or None when it has no extra field or no such
    subfield.
    """
    if data[offset : offset + 2] != b"\x1f\x8b" or not data[offset + 3] & _FEXTRA:
        return None
    xlen = int.from_bytes(data[offset + 10 : offset + 12], "little")
    extra = data[offset + 12 : offset + 12 + xlen]
    while len(extra) >= 4:
        length = int.from_bytes(extra[2:4], "little")
        if extra[:2] == BLOCK_SUBFIELD:
            return extra[4 : 4 + length]
        extra = extra[4 + length :]
    return None


def member_tags(data: bytes) -> tuple[int, list[bytes]]:
    """
    The number of gzip members of ``data`` and the ``Lh`` tags of those that have
    one, in order.

    :raises ValueError: not whole gzip members.
    """
    offsets = gzip_member_offsets(data)
    tags = [tag for tag in (member_tag(data, o) for o in offsets) if tag is not None]
    return len(offsets), tags


class AzureBlob:
    """
    One blob as read back: its properties, bytes, lines and what is wrong with it.

    :ivar name: the blob name.
    :ivar key: the object key it belongs to (the name without ``.N``).
    :ivar generation: 0 for the key itself, N for ``{key}.N``.
    :ivar data: its bytes.
    :ivar blob_type: ``AppendBlob``, ``BlockBlob``...
    :ivar content_type: / :ivar content_encoding: its content settings.
    :ivar blocks: its committed block count (Get Blob Properties).
    :ivar members: its gzip members (None when not whole members).
    :ivar tags: the ``Lh`` tags of its members, in order.
    :ivar lines: its NDJSON lines (None when not whole gzip members).
    :ivar problems: what is wrong with it (empty: nothing).
    """

    def __init__(self, name: str, properties: Any, data: bytes) -> None:
        self.name = name
        match = BLOB_NAME.match(name)
        self.key = match.group("key") if match else name
        self.generation = int(match.group("generation") or 0) if match else -1
        self.data = data
        self.blob_type = str(getattr(properties.blob_type, "value", properties.blob_type))
        settings = properties.content_settings
        self.content_type = settings.content_type
        self.content_encoding = settings.content_encoding
        self.blocks = int(properties.append_blob_committed_block_count or 0)
        self.members: Optional[int] = None
        self.tags: list[bytes] = []
        self.lines: Optional[list[bytes]] = None
        self.problems: list[str] = []
        if match is None:
            self.problems.append("not a name chat/{date}/content_logs_{date}_{client}[.N]")
        if self.blob_type != "AppendBlob":
            self.problems.append(f"a {self.blob_type}, not an AppendBlob")
        if self.content_type != "application/gzip" or self.content_encoding:
            self.problems.append(
                f"Content-Type {self.content_type!r}, Content-Encoding {self.content_encoding!r}"
            )
        if len(data) != properties.size:
            self.problems.append(f"read {len(data)} bytes of {properties.size}")
        try:
            self.members, self.tags = member_tags(data)
        except ValueError as e:
            self.problems.append(f"not whole gzip members: {e} ({len(data)} bytes)")
            return
        text = _gunzip(data)
        if text and not text.endswith(b"\n"):
            self.problems.append("does not end with a newline")
        self.lines = text.splitlines(keepends=True)
        if len(self.tags) != self.blocks:
            self.problems.append(
                f"{len(self.tags)} members tagged {BLOCK_SUBFIELD!r} for {self.blocks}"
                " committed blocks"
            )
        if any(len(tag) != BLOCK_TAG_BYTES for tag in self.tags):
            self.problems.append(f"a tag is not {BLOCK_TAG_BYTES} bytes")
        if data and member_tag(data, 0) is None:
            self.problems.append("its first member is not tagged (not a block's start)")

    def writers(self) -> list[str]:
        """The writer ID (hex) of each block, in order."""
        return [tag[:16].hex() for tag in self.tags]

    def figures(self) -> dict[str, Any]:
        """Size, committed blocks, members, lines."""
        return {
            "bytes": len(self.data),
            "blocks": self.blocks,
            "members": self.members,
            "lines": None if self.lines is None else len(self.lines),
        }


def _gunzip(data: bytes) -> bytes:
    """Every member of ``data`` decompressed, concatenated."""
    out = []
    while data:
        decompressor = zlib.decompressobj(31)
        out.append(decompressor.decompress(data))
        data = decompressor.unused_data
    return b"".join(out)


def read_container(azurite: AzuriteServer, prefix: str = "") -> dict[str, AzureBlob]:
    """Every blob of the container (under ``prefix``), read straight from Azurite."""
    blobs: dict[str, AzureBlob] = {}
    with azurite.blob_service_client() as service:
        container = service.get_container_client(azurite.container)
        for item in container.list_blobs(name_starts_with=prefix or None):
            client = container.get_blob_client(item.name)
            properties = client.get_blob_properties()
            data = client.download_blob(max_concurrency=1).readall()
            blobs[item.name] = AzureBlob(item.name, properties, data)
    return blobs


def families(blobs: dict[str, AzureBlob]) -> dict[str, list[AzureBlob]]:
    """The blobs of each key, ordered by generation (``key``, ``key.1``...)."""
    result: dict[str, list[AzureBlob]] = defaultdict(list)
    for blob in blobs.values():
        result[blob.key].append(blob)
    for family in result.values():
        family.sort(key=lambda b: b.generation)
    return dict(result)


def family_problems(blobs: dict[str, AzureBlob], max_blocks: int) -> list[str]:
    """
    What is wrong with the blobs as a whole: a blob's own problems, a rollover family
    with a gap (``key``, ``key.1``, ``key.2``... must be contiguous from ``key``), a
    blob over ``max_blocks`` committed blocks, a block tag seen twice anywhere.
    """
    problems = [f"{b.name}: {p}" for b in blobs.values() for p in b.problems]
    for name, family in sorted(families(blobs).items()):
        generations = [b.generation for b in family]
        if generations != list(range(len(family))):
            problems.append(f"{name}: blob generations {generations}, not 0..{len(family) - 1}")
    for blob in blobs.values():
        if blob.blocks > max_blocks:
            problems.append(f"{blob.name}: {blob.blocks} committed blocks, over {max_blocks}")
    tags = Counter(tag for b in blobs.values() for tag in b.tags)
    twice = [tag.hex() for tag, n in tags.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} block tags seen twice, e.g. {twice[:3]}")
    return problems


class AzureContainer:
    """
    The container as :func:`tests.integration.test_crash.check_bucket` reads a
    bucket: :meth:`read_chat` gives the lines by key (a rollover family's blobs
    joined in order), the problems by blob, the bytes of all.

    :ivar blobs: the blobs of the last :meth:`read_chat`.
    """

    def __init__(self, azurite: AzuriteServer, max_blocks: int = 50_000) -> None:
        self.azurite = azurite
        self.max_blocks = max_blocks
        self.blobs: dict[str, AzureBlob] = {}

    def read_chat(self) -> tuple[dict[str, list[bytes]], dict[str, str], int]:
        self.blobs = read_container(self.azurite)
        lines: dict[str, list[bytes]] = {}
        for name, family in families(self.blobs).items():
            lines[name] = [line for blob in family for line in (blob.lines or [])]
        bad: dict[str, str] = {}
        for problem in family_problems(self.blobs, self.max_blocks):
            name, _, what = problem.partition(": ")
            bad[name] = f"{bad[name]}; {what}" if name in bad else what
        return lines, bad, sum(len(b.data) for b in self.blobs.values())

    def figures(self) -> dict[str, Any]:
        """Blobs, committed blocks (total, min, max), bytes, blocks per writer."""
        blobs = list(self.blobs.values())
        blocks = [b.blocks for b in blobs]
        return {
            "blobs": len(blobs),
            "blocks_total": sum(blocks),
            "blocks_per_blob_min": min(blocks, default=0),
            "blocks_per_blob_max": max(blocks, default=0),
            "blob_bytes_total": sum(len(b.data) for b in blobs),
            "blocks_by_writer": dict(
                Counter(w for b in blobs for w in b.writers()).most_common()
            ),
        }


def flush_seconds(log: str) -> float:
    """The ``flush on stop done in X s`` figure of a daemon's log."""
    match = re.search(r"flush on stop done in ([0-9.]+) s", log)
    if match is None:
        raise AssertionError("no 'flush on stop done' line:\n" + log[-3000:])
    return float(match.group(1))


def write_report(workdir: str, name: str, figures: dict[str, Any]) -> None:
    """Append ``figures`` to the JSON list in ``workdir/name``."""
    path = os.path.join(workdir, name)
    try:
        with open(path) as f:
            runs = json.load(f)
    except (OSError, ValueError):
        runs = []
    runs.append(figures)
    with open(path, "w") as f:
        json.dump(runs, f, indent=2, sort_keys=True, default=str)


# -- the tests -----------------------------------------------------------------------


class AzureEndToEndTests(SynchronousTestCase):
    """The daemon against Azurite, from POST to the blobs in the container."""

    def setUp(self) -> None:
        self.azurite = shared_azurite()
        self.azurite.reset()
        self.workdir = os.path.abspath(".")
        self.expected: dict[str, Counter[str]] = defaultdict(Counter)

    def start(self, **env: str) -> Daemon:
        daemon = Daemon(
            {**self.azurite.env(), "SHUTDOWN_TIMEOUT_S": "25", **env}, self.workdir
        )
        self.addCleanup(daemon.kill)
        return daemon

    def stop(self, daemon: Daemon) -> dict[str, Any]:
        """SIGTERM ``daemon``; its clean exit and its flush figures."""
        exit_seconds = daemon.stop()
        log = daemon.log()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("#error]", log)
        self.assertNotIn("#critical]", log)
        return {
            "flush_seconds": flush_seconds(log),
            "sigterm_to_exit_seconds": round(exit_seconds, 3),
        }

    def run_daemon(self, bodies: list[tuple[bytes, Optional[str]]], **env: str) -> dict[str, Any]:
        """
        Start the daemon, POST the bodies, SIGTERM it.  A body with a key is valid and
        must be acknowledged with 200; one without must get a 4xx.
        """
        daemon = self.start(**env)
        started = time.monotonic()
        statuses = post_all(daemon.port, [body for body, _ in bodies])
        post_seconds = time.monotonic() - started
        for (body, expected_key), status in zip(bodies, statuses):
            if expected_key is None:
                self.assertIn(status, (400, 413), body[:200])
            else:
                self.assertEqual(status, 200, body[:200])
                self.expected[expected_key][canonical(body)] += 1
        figures = self.stop(daemon)
        figures.update(
            posted=len(bodies),
            acknowledged=statuses.count(200),
            rejected=len(bodies) - statuses.count(200),
            post_seconds=round(post_seconds, 2),
        )
        return figures

    def check_container(self, figures: dict[str, Any]) -> dict[str, AzureBlob]:
        """
        The container holds exactly one valid blob per expected key, with exactly the
        acknowledged lines of that key, each once.
        """
        blobs = read_container(self.azurite)
        self.assertEqual(family_problems(blobs, 50_000), [])
        self.assertEqual(sorted(blobs), sorted(self.expected))
        found = 0
        for name, want in self.expected.items():
            blob = blobs[name]
            assert blob.lines is not None
            got = Counter(line.decode("utf-8") for line in blob.lines)
            self.assertEqual(got, want, name)
            self.assertEqual(max(got.values()), 1, name)
            found += len(blob.lines)
        sizes = [len(b.data) for b in blobs.values()]
        blocks = {name: b.blocks for name, b in sorted(blobs.items())}
        figures.update(
            found=found,
            blobs=len(blobs),
            blob_bytes_min=min(sizes),
            blob_bytes_max=max(sizes),
            blob_bytes_total=sum(sizes),
            blocks_total=sum(blocks.values()),
            blocks_per_blob_min=min(blocks.values()),
            blocks_per_blob_max=max(blocks.values()),
            blocks_per_blob=blocks,
            members_total=sum(b.members or 0 for b in blobs.values()),
        )
        return blobs

    def test_two_dates_ten_clients_then_appends(self) -> None:
        """
        20,000 messages over 10 clients and 2 UTC dates plus bad requests; SIGTERM;
        the 20 blobs exact.  A second run of 2,000 more on the same keys appends
        after them: every blob's old bytes are a prefix of the new, the first run's
        lines come once and first, the second run's after.
        """
        started = time.monotonic()
        now = int(time.time() * 1000)
        today = now - now % MS_PER_DAY
        dates = (today - MS_PER_DAY + 1, today + 1)
        rng = random.Random(1585526400)

        def batch(count: int, first_id: int) -> list[tuple[bytes, Optional[str]]]:
            bodies: list[tuple[bytes, Optional[str]]] = []
            for n in range(count):
                content_id = first_id + n
                client = CLIENTS[n % 10]
                stamp = dates[(n // 10) % 2] + rng.randrange(
                    0, max(1, min(MS_PER_DAY - 2, now - dates[1]))
                )
                bodies.append((message_body(content_id, client, stamp), key(stamp, client)))
                if n % 200 == 0:
                    bodies.append((bad_body(n), None))
            return bodies

        first = self.run_daemon(batch(20_000, 1))
        self.assertEqual(first["acknowledged"], 20_000)
        before = self.check_container(first)
        self.assertEqual(first["found"], 20_000)
        self.assertEqual(first["blobs"], 20)
        self.assertGreaterEqual(first["blocks_per_blob_min"], 1)
        first_lines = {name: list(blob.lines or []) for name, blob in before.items()}
        first["test"] = "e2e_first_run"
        write_report(self.workdir, "azure-e2e-report.json", first)

        second = self.run_daemon(batch(2_000, 100_001))
        after = self.check_container(second)
        self.assertEqual(second["found"], 22_000)
        self.assertEqual(second["blobs"], 20)
        for name, blob in after.items():
            old = before[name]
            self.assertEqual(blob.data[: len(old.data)], old.data, f"{name}: rewritten")
            self.assertGreater(len(blob.data), len(old.data), name)
            self.assertGreater(blob.blocks, old.blocks, name)
            assert blob.lines is not None and blob.members is not None
            self.assertGreaterEqual(blob.members, 2, name)
            # a standard reader reads every member
            self.assertEqual(gzip.decompress(blob.data).splitlines(keepends=True), blob.lines)
            self.assertEqual(blob.lines[: len(first_lines[name])], first_lines[name], name)
            new_ids = {json.loads(line)["content_id"] for line in blob.lines[len(first_lines[name]) :]}
            self.assertTrue(new_ids and min(new_ids) > 100_000, name)
        second["test"] = "e2e_second_run"
        second["wall_s"] = round(time.monotonic() - started, 1)
        write_report(self.workdir, "azure-e2e-report.json", second)
        print(
            "AZURE E2E: messages %d + %d acknowledged, %d found; %d blobs; committed blocks"
            " per blob %d-%d after the first run (%d in all), %d-%d after the second; bytes"
            " %d after the first run (%d-%d per blob), %d after the second; flush on stop"
            " %.3f s and %.3f s; SIGTERM to exit %.2f s and %.2f s; wall %.1f s"
            % (
                first["acknowledged"],
                second["acknowledged"],
                second["found"],
                second["blobs"],
                first["blocks_per_blob_min"],
                first["blocks_per_blob_max"],
                first["blocks_total"],
                second["blocks_per_blob_min"],
                second["blocks_per_blob_max"],
                first["blob_bytes_total"],
                first["blob_bytes_min"],
                first["blob_bytes_max"],
                second["blob_bytes_total"],
                first["flush_seconds"],
                second["flush_seconds"],
                first["sigterm_to_exit_seconds"],
                second["sigterm_to_exit_seconds"],
                second["wall_s"],
            )
        )

    def test_rollover_small_max_blocks(self) -> None:
        """
        ``AZURE_MAX_BLOCKS=5``, ``CHECKPOINT_S=0.2``: each of two streams appends a
        block about every 0.2 s for ~4 s and rolls over several times.  The family of
        each key is ``key``, ``key.1``... without a gap; every blob but the last
        holds exactly 5 committed blocks, the last at most 5; its lines, in blob
        order, are the acknowledged messages in sending order.  A second daemon
        continues in the last blob of each family.
        """
        max_blocks = 5
        settings = {"AZURE_MAX_BLOCKS": str(max_blocks), "CHECKPOINT_S": "0.2"}
        clients = (4, 7)
        sent: dict[str, list[bytes]] = defaultdict(list)
        ids = iter(range(1, 10**9))
        figures: dict[str, Any] = {"test": "rollover", "settings": settings}
        started = time.monotonic()

        def send(daemon: Daemon, seconds: float) -> None:
            """One sequential connection per client, ~60 messages/s each."""
            connections = {
                c: http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30) for c in clients
            }
            try:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    for client in clients:
                        stamp = int(time.time() * 1000)
                        body = canonical_body(next(ids), client, stamp, "rollover ✓ " + "x" * 40)
                        connection = connections[client]
                        connection.request("POST", "/log", body, {"Content-Type": "application/json"})
                        response = connection.getresponse()
                        response.read()
                        self.assertEqual(response.status, 200)
                        sent[key(stamp, client)].append(body + b"\n")
                    time.sleep(1 / 60)
            finally:
                for connection in connections.values():
                    connection.close()

        def check(run: str) -> dict[str, list[AzureBlob]]:
            blobs = read_container(self.azurite)
            self.assertEqual(family_problems(blobs, max_blocks), [])
            by_key = families(blobs)
            self.assertEqual(sorted(by_key), sorted(sent))
            for name, family in by_key.items():
                counts = [b.blocks for b in family]
                self.assertEqual(counts[:-1], [max_blocks] * (len(family) - 1), name)
                self.assertTrue(1 <= counts[-1] <= max_blocks, (name, counts))
                lines = [line for blob in family for line in (blob.lines or [])]
                self.assertEqual(lines, sent[name], name)
            figures[run] = {
                name: {
                    "blobs": [b.name.rsplit("_", 1)[-1] for b in family],
                    "blocks": [b.blocks for b in family],
                    "lines": sum(len(b.lines or []) for b in family),
                }
                for name, family in sorted(by_key.items())
            }
            return by_key

        daemon = self.start(**settings)
        send(daemon, 4.0)
        figures["first_flush"] = self.stop(daemon)
        first = check("first_run")
        for name, family in first.items():
            self.assertGreaterEqual(len(family), 3, f"{name}: too few rollovers to test them")
        rolled = daemon.log().count("takes no more blocks (full); going on in")
        self.assertGreater(rolled, 0)

        daemon = self.start(**settings)
        send(daemon, 0.5)
        figures["second_flush"] = self.stop(daemon)
        second = check("second_run")
        for name, family in second.items():
            # the second daemon went on in the first run's last blob (unless it was full)
            last = first[name][-1]
            if last.blocks < max_blocks:
                self.assertGreater(family[len(first[name]) - 1].blocks, last.blocks, name)
        figures["max_blocks_observed"] = max(
            b.blocks for family in second.values() for b in family
        )
        figures["wall_s"] = round(time.monotonic() - started, 1)
        write_report(self.workdir, "azure-e2e-report.json", figures)
        print("AZURE ROLLOVER: " + json.dumps(figures, sort_keys=True))
