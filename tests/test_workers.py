"""
Unit tests for `twistauth.workers` (on a ``Clock`` and fake processes) and
the ``processes`` settings rules.  The same machinery with real processes
is in ``test_workers_processes.py``.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import socket
import stat
import tempfile
from typing import Any, Dict, List, Optional

import pytest
import twisted.test
from twisted.internet.address import IPv4Address
from twisted.internet.error import (
    CannotListenError,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twistauth.settings import Settings, SettingsError
from twistauth.web.site import TwistauthSite
from twistauth.workers import (
    FIRST_CHILD_FD,
    READY_KEY,
    AdoptedPorts,
    GracefulStop,
    Inherited,
    ParentWatch,
    RestartPolicy,
    SignalHandlers,
    WorkerPool,
    _RelayObserver,
    drain,
    format_worker_fds,
    listen_spec,
    open_listening_socket,
    parse_worker_fds,
    reactor_name,
    worker_command,
    worker_environ,
)

REDIS = "redis://127.0.0.1:6379/0"
KEY = "A" * 43
SERVER_PEM = os.path.join(os.path.dirname(twisted.test.__file__), "server.pem")


def shared(**overrides: Any) -> Dict[str, Any]:
    values: Dict[str, Any] = {
        "processes": 2,
        "session_cache": REDIS,
        "user_store": REDIS,
        "method_cache": "none",
        "deployment_key": KEY,
    }
    values.update(overrides)
    return values


class ProcessesSettingsTests(SynchronousTestCase):
    def test_defaults_refuse_several_processes(self) -> None:
        """
        The memory defaults cannot be shared: the error names every key to
        set instead, with the Redis URL form.
        """
        with pytest.raises(SettingsError) as raised:
            Settings.load(processes=2)
        error = raised.value
        self.assertEqual(error.key, "processes")
        self.assertEqual(error.source, "Python keyword")
        for text in (
            "session_cache = 'memory'",
            "session_cache = 'redis://HOST:PORT/DB'",
            "session_cache = 'client' with redis_url",
            "redis_url = 'redis://HOST:PORT/DB'",
            "user_store = 'yaml'",
            "user_store = 'redis://HOST:PORT/DB'",
            "method_cache = 'memory'",
        ):
            self.assertIn(text, str(error))

    def test_one_process_keeps_the_defaults(self) -> None:
        self.assertEqual(Settings.load().processes, 1)
        self.assertEqual(Settings.load(processes=1).session_cache, "memory")

    def test_redis_everywhere_is_accepted(self) -> None:
        settings = Settings.load(**shared())
        self.assertEqual(settings.processes, 2)
        self.assertEqual(settings.shutdown_grace, 10.0)

    def test_each_memory_backend_is_named_alone(self) -> None:
        cases = {
            "session_cache": ("memory", "session_cache = 'memory'"),
            "user_store": ("memory", "user_store = 'memory'"),
            "method_cache": ("memory", "method_cache = 'memory'"),
        }
        for key, (value, text) in cases.items():
            with pytest.raises(SettingsError) as raised:
                Settings.load(**shared(**{key: value}, redis_url=REDIS))
            self.assertIn(text, str(raised.value))
            self.assertEqual(str(raised.value).count(";"), 0, str(raised.value))

    def test_client_sessions_need_a_shared_redis(self) -> None:
        """
        Client-side sessions travel, but their revocations and the bus need
        Redis: without any Redis URL the bus is named; with redis_url (and
        the deployment key) it starts.
        """
        keys = ("B" * 43,)
        values = shared(session_cache="client", session_keys=keys, user_store="yaml")
        with pytest.raises(SettingsError) as raised:
            Settings.load(**{k: v for k, v in values.items() if k != "deployment_key"})
        self.assertIn("redis_url", str(raised.value))
        self.assertIn("user_store = 'yaml'", str(raised.value))
        settings = Settings.load(**shared(session_cache="client", session_keys=keys,
                                          redis_url=REDIS))
        self.assertEqual(settings.shared_redis_url, REDIS)

    def test_shared_redis_needs_the_deployment_key(self) -> None:
        values = shared()
        del values["deployment_key"]
        with pytest.raises(SettingsError) as raised:
            Settings.load(**values)
        self.assertEqual(raised.value.key, "processes")
        self.assertIn("deployment_key", str(raised.value))

    def test_tls_endpoints_are_refused(self) -> None:
        with pytest.raises(SettingsError) as raised:
            Settings.load(**shared(listen=(f"ssl:8443:privateKey={SERVER_PEM}",)))
        self.assertIn("only tcp, tcp6 and unix", str(raised.value))
        # One process serves TLS itself.
        Settings.load(listen=(f"ssl:8443:privateKey={SERVER_PEM}",))

    def test_from_text(self) -> None:
        settings = Settings.load(
            command_line={
                "processes": "4",
                "shutdown_grace": "0",
                "worker_restart_limit": "3",
                "worker_restart_window": "30",
            },
            **{k: v for k, v in shared().items() if k != "processes"},
        )
        self.assertEqual(
            (settings.processes, settings.shutdown_grace, settings.worker_restart_limit,
             settings.worker_restart_window),
            (4, 0.0, 3, 30.0),
        )
        with pytest.raises(SettingsError):
            Settings.load(command_line={"processes": "0"})
        with pytest.raises(SettingsError):
            Settings.load(command_line={"shutdown_grace": "-1"})


class ListenTests(SynchronousTestCase):
    def test_specs(self) -> None:
        tcp = listen_spec("tcp:8080")
        self.assertEqual((tcp.family, tcp.address, tcp.backlog), (socket.AF_INET, ("", 8080), 50))
        local = listen_spec("tcp:8080:interface=127.0.0.1:backlog=7")
        self.assertEqual((local.address, local.backlog), (("127.0.0.1", 8080), 7))
        self.assertEqual(listen_spec(r"tcp:8080:interface=\:\:1").family, socket.AF_INET6)
        six = listen_spec("tcp6:8080")
        self.assertEqual((six.family, six.address), (socket.AF_INET6, ("::", 8080)))
        unix = listen_spec("unix:/run/ta.sock:mode=660")
        self.assertEqual((unix.family, unix.address, unix.mode),
                         (socket.AF_UNIX, "/run/ta.sock", 0o660))

    def test_refused(self) -> None:
        with pytest.raises(ValueError, match="only tcp, tcp6 and unix"):
            listen_spec(f"ssl:8443:privateKey={SERVER_PEM}")
        with pytest.raises(ValueError, match="not a server endpoint"):
            listen_spec("nonsense:1")

    def test_open_tcp(self) -> None:
        sock = open_listening_socket(listen_spec("tcp:0:interface=127.0.0.1"))
        self.addCleanup(sock.close)
        self.assertFalse(sock.getblocking())
        self.assertTrue(sock.get_inheritable())
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 1)
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the kernel accepted it into the backlog

    def test_open_unix(self) -> None:
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "ta.sock")
        sock = open_listening_socket(listen_spec(f"unix:{path}:mode=600"))
        self.addCleanup(sock.close)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(sock.family, socket.AF_UNIX)

    def test_address_in_use(self) -> None:
        first = open_listening_socket(listen_spec("tcp:0:interface=127.0.0.1"))
        self.addCleanup(first.close)
        port = first.getsockname()[1]
        with pytest.raises(CannotListenError, match=f"127.0.0.1:{port}.*in use"):
            open_listening_socket(listen_spec(f"tcp:{port}:interface=127.0.0.1"))

    def test_worker_fds(self) -> None:
        specs = [listen_spec("tcp:1"), listen_spec("tcp6:2"), listen_spec("unix:/x")]
        text = format_worker_fds(specs)
        self.assertEqual(text, "3:inet,4:inet6,5:unix")
        self.assertEqual(
            parse_worker_fds(text, ["a", "b", "c"]),
            [Inherited(3, socket.AF_INET, "a"), Inherited(4, socket.AF_INET6, "b"),
             Inherited(5, socket.AF_UNIX, "c")],
        )
        for bad in ("3:inet", "3:inet,x:inet,5:unix", "3:inet,4:ipx,5:unix"):
            with pytest.raises(ValueError):
                parse_worker_fds(bad, ["a", "b", "c"])


class AdoptingReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.adopted: List[Any] = []
        self.from_threads: List[Any] = []

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        # Worker threads (password hashing) report here; nothing runs them.
        self.from_threads.append((f, args, kw))

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> Any:
        reactor = self

        class Port:
            listening = True
            numberAccepts = 100
            reads = 0

            def doRead(self) -> None:
                # As Twisted's port: accepts up to numberAccepts, then grows it.
                self.reads += 1
                self.numberAccepts += 20

            def stopListening(self) -> None:
                self.listening = False

        port = Port()
        reactor.adopted.append((fd, family, factory, port))
        return port


class AdoptedPortsTests(SynchronousTestCase):
    def test_adopts_closes_and_stops(self) -> None:
        """
        Each inherited socket is adopted with its family, this process's
        descriptor is closed (the reactor has its own), and stopping stops
        listening.
        """
        reactor = AdoptingReactor()
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        fd = a.detach()
        factory = object()
        service = AdoptedPorts(reactor=reactor, factory=factory,
                               sockets=[Inherited(fd, socket.AF_INET, "tcp:8080")])
        service.startService()
        [(adopted_fd, family, served, port)] = reactor.adopted
        self.assertEqual((adopted_fd, family, served), (fd, socket.AF_INET, factory))
        with pytest.raises(OSError):
            os.fstat(fd)
        self.successResultOf(service.stopService())
        self.assertFalse(port.listening)

    def test_accepts_one_connection_per_wake_up(self) -> None:
        """
        Every worker is woken for a new connection: each takes one at a
        time, so the first awake cannot take a whole burst.
        """
        reactor = AdoptingReactor()
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        service = AdoptedPorts(reactor=reactor, factory=object(),
                               sockets=[Inherited(a.detach(), socket.AF_INET, "tcp:8080")])
        service.startService()
        [(_, _, _, port)] = reactor.adopted
        self.assertEqual(port.numberAccepts, 1)
        port.doRead()
        port.doRead()
        self.assertEqual((port.reads, port.numberAccepts), (2, 1))


# -- graceful stop ----------------------------------------------------------


class Pending(Resource):
    """
    Answers nothing until the test finishes the request.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: List[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Pending()
        self.site = TwistauthSite(
            self.resource,
            clock=self.clock,
            max_body_bytes=1000,
            request_timeout=30,
            idle_timeout=60,
            max_connections_per_ip=10,
        )
        self.port = 40000

    def connect(self, data: bytes = b"") -> Any:
        self.port += 1
        peer = IPv4Address("TCP", "10.0.0.1", self.port)
        channel = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        channel.makeConnection(transport)
        if data:
            channel.dataReceived(data)
        return channel, transport

    def test_no_connections(self) -> None:
        self.assertEqual(self.successResultOf(drain(self.site, self.clock, 5)), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_running_requests_finish(self) -> None:
        """
        Idle connections and those still receiving a request close at once;
        a running request finishes, says Connection: close, and its
        connection closes after it.
        """
        idle, idle_transport = self.connect()
        arriving, arriving_transport = self.connect(
            b"POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
        )
        busy, busy_transport = self.connect(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        [request] = self.resource.requests
        done = drain(self.site, self.clock, 5)
        self.assertTrue(idle_transport.disconnecting)
        self.assertTrue(arriving_transport.disconnecting)
        self.assertFalse(busy_transport.disconnecting)
        self.assertNoResult(done)
        for channel in (idle, arriving):
            channel.connectionLost(Failure(Exception("closed")))
        self.clock.advance(4)
        request.write(b"late but in time")
        request.finish()
        self.assertTrue(busy_transport.disconnecting)
        self.assertIn(b"connection: close", busy_transport.value().lower())
        self.assertIn(b"late but in time", busy_transport.value())
        self.assertNoResult(done)
        busy.connectionLost(Failure(Exception("closed")))
        self.assertEqual(self.successResultOf(done), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_grace_runs_out(self) -> None:
        """
        A request still running after the grace has its connection aborted.
        """
        busy, transport = self.connect(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        done = drain(self.site, self.clock, 5)
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)  # aborted
        busy.connectionLost(Failure(Exception("aborted")))
        self.assertEqual(self.successResultOf(done), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        warned = [e for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warned), 1)
        self.assertIn("still running", warned[0]["log_format"])

    def test_graceful_stop_stops_listening_first(self) -> None:
        """
        `GracefulStop` stops its listening services, then drains.
        """
        order: List[str] = []

        class Listener:
            running = True

            def stopService(self) -> None:
                order.append("stopped listening")
                self.running = False

        _, transport = self.connect()
        hook = GracefulStop(site=self.site, clock=self.clock, grace=1, listeners=[Listener()])
        done = hook()
        order.append("disconnecting" if transport.disconnecting else "open")
        self.assertEqual(order, ["stopped listening", "disconnecting"])
        for channel in self.site.channels():
            channel.connectionLost(Failure(Exception("closed")))
        self.assertEqual(self.successResultOf(done), 0)


class FakeReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class SignalHandlersTests(SynchronousTestCase):
    def test_term_stops_once(self) -> None:
        reactor = FakeReactor()
        hangups: List[None] = []
        handlers = SignalHandlers(reactor=reactor, on_hangup=lambda: hangups.append(None),
                                  role="server")
        handlers.handle(signal.SIGHUP)
        self.assertEqual(len(hangups), 1)
        handlers.handle(signal.SIGTERM)
        handlers.handle(signal.SIGTERM)
        self.assertEqual(reactor.stops, 1)
        handlers.handle(signal.SIGHUP)  # no reload while stopping
        self.assertEqual(len(hangups), 1)

    def test_install_when_running(self) -> None:
        """
        The handlers go in once the reactor runs (after its own), replace
        SIGTERM's and SIGHUP's, and a ready event follows.
        """
        reactor = FakeReactor()
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
        for number, handler in previous.items():
            self.addCleanup(signal.signal, number, handler)
        events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        hangups: List[None] = []
        handlers = SignalHandlers(reactor=reactor, on_hangup=lambda: hangups.append(None),
                                  role="worker")
        handlers.startService()
        self.assertEqual(signal.getsignal(signal.SIGTERM), previous[signal.SIGTERM])
        reactor.run()  # runs the when-running hooks
        self.assertEqual(signal.getsignal(signal.SIGTERM), handlers._signalled)
        self.assertEqual(signal.getsignal(signal.SIGHUP), handlers._signalled)
        self.assertEqual([e.get(READY_KEY) for e in events if READY_KEY in e], [True])
        os.kill(os.getpid(), signal.SIGHUP)  # delivered to the handler
        self.assertEqual(len(hangups), 1)


class ParentWatchTests(SynchronousTestCase):
    def test_orphaned(self) -> None:
        clock = Clock()
        parents = [100]
        orphaned: List[None] = []
        watch = ParentWatch(clock=clock, on_orphaned=lambda: orphaned.append(None),
                            getppid=lambda: parents[0])
        watch.startService()
        clock.advance(1)
        clock.advance(1)
        self.assertEqual(orphaned, [])
        parents[0] = 1
        clock.advance(1)
        self.assertEqual(orphaned, [None])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_cancels(self) -> None:
        clock = Clock()
        watch = ParentWatch(clock=clock, on_orphaned=lambda: None, getppid=lambda: 5)
        watch.startService()
        watch.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


# -- the pool -----------------------------------------------------------------


class RestartPolicyTests(SynchronousTestCase):
    def test_backoff_and_give_up(self) -> None:
        clock = Clock()
        policy = RestartPolicy(clock=clock, limit=5, window=60)
        delays = []
        for _ in range(5):
            delays.append(policy.crashed(0))
            clock.advance(1)
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8, 1.6])
        self.assertEqual(policy.crashed(1), 0.1)  # slots are counted apart
        self.assertIsNone(policy.crashed(0))

    def test_window_forgets(self) -> None:
        clock = Clock()
        policy = RestartPolicy(clock=clock, limit=2, window=10, first_delay=1, max_delay=1.5)
        self.assertEqual(policy.crashed(0), 1)
        clock.advance(5)
        self.assertEqual(policy.crashed(0), 1.5)  # capped
        clock.advance(6)  # the first crash left the window
        self.assertEqual(policy.recent(0), 1)
        self.assertEqual(policy.crashed(0), 1.5)
        self.assertIsNone(policy.crashed(0))


class FakeProcess:
    def __init__(self, proto: Any, pid: int, argv: List[str], env: Dict[str, str],
                 fds: Dict[int, Any]) -> None:
        self.proto = proto
        self.pid = pid
        self.argv = argv
        self.env = env
        self.fds = fds
        self.signals: List[str] = []
        self.stdin_closed = False
        self.ended = False
        proto.makeConnection(self)

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def end(self, code: int = 0, sig: Optional[int] = None) -> None:
        self.ended = True
        if code == 0 and sig is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(exitCode=None if sig else code, signal=sig))
        self.proto.processEnded(reason)


class SpawningReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.processes: List[FakeProcess] = []

    def spawnProcess(self, proto: Any, executable: str, args: Any, env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = False,
                     childFDs: Any = None) -> FakeProcess:
        process = FakeProcess(proto, 1000 + len(self.processes), list(args), dict(env), childFDs)
        self.processes.append(process)
        return process


class FakeSocket:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.closed = True


class WorkerPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = SpawningReactor()
        self.events: List[Dict[str, Any]] = []
        self.gave_up: List[None] = []
        self.sockets: List[FakeSocket] = []

        def open_socket(spec: Any) -> FakeSocket:
            self.sockets.append(FakeSocket(50 + len(self.sockets)))
            return self.sockets[-1]

        self.pool = WorkerPool(
            reactor=self.reactor,
            count=2,
            listen=["tcp:8080", "tcp6:8443"],
            command=lambda fds: ["python", "-c", "worker", "--worker-fds", fds],
            environ={"TWISTAUTH_PROCESSES": "2"},
            policy=RestartPolicy(clock=self.reactor, limit=2, window=60),
            stop_timeout=15,
            on_give_up=lambda: self.gave_up.append(None),
            publisher=self.events.append,
            open_socket=open_socket,
        )
        self.pool.privilegedStartService()
        self.pool.startService()

    def live(self) -> List[FakeProcess]:
        return [p for p in self.reactor.processes if not p.ended]

    def ready(self, process: FakeProcess) -> None:
        """
        The worker logs that it is ready, as a real one does.
        """
        stream = io.StringIO()
        _RelayObserver(stream)({"log_format": "ready", READY_KEY: True,
                                "log_level": LogLevel.info, "log_namespace": "t"})
        process.proto.childDataReceived(1, stream.getvalue().encode())

    def test_spawns_with_the_sockets(self) -> None:
        """
        Each worker gets the sockets at descriptors 3, 4, ..., pipes for
        its output, a closed stdin, the environment and its argv.
        """
        self.assertEqual(len(self.live()), 2)
        for process in self.live():
            self.assertEqual(process.fds, {0: "w", 1: "r", 2: "r",
                                           FIRST_CHILD_FD: 50, FIRST_CHILD_FD + 1: 51})
            self.assertEqual(process.argv[-2:], ["--worker-fds", "3:inet,4:inet6"])
            self.assertEqual(process.env, {"TWISTAUTH_PROCESSES": "2"})
            self.assertTrue(process.stdin_closed)
        self.assertEqual(len(self.sockets), 2)  # opened once, for every worker

    def test_restart_with_backoff(self) -> None:
        first = self.reactor.processes[0]
        first.end(sig=signal.SIGKILL)
        self.assertEqual(len(self.live()), 1)
        self.reactor.advance(0.05)
        self.assertEqual(len(self.live()), 1)
        self.reactor.advance(0.06)  # 0.1 s after the first crash
        self.assertEqual(len(self.live()), 2)
        second = self.reactor.processes[-1]
        second.end(code=3)
        self.reactor.advance(0.15)
        self.assertEqual(len(self.live()), 1)
        self.reactor.advance(0.06)  # 0.2 s after the second
        self.assertEqual(len(self.live()), 2)
        self.assertEqual(self.gave_up, [])
        self.assertEqual(self.pool.spawned, 4)

    def test_gives_up(self) -> None:
        """
        One crash more than the limit within the window: the pool gives up
        (once) and restarts nothing.
        """
        def slot0() -> List[FakeProcess]:
            return [p for p in self.live() if p.proto.slot == 0]

        for _ in range(2):
            slot0()[0].end(code=1)
            self.reactor.advance(1)
        self.assertEqual(self.gave_up, [])
        slot0()[0].end(code=1)
        self.assertEqual(self.gave_up, [None])
        self.assertTrue(self.pool.gave_up)
        self.reactor.advance(100)
        self.assertEqual(slot0(), [])
        [other] = self.live()
        other.end(code=1)  # crashes after giving up change nothing
        self.assertEqual(self.gave_up, [None])

    def test_stop_terms_then_kills(self) -> None:
        """
        Stopping sends SIGTERM to every worker, SIGKILL to those still there
        after the timeout, and fires once all ended, closing the sockets.
        """
        one, two = self.live()
        stopped = self.pool.stopService()
        self.assertEqual((one.signals, two.signals), (["TERM"], ["TERM"]))
        one.end()
        self.assertNoResult(stopped)
        self.reactor.advance(15)
        self.assertEqual(two.signals, ["TERM", "KILL"])
        self.assertNoResult(stopped)
        self.assertEqual([s.closed for s in self.sockets], [False, False])
        two.end(sig=signal.SIGKILL)
        self.successResultOf(stopped)
        self.assertEqual([s.closed for s in self.sockets], [True, True])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.reactor.processes), 2)  # nothing restarted

    def test_stop_cancels_pending_restarts(self) -> None:
        self.reactor.processes[0].end(code=1)
        stopped = self.pool.stopService()
        self.reactor.processes[1].end()
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.reactor.processes), 2)

    def test_reload_waits_for_ready(self) -> None:
        """
        SIGHUP goes now to ready workers, and to the others once they say
        they are ready (before that it would kill them).
        """
        one, two = self.live()
        self.ready(one)
        self.assertEqual(self.pool.reload_workers(), 1)
        self.assertEqual((one.signals, two.signals), (["HUP"], []))
        self.ready(two)
        self.assertEqual(two.signals, ["HUP"])

    def test_relays_events_and_text(self) -> None:
        """
        A JSON line becomes the event itself, tagged with the worker's pid;
        other lines are logged as text; partial lines wait for their end.
        """
        process = self.live()[0]
        logged: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        relay = _RelayObserver(io.StringIO())
        stream = relay._observer._outFile  # type: ignore[attr-defined]
        relay({"log_format": "hello {who}", "who": "world", "log_level": LogLevel.warn,
               "log_namespace": "x.y", "log_time": 5.0})
        data = stream.getvalue().encode()
        process.proto.childDataReceived(1, data[:10])
        self.assertEqual(self.events, [])
        process.proto.childDataReceived(1, data[10:] + b"plain text\n")
        process.proto.childDataReceived(2, b"Traceback (most recent call last):\n")
        [event] = self.events
        self.assertEqual(event["log_format"], "hello {who}")
        self.assertEqual(event["who"], "world")
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["worker_pid"], process.pid)
        self.assertIn(f"worker {process.pid}", event["log_system"])
        texts = [(e["log_level"], e.get("line")) for e in logged if "line" in e]
        self.assertEqual(texts, [(LogLevel.info, "plain text"),
                                 (LogLevel.warn, "Traceback (most recent call last):")])

    def test_unwritable_relay_drops(self) -> None:
        class Broken(io.StringIO):
            def write(self, text: str) -> int:
                raise BrokenPipeError()

        _RelayObserver(Broken())({"log_format": "x"})  # no exception


