"""
Processes and the measurement loop.

A `Scenario` names its servers (`ServerSpec`), which one is the floor the
others are compared to, and a `Driver` that loads a server and measures it.
`run_scenario` starts every server at once, each pinned to the server core
(idle servers cost nothing), checks that each answers correctly, warms each
up, then measures them round-robin for ``reps`` rounds, starting each round
one server further along so no server always follows the same one.

Adding a scenario (session caches, long-poll) means a new module in
``benchlib.scenarios`` that builds a `Scenario`: its own servers, and either
the `benchlib.wrk.WrkDriver` with its own request or a driver of its own.
A server that needs something running first (a redis-server) gets it from
the scenario's ``setup`` context manager, which may add environment
variables through `Context.env`.

A server may also span several CPUs (`ServerSpec.cores`: several worker
processes), run under an interpreter of its own (`ServerSpec.python`: the
CPython/PyPy comparison) and warm up for longer (`ServerSpec.warmup`).  A
server's CPU time and memory are those of its whole process tree (a
``--processes N`` parent and its workers).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
SERVERS = BENCH / "servers"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """
    Something the harness cannot go on from: the message says what.
    """


@dataclass
class Context:
    """
    What a server command is built from.

    :ivar python: the interpreter every server runs under.
    :ivar workdir: a temporary directory for logs, pid and data files.
    :ivar env: environment variables every server gets (a scenario's
        ``setup`` may add to it, e.g. a Redis URL).
    :ivar server_core: the CPU every server is pinned to.
    :ivar client_core: the CPU the load generator is pinned to.
    :ivar nice: the niceness servers and the load generator run at
        (negative, when root, so other work on the machine disturbs less).
    :ivar profile: ``None``, or ``(kind, output path)`` when a server is
        started for profiling with ``kind`` ``"cprofile"``.
    """

    python: str
    workdir: Path
    env: Dict[str, str]
    server_core: int
    client_core: int
    nice: int = 0
    profile: Optional[Any] = None


def pin(core: Union[int, str], nice: int = 0) -> List[str]:
    """
    The argv prefix that runs a command on CPU ``core`` (or a ``taskset``
    CPU list such as ``"0,1"``) at niceness ``nice``.
    """
    prefix = ["nice", "-n", str(nice)] if nice else []
    return prefix + ["taskset", "-c", str(core)]


def cpu_list(text: Union[int, str]) -> List[int]:
    """
    The CPUs of a ``taskset`` list: ``"0,1"``, ``"0-3"``, ``"0,2-3"`` or one number.
    """
    cores: List[int] = []
    for part in str(text).split(","):
        first, _, last = part.strip().partition("-")
        cores.extend(range(int(first), int(last or first) + 1))
    return sorted(set(cores))


@dataclass
class ServerSpec:
    """
    One server of a scenario.

    :ivar name: short id, used on the command line and in the JSON.
    :ivar label: what it is, for the table.
    :ivar command: ``command(context, port)`` → the argv (without taskset).
    :ivar modules: modules the interpreter must import for this server;
        when one is missing the server is skipped with a note.
    :ivar prepare: optional ``prepare(running_server)`` called once after
        the server answers; returns extra driver arguments (for example
        the header of a session made by logging in).
    :ivar logs_to: a file the server writes its log to, measured at the end.
    :ivar env: optional ``env(context, port)`` → extra environment variables.
    :ivar default: run without ``--servers``/``--all``; ``False`` for
        servers that answer a narrower question.
    :ivar cores: a ``taskset`` CPU list (``"0,1"``) for a server of several
        processes; ``None``: `Context.server_core`.
    :ivar python: the interpreter this server runs under; ``None``:
        `Context.python`.
    :ivar warmup: this server's warm-up seconds; ``None``: the plan's.
    """

    name: str
    label: str
    command: Callable[[Context, int], List[str]]
    modules: Sequence[str] = ()
    env: Optional[Callable[[Context, int], Dict[str, str]]] = None
    prepare: Optional[Callable[[RunningServer], List[str]]] = None
    logs_to: Optional[Callable[[Context], Path]] = None
    default: bool = True
    cores: Optional[str] = None
    python: Optional[str] = None
    warmup: Optional[float] = None

    def context(self, context: Context) -> Context:
        """
        ``context`` as this server sees it (its own interpreter, if any).
        """
        if self.python is None or self.python == context.python:
            return context
        return replace(context, python=self.python)


class Driver(Protocol):
    """
    Loads one running server and measures it.
    """

    def check(self, server: RunningServer) -> None:
        """
        Raise `BenchError` unless the server answers correctly.
        """

    def measure(self, server: RunningServer, seconds: float) -> Dict[str, Any]:
        """
        Load the server for ``seconds`` and answer the sample's metrics.
        """

    def summarize(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        """
        Reduce one server's samples to the numbers the table shows.
        """


@dataclass
class Scenario:
    """
    A set of servers doing the same work, one of them the floor.
    """

    name: str
    title: str
    servers: List[ServerSpec]
    floor: str
    driver: Driver
    setup: Optional[Callable[[Context], Any]] = None
    notes: List[str] = field(default_factory=list)
    columns: List[Tuple[str, Callable[[Dict[str, Any]], str]]] = field(default_factory=list)
    """Extra table columns: ``(header, cell(server summary) -> text)``."""

    def server(self, name: str) -> ServerSpec:
        for spec in self.servers:
            if spec.name == name:
                return spec
        raise BenchError(
            f"scenario {self.name!r} has no server {name!r}; it has: "
            + ", ".join(s.name for s in self.servers)
        )


@dataclass
class RunningServer:
    """
    A server process started by `start_server`.
    """

    spec: ServerSpec
    port: int
    process: subprocess.Popen[bytes]
    output: Path
    extra: List[str] = field(default_factory=list)
    context: Optional[Context] = None
    """The context the server was started with (its interpreter)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> List[int]:
        """
        The server's process and its live descendants (worker processes).
        """
        return process_tree(self.process.pid)

    def cpu_seconds(self) -> float:
        """
        User plus system CPU time the process and its live descendants (all
        their threads) used so far.
        """
        return sum(process_cpu_seconds(pid) for pid in self.pids())

    def rss_bytes(self) -> int:
        """
        Resident memory of the process and its live descendants.
        """
        return sum(process_rss_bytes(pid) for pid in self.pids())

    def output_tail(self, lines: int = 20) -> str:
        try:
            text = self.output.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """
        Stop it as a user would (SIGINT: every server here shuts down
        cleanly on it, and profilers write their output), then kill it.
        """
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def process_cpu_seconds(pid: int) -> float:
    """
    User plus system CPU seconds of one live process; 0 if it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_tree(pid: int) -> List[int]:
    """
    ``pid`` and every live descendant of it, parents before children.
    """
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out = [pid]
    for parent in out:
        out.extend(sorted(children.get(parent, ())))
    return out


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchError(
                f"{server.spec.name} exited with {server.process.returncode} before "
                f"listening:\n{server.output_tail()}"
            )
        with contextlib.suppress(OSError), socket.create_connection(
            ("127.0.0.1", server.port), timeout=1
        ):
            return
        time.sleep(0.05)
    raise BenchError(
        f"{server.spec.name} did not listen on {server.port} within {timeout:.0f} s:\n"
        f"{server.output_tail()}"
    )


def server_env(context: Context) -> Dict[str, str]:
    """
    The environment servers run with: this process's, without settings
    that would change what twistauth does, with the work tree first on the
    path so the code measured is the code here.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWISTAUTH_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.update(context.env)
    return env


