"""
A model-based test of the whole write path (hypothesis ``RuleBasedStateMachine``):
processes (each a registry with checkpoints, an S3 writer, a lease and a recovery
service, on its own ``task.Clock``; :mod:`tests.model_support`) take messages for a
few keys and write into one :class:`MemoryStore`, which models S3 as it is (metadata
set only at creation, 412 on stale conditions, 409 and a discarded upload on a racing
conditional Complete, NoSuchUpload after a completion, the part minimum), while
every storage call can fail in every way: an error before it lands, an answer lost
after it landed, a stall (the call lands when released, whether or not the caller
gave up), a 409, an exception of a type nobody expected.  Any process can be killed
at any step (SIGKILL: its memory and clock stop, what it sent still lands), paused
(SIGSTOP, then it goes on where it was), or cut off from storage for a while, and
new ones started; a process whose lease was taken over is killed, as production
exits.

After every step: no line is stored twice under ``chat/``, every object there and
under ``_loghandler/staging/`` is whole gzip members, only acknowledged lines are
stored, and each live process's memory budget equals the bytes it holds.

At the end, storage comes back, the live processes stop (flush with a shutdown
deadline of 120 s or 2 s, then the lease is deleted), and a new process with no
traffic recovers until nothing is left under ``_loghandler/`` but its own lease and
no multipart upload remains.  Then every line that had to survive is stored under
``chat/`` exactly once: every line of a process that stopped within its deadline
(every line it knew to be in storage at its deadline), and every line a killed
process knew to be in storage when it died (a part, checkpoint or tail holding it
had landed; all the more every line whose ``durable()`` had fired True, the 200 of
``ACK=durable``).
"""

from __future__ import annotations

import collections
import os
import random
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
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from loghandler.interfaces import StorageError
from loghandler.message import Message
from loghandler.registry import Busy
from loghandler.storage.memory import CONFLICT, LOST, STALL, MemoryStore, lost_answer
from loghandler.storage.s3.layout import PROBE_PREFIX, STAGING_PREFIX, WORK_PREFIX, lease_key
from loghandler.storage.s3.lease import LeaseLost
from tests.helpers import DAY_START_MS, read_lines
from tests.model_support import (
    CHECKPOINT_S,
    LEASE_S,
    LIFETIME_S,
    RECOVERY_INTERVAL_S,
    Process,
    World,
)

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
    "ListObjectsV2",
    "ListParts",
)
FAULTS = ("error", "lost", "stall", "conflict", "unexpected")
#: Processes one example starts at most (the final recoverer aside).
MAX_PROCESSES = 4
#: The writer ID of the process that recovers at the end.
FINAL = "final"


class Unexpected(Exception):
    """An exception of a type no storage code knows."""


def stored_lines(s3: MemoryStore) -> list[bytes]:
    """Every line stored under ``chat/``, checking each object is whole gzip members."""
    lines: list[bytes] = []
    for key, obj in s3.objects.items():
        if key.startswith("chat/"):
            lines.extend(read_lines(obj.body))
    return lines


def make_message(n: int, client: int, noisy: bool) -> Message:
    """Message number ``n`` for client ``client``; noisy ones compress poorly."""
    # 200 hex digits that compress poorly: about 10 lines fill a part.
    text = "%0200x" % random.Random(n).getrandbits(800) if noisy else "m"
    return Message("%s %d" % (text, n), n, client, DAY_START_MS + 1000)


