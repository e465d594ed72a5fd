"""
What only the client-side (sealed) session cache does: checklist group H
through the cache (76 tamper → no session, 78 carrier binding, 79 time
inside, 80 rotation and re-sealing, 81 revocation, 82 size, 83 keys), fault
test R9 (a rolling restart that adds a key logs nobody out), touches that
re-seal only when due, and a Redis outage of the revocation store (a 503,
not "no session").
"""

from __future__ import annotations

import base64
import time
from typing import Any, Iterator

import pytest
import pytest_twisted
from conftest import RedisServer, cached_scripts, flush_scripts
from test_sessions_support import IDLE, connect, result_of
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twistauth import redisconn
from twistauth._fired import PENDING, fired_value
from twistauth.sessions import (
    ClientSessionCache,
    KeyringError,
    MemoryRevocations,
    RedisRevocations,
    SessionStoreUnavailableError,
    SessionTooLargeError,
)
from twistauth.sessions._interfaces import IRevocations, Session
from twistauth.sessions.sealing import KEY_ID_BYTES, key_id

K_OLD = bytes(range(32))
K_NEW = bytes(range(100, 132))
ABSOLUTE = 43200.0


def _key_of(token: str) -> bytes:
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    return raw[1 : 1 + KEY_ID_BYTES]


