"""
The session-cache conformance suite (checklist case 75): the same tests run
against every `ISessionCache` (models: Klein's ``storage/test/test_common.py``
and oauth2-proxy's ``RunSessionStoreTests``).

Kinds: ``memory``; ``redis`` (a real private redis-server); ``client-memory``
and ``client-redis`` (the sealed client-side cache with its revocations in
memory or in Redis).  Time is a `Clock` for every kind: for the Redis cache
that drives the logical timestamps (idle and absolute expiry are decided by
the cache from them) while Redis's own TTLs run on real time;
``test_sessions_redis.py`` checks those TTLs and lets one expire for real.

A few properties hold only for the server-side caches (two requests that
change different keys of one session both keep their change; counts of
ended sessions): those tests run over ``SERVER_KINDS`` only, and
``test_sessions_client.py`` tests what the client-side cache does instead.
"""

from __future__ import annotations

import base64
from typing import Any, Iterator

import pytest
import pytest_twisted
from test_sessions_support import (
    ABSOLUTE,
    ALL_KINDS,
    IDLE,
    SERVER_KINDS,
    Harness,
    capture_logs,
    close,
    make_harness,
)

from twistauth.sessions import ISessionCache, Session


def _harness(request: Any) -> Iterator[Harness]:
    kind = request.param
    server = request.getfixturevalue("redis_server") if "redis" in kind else None
    harness = make_harness(kind, server)
    yield harness
    # Every deadline put on the clock was cancelled when its call answered.
    assert harness.clock.getDelayedCalls() == []
    close(harness)


@pytest.fixture(params=ALL_KINDS)
def h(request: Any) -> Iterator[Harness]:
    yield from _harness(request)


@pytest.fixture(params=SERVER_KINDS)
def server_h(request: Any) -> Iterator[Harness]:
    yield from _harness(request)


async def _saved(h: Harness, **data: Any) -> str:
    session = await h.cache.create()
    for key, value in data.items():
        session[key] = value
    token = await h.cache.save(session)
    assert token
    return token


async def _logged_in(h: Harness, user: str, *, issuer: Any = None, sid: Any = None) -> str:
    session = await h.cache.create()
    session.log_in(user, ["member"], now=h.clock.seconds(), issuer=issuer, provider_sid=sid)
    token = await h.cache.save(session)
    assert token
    return token


def test_provides_interface(h: Harness) -> None:
    assert ISessionCache.providedBy(h.cache)
    assert h.cache.name == h.kind.split("-")[0]


@pytest_twisted.ensureDeferred
async def test_ids_are_256_random_bits_and_never_repeat(h: Harness) -> None:
    """
    Case 67: ids (and CSRF tokens) are 32 bytes from `secrets`, URL-safe
    base64; none repeats in 2000 sessions.
    """
    seen = set()
    for _ in range(1000):
        session = await h.cache.create()
        for value in (session.id, session.csrf_token):
            assert len(value) == 43
            assert len(base64.urlsafe_b64decode(value + "=")) == 32
            seen.add(value)
    assert len(seen) == 2000


@pytest_twisted.ensureDeferred
async def test_round_trip(h: Harness) -> None:
    """
    Everything a session holds survives a save and a load, numbers that
    look like strings included (``convertNumbers=False``).
    """
    session = await h.cache.create(permanent=True)
    assert session.version == 0 and not session.authenticated
    session["cart"] = [1, 2.5, {"x": None}]
    session["zip"] = "007"
    session["name"] = "Zoë ✓"
    session.log_in(
        "007",
        ["admin", "member"],
        now=h.clock.seconds(),
        permanent=True,
        issuer="https://op.example",
        provider_sid="sid-1",
    )
    session.set_signing_key("k" * 43)
    token = await h.cache.save(session)
    assert token and session.version == 1 and not session.dirty
    loaded = await h.cache.load(token)
    assert isinstance(loaded, Session)
    assert loaded.data == {"cart": [1, 2.5, {"x": None}], "zip": "007", "name": "Zoë ✓"}
    assert loaded.fields() == session.fields()
    assert loaded.user_id == "007" and loaded.roles == {"admin", "member"}
    assert loaded.permanent and loaded.version == 1
    assert not loaded.dirty


@pytest_twisted.ensureDeferred
async def test_unknown_token_loads_nothing_and_creates_nothing(h: Harness) -> None:
    """
    Case 69: a forged or unknown token is not adopted and no record is
    created for it.
    """
    real = await _saved(h, a=1)
    before = await h.stored()
    forged = [
        "",
        "A" * 43,
        Session(id="x", created=0, last_seen=0).id,
        (await h.cache.create()).id,  # made but never saved
        real[:-1],
        real + "A",
        "x" * 10000,
        "é" * 43,
        "../../etc/passwd",
        "\x00" * 43,
    ]
    for token in forged:
        assert await h.cache.load(token) is None, token[:50]
    assert await h.stored() == before