class WritePathMachine(RuleBasedStateMachine):
    """The rules and invariants described in the module docstring."""

    @initialize(seed=st.integers(0, 2**32 - 1), deadline=st.sampled_from([120.0, 2.0]))
    def setup(self, seed: int, deadline: float) -> None:
        """
        Two processes; ``deadline``: the shutdown deadline of the stop at the end (a
        short one leaves data staged for recovery, and loses what no checkpoint
        stored: those lines need not survive).
        """
        # Its own generator: storms also act during the flush in teardown, after
        # hypothesis stopped drawing.
        self.rng = random.Random(seed)
        self.world = World()
        self.s3 = self.world.s3
        self.acked: set[bytes] = set()
        #: Lines that must be stored once in the end (filled at deaths and stops).
        self.must_survive: set[bytes] = set()
        #: Lines whose ``durable()`` fired True: answered 200 under ACK=durable.
        self.durable_answers: set[bytes] = set()
        self.takeovers: list[tuple[str, float]] = []
        self.next_id = 1
        self.deadline = deadline
        # operation -> (fault, probability) while a storm is on.
        self.storms: dict[str, tuple[str, float]] = {}
        self.s3.chaos = self.chaos
        self._spawn()
        self._spawn()

    # -- processes -------------------------------------------------------------------

    def _spawn(self, name: Optional[str] = None) -> Process:
        """Start a process with a fresh writer ID (``w1``, ``w2``... or ``name``)."""
        name = name or "w%d" % (len(self.world.processes) + 1)
        return self.world.spawn(name, self.rng, self.taken_over)

    def taken_over(self, process: Process) -> None:
        """A process's lease was taken over: it exits at once (``tap._taken_over``)."""
        self.takeovers.append((process.name, self.world.now))
        self.kill(process)

    def kill(self, process: Process) -> None:
        """SIGKILL; what the process knew to be in storage must survive."""
        if process.alive:
            self.must_survive |= process.durable()
            process.kill()

    def live(self, index: int) -> Optional[Process]:
        """The live process ``index`` designates (modulo their number), if any."""
        live = self.world.live
        return live[index % len(live)] if live else None

    # -- storage faults -------------------------------------------------------------

    def chaos(self, operation: str) -> Optional[BaseException]:
        """The fault for one call during a storm (see :attr:`MemoryStore.chaos`)."""
        storm = self.storms.get(operation)
        if storm is None or self.rng.random() >= storm[1]:
            return None
        if storm[0] == "conflict" and operation != "CompleteMultipartUpload":
            # S3 answers 409 to conditional Completes only; counted on other
            # calls, conflicts would pile up faster than merges use them.
            return None
        return self.fault(operation, storm[0])

    @staticmethod
    def fault(operation: str, fault: str) -> BaseException:
        """What :class:`MemoryStore` does for a fault named in the rules."""
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

    @rule(seconds=st.sampled_from([0.0, 0.1, 0.3]))
    def slow_network(self, seconds: float) -> None:
        """
        From now on answers reach the processes ``seconds`` after their call landed
        (so that merges of one key by several processes overlap).
        """
        self.world.latency = seconds
        for process in self.world.live:
            process.client.latency = seconds

    @rule()
    def release(self) -> None:
        """Stalled calls land (their callers may have given up, or died, long ago)."""
        self.s3.release()

    # -- traffic, time, crashes ------------------------------------------------------

    def _send(
        self, writer: int, client: int, count: int, noisy: bool, durable: bool, seconds: float
    ) -> None:
        """``count`` messages spread over ``seconds`` (time passes meanwhile)."""
        for i in range(count):
            if i and seconds:
                self.world.advance(seconds / count)
            process = self.live(writer)
            if process is None or process.paused_until is not None:
                continue  # its HTTP server answers no one
            n = self.next_id
            self.next_id += 1
            message = make_message(n, client, noisy)
            try:
                accepted = process.registry.accept(message)
            except Busy:
                continue
            line = message.to_line()
            self.acked.add(line)
            process.accepted.append((accepted, line))
            if durable:

                def answered(ok: bool, line: bytes = line) -> None:
                    if ok:
                        self.durable_answers.add(line)

                accepted.durable().addCallback(answered)

    @rule(
        writer=st.integers(0, MAX_PROCESSES - 1),
        client=st.integers(1, 2),
        count=st.integers(1, 12),
        noisy=st.booleans(),
        seconds=st.sampled_from([0.0, 1.0, 3.0]),
    )
    def send(self, writer: int, client: int, count: int, noisy: bool, seconds: float) -> None:
        """Messages for one key through one process, answered once accepted."""
        self._send(writer, client, count, noisy, False, seconds)

    @rule(
        writer=st.integers(0, MAX_PROCESSES - 1),
        client=st.integers(1, 2),
        count=st.integers(1, 6),
        noisy=st.booleans(),
        seconds=st.sampled_from([0.0, 1.0, 3.0]),
    )
    def send_durable(
        self, writer: int, client: int, count: int, noisy: bool, seconds: float
    ) -> None:
        """Messages under ACK=durable: each answered 200 once its ``durable()`` fires True."""
        self._send(writer, client, count, noisy, True, seconds)

    @rule(seconds=st.sampled_from([0.5, 2.0, 4.0, LIFETIME_S]))
    def advance(self, seconds: float) -> None:
        """Time passes: retries, timeouts, checkpoints, renewals, recovery, rotation."""
        self.world.advance(seconds)

    @precondition(lambda self: bool(self.world.live))
    @rule(writer=st.integers(0, MAX_PROCESSES - 1))
    def crash(self, writer: int) -> None:
        """A live process is killed (SIGKILL, OOM, power loss)."""
        process = self.live(writer)
        assert process is not None
        self.kill(process)

    def mergers(self) -> list[Process]:
        """The live processes holding a key's merge lock (merging its queue)."""
        return [
            p
            for p in self.world.live
            if p.store.key_merges.holding or p.recoverer.key_merges.holding
        ]

    @precondition(lambda self: bool(self.mergers()))
    @rule(merger=st.integers(0, MAX_PROCESSES - 1))
    def crash_merger(self, merger: int) -> None:
        """
        A process is killed while it holds a key's merge lock: its lock stays, and
        what other writers queued for it waits for recovery.
        """
        mergers = self.mergers()
        self.kill(mergers[merger % len(mergers)])

    @precondition(lambda self: bool(self.world.live))
    @rule(
        writer=st.integers(0, MAX_PROCESSES - 1),
        seconds=st.sampled_from([2.0, 4.0, 8.0]),
        answers_first=st.booleans(),
    )
    def pause(self, writer: int, seconds: float, answers_first: bool) -> None:
        """
        A live process stops for a while (SIGSTOP, a long GC pause, a stalled VM):
        its lease may lapse and be taken over meanwhile; then it goes on.
        """
        process = self.live(writer)
        assert process is not None
        process.pause(self.world.now + seconds, answers_first)

    @precondition(lambda self: bool(self.world.live))
    @rule(writer=st.integers(0, MAX_PROCESSES - 1), seconds=st.sampled_from([2.0, 4.0, 8.0]))
    def partition(self, writer: int, seconds: float) -> None:
        """A live process cannot reach storage for a while (its calls fail unlanded)."""
        process = self.live(writer)
        assert process is not None
        process.partition(self.world.now + seconds)

    @precondition(lambda self: len(self.world.processes) < MAX_PROCESSES)
    @rule()
    def spawn(self) -> None:
        """A new process (a fresh writer ID) starts."""
        self._spawn()

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def nothing_twice_and_only_acknowledged(self) -> None:
        """No line stored twice; every stored line acknowledged; objects are gzip."""
        if not hasattr(self, "world"):
            return
        lines = stored_lines(self.s3)
        twice = [line for line, n in collections.Counter(lines).items() if n > 1]
        assert not twice, "stored twice: %r" % twice[:3]
        assert set(lines) <= self.acked
        for key, obj in self.s3.objects.items():
            if key.startswith(STAGING_PREFIX):
                read_lines(obj.body)

    @invariant()
    def no_process_spins(self) -> None:
        """No process loops without yielding (see :attr:`Process.spun`)."""
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

    # -- stop and recovery --------------------------------------------------------------

    def teardown(self) -> None:
        """
        The live processes stop with the deadline while the storms go on for 10 s,
        then storage comes back (stalled calls land); then a new process recovers;
        every line that had to survive is then stored once, nothing else is left.
        """
        if not hasattr(self, "world"):
            return
        world, s3 = self.world, self.s3
        stopping = world.live
        for p in stopping:
            p.stop(self.deadline, lambda p: None)
        world.advance(10.0)
        self.storms.clear()
        s3.release()
        world.run_until(lambda: all(p.closed or not p.alive for p in stopping), 200.0)
        s3.release()
        for p in world.processes:
            if p.flushed:
                # With time enough, a flush stores every line; cut by its deadline,
                # what it stored (staged, for recovery) must survive.
                if self.deadline > 60:
                    assert p.durable_at_stop == {line for _, line in p.accepted}, p.name
                self.must_survive |= p.durable_at_stop
                assert p.budget.held == 0, (p.name, p.budget.held)
        final = self._spawn(FINAL)
        # Its own lease, and its own probe when a fault injected earlier met one
        # of the probe's single attempts: the live data of a live process.
        own = {lease_key(FINAL), PROBE_PREFIX + FINAL}

        def recovered() -> bool:
            return not any(u.key not in own for u in s3.uploads.values()) and not any(
                key.startswith(WORK_PREFIX) and key not in own for key in s3.objects
            )

        try:
            world.run_until(recovered, 300.0)
        except AssertionError:
            left = sorted(k for k in s3.objects if k.startswith(WORK_PREFIX))
            uploads = sorted(u.key for u in s3.uploads.values())
            raise AssertionError("recovery did not end: left %r, uploads %r" % (left, uploads))
        assert final.alive, "the final recoverer was taken over"
        self.no_process_spins()
        lines = stored_lines(s3)
        twice = [line for line, n in collections.Counter(lines).items() if n > 1]
        assert not twice, "stored twice: %r" % twice[:3]
        assert set(lines) <= self.acked
        assert self.durable_answers <= self.must_survive
        missing = self.must_survive - set(lines)
        assert not missing, "%d lines that had to survive lost, e.g. %r (takeovers: %r)" % (
            len(missing),
            sorted(missing)[:2],
            self.takeovers,
        )
        final.recovery.stopService()
        final.lease.stop()


