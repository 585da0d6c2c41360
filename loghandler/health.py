"""
What the probes report (:mod:`loghandler.admin`): one process's readiness
(:func:`local_health`), and with ``WORKERS`` above 1 the readiness and liveness of all
workers together (:func:`combine_health`, :func:`combine_liveness`), which the
supervisor computes from the workers' reports and hands back to every worker, so
that whichever worker accepts the probe's connection answers for the whole server.
"""

from __future__ import annotations

from typing import Any, Mapping

from loghandler.registry import StreamRegistry

#: The counters summed over workers.
_SUMMED = ("open_objects", "completing_objects", "buffered_bytes", "buffer_budget_bytes")


#: Seconds a running worker may go without a report before ``/livez`` calls the server
#: stuck (a worker reports every second; a start takes a few).
LIVE_STALE_S = 30.0

#: The default of ``READY_FAIL_AFTER_S``: seconds storage calls may fail, with none
#: succeeding, before the readiness probe answers 503.
READY_FAIL_AFTER_S = 30.0


def local_health(
    registry: StreamRegistry, ready_fail_after_s: float = READY_FAIL_AFTER_S
) -> dict[str, Any]:
    """
    This process's readiness: ``{"status": ..., "open_objects": n,
    "completing_objects": n, "buffered_bytes": n, "buffer_budget_bytes": n,
    "storage_failing_s": seconds}``.  ``status`` is ``"ok"`` while messages are
    taken and stored, else the first reason, in this order: ``"stopping"``,
    ``"storage not reachable"`` (starting: until the store was reached; with the
    last check's error once one failed),
    ``"storage failing for N s: ..."`` (every storage call failed for want of
    storage, refused, timed out, 5xx, access denied, for more than
    ``ready_fail_after_s`` seconds, with the last failure or the problem only an
    operator can fix), ``"buffers full"`` (the memory budget is spent).
    ``storage_failing_s`` is 0 while calls succeed.
    """
    failing = registry.storage_failing
    failing_s = 0.0 if failing is None else max(0.0, registry.seconds() - failing[0])
    if registry.stopping:
        state = "stopping"
    elif not registry.ready:
        reason = registry.unreachable
        state = "storage not reachable" + (": " + reason if reason else "")
    elif failing is not None and failing_s > ready_fail_after_s:
        state = "storage failing for %d s: %s" % (failing_s, registry.storage_problem or failing[1])
    elif registry.budget.exhausted:
        state = "buffers full"
    else:
        state = "ok"
    return {
        "status": state,
        "open_objects": len(registry.open_keys),
        "completing_objects": registry.completing,
        "buffered_bytes": registry.budget.held,
        "buffer_budget_bytes": registry.budget.limit,
        "storage_failing_s": round(failing_s, 1),
    }


#: Seconds a running worker may go without a report before ``/readyz`` counts it
#: as not ready (it takes connections it does not serve).
READY_STALE_S = 5.0


def combine_health(
    reports: Mapping[int, Mapping[str, Any]],
    workers: int,
    stopping: bool = False,
    silent: Mapping[int, float] = {},
) -> dict[str, Any]:
    """
    The state of the whole server from the last report of each running worker
    (keyed by worker number, 1 to ``workers``; a report also carries ``"pid"``).

    ``status`` is ``"ok"`` when at least one worker runs and every running worker
    is ok (a worker being restarted is not accepting, so it sends no request a 503);
    ``"stopping"`` once the supervisor stops; ``"no worker running"``; else the
    first worker's reason, prefixed ``"worker N: "``, or ``"worker N sent no report
    for S s"`` when ``silent`` (seconds since each worker's last report) says it has
    been silent for more than :data:`READY_STALE_S` (stuck: the kernel still hands
    it connections).  The counters are summed;
    ``"workers"`` lists each running worker's number, pid and status;
    ``"workers_running"`` and ``"workers_expected"`` count them.
    """
    running = sorted(reports)
    if stopping:
        status = "stopping"
    elif not running:
        status = "no worker running"
    else:
        status = "ok"
        for number in running:
            if silent.get(number, 0.0) > READY_STALE_S:
                status = "worker %d sent no report for %d s" % (number, silent[number])
                break
            if reports[number].get("status") != "ok":
                status = "worker %d: %s" % (number, reports[number].get("status"))
                break
    combined: dict[str, Any] = {"status": status}
    for field in _SUMMED:
        combined[field] = sum(int(reports[n].get(field, 0)) for n in running)
    combined["storage_failing_s"] = max(
        (float(reports[n].get("storage_failing_s", 0)) for n in running), default=0.0
    )
    combined["workers_running"] = len(running)
    combined["workers_expected"] = workers
    combined["workers"] = [
        {"worker": n, "pid": reports[n].get("pid"), "status": reports[n].get("status")}
        for n in running
    ]
    return combined


def combine_liveness(silent: Mapping[int, float], stale_after_s: float) -> dict[str, Any]:
    """
    The whole server's liveness from the seconds each running worker (by number) has
    sent no report: ``{"status": "ok", "workers_running": n}``, or, once one has been
    silent for more than ``stale_after_s``, ``"worker N sent no report for S s"``:
    its reactor is stuck, which a restart cures.
    """
    for number in sorted(silent):
        if silent[number] > stale_after_s:
            status = "worker %d sent no report for %d s" % (number, silent[number])
            return {"status": status, "workers_running": len(silent)}
    return {"status": "ok", "workers_running": len(silent)}