class CommandTests(SynchronousTestCase):
    def test_worker_command(self) -> None:
        argv = worker_command(
            "3:inet",
            executable="/usr/bin/python3",
            plugin_argv=["--processes", "2", "--config", "rel.toml"],
            reactor="epoll",
            config_path="rel.toml",
        )
        self.assertEqual(argv[:2], ["/usr/bin/python3", "-c"])
        self.assertEqual(
            argv[3:],
            ["--nodaemon", "--pidfile=", "--logger=twistauth.workers.worker_log_observer",
             "--reactor=epoll", "twistauth", "--processes", "2", "--config", "rel.toml",
             "--config", os.path.abspath("rel.toml"), "--worker-fds", "3:inet"],
        )
        # The program runs twistd without the current directory on sys.path.
        self.assertIn("from twisted.scripts.twistd import run", argv[2])
        compile(argv[2], "<worker>", "exec")

    def test_environ(self) -> None:
        self.assertEqual(worker_environ({"A": "1"}, "CPython"), {"A": "1"})
        self.assertEqual(worker_environ({"A": "1"}, "PyPy"),
                         {"A": "1", "PYPY_GC_NURSERY": "4MB"})
        self.assertEqual(worker_environ({"PYPY_GC_NURSERY": "8MB"}, "PyPy"),
                         {"PYPY_GC_NURSERY": "8MB"})

    def test_reactor_name(self) -> None:
        from twisted.internet import epollreactor

        self.assertEqual(reactor_name(epollreactor.EPollReactor.__new__(epollreactor.EPollReactor)),
                         "epoll")
        self.assertIsNone(reactor_name(Clock()))

    def test_relay_line_is_json_event(self) -> None:
        stream = io.StringIO()
        _RelayObserver(stream)({"log_format": "x {n}", "n": 1, "log_level": LogLevel.error})
        line = stream.getvalue()
        self.assertTrue(line.startswith("\x1e") and line.endswith("\n"))
        self.assertEqual(eventFromJSON(line[1:])["n"], 1)



