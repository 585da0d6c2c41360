"""
A model-based test of the Azure write path (hypothesis ``RuleBasedStateMachine``):
processes (each a registry with checkpoints and an :class:`AzureObjectStore` with a
small ``max_blocks``, on its own ``task.Clock``; :mod:`tests.model_support_azure`)
take messages for a few keys and append them into one :class:`MemoryAppendBlobs`,
which models Azure's append blobs (``appendpos`` and ``maxsize`` conditions, the
block limit per blob, blocks landing whole), while every call can fail in every way:
an error before it lands, an answer lost after it landed, a stall (the call lands
when released, at a later step, whether or not the caller gave up and tried again),
an exception of a type nobody expected.  The service's block limit is the writers'
limit, or larger, or smaller (then appends meet 409 ``BlockCountExceedsLimit``); the
writers' byte limit is Azure's or a few KiB (rollovers on size, 412
``MaxBlobSizeConditionNotMet``).  Any process can be killed at any step (SIGKILL: its
memory and clock stop, what it sent still lands), paused (SIGSTOP), cut off from
storage for a while, or stopped (a flush with a deadline), and new ones started; a
foreign writer appends blocks of its own (valid gzip) to the blobs, and someone puts
block blobs where a key's next rollover would go.

After every step: every blob under ``chat/`` is an append blob whose every block is
whole gzip members; no two blocks are alike (the block IDs in the headers); no line
is stored twice across all blobs of all keys (``key``, ``key.1``...); every stored
line was accepted by a process (or is the foreign writer's) and is in a blob of its
own key; each live process's memory budget equals the bytes it holds.

At the end, storage comes back (stalled calls land, faults stop) and the live
processes stop with a deadline of 120 s.  No recovery runs: Azure needs none, an
appended block is final.  Then every line that had to survive is stored exactly
once: every line a process knew to be in storage when it was killed or its flush
ended (``durable_lines``), every line whose ``durable()`` fired True, and every line
of a process whose flush ended within its deadline.  The blobs of each key are
``key``, ``key.1``... with no gap, none with more blocks than the service allows.

It found one bug: a checkpoint abandoned at the shutdown deadline, followed by an
empty tail, counted its line stored and answered ``durable()`` True
(:class:`DurableAtDeadlineTests`); fixed in ``ObjectStream`` (a part the writer
gives up is a gap: its lines are answered lost, ``durable_lines`` stops before it).
"""

from __future__ import annotations

import collections
import os
import random
import re
import zlib
from typing import Optional

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.trial.unittest import SynchronousTestCase

from loghandler.gzipframe import with_extra_field
from loghandler.interfaces import StorageError
from loghandler.keys import key_for, rollover_key
from loghandler.message import Message
from loghandler.registry import STREAM_OVERHEAD_BYTES, Busy
from loghandler.storage.azure.api import MAX_APPEND_BLOB_BYTES
from loghandler.storage.azure.memory import MemoryAppendBlobs, MemoryBlob
from loghandler.storage.azure.writer import BLOCK_SUBFIELD, CONTENT_TYPE, block_id
from loghandler.storage.scripted import LOST, STALL
from tests.helpers import DAY_START_MS, MS_PER_DAY, members
from tests.model_support import Process
from tests.model_support_azure import (
    LIFETIME_S,
    MAX_BLOCKS,
    PART,
    AzureProcess,
    AzureWorld,
    Spinning,
)

OPERATIONS = ("GetBlobProperties", "CreateAppendBlob", "AppendBlock", "GetBlob")
FAULTS = ("error", "lost", "stall", "unexpected", "denied")
#: Processes one example starts at most, and live at once at most.
MAX_PROCESSES = 8
MAX_LIVE = 3
CLIENTS = (1, 2, 3)
DAYS = (0, 1)
#: The shutdown deadline of the stop at the end.
FINAL_DEADLINE_S = 120.0
#: The foreign writer's writer ID (it writes loghandler's block headers too).
FOREIGN_ID = "f" * 32
_ROLLOVER = re.compile(r"^(.*)\.([1-9][0-9]*)$")


class Unexpected(Exception):
    """An exception of a type no storage code knows."""


def family(name: str) -> tuple[str, int]:
    """The key a blob continues and its rollover generation: ``k.2`` -> (k, 2)."""
    match = _ROLLOVER.match(name)
    if match is None:
        return name, 0
    return match.group(1), int(match.group(2))