def _default_sigint() -> None:
    """
    Give the child the default SIGINT handling: a shell starting the
    harness in the background passes SIGINT on as ignored, and Python and
    Twisted then never handle it, so `RunningServer.stop` could not stop
    a server cleanly (nor could profilers write their output).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_server(spec: ServerSpec, context: Context, start_timeout: float) -> RunningServer:
    """
    Start ``spec`` on a free loopback port, pinned to the server core (or
    to its own `ServerSpec.cores`), and wait until it accepts connections.
    """
    port = free_port()
    output = context.workdir / f"{spec.name}.out"
    context = spec.context(context)
    cores = spec.cores if spec.cores is not None else context.server_core
    argv = pin(cores, context.nice) + spec.command(context, port)
    with open(output, "wb") as out:
        process = subprocess.Popen(  # noqa: S603 - our own argv
            argv,
            cwd=context.workdir,
            env={**server_env(context), **(spec.env(context, port) if spec.env else {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_default_sigint,
        )
    server = RunningServer(spec=spec, port=port, process=process, output=output, context=context)
    try:
        wait_for_port(server, start_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def missing_modules(python: str, modules: Sequence[str], context: Context) -> Optional[str]:
    """
    ``None`` if ``python`` imports every module, else the error.
    """
    if not modules:
        return None
    done = subprocess.run(  # noqa: S603
        [python, "-c", "import " + ", ".join(modules)],
        env=server_env(context),
        cwd=context.workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BenchError(
            f"missing {', '.join(missing)}: run 'bash bench/setup.sh' (installs wrk, "
            "aiohttp and tornado)"
        )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Plan:
    """
    How long and how often to measure.
    """

    duration: float
    reps: int
    warmup: float
    settle: float = 0.5
    start_timeout: float = 60.0
    noise_limit: float = 0.10
    retries: int = 1
    retry_budget: Optional[int] = None


@contextlib.contextmanager
def started(
    scenario: Scenario,
    specs: Sequence[ServerSpec],
    context: Context,
    plan: Plan,
    failures: Optional[Dict[str, str]] = None,
) -> Iterator[Dict[str, RunningServer]]:
    """
    Start ``specs``, check each answers correctly and run its ``prepare``;
    stop them all on the way out.

    :param failures: if given, a server other than the floor that fails to
        start or answers wrongly is left out and its error recorded here,
        instead of ending the run.
    """
    running: Dict[str, RunningServer] = {}
    try:
        for spec in specs:
            log(f"starting {spec.name} ...")
            try:
                server = start_server(spec, context, plan.start_timeout)
                running[spec.name] = server
                if spec.prepare is not None:
                    server.extra = spec.prepare(server)
                scenario.driver.check(server)
            except BenchError as e:
                if failures is None or spec.name == scenario.floor:
                    raise
                log(f"leaving out {spec.name}: {e}")
                failures[spec.name] = str(e).splitlines()[0] + " (see its output above)"
                failed = running.pop(spec.name, None)
                if failed is not None:
                    failed.stop()
        yield running
    finally:
        for server in running.values():
            server.stop()


def run_scenario(
    scenario: Scenario,
    specs: Sequence[ServerSpec],
    context: Context,
    plan: Plan,
) -> Dict[str, Any]:
    """
    Measure ``specs`` interleaved and answer every sample, by server name.

    A sample for which more than ``plan.noise_limit`` of the server's core
    was taken by other processes or left idle (see `measure_with_noise`) is
    measured again (up to ``plan.retries`` times, and ``plan.retry_budget``
    times in all, by default half the number of servers); the quietest
    attempt is kept, and marked ``noisy`` if it was still over.

    :return: ``{"samples": {name: [sample, ...]}, "warmup": {...},
        "log_bytes": {...}, "rss_bytes": {...}, "retries": N,
        "failed": {name: why}}``
    """
    budget = plan.retry_budget
    if budget is None:
        budget = max(1, len(specs) // 2)
    retried = 0
    failures: Dict[str, str] = {}
    warm: Dict[str, Dict[str, Any]] = {}
    with started(scenario, specs, context, plan, failures) as running:
        order = [s for s in specs if s.name in running]
        samples: Dict[str, List[Dict[str, Any]]] = {s.name: [] for s in order}
        for spec in order:
            seconds = plan.warmup if spec.warmup is None else spec.warmup
            log(f"warming up {spec.name} for {seconds:g} s")
            warm[spec.name] = scenario.driver.measure(running[spec.name], seconds)
            time.sleep(plan.settle)
        for rep in range(plan.reps):
            shift = rep % len(order)
            for spec in order[shift:] + order[:shift]:
                server = running[spec.name]
                if not server.alive():
                    raise BenchError(f"{spec.name} died:\n{server.output_tail()}")
                sample: Dict[str, Any] = {}
                for attempt in range(1 + plan.retries):
                    if attempt:
                        retried += 1
                        log(
                            f"  {spec.name}: {100 * sample['noise']['max']:.0f}% of its core "
                            "taken by other processes or left idle; measuring again"
                        )
                        time.sleep(plan.settle)
                    got = measure_with_noise(scenario.driver, server, plan.duration, context)
                    if not sample or got["noise"]["max"] < sample["noise"]["max"]:
                        sample = got
                    sample["attempts"] = attempt + 1
                    if sample["noise"]["max"] <= plan.noise_limit or retried >= budget:
                        break
                sample["noisy"] = sample["noise"]["max"] > plan.noise_limit
                sample["round"] = rep + 1
                samples[spec.name].append(sample)
                log(
                    f"round {rep + 1}/{plan.reps} {spec.name:<24} "
                    f"{sample.get('rps', 0):9.0f} req/s"
                    + f"  other load {100 * sample['noise']['max']:3.0f}%"
                    + (f"  ({sample['failed']} failed)" if sample.get("failed") else "")
                )
                time.sleep(plan.settle)
        rss = {name: server.rss_bytes() for name, server in running.items()}
        log_bytes: Dict[str, int] = {}
        for spec in order:
            if spec.logs_to is not None:
                path = spec.logs_to(spec.context(context))
                log_bytes[spec.name] = sum(
                    p.stat().st_size for p in path.parent.glob(path.name + "*")
                )
    return {
        "samples": samples,
        "warmup": warm,
        "rss_bytes": rss,
        "log_bytes": log_bytes,
        "retries": retried,
        "failed": failures,
    }


def core_times() -> Dict[int, Tuple[int, int]]:
    """
    Busy and total clock ticks of each CPU so far, from ``/proc/stat``
    (busy counts steal time: a hypervisor running someone else).
    """
    out: Dict[int, Tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                parts = line.split()
                v = [int(x) for x in parts[1:9]]
                user, nice, system, idle, iowait, irq, softirq, steal = v
                busy = user + nice + system + irq + softirq + steal
                out[int(parts[0][3:])] = (busy, busy + idle + iowait)
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_with_noise(
    driver: Driver, server: RunningServer, seconds: float, context: Context
) -> Dict[str, Any]:
    """
    ``driver.measure``, plus how much of each pinned core something other
    than the server (on the server core) or the load generator (on the
    client core) used meanwhile: ``sample["noise"]``, as shares of a core.
    ``noise["max"]`` is what decides whether a sample is noisy: the share of
    the server core others took, or the share of it the server left idle.

    A server on several cores (`ServerSpec.cores`, usually including the
    client core) shares them with the load generator: its noise is what
    other processes took of those cores (in shares of one core), and being
    left idle is not counted (a single worker cannot use two cores).  The
    sample then also says how much CPU the server and the load generator
    used (``server_cores_used``, ``client_cores_used``, in cores).
    """
    before = core_times()
    server_before = server.cpu_seconds()
    client_before = _children_cpu()
    started_at = time.monotonic()
    sample = driver.measure(server, seconds)
    after = core_times()
    server_cpu = server.cpu_seconds() - server_before
    client_cpu = _children_cpu() - client_before
    cores = cpu_list(server.spec.cores) if server.spec.cores is not None else None
    if cores is not None and len(cores) > 1:
        wall = max(1e-9, time.monotonic() - started_at)
        shared = sorted(set(cores) | {context.client_core})
        busy = sum(after[c][0] - before[c][0] for c in shared) / CLOCK_TICKS
        per_core = sum(after[c][1] - before[c][1] for c in shared) / CLOCK_TICKS / len(shared)
        others = max(0.0, busy - server_cpu - client_cpu)
        share = others / per_core if per_core > 0 else 0.0
        ran = sample.get("seconds") or wall
        sample["noise"] = {"server_cores": share, "max": share}
        sample["server_cores_used"] = sample.get("server_cpu_share", server_cpu / ran)
        sample["client_cores_used"] = client_cpu / ran
        return sample

    def foreign(core: int, ours: float) -> float:
        busy = (after[core][0] - before[core][0]) / CLOCK_TICKS
        total = (after[core][1] - before[core][1]) / CLOCK_TICKS
        return max(0.0, busy - ours) / total if total > 0 else 0.0

    ran = sample.get("seconds") or seconds
    sample.setdefault("server_cores_used", server_cpu / ran)
    sample["client_cores_used"] = client_cpu / ran
    noise = {
        "server_core": foreign(context.server_core, server_cpu),
        "client_core": foreign(context.client_core, client_cpu),
    }
    # What disturbs a saturated server: other processes on its core, or
    # a load generator starved on its own (the server then idles).  Other
    # load on the client core alone is harmless while wrk keeps up.
    disturbed = [noise["server_core"]]
    if "server_cpu_share" in sample:
        noise["server_idle"] = max(0.0, 1.0 - sample["server_cpu_share"])
        disturbed.append(noise["server_idle"])
    noise["max"] = max(disturbed)
    sample["noise"] = noise
    return sample
