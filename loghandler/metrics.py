"""
The Prometheus metrics of one process (issue 9), through ``prometheus_client``.

One :class:`Metrics` per process (made by :func:`loghandler.service.build_service`
or by :func:`loghandler.tap.build_root`) owns its own ``CollectorRegistry``
(:attr:`Metrics.registry`), never the library's global one: tests stay isolated, and
with ``WORKERS`` above 1 each worker has one, which the supervisor combines.  The
objects that do the work are handed the ``Metrics`` and count on it: the web
resource (messages by result, bytes received), the stream registry and its streams
(buffered bytes, open streams, parts, checkpoints, bytes stored, lines lost, the age
of the oldest line not in storage), the retry layer (every storage call by
operation and outcome, its latency, retries), the S3 merger and recovery, the Azure
writer, and the stream service (the flush on stop).  Each of them makes a fresh
``Metrics()`` when built without one (tests, helpers).

Combining over workers: counters and histograms are summed, and so are gauges,
except those named in :data:`GAUGES_COMBINED_BY_MAX`, whose maximum is the whole
server's value (an age or a duration summed over workers means nothing).

README.rst's "Metrics" section lists every metric and what it means.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)

# The ``*_created`` samples (the time each counter was made) are not exported: they
# cannot be combined over workers, and no alert needs them.  The switch is the
# library's, for every registry of the process; all of loghandler's are ours.
disable_created_metrics()

#: The results of ``loghandler_messages_total``: ``accepted`` (200, or 202 with
#: ``ACK=durable``), then each reason a ``POST /log`` is refused.
MESSAGE_RESULTS = (
    "accepted",
    "invalid",  # 400: the body is not a valid message (or batch)
    "too_large",  # 413: body, batch or a batch line over its limit
    "busy",  # 503: the memory budget, the client's share, or the key's parts backed up
    "unavailable",  # 503: storage not reached yet since the start
    "stopping",  # 503: the server is stopping
    "error",  # 500: an unexpected error (logged with its traceback)
    "method",  # 405: not a POST
    "not_found",  # 404: a path below /log
    "unauthorized",  # 401: AUTH_TOKENS_FILE, no known bearer token
    "forbidden",  # 403: AUTH_TOKENS_FILE, a client_id the token may not write
)

#: ``loghandler_storage_calls_total``'s outcome of an attempt that was cut because the
#: shutdown deadline passed or its caller gave up (the other outcomes are ``ok`` and
#: the retry layer's :class:`~loghandler.retry.Fault` values).
ABANDONED = "abandoned"

#: Upper bounds of the storage latency histogram, seconds: 5 ms to the 120 s an
#: attempt may take.
LATENCY_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    float("inf"),
)

#: Upper bounds of the completion duration histogram, seconds: from the close of a
#: stream (rotation or stop) until its object is merged, staged or given up.
COMPLETION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 300.0, float("inf"))

#: Gauges whose value over several workers is the maximum of theirs, not the sum.
GAUGES_COMBINED_BY_MAX = frozenset(
    {
        "loghandler_oldest_unstored_line_age_seconds",
        "loghandler_last_flush_duration_seconds",
        "loghandler_storage_failing",
    }
)


class Metrics:
    """
    The metrics of one process, on their own registry (names and meanings: the
    module docstring and README.rst's "Metrics").

    :ivar registry: the ``CollectorRegistry`` holding them all (serve it with
        ``prometheus_client.generate_latest(registry)``).
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds... (Linux)
        ProcessCollector(registry=registry)

        # -- requests --------------------------------------------------------------
        self.messages = Counter(
            "loghandler_messages_total",
            "Messages POSTed to /log by result: accepted, or why refused (a batch"
            " counts each of its lines; a body refused before it was split counts 1).",
            ["result"],
            registry=registry,
        )
        for result in MESSAGE_RESULTS:
            self.messages.labels(result=result)
        self.accepted = self.messages.labels(result="accepted")
        self.received_bytes = Counter(
            "loghandler_received_bytes_total",
            "Bytes of the request bodies of accepted POSTs to /log.",
            registry=registry,
        )

        self.refused_requests = Counter(
            "loghandler_refused_requests_total",
            "Requests the connection answered before any resource saw them, by status:"
            " 408 (not whole within REQUEST_TIMEOUT_S), 414 (request line too long),"
            " 431 (header block too large), 400 (not HTTP).",
            ["status"],
            registry=registry,
        )
        self.open_connections = Gauge(
            "loghandler_open_connections",
            "HTTP connections open on the main listener (MAX_CONNECTIONS caps them).",
            registry=registry,
        )

        # -- streams and memory ------------------------------------------------------
        self.buffered_bytes = Gauge(
            "loghandler_buffered_bytes",
            "Bytes held in memory for lines not yet in storage, and merges (the budget"
            " counted against BUFFER_BUDGET_BYTES).",
            registry=registry,
        )
        self.buffer_budget_bytes = Gauge(
            "loghandler_buffer_budget_bytes",
            "BUFFER_BUDGET_BYTES of this process: past it, messages get 503.",
            registry=registry,
        )
        self.open_streams = Gauge(
            "loghandler_open_streams",
            "Objects (day and client) with an open stream taking lines.",
            registry=registry,
        )
        self.completing_streams = Gauge(
            "loghandler_completing_streams",
            "Streams completing their objects (rotation or stop), not taking lines.",
            registry=registry,
        )
        self.oldest_unstored_line_age = Gauge(
            "loghandler_oldest_unstored_line_age_seconds",
            "Age of the oldest accepted line not yet in storage (neither in a landed"
            " part, checkpoint or staged tail); 0 when there is none.",
            registry=registry,
        )
        self.stored_bytes = Counter(
            "loghandler_stored_bytes_total",
            "Compressed bytes of lines that landed in storage (parts and tails;"
            " checkpoints counted when their part lands).",
            registry=registry,
        )
        self.parts = Counter(
            "loghandler_parts_total",
            "Parts of a full part size (S3: a segment of a staging upload; Azure: a"
            " block) that landed.",
            registry=registry,
        )
        self.checkpoints = Counter(
            "loghandler_checkpoints_total",
            "Checkpoints that landed (S3: the part being filled uploaded as it stands;"
            " Azure: its member appended).",
            registry=registry,
        )
        self.checkpoint_bytes = Counter(
            "loghandler_checkpoint_bytes_total",
            "Bytes uploaded by the checkpoints that landed (S3 uploads the part being"
            " filled again each time: against stored bytes, the cost of CHECKPOINT_S).",
            registry=registry,
        )
        self.completions = Counter(
            "loghandler_completions_total",
            "Streams completed, by outcome: merged (in its key), queued (staged, left"
            " to the key's merger), staged (left for recovery), empty, lost (some"
            " lines not stored).",
            ["outcome"],
            registry=registry,
        )
        self.completion_seconds = Histogram(
            "loghandler_completion_duration_seconds",
            "Seconds from a stream's close (rotation or stop) until its object was"
            " merged, staged or given up.",
            registry=registry,
            buckets=COMPLETION_BUCKETS_S,
        )
        self.lines_lost = Counter(
            "loghandler_lines_lost_total",
            "Accepted lines that could not be stored nor staged (a flush cut by its"
            " deadline, a part the store refused): should stay 0.",
            registry=registry,
        )
        self.last_flush_seconds = Gauge(
            "loghandler_last_flush_duration_seconds",
            "Seconds the last flush on stop took (0 before any).",
            registry=registry,
        )

        # -- storage -----------------------------------------------------------------
        self.storage_calls = Counter(
            "loghandler_storage_calls_total",
            "Attempts of storage calls by operation (S3 API or Azure operation) and"
            " outcome: ok, transient, permanent, conflict, gone, invalid, abandoned.",
            ["operation", "outcome"],
            registry=registry,
        )
        self.storage_retries = Counter(
            "loghandler_storage_retries_total",
            "Storage call attempts that failed and were tried again, by operation.",
            ["operation"],
            registry=registry,
        )
        self.storage_seconds = Histogram(
            "loghandler_storage_call_duration_seconds",
            "Seconds one storage call attempt took, answer included (failed ones too),"
            " by operation.",
            ["operation"],
            registry=registry,
            buckets=LATENCY_BUCKETS_S,
        )
        self.storage_failing = Gauge(
            "loghandler_storage_failing",
            "1 while storage fails in a way only an operator can fix (access denied,"
            " no such bucket or container), else 0.",
            registry=registry,
        )
        self.merges = Counter(
            "loghandler_merges_total",
            "S3 merges that landed: a new version of a key holding its staging"
            " objects, by method (copy: multipart upload; put: small objects"
            " recompressed).",
            ["method"],
            registry=registry,
        )
        for method in ("copy", "put"):
            self.merges.labels(method=method)
        self.merged_staging_objects = Counter(
            "loghandler_merged_staging_objects_total",
            "S3 staging objects merged into their keys (and deleted).",
            registry=registry,
        )
        self.blocks_appended = Counter(
            "loghandler_blocks_appended_total",
            "Azure blocks appended to append blobs (parts, checkpoints and tails).",
            registry=registry,
        )
        self.staged_awaiting_merge = Gauge(
            "loghandler_staged_awaiting_merge_objects",
            "S3 staging objects of this process's streams, complete and not yet"
            " merged: waiting for a merge slot (COMPLETIONS_IN_FLIGHT) or being"
            " handed to their key's merger.",
            registry=registry,
        )
        self.staged_awaiting_merge_bytes = Gauge(
            "loghandler_staged_awaiting_merge_bytes",
            "Bytes of those staging objects.",
            registry=registry,
        )
        self.recovered_writers = Counter(
            "loghandler_recovered_writers_total",
            "Gone writers (lease lapsed: crashed or cut processes) whose staged data"
            " this process's recovery took on.",
            registry=registry,
        )

    def get(self, name: str, labels: Optional[dict[str, str]] = None) -> float:
        """
        The value of sample ``name`` (as exposed: ``loghandler_messages_total``),
        0 when it has none yet; for tests and reports.
        """
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value
