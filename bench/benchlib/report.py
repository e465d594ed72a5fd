"""
Results: the summary per server, its ratio to the floor, the printed table
(plain text or reST), the machine note, and the JSON file.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from benchlib.harness import REPO, Context, Scenario, server_env

_VERSIONS = """
import json, platform, sys
out = {"implementation": platform.python_implementation(), "python": platform.python_version()}
for name in ("twisted", "klein", "aiohttp", "tornado"):
    try:
        module = __import__(name)
        out[name] = getattr(module, "__version__", None) or getattr(module, "version", "?")
    except Exception:
        pass
print(json.dumps(out))
"""


def machine(context: Context) -> Dict[str, Any]:
    """
    What the numbers were measured on.
    """
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: Dict[str, Any] = {}
    try:
        done = subprocess.run(  # noqa: S603
            [context.python, "-c", _VERSIONS],
            env=server_env(context),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        versions = json.loads(done.stdout)
        versions = {k: str(v) for k, v in versions.items()}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    tree: Dict[str, Any] = {}
    try:
        head = subprocess.run(  # noqa: S603
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],  # noqa: S607
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        changed = subprocess.run(  # noqa: S603
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "twistauth"],  # noqa: S607
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        tree = {"commit": head, "twistauth_changed_since": bool(changed)}
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "tree": tree,
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "server_core": context.server_core,
        "client_core": context.client_core,
        "server_python": context.python,
        "versions": versions,
    }


def summarize(
    scenario: Scenario, measured: Dict[str, Any], skipped: Dict[str, str]
) -> Dict[str, Any]:
    """
    Each server's summary and its ratio to the floor's median.
    """
    samples: Dict[str, List[Dict[str, Any]]] = measured["samples"]
    summaries = {name: scenario.driver.summarize(s) for name, s in samples.items()}
    floor = summaries.get(scenario.floor, {}).get("rps_median")
    floor_by_round = {s["round"]: s["rps"] for s in samples.get(scenario.floor, [])}
    for name, summary in summaries.items():
        if not summary:
            continue
        warm = measured["warmup"].get(name) or {}
        summary["requests_total"] = sum(s["requests"] for s in samples[name]) + warm.get(
            "requests", 0
        )
        summary["log_bytes"] = measured["log_bytes"].get(name)
        summary["rss_bytes"] = measured["rss_bytes"].get(name)
        noise = [x["noise"]["max"] for x in samples[name] if "noise" in x]
        if noise:
            summary["other_load_median"] = statistics.median(noise)
            summary["noisy_samples"] = sum(1 for x in samples[name] if x.get("noisy"))
        if not floor:
            continue
        summary["ratio"] = summary["rps_median"] / floor
        floor_cpu = summaries[scenario.floor].get("cpu_us_per_request")
        if floor_cpu and summary.get("cpu_us_per_request"):
            summary["cpu_ratio"] = floor_cpu / summary["cpu_us_per_request"]
        per_round = [
            s["rps"] / floor_by_round[s["round"]]
            for s in samples[name]
            if floor_by_round.get(s["round"])
        ]
        if per_round:
            summary["ratio_by_round_median"] = statistics.median(per_round)
            summary["ratio_by_round_min"] = min(per_round)
            summary["ratio_by_round_max"] = max(per_round)
    return {"servers": summaries, "skipped": skipped, "floor": scenario.floor}


COLUMNS = (
    "server", "req/s", "min–max", "p50 ms", "p99 ms", "CPU µs/req", "× floor", "× floor CPU",
    "other load",
)  # fmt: skip


def columns(scenario: Scenario) -> Sequence[str]:
    """
    The table's headers: the fixed ones, then the scenario's own.
    """
    return (*COLUMNS, *(header for header, _ in scenario.columns))


def rows(scenario: Scenario, summary: Dict[str, Any]) -> List[Sequence[str]]:
    out: List[Sequence[str]] = []
    servers = summary["servers"]
    ordered = sorted(
        (n for n in servers if servers[n]),
        key=lambda n: -servers[n]["rps_median"],
    )
    for name in ordered:
        s = servers[name]
        cpu = s.get("cpu_us_per_request")
        ratio = s.get("ratio")
        cpu_ratio = s.get("cpu_ratio")
        out.append(
            (
                name,
                f"{s['rps_median']:,.0f}",
                f"{s['rps_min']:,.0f}–{s['rps_max']:,.0f}",
                f"{s['p50_ms']:.2f}",
                f"{s['p99_ms']:.2f}",
                f"{cpu:.0f}" if cpu else "-",
                f"{ratio:.2f}" if ratio is not None else "-",
                f"{cpu_ratio:.2f}" if cpu_ratio is not None else "-",
                f"{100 * s['other_load_median']:.0f}%" if "other_load_median" in s else "-",
                *(cell(s) for _, cell in scenario.columns),
            )
        )
    return out


def text_table(header: Sequence[str], body: List[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(r) for r in body])


def rst_table(header: Sequence[str], body: List[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    rule = " ".join("=" * w for w in widths)

    def line(r: Sequence[str]) -> str:
        return " ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    return "\n".join([rule, line(header), rule] + [line(r) for r in body] + [rule])


def render(
    scenario: Scenario,
    summary: Dict[str, Any],
    info: Dict[str, Any],
    plan: Dict[str, Any],
    rst: bool = False,
    when: Optional[str] = None,
) -> str:
    body = rows(scenario, summary)
    table = (rst_table if rst else text_table)(columns(scenario), body)
    versions = info.get("versions", {})
    lines = [
        f"{scenario.title}: {plan['reps']} interleaved rounds of {plan['duration']:g} s, "
        f"{plan['connections']} keep-alive connections, wrk {plan['threads']} thread(s) "
        f"({_placement(scenario, info)}, nice {plan.get('nice', 0)})",
        f"{when or time.strftime('%Y-%m-%d %H:%M %Z')}; {info['cpu']}, {info['cpus']} CPUs; "
        + (
            f"tree {info['tree']['commit']}"
            + ("+changes" if info["tree"].get("twistauth_changed_since") else "")
            + "; "
            if info.get("tree")
            else ""
        )
        + f"{versions.get('implementation', '?')} {versions.get('python', '?')}, "
        + ", ".join(
            f"{k} {versions[k]}" for k in ("twisted", "klein", "aiohttp", "tornado") if k in versions
        ),
        "",
        table,
        "",
        f"× floor = median req/s / median req/s of {summary['floor']} in this run; "
        "× floor CPU = the floor's server CPU µs per request / this one's "
        "(less sensitive to other load on the machine); other load = median share of "
        "the server's core that other processes took or the server left idle.",
    ]
    if any(s.cores is not None for s in scenario.servers):
        lines.append(
            "A server on several CPUs shares them with wrk: its other load is what other "
            "processes took of those CPUs (in shares of one CPU); idle time is not counted."
        )
    for name, why in summary["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    noisy = {
        n: s["noisy_samples"] for n, s in summary["servers"].items() if s and s.get("noisy_samples")
    }
    if noisy:
        lines.append(
            "WARNING: samples where other processes took (or a starved wrk left idle) over "
            f"{100 * plan.get('noise_limit', 0.1):.0f}% of the server's core: "
            + ", ".join(f"{n} {k}/{plan['reps']}" for n, k in noisy.items())
            + "; prefer the CPU ratio, or run again on a quiet machine"
        )
    for name, s in summary["servers"].items():
        if s and s.get("failed"):
            lines.append(f"WARNING: {name} had {s['failed']} failed requests (errors or non-2xx)")
    for name, s in summary["servers"].items():
        if s and s.get("log_bytes"):
            per = s["log_bytes"] / max(1, s.get("requests_total", 0))
            lines.append(
                f"{name} wrote {s['log_bytes'] / 1e6:.1f} MB of log ({per:.0f} bytes a request)"
            )
    lines += [f"note: {n}" for n in scenario.notes]
    return "\n".join(lines)


def _placement(scenario: Scenario, info: Dict[str, Any]) -> str:
    spread = sorted({s.cores for s in scenario.servers if s.cores is not None})
    where = f"server on CPU {info['server_core']}"
    if spread:
        where += f" (some on CPUs {' or '.join(spread)})"
    return f"{where}, wrk on CPU {info['client_core']}"


def write_json(directory: Path, name: str, document: Dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = directory / f"{name}-{stamp}.json"
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path

