"""
Metrics: counters and histograms that other modules feed through a small
typed API, exposed in the Prometheus text format.

Each `Metrics` owns its own ``prometheus_client.CollectorRegistry`` (never
the global default one), so two applications in one process do not clash.
The hot path is plain Python: a call such as `Metrics.method_finished`
adds to a dict entry and a histogram bucket (well under a microsecond); the
Prometheus families are built only when ``/metrics`` is scraped.  Calls are
made from the reactor thread, like everything else in twistauth.

What is counted (names carry the ``twistauth_`` prefix)::

    http_requests_total{route,method,status}
    method_duration_seconds{method}                 histogram
    method_calls_total{method,outcome}
    logins_total{kind,outcome,reason}
    refreshes_total{outcome,reason}
    backchannel_logouts_total{outcome,reason}
    sessions_created_total{cache}
    sessions_destroyed_total{reason}
    waiters                                         gauge, from callbacks
    cache_requests_total{cache,result}              result = hit | miss
    redis_errors_total{kind}                        every failed Redis call and probe
    log_events_total{level}                         from the log pipeline
    alert_mails_total{result}, alert_events_dropped_total{reason}
    <name>{stat}                                    any component's stats()

Label values come from code (route names, method names, error names), not
from clients; still, each family keeps at most ``max_series`` label sets and
counts the rest under ``"other"`` values, so a bug cannot blow up memory.

Modules that take metrics accept any `IMetrics`; `NullMetrics` does nothing
(the default for code and tests that do not care).

**Several processes.**  With ``--processes N`` a scrape reaches one worker
(the kernel picks it), so a worker's own counts would be misleading.  Each
process then writes its totals into files of a directory the parent owns
(``PROMETHEUS_MULTIPROC_DIR``, in ``prometheus_client``'s multi-process
format: ``counter_<pid>.db``, ``histogram_<pid>.db``,
``gauge_livesum_<pid>.db``), about once a second (`SharedMetricsService`)
and again just before it answers a scrape; whichever process answers
renders the sum over every file (`Metrics.render`).  Counters of a worker
that ended stay in the sum (a restart never makes a counter go down); its
gauges leave it (`forget_process`).  Another process's counts are at most
one flush interval old.  ``process_*`` metrics describe one process only,
so they are left out in this mode.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface, implementer

log = Logger()

#: Latency buckets (seconds) for JSON methods: 0.5 ms to 10 s.
DEFAULT_BUCKETS: Tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
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
)

_HTTP_METHODS: Dict[Union[str, bytes], str] = {}
for _m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
    _HTTP_METHODS[_m] = _HTTP_METHODS[_m.encode("ascii")] = _m


class IMetrics(Interface):
    """
    What other modules report.  Every method returns ``None`` at once and
    never raises; all are called from the reactor thread.
    """

    def request_finished(route: str, method: Union[str, bytes], status: int) -> None:
        """
        An HTTP request was answered.

        :param route: the route's name or template (``"api"``, ``"login"``,
            ``"redirect"``), never the raw path.
        :param method: the HTTP method; unusual ones are counted as ``"other"``.
        :param status: the response status code.
        """

    def method_finished(method: str, seconds: float, outcome: str) -> None:
        """
        A JSON method (or a whole batch, as ``"batch"``) finished.

        :param method: the registered method name.
        :param seconds: how long it ran.
        :param outcome: ``"ok"``, an error name, or ``"cancelled"``.
        """

    def after_hook(transaction: Any) -> None:
        """
        `method_finished` from a dispatcher ``Transaction``: pass this as
        the `twistauth.methods.dispatch.Dispatcher`'s ``after_hook``.
        """

    def login(outcome: str, reason: str = "ok", kind: str = "password") -> None:
        """
        A login finished: ``outcome`` is ``"success"`` or ``"failure"``;
        ``reason`` an error name (``"bad_password"``, ``"state_mismatch"``);
        ``kind`` ``"password"`` or ``"oidc"``.
        """

    def refresh(outcome: str, reason: str = "ok") -> None:
        """
        A token refresh finished.
        """

    def backchannel_logout(outcome: str, reason: str = "ok") -> None:
        """
        A back-channel logout request was handled.
        """

    def session_created(cache: str) -> None:
        """
        A session was created in the named cache (``"memory"``, ``"redis"``,
        ``"client"``).
        """

    def session_destroyed(reason: str) -> None:
        """
        A session ended: ``"logout"``, ``"expired"``, ``"revoked"``,
        ``"backchannel"``, ``"evicted"``.
        """

    def cache_hit(cache: str) -> None:
        """
        A cache (``"sessions"``, ``"methods"``, ``"jwks"``) answered from memory.
        """

    def cache_miss(cache: str) -> None:
        """
        A cache had to fetch.
        """

    def redis_error(kind: str) -> None:
        """
        A Redis call (or readiness probe) failed; ``kind`` is one of
        `twistauth.redisconn.ERROR_KINDS`: ``"timeout"``, ``"unavailable"``,
        ``"auth_failed"``, ``"refused"``, ``"closed"``, ``"error"`` (Redis
        answered with an error).
        """

    def watch_waiters(source: Callable[[], int]) -> Callable[[], None]:
        """
        Add a callable that says how many long-poll waiters are live; the
        gauge is the sum of all sources at scrape time.

        :return: a function that removes the source.
        """

    def watch_cache(cache: str, source: Callable[[], Mapping[str, Any]]) -> None:
        """
        Add a cache that keeps its own counters: ``source()`` answers its
        totals (``{"hits": n, "misses": m}``), read at scrape time and
        counted in ``cache_requests_total{cache}`` (nothing on the hot path).
        """

    def watch_stats(name: str, doc: str, source: Callable[[], Dict[str, Any]]) -> None:
        """
        Export a component's ``stats()`` dict as one gauge family, read at
        scrape time.
        """

    def watch_logging(pipeline: Any) -> None:
        """
        Export a `twistauth.observe.LogPipeline`'s counts at scrape time.
        """

    def watch_alerts(alerts: Any) -> None:
        """
        Export a `twistauth.observe.AlertObserver`'s counters at scrape time.
        """


class _Counter:
    """
    A counter family: label tuple -> value.
    """

    __slots__ = ("name", "doc", "labels", "values", "max_series")

    def __init__(self, name: str, doc: str, labels: Sequence[str], max_series: int) -> None:
        self.name = name
        self.doc = doc
        self.labels = tuple(labels)
        self.values: Dict[Tuple[Any, ...], float] = {}
        self.max_series = max_series

    def inc(self, key: Tuple[Any, ...], amount: float = 1.0) -> None:
        values = self.values
        if key in values:
            values[key] += amount
        elif len(values) < self.max_series:
            values[key] = amount
        else:
            other = ("other",) * len(self.labels)
            values[other] = values.get(other, 0.0) + amount

    def family(self, prefix: str) -> Metric:
        family = CounterMetricFamily(prefix + self.name, self.doc, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric([str(k) for k in key], value)
        return family


class _Histogram:
    """
    A histogram family: label tuple -> [bucket counts..., sum].
    """

    __slots__ = ("name", "doc", "labels", "bounds", "series", "max_series")

    def __init__(
        self,
        name: str,
        doc: str,
        labels: Sequence[str],
        bounds: Sequence[float],
        max_series: int,
    ) -> None:
        self.name = name
        self.doc = doc
        self.labels = tuple(labels)
        self.bounds = tuple(sorted(bounds))
        self.series: Dict[Tuple[Any, ...], List[float]] = {}
        self.max_series = max_series

    def observe(self, key: Tuple[Any, ...], value: float) -> None:
        series = self.series.get(key)
        if series is None:
            if len(self.series) >= self.max_series:
                key = ("other",) * len(self.labels)
                series = self.series.get(key)
            if series is None:
                series = self.series[key] = [0.0] * (len(self.bounds) + 2)
        # Bucket i counts values <= bounds[i]; the last bucket is +Inf.
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def family(self, prefix: str) -> Metric:
        family = HistogramMetricFamily(prefix + self.name, self.doc, labels=self.labels)
        for key, series in self.series.items():
            running = 0.0
            buckets = []
            for bound, count in zip(self.bounds, series):
                running += count
                buckets.append((floatToGoString(bound), running))
            running += series[len(self.bounds)]
            buckets.append(("+Inf", running))
            family.add_metric([str(k) for k in key], buckets, sum_value=series[-1])
        return family


class _Collector:
    """
    Builds every family at scrape time.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics._families())


