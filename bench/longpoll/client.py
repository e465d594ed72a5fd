"""
The benchmark's client: opens N long-poll connections with raw
non-blocking sockets (epoll; no HTTP library, so the client costs little),
sends one ``GET /logout/wait`` on each, then on ``go`` (a line on stdin)
asks the server's control port to notify and times every response's
arrival from that moment.

Prints JSON lines: ``{"sent": N}`` once every request is written, then
``{"first": s, "p50": s, "last": s, "answered": n, "logged_out": n}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import socket
import sys
import time
from typing import Dict, List


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def connect_all(port: int, count: int, batch: int = 500) -> List[socket.socket]:
    socks: List[socket.socket] = []
    selector = selectors.DefaultSelector()
    while len(socks) < count:
        pending = 0
        for _ in range(min(batch, count - len(socks))):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            selector.register(s, selectors.EVENT_WRITE)
            socks.append(s)
            pending += 1
        while pending:
            for key, _ in selector.select(timeout=10):
                selector.unregister(key.fileobj)
                pending -= 1
    selector.close()
    return socks


def send_all(socks: List[socket.socket], user: str, offset: int) -> None:
    for i, s in enumerate(socks):
        request = (
            f"GET /logout/wait?timeout=300 HTTP/1.1\r\nHost: bench\r\n"
            f"x-session: bench-session-{offset + i}\r\nx-user: {user}\r\n\r\n"
        ).encode()
        s.setblocking(True)
        s.sendall(request)
        s.setblocking(False)


def notify(control: int) -> socket.socket:
    """
    Ask the server to notify; the answer is not waited for (reading it
    would delay reading the long-poll answers).
    """
    c = socket.create_connection(("127.0.0.1", control))
    c.sendall(b"POST / HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    return c


def watch_all(socks: List[socket.socket]) -> selectors.BaseSelector:
    """
    Register every socket for reading before the clock starts.
    """
    selector = selectors.DefaultSelector()
    for s in socks:
        selector.register(s, selectors.EVENT_READ)
    return selector


def collect(
    socks: List[socket.socket], selector: selectors.BaseSelector, started: float, deadline: float
) -> Dict[str, float]:
    buffers: Dict[int, bytes] = {s.fileno(): b"" for s in socks}
    times: List[float] = []
    logged_out = 0
    left = len(socks)
    while left and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1):
            s = key.fileobj
            data = s.recv(65536)  # type: ignore[union-attr]
            fd = key.fd
            buffers[fd] += data
            head, sep, body = buffers[fd].partition(b"\r\n\r\n")
            if not data or (sep and b"content-length" in head.lower() and body.endswith(b"}")):
                times.append(time.monotonic() - started)
                if b'"logged_out": true' in body:
                    logged_out += 1
                selector.unregister(s)
                left -= 1
    selector.close()
    times.sort()
    return {
        "first": times[0] if times else -1.0,
        "p50": times[len(times) // 2] if times else -1.0,
        "last": times[-1] if times else -1.0,
        "answered": len(times),
        "logged_out": logged_out,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--user", default="bench")
    args = parser.parse_args()
    raise_nofile()
    socks = connect_all(args.port, args.count)
    send_all(socks, args.user, args.offset)
    selector = watch_all(socks)
    print(json.dumps({"sent": len(socks)}), flush=True)
    line = sys.stdin.readline()
    if line.strip() != "go":
        return
    started = time.monotonic()
    control = notify(args.control) if args.control else None
    result = collect(socks, selector, started, started + 60)
    if control is not None:
        control.close()
    print(json.dumps(result), flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