@pytest_twisted.ensureDeferred
async def test_unsaved_session_is_not_stored(h: Harness) -> None:
    session = await h.cache.create()
    session["a"] = 1
    assert await h.cache.load(session.id) is None
    assert await h.stored() == 0


@pytest_twisted.ensureDeferred
async def test_idle_timeout(h: Harness) -> None:
    """
    Case 70: a session unused for the idle timeout is gone, measured from
    the cache's own timestamps.
    """
    token = await _saved(h, a=1)
    h.clock.advance(IDLE - 1)
    assert await h.cache.load(token) is not None
    other = await _saved(h, b=2)
    h.clock.advance(IDLE + 1)
    assert await h.cache.load(other) is None


@pytest_twisted.ensureDeferred
async def test_use_keeps_a_session_alive_past_the_idle_timeout(h: Harness) -> None:
    token = await _saved(h, a=1)
    for _ in range(5):
        h.clock.advance(IDLE * 0.6)
        session, token = await h.use(token)
        assert session is not None
    assert session["a"] == 1


@pytest_twisted.ensureDeferred
async def test_absolute_timeout(h: Harness) -> None:
    """
    Case 70: a session in constant use still ends at its absolute timeout.
    """
    token = await _saved(h, a=1)
    used = 0.0
    while used + IDLE / 2 < ABSOLUTE:
        h.clock.advance(IDLE / 2)
        used += IDLE / 2
        session, token = await h.use(token)
        assert session is not None, used
    h.clock.advance(ABSOLUTE - used + 1)
    session, _ = await h.use(token)
    assert session is None


@pytest_twisted.ensureDeferred
async def test_delete(h: Harness) -> None:
    """
    Case 71: logout ends the session; the token replayed loads nothing.
    """
    token = await _saved(h, a=1)
    keep = await _saved(h, b=1)
    session = await h.cache.load(token)
    assert await h.cache.delete(session) is None
    assert await h.cache.load(token) is None
    assert (await h.cache.load(keep))["b"] == 1


@pytest_twisted.ensureDeferred
async def test_save_after_delete_is_dropped(h: Harness) -> None:
    """
    Case 71: a slow request that saves after another request logged the
    session out does not bring it back.
    """
    token = await _saved(h, a=1)
    slow = await h.cache.load(token)
    other = await h.cache.load(token)
    await h.cache.delete(other)
    before = await h.stored()
    slow["late"] = True
    assert await h.cache.save(slow) is None
    assert await h.cache.load(token) is None
    assert await h.stored() == before


@pytest_twisted.ensureDeferred
async def test_renew(h: Harness) -> None:
    """
    Case 68: renewal gives a new id and CSRF token, keeps the state, and
    the old token stops working.
    """
    token = await _saved(h, a=1)
    session = await h.cache.load(token)
    old_id, old_csrf = session.id, session.csrf_token
    session.log_in("ann", ["member"], now=h.clock.seconds())
    session["b"] = 2
    new = await h.cache.renew(session)
    assert new and new != token
    assert session.id != old_id and session.csrf_token != old_csrf
    assert await h.cache.load(token) is None
    renewed = await h.cache.load(new)
    assert renewed.data == {"a": 1, "b": 2}
    assert renewed.user_id == "ann"
    assert renewed.csrf_token == session.csrf_token
    assert renewed.id == session.id


@pytest_twisted.ensureDeferred
async def test_renew_of_a_never_saved_session(h: Harness) -> None:
    session = await h.cache.create()
    session["a"] = 1
    first_id = session.id
    token = await h.cache.renew(session)
    assert session.id != first_id
    assert (await h.cache.load(token))["a"] == 1


@pytest_twisted.ensureDeferred
async def test_renew_after_delete_is_dropped(h: Harness) -> None:
    token = await _saved(h, a=1)
    slow = await h.cache.load(token)
    await h.cache.delete(await h.cache.load(token))
    old_id = slow.id
    assert await h.cache.renew(slow) is None
    assert slow.id == old_id
    assert await h.cache.load(token) is None


@pytest_twisted.ensureDeferred
async def test_delete_user(h: Harness) -> None:
    """
    Case 74: "log out everywhere" ends every session of the user, and only
    theirs, in one call; a later save of one of them is dropped.
    """
    ann1 = await _logged_in(h, "ann")
    ann2 = await _logged_in(h, "ann")
    bob = await _logged_in(h, "bob")
    anonymous = await _saved(h, a=1)
    in_flight = await h.cache.load(ann1)
    h.clock.advance(1)
    count = await h.cache.delete_user("ann")
    assert count == (2 if h.server_side else -1)
    assert await h.cache.load(ann1) is None
    assert await h.cache.load(ann2) is None
    assert (await h.cache.load(bob)).user_id == "bob"
    assert (await h.cache.load(anonymous))["a"] == 1
    in_flight["x"] = 1
    assert await h.cache.save(in_flight) is None
    # Logging in again afterwards works.
    h.clock.advance(1)
    again = await _logged_in(h, "ann")
    assert (await h.cache.load(again)).user_id == "ann"
    assert await h.cache.delete_user("nobody") == (0 if h.server_side else -1)