@implementer(IMetrics)
class Metrics:
    """
    The metrics of one application, with their own registry.

    :ivar registry: the ``CollectorRegistry`` that ``/metrics`` renders.
    """

    def __init__(
        self,
        *,
        prefix: str = "twistauth_",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_series: int = 2000,
        process_metrics: bool = True,
        registry: Optional[CollectorRegistry] = None,
        multiprocess_dir: Optional[str] = None,
        pid: Optional[int] = None,
    ) -> None:
        """
        :param prefix: put before every metric name.
        :param buckets: the method-latency histogram's upper bounds, seconds.
        :param max_series: most label sets kept per family.
        :param process_metrics: also export the process's CPU, memory and
            open files (``process_*``, Linux only; never with
            ``multiprocess_dir``).
        :param registry: a registry to add to (default: a new one).
        :param multiprocess_dir: share the counts with the other processes
            of a deployment through this directory (see the module
            docstring): `snapshot` writes this process's files, `render`
            answers the sum over every process.
        :param pid: names this process's files (default: ``os.getpid()``).
        """
        self.prefix = prefix
        self.multiprocess_dir = multiprocess_dir
        self._shared = (
            _SharedFiles(multiprocess_dir, os.getpid() if pid is None else pid)
            if multiprocess_dir is not None
            else None
        )
        if multiprocess_dir is not None:
            process_metrics = False
        self.registry = registry if registry is not None else CollectorRegistry()
        n = max_series
        self._requests = _Counter(
            "http_requests", "HTTP requests answered.", ("route", "method", "status"), n
        )
        self._calls = _Counter(
            "method_calls", "JSON method calls finished.", ("method", "outcome"), n
        )
        self._latency = _Histogram(
            "method_duration_seconds", "JSON method run time.", ("method",), buckets, n
        )
        self._logins = _Counter("logins", "Logins.", ("kind", "outcome", "reason"), n)
        self._refreshes = _Counter("refreshes", "Token refreshes.", ("outcome", "reason"), n)
        self._logouts = _Counter(
            "backchannel_logouts", "Back-channel logout requests.", ("outcome", "reason"), n
        )
        self._created = _Counter("sessions_created", "Sessions created.", ("cache",), n)
        self._destroyed = _Counter("sessions_destroyed", "Sessions ended.", ("reason",), n)
        self._cache = _Counter(
            "cache_requests", "Cache look-ups by result.", ("cache", "result"), n
        )
        self._redis = _Counter(
            "redis_errors", "Failed Redis calls and readiness probes, by kind.", ("kind",), n
        )
        self._counters = (
            self._requests,
            self._calls,
            self._logins,
            self._refreshes,
            self._logouts,
            self._created,
            self._destroyed,
            self._cache,
            self._redis,
        )
        self._waiter_sources: List[Callable[[], int]] = []
        self._cache_sources: List[Tuple[str, Callable[[], Mapping[str, Any]]]] = []
        self._watched: List[Callable[[], Iterator[Metric]]] = []
        self.registry.register(_Collector(self))
        if process_metrics:
            from prometheus_client import ProcessCollector

            ProcessCollector(registry=self.registry)

    # -- the typed API --------------------------------------------------------

    def request_finished(self, route: str, method: Union[str, bytes], status: int) -> None:
        self._requests.inc((route, _HTTP_METHODS.get(method, "other"), status))

    def method_finished(self, method: str, seconds: float, outcome: str) -> None:
        self._calls.inc((method, outcome))
        self._latency.observe((method,), seconds)

    def after_hook(self, transaction: Any) -> None:
        self.method_finished(
            transaction.method, transaction.duration or 0.0, transaction.outcome
        )

    def login(self, outcome: str, reason: str = "ok", kind: str = "password") -> None:
        self._logins.inc((kind, outcome, reason))

    def refresh(self, outcome: str, reason: str = "ok") -> None:
        self._refreshes.inc((outcome, reason))

    def backchannel_logout(self, outcome: str, reason: str = "ok") -> None:
        self._logouts.inc((outcome, reason))

    def session_created(self, cache: str) -> None:
        self._created.inc((cache,))

    def session_destroyed(self, reason: str) -> None:
        self._destroyed.inc((reason,))

    def cache_hit(self, cache: str) -> None:
        self._cache.inc((cache, "hit"))

    def cache_miss(self, cache: str) -> None:
        self._cache.inc((cache, "miss"))

    def redis_error(self, kind: str) -> None:
        self._redis.inc((kind,))

    def watch_waiters(self, source: Callable[[], int]) -> Callable[[], None]:
        self._waiter_sources.append(source)

        def remove() -> None:
            if source in self._waiter_sources:
                self._waiter_sources.remove(source)

        return remove

    def watch_cache(self, cache: str, source: Callable[[], Mapping[str, Any]]) -> None:
        self._cache_sources.append((cache, source))

    # -- other sources ----------------------------------------------------------

    def watch_stats(self, name: str, doc: str, source: Callable[[], Dict[str, Any]]) -> None:
        """
        Export a component's ``stats()`` dict (the bus, the logout watcher)
        as one gauge family ``<prefix><name>{stat="..."}``, read at scrape
        time.
        """
        full_name = self.prefix + name

        def families() -> Iterator[Metric]:
            family = GaugeMetricFamily(full_name, doc, labels=("stat",))
            for stat, value in source().items():
                family.add_metric([str(stat)], float(value))
            yield family

        self._watched.append(families)

    def watch_logging(self, pipeline: Any) -> None:
        """
        Export a `twistauth.observe.LogPipeline`'s event counts (by level)
        and its sinks' errors.
        """
        prefix = self.prefix

        def families() -> Iterator[Metric]:
            events = CounterMetricFamily(
                prefix + "log_events", "Log events seen, by level.", labels=("level",)
            )
            for level, count in pipeline.counts.items():
                events.add_metric([level], count)
            yield events
            yield CounterMetricFamily(
                prefix + "log_sink_errors",
                "Times a log observer failed to write an event.",
                value=pipeline.sink_errors,
            )

        self._watched.append(families)

    def watch_alerts(self, alerts: Any) -> None:
        """
        Export a `twistauth.observe.AlertObserver`'s counters: mails sent and
        failed, events dropped by reason, events waiting.
        """
        prefix = self.prefix

        def families() -> Iterator[Metric]:
            stats = alerts.stats()
            mails = CounterMetricFamily(
                prefix + "alert_mails", "Alert mails by result.", labels=("result",)
            )
            mails.add_metric(["sent"], stats["sent"])
            mails.add_metric(["failed"], stats["failed"])
            yield mails
            dropped = CounterMetricFamily(
                prefix + "alert_events_dropped",
                "Error events not delivered by alert mail, by reason.",
                labels=("reason",),
            )
            for reason, count in stats["dropped"].items():
                dropped.add_metric([reason], count)
            yield dropped
            yield GaugeMetricFamily(
                prefix + "alert_events_pending",
                "Error events waiting for the next alert mail.",
                value=stats["pending"],
            )

        self._watched.append(families)

    # -- exposition ---------------------------------------------------------------

    def _cache_family(self, prefix: str) -> Metric:
        """
        Cache look-ups: counted calls plus the watched caches' own totals.
        """
        values = dict(self._cache.values)
        for cache, source in list(self._cache_sources):
            try:
                stats = source()
                for result, field in (("hit", "hits"), ("miss", "misses")):
                    key = (cache, result)
                    values[key] = values.get(key, 0.0) + float(stats.get(field, 0))
            except Exception:
                log.failure("a cache statistics source failed")
        family = CounterMetricFamily(prefix + self._cache.name, self._cache.doc, labels=self._cache.labels)
        for key, value in values.items():
            family.add_metric([str(k) for k in key], value)
        return family

    def _families(self) -> List[Metric]:
        prefix = self.prefix
        families: List[Metric] = [
            self._cache_family(prefix) if c is self._cache else c.family(prefix)
            for c in self._counters
        ]
        families.append(self._latency.family(prefix))
        total = 0
        for source in list(self._waiter_sources):
            try:
                total += int(source())
            except Exception:
                log.failure("a waiter-count source failed")
        families.append(GaugeMetricFamily(prefix + "waiters", "Live long-poll waiters.", total))
        for watched in self._watched:
            try:
                families.extend(watched())
            except Exception:
                log.failure("a metrics source failed")
        return families

    def render(self, accept: Optional[str] = None) -> Tuple[bytes, str]:
        """
        The exposition and its content type, in the format ``accept`` asks
        for (Prometheus text by default, OpenMetrics if asked).  With a
        ``multiprocess_dir``: this process's counts are written first, and
        the answer is the sum over every process's files.
        """
        encoder, content_type = choose_encoder(accept or "")
        if self._shared is None:
            return encoder(self.registry), content_type
        from prometheus_client.multiprocess import MultiProcessCollector

        self.snapshot()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._shared.directory)
        return encoder(registry), content_type

    def snapshot(self) -> None:
        """
        Write this process's totals to its files in ``multiprocess_dir``
        (nothing without one).  Never raises: a failure is logged.
        """
        if self._shared is None:
            return
        try:
            self._shared.write(self._families())
        except Exception:
            log.failure("could not write the shared metrics files")

    def close(self) -> None:
        """
        Write a last snapshot and close the shared files.
        """
        if self._shared is not None:
            self.snapshot()
            self._shared.close()


