"""
The `IUserStore` contract, run against every store: memory, the YAML file
and Redis (a real redis-server).  Plus what is particular to each: Redis
creation races and outages, the record's round trips and validation, and
`modify_user`'s retry.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, List

import pytest
import pytest_twisted
import txredisapi
from conftest import cached_scripts, flush_scripts
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from twistauth import redisconn
from twistauth.accounts import (
    InvalidUserIdError,
    IUserStore,
    MemoryUserStore,
    RedisUserStore,
    UnknownUserError,
    User,
    UserConflictError,
    UserExistsError,
    YAMLUserStore,
    check_user_id,
    modify_user,
)
from twistauth.errors import BackendUnavailableError

#: ``redisconn``: Redis through `twistauth.redisconn.connect`, as in
#: production (its scripts take `redisconn.run_script`'s lean path).
STORE_KINDS = ["memory", "yaml", "redis", "redisconn"]


def redis_connection(port: int) -> Any:
    connection = txredisapi.lazyConnection(
        "127.0.0.1", port, convertNumbers=False, connectTimeout=2, replyTimeout=5
    )
    # Reconnect quickly after an injected outage (production: redisconn.connect).
    connection._factory.maxDelay = 0.5
    connection._factory.initialDelay = 0.2
    return connection


@pytest_twisted.async_yield_fixture(params=STORE_KINDS)
async def store_and_clock(request: Any, tmp_path: Any) -> AsyncIterator[Any]:
    clock = Clock()
    clock.advance(1_000_000)
    if request.param == "memory":
        yield MemoryUserStore(clock=clock), clock
    elif request.param == "yaml":
        store = YAMLUserStore(
            path=str(tmp_path / "data" / "users.yaml"), clock=clock, reactor=reactor
        )
        store.check()
        yield store, clock
    elif request.param == "redisconn":
        server = request.getfixturevalue("redis_server")
        connection = redisconn.connect(server.url, max_retry_delay=0.5)
        yield RedisUserStore(redis=connection, clock=clock, prefix="t:"), clock
        await redisconn.disconnect(connection)
    else:
        server = request.getfixturevalue("redis_server")
        connection = redis_connection(server.port)
        yield RedisUserStore(redis=connection, clock=clock, prefix="t:"), clock
        await connection.disconnect()
    assert clock.getDelayedCalls() == []


def alice(**changes: Any) -> User:
    fields: dict = {
        "user_id": "alice",
        "password_hash": "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
        "roles": {"admin", "staff"},
        "profile": {"email": "alice@example.com", "zip": "007", "n": 7, "nested": {"a": [1, 2]}},
    }
    fields.update(changes)
    return User(**fields)


# -- the contract ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_provides_the_interface(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    assert verifyObject(IUserStore, store)
    assert store.name in ("memory", "yaml", "redis")


@pytest_twisted.ensureDeferred
async def test_get_unknown_is_none(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    assert await store.get("nobody") is None
    assert await store.user_ids() == []
    assert await store.delete("nobody") is False


@pytest_twisted.ensureDeferred
async def test_create_then_get_round_trips_every_field(store_and_clock: Any) -> None:
    store, clock = store_and_clock
    created = await store.create(alice(tokens={"idp": {"refresh_token": "r"}}))
    assert created.version == 1
    assert created.created == created.updated == clock.seconds()
    loaded = await store.get("alice")
    assert loaded == created
    # Strings that look like numbers stay strings (convertNumbers=False).
    assert loaded.profile["zip"] == "007"
    assert loaded.profile["n"] == 7
    assert loaded.roles == frozenset({"admin", "staff"})
    assert loaded.tokens == {"idp": {"refresh_token": "r"}}
    assert await store.user_ids() == ["alice"]


@pytest_twisted.ensureDeferred
async def test_user_without_password(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    await store.create(User(user_id="oidc-user", profile={"email": "x@example.com"}))
    loaded = await store.get("oidc-user")
    assert loaded.password_hash is None
    assert loaded.disabled is False


@pytest_twisted.ensureDeferred
async def test_create_twice_fails(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    await store.create(alice())
    with pytest.raises(UserExistsError):
        await store.create(alice(profile={"other": True}))
    assert (await store.get("alice")).profile["email"] == "alice@example.com"


@pytest_twisted.ensureDeferred
async def test_replace_bumps_version_and_keeps_created(store_and_clock: Any) -> None:
    store, clock = store_and_clock
    first = await store.create(alice())
    clock.advance(10)
    second = await store.replace(first.evolve(disabled=True, created=0.0))
    assert second.version == 2
    assert second.created == first.created
    assert second.updated == first.updated + 10
    loaded = await store.get("alice")
    assert loaded == second
    assert loaded.disabled is True


@pytest_twisted.ensureDeferred
async def test_replace_from_a_stale_read_is_refused(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    first = await store.create(alice())
    await store.replace(first.evolve(roles={"a"}))
    with pytest.raises(UserConflictError):
        await store.replace(first.evolve(roles={"b"}))
    assert (await store.get("alice")).roles == frozenset({"a"})


@pytest_twisted.ensureDeferred
async def test_replace_unknown_user(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    with pytest.raises(UnknownUserError):
        await store.replace(alice(version=1))
    assert await store.get("alice") is None


@pytest_twisted.ensureDeferred
async def test_password_hash_can_be_removed(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    first = await store.create(alice())
    await store.replace(first.evolve(password_hash=None))
    assert (await store.get("alice")).password_hash is None


@pytest_twisted.ensureDeferred
async def test_delete(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    await store.create(alice())
    await store.create(User(user_id="bob"))
    assert await store.user_ids() == ["alice", "bob"]
    assert await store.delete("alice") is True
    assert await store.get("alice") is None
    assert await store.user_ids() == ["bob"]
    # The id is free again.
    assert (await store.create(alice())).version == 1


@pytest_twisted.ensureDeferred
async def test_records_are_copies(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    created = await store.create(alice())
    created.profile["email"] = "changed@example.com"
    loaded = await store.get("alice")
    loaded.profile["nested"]["a"].append(3)
    again = await store.get("alice")
    assert again.profile["email"] == "alice@example.com"
    assert again.profile["nested"] == {"a": [1, 2]}


@pytest_twisted.ensureDeferred
async def test_unusual_user_ids(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    ids = ["Ünïcode 名前", "with:colon", "a b", "yes", "null", "123", "x" * 256]
    for user_id in ids:
        await store.create(User(user_id=user_id, profile={"id": user_id}))
    for user_id in ids:
        assert (await store.get(user_id)).profile == {"id": user_id}
    assert await store.user_ids() == sorted(ids)


@pytest_twisted.ensureDeferred
async def test_concurrent_creates_of_one_id_one_wins(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    attempts = [
        ensureDeferred(_create(store, User(user_id="race", profile={"by": n}))) for n in range(5)
    ]
    results = await DeferredList(attempts, consumeErrors=True)
    wins = [value for ok, value in results if ok]
    losses = [value for ok, value in results if not ok]
    assert len(wins) == 1
    assert all(f.check(UserExistsError) for f in losses)
    assert (await store.get("race")).profile == wins[0].profile


async def _create(store: Any, user: User) -> User:
    return await store.create(user)  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_modify_user_retries_after_a_conflict(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    await store.create(alice())
    calls: List[int] = []

    async def interfere_once(user: User) -> None:
        await store.replace(user.evolve(profile=dict(user.profile, other="kept")))

    def change(user: User) -> User:
        calls.append(user.version)
        return user.evolve(profile=dict(user.profile, mine=len(calls)))

    # A writer sneaks in between modify_user's read and its write, once.
    original_get = store.get
    sneaked: List[bool] = []

    async def get_then_interfere(user_id: str) -> Any:
        user = await original_get(user_id)
        if not sneaked:
            sneaked.append(True)
            await interfere_once(user)
        return user

    store.get = get_then_interfere
    try:
        result = await modify_user(store, "alice", change)
    finally:
        del store.get
    assert calls == [1, 2]
    assert result.profile["other"] == "kept"
    assert result.profile["mine"] == 2
    assert result.version == 3


@pytest_twisted.ensureDeferred
async def test_modify_user_gives_up_and_reports_unknown(store_and_clock: Any) -> None:
    store, _ = store_and_clock
    with pytest.raises(UnknownUserError):
        await modify_user(store, "nobody", lambda u: u)
    await store.create(alice())

    def always_stale(user: User) -> User:
        return user.evolve(version=user.version + 100)

    with pytest.raises(UserConflictError):
        await modify_user(store, "alice", always_stale, attempts=3)


# -- Redis in particular ----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_concurrent_creates_from_two_connections(redis_server: Any) -> None:
    """
    Two processes creating one user at once: separate connections, many
    rounds, exactly one winner each time.
    """
    clock = Clock()
    one, two = redis_connection(redis_server.port), redis_connection(redis_server.port)
    try:
        stores = [RedisUserStore(redis=c, clock=clock) for c in (one, two)]
        for round_ in range(20):
            user = User(user_id=f"user{round_}")
            results = await DeferredList(
                [ensureDeferred(_create(s, user)) for s in stores], consumeErrors=True
            )
            assert sorted(ok for ok, _ in results) == [False, True]
        assert len(await stores[0].user_ids()) == 20
    finally:
        await one.disconnect()
        await two.disconnect()


@pytest_twisted.ensureDeferred
async def test_redis_layout(redis_server: Any) -> None:
    """
    One hash per user, and an index set; other processes can read it.
    """
    connection = redis_connection(redis_server.port)
    try:
        store = RedisUserStore(redis=connection, clock=Clock(), prefix="app:")
        await store.create(alice())
        fields = await connection.hgetall("app:user:alice")
        assert fields["roles"] == '["admin","staff"]' or fields["roles"] == '["admin", "staff"]'
        assert fields["version"] == "1"
        assert fields["disabled"] == "0"
        assert await connection.smembers("app:users") == {"alice"}
        assert await connection.exists("app:user:bob") in (0, False)
    finally:
        await connection.disconnect()


@pytest_twisted.ensureDeferred
async def test_redis_outage_is_503_not_no_such_user(redis_server: Any) -> None:
    """
    With Redis down, a read fails with BackendUnavailableError within the
    deadline (never "no such user", which would look like a logout or
    let a create through); when Redis is back the store works again.
    """
    connection = redis_connection(redis_server.port)
    try:
        store = RedisUserStore(redis=connection, clock=reactor, timeout=0.3)
        await store.create(alice())
        redis_server.stop()
        started = reactor.seconds()
        for operation in (
            lambda: store.get("alice"),
            lambda: store.create(User(user_id="bob")),
            lambda: store.replace(alice(version=1)),
            lambda: store.delete("alice"),
            lambda: store.user_ids(),
        ):
            with pytest.raises(BackendUnavailableError):
                await operation()
        assert reactor.seconds() - started < 5 * 0.3 + 1.0
        redis_server.start()
        redis_server.flush()
        deadline = reactor.seconds() + 10
        while True:
            try:
                assert await store.get("alice") is None
                break
            except BackendUnavailableError:
                assert reactor.seconds() < deadline
        assert (await store.create(alice())).version == 1
    finally:
        await connection.disconnect()


@pytest_twisted.ensureDeferred
async def test_redis_survives_script_flush(redis_server: Any) -> None:
    """
    Redis forgetting its scripts (``SCRIPT FLUSH``, a restart, a failover)
    changes no answer: each script is loaded again.
    """
    clock = Clock()
    clock.advance(1_000_000.125)
    connection = redisconn.connect(redis_server.url)
    try:
        store = RedisUserStore(redis=connection, clock=clock)
        created = await store.create(alice())
        assert created.created == 1_000_000.125
        await flush_scripts(connection)
        with pytest.raises(UserExistsError):
            await store.create(alice())
        await flush_scripts(connection)
        clock.advance(1)
        replaced = await store.replace(created)
        assert (replaced.version, replaced.created, replaced.updated) == (
            2,
            1_000_000.125,
            1_000_001.125,
        )
        with pytest.raises(UserConflictError):
            await store.replace(created)
        await flush_scripts(connection)
        assert await store.delete("alice") is True
        assert await store.delete("alice") is False
        with pytest.raises(UnknownUserError):
            await store.replace(replaced)
        assert await store.get("alice") is None
        assert await cached_scripts(connection) == 2  # delete, replace
    finally:
        await redisconn.disconnect(connection)


# -- the record ------------------------------------------------------------


def test_user_repr_hides_secrets() -> None:
    text = repr(alice(tokens={"idp": {"access_token": "secret-token"}}))
    assert "argon2" not in text
    assert "secret-token" not in text
    assert "alice" in text


def test_user_record_round_trip_and_validation() -> None:
    user = alice(disabled=True, version=4, created=1.5, updated=2.5)
    assert User.from_record(user.to_record()) == user
    with pytest.raises(ValueError, match="user_id"):
        User.from_record({"roles": []})
    with pytest.raises(ValueError, match="roles"):
        User.from_record({"user_id": "a", "roles": "admin"})
    with pytest.raises(ValueError, match="disabled"):
        User.from_record({"user_id": "a", "disabled": "no"})
    with pytest.raises(ValueError, match="version"):
        User.from_record({"user_id": "a", "version": True})
    with pytest.raises(ValueError):
        User.from_record(["a"])


@pytest.mark.parametrize(
    "bad",
    [None, 5, "", " alice", "alice ", "a\nb", "a\x00b", "zero\u200bwidth", "x" * 257, "\ud800"],
)
def test_invalid_user_ids(bad: Any) -> None:
    with pytest.raises(InvalidUserIdError):
        check_user_id(bad)


def test_user_ids_are_nfc_normalised() -> None:
    decomposed = "Jose\u0301"
    assert check_user_id(decomposed) == "Jos\u00e9"
    assert check_user_id("Alice") == "Alice"  # case is kept
    assert check_user_id("x" * 256) == "x" * 256
