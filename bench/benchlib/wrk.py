"""
The load generator: ``wrk`` with keep-alive connections, pinned to the
client core, driven by ``bench/request.lua`` (one fixed request; exact
counts and latency percentiles printed as JSON at the end).
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from benchlib.harness import BENCH, BenchError, RunningServer, pin

LUA = BENCH / "request.lua"
FOLLOW = "follow"
"""A "header" ``follow: Name`` tells ``request.lua`` to keep sending the
newest value of the response header Name (a session token)."""
MARK = "BENCH-JSON "

Expect = Callable[[int, Dict[str, str], bytes], Optional[str]]
"""``expect(status, headers, body)``: ``None`` when right, else what is wrong."""


@dataclass
class WrkDriver:
    """
    Sends one fixed request over ``connections`` keep-alive connections.

    :ivar headers: ``"Name: value"`` strings; a server's ``prepare`` may
        add more (e.g. a session cookie).
    :ivar expect: checks one response before any load is sent.
    """

    path: str
    method: str
    body: Optional[str]
    headers: Sequence[str]
    expect: Expect
    connections: int = 50
    threads: int = 1
    client_core: int = 1
    nice: int = 0
    timeout: float = 5.0
    extra_wrk_args: List[str] = field(default_factory=list)

    def _headers(self, server: RunningServer) -> List[str]:
        return list(self.headers) + list(server.extra)

    def check(self, server: RunningServer) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            headers = dict(h.split(":", 1) for h in self._headers(server))
            headers = {k.strip(): v.strip() for k, v in headers.items()}
            headers.pop(FOLLOW, None)  # an instruction to request.lua, not a header
            body = self.body.encode() if self.body is not None else None
            conn.request(self.method, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            got = {k.lower(): v for k, v in response.getheaders()}
        except OSError as e:
            raise BenchError(f"{server.spec.name}: the check request failed: {e}") from None
        finally:
            conn.close()
        wrong = self.expect(response.status, got, data)
        if wrong is not None:
            raise BenchError(f"{server.spec.name} answers wrongly: {wrong}")

    def command(self, server: RunningServer, seconds: float) -> List[str]:
        return [
            *pin(self.client_core, self.nice),
            "wrk", "-t", str(self.threads), "-c", str(self.connections),
            "-d", f"{max(seconds, 1):g}s", "--timeout", f"{self.timeout:g}s",
            *self.extra_wrk_args,
            "-s", str(LUA), server.url + self.path,
            "--", self.method, self.body if self.body is not None else "-",
            *self._headers(server),
        ]  # fmt: skip

    def measure(self, server: RunningServer, seconds: float) -> Dict[str, Any]:
        cpu_before = server.cpu_seconds()
        done = subprocess.run(  # noqa: S603
            self.command(server, seconds),
            capture_output=True,
            text=True,
            check=False,
            timeout=seconds + 60,
        )
        cpu = server.cpu_seconds() - cpu_before
        line = next((x for x in done.stdout.splitlines() if x.startswith(MARK)), None)
        if done.returncode != 0 or line is None:
            raise BenchError(
                f"wrk failed on {server.spec.name} (exit {done.returncode}):\n"
                f"{done.stdout}\n{done.stderr}"
            )
        raw = json.loads(line[len(MARK):])
        requests = raw["requests"]
        seconds_run = raw["duration_us"] / 1e6
        failed = sum(raw["errors"].values())
        return {
            "rps": requests / seconds_run if seconds_run else 0.0,
            "requests": requests,
            "seconds": seconds_run,
            "failed": failed,
            "errors": raw["errors"],
            "latency_ms": {k: v / 1000 for k, v in raw["latency_us"].items()},
            "server_cpu_s": cpu,
            "server_cpu_share": cpu / seconds_run if seconds_run else 0.0,
            "cpu_us_per_request": cpu * 1e6 / requests if requests else None,
        }

    def summarize(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not samples:
            return {}
        rps = [s["rps"] for s in samples]
        cpu = [s["cpu_us_per_request"] for s in samples if s["cpu_us_per_request"]]
        return {
            "rps_median": statistics.median(rps),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "p50_ms": statistics.median(s["latency_ms"]["p50"] for s in samples),
            "p99_ms": statistics.median(s["latency_ms"]["p99"] for s in samples),
            "cpu_us_per_request": statistics.median(cpu) if cpu else None,
            "cpu_share": statistics.median(s["server_cpu_share"] for s in samples),
            "failed": sum(s["failed"] for s in samples),
            "reps": len(samples),
        }
