"""
Tests for the twistd plugin and `twistauth.tap`: the plugin is found and
imports nothing heavy, every setting is an option, and `makeService`
listens where told and lets go of everything when stopped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from typing import Any, List

from conftest import source_environ, twistd_executable
from twisted.application.service import IService, IServiceMaker, MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twistauth.settings import ENV_PREFIX, Settings
from twistauth.tap import Options, makeService


def _clean_environ() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


class _Port:
    """
    A listening port that behaves as a real one does towards its factory:
    started when listening begins, stopped when it ends.
    """

    def __init__(self, reactor: RecordingReactor, factory: Any, port: int) -> None:
        self.reactor = reactor
        self.factory = factory
        self.port = port
        self.listening = True
        factory.doStart()

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        self.factory.doStop()
        return succeed(None)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)


class RecordingReactor(MemoryReactorClock):
    """
    A memory reactor that remembers the ports it handed out.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ports: List[_Port] = []
        self.from_threads: List[Any] = []

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        # Worker threads (password hashing) report here; nothing runs them.
        self.from_threads.append((f, args, kw))

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        super().listenTCP(port, factory, backlog, interface)
        self.ports.append(_Port(self, factory, port))
        return self.ports[-1]


class PluginTests(SynchronousTestCase):
    def test_plugin_found(self) -> None:
        """
        The installed plugin is found by twistd's plugin scan.
        """
        import twisted.plugins

        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker, twisted.plugins)}
        self.assertIn("twistauth", makers)
        maker = makers["twistauth"]
        self.assertTrue(maker.description)
        self.assertIs(maker.options, Options)
        self.assertIs(maker.makeService.__func__ if hasattr(maker.makeService, "__func__")
                      else maker.makeService, makeService)

    def test_plugin_imports_nothing_heavy(self) -> None:
        """
        Scanning the plugin installs no reactor and imports neither Klein
        nor txredisapi (``twistd --reactor=asyncio`` depends on it).
        """
        script = textwrap.dedent(
            """
            import sys
            import twisted.plugins.twistauth_plugin as plugin
            assert plugin.twistauth.tapname == "twistauth"
            heavy = [m for m in ("twisted.internet.reactor", "klein", "txredisapi",
                                 "twistauth.app", "twistauth.tap") if m in sys.modules]
            print(heavy)
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            cwd="/",
            env=_clean_environ(),
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.strip(), b"[]", done.stderr)

    def test_help_lists_every_key(self) -> None:
        done = subprocess.run(
            [twistd_executable(), "twistauth", "--help"],
            capture_output=True,
            cwd="/",
            env=source_environ(),
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        text = done.stdout.decode()
        for name in Settings.keys():
            self.assertIn("--" + name.replace("_", "-"), text, name)
        self.assertIn("--config", text)


class MakeServiceTests(SynchronousTestCase):
    def make(self, *argv: str) -> Any:
        self.patch(os, "environ", {})
        directory = tempfile.mkdtemp(prefix="twistauth-tap-")
        self.addCleanup(shutil.rmtree, directory, True)
        options = Options()
        # The default wiring, with a private data directory and cheap hashing.
        options.parseOptions(
            ["--data-dir", directory, "--argon2-memory-cost", "8192", "--argon2-time-cost", "1"]
            + list(argv)
        )
        self.reactor = RecordingReactor()
        return makeService(options, reactor=self.reactor)

    def test_is_a_multiservice(self) -> None:
        service = self.make()
        self.assertTrue(IService.providedBy(service))
        self.assertIsInstance(service, MultiService)

    def test_default_listen(self) -> None:
        service = self.make()
        service.startService()
        self.assertEqual([(p, i) for p, _, _, i in self.reactor.tcpServers], [(8080, "")])
        self.successResultOf(service.stopService())

    def test_listens_where_told(self) -> None:
        service = self.make(
            "--listen", "tcp:8123:interface=127.0.0.1", "--listen", "tcp:8123:interface=127.0.0.1"
        )
        self.assertEqual(self.reactor.tcpServers, [])
        service.startService()
        servers = self.reactor.tcpServers
        self.assertEqual([(p, i) for p, _, _, i in servers], [(8123, "127.0.0.1")] * 2)
        self.assertIs(servers[0][1], servers[1][1])
        self.assertIs(servers[0][1], service.site)
        self.successResultOf(service.stopService())

    def test_several_endpoints(self) -> None:
        service = self.make("--listen", "tcp:8001", "--listen", r"tcp:8002:interface=\:\:1")
        service.startService()
        self.assertEqual(
            [(p, i) for p, _, _, i in self.reactor.tcpServers], [(8001, ""), (8002, "::1")]
        )
        self.successResultOf(service.stopService())

    def test_settings_reach_the_site(self) -> None:
        service = self.make("--max-body-bytes", "1234", "--request-timeout", "3")
        self.assertEqual(service.site.max_body_bytes, 1234)
        self.assertEqual(service.site.request_timeout, 3)

    def test_stop_releases_everything(self) -> None:
        """
        Stopping stops every port, closes every open connection (firing only
        when they are closed) and leaves no delayed call.
        """
        service = self.make("--listen", "tcp:8123", "--listen", "tcp:8124")
        service.startService()
        self.assertEqual([p.listening for p in self.reactor.ports], [True, True])
        self.assertNotEqual(self.reactor.getDelayedCalls(), [])  # the site's log clock
        transports = []
        for port in (40001, 40002):
            peer = IPv4Address("TCP", "10.0.0.1", port)
            channel = service.site.buildProtocol(peer)
            transport = StringTransport(peerAddress=peer)
            channel.makeConnection(transport)
            transports.append((channel, transport))
        channel, transport = transports[1]
        channel.dataReceived(b"POST /api HTTP/1.1\r\nContent-Length: 10\r\n\r\n")  # mid-request
        stopped = service.stopService()
        self.assertEqual([p.listening for p in self.reactor.ports], [False, False])
        self.assertTrue(all(t.disconnecting for _, t in transports))
        self.assertNoResult(stopped)
        for channel, _ in transports:
            channel.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(service.site.open_connections(), 0)
        self.assertFalse(service.running)

    def test_stop_without_connections(self) -> None:
        service = self.make()
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_composes_into_a_host_service(self) -> None:
        host = MultiService()
        service = self.make("--listen", "tcp:9000")
        service.setServiceParent(host)
        host.startService()
        self.assertEqual(len(self.reactor.tcpServers), 1)
        self.successResultOf(host.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