class CrashRecoveryTests(SynchronousTestCase):
    """
    One crash without faults, on the model's processes: what survives, and how soon
    recovery by another process ends.
    """

    def crash_and_recover(self, recoverer_at_crash: bool) -> None:
        """
        Process ``a`` takes a noisy line every 0.25 s (parts, checkpoints, rotations)
        from 0 to T = 20.25 s, and is killed at T.  The recoverer ``b`` starts at 0
        (so it is healthy at T), or at T (a restart).

        Every line accepted more than ``CHECKPOINT_S`` before T is stored exactly once,
        and so is every line ``a`` knew to be in storage: a checkpoint round runs
        every ``CHECKPOINT_S``, and without faults its uploads land at once.

        Recovery ends by T + 4 x ``LEASE_S`` + ``RECOVERY_INTERVAL_S``: ``a``'s last
        lease write is at L <= T.  A pass judges ``a`` gone when ``now - L > 3 x
        LEASE_S``, where ``now`` is the recoverer's own lease's LastModified, written
        every ``LEASE_S`` (so ``now`` >= the pass's time - ``LEASE_S``): every pass
        after L + 4 x ``LEASE_S`` does, and passes run every ``RECOVERY_INTERVAL_S``.
        Without faults a pass claims, completes and merges at once.  The healthy gate
        of a recoverer started at T (3 x ``LEASE_S`` of renewals) ends before that.
        """
        world = World()

        def taken_over(process: Process) -> None:
            self.fail("%s taken over" % process.name)

        rng = random.Random(1)
        a = world.spawn("a", rng, taken_over)
        b = world.spawn("b", rng, taken_over) if not recoverer_at_crash else None
        crash_at = 20.25
        accepted_at: list[tuple[float, bytes]] = []
        n = 0
        while world.now < crash_at:
            n += 1
            message = make_message(n, 1, noisy=True)
            accepted = a.registry.accept(message)
            accepted_at.append((world.now, message.to_line()))
            a.accepted.append((accepted, message.to_line()))
            world.advance(0.25)
        self.assertEqual(world.now, crash_at)
        durable = a.durable()
        open_streams = [a.registry._open[key].stream for key in a.registry.open_keys]
        a.kill()
        if b is None:
            b = world.spawn("b", rng, taken_over)
        s3 = world.s3

        def recovered() -> bool:
            return not s3.uploads and not any(
                key.startswith(WORK_PREFIX) and key != lease_key("b") for key in s3.objects
            )

        done_at = world.run_until(recovered, 60.0)
        lines = stored_lines(s3)
        counts = collections.Counter(lines)
        self.assertEqual([line for line, c in counts.items() if c > 1], [])
        self.assertLessEqual(set(lines), {line for _, line in accepted_at})
        old_enough = {line for t, line in accepted_at if t < crash_at - CHECKPOINT_S}
        self.assertEqual(old_enough - set(lines), set())
        self.assertEqual(durable - set(lines), set())
        # The stream open at the crash had lines that only checkpoints stored.
        self.assertEqual(len(open_streams), 1)
        self.assertGreater(open_streams[0].checkpoints, 0)
        self.assertLessEqual(done_at - crash_at, 4 * LEASE_S + RECOVERY_INTERVAL_S)
        b.recovery.stopService()
        b.lease.stop()

    def test_recovered_by_running_process(self) -> None:
        """A crash recovered by a process that was running all along."""
        self.crash_and_recover(recoverer_at_crash=False)

    def test_recovered_by_restart(self) -> None:
        """A crash recovered by a process started at the moment of the crash."""
        self.crash_and_recover(recoverer_at_crash=True)


