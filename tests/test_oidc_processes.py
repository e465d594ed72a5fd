"""
Refresh single flight across real processes (checklist #48, R1): two
worker processes, each a token manager over a shared real redis-server,
fire 25 concurrent requests each for one user whose access token has
expired; the identity provider (`FakeProvider` on a loopback socket, in
the test process, rotating refresh tokens) must see exactly one refresh.
And when the process holding the refresh lock is killed mid-refresh, the
other refreshes once the lock's lease runs out.

The workers are this file run as a script (``python test_oidc_processes.py
worker CONFIG``): they set up, print ``ready``, wait for ``go`` on stdin (a
barrier, so both fire together), and print one JSON line of results.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, List

REQUESTS_PER_WORKER = 25
WORKERS = 2


# -- the worker process --------------------------------------------------------


async def _work(reactor: Any, config: Dict[str, Any]) -> None:
    from twisted.internet import stdio
    from twisted.internet.defer import Deferred, DeferredList
    from twisted.protocols.basic import LineReceiver

    from twistauth import redisconn
    from twistauth.accounts.redisstore import RedisUserStore
    from twistauth.identity.client import RelyingParty
    from twistauth.identity.config import ProviderConfig
    from twistauth.identity.http import make_http_client
    from twistauth.identity.tokens import (
        RedisRefreshLock,
        TokenManager,
        TokenSealer,
        derive_token_key,
    )

    connection = redisconn.connect(config["redis_url"])
    users = RedisUserStore(redis=connection, clock=reactor)
    http = make_http_client(reactor)
    provider = ProviderConfig(**config["provider"])
    party = RelyingParty(config=provider, http_client=http, clock=reactor)
    manager = TokenManager(
        users=users,
        parties={provider.name: party},
        sealer=TokenSealer(key=derive_token_key(bytes.fromhex(config["key"]))),
        clock=reactor,
        lock=RedisRefreshLock(redis=connection, clock=reactor),
        end_sessions=lambda user_id, reason: None,
        lock_lease=1.0,
    )
    await party.metadata.get()  # warm up: connected, discovery fetched
    await connection.ping()
    go: Deferred[None] = Deferred()

    class Barrier(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            if line.strip() == b"go" and not go.called:
                go.callback(None)

    stdio.StandardIO(Barrier(), reactor=reactor)
    print("ready", flush=True)
    await go
    started = time.monotonic()
    calls = [manager.get_user_context_and_refresh(config["user_id"])
             for _ in range(config["requests"])]
    answers = await DeferredList(calls, consumeErrors=True)
    elapsed = time.monotonic() - started
    tokens = sorted({
        hashlib.sha256(context.tokens.access_token.encode()).hexdigest()[:16]
        for ok, context in answers if ok
    })
    errors = [repr(failure.value) for ok, failure in answers if not ok]
    print(json.dumps({"ok": sum(1 for ok, _ in answers if ok), "tokens": tokens,
                      "errors": errors, "elapsed": elapsed, "counts": manager.counts}),
          flush=True)
    await redisconn.disconnect(connection)
    await http._agent._pool.closeCachedConnections()


def _worker_main(argv: List[str]) -> None:
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    config = json.loads(argv[0])
    task.react(lambda reactor: ensureDeferred(_work(reactor, config)))


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    _worker_main(sys.argv[2:])


# -- the test ------------------------------------------------------------------

import pytest  # noqa: E402
import pytest_twisted  # noqa: E402
from conftest import RedisServer  # noqa: E402
from test_oidc_stores import serve_provider  # noqa: E402
from test_sessions_support import connect  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.protocol import ProcessProtocol  # noqa: E402
from twisted.internet.task import deferLater  # noqa: E402

from twistauth import redisconn  # noqa: E402
from twistauth.accounts.redisstore import RedisUserStore  # noqa: E402
from twistauth.identity.http import make_http_client  # noqa: E402
from twistauth.identity.tokens import (  # noqa: E402
    RedisRefreshLock,
    TokenManager,
    TokenSealer,
    derive_token_key,
)

KEY = bytes(range(32, 64))


class _Worker(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[Dict[str, Any]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"ready\n" in self.out and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        lines = [line for line in self.out.decode().splitlines() if line.startswith("{")]
        if not self.ready.called:
            self.ready.errback(RuntimeError("worker died: " + self.err.decode()[-2000:]))
        if lines:
            self.ended.callback(json.loads(lines[-1]))
        else:
            self.ended.errback(RuntimeError("worker failed: " + self.err.decode()[-2000:]))


async def _expired_user(provider: Any, connection: Any, http: Any) -> str:
    """
    Log a user in at ``provider`` and store their tokens in Redis with an
    access token that has expired.
    """
    rp = provider.relying_party(http_client=http)
    sealer = TokenSealer(key=derive_token_key(KEY))
    manager = TokenManager(
        users=RedisUserStore(redis=connection, clock=reactor), parties={"fake": rp},
        sealer=sealer, clock=reactor, lock=RedisRefreshLock(redis=connection, clock=reactor),
        end_sessions=lambda user_id, reason: None,
    )
    result = await provider.log_in(rp)
    user = await manager.prepare_user(result)
    await manager.record_login(user.user_id, result, sid="s")
    stored = await manager.users.get(user.user_id)
    context = await manager.get_user_context(user.user_id)
    expired = dict(context.tokens.to_dict(), expires_at=reactor.seconds() - 1)
    entry = dict(stored.tokens["fake"])
    entry.update(sealer.seal(user.user_id, "fake", {"tokens": expired, "claims": context.claims}))
    await manager.users.replace(stored.evolve(tokens={"fake": entry}))
    return str(user.user_id)


def _spawn(config: Dict[str, Any]) -> _Worker:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = _Worker()
    reactor.spawnProcess(
        worker, sys.executable,
        [sys.executable, os.path.abspath(__file__), "worker", json.dumps(config)],
        env=env, path=root,
    )
    return worker


def _config(redis_server: RedisServer, provider: Any, user_id: str) -> Dict[str, Any]:
    return {
        "redis_url": redis_server.url,
        "key": KEY.hex(),
        "user_id": user_id,
        "requests": REQUESTS_PER_WORKER,
        "provider": {
            "name": "fake", "issuer": provider.issuer, "client_id": provider.client_id,
            "client_secret": provider.client_secret, "redirect_uri": provider.redirect_uris[0],
        },
    }


def _kill(workers: List[_Worker]) -> None:
    for worker in workers:
        worker.ended.addErrback(lambda _: None)  # a killed worker has no result
        if worker.transport is not None and worker.transport.pid is not None:
            worker.transport.signalProcess("KILL")


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_fifty_requests_over_two_processes_refresh_once(redis_server: RedisServer) -> None:
    provider, port = await serve_provider(rotate_refresh_tokens=True, access_token_lifetime=300)
    connection = connect(redis_server)
    http = make_http_client(reactor, persistent=False)
    workers: List[_Worker] = []
    try:
        user_id = await _expired_user(provider, connection, http)
        token_calls_before = provider.hits["token"]
        provider.slow_seconds = 0.5
        provider.misbehave("token", "slow", once=True)
        config = _config(redis_server, provider, user_id)
        workers = [_spawn(config) for _ in range(WORKERS)]
        await gatherResults([w.ready for w in workers], consumeErrors=True)
        started = time.monotonic()
        for worker in workers:
            worker.transport.write(b"go\n")
        outcomes = await gatherResults([w.ended for w in workers], consumeErrors=True)
        elapsed = time.monotonic() - started
    finally:
        _kill(workers)
        await port.stopListening()
        await redisconn.disconnect(connection)
        await http._agent._pool.closeCachedConnections()

    assert [o["errors"] for o in outcomes] == [[], []]
    assert sum(o["ok"] for o in outcomes) == WORKERS * REQUESTS_PER_WORKER == 50
    assert provider.hits["token"] - token_calls_before == 1
    assert provider.reused_refresh_tokens == 0
    assert len({t for o in outcomes for t in o["tokens"]}) == 1
    assert sum(o["counts"]["refreshed"] for o in outcomes) == 1
    assert sum(o["counts"]["waited"] for o in outcomes) == 1  # the other process
    print(f"\n50 requests over 2 processes: 1 refresh; {elapsed * 1000:.0f} ms to all answers; "
          f"per worker {[round(o['elapsed'] * 1000) for o in outcomes]} ms")


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_killed_lock_holder(redis_server: RedisServer) -> None:
    """
    The process holding the refresh lock is killed (SIGKILL) while its
    token request hangs: its lease (1 s) runs out and the other process's
    waiting requests refresh then, within the lease (R1, #49).
    """
    provider, port = await serve_provider(rotate_refresh_tokens=True, access_token_lifetime=300)
    connection = connect(redis_server)
    http = make_http_client(reactor, persistent=False)
    workers: List[_Worker] = []
    try:
        user_id = await _expired_user(provider, connection, http)
        before = provider.hits["token"]
        provider.misbehave("token", "stall", once=True)
        config = _config(redis_server, provider, user_id)
        holder, other = workers = [_spawn(config), _spawn(config)]
        await gatherResults([w.ready for w in workers], consumeErrors=True)
        holder.transport.write(b"go\n")
        while provider.hits["token"] == before:  # its refresh reached the provider
            await deferLater(reactor, 0.01, lambda: None)
        holder.transport.signalProcess("KILL")
        killed = time.monotonic()
        other.transport.write(b"go\n")
        outcome = await other.ended
        recovered = time.monotonic() - killed
    finally:
        _kill(workers)
        await port.stopListening()
        await redisconn.disconnect(connection)
        await http._agent._pool.closeCachedConnections()

    assert outcome["errors"] == []
    assert outcome["ok"] == REQUESTS_PER_WORKER
    assert outcome["counts"]["refreshed"] == 1
    assert provider.hits["token"] - before == 2  # the dead one's, then one more
    assert provider.reused_refresh_tokens == 0
    assert recovered < 1.0 + 0.6, recovered
    print(f"\nlock holder killed: the other process refreshed {recovered * 1000:.0f} ms later "
          f"(lease 1000 ms)")
