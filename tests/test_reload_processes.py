"""
SIGHUP on real processes: a parent and two workers with client-side
sessions (revocations and the bus on a private redis-server) rotate their
session key without logging anyone out, refuse a key that cannot change
at run time, ignore a broken configuration (without forwarding it to the
workers), and then retire the old key.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import signal
import time
from typing import Any, Sequence

from conftest import RedisServer, free_port
from test_workers_processes import (
    CHEAP_ARGON2,
    DEPLOYMENT_KEY,
    PASSWORD,
    Server,
    one_client_per_worker,
    twistd,
)

from twistauth.sessions.sealing import KEY_ID_BYTES, key_id

K1 = secrets.token_bytes(32)
K2 = secrets.token_bytes(32)


def text(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode().rstrip("=")


def key_of(token: str) -> bytes:
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return raw[1 : 1 + KEY_ID_BYTES]


def write_config(path: str, redis: RedisServer, keys: Sequence[bytes], extra: str = "") -> None:
    with open(path, "w") as f:
        f.write(
            f"""
processes = 2
session_cache = "client"
session_keys = [{", ".join(f'"{text(k)}"' for k in keys)}]
redis_url = "{redis.url}"
user_store = "{redis.url}"
method_cache = "none"
deployment_key = "{DEPLOYMENT_KEY}"
method_modules = ["workers_methods", "twistauth.demo_methods"]
{extra}
"""
        )


def test_sighup_rotates_the_session_key(redis_server: RedisServer, tmp_path: Any) -> None:
    config = str(tmp_path / "twistauth.toml")
    write_config(config, redis_server, [K1])
    port = free_port()
    server = Server(
        [twistd(), "-n", "--pidfile=", "twistauth", "--config", config,
         "--listen", f"tcp:{port}:interface=127.0.0.1", "--data-dir", str(tmp_path),
         *CHEAP_ARGON2],
        str(tmp_path),
    )
    try:
        server.wait_for_all(r"worker \d+ ready", 2)
        (_, a), (_, b) = sorted(one_client_per_worker(port, 2).items())
        answer, old = a.call("account.create", {"user_id": "carol", "password": PASSWORD})
        assert answer["result"]["user_id"] == "carol", answer
        assert key_of(old) == key_id(K1)

        # Rotate: the new key first, the old one still opens.  A key that
        # cannot change at run time is refused and keeps its value.
        write_config(config, redis_server, [K2, K1], "max_body_bytes = 1000")
        mark = server.mark()
        hup = time.monotonic()
        os.kill(server.pid, signal.SIGHUP)
        server.wait_for_all(r"\[twistauth.workers#info worker \d+\] twistauth: reload: "
                            r"session_keys is now 2 key\(s\) set", 2, mark)
        applied = time.monotonic() - hup
        log = "\n".join(server.lines[mark:])
        assert log.count("max_body_bytes changed but cannot change while running") == 3, log
        for client in (b, a):
            answer, new = client.call("session.info", token=old)
            assert answer["result"]["user_id"] == "carol", answer  # nobody logged out
            assert key_of(new) == key_id(K2)  # re-sealed with the new key
        answer, _ = a.call("echo", {"padding": "x" * 2000})
        assert answer["result"]["padding"] == "x" * 2000  # max_body_bytes kept

        # A broken configuration: the parent refuses it and tells no worker.
        with open(config, "w") as f:
            f.write("processes = 2\nsession_keys = 'not a list'\n")
        mark = server.mark()
        os.kill(server.pid, signal.SIGHUP)
        server.wait_for(r"twistauth: reload refused, settings unchanged: .*session_keys", mark)

        # Retire the old key: its tokens stop opening, the new ones work.
        write_config(config, redis_server, [K2], "max_body_bytes = 1000")
        retire = server.mark()
        os.kill(server.pid, signal.SIGHUP)
        server.wait_for_all(r"worker \d+\] twistauth: reload: session_keys is now 1 key\(s\)",
                            2, retire)
        from_workers = [line for line in server.lines[mark:retire]
                        if re.search(r"#\w+ worker \d+\] twistauth: reload", line)]
        assert from_workers == []
        for client in (a, b):
            answer, _ = client.call("session.info", token=old)
            assert answer["result"]["user_id"] is None, answer
            answer, _ = client.call("session.info", token=new)
            assert answer["result"]["user_id"] == "carol", answer

        stopping = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0
        stopped = time.monotonic() - stopping
        print(f"SIGHUP to both workers applied in {applied * 1000:.0f} ms; "
              f"SIGTERM with nothing running: parent exited 0 in {stopped:.2f} s")
    finally:
        server.kill()