@pytest_twisted.ensureDeferred
async def test_delete_user_spares_a_session_that_changed_user(h: Harness) -> None:
    token = await _logged_in(h, "ann")
    session = await h.cache.load(token)
    h.clock.advance(1)
    session.log_in("bob", [], now=h.clock.seconds())
    token = await h.cache.renew(session)
    h.clock.advance(1)
    await h.cache.delete_user("ann")
    assert (await h.cache.load(token)).user_id == "bob"


@pytest_twisted.ensureDeferred
async def test_delete_provider_session(h: Harness) -> None:
    """
    Back-channel logout with a ``sid`` ends exactly the sessions bound to
    that provider session.
    """
    iss, other_iss = "https://op.example", "https://other.example"
    a1 = await _logged_in(h, "ann", issuer=iss, sid="s1")
    a2 = await _logged_in(h, "ann2", issuer=iss, sid="s1")
    b = await _logged_in(h, "ann", issuer=iss, sid="s2")
    c = await _logged_in(h, "ann", issuer=other_iss, sid="s1")
    h.clock.advance(1)
    count = await h.cache.delete_provider_session(iss, "s1")
    assert count == (2 if h.server_side else -1)
    assert await h.cache.load(a1) is None
    assert await h.cache.load(a2) is None
    assert await h.cache.load(b) is not None
    assert await h.cache.load(c) is not None


@pytest_twisted.ensureDeferred
async def test_version_increments_per_save(h: Harness) -> None:
    session = await h.cache.create()
    session["n"] = 0
    token = await h.cache.save(session)
    for n in range(1, 4):
        session = await h.cache.load(token)
        assert session.version == n
        session["n"] = n
        token = await h.cache.save(session)
        assert session.version == n + 1
    assert (await h.cache.load(token)).version == 4


@pytest_twisted.ensureDeferred
async def test_deleted_keys_are_removed(h: Harness) -> None:
    token = await _saved(h, a=1, b=2)
    session = await h.cache.load(token)
    del session["a"]
    token = await h.cache.save(session)
    assert (await h.cache.load(token)).data == {"b": 2}


@pytest_twisted.ensureDeferred
async def test_value_that_is_not_json_fails_the_save(h: Harness) -> None:
    """
    Every cache stores JSON (never pickle): a value JSON cannot hold fails
    the save with `TypeError`, whichever the cache.
    """
    for bad in (object(), b"bytes", float("nan"), {1, 2}):
        session = await h.cache.create()
        session["bad"] = bad
        with pytest.raises(TypeError):
            await h.cache.save(session)
    assert await h.stored() == 0


@pytest_twisted.ensureDeferred
async def test_concurrent_saves_of_different_keys_both_persist(server_h: Harness) -> None:
    """
    Two requests load the same session and change different keys: both
    changes are kept (save by difference), and the version counts both.
    """
    h = server_h
    token = await _saved(h, base=0)
    first = await h.cache.load(token)
    second = await h.cache.load(token)
    first["a"] = 1
    second["b"] = 2
    del second["base"]
    assert await h.cache.save(first) == token
    assert await h.cache.save(second) == token
    loaded = await h.cache.load(token)
    assert loaded.data == {"a": 1, "b": 2}
    assert loaded.version == 3


@pytest_twisted.ensureDeferred
async def test_login_on_one_request_and_data_on_another_both_persist(server_h: Harness) -> None:
    h = server_h
    token = await _saved(h, base=0)
    first = await h.cache.load(token)
    second = await h.cache.load(token)
    first.set_roles(["editor"])
    second["cart"] = ["book"]
    await h.cache.save(first)
    await h.cache.save(second)
    loaded = await h.cache.load(token)
    assert loaded.roles == {"editor"} and loaded["cart"] == ["book"]


@pytest_twisted.ensureDeferred
async def test_nothing_secret_is_logged(h: Harness) -> None:
    """
    Case 16 for this layer: a whole life cycle (create, save, load, renew,
    delete, log out everywhere) logs no session id, token or CSRF token.
    """
    with capture_logs() as lines:
        session = await h.cache.create()
        session["a"] = 1
        first = await h.cache.save(session)
        secrets_seen = {first, session.id, session.csrf_token}
        session = await h.cache.load(first)
        session.log_in("ann", [], now=h.clock.seconds())
        second = await h.cache.renew(session)
        secrets_seen |= {second, session.id, session.csrf_token}
        assert await h.cache.load(first) is None
        await h.cache.delete(await h.cache.load(second))
        await h.cache.delete_user("ann")
        repr(session)
    text = "\n".join(lines)
    for secret in secrets_seen:
        assert secret not in text
    assert session.id not in repr(session)
