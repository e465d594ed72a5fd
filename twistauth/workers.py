"""
Running twistauth as an operated service: worker processes sharing the
listening sockets, graceful stops, and settings reloads on SIGHUP.

**Worker processes.**  ``twistd -n twistauth --processes N`` starts a parent
that binds every ``listen`` endpoint once (`open_listening_socket`: TCP over
IPv4 or IPv6 and UNIX sockets; TLS endpoints are refused) and a
`WorkerPool` of N children.  Each child is the same ``twistd twistauth``
command (same options, configuration file and environment, so it loads the
same settings) plus ``--worker-fds``, which names the inherited sockets;
the child adopts them (`AdoptedPorts`, ``reactor.adoptStreamPort``) and the
kernel hands each new connection to whichever child accepts it first (each
accepts one per wake-up, so an idle child takes the next connection; a
burst of keep-alive connections can still land unevenly).  The parent
serves nothing.  It:

- restarts a child that ends, after a delay that doubles with each crash
  of that child (`RestartPolicy`); more than ``worker_restart_limit``
  crashes within ``worker_restart_window`` and it gives up: every other
  child is stopped and the parent exits 1, for the process supervisor
  (systemd, Kubernetes) to see;
- relays its children's log events into its own log (a child's ``twistd
  --logger`` is `worker_log_observer`, which writes JSON lines on the
  child's stdout), so only the parent writes log files and sends alerts
  (a child opens no log file and builds no alert observer; it leaves out
  events below every observer's level, `relay_level`);
- owns the directory where every process writes its metrics
  (``PROMETHEUS_MULTIPROC_DIR``, see `twistauth.metrics`), so any worker
  answers ``/metrics`` with the deployment's totals; it forgets an ended
  worker's gauges;
- binds ``metrics_listen`` too, when set, for the children to adopt like
  ``listen`` (each child serves ``/healthz``, ``/readyz``, ``/metrics`` there);
- forwards SIGHUP to every child once its own reload succeeded;
- on SIGTERM sends SIGTERM to every child, waits for them (their graceful
  stop plus a margin; then SIGKILL) and exits 0.

A child watches its parent (`ParentWatch`) and stops gracefully if it
disappears, so a killed parent never leaves orphans serving its socket.

**Graceful stop.**  `SignalHandlers` makes SIGTERM a graceful stop that
exits 0 (twistd's own handler makes the process die of the signal).  The
stop (`GracefulStop`, a `twistauth.service.TwistauthService` ``before_stop``
hook, beside the app's, which answers pending logout long-polls): stop
accepting; close idle connections and those whose request is still
arriving (its method never ran); let requests already running finish
within ``shutdown_grace`` seconds, answering them with ``Connection:
close``; then cut what is left.  The service then closes the Redis
connections and the other background services.

**Reload.**  On SIGHUP, `Reloader` loads the settings again from the same
sources (the configuration file is re-read, and ``file:`` keys with it;
the environment and the command line cannot change under a running
process, so their values keep winning), validates them, applies the keys
that may change at run time and logs each change; any other changed key is
logged as refused and keeps its value until a restart.  Keys that can
change: ``session_keys`` (the client-side session cache's keyring: rotate
by putting a new key first) and ``log_level`` (the observers that name no
level of their own; a worker relays from the new level on).  A worker that
the parent restarts reads the configuration as it is then, refused keys
included: restart the whole service to change those.
"""

from __future__ import annotations

import atexit
import io
import os
import signal
import socket
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attr
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    eventFromJSON,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.web.http import Request
from zope.interface import implementer

from twistauth.settings import Settings, SettingsError

log = Logger()

#: How an inherited socket's address family is written in ``--worker-fds``.
FAMILIES: Dict[str, int] = {
    "inet": socket.AF_INET,
    "inet6": socket.AF_INET6,
    "unix": socket.AF_UNIX,
}
_FAMILY_NAMES = {number: name for name, number in FAMILIES.items()}

#: The first inherited socket's descriptor in a child (0-2 are stdio).
FIRST_CHILD_FD = 3

#: Seconds the parent waits for a child beyond ``shutdown_grace`` before
#: killing it (the child still closes Redis connections after the grace).
STOP_MARGIN = 5.0

#: A log event carrying this key set to ``True`` says a process is serving
#: and has its signal handlers installed.
READY_KEY = "twistauth_ready"

#: Longest line relayed from a child; a longer one is cut.
MAX_RELAYED_LINE = 64 * 1024