class _SharedFiles:
    """
    One process's files in a ``prometheus_client`` multi-process
    directory, written with absolute totals (each process owns its files,
    so no increments need merging).
    """

    _FILES = {"counter": "counter", "gauge": "gauge_livesum", "histogram": "histogram"}

    def __init__(self, directory: str, pid: int) -> None:
        self.directory = directory
        self.pid = pid
        self._files: Dict[str, Any] = {}
        self._keys: Dict[Tuple[Any, ...], str] = {}

    def _file(self, kind: str) -> Any:
        mmaped = self._files.get(kind)
        if mmaped is None:
            from prometheus_client.mmap_dict import MmapedDict

            path = os.path.join(self.directory, f"{kind}_{self.pid}.db")
            mmaped = self._files[kind] = MmapedDict(path)
        return mmaped

    def _key(self, family: Metric, name: str, labels: Mapping[str, str]) -> str:
        cache_key = (family.name, name, tuple(sorted(labels.items())))
        key = self._keys.get(cache_key)
        if key is None:
            key = self._keys[cache_key] = json.dumps(
                [family.name, name, dict(labels), family.documentation], sort_keys=True
            )
        return key

    def write(self, families: Sequence[Metric]) -> None:
        for family in families:
            kind = self._FILES.get(family.type)
            if kind is None:
                continue
            target = self._file(kind)
            if family.type == "histogram":
                self._write_histogram(target, family)
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                target.write_value(self._key(family, sample.name, sample.labels), sample.value, 0.0)

    def _write_histogram(self, target: Any, family: Metric) -> None:
        # The files hold per-bucket counts (the reader accumulates them) and
        # the sum; the count is derived from the buckets.
        buckets: Dict[Tuple[Tuple[str, str], ...], List[Tuple[float, str, float]]] = {}
        for sample in family.samples:
            labels = dict(sample.labels)
            if sample.name.endswith("_bucket"):
                le = labels.pop("le")
                key = tuple(sorted(labels.items()))
                buckets.setdefault(key, []).append((float(le), le, sample.value))
            elif sample.name.endswith("_sum"):
                target.write_value(self._key(family, sample.name, labels), sample.value, 0.0)
        for key, series in buckets.items():
            series.sort()
            below = 0.0
            for _, le, cumulative in series:
                labels = dict(key, le=le)
                target.write_value(
                    self._key(family, family.name + "_bucket", labels), cumulative - below, 0.0
                )
                below = cumulative

    def close(self) -> None:
        for mmaped in self._files.values():
            mmaped.close()
        self._files.clear()


