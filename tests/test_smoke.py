"""
Smoke test: the installed ``twistd -n twistauth`` starts on a free port,
answers ``echo`` over a real socket, and shuts down cleanly on SIGTERM; with
the default reactor and with ``--reactor=asyncio``.

This runs the installed package (``pip install .``), as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import List

import pytest
from conftest import free_port, wait_for_port

from twistauth.settings import ENV_PREFIX


def _call(port: int, body: bytes) -> object:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api",
        data=body,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        return json.load(response)


def _wait_until_listening(process: subprocess.Popen[bytes], port: int) -> None:
    """
    Wait for the server to accept connections, failing at once with its
    output if it exits first.
    """
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            assert process.stdout is not None
            pytest.fail("twistd exited early:\n" + process.stdout.read().decode())
        try:
            wait_for_port(port, timeout=0.1)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise


@pytest.mark.integration
@pytest.mark.parametrize("reactor", [None, "asyncio"])
def test_echo_over_a_real_socket(twistd_path: str, tmp_path: Path, reactor: str) -> None:
    port = free_port()
    argv: List[str] = [twistd_path, "-n", "--pidfile="]
    if reactor is not None:
        argv.append(f"--reactor={reactor}")
    argv += ["twistauth", f"--listen=tcp:{port}:interface=127.0.0.1"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    process = subprocess.Popen(
        argv, cwd=tmp_path, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        _wait_until_listening(process, port)
        assert _call(port, b'{"method":"echo","parameters":{"x":1}}') == {"result": {"x": 1}}
        answer = _call(port, b'{"batch":{"a":{"method":"echo","parameters":{"y":[2]}}}}')
        assert answer == {"batch": {"a": {"result": {"y": [2]}}}}
        process.send_signal(signal.SIGTERM)
        # twistauth handles SIGTERM itself (a graceful stop: long-polls
        # answered, running calls finished) and exits 0.
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stdout is not None
    output = process.stdout.read().decode()
    assert f"twistauth: listening on tcp:{port}:interface=127.0.0.1" in output, output
    assert "Traceback" not in output, output
    assert "twistauth: SIGTERM: stopping gracefully" in output, output
    assert f"(TCP Port {port} Closed)" in output, output
    assert output.rstrip().endswith("Server Shut Down."), output
    if reactor == "asyncio":
        assert "AsyncioSelectorReactor" in output, output
    with pytest.raises(OSError):
        wait_for_port(port, timeout=0.2)
