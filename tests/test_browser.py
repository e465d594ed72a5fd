"""
The demo page in a real headless Chromium, against a real twistauth server
on a free loopback port with a fresh data directory.

Two stories, each a Node script driving Debian's ``chromium`` with
playwright-core (see their headers for the steps and checks):

- ``tests/browser/demo_flow.js``: local accounts -- sign-up, a wrong
  password, a method call, logout in another tab and "sign out everywhere"
  in another browser switching the page;
- ``tests/browser/oidc_flow.js``: OpenID Connect through a real provider
  (panva's ``oidc-provider`` from ``tests/op``, as in
  ``tests/test_oidc_op.py``) -- its login and consent forms, a method call,
  logout in a second page, then a logout *at the provider* whose
  back-channel logout switches the page, and an RP-initiated logout.

This wrapper starts the servers, runs a script, checks its measured times
and screenshots, and stops the servers, which must shut down cleanly and
never log a password, session id, CSRF token, code or client secret.

Needs ``chromium`` (Debian's package, or ``CHROMIUM=/path``), ``node``,
``npm ci --prefix tests/browser`` and ``npm ci --prefix tests/op``.
Screenshots go to ``tests/browser/artifacts/`` (the OpenID Connect ones to
``artifacts/oidc/``; git-ignored); with ``DEMO_SCREENSHOTS_TO_DOCS=1``
those the tutorial shows are also copied into ``docs/_static/``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping

import pytest
from conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
BROWSER = ROOT / "tests" / "browser"
OP_DIR = ROOT / "tests" / "op"
ARTIFACTS = BROWSER / "artifacts"
OIDC_ARTIFACTS = ARTIFACTS / "oidc"
DOCS_STATIC = ROOT / "docs" / "_static"
PASSWORD = "correct horse battery staple"  # the one demo_flow.js uses
CLIENT_SECRET = "twistauth-integration-secret-0123456789abcdef"  # noqa: S105 (tests/op/server.js)
PROVIDER = "op"
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

# Every state of oidc_flow.js (in artifacts/oidc/), and the tutorial's copies.
OIDC_SCREENSHOTS = {
    "01-login-provider-button.png": "demo-oidc-login.png",
    "02-provider-login.png": "demo-oidc-provider-login.png",
    "03-provider-consent.png": "demo-oidc-provider-consent.png",
    "04-signed-in.png": "demo-oidc-signed-in.png",
    "05-method-result.png": "demo-oidc-method-result.png",
    "06-signed-out-second-page.png": None,
    "07-provider-logout.png": "demo-oidc-provider-logout.png",
    "08-signed-out-backchannel.png": "demo-oidc-signed-out-backchannel.png",
    "09-provider-signed-out.png": None,
    "10-rp-logout-landing.png": None,
}


def server_command(port: int, data_dir: Path, *extra: str) -> List[str]:
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
        *extra,
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


def _node(project: Path = BROWSER, package: str = "playwright-core") -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (see tests/setup.sh)")
    if not (project / "node_modules" / package).is_dir():
        pytest.fail(f"{package} is not installed: npm ci --prefix {project.relative_to(ROOT)}")
    return node


def _server_environ() -> Dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TWISTAUTH_")}
    # This checkout's twistauth, not an installed copy (the page and the
    # stand-in launcher are both from this tree); unbuffered, so the log is
    # complete when the browser script reads it.
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    environ["PYTHONUNBUFFERED"] = "1"
    return environ


@contextmanager
def _running(
    command: List[str], *, port: int, log_path: Path, cwd: Path, environ: Mapping[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """
    Run ``command`` (its output to ``log_path``) until it listens on
    ``port``; kill it on the way out if it still runs.
    """
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=cwd, env=dict(environ), stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[0]} exited early:\n" + log_path.read_text())
            try:
                wait_for_port(port, timeout=0.1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[Dict[str, Any]]:
    """
    A twistauth server with the demo, on a free port; its output goes to a
    log file that the test reads after it stops.
    """
    port = free_port()
    log_path = tmp_path / "server.log"
    with _running(
        server_command(port, tmp_path / "data"),
        port=port,
        log_path=log_path,
        cwd=tmp_path,
        environ=_server_environ(),
    ) as process:
        yield {"port": port, "process": process, "log": log_path}


def oidc_config(issuer: str, base: str, secret_file: Path) -> str:
    """
    The TOML settings file naming the provider, as an operator writes it
    (the client secret in a file of its own).
    """
    return (
        "# Back to the demo after an RP-initiated logout.\n"
        'oidc_logout_landing = "/demo/"\n'
        "\n"
        f"[providers.{PROVIDER}]\n"
        f'issuer = "{issuer}"\n'
        'client_id = "twistauth"\n'
        f'client_secret = "file:{secret_file}"\n'
        f'redirect_uri = "{base}/redirect"\n'
        f'post_logout_redirect_uri = "{base}/logout/return"\n'
        "use_userinfo = true\n"
        "require_logout_typ = true\n"
    )


@pytest.fixture
def oidc_demo(tmp_path: Path) -> Iterator[Dict[str, Any]]:
    """
    The OpenID provider of the integration tests (``tests/op/server.js``)
    and a twistauth with the demo configured to sign in with it, each on
    its own free port.  twistauth is ``http://localhost:PORT`` to the
    browser (its ``__Host-`` cookies need a secure context: Chromium treats
    ``localhost`` as one) and the provider ``http://127.0.0.1:PORT``:
    another site, as a real provider is.
    """
    node = _node(OP_DIR, "oidc-provider")
    op_port, rp_port = free_port(), free_port()
    issuer = f"http://127.0.0.1:{op_port}"
    base = f"http://localhost:{rp_port}"
    op_environ = dict(
        os.environ,
        OP_PORT=str(op_port),
        RP_BASE=base,
        # Long enough that no refresh happens (no refresh token is asked for).
        OP_ACCESS_TOKEN_TTL="300",
    )
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    secret_file.chmod(0o600)
    config = tmp_path / "twistauth.toml"
    config.write_text(oidc_config(issuer, base, secret_file))
    op_log, rp_log = tmp_path / "op.log", tmp_path / "server.log"
    with _running(
        [node, "server.js"], port=op_port, log_path=op_log, cwd=OP_DIR, environ=op_environ
    ) as op_process:
        rp_process = _running(
            server_command(rp_port, tmp_path / "data", f"--config={config}"),
            port=rp_port,
            log_path=rp_log,
            cwd=tmp_path,
            environ=_server_environ(),
        )
        with rp_process as process:
            yield {
                "base": base,
                "issuer": issuer,
                "process": process,
                "log": rp_log,
                "op_process": op_process,
                "op_log": op_log,
            }


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def _run_script(script: str, args: List[str], server_log: Path) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ, CHROMIUM=_chromium(), SERVER_LOG=str(server_log))
    return subprocess.run(
        [_node(), str(BROWSER / script), *args],
        cwd=BROWSER,
        env=environ,
        capture_output=True,
        text=True,
        timeout=90,
    )


def _result(run: subprocess.CompletedProcess[str]) -> Dict[str, Any]:
    output = run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, output
    result: Dict[str, Any] = json.loads(lines[0][len("RESULT ") :])
    return result


def _check_screenshots(
    directory: Path, result: Dict[str, Any], expected: Mapping[str, Any]
) -> None:
    """A screenshot of every state, each a real PNG."""
    assert sorted(result["screenshots"]) == sorted(expected)
    for name in expected:
        data = (directory / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name


def _copy_to_docs(directory: Path, names: Mapping[str, Any]) -> None:
    if os.environ.get("DEMO_SCREENSHOTS_TO_DOCS") == "1":
        DOCS_STATIC.mkdir(exist_ok=True)
        for name, target in names.items():
            if target is not None:
                shutil.copyfile(directory / name, DOCS_STATIC / target)


@pytest.mark.integration
def test_demo_in_headless_chromium(
    demo_server: Dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # This story's own files only: artifacts/oidc/ belongs to the other.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.iterdir():
        if old.is_file():
            old.unlink()
    started = time.monotonic()
    run = _run_script(
        "demo_flow.js",
        [f"http://localhost:{demo_server['port']}", str(ARTIFACTS)],
        demo_server["log"],
    )
    elapsed = time.monotonic() - started
    status = _stop(demo_server["process"])
    server_log = demo_server["log"].read_text()
    output = run.stdout + run.stderr
    assert run.returncode == 0, output + "\n--- server log ---\n" + server_log[-6000:]

    result = _result(run)
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
    _check_screenshots(ARTIFACTS, result, TUTORIAL_SCREENSHOTS)
    assert result["secrets_checked_in_log"] >= 5, result
    # The default settings: Secure, HttpOnly __Host- cookies, over http://localhost.
    assert result["cookie_names"] == ["__Host-twistauth_session", "__Host-twistauth_session_csrf"]

    # The server stopped cleanly and never logged the password.
    assert status in (0, -signal.SIGTERM), server_log[-3000:]
    assert "Traceback" not in server_log, server_log
    assert PASSWORD not in server_log
    assert "ada logged in" in server_log

    _copy_to_docs(ARTIFACTS, TUTORIAL_SCREENSHOTS)


@pytest.mark.integration
def test_oidc_demo_in_headless_chromium(
    oidc_demo: Dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    if OIDC_ARTIFACTS.exists():
        shutil.rmtree(OIDC_ARTIFACTS)
    started = time.monotonic()
    run = _run_script(
        "oidc_flow.js",
        [oidc_demo["base"], oidc_demo["issuer"], str(OIDC_ARTIFACTS)],
        oidc_demo["log"],
    )
    elapsed = time.monotonic() - started
    status = _stop(oidc_demo["process"])
    op_status = _stop(oidc_demo["op_process"])
    server_log = oidc_demo["log"].read_text()
    op_log = oidc_demo["op_log"].read_text()
    output = run.stdout + run.stderr
    assert run.returncode == 0, (
        output
        + "\n--- server log ---\n"
        + server_log[-6000:]
        + "\n--- provider log ---\n"
        + op_log[-3000:]
    )

    result = _result(run)
    with capsys.disabled():
        print(
            f"\nOIDC browser test: {elapsed:.1f} s; logout -> page switch: "
            + ", ".join(f"{k} {v} ms" for k, v in result["switch_ms"].items())
            + f" (the provider answered its logout confirmation, back-channel included, in "
            f"{result['provider_confirm_answer_ms']} ms)"
            + f"; login through the provider {result['login_ms']} ms (single sign-on "
            f"{result['sso_login_ms']} ms); Chromium {result['chromium_version']}"
        )
    (OIDC_ARTIFACTS / "result.json").write_text(json.dumps(result, indent=2) + "\n")

    # Each logout switched the page within a second, measured in the browser:
    # above all the provider's back-channel logout.
    assert set(result["switch_ms"]) == {
        "second_page_logout",
        "provider_backchannel_logout",
        "rp_initiated_logout",
    }
    for name, ms in result["switch_ms"].items():
        assert 0 < ms < SWITCH_LIMIT_MS, (name, ms)
    assert result["provider_forms"] == {
        "first_login": ["login", "consent"],
        "second_login": [],  # single sign-on at the provider
        "other_browser": ["login", "consent"],
    }
    assert result["callbacks"] == 3
    _check_screenshots(OIDC_ARTIFACTS, result, OIDC_SCREENSHOTS)
    assert result["secrets_checked_in_log"] >= 10, result  # cookies, codes, states, ID token

    # The provider sent two back-channel logouts (its own end-session page,
    # then the RP-initiated logout's confirmation) and twistauth took both.
    assert op_log.count("backchannel.success twistauth alice") == 2, op_log
    for problem in ("backchannel.error", "server_error", "grant.error"):
        assert problem not in op_log, op_log
    assert server_log.count(f"back-channel logout from {PROVIDER}: 1 login(s) ended") == 2, (
        server_log
    )
    assert server_log.count(f"{PROVIDER}:alice logged in with {PROVIDER}") == 3, server_log

    # Both stopped cleanly; the client secret was never logged.
    assert status in (0, -signal.SIGTERM), server_log[-3000:]
    assert op_status in (0, -signal.SIGTERM), op_log[-3000:]
    assert "Traceback" not in server_log, server_log
    assert CLIENT_SECRET not in server_log

    _copy_to_docs(OIDC_ARTIFACTS, OIDC_SCREENSHOTS)
