"""
A model-based test of the whole write path (hypothesis ``RuleBasedStateMachine``):
two writers (two processes' registries and S3 writers) take messages for a few keys
on one ``task.Clock`` and write into one :class:`MemoryStore`, which models S3 as it
is (metadata set only at creation, 412 on stale conditions, 409 and a discarded
upload on a racing conditional Complete, NoSuchUpload after a completion, the part
minimum), while every storage call can fail in every way: an error before it lands,
an answer lost after it landed, a stall (the call lands when released, whether or
not the caller gave up), a 409, an exception of a type nobody expected.

After every step: no line is stored twice, every object under ``chat/`` is whole
gzip members of acknowledged lines, and each writer's memory budget equals the
bytes it holds.  After stop: every acknowledged line is stored exactly once, either
in ``chat/`` or still staged under ``_loghandler/`` (for recovery), and no multipart
upload is left but staging ones.
"""

from __future__ import annotations

import collections
import os
import random
import zlib
from typing import Optional

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from loghandler.backoff import Backoff
from loghandler.budget import MemoryBudget
from loghandler.interfaces import StorageError
from loghandler.message import Message
from loghandler.registry import STREAM_OVERHEAD_BYTES, Busy, StreamRegistry, StreamSettings
from loghandler.retry import RetryLayer
from loghandler.storage.memory import CONFLICT, LOST, STALL, MemoryStore
from loghandler.storage.s3.writer import STAGING_PREFIX, S3ObjectStore
from tests.helpers import DAY_START_MS, read_lines

#: The part size (and the store's part minimum) in the model: small, so that parts,
#: copies and ranges all happen with a few lines.
PART = 1024
LIFETIME_S = 6.0
OPERATIONS = (
    "PutObject",
    "CreateMultipartUpload",
    "UploadPart",
    "UploadPartCopy",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "HeadObject",
    "GetObject",
    "DeleteObject",
    "ListMultipartUploads",
)
FAULTS = ("error", "lost", "stall", "conflict", "unexpected")


class Unexpected(Exception):
    """An exception of a type no storage code knows."""


def _lines_of_upload(store: MemoryStore, upload_id: str) -> list[bytes]:
    upload = store.uploads[upload_id]
    data = b"".join(body for _, (body, _) in sorted(upload.parts.items()))
    return _gunzip_prefix(data)


def _gunzip_prefix(data: bytes) -> list[bytes]:
    """The lines of whole gzip members at the start of ``data`` (staged parts)."""
    out = b""
    while data:
        d = zlib.decompressobj(31)
        text = d.decompress(data)
        if not d.eof:
            break
        out += text
        data = d.unused_data
    return out.splitlines(keepends=True)


class Writer:
    """One process: a registry and its S3 writer on the shared store."""

    def __init__(self, name: str, store: MemoryStore, clock: Clock) -> None:
        self.name = name
        self.budget = MemoryBudget(1 << 30)
        self.store = S3ObjectStore(
            store,
            clock,
            self.budget,
            part_size=PART,
            writer_id=name,
            retry=RetryLayer(clock, attempt_timeout=5.0, backoff=Backoff(0.1, 2.0)),
        )
        self.registry = StreamRegistry(
            self.store,
            clock,
            StreamSettings(part_size=PART, lifetime_s=LIFETIME_S),
            self.budget,
        )
        self.stopped = False

    def held_bytes(self) -> int:
        """What the budget must show: stream overheads, unstored bytes, merges."""
        streams = [e.stream for e in self.registry._open.values()] + list(
            self.registry._closing
        )
        return (
            len(streams) * STREAM_OVERHEAD_BYTES
            + sum(stream.unstaged_bytes for stream in streams)
            + self.store.merger.holding
        )


