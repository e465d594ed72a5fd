"""
The benchmark harness's own logic (``bench/benchlib``): CPU lists, process
trees, the per-worker split of the ``workers`` scenario (connections from
``/proc``, request counts from ``prometheus_client``'s multi-process
files) and the CPython/PyPy side-by-side table.  Real processes and real
sockets; no benchmark is run.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from benchlib import compare  # noqa: E402
from benchlib.harness import cpu_list, process_tree  # noqa: E402
from benchlib.scenarios.workers import (  # noqa: E402
    REQUESTS,
    connections_by_pid,
    read_counter_file,
    requests_by_pid,
    split_text,
    top_share,
)


def test_cpu_list() -> None:
    assert cpu_list(0) == [0]
    assert cpu_list("0,1") == [0, 1]
    assert cpu_list("0-2,5") == [0, 1, 2, 5]
    assert cpu_list("1,0,1") == [0, 1]


@pytest.fixture
def parent_and_child() -> Iterator[subprocess.Popen[str]]:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_process_tree_finds_a_child(parent_and_child: subprocess.Popen[str]) -> None:
    assert parent_and_child.stdout is not None
    child = int(parent_and_child.stdout.readline())
    try:
        tree = process_tree(parent_and_child.pid)
        assert tree[0] == parent_and_child.pid
        assert child in tree[1:]
    finally:
        subprocess.run(["kill", str(child)], check=False)


def test_connections_by_pid_counts_the_server_side() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    # A process that accepts 3 connections and holds them.
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(fileno=int(sys.argv[1]))\n"
        "held = [s.accept()[0] for _ in range(3)]\n"
        "print('ok', flush=True)\n"
        "time.sleep(60)\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", code, str(listener.fileno())],
        pass_fds=[listener.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    clients = []
    try:
        listener.close()
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ok"
        counts = connections_by_pid([server.pid, 1 << 22], port)
        assert counts[server.pid] == 3
        assert counts[1 << 22] == 0
        # This process holds the client sides, whose local port is not ``port``.
        import os

        assert connections_by_pid([os.getpid()], port)[os.getpid()] == 0
    finally:
        for c in clients:
            c.close()
        server.kill()
        server.wait()


def test_read_counter_file_reads_prometheus_client_files(tmp_path: Path) -> None:
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    path = tmp_path / "counter_4242.db"
    mmaped = MmapedDict(str(path))
    try:
        for labels, value in (({"route": "api", "status": "200"}, 7.0),
                              ({"route": "api", "status": "400"}, 2.0),
                              ({"route": "health", "status": "200"}, 1.0)):  # fmt: skip
            key = mmap_key(
                "twistauth_http_requests", REQUESTS, list(labels), list(labels.values()), "HTTP."
            )
            mmaped.write_value(key, value, 0.0)
        other = mmap_key("twistauth_logins", "twistauth_logins_total", {}, {}, "Logins.")
        mmaped.write_value(other, 5.0, 0.0)
    finally:
        mmaped.close()
    (tmp_path / "counter_x.db").write_bytes(b"")
    assert read_counter_file(path) == {REQUESTS: 10.0, "twistauth_logins_total": 5.0}
    assert requests_by_pid(str(tmp_path)) == {4242: 10.0}
    assert requests_by_pid(None) == {}


def test_split_helpers() -> None:
    workers = {
        "10": {"connections": 46, "requests": 900.0},
        "11": {"connections": 4, "requests": 100.0},
    }
    assert top_share(workers, "connections") == pytest.approx(0.92)
    assert top_share(workers, "requests") == pytest.approx(0.9)
    assert split_text(workers, "connections") == "46/4"
    assert top_share({"1": {"requests": 0}, "2": {"requests": 0}}, "requests") is None


def test_tags_and_names() -> None:
    assert compare.tags_for(["CPython", "PyPy"]) == ["cpython", "pypy"]
    assert compare.tags_for(["PyPy", "PyPy", "PyPy"]) == ["pypy", "pypy2", "pypy3"]
    assert compare.untagged("twistauth@pypy") == ("twistauth", "pypy")
    assert compare.untagged("twistauth") == ("twistauth", None)


def test_side_by_side_ratios_against_each_interpreters_floor() -> None:
    def s(rps: float, cpu: float) -> dict:
        return {"rps_median": rps, "cpu_us_per_request": cpu, "rss_bytes": 50e6}

    summary = {
        "floor": "floor@cpython",
        "servers": {
            "floor@cpython": s(10000, 70),
            "floor@pypy": s(20000, 35),
            "app@cpython": s(9000, 80),
            "app@pypy": s(16000, 40),
            "gone@pypy": {},
        },
    }
    text = compare.side_by_side(summary, ["cpython", "pypy"])
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line[:4] in ("floo", "app ")}
    # req/s, CPU, × floor, RSS per interpreter; then pypy/cpython by req/s and by CPU.
    assert lines["app"][1:] == ["9,000", "80", "0.90", "50", "16,000", "40", "0.80", "50", "1.78", "2.00"]
    assert lines["floor"][-2:] == ["2.00", "2.00"]


def test_expand_names_each_interpreters_servers(tmp_path: Path) -> None:
    from benchlib.harness import Context, Scenario, ServerSpec

    seen = []
    spec = ServerSpec(
        name="a",
        label="A",
        command=lambda c, port: seen.append((c.python, c.workdir)) or ["true"],
        logs_to=lambda c: c.workdir / "a.log",
    )
    scenario = Scenario(name="x", title="X", servers=[spec], floor="a", driver=None)  # type: ignore[arg-type]
    interpreters = [
        compare.Interpreter("cpython", "/usr/bin/python3", False, 5.0),
        compare.Interpreter("pypy", "/usr/bin/pypy3", True, 20.0),
    ]
    expanded = compare.expand(scenario, interpreters)
    assert [s.name for s in expanded.servers] == ["a@cpython", "a@pypy"]
    assert expanded.floor == "a@cpython"
    assert [s.warmup for s in expanded.servers] == [5.0, 20.0]
    context = Context(python="/bin/python", workdir=tmp_path, env={}, server_core=0, client_core=1)
    pypy = expanded.servers[1]
    pypy.command(pypy.context(context), 1234)
    assert seen == [("/usr/bin/pypy3", tmp_path / "pypy")]
    assert pypy.logs_to is not None
    assert pypy.logs_to(context) == tmp_path / "pypy" / "a.log"
