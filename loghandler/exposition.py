"""
``GET /metrics``: the Prometheus text format (prometheus_client's
``generate_latest``; https://prometheus.io/docs/instrumenting/exposition_formats/)
of one process's metrics, or with ``WORKERS`` above 1 of all workers together.

Each worker sends its samples (:func:`samples_of`, JSON-able) to the supervisor with
its health reports; the supervisor combines them (:func:`combine`) and hands the
result back to every worker, so that whichever worker accepts a scrape's connection
answers for the whole server, as ``/readyz`` does.  Counters and histograms are
summed; gauges are summed (bytes held, open streams) unless named in
:data:`loghandler.metrics.GAUGES_COMBINED_BY_MAX` (ages, durations: the largest);
``_created`` samples are left out (a sum of creation times means nothing).  The
``process_*`` metrics of each process keep a ``process`` label
(``"supervisor"``, ``"worker-1"``...) instead of being combined.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

#: The Content-Type of :func:`render`'s bytes.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: One family, as JSON: ``[name, type, help, unit, [[sample name, labels, value], ...]]``.
Family = list[Any]

#: Families whose samples are per process, labelled, never combined.
_PER_PROCESS_PREFIXES = ("process_", "python_")


def samples_of(collector: Collector, process: Optional[str] = None) -> list[Family]:
    """
    The families of ``collector`` (a ``CollectorRegistry``) as JSON-able lists,
    without ``_created`` samples; with ``process``, the per-process families
    (``process_*``) get a ``process`` label of that value.
    """
    families: list[Family] = []
    for metric in collector.collect():
        per_process = process is not None and metric.name.startswith(_PER_PROCESS_PREFIXES)
        samples = []
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            labels = dict(sample.labels, process=process) if per_process else sample.labels
            samples.append([sample.name, labels, sample.value])
        families.append([metric.name, metric.type, metric.documentation, metric.unit, samples])
    return families


def combine(sets: Iterable[Sequence[Family]], by_max: frozenset[str] = frozenset()) -> list[Family]:
    """
    One set of families from several processes' (:func:`samples_of`): samples of the
    same name and labels summed, or for the gauges in ``by_max`` the largest taken.
    Families and samples keep the order they were first seen in.
    """
    families: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]]] = {}
    for families_of_one in sets:
        for name, kind, documentation, unit, samples in families_of_one:
            family = families.get(name)
            if family is None:
                family = families[name] = [name, kind, documentation, unit, []]
                values[name] = {}
            largest = kind == "gauge" and name in by_max
            seen = values[name]
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(sorted(labels.items())))
                sample = seen.get(key)
                if sample is None:
                    sample = seen[key] = [sample_name, dict(labels), value]
                    family[4].append(sample)
                elif largest:
                    sample[2] = max(sample[2], value)
                else:
                    sample[2] += value
    return list(families.values())


def cumulative(families: Sequence[Family]) -> list[Family]:
    """
    The counters and histograms of ``families``, without the per-process ones: what
    a worker that ended still adds to the whole server's totals, so that they never
    go down when a worker is restarted.
    """
    return [
        family
        for family in families
        if family[1] in ("counter", "histogram")
        and not family[0].startswith(_PER_PROCESS_PREFIXES)
    ]


class _Families:
    """A collector of fixed families (what :func:`combine` gave)."""

    def __init__(self, families: Sequence[Family]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for name, kind, documentation, unit, samples in self._families:
            metric = Metric(name, documentation, kind, unit)
            for sample_name, labels, value in samples:
                metric.add_sample(sample_name, labels, value)
            yield metric


def render(families: Sequence[Family]) -> bytes:
    """The Prometheus text format of ``families`` (version 0.0.4, :data:`CONTENT_TYPE`)."""
    return generate_latest(_Families(families))