def forget_process(directory: str, pid: int) -> None:
    """
    A process of the deployment ended: its gauges (live waiters, component
    stats) leave the sums; its counters stay.
    """
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, directory)


def clear_directory(directory: str) -> None:
    """
    Remove every metrics file from ``directory`` (at a deployment's start:
    counts of an earlier run must not be summed in).
    """
    for name in os.listdir(directory):
        if name.endswith(".db"):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass


class SharedMetricsService(Service):
    """
    Writes a `Metrics`'s snapshot to its ``multiprocess_dir`` every
    ``interval`` seconds while running, and once more (then closes the
    files) when stopped.
    """

    name = "twistauth-metrics"

    def __init__(self, metrics: Metrics, *, clock: IReactorTime, interval: float = 1.0) -> None:
        self.metrics = metrics
        self._clock = clock
        self.interval = interval
        self._loop: Optional[LoopingCall] = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.metrics.snapshot)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.metrics.close()
        return None


@implementer(IMetrics)
class NullMetrics:
    """
    Counts nothing: the default where metrics are optional.
    """

    def request_finished(self, route: str, method: Union[str, bytes], status: int) -> None:
        pass

    def method_finished(self, method: str, seconds: float, outcome: str) -> None:
        pass

    def after_hook(self, transaction: Any) -> None:
        pass

    def login(self, outcome: str, reason: str = "ok", kind: str = "password") -> None:
        pass

    def refresh(self, outcome: str, reason: str = "ok") -> None:
        pass

    def backchannel_logout(self, outcome: str, reason: str = "ok") -> None:
        pass

    def session_created(self, cache: str) -> None:
        pass

    def session_destroyed(self, reason: str) -> None:
        pass

    def cache_hit(self, cache: str) -> None:
        pass

    def cache_miss(self, cache: str) -> None:
        pass

    def redis_error(self, kind: str) -> None:
        pass

    def watch_waiters(self, source: Callable[[], int]) -> Callable[[], None]:
        return lambda: None

    def watch_cache(self, cache: str, source: Callable[[], Mapping[str, Any]]) -> None:
        pass

    def watch_stats(self, name: str, doc: str, source: Callable[[], Dict[str, Any]]) -> None:
        pass

    def watch_logging(self, pipeline: Any) -> None:
        pass

    def watch_alerts(self, alerts: Any) -> None:
        pass


def chain_hooks(*hooks: Optional[Callable[[Any], Any]]) -> Optional[Callable[[Any], Any]]:
    """
    One dispatcher hook that calls each of ``hooks`` (``None`` skipped) in
    order: to combine `Metrics.after_hook` with the ``after_hook`` setting.
    """
    present = [h for h in hooks if h is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def chained(transaction: Any) -> None:
        for hook in present:
            hook(transaction)

    return chained
