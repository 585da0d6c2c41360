"""
The probes and metrics an operator's tooling reads:

- ``GET /livez``: 200 while the process answers (the reactor runs); with
  ``WORKERS`` above 1, 503 once a worker has sent no report for
  :data:`loghandler.health.LIVE_STALE_S` (it is stuck).  For a liveness probe:
  storage trouble never fails it, so an outage never gets pods restarted (a
  restart would turn the outage into loss).
- ``GET /readyz``: 200 while messages are taken and stored, 503 with the reason
  while starting, stopping, storage failing longer than ``READY_FAIL_AFTER_S``, or
  buffers full (:func:`loghandler.health.local_health`).  For a readiness probe;
  ``/healthz`` is the same.
- ``GET /metrics``: Prometheus text format (:mod:`loghandler.exposition`).

``HEAD`` answers as ``GET`` without a body.  They are served on the main listener,
or with ``ADMIN_PORT`` on a listener of their own (:func:`make_admin_site`) and not
on the main one, so that they need not be public.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import attrs
from prometheus_client import generate_latest
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request

from loghandler.exposition import CONTENT_TYPE
from loghandler.health import local_health
from loghandler.registry import StreamRegistry
from loghandler.web import LogSite, Root, respond

#: The paths a :class:`Probes` is served at, with the report each answers.
PROBE_PATHS = (b"livez", b"readyz", b"healthz")
#: The metrics' path.
METRICS_PATH = b"metrics"


@attrs.frozen
class Probes:
    """
    What the probes and metrics answer, each computed when asked.

    :ivar live: the liveness report, a ``dict`` with ``"status"`` (``"ok"``: 200).
    :ivar ready: the readiness report, likewise (``/readyz``, ``/healthz``).
    :ivar metrics: the Prometheus text format, bytes.
    """

    live: Callable[[], dict[str, Any]]
    ready: Callable[[], dict[str, Any]]
    metrics: Callable[[], bytes]


def alive() -> dict[str, Any]:
    """The liveness of a process that answers: ``{"status": "ok"}``."""
    return {"status": "ok"}


def local_probes(
    registry: StreamRegistry, ready_fail_after_s: float, metrics: Collector
) -> Probes:
    """
    The probes of one process (``WORKERS=1``): alive while it answers, ready as
    :func:`~loghandler.health.local_health` says, ``metrics`` (a
    ``CollectorRegistry``) as they are.
    """
    return Probes(
        live=alive,
        ready=lambda: local_health(registry, ready_fail_after_s),
        metrics=lambda: generate_latest(metrics),
    )


def _only_get(request: Request) -> Optional[bytes]:
    """A JSON 404/405 for anything but ``GET`` or ``HEAD`` of exactly this path."""
    if request.postpath and request.postpath != [b""]:
        return respond(request, 404, b'{"error":"not found","field":null}')
    if request.method not in (b"GET", b"HEAD"):
        request.responseHeaders.setRawHeaders(b"allow", [b"GET, HEAD"])
        return respond(request, 405, b'{"error":"method not allowed; use GET","field":null}')
    return None


class StateResource(Resource):
    """
    A probe: ``GET`` answers the report as JSON, 200 when its ``"status"`` is
    ``"ok"``, 503 otherwise; other methods 405 with ``Allow: GET, HEAD``.

    :param report: computes the report (a ``dict`` with ``"status"``).
    """

    isLeaf = True

    def __init__(self, report: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._report = report

    def render(self, request: Request) -> bytes:
        """The report, or a 404/405."""
        refused = _only_get(request)
        if refused is not None:
            return refused
        report = self._report()
        status = 200 if report.get("status") == "ok" else 503
        return respond(request, status, json.dumps(report).encode())


class MetricsResource(Resource):
    """
    ``GET /metrics``: the Prometheus text format (version 0.0.4).

    :param render: computes the bytes.
    """

    isLeaf = True

    def __init__(self, render: Callable[[], bytes]) -> None:
        super().__init__()
        self._render = render

    def render(self, request: Request) -> bytes:
        """The metrics, or a 404/405."""
        refused = _only_get(request)
        if refused is not None:
            return refused
        return respond(request, 200, self._render(), CONTENT_TYPE.encode())


def add_probes(root: Resource, probes: Probes, site: Optional[LogSite] = None) -> None:
    """
    Serve ``probes`` under ``root`` (and as exact routes of ``site``, without
    resource traversal): ``/livez``, ``/readyz``, ``/healthz``, ``/metrics``.
    """
    reports = {b"livez": probes.live, b"readyz": probes.ready, b"healthz": probes.ready}
    resources: dict[bytes, Resource] = {
        path: StateResource(report) for path, report in reports.items()
    }
    resources[METRICS_PATH] = MetricsResource(probes.metrics)
    for path, resource in resources.items():
        root.putChild(path, resource)
        if site is not None:
            site.route(b"/" + path, resource)


#: The largest request body the admin listener reads (its paths take none).
ADMIN_MAX_BODY_BYTES = 4096


def make_admin_site(probes: Probes) -> LogSite:
    """
    The site of the ``ADMIN_PORT`` listener: the probes and metrics, JSON 404 for
    anything else; bodies cut at :data:`ADMIN_MAX_BODY_BYTES`, no access log.
    """
    root = Root()
    site = LogSite(root, ADMIN_MAX_BODY_BYTES, batch_max_bytes=ADMIN_MAX_BODY_BYTES)
    add_probes(root, probes, site)
    return site