@implementer(IRevocations)
class LaterRevocations:
    """
    Revocations in memory that answer only when `answer` is called (as a
    store that does I/O), or fail at once when told to.
    """

    def __init__(self, clock: Clock) -> None:
        self.memory = MemoryRevocations(clock=clock)
        self.waiting: Any = []
        self.failing = False

    def answer(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, session in waiting:
            d.callback(result_of(self.memory.is_revoked(session)))

    def revoke_session(self, session_id: str, ttl: float) -> Any:
        return self.memory.revoke_session(session_id, ttl)

    def revoke_user(self, user_id: str, not_before: float, ttl: float) -> Any:
        return self.memory.revoke_user(user_id, not_before, ttl)

    def revoke_provider_session(self, issuer: str, provider_sid: str, ttl: float) -> Any:
        return self.memory.revoke_provider_session(issuer, provider_sid, ttl)

    def is_revoked(self, session: Session) -> Any:
        if self.failing:
            return fail(SessionStoreUnavailableError())
        d: Deferred[bool] = Deferred()
        self.waiting.append((d, session))
        return d


class AnsweredRevocations(LaterRevocations):
    """
    Answers with a Deferred that has fired already, not being the memory
    store itself.
    """

    def is_revoked(self, session: Session) -> Any:
        return succeed(result_of(self.memory.is_revoked(session)))


class NeverRevoked(MemoryRevocations):
    """
    A subclass that changes the answer: the cache must ask it.
    """

    def is_revoked(self, session: Session) -> Any:
        return succeed(False)


class ClientCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.revocations = MemoryRevocations(clock=self.clock)

    def cache(self, keys: Any = (K_OLD,), **kwargs: Any) -> ClientSessionCache:
        options = {"idle_timeout": IDLE, "absolute_timeout": ABSOLUTE}
        options.update(kwargs)
        return ClientSessionCache(
            keys=list(keys), revocations=self.revocations, clock=self.clock, **options
        )

    def saved(self, cache: ClientSessionCache, user: Any = None, **data: Any) -> str:
        session = result_of(cache.create())
        session.update(data)
        if user is not None:
            session.log_in(user, [], now=self.clock.seconds())
        token = result_of(cache.save(session))
        assert token
        return token

    def load(self, cache: ClientSessionCache, token: str) -> Any:
        return result_of(cache.load(token))

    # -- 76 ------------------------------------------------------------------

    def test_tampered_tokens_are_no_session(self) -> None:
        """
        Case 76 through the cache: every changed character, truncation and
        junk loads as no session, never an exception.
        """
        cache = self.cache()
        token = self.saved(cache, "ann", a=1)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        for i in range(len(token)):
            other = alphabet[(alphabet.index(token[i]) + 7) % 64]
            self.assertIsNone(self.load(cache, token[:i] + other + token[i + 1 :]))
        for n in range(0, len(token), 7):
            self.assertIsNone(self.load(cache, token[:n]))
        for junk in ("", "x", "💥", "A" * 5000, "." * 100):
            self.assertIsNone(self.load(cache, junk))
        self.assertEqual(self.load(cache, token)["a"], 1)
        self.assertEqual(len(self.revocations), 0)  # nothing was recorded

    # -- 78 ------------------------------------------------------------------

    def test_token_is_bound_to_its_carrier(self) -> None:
        """
        Case 78: a token minted for the cookie does not open as the header
        (or another cookie), and the reverse.
        """
        cookie = self.cache(carrier_name="twistauth_session")
        header = self.cache(carrier_name="X-Twistauth-Session")
        from_cookie = self.saved(cookie, "ann")
        from_header = self.saved(header, "ann")
        self.assertIsNone(self.load(header, from_cookie))
        self.assertIsNone(self.load(cookie, from_header))
        self.assertIsNotNone(self.load(cookie, from_cookie))
        self.assertIsNotNone(self.load(header, from_header))

    # -- 79 / 70 -----------------------------------------------------------

    def test_expiry_is_inside_the_token(self) -> None:
        """
        Case 79: an old token re-sent (say with a forged cookie Max-Age)
        is refused once its sealed expiry passes; a token sealed more than 5
        minutes in our future is refused.
        """
        cache = self.cache()
        token = self.saved(cache, "ann")
        self.clock.advance(IDLE + 1)
        self.assertIsNone(self.load(cache, token))
        ahead_clock = Clock()
        ahead_clock.advance(self.clock.seconds() + 301)
        ahead = ClientSessionCache(keys=[K_OLD], revocations=self.revocations, clock=ahead_clock)
        self.assertIsNone(self.load(cache, self.saved(ahead)))
        near_clock = Clock()
        near_clock.advance(self.clock.seconds() + 299)
        near = ClientSessionCache(keys=[K_OLD], revocations=self.revocations, clock=near_clock)
        self.assertIsNotNone(self.load(cache, self.saved(near)))

    def test_touch_reseals_only_when_due(self) -> None:
        """
        A load asks for a new token (marks the session dirty) only when its
        recorded use is older than a tenth of the idle timeout.
        """
        cache = self.cache()
        token = self.saved(cache, a=1)
        self.clock.advance(IDLE * 0.09)
        session = self.load(cache, token)
        self.assertFalse(session.dirty)
        self.clock.advance(IDLE * 0.02)
        session = self.load(cache, token)
        self.assertTrue(session.dirty)
        fresh = result_of(cache.save(session))
        self.assertNotEqual(fresh, token)
        self.clock.advance(IDLE * 0.95)
        self.assertIsNone(self.load(cache, token))  # the untouched one expired
        self.assertIsNotNone(self.load(cache, fresh))

    # -- 80 / R9 -----------------------------------------------------------

    def test_rotation_reseals_with_the_newest_key(self) -> None:
        """
        Case 80: after a new key is put first, a session sealed with the old
        key still loads, is marked dirty, and its next save seals it with
        the new key; once the old key is removed, old tokens are no session
        (not an error) and re-sealed ones still work.
        """
        old = self.cache(keys=[K_OLD])
        token = self.saved(old, "ann", a=1)
        rotated = self.cache(keys=[K_NEW, K_OLD])
        session = self.load(rotated, token)
        self.assertEqual(session["a"], 1)
        self.assertTrue(session.dirty)
        resealed = result_of(rotated.save(session))
        self.assertEqual(_key_of(resealed), key_id(K_NEW))
        self.assertFalse(self.load(rotated, resealed).dirty)
        retired = self.cache(keys=[K_NEW])
        self.assertIsNone(self.load(retired, token))
        self.assertEqual(self.load(retired, resealed)["a"], 1)

    def test_a_token_loaded_again_is_checked_again(self) -> None:
        """
        A token loaded before (its sealer remembers what it opened) loads
        into a session of its own each time, is marked for re-sealing
        each time while its key is old, stops loading once its key is
        retired, and is checked for revocation on every load.
        """
        old = self.cache(keys=[K_OLD])
        token = self.saved(old, "ann", a={"n": 1})
        first = self.load(old, token)
        first["a"]["n"] = 2
        first["b"] = 3
        again = self.load(old, token)
        self.assertEqual((again["a"], again.get("b")), ({"n": 1}, None))
        old.replace_keys([K_NEW, K_OLD])
        for _ in range(2):
            self.assertTrue(self.load(old, token).dirty)
        old.replace_keys([K_NEW])
        self.assertIsNone(self.load(old, token))
        cache = self.cache()
        phone = self.saved(cache, "bob")
        self.assertIsNotNone(self.load(cache, phone))
        self.clock.advance(1)
        result_of(cache.delete_user("bob"))
        self.assertIsNone(self.load(cache, phone))

    def test_rolling_restart_adding_a_key_logs_nobody_out(self) -> None:
        """
        R9: stage 1 deploys the new key second (open-only) process by
        process, while old processes still run; stage 2 promotes it.  At no
        point does a session stop loading on any process.
        """
        a = self.cache(keys=[K_OLD])  # not yet restarted
        b = self.cache(keys=[K_OLD, K_NEW])  # restarted: new key open-only
        token_a = self.saved(a, "ann", n=1)
        token_b = self.saved(b, "bob", n=2)
        self.assertEqual(_key_of(token_b), key_id(K_OLD))  # still seals with the old key
        for process in (a, b):
            for token in (token_a, token_b):
                self.assertIsNotNone(self.load(process, token))
        # Stage 2: every process has both keys; they restart with the new one first.
        c = self.cache(keys=[K_NEW, K_OLD])
        token_c = self.saved(c, "cat", n=3)
        self.assertEqual(_key_of(token_c), key_id(K_NEW))
        for process in (b, c):  # a is gone by now
            for token in (token_a, token_b, token_c):
                self.assertIsNotNone(self.load(process, token))

    # -- 81 ------------------------------------------------------------------

    def test_logout_revokes_the_token(self) -> None:
        """
        Case 81: after logout the same token (replayed from a copy) is no
        session; the record lasts until the session would have expired.
        """
        cache = self.cache()
        token = self.saved(cache, "ann")
        copy = token
        result_of(cache.delete(self.load(cache, token)))
        self.assertIsNone(self.load(cache, copy))
        self.assertEqual(len(self.revocations), 1)
        self.clock.advance(ABSOLUTE + 301)
        self.assertEqual(len(self.revocations), 0)  # no record outlives its use

    def test_renewal_revokes_the_old_token(self) -> None:
        """
        Case 68 for sealed sessions: the pre-login token dies at login.
        """
        cache = self.cache()
        token = self.saved(cache, a=1)
        session = self.load(cache, token)
        session.log_in("ann", [], now=self.clock.seconds())
        new = result_of(cache.renew(session))
        self.assertIsNone(self.load(cache, token))
        self.assertEqual(self.load(cache, new).user_id, "ann")

    def test_log_out_everywhere_and_back_channel(self) -> None:
        cache = self.cache()
        session = result_of(cache.create())
        session.log_in("ann", [], now=self.clock.seconds(), issuer="https://op", provider_sid="s1")
        with_sid = result_of(cache.save(session))
        phone = self.saved(cache, "ann")
        self.clock.advance(1)
        self.assertEqual(result_of(cache.delete_provider_session("https://op", "s1")), -1)
        self.assertIsNone(self.load(cache, with_sid))
        self.assertIsNotNone(self.load(cache, phone))
        self.assertEqual(result_of(cache.delete_user("ann")), -1)
        self.assertIsNone(self.load(cache, phone))
        self.clock.advance(1)
        self.assertIsNotNone(self.load(cache, self.saved(cache, "ann")))

    def test_not_before_only_moves_forward(self) -> None:
        result_of(self.revocations.revoke_user("ann", 100.0, 1000))
        result_of(self.revocations.revoke_user("ann", 50.0, 1000))
        session = result_of(self.cache().create())
        session.log_in("ann", [], now=99.0)
        self.assertTrue(result_of(self.revocations.is_revoked(session)))

    # -- 82 ------------------------------------------------------------------

    def test_too_large_is_a_clear_error(self) -> None:
        """
        Case 82: a session that would not fit in a cookie fails its save
        with an error that names the server-side caches; nothing is cut.
        """
        cache = self.cache()
        session = result_of(cache.create())
        session["blob"] = "x" * 2500
        self.assertTrue(result_of(cache.save(session)))
        session["blob"] = "x" * 3100
        failure = cache.save(session)
        error = self.failureResultOf(failure, SessionTooLargeError).value
        self.assertEqual((error.code, error.status, error.name), (50036, 500, "session_too_large"))
        self.assertGreater(error.size, 4000)
        self.assertEqual(error.limit, 4000)
        self.assertIn("server-side session cache", str(error))
        self.assertIn("redis://", str(error))
        # The carrier's name counts too.
        long_name = self.cache(carrier_name="n" * 1000)
        session = result_of(long_name.create())
        session["blob"] = "x" * 2300
        self.failureResultOf(long_name.save(session), SessionTooLargeError)

    # -- 83 ------------------------------------------------------------------

    def test_keys_must_be_32_random_bytes(self) -> None:
        for keys in ([], [b"k" * 32], [b"short"], [bytes(range(33))], [K_OLD, K_OLD]):
            with self.assertRaises(KeyringError):
                self.cache(keys=keys)
        with self.assertRaises(TypeError):
            ClientSessionCache(keys=[K_OLD], revocations=object(), clock=self.clock)

    # -- the token's contents ------------------------------------------------

    def test_every_field_survives_and_defaults_are_left_out(self) -> None:
        """
        A token leaves out the fields that hold what a missing field reads
        as (``None``, no roles, not permanent), and loads every field of
        the session it was sealed from, whether they are set or not.
        """
        cache = self.cache()
        anonymous = result_of(cache.create())
        anonymous["a"] = 1
        full = result_of(cache.create(permanent=True))
        full.log_in(
            "ann",
            ["admin", "staff"],
            now=self.clock.seconds() - 5,
            permanent=True,
            issuer="https://op",
            provider_sid="s1",
        )
        full.set_signing_key("k" * 43)
        full["cart"] = ["book", {"n": 2}]
        for session, sealed in (
            (anonymous, {"created", "last_seen", "csrf_token"}),
            (full, set(anonymous.fields()) - {"id", "version"}),
        ):
            token = result_of(cache.save(session))
            opened = cache._sealer.unseal(token, purpose=cache.purpose, now=self.clock.seconds())
            self.assertEqual(set(opened.payload["f"]), sealed)
            loaded = self.load(cache, token)
            self.assertEqual(loaded.fields(), session.fields())
            self.assertEqual(loaded.data, session.data)
            self.assertFalse(loaded.dirty)

    def test_tokens_with_every_field_still_load(self) -> None:
        """
        A token sealed before defaults were left out (every field, ``null``
        ones too) loads as it did: a rolling upgrade logs nobody out.
        """
        cache = self.cache()
        now = self.clock.seconds()
        fields = {
            "created": now - 10,
            "last_seen": now - 10,
            "user_id": None,
            "roles": [],
            "authenticated_at": None,
            "permanent": False,
            "issuer": None,
            "provider_sid": None,
            "csrf_token": "c" * 43,
            "signing_key": None,
        }
        payload = {"id": "i" * 43, "v": 3, "f": fields, "d": {"a": 1}}
        token = cache._sealer.seal(payload, purpose=cache.purpose, now=now, lifetime=60)
        session = self.load(cache, token)
        self.assertEqual(session.fields(), {**fields, "id": "i" * 43, "version": 3})
        self.assertEqual(session.data, {"a": 1})

    def test_state_that_is_not_a_dict_is_no_session(self) -> None:
        cache = self.cache()
        now = self.clock.seconds()
        for data in ([["a", 1]], "ab", None, 1):
            payload = {"id": "i" * 43, "v": 1, "f": {"created": now, "last_seen": now}, "d": data}
            token = cache._sealer.seal(payload, purpose=cache.purpose, now=now, lifetime=60)
            self.assertIsNone(self.load(cache, token), data)

    # -- revocation stores that answer at once, later, or fail -----------------

    def test_memory_store_answers_at_once(self) -> None:
        cache = self.cache()
        token = self.saved(cache, "ann", a=1)
        loading = cache.load(token)
        self.assertIsNot(fired_value(loading), PENDING)
        session = fired_value(loading)
        result_of(cache.delete(session))
        self.assertIsNone(fired_value(cache.load(token)))

    def test_a_subclass_of_the_memory_store_is_asked(self) -> None:
        self.revocations = NeverRevoked(clock=self.clock)
        cache = self.cache()
        token = self.saved(cache, "ann")
        result_of(cache.delete(self.load(cache, token)))
        self.assertTrue(result_of(MemoryRevocations.is_revoked(self.revocations, self.load(cache, token))))  # it says no
        self.assertIsNotNone(self.load(cache, token))

    def test_store_that_answered_already(self) -> None:
        self.revocations = store = AnsweredRevocations(self.clock)  # type: ignore[assignment]
        cache = self.cache()
        token = self.saved(cache, "ann", a=1)
        session = fired_value(cache.load(token))
        self.assertEqual(session["a"], 1)
        session["a"] = 2
        self.assertIsNotNone(fired_value(cache.save(session)))
        result_of(cache.delete(session))
        self.assertIsNone(fired_value(cache.load(token)))
        self.assertIsNone(fired_value(cache.save(session)))  # logged out: not brought back
        self.assertEqual(len(store.memory), 1)

    def test_store_that_answers_later(self) -> None:
        """
        Load and save wait for a store that does I/O, and follow its answer.
        """
        self.revocations = store = LaterRevocations(self.clock)  # type: ignore[assignment]
        cache = self.cache()
        token = self.saved(cache, "ann", a=1)
        loading = cache.load(token)
        self.assertIs(fired_value(loading), PENDING)
        store.answer()
        session = result_of(loading)
        self.assertEqual(session["a"], 1)
        session["a"] = 2
        saving = cache.save(session)
        self.assertIs(fired_value(saving), PENDING)
        store.answer()
        self.assertEqual(self.load_later(cache, result_of(saving))["a"], 2)
        result_of(cache.delete(session))
        loading = cache.load(token)
        store.answer()
        self.assertIsNone(result_of(loading))
        saving = cache.save(session)
        store.answer()
        self.assertIsNone(result_of(saving))

    def load_later(self, cache: ClientSessionCache, token: str) -> Any:
        loading = cache.load(token)
        self.revocations.answer()  # type: ignore[attr-defined]
        return result_of(loading)

    def test_store_failure_is_the_load_failure(self) -> None:
        self.revocations = store = LaterRevocations(self.clock)  # type: ignore[assignment]
        cache = self.cache()
        token = self.saved(cache, "ann")
        session = self.load_later(cache, token)
        store.failing = True
        self.failureResultOf(cache.load(token), SessionStoreUnavailableError)
        self.failureResultOf(cache.save(session), SessionStoreUnavailableError)

    # -- concurrency -----------------------------------------------------------

    def test_concurrent_saves_last_token_wins(self) -> None:
        """
        What the client-side cache does instead of merging: each request's
        save gives a token with its own change only; the client keeps
        whichever it received last.
        """
        cache = self.cache()
        token = self.saved(cache, base=0)
        first, second = self.load(cache, token), self.load(cache, token)
        first["a"] = 1
        second["b"] = 2
        token_first = result_of(cache.save(first))
        token_second = result_of(cache.save(second))
        self.assertEqual(self.load(cache, token_first).data, {"base": 0, "a": 1})
        self.assertEqual(self.load(cache, token_second).data, {"base": 0, "b": 2})


# -- the revocation store in Redis -------------------------------------------


@pytest.fixture
def conn(redis_server: RedisServer) -> Iterator[Any]:
    connection = connect(redis_server)
    yield connection
    pytest_twisted.blockon(redisconn.disconnect(connection))


@pytest_twisted.ensureDeferred
async def test_redis_revocations_expire_with_the_session(conn: Any) -> None:
    clock = Clock()
    clock.advance(1_000_000)
    revocations = RedisRevocations(redis=conn, clock=clock)
    cache = ClientSessionCache(
        keys=[K_OLD], revocations=revocations, clock=clock, absolute_timeout=1000
    )
    session = await cache.create()
    session["a"] = 1
    token = await cache.save(session)
    clock.advance(400)
    await cache.delete(await cache.load(token))
    (key,) = await conn.keys("twistauth:rv:s:*")
    ttl = await conn.execute_command("PTTL", key)
    assert (600 + 300 - 1) * 1000 <= ttl <= (600 + 300) * 1000  # remaining life + skew
    await cache.delete_user("ann")
    ttl = await conn.execute_command("PTTL", "twistauth:rv:u:ann")
    assert (1000 + 300 - 1) * 1000 <= ttl <= (1000 + 300) * 1000


@pytest_twisted.ensureDeferred
async def test_redis_revocations_survive_script_flush(conn: Any) -> None:
    """
    Redis forgetting its scripts (``SCRIPT FLUSH``, a restart, a failover)
    changes no answer: each script is loaded again, by concurrent checks
    too.
    """
    clock = Clock()
    clock.advance(1_000_000)
    now = clock.seconds()
    revocations = RedisRevocations(redis=conn, clock=clock)

    def session(session_id: str, user_id: str, logged_in: Any = now) -> Session:
        return Session(
            id=session_id, created=now, last_seen=now, user_id=user_id, authenticated_at=logged_in
        )

    sessions = [
        session("live", "ann"),
        session("gone", "ann"),
        session("old", "bob", now - 10),
        session("new", "bob", now + 0.5),
        session("unknown-login", "bob", None),
        Session(id="provider", created=now, last_seen=now, issuer="https://op", provider_sid="x"),
    ]
    await revocations.revoke_session("gone", 60)
    await revocations.revoke_user("bob", now + 0.25, 60)
    await revocations.revoke_provider_session("https://op", "x", 60)
    expected = [False, True, True, False, True, True]
    assert [await revocations.is_revoked(s) for s in sessions] == expected
    await flush_scripts(conn)
    assert await gatherResults([revocations.is_revoked(s) for s in sessions * 5]) == expected * 5
    await flush_scripts(conn)
    await revocations.revoke_user("ann", now + 1.5, 60)
    assert await conn.get("twistauth:rv:u:ann") == "1000001.5"
    await revocations.revoke_user("bob", now, 60)  # an earlier time changes nothing
    assert await conn.get("twistauth:rv:u:bob") == "1000000.25"
    assert [await revocations.is_revoked(s) for s in sessions] == [
        True,
        True,
        True,
        False,
        True,
        True,
    ]
    assert await cached_scripts(conn) == 2


@pytest_twisted.ensureDeferred
async def test_revocation_store_outage_is_503_not_logout(redis_server: RedisServer) -> None:
    """
    With the revocation store down, a valid token is neither accepted
    unchecked nor treated as logged out: the load fails with a 503.
    """
    connection = connect(redis_server)
    try:
        revocations = RedisRevocations(redis=connection, clock=reactor, call_timeout=0.25)
        cache = ClientSessionCache(keys=[K_OLD], revocations=revocations, clock=reactor)
        session = await cache.create()
        session.log_in("ann", [], now=reactor.seconds() - 1)
        token = await cache.save(session)
        assert (await cache.load(token)).user_id == "ann"
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(SessionStoreUnavailableError):
            await cache.load(token)
        assert time.monotonic() - started < 0.6
        with pytest.raises(SessionStoreUnavailableError):
            await cache.delete_user("ann")
    finally:
        await redisconn.disconnect(connection)  # the fixture starts Redis again
