"""
The long-poll benchmark: ``python3 bench/longpoll/run.py``.

1. Holds N concurrent long-poll waiters (10 000 and 19 000 by default: one
   process may open at most ~20 000 files here) in a twistauth process and
   in a bare Twisted long-poll server, in the same run; reports the server
   memory per waiter, then wakes them all and reports, as seen by the
   client, when the first and the last answers arrived, and the server CPU
   the fan-out took; and the ratios twistauth / bare.
2. With ``--two-process`` (default on): N waiters over two twistauth
   processes sharing a Redis bus, notified on one of them.
3. Cross-process delivery over Redis (notify on process A, waiter on
   process B): p50/p99 over 1 000 notifications, for both subscription
   modes; and the cost of registering 10 000 waits in each mode.

Until the app wires sessions into the events resource, the twistauth
server uses a trivial session resolver (``bench/longpoll/server.py``).
Prints a Markdown table; ``--json PATH`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_json_line(process: subprocess.Popen[str], timeout: float = 120) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"process {process.args!r} ended early")
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise RuntimeError("no answer in time")


def stats(control: int) -> Dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{control}/", timeout=30) as r:  # noqa: S310
        return json.loads(r.read())  # type: ignore[no-any-return]


class RedisProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="longpoll-redis-")
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_server(
    kind: str,
    redis_url: Optional[str] = None,
    sessions: int = 0,
    offset: int = 0,
    per_request: bool = False,
) -> Any:
    command = [PYTHON, os.path.join(HERE, "server.py"), "--kind", kind,
               "--sessions", str(sessions), "--offset", str(offset)]
    if redis_url:
        command += ["--redis-url", redis_url]
    if per_request:
        command += ["--per-request"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    info = read_json_line(process)
    return process, info["port"], info["control"]


def start_client(port: int, control: int, count: int, offset: int = 0) -> Any:
    process = subprocess.Popen(
        [PYTHON, os.path.join(HERE, "client.py"), "--port", str(port), "--control",
         str(control), "--count", str(count), "--offset", str(offset)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    return process


def wait_waiters(control: int, count: int, timeout: float = 300) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = stats(control)
        if s["waiters"] >= count:
            return s
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {s['waiters']} of {count} waiters after {timeout} s")
        time.sleep(0.2)


def fanout_cpu(control: int, key: str = "fanout_cpu") -> float:
    """
    Server CPU since the notify (read once every client has its answer),
    or (``key="cpu"``) in all.
    """
    with urllib.request.urlopen(f"http://127.0.0.1:{control}/cpu", timeout=30) as r:  # noqa: S310
        return float(json.loads(r.read())[key])


def one_process(kind: str, count: int, per_request: bool = False) -> Dict[str, Any]:
    """
    N waiters in one server process of ``kind``, then a fan-out to all.
    """
    server, port, control = start_server(kind, sessions=count, per_request=per_request)
    try:
        idle = stats(control)
        client = start_client(port, control, count)
        read_json_line(client)  # {"sent": N}
        held = wait_waiters(control, count)
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.flush()
        result = read_json_line(client)
        cpu = fanout_cpu(control)
        client.stdin.write("done\n")
        client.stdin.flush()
        client.wait(60)
        return {
            "kind": kind + (" (Session per request)" if per_request else ""),
            "waiters": count,
            "bytes_per_waiter": (held["rss_kb"] - idle["rss_kb"]) * 1024 / count,
            "first_s": result["first"],
            "p50_s": result["p50"],
            "last_s": result["last"],
            "answered": result["answered"],
            "logged_out": result["logged_out"],
            "fanout_cpu_s": cpu,
        }
    finally:
        server.terminate()
        server.wait(10)


def two_processes(count: int, redis_url: str) -> Dict[str, Any]:
    """
    ``count`` waiters split over two twistauth processes on one Redis bus;
    the notification is sent on the first.
    """
    half = count // 2
    servers = [
        start_server("twistauth", redis_url, sessions=half, offset=i * half) for i in range(2)
    ]
    clients: List[Any] = []
    try:
        idles = [stats(control) for _, _, control in servers]
        for i, (_, port, control) in enumerate(servers):
            clients.append(start_client(port, control if i == 0 else 0, half, offset=i * half))
        for client in clients:
            read_json_line(client)
        helds = [wait_waiters(control, half) for _, _, control in servers]
        cpus = [held["cpu"] for held in helds]
        for client in reversed(clients):  # the notifying client starts its clock last
            client.stdin.write("go\n")
            client.stdin.flush()
        results = [read_json_line(client) for client in clients]
        for client in clients:
            client.stdin.write("done\n")
            client.stdin.flush()
            client.wait(60)
        per_waiter = sum(
            (held["rss_kb"] - idle["rss_kb"]) * 1024 for held, idle in zip(helds, idles)
        ) / (2 * half)
        return {
            "kind": "twistauth x2 (Redis bus)",
            "waiters": 2 * half,
            "bytes_per_waiter": per_waiter,
            "first_s": min(r["first"] for r in results),
            "p50_s": max(r["p50"] for r in results),
            "last_s": max(r["last"] for r in results),
            "answered": sum(r["answered"] for r in results),
            "logged_out": sum(r["logged_out"] for r in results),
            "fanout_cpu_s": sum(
                fanout_cpu(control, "cpu") - before
                for (_, _, control), before in zip(servers, cpus)
            ),
        }
    finally:
        for process, _, _ in servers:
            process.terminate()
            process.wait(10)


def latency(redis_url: str, mode: str, count: int) -> Dict[str, Any]:
    script = os.path.join(HERE, "latency.py")
    waiter = subprocess.Popen(
        [PYTHON, script, "waiter", "--url", redis_url, "--mode", mode, "--count", str(count)],
        stdout=subprocess.PIPE, text=True,
    )
    read_json_line(waiter)  # ready
    notifier = subprocess.run(
        [PYTHON, script, "notifier", "--url", redis_url, "--mode", mode, "--count", str(count)],
        stdout=subprocess.PIPE, text=True, check=True,
    )
    assert '"sent"' in notifier.stdout
    delays = sorted(read_json_line(waiter, timeout=60)["delays"])
    waiter.wait(30)
    return {
        "mode": mode,
        "sent": count,
        "received": len(delays),
        "p50_ms": statistics.median(delays) * 1000 if delays else None,
        "p99_ms": delays[int(len(delays) * 0.99) - 1] * 1000 if delays else None,
        "max_ms": delays[-1] * 1000 if delays else None,
    }


def subscribe_cost(redis_url: str, mode: str, count: int) -> Dict[str, Any]:
    out = subprocess.run(
        [PYTHON, os.path.join(HERE, "latency.py"), "subscribe", "--url", redis_url, "--mode",
         mode, "--count", str(count)],
        stdout=subprocess.PIPE, text=True, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["mode"] = mode
    result["waits"] = count
    return result


def median_run(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """
    The median of each number over repeated runs (the machine is shared:
    single runs are noisy).
    """
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            values = [r[key] for r in runs if r[key] is not None]
            merged[key] = statistics.median(values) if values else None
    merged["runs"] = len(runs)
    merged["all"] = runs
    return merged


def fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,19000")
    parser.add_argument("--two-process", type=int, default=30000,
                        help="waiters over two processes (0: skip)")
    parser.add_argument("--notifications", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (medians reported)")
    parser.add_argument("--per-request", type=int, default=1,
                        help="also run twistauth building a Session per request (1/0)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    raise_nofile()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    results: Dict[str, Any] = {"fanout": [], "latency": [], "subscribe": []}

    for count in sizes:
        for kind in ("bare", "twistauth"):
            runs = []
            for attempt in range(args.repeat):
                print(f"... {count} waiters, {kind}, run {attempt + 1}", file=sys.stderr, flush=True)
                runs.append(one_process(kind, count))
            results["fanout"].append(median_run(runs))
        if args.per_request:
            print(f"... {count} waiters, twistauth, Session per request", file=sys.stderr, flush=True)
            results["fanout"].append(one_process("twistauth", count, per_request=True))

    redis = RedisProcess()
    try:
        if args.two_process:
            print(f"... {args.two_process} waiters over two processes", file=sys.stderr, flush=True)
            results["fanout"].append(two_processes(args.two_process, redis.url))
        for mode in ("pattern", "channel"):
            print(f"... Redis latency, {mode}", file=sys.stderr, flush=True)
            results["latency"].append(latency(redis.url, mode, args.notifications))
            results["subscribe"].append(subscribe_cost(redis.url, mode, 10_000))
    finally:
        redis.stop()

    print("\n| waiters | server | bytes/waiter | first answer (s) | median (s) | last answer (s) "
          "| fan-out CPU (s) | answered |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["fanout"]:
        print(f"| {r['waiters']} | {r['kind']} | {r['bytes_per_waiter']:.0f} | {fmt(r['first_s'])} "
              f"| {fmt(r['p50_s'])} | {fmt(r['last_s'])} | {fmt(r['fanout_cpu_s'])} "
              f"| {r['answered']} ({r['logged_out']} logged out) |")
    print("\n| waiters | memory ratio | first-answer ratio | last-answer ratio | fan-out CPU ratio |")
    print("|---|---|---|---|---|")
    by = {(r["waiters"], r["kind"]): r for r in results["fanout"]}
    for count in sizes:
        bare, ours = by.get((count, "bare")), by.get((count, "twistauth"))
        if not bare or not ours:
            continue

        def ratio(key: str, a: Dict[str, Any] = ours, b: Dict[str, Any] = bare) -> str:
            if a[key] is None or not b[key]:
                return "-"
            return f"{a[key] / b[key]:.2f}"

        print(f"| {count} | {ratio('bytes_per_waiter')} | {ratio('first_s')} | {ratio('last_s')} "
              f"| {ratio('fanout_cpu_s')} |")
    print("\n| Redis delivery (A notifies, B waits) | sent | received | p50 (ms) | p99 (ms) | max (ms) |")
    print("|---|---|---|---|---|---|")
    for r in results["latency"]:
        print(f"| {r['mode']} | {r['sent']} | {r['received']} | {fmt(r['p50_ms'], digits=2)} "
              f"| {fmt(r['p99_ms'], digits=2)} | {fmt(r['max_ms'], digits=2)} |")
    print("\n| subscription mode | waits | register (s) | until listening (s) | cancel all (s) |")
    print("|---|---|---|---|---|")
    for r in results["subscribe"]:
        print(f"| {r['mode']} | {r['waits']} | {fmt(r['registered'])} | {fmt(r['listening'])} "
              f"| {fmt(r['cancelled'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