class LeaseFenceTests(SynchronousTestCase):
    """
    The fence between a writer that comes back and a recoverer that judged it gone,
    in the two cases the model found (scenarios shrunk by hand, without faults but
    a partition and one delayed call).  Process ``a`` writes; ``b`` recovers, its
    passes run by hand.
    """

    def setUp(self) -> None:
        self.world = World()
        self.taken_over: list[str] = []
        rng = random.Random(1)
        self.a = self.world.spawn("a", rng, self.kill)
        self.b = self.world.spawn("b", rng, self.kill)
        self.a.recovery.stopService()
        self.b.recovery.stopService()

    def kill(self, process: Process) -> None:
        """A takeover: the process exits at once."""
        self.taken_over.append(process.name)
        process.kill()

    def test_claim_landing_after_a_renewal(self) -> None:
        """
        ``a`` checkpoints lines 1-3 into its staging upload, then cannot reach S3 for
        4 s.  ``b``'s pass finds ``a``'s lease 4 s old and claims ``a``, but the
        claim's write is slow: meanwhile ``a`` is back and renews its lease, so it
        holds the lease by its own reckoning; then the claim lands.

        The claim must not take ``a`` over, and lines 1-4 must be stored once.
        (Found by the model: the claim was an unconditional DeleteObject, which
        removed the renewed lease; ``b`` then completed and merged ``a``'s upload,
        and ``a``, finding its upload gone, staged its whole segment again in a new
        one, lines 1-3 included, before its next renewal told it it was taken over.)
        """
        world, a, s3 = self.world, self.a, self.world.s3
        world.advance(4.0)
        accepted = [a.registry.accept(make_message(n, 1, False)) for n in (1, 2, 3)]
        self.assertTrue(self.successResultOf(accepted[-1].durable()))
        a.partition(until=8.0)
        world.advance(4.0)
        # b's claim (its first write of the pass) stalls; nothing else does.
        s3.before("PutObject", lambda: s3.hold("PutObject"))
        ensureDeferred(self.b.recoverer.recover_once())
        self.assertEqual([held.key for held in s3.held], [lease_key("a")])
        claim = s3.held.pop()
        s3.release()
        world.run_until(lambda: a.lease.healthy_for > 0, 5.0)  # a renewed its lease
        s3.held.append(claim)
        s3.release()  # the claim lands
        self.assertTrue(
            self.successResultOf(a.registry.accept(make_message(4, 1, False)).durable())
        )
        self.b.recovery.startService()
        world.advance(9.0)  # a's stream completes
        self.assertEqual(self.taken_over, [])
        lines = stored_lines(s3)
        expected = [make_message(n, 1, False).to_line() for n in range(1, 5)]
        self.assertEqual(sorted(lines), sorted(expected))

    def test_sweep_deleting_a_renewed_lease(self) -> None:
        """
        ``a`` (no staged data) cannot reach S3 for 4.5 s.  ``b``'s pass lists the
        leases, finds ``a``'s 4 s old, and goes on with its sweep, whose listing of
        merge uploads under ``chat/`` stalls for 3 s.  Meanwhile ``a`` is back and
        renews its lease.  The sweep then deletes ``a``'s lease as the lease of a
        gone writer without staged data, on the strength of its listing from 3 s
        before, and ``a``, healthy, is taken over at its next renewal: it exits
        without a flush, losing every line it took that no checkpoint stored yet.

        ``a`` must not be taken over: a lease renewed since the listing is not a
        gone writer's (list again before deleting, or delete on a condition).
        """
        world, a, s3 = self.world, self.a, self.world.s3
        world.advance(4.0)
        a.partition(until=8.5)
        world.advance(4.0)
        # The pass's first ListMultipartUploads (staging) answers; the sweep's
        # (chat/) stalls until released.
        s3.before(
            "ListMultipartUploads",
            lambda: s3.before("ListMultipartUploads", lambda: s3.hold("ListMultipartUploads")),
        )
        ensureDeferred(self.b.recoverer.recover_once())
        world.advance(3.0)
        self.assertGreater(a.lease.healthy_for, 0)  # a renewed its lease
        s3.release()
        world.advance(3.0)
        self.assertEqual(self.taken_over, [])

    def test_checkpoint_answered_after_the_claim(self) -> None:
        """
        ``a`` checkpoints lines 1-3 (part 1 of its staging upload).  At 5.0, just
        after a renewal of its lease, line 6's ``durable()`` starts a checkpoint of
        lines 1-6: its first attempt gets no answer (it may have landed, so the next
        attempt uses part number 2), and the second stalls in the network.  From
        5.25 ``a`` cannot reach S3.  At 9.0 ``b`` judges ``a`` gone (its lease is
        4 s old), claims it and lists its parts: part 1.  The stalled attempt lands
        just before ``b``'s CompleteMultipartUpload, and its answer reaches ``a``,
        which answers line 6 as durable (200 under ACK=durable); ``b`` completes
        with part 1, lines 1-3.

        A line answered durable must be stored: here, an answer that came 4 s
        after the last lease write ``a`` knows landed, when a recoverer may have
        claimed ``a`` and listed its parts (3 x ``LEASE_S``), cannot count before
        the lease is confirmed (``Lease.held`` is checked before a call, not when
        its answer comes).
        """
        world, a, s3 = self.world, self.a, self.world.s3
        world.advance(4.0)
        lines = [make_message(n, 1, False).to_line() for n in range(1, 7)]
        first = [a.registry.accept(make_message(n, 1, False)) for n in (1, 2, 3)]
        self.assertTrue(self.successResultOf(first[-1].durable()))
        world.advance(1.0)  # 5.0: a's lease renewal lands
        s3.fail("UploadPart", lost_answer())
        s3.before("UploadPart", lambda: s3.before("UploadPart", lambda: s3.hold("UploadPart")))
        accepted = [a.registry.accept(make_message(n, 1, False)) for n in (4, 5, 6)]
        durable = accepted[-1].durable()
        world.advance(0.25)
        self.assertEqual([held.operation for held in s3.held], ["UploadPart"])
        stalled = s3.held.pop()
        s3.release()
        a.partition(until=20.0)
        world.advance(3.75)  # 9.0

        def land_stalled() -> None:
            s3.held.append(stalled)
            s3.release()

        s3.before("CompleteMultipartUpload", land_stalled)
        ensureDeferred(self.b.recoverer.recover_once())
        self.assertTrue(stalled.result.called)
        answered = durable.called and durable.result is True
        self.b.recovery.startService()
        world.advance(15.0)
        stored = set(stored_lines(s3))
        self.assertEqual(set(lines if answered else lines[:3]) - stored, set())

    def tearDown(self) -> None:
        """Stop the live processes' timers; a takeover logs LeaseLost."""
        for process in self.world.live:
            process.lease.stop()
            process.kill()
        self.flushLoggedErrors(LeaseLost)


