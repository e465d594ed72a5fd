"""
The whole app on a real redis-server: sessions, users, throttle and nonces in
Redis; an outage answers 503 and logs nobody out; after a restart the same
session works.
"""

from __future__ import annotations

import secrets
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from tests.conftest import RedisServer
from twistauth.app import make_app
from twistauth.testing import MethodClient

PASSWORD = "correct horse battery staple"
DEPLOYMENT_KEY = secrets.token_bytes(32)
CHEAP_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_cost": 8192, "argon2_parallelism": 1}


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    server = RedisServer(persistent=True)
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def app_on(request: Any) -> Any:
    apps = []

    def build(url: str, **options: Any) -> Any:
        app = make_app(
            clock=reactor,
            reactor=reactor,
            session_cache=url,
            user_store=url,
            redis_timeout=0.5,
            deployment_key=DEPLOYMENT_KEY,
            **CHEAP_ARGON2,
            **options,
        )
        for service in app.background:
            service.startService()
        apps.append(app)
        return app

    yield build
    for app in apps:
        for service in reversed(app.background):
            pytest_twisted.blockon(defer.maybeDeferred(service.stopService))


async def wait_until_up(client: MethodClient, tries: int = 100) -> Any:
    for _ in range(tries):
        response = await client.post({"method": "session.info"})
        if response.status != 503:
            return response
        await deferLater(0.05)
    raise AssertionError("the app never recovered")


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


def carried(client: MethodClient) -> Any:
    """
    The headers that present ``client``'s session cookie (and CSRF token)
    to another app, as the same browser talking to another process.
    """
    cookies = {cookie.name: cookie.value for cookie in client.cookies}
    return {
        "Cookie": "; ".join(f"{name}={value}" for name, value in cookies.items()),
        "X-Twistauth-CSRF": cookies["__Host-twistauth_session_csrf"],
    }


@pytest_twisted.ensureDeferred
async def test_login_session_on_redis(redis_server: RedisServer, app_on: Any) -> None:
    app = app_on(redis_server.url)
    alice = MethodClient(app)
    await alice.call("account.create", user_id="alice", password=PASSWORD)
    info = await alice.call("session.info")
    assert info["user_id"] == "alice"
    # A second app (another process, as far as Redis is concerned) sees the
    # same user and, given the cookie, the same session.
    other = app_on(redis_server.url)
    bob = MethodClient(other, headers=carried(alice))
    assert (await bob.call("session.info"))["user_id"] == "alice"
    # Logging out through one ends it for the other.
    await bob.call("account.logout")
    assert (await alice.call("session.info"))["user_id"] is None


@pytest_twisted.ensureDeferred
async def test_outage_is_not_a_logout(persistent_redis: RedisServer, app_on: Any) -> None:
    app = app_on(persistent_redis.url)
    client = MethodClient(app)
    await client.call("account.create", user_id="carol", password=PASSWORD)
    held = {cookie.name: cookie.value for cookie in client.cookies}
    persistent_redis.stop()
    started = reactor.seconds()
    response = await client.post({"method": "session.info"})
    elapsed = reactor.seconds() - started
    assert response.status == 503, response.body
    assert response.decoded()["error"]["code"] // 100 == 503
    assert elapsed < 2.0
    # The cookie was neither cleared nor replaced.
    assert response.header("set-cookie") is None
    assert {cookie.name: cookie.value for cookie in client.cookies} == held
    persistent_redis.start()
    response = await wait_until_up(client)
    assert response.decoded()["result"]["user_id"] == "carol"