def blocks_of(blob: MemoryBlob) -> list[bytes]:
    """The blob's committed blocks, in order."""
    out, at = [], 0
    for size in blob.blocks:
        out.append(blob.body[at : at + size])
        at += size
    assert at == len(blob.body)
    return out


def block_name(block: bytes) -> Optional[bytes]:
    """The ``Lh`` subfield of a block's first gzip header, or None."""
    if len(block) < 12 or not block[3] & 0x04:
        return None
    xlen = int.from_bytes(block[10:12], "little")
    extra, at = block[12 : 12 + xlen], 0
    while at + 4 <= len(extra):
        size = int.from_bytes(extra[at + 2 : at + 4], "little")
        if extra[at : at + 2] == BLOCK_SUBFIELD:
            return extra[at + 4 : at + 4 + size]
        at += 4 + size
    return None


def stored(
    blobs: MemoryAppendBlobs, skip: frozenset[str] = frozenset()
) -> dict[str, list[bytes]]:
    """
    Blob name -> its lines, for every blob under ``chat/`` but those in ``skip``,
    checking that it is an append blob and that each of its blocks is whole gzip
    members.
    """
    out = {}
    for name, blob in blobs.blobs.items():
        if not name.startswith("chat/") or name in skip:
            continue
        assert blob.blob_type == "AppendBlob", (name, blob.blob_type)
        text = b"".join(b"".join(members(block)) for block in blocks_of(blob))
        assert text.endswith(b"\n") or not text, name
        out[name] = text.splitlines(keepends=True)
    return out


def make_message(n: int, client: int, day: int, noisy: bool) -> Message:
    """Message number ``n``; noisy ones compress poorly (about ten fill a part)."""
    text = "%0200x" % random.Random(n).getrandbits(800) if noisy else "m"
    return Message("%s %d" % (text, n), n, client, DAY_START_MS + day * MS_PER_DAY + 1000)