class WritePathMachine(RuleBasedStateMachine):
    """The rules and invariants described in the module docstring."""

    @initialize(seed=st.integers(0, 2**32 - 1))
    def setup(self, seed: int) -> None:
        self.clock = Clock()
        self.s3 = MemoryStore(min_part_size=PART, now=self.clock.seconds)
        self.writers = [Writer("a", self.s3, self.clock), Writer("b", self.s3, self.clock)]
        self.acked: set[bytes] = set()
        self.next_id = 1
        # Its own generator: storms also act during the flush in teardown, after
        # hypothesis stopped drawing.
        self.rng = random.Random(seed)
        # operation -> (fault, probability) while a storm is on.
        self.storms: dict[str, tuple[str, float]] = {}
        self.s3.chaos = self.chaos

    def chaos(self, operation: str) -> Optional[BaseException]:
        """The fault for one call during a storm (see :attr:`MemoryStore.chaos`)."""
        storm = self.storms.get(operation)
        if storm is None or self.rng.random() >= storm[1]:
            return None
        return self.fault(operation, storm[0])

    @staticmethod
    def fault(operation: str, fault: str) -> BaseException:
        return {
            "error": StorageError(operation, 503, "SlowDown"),
            "lost": LOST,
            "stall": STALL,
            "conflict": CONFLICT,
            "unexpected": Unexpected(operation),
        }[fault]

    @rule(
        operation=st.sampled_from(OPERATIONS),
        fault=st.sampled_from(FAULTS),
        rate=st.sampled_from([0.2, 0.5]),
    )
    def storm(self, operation: str, fault: str, rate: float) -> None:
        """From now on, calls of ``operation`` fail in the way ``fault`` says, often."""
        self.storms[operation] = (fault, rate)

    @rule()
    def calm(self) -> None:
        """Storms end."""
        self.storms.clear()

    # -- rules ---------------------------------------------------------------------

    @rule(
        writer=st.integers(0, 1),
        client=st.integers(1, 2),
        count=st.integers(1, 12),
        noisy=st.booleans(),
    )
    def send(self, writer: int, client: int, count: int, noisy: bool) -> None:
        """Messages for one key through one writer; the accepted ones are acknowledged."""
        w = self.writers[writer]
        if w.stopped:
            return
        for _ in range(count):
            n = self.next_id
            self.next_id += 1
            # 200 hex digits that compress poorly: about 10 lines fill a part.
            text = "%0200x" % random.Random(n).getrandbits(800) if noisy else "m"
            message = Message("%s %d" % (text, n), n, client, DAY_START_MS + 1000)
            try:
                w.registry.accept(message)
            except Busy:
                continue
            self.acked.add(message.to_line())

    @rule(
        operation=st.sampled_from(OPERATIONS),
        fault=st.sampled_from(FAULTS),
        times=st.integers(1, 3),
        after=st.integers(0, 3),
    )
    def inject(self, operation: str, fault: str, times: int, after: int) -> None:
        """
        ``times`` calls of ``operation``, once ``after`` more went through, fail in
        the way ``fault`` says.
        """
        if fault == "error":
            self.s3.fail(operation, StorageError(operation, 503, "SlowDown"), times, after)
        elif fault == "lost":
            self.s3.lose_answer(operation, times, after)
        elif fault == "stall":
            self.s3.hold(operation)
        elif fault == "conflict":
            self.s3.conflict(times)
        else:
            self.s3.fail(operation, Unexpected(operation), times, after)

    @rule()
    def release(self) -> None:
        """Stalled calls land (their callers may have given up long ago)."""
        self.s3.release()

    @rule(seconds=st.sampled_from([0.5, 2.0, LIFETIME_S]))
    def advance(self, seconds: float) -> None:
        """Time passes: retries, timeouts, rotation."""
        self._advance(seconds)

    def _advance(self, seconds: float) -> None:
        step = 0.25
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step

    # -- invariants ------------------------------------------------------------------

    def stored(self) -> list[bytes]:
        lines: list[bytes] = []
        for key, obj in self.s3.objects.items():
            if key.startswith("chat/"):
                lines.extend(read_lines(obj.body))
        return lines

    @invariant()
    def nothing_twice_and_only_acknowledged(self) -> None:
        """No line stored twice; every stored line acknowledged; objects are gzip."""
        if not hasattr(self, "s3"):
            return
        lines = self.stored()
        twice = [line for line, n in collections.Counter(lines).items() if n > 1]
        assert not twice, "stored twice: %r" % twice[:3]
        assert set(lines) <= self.acked

    @invariant()
    def budget_equals_held(self) -> None:
        """Each writer's budget counts exactly the bytes it holds."""
        if not hasattr(self, "s3"):
            return
        for w in self.writers:
            assert w.budget.held == w.held_bytes(), (w.name, w.budget.held, w.held_bytes())

    # -- stop ------------------------------------------------------------------------

    def teardown(self) -> None:
        """
        Storage comes back; both writers stop with a deadline; every acknowledged
        line is then stored exactly once, in chat/ or staged.
        """
        if not hasattr(self, "s3"):
            return
        s3 = self.s3
        done: list[object] = []
        for w in self.writers:
            w.store.stopping(self.clock.seconds() + 120.0)
            w.registry.close_all().addBoth(done.append)
        # The storms and the faults injected but not yet met go on for the first
        # seconds of the flush; then storage comes back (stalled calls land).
        for second in range(200):
            if len(done) == len(self.writers):
                break
            if second == 10:
                self.storms.clear()
                s3.release()
            self._advance(1.0)
        assert len(done) == len(self.writers), "flush did not end"
        lines = self.stored()
        staged: list[bytes] = []
        merged_writes = {
            write for key, obj in s3.objects.items() if key.startswith("chat/") for write in obj.writes
        }
        for key, obj in s3.objects.items():
            # A staging object whose write ID a key lists was merged: one that
            # reappears (a timed-out PutObject that landed late) is garbage that
            # recovery deletes without merging.
            if key.startswith(STAGING_PREFIX) and obj.writes[-1] not in merged_writes:
                staged.extend(read_lines(obj.body))
        for upload_id, upload in s3.uploads.items():
            if not upload.key.startswith(STAGING_PREFIX):
                # Only a stalled CreateMultipartUpload that landed after the merge
                # had given it up and aborted the others may be left: empty, for
                # the recovery sweep (issue 6) to abort.
                assert not upload.parts, "upload with parts left: %s" % upload.key
                continue
            staged.extend(_lines_of_upload(s3, upload_id))
        everything = collections.Counter(lines + staged)
        twice = [line for line, n in everything.items() if n > 1]
        assert not twice, "stored twice: %r" % twice[:3]
        missing = self.acked - set(everything)
        assert not missing, "%d acknowledged lines lost, e.g. %r" % (len(missing), sorted(missing)[:2])
        for w in self.writers:
            assert w.budget.held == 0, (w.name, w.budget.held)


class WritePathModelTests(SynchronousTestCase):
    """Runs :class:`WritePathMachine`."""

    def test_model(self) -> None:
        """
        Under every kind of storage fault, with two writers on the same keys: no line
        stored twice at any step; after stop each acknowledged line stored once.
        """
        run_state_machine_as_test(
            WritePathMachine,
            settings=settings(
                max_examples=300,
                stateful_step_count=40,
                deadline=None,
                # CI runs a fixed set of examples; developers' runs explore anew.
                derandomize=bool(os.environ.get("CI")),
                suppress_health_check=list(HealthCheck),
            ),
        )
        # Unexpected exceptions are logged once per type by the retry layer.
        self.flushLoggedErrors(Unexpected)