# ---------------------------------------------------------------------------
# Listening sockets the parent opens and the children adopt.


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class ListenSpec:
    """
    What a ``listen`` endpoint string asks for, as a socket.

    :ivar description: the endpoint string.
    :ivar family: ``AF_INET``, ``AF_INET6`` or ``AF_UNIX``.
    :ivar address: what to bind: ``(host, port)``, or a path.
    :ivar backlog: the ``listen()`` backlog.
    :ivar mode: a UNIX socket file's permissions.
    """

    description: str
    family: int
    address: Any
    backlog: int
    mode: Optional[int] = None


class _NoFactory:
    """
    A stand-in factory: parsing an endpoint only records what it asks for.
    """


def listen_spec(description: str) -> ListenSpec:
    """
    Parse a server endpoint string into the socket it asks for, with
    Twisted's own parser (on a memory reactor: nothing listens).

    :raises ValueError: the endpoint is not TCP (``tcp:``, ``tcp6:``) or
        UNIX (``unix:``), the kinds a child process can adopt.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    reactor = MemoryReactor()
    try:
        serverFromString(reactor, description).listen(_NoFactory())
    except Exception as e:
        raise ValueError(f"listen {description!r}: not a server endpoint ({e})") from None
    if reactor.tcpServers:
        port, _, backlog, interface = reactor.tcpServers[0]
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        return ListenSpec(
            description=description, family=family, address=(interface, port), backlog=backlog
        )
    if reactor.unixServers:
        path, _, backlog, mode, _ = reactor.unixServers[0]
        return ListenSpec(
            description=description,
            family=socket.AF_UNIX,
            address=path,
            backlog=backlog,
            mode=mode,
        )
    raise ValueError(
        f"listen {description!r}: worker processes can share only tcp, tcp6 and unix "
        f"endpoints (terminate TLS in front of them, or run one process)"
    )


def open_listening_socket(spec: ListenSpec) -> socket.socket:
    """
    Bind and listen as Twisted would for ``spec``, in non-blocking mode and
    inheritable, for child processes to adopt.

    :raises twisted.internet.error.CannotListenError: the address is in
        use, not permitted, or invalid (the message Twisted gives when one
        process cannot listen).
    """
    from twisted.internet.error import CannotListenError

    sock = socket.socket(spec.family, socket.SOCK_STREAM)
    try:
        if spec.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(spec.address)
        if spec.mode is not None:
            os.chmod(spec.address, spec.mode)
        sock.listen(spec.backlog)
        sock.setblocking(False)
        sock.set_inheritable(True)
    except OSError as e:
        sock.close()
        if spec.family == socket.AF_UNIX:
            raise CannotListenError(None, spec.address, e) from None
        raise CannotListenError(spec.address[0], spec.address[1], e) from None
    except BaseException:
        sock.close()
        raise
    return sock


@attr.s(frozen=True, auto_attribs=True)
class Inherited:
    """
    A listening socket a child inherited: its descriptor in the child, its
    address family and the endpoint it serves.
    """

    fd: int
    family: int
    description: str


def format_worker_fds(specs: Sequence[ListenSpec]) -> str:
    """
    The ``--worker-fds`` value naming a child's inherited sockets, in the
    order of ``listen``: ``"3:inet,4:inet6"``.
    """
    return ",".join(
        f"{FIRST_CHILD_FD + i}:{_FAMILY_NAMES[spec.family]}" for i, spec in enumerate(specs)
    )


def parse_worker_fds(text: str, listen: Sequence[str]) -> List[Inherited]:
    """
    Parse ``--worker-fds``, pairing each socket with its ``listen`` endpoint.

    :raises ValueError: malformed, an unknown family, or not one socket per
        endpoint.
    """
    parts = [part for part in text.split(",") if part]
    if len(parts) != len(listen):
        raise ValueError(
            f"--worker-fds names {len(parts)} socket(s) for {len(listen)} listen endpoint(s)"
        )
    inherited = []
    for part, description in zip(parts, listen):
        fd_text, _, family = part.partition(":")
        if not fd_text.isdigit() or family not in FAMILIES:
            raise ValueError(f"--worker-fds: expected FD:FAMILY such as '3:inet', got {part!r}")
        inherited.append(Inherited(int(fd_text), FAMILIES[family], description))
    return inherited


def _accept_one_at_a_time(port: Any) -> None:
    """
    Make a shared port accept one connection per readiness event.

    Every worker is woken for each new connection; Twisted's port accepts
    up to ``numberAccepts`` at once (100, then adapting), so the first
    worker to wake takes a whole burst and keeps those keep-alive
    connections: one of two workers was seen holding 46 of 50.  Accepting
    one at a time lets an idle worker take the next connection while a
    busy one is still serving (as nginx without ``multi_accept``).
    """
    if not hasattr(port, "numberAccepts"):
        return
    read = port.doRead

    def read_one() -> Any:
        port.numberAccepts = 1
        try:
            return read()
        finally:
            port.numberAccepts = 1

    port.numberAccepts = 1
    port.doRead = read_one


class AdoptedPorts(Service):
    """
    Serves a factory on sockets inherited from the parent (in a worker).
    Stopping stops this process's listening; the socket stays open in the
    parent and the other workers.
    """

    name = "twistauth-adopted-ports"

    def __init__(self, *, reactor: Any, factory: Any, sockets: Sequence[Inherited]) -> None:
        """
        :param reactor: an ``IReactorSocket`` provider.
        :param factory: the protocol factory to serve (the site).
        :param sockets: the inherited sockets.
        """
        self._reactor = reactor
        self._factory = factory
        self._sockets = list(sockets)
        self._ports: List[Any] = []

    def startService(self) -> None:
        super().startService()
        for inherited in self._sockets:
            port = self._reactor.adoptStreamPort(inherited.fd, inherited.family, self._factory)
            # The reactor holds its own descriptor now.
            os.close(inherited.fd)
            _accept_one_at_a_time(port)
            self._ports.append(port)
            log.info(
                "twistauth: worker {pid}: serving {endpoint} on the parent's socket",
                pid=os.getpid(),
                endpoint=inherited.description,
            )
        self._sockets = []

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ports, self._ports = self._ports, []
        return DeferredList([maybeDeferred(port.stopListening) for port in ports])


# ---------------------------------------------------------------------------
# Graceful stop.


def _received(request: Any) -> bool:
    """
    Whether a request arrived whole and is being answered (its resource
    runs): a request still arriving has the class's placeholder method.
    """
    return bool(request.method != Request.method and not request.finished)


def drain(site: Any, clock: IReactorTime, grace: float) -> Deferred[int]:
    """
    Close every connection of ``site``, letting running requests finish.

    Idle connections, and those whose request is still arriving, are
    closed now.  A connection whose request is being answered gets
    ``Connection: close`` on its response (if not yet started) and is
    closed when the response ends.  After ``grace`` seconds whatever is
    still open is aborted.

    :param site: a `twistauth.web.site.TwistauthSite` (``channels()``, and
        channels with ``closed()``).
    :return: a Deferred firing, once every connection is closed, with the
        number of connections that had to be aborted.
    """
    channels = site.channels()
    if not channels:
        return succeed(0)
    closed = [channel.closed() for channel in channels]
    busy = 0
    for channel in channels:
        running = [r for r in getattr(channel, "requests", ()) if _received(r)]
        if not running:
            channel.loseConnection()
            continue
        busy += 1
        channel.persistent = False
        for request in running:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
    if busy:
        log.info(
            "twistauth: stopping: {count} request(s) running, waiting up to {grace:g} s",
            count=busy,
            grace=grace,
        )
    aborted = [0]

    def cut() -> None:
        remaining = site.channels()
        aborted[0] = len(remaining)
        log.warn(
            "twistauth: stopping: {count} request(s) still running after {grace:g} s: "
            "connections closed",
            count=len(remaining),
            grace=grace,
        )
        for channel in remaining:
            transport = channel.transport
            if transport is not None:
                transport.abortConnection()

    timer = clock.callLater(grace, cut)
    done: Deferred[Any] = DeferredList(closed)

    def finished(_: Any) -> int:
        if timer.active():
            timer.cancel()
        return aborted[0]

    return done.addCallback(finished)


@attr.s(kw_only=True, eq=False)
class GracefulStop:
    """
    A `twistauth.service.TwistauthService` ``before_stop`` hook: stop
    listening, then `drain` the site.

    :ivar listeners: the services that listen (stopped first).
    """

    site: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    grace: float = attr.ib()
    listeners: List[IService] = attr.ib(factory=list)

    def __call__(self) -> Deferred[int]:
        stopping = [maybeDeferred(s.stopService) for s in self.listeners if s.running]
        d: Deferred[Any] = DeferredList(stopping)
        return d.addCallback(lambda _: drain(self.site, self.clock, self.grace))


class SignalHandlers(Service):
    """
    Once the reactor runs: SIGTERM stops the reactor gracefully (the
    process exits 0, where twistd's handler makes it die of the signal) and
    SIGHUP calls ``on_hangup`` (on the reactor thread).  Then it logs, with
    `READY_KEY`, that the process is ready.
    """

    name = "twistauth-signals"

    def __init__(self, *, reactor: Any, on_hangup: Callable[[], Any], role: str) -> None:
        """
        :param role: what this process is, for the log (``"server"``,
            ``"worker"``, ``"parent"``).
        """
        self._reactor = reactor
        self._on_hangup = on_hangup
        self._role = role
        self.stopping = False

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self.install)

    def install(self) -> None:
        """
        Install the handlers (after the reactor installed its own).
        """
        if not self.running:
            return
        signal.signal(signal.SIGTERM, self._signalled)
        signal.signal(signal.SIGHUP, self._signalled)
        log.info(
            "twistauth: {role} {pid} ready (SIGTERM: graceful stop; SIGHUP: reload)",
            role=self._role,
            pid=os.getpid(),
            **{READY_KEY: True},
        )

    def _signalled(self, number: int, frame: Any) -> None:
        self._reactor.callFromThread(self.handle, number)

    def handle(self, number: int) -> None:
        """
        Act on a signal (on the reactor thread).
        """
        if number == signal.SIGHUP:
            if not self.stopping:
                self._on_hangup()
            return
        if self.stopping:
            log.info("twistauth: SIGTERM again: already stopping")
            return
        self.stopping = True
        log.info("twistauth: SIGTERM: stopping gracefully")
        stop_reactor(self._reactor)


class ParentWatch(Service):
    """
    In a worker: stop gracefully when the parent process is gone (the
    worker was re-parented), so no orphan keeps serving the shared socket.
    """

    name = "twistauth-parent-watch"

    def __init__(
        self,
        *,
        clock: IReactorTime,
        on_orphaned: Callable[[], Any],
        interval: float = 1.0,
        getppid: Callable[[], int] = os.getppid,
    ) -> None:
        self._clock = clock
        self._on_orphaned = on_orphaned
        self._interval = interval
        self._getppid = getppid
        self._parent = getppid()
        self._call: Optional[IDelayedCall] = None

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def _schedule(self) -> None:
        self._call = self._clock.callLater(self._interval, self._check)

    def _check(self) -> None:
        self._call = None
        if self._getppid() != self._parent:
            log.warn(
                "twistauth: worker {pid}: parent {parent} is gone: stopping",
                pid=os.getpid(),
                parent=self._parent,
            )
            self._on_orphaned()
            return
        self._schedule()

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def stop_reactor(reactor: Any) -> None:
    """
    Stop ``reactor`` if it is not stopping already.
    """
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def exit_status_at_exit(status: int) -> None:
    """
    Make the process exit with ``status`` once twistd has finished (it
    exits 0 after a stopped reactor; a supervisor must see a failure).
    """

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: S110 - exiting anyway
                pass
        os._exit(status)

    atexit.register(leave)


# ---------------------------------------------------------------------------
# Reload.


@attr.s(frozen=True, auto_attribs=True)
class ReloadResult:
    """
    What one reload did.

    :ivar ok: the settings loaded and validated.
    :ivar applied: keys whose new value is in effect.
    :ivar refused: changed keys that keep their old value.
    """

    ok: bool
    applied: Tuple[str, ...] = ()
    refused: Tuple[str, ...] = ()


@attr.s(kw_only=True, eq=False)
class Reloader:
    """
    Loads the settings again and applies what may change at run time.

    :ivar current: the settings in effect (the refused keys keep their old
        values).
    :ivar load: loads and validates the settings from their sources
        (raises `SettingsError`).
    :ivar appliers: for each key that can change at run time, a function
        taking the new value (raising to refuse it).
    """

    current: Settings = attr.ib()
    load: Callable[[], Settings] = attr.ib()
    appliers: Dict[str, Callable[[Any], Any]] = attr.ib(factory=dict)

    def on(self, key: str, apply: Callable[[Any], Any]) -> None:
        """
        Let ``key`` change at run time: ``apply(new_value)`` puts it in
        effect (or raises, and the old value stays).
        """
        if key not in Settings.keys():
            raise ValueError(f"no setting named {key!r}")
        self.appliers[key] = apply

    def reload(self) -> ReloadResult:
        """
        Load, validate, apply, log.  Never raises: a bad configuration is
        logged and the running settings stay.
        """
        try:
            new = self.load()
        except SettingsError as e:
            log.error("twistauth: reload refused, settings unchanged: {error}", error=str(e))
            return ReloadResult(ok=False)
        old = self.current
        changed = [
            key for key in Settings.keys() if getattr(new, key) != getattr(old, key)
        ]
        if not changed:
            log.info("twistauth: reload: no setting changed")
            return ReloadResult(ok=True)
        applied: List[str] = []
        refused: List[str] = []
        for key in changed:
            apply = self.appliers.get(key)
            if apply is None:
                refused.append(key)
                log.warn(
                    "twistauth: reload: {key} changed but cannot change while running "
                    "(restart to apply); keeping {value}",
                    key=key,
                    value=old.describe(key),
                )
                continue
            try:
                apply(getattr(new, key))
            except Exception as e:
                refused.append(key)
                log.error(
                    "twistauth: reload: {key} refused ({error}); keeping {value}",
                    key=key,
                    error=f"{type(e).__name__}: {e}",
                    value=old.describe(key),
                )
                continue
            applied.append(key)
            log.info(
                "twistauth: reload: {key} is now {value}", key=key, value=new.describe(key)
            )
        origins = dict(old.origins)
        origins.update({key: new.origins[key] for key in applied})
        self.current = attr.evolve(
            old, origins=origins, **{key: getattr(new, key) for key in applied}
        )
        return ReloadResult(ok=True, applied=tuple(applied), refused=tuple(refused))


def session_key_appliers(caches: Sequence[Any]) -> Callable[[Any], None]:
    """
    The ``session_keys`` applier: every client-side cache among ``caches``
    seals with the new keys from now on (tokens sealed with a key still
    listed keep opening and are re-sealed with the newest on use).

    :raises twistauth.sessions.sealing.KeyringError: a key is unusable
        (checked for every cache before any changes).
    """
    from twistauth.sessions.client import ClientSessionCache
    from twistauth.sessions.sealing import Keyring

    clients = []
    for cache in caches:
        if isinstance(cache, ClientSessionCache) and cache not in clients:
            clients.append(cache)

    def apply(keys: Any) -> None:
        Keyring(keys)  # every key checked before any cache changes
        for cache in clients:
            cache.replace_keys(keys)

    return apply


# ---------------------------------------------------------------------------
# The parent: a pool of worker processes.


@attr.s(kw_only=True, eq=False)
class RestartPolicy:
    """
    When to restart a worker that ended, and when to give up.

    Each worker slot keeps the times of its recent crashes: the n-th crash
    within ``window`` seconds waits ``first_delay * 2**(n-1)`` seconds (at
    most ``max_delay``) before the restart; crash number ``limit + 1``
    within the window gives up.
    """

    clock: IReactorTime = attr.ib()
    limit: int = attr.ib()
    window: float = attr.ib()
    first_delay: float = attr.ib(default=0.1)
    max_delay: float = attr.ib(default=30.0)
    _history: Dict[int, List[float]] = attr.ib(factory=dict, init=False)

    def crashed(self, slot: int) -> Optional[float]:
        """
        Count a crash of ``slot``.

        :return: seconds to wait before restarting it, or ``None`` to give up.
        """
        now = self.clock.seconds()
        recent = [t for t in self._history.get(slot, []) if now - t < self.window]
        recent.append(now)
        self._history[slot] = recent
        if len(recent) > self.limit:
            return None
        return float(min(self.max_delay, self.first_delay * 2 ** (len(recent) - 1)))

    def recent(self, slot: int) -> int:
        """
        Crashes of ``slot`` within the window.
        """
        now = self.clock.seconds()
        return sum(1 for t in self._history.get(slot, []) if now - t < self.window)


def _status(reason: Failure) -> str:
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig is not None:
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit code {getattr(value, 'exitCode', None)}"


class WorkerProcess(ProcessProtocol):
    """
    One worker, seen from the parent: relays its output into the parent's
    log and tells the pool when it is ready and when it ends.

    :ivar pid: the process id (once started).
    :ivar ready: whether the worker said it is serving.
    """

    def __init__(self, pool: WorkerPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.pid: Optional[int] = None
        self.ready = False
        self.reload_pending = False
        self._buffers = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_RELAYED_LINE:
            lines.append(rest)
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            self.pool.relay(self, childFD, line[:MAX_RELAYED_LINE])

    def signal(self, name: str) -> None:
        """
        Send a signal (``"TERM"``, ``"HUP"``, ``"KILL"``) if it still runs.
        """
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except (ProcessExitedAlready, OSError):
            pass

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in list(self._buffers.items()):
            if rest:
                self.pool.relay(self, childFD, rest[:MAX_RELAYED_LINE])
        self._buffers = {1: b"", 2: b""}
        self.pool.worker_ended(self, reason)


class WorkerPool(Service):
    """
    Keeps ``count`` worker processes running on the shared sockets.

    The sockets are opened in ``privilegedStartService`` (so a privileged
    port can be bound before twistd drops privileges) and the workers
    spawned in ``startService``.
    """

    name = "twistauth-workers"

    def __init__(
        self,
        *,
        reactor: Any,
        count: int,
        listen: Sequence[str],
        command: Callable[[str], List[str]],
        environ: Mapping[str, str],
        policy: RestartPolicy,
        stop_timeout: float,
        on_give_up: Callable[[], Any],
        publisher: Callable[[Dict[str, Any]], None] = globalLogPublisher,
        open_socket: Callable[[ListenSpec], Any] = open_listening_socket,
        on_ended: Optional[Callable[[int], Any]] = None,
    ) -> None:
        """
        :param reactor: spawns processes (``IReactorProcess``) and keeps time.
        :param command: the argv of a worker, given its ``--worker-fds``.
        :param environ: the workers' environment.
        :param stop_timeout: seconds a stopping worker has before SIGKILL.
        :param on_give_up: called once, after too many crashes (it should
            stop the reactor and make the process exit non-zero).
        :param publisher: where relayed log events go.
        :param on_ended: called with a worker's process id when it ended
            (its metrics' gauges are forgotten).
        """
        self._reactor = reactor
        self.count = count
        self._specs = [listen_spec(d) for d in listen]
        self._command = command
        self._environ = dict(environ)
        self.policy = policy
        self._stop_timeout = stop_timeout
        self._on_give_up = on_give_up
        self._publish = publisher
        self._open_socket = open_socket
        self._on_ended = on_ended
        self._sockets: List[Any] = []
        self.workers: Dict[int, WorkerProcess] = {}
        self._restarts: Dict[int, IDelayedCall] = {}
        self._stopping = False
        self._stopped: Optional[Deferred[None]] = None
        self._kill_call: Optional[IDelayedCall] = None
        self.gave_up = False
        self.spawned = 0

    # -- starting --------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if not self._sockets:
            self._sockets = [self._open_socket(spec) for spec in self._specs]

    def startService(self) -> None:
        if not self._sockets:
            self._sockets = [self._open_socket(spec) for spec in self._specs]
        super().startService()
        log.info(
            "twistauth: parent {pid}: {count} worker processes on {endpoints}",
            pid=os.getpid(),
            count=self.count,
            endpoints=", ".join(spec.description for spec in self._specs),
        )
        for slot in range(self.count):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        worker = WorkerProcess(self, slot)
        fds: Dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for i, sock in enumerate(self._sockets):
            fds[FIRST_CHILD_FD + i] = sock.fileno()
        argv = self._command(format_worker_fds(self._specs))
        self._reactor.spawnProcess(
            worker, argv[0], argv, env=self._environ, childFDs=fds
        )
        self.workers[slot] = worker
        self.spawned += 1
        log.info(
            "twistauth: parent: started worker {slot} as process {worker_pid}",
            slot=slot,
            worker_pid=worker.pid,
        )

    # -- what workers say ------------------------------------------------

    def relay(self, worker: WorkerProcess, fd: int, line: bytes) -> None:
        """
        Put a line of a worker's output into this process's log: a JSON log
        event (from `worker_log_observer`) as the event itself, anything
        else as text.
        """
        text = line.decode("utf-8", "replace").rstrip("\r")
        if fd == 1 and text.startswith("\x1e"):
            try:
                event = eventFromJSON(text[1:])
            except ValueError:
                event = None
            if isinstance(event, dict):
                self._relay_event(worker, event)
                return
        if not text.strip():
            return
        if fd == 2:
            log.warn("twistauth: worker {worker_pid} stderr: {line}", worker_pid=worker.pid, line=text)
        else:
            log.info("twistauth: worker {worker_pid}: {line}", worker_pid=worker.pid, line=text)

    def _relay_event(self, worker: WorkerProcess, event: Dict[str, Any]) -> None:
        level = event.get("log_level")
        namespace = event.get("log_namespace", "-")
        level_name = getattr(level, "name", "-")
        event["worker_pid"] = worker.pid
        event["log_system"] = f"{namespace}#{level_name} worker {worker.pid}"
        ready = event.get(READY_KEY) is True
        self._publish(event)
        if ready and not worker.ready:
            worker.ready = True
            if worker.reload_pending and not self._stopping:
                worker.reload_pending = False
                worker.signal("HUP")

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        """
        A worker process ended: done if stopping, else restart it (or give up).
        """
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        if self._on_ended is not None and worker.pid is not None:
            try:
                self._on_ended(worker.pid)
            except Exception:
                log.failure("twistauth: parent: cleaning up after worker {worker_pid} failed",
                            worker_pid=worker.pid)
        status = _status(reason)
        if self._stopping:
            log.info(
                "twistauth: parent: worker {worker_pid} stopped ({status})",
                worker_pid=worker.pid,
                status=status,
            )
            self._check_stopped()
            return
        delay = self.policy.crashed(worker.slot)
        if delay is None:
            log.critical(
                "twistauth: parent: worker {slot} crashed {count} times within {window:g} s "
                "(last: process {worker_pid}, {status}): giving up",
                slot=worker.slot,
                count=self.policy.recent(worker.slot),
                window=self.policy.window,
                worker_pid=worker.pid,
                status=status,
            )
            self._give_up()
            return
        log.warn(
            "twistauth: parent: worker {worker_pid} ended unexpectedly ({status}); "
            "restarting it in {delay:g} s",
            worker_pid=worker.pid,
            status=status,
            delay=delay,
        )
        self._restarts[worker.slot] = self._reactor.callLater(delay, self._spawn, worker.slot)

    def _give_up(self) -> None:
        if self.gave_up:
            return
        self.gave_up = True
        self._on_give_up()

    # -- reload and stop -------------------------------------------------

    def reload_workers(self) -> int:
        """
        Forward SIGHUP to every worker: now to those that are ready, and to
        the others once they are (before that, SIGHUP would kill them).

        :return: how many were signalled now.
        """
        signalled = 0
        for worker in self.workers.values():
            if worker.ready:
                worker.signal("HUP")
                signalled += 1
            else:
                worker.reload_pending = True
        return signalled

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._stopped is not None:
            return self._stopped
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        self._stopped = Deferred()
        if self.workers:
            log.info(
                "twistauth: parent: stopping {count} worker(s) (SIGTERM; SIGKILL after "
                "{timeout:g} s)",
                count=len(self.workers),
                timeout=self._stop_timeout,
            )
            for worker in list(self.workers.values()):
                worker.signal("TERM")
            self._kill_call = self._reactor.callLater(self._stop_timeout, self._kill)
        self._check_stopped()
        return self._stopped

    def _kill(self) -> None:
        self._kill_call = None
        for worker in list(self.workers.values()):
            log.warn(
                "twistauth: parent: worker {worker_pid} did not stop in {timeout:g} s: SIGKILL",
                worker_pid=worker.pid,
                timeout=self._stop_timeout,
            )
            worker.signal("KILL")

    def _check_stopped(self) -> None:
        if self.workers or self._stopped is None or self._stopped.called:
            return
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()
        for spec in self._specs:
            if spec.family == socket.AF_UNIX:
                try:
                    os.unlink(spec.address)
                except OSError:
                    pass
        self._stopped.callback(None)


#: The environment variable naming the deployment's metrics directory
#: (``prometheus_client``'s own name for it).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class MetricsDirectory(Service):
    """
    The parent's metrics directory, where every process of the deployment
    writes its counts (`twistauth.metrics`): the directory named by
    ``PROMETHEUS_MULTIPROC_DIR`` if set (its old ``*.db`` files removed:
    counts of an earlier run must not be added in), else a new private
    one, removed when this service stops (after the workers).
    """

    name = "twistauth-metrics-directory"

    def __init__(self, environ: Mapping[str, str]) -> None:
        from twistauth.metrics import clear_directory

        given = environ.get(METRICS_DIR_ENV)
        if given:
            os.makedirs(given, mode=0o700, exist_ok=True)
            clear_directory(given)
            self.path = given
            self._owned = False
        else:
            import tempfile

            self.path = tempfile.mkdtemp(prefix="twistauth-metrics-")
            self._owned = True

    def forget(self, pid: int) -> None:
        """
        A worker ended: its gauges leave the sums (its counters stay).
        """
        from twistauth.metrics import forget_process

        forget_process(self.path, pid)

    def stopService(self) -> Any:
        super().stopService()
        if self._owned:
            import shutil

            shutil.rmtree(self.path, ignore_errors=True)
        return None


def reactor_name(reactor: Any) -> Optional[str]:
    """
    The ``twistd --reactor`` name of ``reactor``'s kind, if it has one.
    """
    from twisted.application.reactors import getReactorTypes

    module = type(reactor).__module__
    for kind in getReactorTypes():
        if getattr(kind, "moduleName", None) == module:
            return str(kind.shortName)
    return None


#: The program a worker runs: twistd, without the current directory first
#: on ``sys.path`` (``-c`` puts it there; the twistd script would not).
_TWISTD = (
    "import sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    "from twisted.scripts.twistd import run\n"
    "run()\n"
)


def worker_command(
    worker_fds: str,
    *,
    executable: str,
    plugin_argv: Sequence[str],
    reactor: Optional[str] = None,
    config_path: Optional[str] = None,
) -> List[str]:
    """
    A worker's argv: ``twistd --nodaemon`` without a pid file, logging JSON
    lines for the parent, with the parent's reactor and ``twistauth``
    options, its configuration file's absolute path, and ``--worker-fds``.
    """
    argv = [
        executable,
        "-c",
        _TWISTD,
        "--nodaemon",
        "--pidfile=",
        "--logger=twistauth.workers.worker_log_observer",
    ]
    if reactor is not None:
        argv.append(f"--reactor={reactor}")
    argv.append("twistauth")
    argv.extend(plugin_argv)
    if config_path is not None:
        argv += ["--config", os.path.abspath(config_path)]
    argv += ["--worker-fds", worker_fds]
    return argv


def worker_environ(environ: Mapping[str, str], implementation: str) -> Dict[str, str]:
    """
    The workers' environment: the parent's, plus ``PYPY_GC_NURSERY=4MB`` on
    PyPy unless set (PyPy's default nursery let a loaded server's memory
    grow on the VMs measured; see the issue and docs/performance.rst).
    """
    result = dict(environ)
    if implementation == "PyPy":
        result.setdefault("PYPY_GC_NURSERY", "4MB")
    return result


#: The lowest level a worker relays (`set_relay_level`); events below it
#: would be dropped by every observer of the parent.
_relay_level = [0]

_LEVEL_NUMBERS = {
    LogLevel.debug: 0,
    LogLevel.info: 1,
    LogLevel.warn: 2,
    LogLevel.error: 3,
    LogLevel.critical: 4,
}


def relay_level(settings: Settings) -> int:
    """
    The lowest level any of the parent's log observers takes (0 debug ...
    4 critical): a worker need not send the parent anything below it.
    """
    from twistauth.observe import parse_level, parse_observer_spec

    default = parse_level(settings.log_level)
    levels = []
    for text in settings.log_observers:
        spec = parse_observer_spec(text)
        if spec.level:
            levels.append(parse_level(spec.level))
        else:
            levels.append(parse_level("error") if spec.kind == "smtp" else default)
    return min(levels, default=default)


def set_relay_level(level: int) -> None:
    """
    Relay events from ``level`` on (this worker's `worker_log_observer`;
    on start-up and SIGHUP).  The event saying the worker is ready is
    always relayed.
    """
    _relay_level[0] = level


@implementer(ILogObserver)
class _RelayObserver:
    """
    Writes each event as a JSON line on a worker's stdout for the parent;
    drops events below `relay_level` and those it cannot write (the parent
    is gone).
    """

    def __init__(self, stream: Any) -> None:
        self._observer = jsonFileLogObserver(stream)

    def __call__(self, event: Dict[str, Any]) -> None:
        if (
            _LEVEL_NUMBERS.get(event.get("log_level"), 1) < _relay_level[0]
            and READY_KEY not in event
        ):
            return
        try:
            self._observer(event)
        except (OSError, ValueError):
            pass


def worker_log_observer() -> Any:
    """
    A worker's ``twistd --logger`` factory: log events as JSON lines on
    the original stdout (a pipe to the parent, which relays them).
    """
    stream = io.TextIOWrapper(
        os.fdopen(os.dup(1), "wb"), encoding="utf-8", errors="replace", write_through=True
    )
    return _RelayObserver(stream)