class AzureWritePathMachine(RuleBasedStateMachine):
    """The rules and invariants described in the module docstring."""

    @initialize(
        seed=st.integers(0, 2**32 - 1),
        service_max_blocks=st.sampled_from([MAX_BLOCKS, MAX_BLOCKS + 2, MAX_BLOCKS - 2, 3]),
        max_blob_bytes=st.sampled_from([MAX_APPEND_BLOB_BYTES, 6 * PART]),
        budget_bytes=st.sampled_from([1 << 30, 3 * STREAM_OVERHEAD_BYTES + 4 * PART]),
    )
    def setup(
        self, seed: int, service_max_blocks: int, max_blob_bytes: int, budget_bytes: int
    ) -> None:
        """
        Two processes; the service's block limit may be below the writers' (409
        ``BlockCountExceedsLimit``), the writers' byte limit may be a few parts, and
        their memory budget may hold three streams and a few parts (503, and the
        fullest stream completes early).
        """
        self.rng = random.Random(seed)
        self.world = AzureWorld(service_max_blocks)
        self.blobs = self.world.blobs
        self.max_blob_bytes = max_blob_bytes
        self.budget_bytes = budget_bytes
        #: line -> the key it belongs in (accepted lines and foreign ones).
        self.key_of: dict[bytes, str] = {}
        self.foreign: set[bytes] = set()
        #: Blobs the foreign writer created (not ``application/gzip``).
        self.foreign_created: set[str] = set()
        #: Block blobs someone put where a rollover would go.
        self.block_blobs: set[str] = set()
        #: Lines that must be stored once in the end (filled at deaths and stops).
        self.must_survive: set[bytes] = set()
        #: (process, line) of each ``durable()`` that fired True: answered 200 under
        #: ACK=durable.
        self.durable_answers: list[tuple[AzureProcess, bytes]] = []
        self.next_id = 1
        self.foreign_blocks = 0
        self.foreign_lines = 0
        #: Processes told to stop (their flush runs or ran).
        self.stopping: set[AzureProcess] = set()
        #: What went wrong in a callback (checked after every step).
        self.problems: list[str] = []
        # operation -> (fault, probability) while a storm is on.
        self.storms: dict[str, tuple[str, float]] = {}
        self.blobs.chaos = self.chaos
        self._spawn()
        self._spawn()

    # -- processes -------------------------------------------------------------------

    def _spawn(self) -> AzureProcess:
        """Start a process with a fresh writer ID."""
        number = len(self.world.processes) + 1
        return self.world.spawn_azure(
            "w%d" % number,
            "%032x" % number,
            self.rng,
            max_blocks=MAX_BLOCKS,
            max_blob_bytes=self.max_blob_bytes,
            budget_bytes=self.budget_bytes,
        )

    def kill(self, process: AzureProcess) -> None:
        """SIGKILL; what the process knew to be in storage must survive."""
        if process.alive:
            self.must_survive |= process.durable()
            process.kill()

    def live_processes(self) -> list[AzureProcess]:
        """The processes alive, in start order."""
        return [p for p in self.world.live if isinstance(p, AzureProcess)]

    def live(self, index: int) -> Optional[AzureProcess]:
        """The live process ``index`` designates (modulo their number), if any."""
        live = self.live_processes()
        return live[index % len(live)] if live else None

    # -- storage faults --------------------------------------------------------------

    def chaos(self, operation: str) -> Optional[BaseException]:
        """The fault for one call during a storm (see ``ScriptedCalls.chaos``)."""
        storm = self.storms.get(operation)
        if storm is None or self.rng.random() >= storm[1]:
            return None
        return {
            "error": StorageError(operation, 503, "ServerBusy"),
            "lost": LOST,
            "stall": STALL,
            "unexpected": Unexpected(operation),
            # Until an operator acts: retried slowly (5 to 60 s), reported as the problem.
            "denied": StorageError(operation, 403, "AuthorizationFailure"),
        }[storm[0]]

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

    @precondition(lambda self: bool(self.blobs.held))
    @rule(index=st.integers(0, 20), count=st.integers(1, 3))
    def release(self, index: int, count: int) -> None:
        """
        ``count`` stalled calls land, starting with any one of them (their callers
        may have timed out and tried again, or died, long ago).
        """
        held = self.blobs.held
        held.insert(0, held.pop(index % len(held)))
        self.blobs.release(count)

    # -- traffic, time, crashes ------------------------------------------------------

    def _send(
        self, writer: int, client: int, day: int, count: int, noisy: bool, durable: bool,
        seconds: float,
    ) -> None:
        """``count`` messages for one key through one process, spread over ``seconds``."""
        for i in range(count):
            if i and seconds:
                self.world.advance(seconds / count)
            process = self.live(writer)
            if process is None or process.paused_until is not None:
                continue  # its HTTP server answers no one
            n = self.next_id
            self.next_id += 1
            message = make_message(n, client, day, noisy)
            try:
                accepted = process.registry.accept(message)
            except Busy:
                continue
            line = message.to_line()
            self.key_of[line] = key_for(message.timestamp, message.client_id)
            process.accepted.append((accepted, line))
            if durable:

                def answered(
                    ok: bool, line: bytes = line, process: AzureProcess = process
                ) -> None:
                    if ok:
                        self.durable_answers.append((process, line))

                accepted.durable().addCallback(answered)

    @rule(
        writer=st.integers(0, MAX_LIVE - 1),
        client=st.sampled_from(CLIENTS),
        day=st.sampled_from(DAYS),
        count=st.integers(1, 16),
        noisy=st.booleans(),
        seconds=st.sampled_from([0.0, 1.0, 3.0]),
    )
    def send(
        self, writer: int, client: int, day: int, count: int, noisy: bool, seconds: float
    ) -> None:
        """Messages for one key through one process, answered once accepted."""
        self._send(writer, client, day, count, noisy, False, seconds)

    @rule(
        writer=st.integers(0, MAX_LIVE - 1),
        client=st.sampled_from(CLIENTS),
        day=st.sampled_from(DAYS),
        count=st.integers(1, 8),
        noisy=st.booleans(),
        seconds=st.sampled_from([0.0, 1.0, 3.0]),
    )
    def send_durable(
        self, writer: int, client: int, day: int, count: int, noisy: bool, seconds: float
    ) -> None:
        """Messages under ACK=durable: each answered 200 once its ``durable()`` fires True."""
        self._send(writer, client, day, count, noisy, True, seconds)

    @rule(seconds=st.sampled_from([0.5, 2.0, 4.0, LIFETIME_S]))
    def advance(self, seconds: float) -> None:
        """Time passes: retries, timeouts, checkpoints, rotation."""
        self.world.advance(seconds)

    @rule(
        client=st.sampled_from(CLIENTS),
        day=st.sampled_from(DAYS),
        generation=st.integers(0, 10),
        count=st.integers(1, 3),
        members_=st.integers(1, 2),
        named=st.booleans(),
    )
    def foreign_append(
        self, client: int, day: int, generation: int, count: int, members_: int, named: bool
    ) -> None:
        """
        Another writer appends one block of ``members_`` gzip members holding
        ``count`` lines of its own to a blob of the key (the base blob, created if
        missing, or an existing rollover, not one at its block limit), its first
        header carrying a block ID of its own when ``named``.
        """
        key = key_for(DAY_START_MS + day * MS_PER_DAY + 1000, client)
        existing = [
            g for g in range(generation + 1) if rollover_key(key, g) in self.blobs.blobs
        ]
        name = rollover_key(key, existing[-1] if existing else 0)
        blob = self.blobs.blobs.get(name)
        if name in self.block_blobs:
            return
        if blob is not None and len(blob.blocks) >= self.blobs.max_blocks:
            return  # the service would refuse it
        lines = []
        for _ in range(count):
            self.foreign_lines += 1
            lines.append(b'{"foreign":%d}\n' % self.foreign_lines)
        chunks = [lines] if members_ == 1 else [lines[: count // 2], lines[count // 2 :]]
        block = b""
        for chunk in chunks:
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
            block += compressor.compress(b"".join(chunk)) + compressor.flush()
        self.foreign_blocks += 1
        if named:
            name_data = block_id(FOREIGN_ID, self.foreign_blocks)
            block = with_extra_field(block, BLOCK_SUBFIELD, name_data)
        if blob is None:
            self.foreign_created.add(name)
        self.blobs.append_now(name, block)
        for line in lines:
            self.foreign.add(line)
            self.key_of[line] = key

    @rule(client=st.sampled_from(CLIENTS), day=st.sampled_from(DAYS))
    def block_blob(self, client: int, day: int) -> None:
        """
        Someone puts a block blob where the key's next blob (its first missing
        rollover) would go: the writers must skip it (409 ``InvalidBlobType``).
        """
        key = key_for(DAY_START_MS + day * MS_PER_DAY + 1000, client)
        if sum(family(name)[0] == key for name in self.block_blobs) >= 2:
            return
        generation = 0
        while rollover_key(key, generation) in self.blobs.blobs:
            generation += 1
        name = rollover_key(key, generation)
        self.blobs.blobs[name] = MemoryBlob(b"not ours", [], "BlockBlob", "text/plain")
        self.block_blobs.add(name)

    @precondition(lambda self: bool(self.world.live))
    @rule(writer=st.integers(0, MAX_LIVE - 1))
    def crash(self, writer: int) -> None:
        """A live process is killed (SIGKILL, OOM, power loss)."""
        process = self.live(writer)
        assert process is not None
        self.kill(process)

    @precondition(lambda self: bool(self.world.live))
    @rule(
        writer=st.integers(0, MAX_LIVE - 1),
        seconds=st.sampled_from([2.0, 4.0, 8.0]),
        answers_first=st.booleans(),
    )
    def pause(self, writer: int, seconds: float, answers_first: bool) -> None:
        """A live process stops for a while (SIGSTOP, a long GC pause), then goes on."""
        process = self.live(writer)
        assert process is not None
        process.pause(self.world.now + seconds, answers_first)

    @precondition(lambda self: bool(self.world.live))
    @rule(writer=st.integers(0, MAX_LIVE - 1), seconds=st.sampled_from([2.0, 4.0, 8.0]))
    def partition(self, writer: int, seconds: float) -> None:
        """A live process cannot reach storage for a while (its calls fail unlanded)."""
        process = self.live(writer)
        assert process is not None
        process.partition(self.world.now + seconds)

    @precondition(lambda self: bool(self.world.live))
    @rule(writer=st.integers(0, MAX_LIVE - 1), deadline=st.sampled_from([1.0, 5.0, 120.0]))
    def stop(self, writer: int, deadline: float) -> None:
        """
        A live process is told to stop (SIGTERM): it flushes with a shutdown deadline
        while the other steps go on, then exits.
        """
        process = self.live(writer)
        assert process is not None
        if process not in self.stopping:
            self.stopping.add(process)
            process.stop(deadline, self.stopped)

    def stopped(self, process: Process) -> None:
        """
        A flush ended: what the process knew stored must survive, and all it took
        when the deadline did not cut the flush.  Then it exits.
        """
        assert isinstance(process, AzureProcess)
        if not process.timed_out:
            missing = {line for _, line in process.accepted} - process.durable_at_stop
            if missing:
                self.problems.append(
                    "%s flushed in time but %d lines not stored, e.g. %r"
                    % (process.name, len(missing), sorted(missing)[:2])
                )
        if process.budget.held != 0:
            self.problems.append(
                "%s holds %d bytes after its flush" % (process.name, process.budget.held)
            )
        self.must_survive |= process.durable_at_stop
        process.kill()

    @precondition(
        lambda self: len(self.world.live) < MAX_LIVE and len(self.world.processes) < MAX_PROCESSES
    )
    @rule()
    def spawn(self) -> None:
        """A new process (a fresh writer ID) starts."""
        self._spawn()

    # -- invariants ------------------------------------------------------------------

    def check_blobs(self) -> dict[str, list[bytes]]:
        """The invariants on the container; the lines of each blob."""
        lines_of = stored(self.blobs, frozenset(self.block_blobs))
        names = collections.Counter(
            block_name(block)
            for name in lines_of
            for block in blocks_of(self.blobs.blobs[name])
        )
        twice_named = [name.hex() for name, n in names.items() if n > 1 and name is not None]
        assert not twice_named, "blocks appended twice: %r" % twice_named[:3]
        counts = collections.Counter(line for lines in lines_of.values() for line in lines)
        twice = [line for line, n in counts.items() if n > 1]
        assert not twice, "stored twice: %r" % twice[:3]
        for name, lines in lines_of.items():
            key, _ = family(name)
            for line in lines:
                assert line in self.key_of, "stored but never accepted: %r" % line
                assert self.key_of[line] == key, (line, name)
            blob = self.blobs.blobs[name]
            if name not in self.foreign_created:
                assert blob.content_type == CONTENT_TYPE, (name, blob.content_type)
            assert len(blob.blocks) <= self.blobs.max_blocks, (name, len(blob.blocks))
        return lines_of

    @invariant()
    def blobs_are_sound(self) -> None:
        """Whole gzip members per block; nothing twice; only accepted lines, in their key."""
        if not hasattr(self, "world"):
            return
        self.check_blobs()

    @invariant()
    def no_problems(self) -> None:
        """Nothing went wrong in a callback (a flush's end)."""
        if not hasattr(self, "world"):
            return
        assert not self.problems, self.problems

    @invariant()
    def no_process_spins(self) -> None:
        """No process loops without yielding (see ``SPIN_LIMIT``)."""
        if not hasattr(self, "world"):
            return
        assert not [p.name for p in self.world.processes if p.spun], "a process spun"

    @invariant()
    def budget_equals_held(self) -> None:
        """Each live process's budget counts exactly the bytes it holds."""
        if not hasattr(self, "world"):
            return
        for p in self.world.live:
            assert p.budget.held == p.held_bytes(), (p.name, p.budget.held, p.held_bytes())

    # -- the end ---------------------------------------------------------------------

    def teardown(self) -> None:
        """
        Storage comes back (stalled calls land, no more faults); the live processes
        stop with a long deadline; every line that had to survive is stored once.
        """
        if not hasattr(self, "world"):
            return
        world, blobs = self.world, self.blobs
        self.storms.clear()
        blobs.release()
        for p in self.live_processes():
            if p not in self.stopping:
                self.stopping.add(p)
                p.stop(FINAL_DEADLINE_S, self.stopped)
        try:
            world.run_until(
                lambda: all(p.closed or not p.alive for p in world.processes), 300.0
            )
        except AssertionError:
            raise AssertionError(
                "the flush did not end: %r"
                % [(p.name, p.registry.open_keys, len(p.registry._closing)) for p in world.live]
            )
        blobs.release()
        self.no_problems()
        self.no_process_spins()
        lines_of = self.check_blobs()
        lines = {line for lines in lines_of.values() for line in lines}
        assert self.foreign <= lines, "foreign lines lost"
        answered = {line for _, line in self.durable_answers}
        assert answered <= self.must_survive, sorted(answered - self.must_survive)[:2]
        missing = self.must_survive - lines
        assert not missing, "%d lines that had to survive lost, e.g. %r" % (
            len(missing),
            sorted(missing)[:2],
        )
        for name in self.block_blobs:
            assert self.blobs.blobs[name].body == b"not ours", name
        generations = collections.defaultdict(set)
        for name in list(lines_of) + list(self.block_blobs):
            key, generation = family(name)
            generations[key].add(generation)
        for key, found in generations.items():
            assert found == set(range(len(found))), (key, sorted(found))


class DurableAtDeadlineTests(SynchronousTestCase):
    """The bug the model found (see the module docstring), shrunk by hand."""

    def test_checkpoint_abandoned_at_the_deadline(self) -> None:
        """
        A process cut off from storage takes one line and is asked whether it is
        durable (a checkpoint: the member is closed and handed over as a block),
        then stops with a deadline of 1 s, still cut off: the block is never
        appended, so ``durable()`` must not fire True, nor the stream count the
        line stored.
        """
        world = AzureWorld()
        a = world.spawn_azure("a", "%032x" % 1, random.Random(1))
        a.partition(until=2.0)
        accepted = a.registry.accept(make_message(1, 1, 0, noisy=False))
        durable = accepted.durable()
        a.stop(1.0, lambda p: None)
        world.advance(2.0)
        self.assertTrue(a.flushed and a.timed_out)
        self.assertEqual(stored(world.blobs), {})
        self.assertEqual(accepted.stream.durable_lines, 0)
        self.assertIs(self.successResultOf(durable), False)


class AzureModelTests(SynchronousTestCase):
    """Runs :class:`AzureWritePathMachine`, and checks that its rollover paths happen."""

    def test_block_limit_below_the_writers(self) -> None:
        """
        With the service's block limit (3) below the writers' (6), appends meet 409
        ``BlockCountExceedsLimit`` and roll over: blobs of 3 blocks, no line lost.
        """
        world = AzureWorld(service_max_blocks=3)
        a = world.spawn_azure("a", "%032x" % 1, random.Random(1))
        lines = []
        for n in range(1, 60):
            message = make_message(n, 1, 0, noisy=True)
            a.registry.accept(message)
            lines.append(message.to_line())
            world.advance(0.25)
        a.stop(10.0, lambda p: None)
        world.advance(10.0)
        self.assertTrue(a.flushed and not a.timed_out)
        key = key_for(make_message(1, 1, 0, True).timestamp, 1)
        names = sorted(world.blobs.blobs)
        self.assertGreaterEqual(len(names), 3)
        self.assertEqual(names, sorted(rollover_key(key, g) for g in range(len(names))))
        self.assertEqual(
            [len(world.blobs.blobs[rollover_key(key, g)].blocks) for g in range(len(names) - 1)],
            [3] * (len(names) - 1),
        )
        stored_lines = [line for lines_ in stored(world.blobs).values() for line in lines_]
        self.assertEqual(sorted(stored_lines), sorted(lines))

    def test_model(self) -> None:
        """
        Under every kind of storage fault, with processes started, paused, cut off,
        stopped and killed at any step, and a foreign writer appending: the
        invariants of the module docstring after every step, and at the end every
        line that had to survive stored once.  ``MODEL_EXAMPLES`` sets the number of
        examples (longer local runs find rarer interleavings).
        """
        case = self

        class Machine(AzureWritePathMachine):
            def teardown(self) -> None:
                """The machine's teardown; then the errors logged as expected go."""
                try:
                    super().teardown()
                finally:
                    # Unexpected exceptions are logged once per type by each retry
                    # layer (a spin, too, which an invariant reports).
                    case.flushLoggedErrors(Unexpected, Spinning)

        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=int(os.environ.get("MODEL_EXAMPLES", "500")),
                stateful_step_count=60,
                deadline=None,
                # CI runs a fixed set of examples; developers' runs explore anew.
                derandomize=bool(os.environ.get("CI")),
                suppress_health_check=list(HealthCheck),
            ),
        )