class RecoveryPaceTests(SynchronousTestCase):
    """How often a process's recovery passes run, on the model's processes."""

    def test_own_lease_not_listed(self) -> None:
        """
        A healthy process whose own lease is missing from the listing (deleted,
        while its renewals stall) skips its passes ("own lease not listed") until
        a renewal tells it more.  Passes must still come one per
        ``RECOVERY_INTERVAL_S``: a skipped pass is run again early only when our
        lease is about to qualify, not 10 ms later over and over (each pass lists
        three times).
        """
        world = World()
        b = world.spawn("b", random.Random(1), lambda p: p.kill())
        world.advance(5.0)
        s3 = world.s3
        s3.hold("PutObject")  # b's renewals stall: its lease stays fresh for 2 s
        del s3.objects[lease_key("b")]
        before = len(s3.calls)
        world.advance(1.9, tick=0.01)
        passes = s3.calls[before:].count(("ListMultipartUploads", STAGING_PREFIX))
        self.assertEqual(b.recovery.last_report.skipped, "own lease not listed")
        self.assertLessEqual(passes, 3)
        b.recovery.stopService()
        b.lease.stop()
        s3.release()


class DeadlineTests(SynchronousTestCase):
    """The shutdown deadline, on the model's processes."""

    def test_deadline_during_a_part_retry(self) -> None:
        """
        ``a`` stops with a deadline of 2 s while every UploadPart answers 503: the
        tail's upload is retried until the deadline, where the retry layer raises
        Abandoned.  The flush must end there (the tail lost, logged, the checkpoint
        staged for recovery).  (Found by the model: ``S3ObjectWriter._upload`` took
        any Abandoned but its own for "out of part numbers" and tried again; the
        retry layer raises Abandoned at once past the deadline, and the lease is
        held, so the loop never yielded: the process spun forever at its deadline.)
        """
        world = World()
        a = world.spawn("a", random.Random(1), lambda p: p.kill())
        world.advance(4.0)
        accepted = [a.registry.accept(make_message(n, 1, False)) for n in (1, 2, 3)]
        self.assertTrue(self.successResultOf(accepted[-1].durable()))
        world.s3.fail("UploadPart", StorageError("UploadPart", 503, "SlowDown"), times=1000)
        # The model's guard ends a loop that does not yield (RuntimeError, logged).
        self.addCleanup(self.flushLoggedErrors, RuntimeError)
        a.stop(2.0, lambda p: None)
        world.advance(3.0)
        self.assertFalse(a.spun)
        self.assertTrue(a.closed)
        a.kill()



class WritePathModelTests(SynchronousTestCase):
    """Runs :class:`WritePathMachine`."""

    def test_model(self) -> None:
        """
        Under every kind of storage fault, with processes started, paused, cut off
        and killed at any step: no line stored twice at any step; after stop and
        recovery every line that had to survive stored once, nothing left under
        ``_loghandler/``.  ``MODEL_EXAMPLES`` sets the number of examples (longer
        local runs find rarer interleavings).
        """
        case = self

        class Machine(WritePathMachine):
            def teardown(self) -> None:
                """The machine's teardown; then the errors logged as expected go."""
                try:
                    super().teardown()
                finally:
                    # Unexpected exceptions are logged once per type by each retry
                    # layer; a process whose lease was taken over logs LeaseLost.
                    case.flushLoggedErrors(Unexpected, LeaseLost)

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
