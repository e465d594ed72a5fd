#!/usr/bin/env python3
"""
twistauth's benchmark harness: one command.

    python3 bench/run.py                 # the echo scenario, 5 rounds of 10 s (~8 min)
    python3 bench/run.py --quick         # a sanity run (~40 s)
    python3 bench/run.py --servers twistauth,twisted-web-tuned --reps 7
    python3 bench/run.py --python pypy3  # every server under PyPy
    python3 bench/run.py --compare-pypy  # CPython and PyPy, interleaved, side by side
    python3 bench/run.py --scenario workers  # 1 and 2 worker processes
    python3 bench/run.py --profile twistauth [--profiler cprofile]
    python3 bench/run.py --list

Each server runs as its own process on a free loopback port, pinned with
``taskset`` to one core; ``wrk`` is pinned to the other.  Servers are
measured round-robin (never all rounds of one server in a row), and every
server's median req/s is divided by the floor's median in the same run.
Results are printed and written as JSON to ``bench/results/``.
See docs/performance.rst.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import compare, report  # noqa: E402
from benchlib.harness import (  # noqa: E402
    BENCH,
    REPO,
    BenchError,
    Context,
    Plan,
    ServerSpec,
    log,
    missing_modules,
    require_tools,
    run_scenario,
)
from benchlib.profile import profile_server  # noqa: E402
from benchlib.scenarios import SCENARIOS  # noqa: E402


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark twistauth against bare Twisted and its peers.",
    )
    p.add_argument("--scenario", default="echo", choices=sorted(SCENARIOS), help="echo")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s, 1 s warm-up")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 10)")
    p.add_argument("--reps", type=int, help="interleaved rounds (default 5)")
    p.add_argument(
        "--warmup", type=float, help="warm-up seconds per server (default 5; 20 under PyPy)"
    )
    p.add_argument("--connections", type=int, default=50, help="wrk keep-alive connections (50)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    p.add_argument("--servers", help="comma-separated server names (default: the default set)")
    p.add_argument("--all", action="store_true", help="every server, not just the default set")
    p.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter the servers run under (this one; e.g. pypy3)",
    )
    p.add_argument(
        "--pythons",
        metavar="A,B",
        help="run every server under each of these interpreters, interleaved in the same "
        "rounds, and print them side by side (the first is the reference; 'pypy' names "
        ".venv-pypy/bin/python if present, else pypy3)",
    )
    p.add_argument(
        "--compare-pypy",
        action="store_true",
        help="the same as --pythons PYTHON,pypy (PYTHON: --python)",
    )
    p.add_argument("--server-core", type=int, default=0, help="CPU of the servers (0)")
    p.add_argument("--client-core", type=int, default=1, help="CPU of wrk (1)")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the servers and wrk (0; negative needs root, and with the "
        "kernel's autogroup scheduling only ranks them against this session's processes)",
    )
    p.add_argument(
        "--noise-limit",
        type=float,
        default=0.10,
        help="measure a sample again when other processes took, or a starved wrk left idle, "
        "more than this share of the server's core (0.10)",
    )
    p.add_argument("--retries", type=int, default=1, help="re-measurements per noisy sample (1)")
    p.add_argument("--rst", action="store_true", help="print the table as reST")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    p.add_argument("--results", type=Path, default=BENCH / "results", help="bench/results")
    p.add_argument("--list", action="store_true", help="list scenarios and servers, then exit")
    p.add_argument("--show", type=Path, metavar="JSON", help="print a saved result again, then exit")
    p.add_argument("--profile", metavar="SERVER", help="profile one server under load instead")
    p.add_argument("--profiler", default="py-spy", choices=("py-spy", "cprofile"), help="py-spy")
    return p.parse_args(argv)


PYPY_VENV = REPO / ".venv-pypy" / "bin" / "python"


def interpreter(python: str) -> str:
    """
    The interpreter's absolute path (servers run in a temporary directory).
    ``pypy`` names ``.venv-pypy/bin/python`` (``bash tests/pypy.sh`` or
    ``bash bench/setup.sh --pypy`` make it), else ``pypy3``.
    """
    if python == "pypy":
        python = str(PYPY_VENV) if os.access(PYPY_VENV, os.X_OK) else "pypy3"
    found = shutil.which(python)
    if found is None:
        raise BenchError(
            f"no interpreter {python!r}"
            + (" (bash bench/setup.sh --pypy makes .venv-pypy)" if "pypy" in python else "")
        )
    return os.path.abspath(found)


def implementation(python: str) -> str:
    done = subprocess.run(  # noqa: S603
        [python, "-c", "import platform; print(platform.python_implementation())"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip()


def is_pypy(python: str) -> bool:
    return implementation(python) == "PyPy"


def interpreters(options: argparse.Namespace) -> List[compare.Interpreter]:
    """
    The interpreters of ``--pythons`` / ``--compare-pypy`` (none without them).
    """
    names: List[str] = []
    if options.pythons:
        names = [n.strip() for n in options.pythons.split(",") if n.strip()]
    elif options.compare_pypy:
        names = [options.python, "pypy"]
    if not names:
        return []
    if len(names) < 2:
        raise BenchError("--pythons needs at least two interpreters")
    paths = [interpreter(n) for n in names]
    kinds = [implementation(p) for p in paths]
    tags = compare.tags_for(kinds)
    return [
        compare.Interpreter(tag=t, path=p, pypy=k == "PyPy", warmup=plan_from(options, k == "PyPy").warmup)
        for t, p, k in zip(tags, paths, kinds)
    ]


def plan_from(options: argparse.Namespace, pypy: bool) -> Plan:
    if options.quick:
        defaults = {"duration": 2.0, "reps": 1, "warmup": 1.0 if not pypy else 10.0}
    else:
        defaults = {"duration": 10.0, "reps": 5, "warmup": 5.0 if not pypy else 20.0}
    for key in defaults:
        value = getattr(options, key)
        if value is not None:
            defaults[key] = value
    if defaults["reps"] < 1 or defaults["duration"] < 1:
        raise BenchError("--reps must be >= 1 and --duration >= 1")
    return Plan(
        duration=defaults["duration"],
        reps=int(defaults["reps"]),
        warmup=defaults["warmup"],
        noise_limit=options.noise_limit,
        retries=options.retries,
    )


def main(argv: Optional[List[str]] = None) -> int:
    options = parse(argv)
    scenario = SCENARIOS[options.scenario](options)
    if options.list:
        for name, build in sorted(SCENARIOS.items()):
            s = build(options)
            print(f"{name}: {s.title} (floor: {s.floor})")
            for spec in s.servers:
                extra = "" if spec.default else "  [not in the default set]"
                print(f"  {spec.name:<34} {spec.label}{extra}")
        return 0
    if options.show:
        saved = json.loads(options.show.read_text())
        scenario = SCENARIOS[saved["scenario"]](options)
        print(report.render(scenario, saved["summary"], saved["machine"], saved["plan"],
                            rst=options.rst, when=saved["started"]))
        if saved.get("pythons"):
            print()
            print(compare.side_by_side(saved["summary"], [t for t, _ in saved["pythons"]],
                                       rst=options.rst))
        return 0
    require_tools("wrk", "taskset")
    several = [] if options.profile else interpreters(options)
    python = several[0].path if several else interpreter(options.python)
    pypy = is_pypy(python)
    plan = plan_from(options, pypy)
    specs: List[ServerSpec] = [s for s in scenario.servers if s.default or options.all]
    if options.servers:
        wanted = [n.strip() for n in options.servers.split(",") if n.strip()]
        specs = [scenario.server(n) for n in wanted]
        if scenario.floor not in wanted and not options.profile:
            specs.insert(0, scenario.server(scenario.floor))
    if several:
        scenario = compare.expand(scenario, several)
        specs = [scenario.server(compare.tagged(s.name, i.tag)) for s in specs for i in several]
    with tempfile.TemporaryDirectory(prefix="twistauth-bench-") as tmp:
        context = Context(
            python=python,
            workdir=Path(tmp),
            env={},
            server_core=options.server_core,
            client_core=options.client_core,
            nice=options.nice,
        )
        if pypy or any(i.pypy for i in several):
            # What the issue measured: PyPy's default nursery let a loaded
            # server's memory grow on these VMs; CPython ignores it.
            context.env["PYPY_GC_NURSERY"] = os.environ.get("PYPY_GC_NURSERY") or "4MB"
        setup = scenario.setup(context) if scenario.setup else None
        with setup if setup is not None else contextlib.nullcontext():
            if options.profile:
                print(
                    profile_server(
                        scenario, options.profile, context, plan, options.profiler, options.results
                    )
                )
                return 0
            skipped: Dict[str, str] = {}
            for spec in list(specs):
                why = missing_modules(spec.python or python, spec.modules, context)
                if why is not None:
                    skipped[spec.name] = why
                    specs.remove(spec)
                    log(f"skipping {spec.name}: {why}")
            if scenario.floor in skipped:
                raise BenchError(f"the floor {scenario.floor} cannot run: {skipped[scenario.floor]}")
            warmups = [plan.warmup if s.warmup is None else s.warmup for s in specs]
            estimate = sum(warmups) + len(specs) * plan.settle + len(specs) * plan.reps * (
                plan.duration + plan.settle
            )
            log(
                f"{scenario.title}: {len(specs)} servers, {plan.reps} rounds of "
                f"{plan.duration:g} s, warm-up {'/'.join(f'{w:g}' for w in sorted(set(warmups)))}"
                f" s: about {estimate / 60:.1f} min"
            )
            info = report.machine(context)
            if several:
                info["pythons"] = {
                    i.tag: report.machine(dataclasses.replace(context, python=i.path))["versions"]
                    for i in several
                }
                if context.env.get("PYPY_GC_NURSERY"):
                    info["env"] = {"PYPY_GC_NURSERY": context.env["PYPY_GC_NURSERY"]}
            started_at = time.time()
            measured = run_scenario(scenario, specs, context, plan)
            skipped.update(measured["failed"])
            summary = report.summarize(scenario, measured, skipped)
    plan_doc: Dict[str, Any] = {
        "duration": plan.duration,
        "reps": plan.reps,
        "warmup": plan.warmup,
        "connections": options.connections,
        "threads": options.threads,
        "nice": options.nice,
        "noise_limit": plan.noise_limit,
        "retries_used": measured["retries"],
    }
    if several:
        plan_doc["warmup_by_python"] = {i.tag: i.warmup for i in several}
    print(report.render(scenario, summary, info, plan_doc, rst=options.rst))
    if several:
        print()
        print(compare.side_by_side(summary, [i.tag for i in several], rst=options.rst))
        for i in several:
            print(compare.versions_line(i.tag, info["pythons"].get(i.tag, {})) + f" ({i.path})")
        if info.get("env"):
            print("servers ran with " + ", ".join(f"{k}={v}" for k, v in info["env"].items()))
    if not options.no_save:
        suffix = "-" + "-".join(i.tag for i in several) if several else ("-pypy" if pypy else "")
        path = report.write_json(
            options.results,
            scenario.name + suffix,
            {
                "scenario": scenario.name,
                "title": scenario.title,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
                "elapsed_s": round(time.time() - started_at, 1),
                "plan": plan_doc,
                "machine": info,
                "labels": {s.name: s.label for s in scenario.servers},
                "summary": summary,
                "samples": measured["samples"],
                "warmup": measured["warmup"],
                **({"pythons": [[i.tag, i.path] for i in several]} if several else {}),
            },
        )
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