class TapTests(SynchronousTestCase):
    """
    `twistauth.tap.makeService` in its three roles.
    """

    def options(self, *argv: str) -> Any:
        from twistauth.tap import Options

        self.patch(os, "environ", {})
        directory = tempfile.mkdtemp(prefix="twistauth-workers-tap-")
        options = Options()
        options.parseOptions(["--data-dir", directory, "--argon2-memory-cost", "8192",
                              "--argon2-time-cost", "1", *argv])
        return options

    def test_parent_serves_nothing_and_spawns(self) -> None:
        from twistauth.tap import makeService

        argv = ["--processes", "2", "--listen", "tcp:0:interface=127.0.0.1",
                "--session-cache", REDIS, "--user-store", REDIS, "--method-cache", "none",
                "--deployment-key", KEY]
        options = self.options(*argv)
        reactor = SpawningReactor()
        service = makeService(options, reactor=reactor)
        pool = service.pool
        self.assertIsInstance(pool, WorkerPool)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(reactor.tcpServers, [])  # the parent listens on nothing itself
        self.assertEqual(len(reactor.processes), 2)
        [sock] = pool._sockets
        self.addCleanup(sock.close)
        for process in reactor.processes:
            self.assertEqual(process.fds[FIRST_CHILD_FD], sock.fileno())
            plugin = process.argv[process.argv.index("twistauth") + 1:]
            self.assertEqual(plugin[: len(options.argv)], options.argv)
            self.assertEqual(plugin[-2:], ["--worker-fds", "3:inet"])
            self.assertIn("--pidfile=", process.argv)
        stopped = service.stopService()
        for process in reactor.processes:
            self.assertEqual(process.signals, ["TERM"])
            process.end()
        self.successResultOf(stopped)
        self.assertEqual(sock.fileno(), -1)  # closed once every worker ended

    def test_parent_needs_the_command_line(self) -> None:
        from twistauth.tap import makeService

        settings = Settings.load(**shared())
        with pytest.raises(ValueError, match="same twistd command line"):
            makeService({"settings": settings}, reactor=SpawningReactor())

    def test_worker_adopts_and_stops_gracefully(self) -> None:
        """
        A worker serves the site on the inherited socket, stops listening
        first when stopping, watches its parent, and leaves no delayed call.
        """
        from twistauth.tap import makeService

        a, b = socket.socketpair()
        self.addCleanup(b.close)
        fd = a.detach()
        options = self.options("--listen", "tcp:8080", "--worker-fds", f"{fd}:inet")
        reactor = AdoptingReactor()
        service = makeService(options, reactor=reactor)
        service.startService()
        self.assertEqual(reactor.tcpServers, [])
        [(adopted, family, factory, port)] = reactor.adopted
        self.assertEqual((adopted, family), (fd, socket.AF_INET))
        self.assertIs(factory, service.site)
        self.assertTrue(any(isinstance(s, ParentWatch) for s in service))
        self.successResultOf(service.stopService())
        self.assertFalse(port.listening)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_bad_worker_fds_exit(self) -> None:
        from twistauth.tap import makeService

        options = self.options("--listen", "tcp:8080", "--worker-fds", "3:inet,4:inet")
        with pytest.raises(SystemExit):
            makeService(options, reactor=AdoptingReactor())

    def test_single_process_reloads_session_keys(self) -> None:
        """
        One process: the listening service is stopped first on SIGTERM, and
        SIGHUP rotates both client-side caches (cookie and header).
        """
        from twistauth.tap import makeService

        old, new = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        path = os.path.join(tempfile.mkdtemp(), "t.toml")
        with open(path, "w") as f:
            f.write(f'session_cache = "client"\nsession_keys = ["{old}"]\n')
        options = self.options("--config", path, "--listen", "tcp:8080")
        service = makeService(options, reactor=AdoptingReactor())
        [graceful] = [hook for hook in service.before_stop if isinstance(hook, GracefulStop)]
        self.assertEqual(graceful.listeners, [s for s in service if hasattr(s, "endpoint")])
        self.assertEqual(len(graceful.listeners), 1)
        with open(path, "w") as f:
            f.write(f'session_cache = "client"\nsession_keys = ["{new}", "{old}"]\n')
        self.assertEqual(service.reloader.reload().applied, ("session_keys",))
        keys = Settings.load(session_keys=(new, old)).session_keys
        api = service.app.api
        self.assertIsNot(api.sessions, api.header_sessions)
        self.assertEqual(api.sessions.keys, keys)
        self.assertEqual(api.header_sessions.keys, keys)
