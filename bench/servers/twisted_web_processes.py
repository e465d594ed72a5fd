"""
The tuned bare twisted.web floor (``twisted_web.py --tuned``) in N worker
processes sharing one listening socket, as ``twistd -n twistauth
--processes N`` shares its: the parent binds and listens (backlog 50, as a
``tcp:`` endpoint), starts N children that adopt the socket
(``reactor.adoptStreamPort``) and accept one connection per wake-up (as
``twistauth.workers`` makes its workers do), and serves nothing itself.
SIGINT or SIGTERM to the parent stops the children; a child stops when its
parent dies.

Usage: ``python twisted_web_processes.py --port N --processes K``
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from typing import Any, List

from _echo import port_from_argv


def child(fd: int) -> None:
    # Die with the parent (PR_SET_PDEATHSIG), so no worker outlives it.
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    from twisted.internet import reactor
    from twisted.web.server import Site
    from twisted_web import Echo

    port: Any = reactor.adoptStreamPort(  # type: ignore[attr-defined]
        fd, socket.AF_INET, Site(Echo(), parsePOSTFormSubmission=False)
    )
    os.close(fd)
    read = port.doRead

    def read_one() -> Any:
        port.numberAccepts = 1
        try:
            return read()
        finally:
            port.numberAccepts = 1

    port.numberAccepts = 1
    port.doRead = read_one
    reactor.run()


def parent(port: int, count: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(50)
    sock.setblocking(False)
    children: List[subprocess.Popen[bytes]] = [
        subprocess.Popen(  # noqa: S603 - our own argv
            [sys.executable, os.path.abspath(__file__), "--child", str(sock.fileno())],
            pass_fds=[sock.fileno()],
        )
        for _ in range(count)
    ]

    def stop(number: int, frame: Any) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for c in children:
        c.wait()


if __name__ == "__main__":
    if "--child" in sys.argv:
        child(int(sys.argv[sys.argv.index("--child") + 1]))
    else:
        parent(port_from_argv(sys.argv), int(sys.argv[sys.argv.index("--processes") + 1]))
