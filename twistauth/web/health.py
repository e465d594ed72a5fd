"""
Health, readiness and metrics endpoints, as plain ``twisted.web`` resources.

- ``GET /healthz``: the process is up and serving: always 200.
- ``GET /readyz``: every registered dependency (store, bus, Redis...)
  answered its check within its deadline: 200, else 503; the JSON body
  names each check and what failed.  While the server drains for shutdown
  it answers 503 ``"draining"`` so load balancers stop sending traffic.
- ``GET /metrics``: `twistauth.metrics.Metrics` in the Prometheus text
  format (or OpenMetrics, if the scraper asks for it).

The resources can be mounted in the application's tree, or served on a
separate, private endpoint (``metrics_listen = "tcp:9100:interface=127.0.0.1"``)
by `health_site`, which keeps probes out of the access log.

Checks are named callables returning a value, a Deferred or a coroutine;
raising, failing, returning ``False`` or missing the deadline counts as not
ready.  Concurrent probes share one run of the checks.  The JSON body gives
only the error's type (a ``TwistauthError``'s name, else the exception
class): details such as host names or replies go to the log, which is
redacted, and only when a check changes state.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site

log = Logger()

_JSON = b"application/json"


@attr.s(frozen=True, kw_only=True)
class CheckResult:
    """
    The outcome of one check.

    :ivar name: the check's name.
    :ivar ok: whether it passed.
    :ivar seconds: how long it took (the deadline, if it missed it).
    :ivar error: what failed, briefly (``"timeout"``, an error name).
    """

    name: str = attr.ib()
    ok: bool = attr.ib()
    seconds: float = attr.ib()
    error: Optional[str] = attr.ib(default=None)

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"ok": self.ok, "seconds": round(self.seconds, 6)}
        if self.error is not None:
            out["error"] = self.error
        return out


@attr.s(frozen=True, kw_only=True)
class Readiness:
    """
    The outcome of every check.

    :ivar ready: every check passed and the server is not draining.
    """

    ready: bool = attr.ib()
    draining: bool = attr.ib(default=False)
    checks: Tuple[CheckResult, ...] = attr.ib(default=())

    def failed(self) -> List[str]:
        """
        The names of the checks that failed.
        """
        return [c.name for c in self.checks if not c.ok]

    def to_json(self) -> Dict[str, Any]:
        status = "ready" if self.ready else ("draining" if self.draining else "unready")
        out: Dict[str, Any] = {
            "status": status,
            "checks": {c.name: c.to_json() for c in self.checks},
        }
        if not self.ready:
            out["failed"] = self.failed()
        return out


@attr.s(frozen=True)
class _Check:
    function: Callable[[], Any] = attr.ib()
    timeout: float = attr.ib()


def _describe(failure: Failure) -> str:
    if failure.check(TimeoutError):
        return "timeout"
    value = failure.value
    name = getattr(value, "name", None)
    if isinstance(name, str) and name:
        return name
    return type(value).__name__


class HealthChecks:
    """
    Named readiness checks, each with a deadline, run on a clock.
    """

    def __init__(self, *, clock: IReactorTime, default_timeout: float = 2.0) -> None:
        """
        :param clock: deadlines and durations come from it.
        :param default_timeout: the deadline of checks that name none.
        """
        self._clock = clock
        self.default_timeout = default_timeout
        self._checks: Dict[str, _Check] = {}
        self._running: Optional[List[Deferred[Readiness]]] = None
        self._last_ok: Dict[str, bool] = {}
        self.draining = False

    def add(self, name: str, check: Callable[[], Any], *, timeout: Optional[float] = None) -> None:
        """
        Register a check.

        :param name: shown in ``/readyz`` (``"redis"``, ``"store"``, ``"bus"``).
        :param check: called with no arguments; returns anything but
            ``False`` (or a Deferred or coroutine of it) when the dependency
            is reachable.
        :param timeout: its deadline in seconds.
        :raises ValueError: the name is taken.
        """
        if name in self._checks:
            raise ValueError(f"a readiness check named {name!r} is already registered")
        self._checks[name] = _Check(check, self.default_timeout if timeout is None else timeout)

    def remove(self, name: str) -> None:
        """
        Unregister a check (no error if there is none).
        """
        self._checks.pop(name, None)
        self._last_ok.pop(name, None)

    def names(self) -> List[str]:
        """
        The registered checks' names.
        """
        return list(self._checks)

    def set_draining(self, draining: bool = True) -> None:
        """
        Answer "not ready" from now on (graceful shutdown), or again normally.
        """
        self.draining = draining

    def run(self) -> Deferred[Readiness]:
        """
        Run every check (concurrently, each within its deadline).

        :return: a Deferred firing with a `Readiness`; never failing.
            Callers during a run share it (each gets its own Deferred).
        """
        mine: Deferred[Readiness] = Deferred()
        if self._running is not None:
            self._running.append(mine)
            return mine
        waiting = self._running = [mine]
        names = list(self._checks)
        runs = [self._run_one(name, self._checks[name]) for name in names]

        def finish(results: List[Tuple[bool, CheckResult]]) -> None:
            self._running = None
            checks = tuple(result for _, result in results)
            ready = all(c.ok for c in checks) and not self.draining
            readiness = Readiness(ready=ready, draining=self.draining, checks=checks)
            for d in waiting:
                d.callback(readiness)

        DeferredList(runs).addCallback(finish)
        return mine

    def _run_one(self, name: str, check: _Check) -> Deferred[CheckResult]:
        started = self._clock.seconds()
        d = maybeDeferred(check.function)
        d.addTimeout(check.timeout, self._clock)

        def passed(value: Any) -> CheckResult:
            if value is False:
                return self._note(name, started, "returned false", None)
            return self._note(name, started, None, None)

        def failed(failure: Failure) -> CheckResult:
            return self._note(name, started, _describe(failure), failure)

        return d.addCallbacks(passed, failed)

    def _note(
        self, name: str, started: float, error: Optional[str], failure: Optional[Failure]
    ) -> CheckResult:
        seconds = self._clock.seconds() - started
        ok = error is None
        if self._last_ok.get(name, True) != ok:
            if ok:
                log.info("readiness check {check} passes again", check=name)
            else:
                log.error(
                    "readiness check {check} fails: {error} ({detail})",
                    check=name,
                    error=error,
                    detail=failure.getErrorMessage() if failure is not None else None,
                )
        if name in self._checks:
            self._last_ok[name] = ok
        return CheckResult(name=name, ok=ok, seconds=seconds, error=error)


def _write_json(request: Any, status: int, body: Dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", _JSON)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


class _ReadOnly(Resource):
    """
    A leaf that answers GET and HEAD, and 405 in JSON to anything else.
    """

    isLeaf = True

    def render(self, request: Any) -> Any:
        if request.method in (b"GET", b"HEAD"):
            return super().render(request)
        request.setHeader(b"allow", b"GET, HEAD")
        return _write_json(
            request,
            405,
            {"error": {"code": 40500, "name": "method_not_allowed", "value": "use GET"}},
        )


class HealthzResource(_ReadOnly):
    """
    ``GET /healthz``: 200 while the process serves.
    """

    def render_GET(self, request: Any) -> bytes:
        return _write_json(request, 200, {"status": "ok"})


class ReadyzResource(_ReadOnly):
    """
    ``GET /readyz``: 200 when every check passes, else 503 naming them.
    """

    def __init__(self, checks: HealthChecks) -> None:
        super().__init__()
        self.checks = checks

    def render_GET(self, request: Any) -> Any:
        gone: List[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(readiness: Readiness) -> None:
            if gone:
                return
            body = _write_json(request, 200 if readiness.ready else 503, readiness.to_json())
            request.write(body)
            request.finish()

        self.checks.run().addCallback(answer)
        return NOT_DONE_YET


class MetricsResource(_ReadOnly):
    """
    ``GET /metrics``: the Prometheus exposition.
    """

    def __init__(self, metrics: Any) -> None:
        """
        :param metrics: a `twistauth.metrics.Metrics` (anything with
            ``render(accept) -> (bytes, content_type)``).
        """
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        accept = request.getHeader(b"accept")
        body, content_type = self.metrics.render(
            accept.decode("latin-1") if isinstance(accept, bytes) else accept
        )
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return bytes(body)


class _NotFound(_ReadOnly):
    def render_GET(self, request: Any) -> bytes:
        return _write_json(
            request, 404, {"error": {"code": 40401, "name": "not_found", "value": "no such resource"}}
        )


class _Root(Resource):
    """
    The children, and a JSON 404 for anything else.
    """

    def getChild(self, path: bytes, request: Any) -> Resource:
        return _NotFound()

    def render_GET(self, request: Any) -> bytes:
        return _NotFound().render_GET(request)


def health_resource(checks: HealthChecks, metrics: Any = None) -> Resource:
    """
    A resource with ``healthz``, ``readyz`` and (given ``metrics``)
    ``metrics`` children: the root of a private endpoint, or a subtree.
    Other paths answer 404.
    """
    root = _Root()
    root.putChild(b"healthz", HealthzResource())
    root.putChild(b"readyz", ReadyzResource(checks))
    if metrics is not None:
        root.putChild(b"metrics", MetricsResource(metrics))
    return root


class HealthSite(Site):
    """
    A site for the private health/metrics endpoint: no access log (probes
    every few seconds would drown it) and no form parsing.
    """

    def __init__(self, resource: IResource, *, clock: Optional[IReactorTime] = None) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, reactor=clock)

    def log(self, request: Any) -> None:
        """
        Nothing: probes are not logged.
        """


def health_site(
    checks: HealthChecks, metrics: Any = None, *, clock: Optional[IReactorTime] = None
) -> HealthSite:
    """
    A `HealthSite` serving `health_resource`: bind it to ``metrics_listen``.
    """
    return HealthSite(health_resource(checks, metrics), clock=clock)
