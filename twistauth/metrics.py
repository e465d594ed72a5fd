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
    redis_errors_total{kind}
    log_events_total{level}                         from the log pipeline
    alert_mails_total{result}, alert_events_dropped_total{reason}
    <name>{stat}                                    any component's stats()

Label values come from code (route names, method names, error names), not
from clients; still, each family keeps at most ``max_series`` label sets and
counts the rest under ``"other"`` values, so a bug cannot blow up memory.

Modules that take metrics accept any `IMetrics`; `NullMetrics` does nothing
(the default for code and tests that do not care).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
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
        A Redis call failed: ``"timeout"``, ``"connection"``, ``"auth"``,
        ``"reply"``.
        """

    def watch_waiters(source: Callable[[], int]) -> Callable[[], None]:
        """
        Add a callable that says how many long-poll waiters are live; the
        gauge is the sum of all sources at scrape time.

        :return: a function that removes the source.
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
    ) -> None:
        """
        :param prefix: put before every metric name.
        :param buckets: the method-latency histogram's upper bounds, seconds.
        :param max_series: most label sets kept per family.
        :param process_metrics: also export the process's CPU, memory and
            open files (``process_*``, Linux only).
        :param registry: a registry to add to (default: a new one).
        """
        self.prefix = prefix
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
        self._redis = _Counter("redis_errors", "Failed Redis calls.", ("kind",), n)
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

    def _families(self) -> List[Metric]:
        prefix = self.prefix
        families: List[Metric] = [c.family(prefix) for c in self._counters]
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
        for (Prometheus text by default, OpenMetrics if asked).
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


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
