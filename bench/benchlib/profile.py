"""
Profiling one server under load: ``py-spy`` (sampling, attaches to the
running process; ``pip install py-spy``) or cProfile (``twistd --profile``
for twistd servers, ``python -m cProfile`` for the others).  Both print
where the server's CPU time goes.
"""

from __future__ import annotations

import collections
import io
import pstats
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Dict, List, Tuple

from benchlib.harness import (
    BenchError,
    Context,
    Plan,
    RunningServer,
    Scenario,
    log,
    pin,
    started,
)

_WAITING = re.compile(r"^(Condition\.wait|Event\.wait|Queue\.get|Thread\.join) \((threading|queue)\.py\)$")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _frame_keys(frame: str) -> Tuple[str, str]:
    """
    ``(function key, line key)`` of one py-spy frame ``func (file:line)``.
    """
    m = _FRAME.match(frame)
    if not m:
        return frame, frame
    where = _short(m.group("file"))
    func = f"{m.group('func')} ({where})"
    line = f"{where}:{m.group('line')} {m.group('func')}" if m.group("line") else func
    return func, line


def summarize_collapsed(text: str, top: int = 30) -> str:
    """
    Self and inclusive time by function, and self time by line, from
    py-spy's collapsed-stack ("raw") output.
    """
    self_func: Dict[str, int] = collections.Counter()
    self_line: Dict[str, int] = collections.Counter()
    inclusive: Dict[str, int] = collections.Counter()
    total = 0
    waiting = 0
    for row in text.splitlines():
        stack, _, count_text = row.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_keys(f) for f in stack.split(";") if f]
        if not frames:
            continue
        if _WAITING.search(frames[-1][0]):
            # an idle worker thread (a thread pool waiting for work): py-spy
            # cannot always tell it is idle, and it is not CPU time
            waiting += count
            continue
        total += count
        self_func[frames[-1][0]] += count
        self_line[frames[-1][1]] += count
        for func in {f for f, _ in frames}:
            inclusive[func] += count
    if not total:
        return "py-spy collected no samples"

    def block(title: str, counter: Dict[str, int]) -> List[str]:
        out = [f"{title} (% of {total} samples)"]
        for key, count in sorted(counter.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"{100 * count / total:6.1f}%  {key}")
        return out + [""]

    head = (
        [f"left out {waiting} samples of idle threads waiting for work", ""] if waiting else []
    )
    return "\n".join(
        head
        + block("inclusive time by function", inclusive)
        + block("self time by function", self_func)
        + block("self time by line", self_line)
    )


def _drive(scenario: Scenario, server: RunningServer, seconds: float, out: Dict[str, Any]) -> None:
    out["sample"] = scenario.driver.measure(server, seconds)


def profile_server(
    scenario: Scenario, name: str, context: Context, plan: Plan, profiler: str, out_dir: Path
) -> str:
    """
    Load server ``name`` while profiling it; answer the printed profile.
    The raw profile is kept in ``out_dir``.
    """
    spec = scenario.server(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    if profiler == "py-spy":
        if shutil.which("py-spy") is None:
            raise BenchError("py-spy is not installed: pip install py-spy")
        raw = out_dir / f"{scenario.name}-{name}-py-spy.txt"
        with started(scenario, [spec], context, plan) as running:
            server = running[name]
            log(f"warming up {name} for {plan.warmup:g} s")
            scenario.driver.measure(server, plan.warmup)
            result: Dict[str, Any] = {}
            load = threading.Thread(
                target=_drive, args=(scenario, server, plan.duration + 2, result)
            )
            load.start()
            log(f"py-spy on {name} for {plan.duration:g} s")
            spy = subprocess.run(  # noqa: S603
                [
                    *pin(context.client_core, context.nice),
                    "py-spy", "record", "--pid", str(server.process.pid),
                    "--duration", str(int(plan.duration)), "--rate", "200",
                    "--format", "raw", "--output", str(raw),
                ],  # fmt: skip
                capture_output=True,
                text=True,
                check=False,
            )
            load.join()
        if spy.returncode != 0 or not raw.exists():
            raise BenchError(f"py-spy failed: {spy.stderr.strip()}")
        rps = result.get("sample", {}).get("rps", 0)
        return (
            f"{name} under py-spy: {rps:,.0f} req/s while sampled; raw stacks in {raw}\n\n"
            + summarize_collapsed(raw.read_text())
        )
    if profiler == "cprofile":
        stats_path = out_dir / f"{scenario.name}-{name}.pstats"
        context.profile = ("cprofile", stats_path)
        with started(scenario, [spec], context, plan) as running:
            server = running[name]
            scenario.driver.measure(server, plan.warmup)
            sample = scenario.driver.measure(server, plan.duration)
        # leaving `started` stopped the server with SIGINT: the stats are written
        context.profile = None
        if not stats_path.exists():
            raise BenchError(f"no profile written to {stats_path}")
        buffer = io.StringIO()
        stats = pstats.Stats(str(stats_path), stream=buffer)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        return (
            f"{name} under cProfile: {sample['rps']:,.0f} req/s while profiled "
            f"(cProfile inflates function-call overhead); stats in {stats_path}\n"
            + buffer.getvalue()
        )
    raise BenchError(f"unknown profiler {profiler!r}: py-spy or cprofile")
