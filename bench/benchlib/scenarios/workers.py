"""
One twistauth process or several (issue 7): the anonymous JSON echo
(``POST /api`` ``{"method":"echo","parameters":{"x":1}}``) served by
``twistd -n twistauth`` (one process), ``--processes 1`` (the same code
path: twistauth forks only for N > 1, so the two rows show the run's noise)
and ``--processes 2`` (a parent and two workers sharing its listening
socket, `twistauth.workers`), next to the tuned bare twisted.web floor in
one process and in two (``bench/servers/twisted_web_processes.py``: the
same socket sharing, bare).

**Fairness on a 2-CPU machine.**  ``wrk`` stays pinned to the client CPU,
as in every scenario.  Each server runs where it does best:

- a single process pinned to the server CPU, which it then has to itself
  (as in the other scenarios);
- two workers on both CPUs (``taskset -c 0,1``): pinned to one CPU they
  could show nothing, so they share the client CPU with ``wrk``.

So the two-worker rows answer "what does a second worker buy on this
machine, load generator included", and the table says how much CPU each
server and ``wrk`` used.  ``twistauth-cpus-0-1`` is the single process
allowed both CPUs too: the Linux scheduler then often wakes it on
``wrk``'s CPU (the two talk over loopback), where they compete while the
other CPU idles (the bare floor lost about a fifth of its req/s so in a
quiet quick run), so it is not the single process's fair baseline; on a
busy machine it may still come out ahead, as it can move away from other
work on the server CPU.

**The split between workers.**  For a server with several workers each
sample also records, per worker: the keep-alive connections it holds
halfway through the run (its sockets in ``/proc/<pid>/fd`` against the
established connections to the port in ``/proc/net/tcp``), the requests
it answered (``twistauth_http_requests_total`` in its own
``counter_<pid>.db`` file of the metrics directory, which every worker
writes about once a second) and its CPU time.

Worker processes need shared state, so every twistauth server here keeps
sessions, users and the bus in a private ``redis-server`` (started by the
scenario's setup, as for ``sessions``) and caches no methods; the
anonymous echo itself sends Redis nothing.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import statistics
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from benchlib.harness import (
    BenchError,
    Context,
    RunningServer,
    Scenario,
    ServerSpec,
    process_cpu_seconds,
)
from benchlib.scenarios._commands import api_driver, python_script, twistd
from benchlib.scenarios.sessions import redis_server
from benchlib.wrk import WrkDriver

BODY = '{"method":"echo","parameters":{"x":1}}'
ANSWER = {"result": {"x": 1}}
FLOOR = "twisted-web-tuned"
FLOOR_2 = "twisted-web-tuned-processes-2"
PAIRS = {"twistauth-processes-2": FLOOR_2, "twistauth": FLOOR}
"""Ratios the notes print: each twistauth row to the bare server shaped like it."""
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
REQUESTS = "twistauth_http_requests_total"
READY = re.compile(r"twistauth: worker (\d+) ready")

#: Seconds to wait after a run for every worker to have written its counts
#: (each writes its metrics file about once a second).
FLUSH_WAIT = 1.5


# ---------------------------------------------------------------------------
# Observing the workers from outside: /proc and the metrics files.


def _established_inodes(port: int) -> set:
    """
    Socket inodes of the established TCP connections whose local port is
    ``port`` (the server's side of each connection), from ``/proc/net/tcp``
    and ``/proc/net/tcp6``.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "01":  # 01: ESTABLISHED
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def connections_by_pid(pids: Sequence[int], port: int) -> Dict[int, int]:
    """
    How many established connections to ``port`` each process holds.
    """
    inodes = _established_inodes(port)
    out: Dict[int, int] = {}
    for pid in pids:
        count = 0
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
        out[pid] = count
    return out


def read_counter_file(path: Path) -> Dict[str, float]:
    """
    The samples of one ``prometheus_client`` multi-process file, by sample
    name, summed over labels.

    The format (``prometheus_client.mmap_dict``, stable since 0.12): a
    4-byte used length, 4 bytes of padding, then entries of a 4-byte key
    length, the UTF-8 JSON key ``[family, sample, labels, help]`` padded to
    8 bytes, a value and a timestamp (two doubles).  Read here, in the
    harness, so no subprocess runs while a sample is measured.
    """
    import json

    data = path.read_bytes()
    if len(data) < 8:
        return {}
    used = min(struct.unpack_from("i", data, 0)[0], len(data))
    out: Dict[str, float] = {}
    pos = 8
    while pos + 4 <= used:
        length = struct.unpack_from("i", data, pos)[0]
        if length <= 0 or pos + 4 + length > used:
            break
        key = data[pos + 4 : pos + 4 + length]
        pos += 4 + length + (8 - (length + 4) % 8)
        (value,) = struct.unpack_from("d", data, pos)
        pos += 16
        try:
            sample = json.loads(key)[1]
        except (ValueError, IndexError):
            continue
        out[sample] = out.get(sample, 0.0) + value
    return out


def requests_by_pid(directory: Optional[str]) -> Dict[int, float]:
    """
    ``twistauth_http_requests_total`` of every process that wrote a
    ``counter_<pid>.db`` file in the metrics ``directory``.
    """
    out: Dict[int, float] = {}
    if not directory:
        return out
    for path in Path(directory).glob("counter_*.db"):
        pid = path.stem.split("_", 1)[1]
        if not pid.isdigit():
            continue
        try:
            out[int(pid)] = read_counter_file(path).get(REQUESTS, 0.0)
        except OSError:
            continue
    return out


def environment_of(pid: int, name: str) -> Optional[str]:
    """
    The value of ``name`` in a running process's environment.
    """
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    prefix = name.encode() + b"="
    for entry in entries:
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def top_share(counts: Dict[str, Any], key: str) -> Optional[float]:
    """
    The busiest worker's share of ``key`` in one sample's ``workers``.
    """
    values = [float(w[key]) for w in counts.values()]
    total = sum(values)
    return max(values) / total if total > 0 else None


def split_text(counts: Dict[str, Any], key: str) -> str:
    """
    One sample's split, busiest worker first: ``"26/24"`` (CPU seconds
    with one decimal: ``"1.1/0.9"``); ``"-"`` when nothing was counted.
    """
    values = sorted((float(w[key]) for w in counts.values()), reverse=True)
    if not any(values):
        return "-"
    form = "{:.1f}" if key == "cpu_s" else "{:.0f}"
    return "/".join(form.format(v) for v in values)


# ---------------------------------------------------------------------------
# The driver.


@dataclass
class SplitWrkDriver(WrkDriver):
    """
    `WrkDriver` that, for a server of several worker processes, also
    records how the connections, requests and CPU time were split between
    them (``sample["workers"]``, by pid), and that remembers each server's
    samples for the notes.
    """

    flush_wait: float = FLUSH_WAIT
    summaries: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def measure(self, server: RunningServer, seconds: float) -> Dict[str, Any]:
        workers = server.pids()[1:]
        if len(workers) < 2:
            sample = super().measure(server, seconds)
            sample["server"] = server.spec.name
            return sample
        directory = environment_of(server.process.pid, METRICS_DIR_ENV)
        requests_before = requests_by_pid(directory)
        cpu_before = {pid: process_cpu_seconds(pid) for pid in workers}
        seen: Dict[int, int] = {}
        halfway = threading.Timer(
            max(seconds, 1) / 2, lambda: seen.update(connections_by_pid(workers, server.port))
        )
        halfway.start()
        try:
            sample = super().measure(server, seconds)
        finally:
            halfway.cancel()
            halfway.join()
        time.sleep(self.flush_wait)
        requests_after = requests_by_pid(directory)
        sample["workers"] = {
            str(pid): {
                "connections": seen.get(pid, 0),
                "requests": requests_after.get(pid, 0.0) - requests_before.get(pid, 0.0),
                "cpu_s": process_cpu_seconds(pid) - cpu_before[pid],
            }
            for pid in workers
        }
        sample["server"] = server.spec.name
        return sample

    def summarize(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        summary = super().summarize(samples)
        if not samples:
            return summary
        used = [s["server_cores_used"] for s in samples if "server_cores_used" in s]
        client = [s["client_cores_used"] for s in samples if "client_cores_used" in s]
        if used:
            summary["server_cores_used"] = statistics.median(used)
        if client:
            summary["client_cores_used"] = statistics.median(client)
        splits = [s["workers"] for s in samples if s.get("workers")]
        for key in ("connections", "requests", "cpu_s"):
            shares = [x for x in (top_share(w, key) for w in splits) if x is not None]
            if shares:
                summary[f"top_worker_{key}_share"] = statistics.median(shares)
                summary[f"top_worker_{key}_share_max"] = max(shares)
        if splits:
            summary["worker_splits"] = [
                {k: split_text(w, k) for k in ("connections", "requests", "cpu_s")}
                for w in splits
            ]
        if "server" in samples[0]:
            self.summaries[samples[0]["server"]] = summary
        return summary


def _cores(summary: Dict[str, Any], key: str) -> str:
    value = summary.get(key)
    return f"{value:.2f}" if value is not None else "-"


def _share(key: str) -> Any:
    def cell(summary: Dict[str, Any]) -> str:
        value = summary.get(f"top_worker_{key}_share")
        if value is None:
            return "-"
        return f"{100 * value:.0f}% (≤{100 * summary[f'top_worker_{key}_share_max']:.0f}%)"

    return cell


COLUMNS = [
    ("CPUs used", lambda s: _cores(s, "server_cores_used")),
    ("wrk CPUs", lambda s: _cores(s, "client_cores_used")),
    ("busiest worker: conns", _share("connections")),
    ("reqs", _share("requests")),
    ("CPU", _share("cpu_s")),
]


class SplitNotes:
    """
    The scenario's notes: fixed lines, then (once the run is summarized)
    each twistauth row's ratio to the bare server shaped like it (`PAIRS`,
    per interpreter when several are compared) and each several-worker
    server's split by round.
    """

    def __init__(self, driver: SplitWrkDriver, fixed: List[str]) -> None:
        self.driver = driver
        self.fixed = fixed

    def __iter__(self) -> Iterator[str]:
        from benchlib.compare import tagged, untagged

        yield from self.fixed
        summaries = self.driver.summaries
        for name, mine in sorted(summaries.items()):
            base, tag = untagged(name)
            if base not in PAIRS:
                continue
            other = PAIRS[base] if tag is None else tagged(PAIRS[base], tag)
            theirs = summaries.get(other)
            if not mine or not theirs:
                continue
            rps = mine["rps_median"] / theirs["rps_median"]
            line = f"{name} / {other}: {rps:.2f}x req/s"
            if mine.get("cpu_us_per_request") and theirs.get("cpu_us_per_request"):
                cpu = theirs["cpu_us_per_request"] / mine["cpu_us_per_request"]
                line += f", {cpu:.2f}x by CPU per request"
            yield line
        for name, summary in sorted(summaries.items()):
            splits = summary.get("worker_splits")
            if not splits:
                continue
            yield (
                f"{name}: per worker by round: connections "
                + ", ".join(s["connections"] for s in splits)
                + "; requests "
                + ", ".join(s["requests"] for s in splits)
                + "; CPU s "
                + ", ".join(s["cpu_s"] for s in splits)
            )


# ---------------------------------------------------------------------------
# The servers.


def _key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def _redis_url(context: Context) -> str:
    url = context.env.get("BENCH_REDIS_URL")
    if not url:
        raise BenchError("no BENCH_REDIS_URL: the workers scenario's setup did not run")
    return url


def wait_for_workers(count: int, timeout: float = 90.0) -> Any:
    """
    A ``prepare`` hook: wait until the parent's log says ``count`` workers
    are ready, so warm-up and measurement never start with one of them
    still importing (the listening socket accepts as soon as the parent
    bound it).
    """

    def prepare(server: RunningServer) -> List[str]:
        if server.spec.logs_to is None or server.context is None:
            raise BenchError(f"{server.spec.name}: no log file to watch for ready workers")
        path = server.spec.logs_to(server.context)
        deadline = time.monotonic() + timeout
        ready: set = set()
        while time.monotonic() < deadline:
            if not server.alive():
                raise BenchError(f"{server.spec.name} exited:\n{server.output_tail()}")
            with contextlib.suppress(OSError):
                ready = set(READY.findall(path.read_text(errors="replace")))
            if len(ready) >= count:
                return []
            time.sleep(0.1)
        raise BenchError(
            f"{server.spec.name}: {len(ready)} of {count} workers ready after {timeout:g} s "
            f"(see {path})"
        )

    return prepare


def build(options: Any) -> Scenario:
    deployment_key = _key()
    cores = f"{options.server_core},{options.client_core}"
    twistauth_modules = ("twistauth.tap", "twistauth.app", "txredisapi")

    def twistauth(name: str, *extra: str) -> Any:
        return lambda c, port: twistd(
            c, f"{name}.log", "twistauth",
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            f"--session-cache={_redis_url(c)}", f"--user-store={_redis_url(c)}",
            "--method-cache=none", f"--deployment-key={deployment_key}", *extra,
        )  # fmt: skip

    def log_file(name: str) -> Any:
        return lambda c: c.workdir / f"{name}.log"

    def metrics_dir(name: str) -> Any:
        return lambda c, port: {METRICS_DIR_ENV: str(c.workdir / f"metrics-{name}")}

    def workers(name: str, count: int, label: str, default: bool = True) -> ServerSpec:
        return ServerSpec(
            name=name,
            label=label,
            command=twistauth(name, "--processes", str(count)),
            modules=(*twistauth_modules, "prometheus_client"),
            env=metrics_dir(name),
            prepare=wait_for_workers(count),
            logs_to=log_file(name),
            cores=cores,
            default=default,
        )

    servers = [
        ServerSpec(
            name=FLOOR,
            label="bare twisted.web, Site(parsePOSTFormSubmission=False) (floor)",
            command=lambda c, port: python_script(
                c, "twisted_web.py", "--port", str(port), "--tuned"
            ),
            modules=("twisted.web",),
        ),
        ServerSpec(
            name="twistauth",
            label="twistd -n twistauth (one process)",
            command=twistauth("twistauth"),
            modules=twistauth_modules,
            logs_to=log_file("twistauth"),
        ),
        ServerSpec(
            name="twistauth-processes-1",
            label="twistd -n twistauth --processes 1 (the same single process)",
            command=twistauth("twistauth-processes-1", "--processes", "1"),
            modules=twistauth_modules,
            logs_to=log_file("twistauth-processes-1"),
        ),
        ServerSpec(
            name="twistauth-cpus-0-1",
            label=f"twistd -n twistauth (one process) on CPUs {cores}",
            command=twistauth("twistauth-cpus-0-1"),
            modules=twistauth_modules,
            logs_to=log_file("twistauth-cpus-0-1"),
            cores=cores,
        ),
        ServerSpec(
            name=FLOOR_2,
            label="bare twisted.web, tuned Site, 2 processes sharing one socket",
            command=lambda c, port: python_script(
                c, "twisted_web_processes.py", "--port", str(port), "--processes", "2"
            ),
            modules=("twisted.web",),
            cores=cores,
        ),
        workers("twistauth-processes-2", 2, "twistd -n twistauth --processes 2 (two workers)"),
        workers(
            "twistauth-processes-3",
            3,
            "twistd -n twistauth --processes 3 (more workers than CPUs)",
            default=False,
        ),
    ]
    driver = api_driver(SplitWrkDriver, options, BODY, ANSWER)
    notes = SplitNotes(
        driver,
        [
            f"single processes run on CPU {options.server_core}; several processes (and "
            f"twistauth-cpus-0-1) on CPUs {cores}, sharing CPU {options.client_core} with wrk; "
            "CPUs used = the server's CPU time (all its processes) / the run's seconds, "
            "wrk CPUs likewise",
            "busiest worker = the median (and highest) share of the connections "
            "(halfway through each round), of the requests and of the CPU time that one "
            "worker took",
            "twistauth and twistauth-processes-1 run the same code: their difference "
            "is this run's noise",
        ]
    )
    return Scenario(
        name="workers",
        title="JSON-method echo, one twistauth process or several",
        servers=servers,
        floor=FLOOR,
        driver=driver,
        setup=redis_server,
        notes=notes,  # type: ignore[arg-type]
        columns=COLUMNS,
    )
