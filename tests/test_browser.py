"""
The demo page in a real headless Chromium, against a real twistauth server
on a free loopback port with a fresh data directory.

The browser side is ``tests/browser/demo_flow.js`` (playwright-core driving
Debian's ``chromium``; see its header for the story and the checks).  This
wrapper starts the server, runs the script, checks its measured times and
screenshots, and stops the server, which must shut down cleanly and never
log a password, session id or CSRF token.

Needs ``chromium`` (Debian's package, or ``CHROMIUM=/path``), ``node`` and
``npm ci --prefix tests/browser``.  Screenshots go to
``tests/browser/artifacts/`` (git-ignored); with
``DEMO_SCREENSHOTS_TO_DOCS=1`` they are also copied into
``docs/_static/`` for the tutorial.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
BROWSER = ROOT / "tests" / "browser"
ARTIFACTS = BROWSER / "artifacts"
DOCS_STATIC = ROOT / "docs" / "_static"
PASSWORD = "correct horse battery staple"  # the one demo_flow.js uses
SWITCH_LIMIT_MS = 1000.0

# The states the tutorial shows, and their names in docs/_static/.
TUTORIAL_SCREENSHOTS = {
    "01-login.png": "demo-login.png",
    "02-bad-credentials.png": "demo-bad-credentials.png",
    "03-signed-in.png": "demo-signed-in.png",
    "04-method-result.png": "demo-method-result.png",
    "05-second-page.png": "demo-second-page.png",
    "06-signed-out.png": "demo-signed-out.png",
    "07-signed-out-everywhere.png": "demo-signed-out-everywhere.png",
    "08-login-with-providers.png": "demo-login-providers.png",
}


def server_command(port: int, data_dir: Path) -> List[str]:
    """
    How the test starts twistauth with the demo: the real ``twistd`` plugin,
    as a user would.
    """
    options = [
        f"--listen=tcp:{port}:interface=127.0.0.1",
        f"--data-dir={data_dir}",
        # Cheaper hashes: the test logs in five times, the page is the subject.
        "--argon2-memory-cost=8192",
        "--argon2-time-cost=1",
        "--demo",
    ]
    return [twistd_command(), "-n", "--pidfile=", "twistauth", *options]


def twistd_command() -> str:
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    return twistd if os.path.exists(twistd) else (shutil.which("twistd") or "twistd")


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        pytest.fail("Chromium is not installed: apt-get install chromium (see tests/setup.sh)")
    return path


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (see tests/setup.sh)")
    if not (BROWSER / "node_modules" / "playwright-core").is_dir():
        pytest.fail("playwright-core is not installed: npm ci --prefix tests/browser")
    return node


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[Dict[str, Any]]:
    """
    A twistauth server with the demo, on a free port; its output goes to a
    log file that the test reads after it stops.
    """
    port = free_port()
    log_path = tmp_path / "server.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TWISTAUTH_")}
    # This checkout's twistauth, not an installed copy (the page and the
    # stand-in launcher are both from this tree); unbuffered, so the log is
    # complete when the browser script reads it.
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    environ["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            server_command(port, tmp_path / "data"),
            cwd=tmp_path,
            env=environ,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                pytest.fail("the server exited early:\n" + log_path.read_text())
            try:
                wait_for_port(port, timeout=0.1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
        yield {"port": port, "process": process, "log": log_path}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


@pytest.mark.integration
def test_demo_in_headless_chromium(
    demo_server: Dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    chromium = _chromium()
    node = _node()
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    environ = dict(os.environ, CHROMIUM=chromium, SERVER_LOG=str(demo_server["log"]))
    started = time.monotonic()
    run = subprocess.run(
        [
            node,
            str(BROWSER / "demo_flow.js"),
            f"http://localhost:{demo_server['port']}",
            str(ARTIFACTS),
        ],
        cwd=BROWSER,
        env=environ,
        capture_output=True,
        text=True,
        timeout=90,
    )
    elapsed = time.monotonic() - started
    status = _stop(demo_server["process"])
    server_log = demo_server["log"].read_text()
    output = run.stdout + run.stderr
    assert run.returncode == 0, output + "\n--- server log ---\n" + server_log[-6000:]

    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, output
    result = json.loads(lines[0][len("RESULT ") :])
    with capsys.disabled():
        print(
            f"\nbrowser test: {elapsed:.1f} s; logout -> page switch: "
            + ", ".join(f"{k} {v} ms" for k, v in result["switch_ms"].items())
            + f"; cookies {', '.join(result['cookie_names'])}; Chromium {result['chromium_version']}"
        )
    (ARTIFACTS / "result.json").write_text(json.dumps(result, indent=2) + "\n")

    # The page switched within a second of each logout, measured in the browser.
    assert set(result["switch_ms"]) == {"same_browser_logout", "other_browser_logout_everywhere"}
    for name, ms in result["switch_ms"].items():
        assert 0 < ms < SWITCH_LIMIT_MS, (name, ms)
    # A screenshot of every state, each a real PNG.
    assert sorted(result["screenshots"]) == sorted(TUTORIAL_SCREENSHOTS)
    for name in TUTORIAL_SCREENSHOTS:
        data = (ARTIFACTS / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name
    assert result["secrets_checked_in_log"] >= 5, result
    # The default settings: Secure, HttpOnly __Host- cookies, over http://localhost.
    assert result["cookie_names"] == ["__Host-twistauth_session", "__Host-twistauth_session_csrf"]

    # The server stopped cleanly and never logged the password.
    assert status in (0, -signal.SIGTERM), server_log[-3000:]
    assert "Traceback" not in server_log, server_log
    assert PASSWORD not in server_log
    assert "ada logged in" in server_log

    if os.environ.get("DEMO_SCREENSHOTS_TO_DOCS") == "1":
        DOCS_STATIC.mkdir(exist_ok=True)
        for name, target in TUTORIAL_SCREENSHOTS.items():
            shutil.copyfile(ARTIFACTS / name, DOCS_STATIC / target)
