"""
One scenario under several interpreters at once (``bench/run.py --pythons
A,B`` or ``--compare-pypy``): every server is started once per interpreter
(named ``server@tag``: ``twistauth@cpython``, ``twistauth@pypy``), all of
them are measured in the same interleaved rounds, so a burst of load on the
machine hits both interpreters alike, and the results are printed side by
side, each interpreter's ratios against its own floor.

Each interpreter's servers keep their files in a directory of their own
(``WORKDIR/<tag>``), PyPy's warm up for longer (the JIT), and every server
gets ``PYPY_GC_NURSERY`` (4MB unless set: PyPy's default nursery let a
loaded server's memory grow on the VMs measured; CPython ignores it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchlib.harness import Context, Scenario, ServerSpec
from benchlib.report import rst_table, text_table

SEPARATOR = "@"


@dataclass
class Interpreter:
    """
    One interpreter of a comparison.

    :ivar tag: its short name in server names (``cpython``, ``pypy``).
    :ivar path: the interpreter's absolute path.
    :ivar pypy: whether it is PyPy.
    :ivar warmup: its servers' warm-up seconds.
    """

    tag: str
    path: str
    pypy: bool
    warmup: float


def tagged(name: str, tag: str) -> str:
    return f"{name}{SEPARATOR}{tag}"


def untagged(name: str) -> Tuple[str, Optional[str]]:
    """
    ``("twistauth", "pypy")`` for ``"twistauth@pypy"``; ``(name, None)`` untagged.
    """
    base, sep, tag = name.rpartition(SEPARATOR)
    return (base, tag) if sep else (name, None)


def tags_for(implementations: Sequence[str]) -> List[str]:
    """
    Short, distinct tags for interpreters of these implementations
    (``"CPython"``, ``"PyPy"``): ``cpython``, ``pypy``, then ``pypy2`` ...
    """
    tags: List[str] = []
    for implementation in implementations:
        tag = implementation.lower() or "python"
        n = 1
        while (tag if n == 1 else f"{tag}{n}") in tags:
            n += 1
        tags.append(tag if n == 1 else f"{tag}{n}")
    return tags


def _variant(spec: ServerSpec, interpreter: Interpreter) -> ServerSpec:
    def at(context: Context) -> Context:
        workdir = context.workdir / interpreter.tag
        workdir.mkdir(exist_ok=True)
        return dataclasses.replace(context, workdir=workdir)

    base_env = spec.env
    base_logs = spec.logs_to
    return dataclasses.replace(
        spec,
        name=tagged(spec.name, interpreter.tag),
        label=f"{spec.label} [{interpreter.tag}]",
        command=lambda c, port: spec.command(at(c), port),
        env=(lambda c, port: base_env(at(c), port)) if base_env is not None else None,
        logs_to=(lambda c: base_logs(at(c))) if base_logs is not None else None,
        python=interpreter.path,
        warmup=spec.warmup if spec.warmup is not None else interpreter.warmup,
    )


def expand(scenario: Scenario, interpreters: Sequence[Interpreter]) -> Scenario:
    """
    ``scenario`` with each server once per interpreter (interleaved:
    ``a@cpython, a@pypy, b@cpython ...``); the floor is the first
    interpreter's.
    """
    servers = [_variant(spec, i) for spec in scenario.servers for i in interpreters]
    return dataclasses.replace(
        scenario,
        servers=servers,
        floor=tagged(scenario.floor, interpreters[0].tag),
    )


def side_by_side(summary: Dict[str, Any], tags: Sequence[str], rst: bool = False) -> str:
    """
    One row per server, one group of columns per interpreter (req/s, CPU
    µs per request, ratio to that interpreter's floor, memory), then each
    other interpreter against the first: by req/s and by CPU per request.
    """
    servers: Dict[str, Dict[str, Any]] = summary["servers"]
    floor_base, _ = untagged(summary["floor"])
    by_base: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for name, s in servers.items():
        base, tag = untagged(name)
        if tag is not None and s:
            by_base.setdefault(base, {})[tag] = s
    floors = {t: (by_base.get(floor_base, {}).get(t) or {}).get("rps_median") for t in tags}
    first = tags[0]
    header: List[str] = ["server"]
    for t in tags:
        header += [f"{t} req/s", f"{t} CPU µs/req", f"{t} × floor", f"{t} RSS MB"]
    for t in tags[1:]:
        header += [f"{t}/{first} req/s", f"{t}/{first} CPU"]
    rows: List[Sequence[str]] = []
    order = sorted(by_base, key=lambda b: -(by_base[b].get(first, {}).get("rps_median") or 0))
    for base in order:
        row = [base]
        for t in tags:
            s = by_base[base].get(t) or {}
            if not s:
                row += ["-", "-", "-", "-"]
                continue
            cpu = s.get("cpu_us_per_request")
            rss = s.get("rss_bytes")
            row += [
                f"{s['rps_median']:,.0f}",
                f"{cpu:.0f}" if cpu else "-",
                f"{s['rps_median'] / floors[t]:.2f}" if floors.get(t) else "-",
                f"{rss / 1e6:.0f}" if rss else "-",
            ]
        mine = by_base[base].get(first) or {}
        for t in tags[1:]:
            other = by_base[base].get(t) or {}
            rps = (
                other["rps_median"] / mine["rps_median"]
                if other.get("rps_median") and mine.get("rps_median")
                else None
            )
            cpu_ratio = (
                mine["cpu_us_per_request"] / other["cpu_us_per_request"]
                if other.get("cpu_us_per_request") and mine.get("cpu_us_per_request")
                else None
            )
            row += [
                f"{rps:.2f}" if rps is not None else "-",
                f"{cpu_ratio:.2f}" if cpu_ratio is not None else "-",
            ]
        rows.append(row)
    table = (rst_table if rst else text_table)(header, rows)
    return "\n".join(
        [
            "Side by side (each × floor against the same interpreter's "
            f"{floor_base}; {'/'.join(tags[1:])}/{first} CPU = {first}'s CPU µs per "
            "request / the other's; RSS = all the server's processes at the end of the run):",
            "",
            table,
        ]
    )


def versions_line(tag: str, versions: Dict[str, Any]) -> str:
    return (
        f"{tag}: {versions.get('implementation', '?')} {versions.get('python', '?')}"
        + "".join(
            f", {k} {versions[k]}" for k in ("twisted", "klein", "aiohttp", "tornado") if k in versions
        )
    )
