"""
What ``GET /healthz`` reports: one process's state (:func:`local_health`), and with
``WORKERS`` above 1 the state of all workers together (:func:`combine_health`), which
the supervisor computes from the workers' reports and hands back to every worker, so
that whichever worker accepts the probe's connection answers for the whole server.
"""

from __future__ import annotations

from typing import Any, Mapping

from loghandler.registry import StreamRegistry

#: The counters summed over workers.
_SUMMED = ("open_objects", "completing_objects", "buffered_bytes", "buffer_budget_bytes")


def local_health(registry: StreamRegistry) -> dict[str, Any]:
    """
    This process's state: ``{"status": ..., "open_objects": n, "completing_objects": n,
    "buffered_bytes": n, "buffer_budget_bytes": n}``.  ``status`` is ``"ok"`` while
    messages are taken, else the first reason they are not, in this order:
    ``"stopping"``, ``"storage not reachable"`` (until the store was reached),
    ``"storage failing: ..."`` (a failure only an operator can fix: access denied,
    no such bucket), ``"buffers full"`` (the memory budget is spent).
    """
    if registry.stopping:
        state = "stopping"
    elif not registry.ready:
        state = "storage not reachable"
    elif registry.storage_problem is not None:
        state = "storage failing: %s" % registry.storage_problem
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
    }


def combine_health(
    reports: Mapping[int, Mapping[str, Any]], workers: int, stopping: bool = False
) -> dict[str, Any]:
    """
    The state of the whole server from the last report of each running worker
    (keyed by worker number, 1 to ``workers``; a report also carries ``"pid"``).

    ``status`` is ``"ok"`` when at least one worker runs and every running worker
    is ok (a worker being restarted is not accepting, so it sends no request a 503);
    ``"stopping"`` once the supervisor stops; ``"no worker running"``; else the
    first worker's reason, prefixed ``"worker N: "``.  The counters are summed;
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
            if reports[number].get("status") != "ok":
                status = "worker %d: %s" % (number, reports[number].get("status"))
                break
    combined: dict[str, Any] = {"status": status}
    for field in _SUMMED:
        combined[field] = sum(int(reports[n].get(field, 0)) for n in running)
    combined["workers_running"] = len(running)
    combined["workers_expected"] = workers
    combined["workers"] = [
        {"worker": n, "pid": reports[n].get("pid"), "status": reports[n].get("status")}
        for n in running
    ]
    return combined
