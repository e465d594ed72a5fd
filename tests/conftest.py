"""
Shared fixtures: a private redis-server per test session, and helpers to
find free ports.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, Optional

import pytest


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """
    Block until something accepts connections on 127.0.0.1:``port``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class RedisServer:
    """
    A private redis-server on a free loopback port, which a test may stop
    and start again (on the same port) to inject an outage.
    """

    def __init__(self, password: Optional[str] = None, persistent: bool = False) -> None:
        """
        :param password: the ``requirepass`` password, if any.
        :param persistent: keep the data across `stop` and `start` (an
            append-only file fsynced on every write), as a production Redis
            does; by default a restart loses everything.
        """
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed: run tests/setup.sh")
        self.executable = executable
        self.port = free_port()
        self.password = password
        self.persistent = persistent
        self.directory = tempfile.mkdtemp(prefix="twistauth-redis-")
        self.process: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--dir",
            self.directory,
        ]
        if self.persistent:
            command += ["--appendfsync", "always"]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def flush(self) -> None:
        command = ["redis-cli", "-p", str(self.port)]
        if self.password:
            command += ["-a", self.password, "--no-auth-warning"]
        subprocess.run(command + ["FLUSHALL"], check=True, stdout=subprocess.DEVNULL)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server_session() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_server(redis_server_session: RedisServer) -> Iterator[RedisServer]:
    """
    The session's private redis-server, emptied before each test and
    running again after it (a test may stop it to simulate an outage).
    """
    if redis_server_session.process is None:
        redis_server_session.start()
    redis_server_session.flush()
    yield redis_server_session
    if redis_server_session.process is None:
        redis_server_session.start()


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twistd_executable() -> str:
    """
    The twistd of the Python running the tests (the installed plugin).
    """
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    path = candidate if os.path.exists(candidate) else shutil.which("twistd")
    if path is None:
        raise RuntimeError("twistd is not installed: run tests/setup.sh")
    return path


def source_environ() -> Dict[str, str]:
    """
    The environment without ``TWISTAUTH_*`` settings, importing twistauth
    from this source tree (the installed plugin module then loads it): a
    subprocess runs the code under test.
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TWISTAUTH_")}
    environ["PYTHONPATH"] = os.pathsep.join(
        [REPOSITORY] + [p for p in [environ.get("PYTHONPATH")] if p]
    )
    return environ


@pytest.fixture
def twistd_path() -> str:
    """
    The twistd of the Python running the tests (the installed plugin).
    """
    return twistd_executable()


async def cached_scripts(connection: Any) -> int:
    """
    How many Lua scripts Redis holds (``INFO memory``).
    """
    info = await connection.execute_command("INFO", "memory")
    for line in str(info).splitlines():
        if line.startswith("number_of_cached_scripts:"):
            return int(line.split(":", 1)[1])
    raise AssertionError("INFO memory tells no number_of_cached_scripts")


async def flush_scripts(connection: Any) -> None:
    """
    Make Redis forget every script, as a restart or a failover does.
    """
    await connection.execute_command("SCRIPT", "FLUSH")
    assert await cached_scripts(connection) == 0
