"""
The token manager (`twistauth.identity.tokens`) on a `Clock`, against
`FakeProvider` through ``StubTreq``: sealing at rest (#44), refresh at the
margin, rotation (#45), a refreshed ID token naming someone else (#46),
fatal and passing refresh failures with backoff (#47), single flight in a
process and across "processes" sharing a lock (#48), a dead lock holder
(#49, R1).
"""

from __future__ import annotations

from typing import Any, List, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth.accounts.memory import MemoryUserStore
from twistauth.identity.errors import (
    ProviderBadResponseError,
    RefreshRejectedError,
)
from twistauth.identity.tokens import (
    MemoryRefreshLock,
    NoProviderLoginError,
    ProviderLoginExpiredError,
    RefreshPendingError,
    TokenManager,
    TokenSealer,
    _Unreadable,
    derive_token_key,
)
from twistauth.testing import FakeProvider

USER = "fake:alice"
KEY = bytes(range(32))


class _Base(SynchronousTestCase):
    rotate = True

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.fake = FakeProvider(clock=self.clock, rotate_refresh_tokens=self.rotate)
        self.fake.slow_seconds = 1.0
        self.http = self.fake.stub()
        self.rp = self.fake.relying_party(http_client=self.http)
        self.users = MemoryUserStore(clock=self.clock)
        self.lock = MemoryRefreshLock(clock=self.clock)
        self.ended: List[Tuple[str, str]] = []
        self.manager = self.make_manager()
        self.log_in()

    def make_manager(self, **kwargs: Any) -> TokenManager:
        options = {
            "users": self.users,
            "parties": {"fake": self.rp},
            "sealer": TokenSealer(key=derive_token_key(KEY)),
            "clock": self.clock,
            "lock": self.lock,
            "end_sessions": lambda user_id, reason: self.ended.append((user_id, reason)),
        }
        options.update(kwargs)
        return TokenManager(**options)

    def log_in(self, sid: str = "sid-1") -> Any:
        result = self.successResultOf(self.fake.log_in(self.rp))
        user = self.successResultOf(self.manager.prepare_user(result))
        self.successResultOf(self.manager.record_login(user.user_id, result, sid=sid))
        return result

    def stored(self) -> Any:
        return self.successResultOf(self.manager.get_user_context(USER))

    def refresh(self, manager: Any = None) -> Deferred[Any]:
        return (manager or self.manager).get_user_context_and_refresh(USER)

    def settle(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.http.flush()


class SealingTests(_Base):
    def test_sealed_and_bound(self) -> None:
        """
        The record holds the tokens only sealed; another key, a tampered
        value or a moved value opens to nothing (#44).
        """
        entry = self.successResultOf(self.users.get(USER)).tokens["fake"]
        self.assertEqual(sorted(entry), ["alg", "data", "kid", "logins", "updated"])
        tokens = self.stored().tokens
        self.assertNotIn(tokens.access_token, repr(entry))
        other = self.make_manager(sealer=TokenSealer(key=derive_token_key(bytes(32))))
        self.failureResultOf(other.get_user_context(USER), NoProviderLoginError)
        data = entry["data"]
        tampered = data[:-2] + ("AA" if data[-2:] != "AA" else "BB")
        sealer = TokenSealer(key=derive_token_key(KEY))
        with self.assertRaises(_Unreadable):
            sealer.open(USER, "fake", dict(entry, data=tampered))
        with self.assertRaises(_Unreadable):
            sealer.open("fake:mallory", "fake", entry)
        self.assertEqual(sealer.open(USER, "fake", entry)["tokens"]["access_token"],
                         tokens.access_token)
        self.assertNotIn(KEY.hex(), repr(sealer))

    def test_key_derivation(self) -> None:
        self.assertNotEqual(derive_token_key(KEY), KEY)
        self.assertEqual(len(derive_token_key(KEY)), 32)
        with self.assertRaises(ValueError):
            derive_token_key(b"short")

    def test_unknown_user(self) -> None:
        self.failureResultOf(self.manager.get_user_context("fake:nobody"), NoProviderLoginError)
        self.failureResultOf(self.manager.get_user_context_and_refresh("fake:bob"),
                             NoProviderLoginError)


class RefreshTests(_Base):
    def test_no_refresh_before_the_margin(self) -> None:
        self.settle(3600 - 61)
        context = self.successResultOf(self.refresh())
        self.assertEqual(context.tokens.access_token, self.stored().tokens.access_token)
        self.assertEqual(self.fake.hits["token"], 1)

    def test_refresh_within_the_margin(self) -> None:
        before = self.stored().tokens
        self.settle(3600 - 59)
        context = self.successResultOf(self.refresh())
        self.assertEqual(self.fake.hits["token"], 2)
        self.assertNotEqual(context.tokens.access_token, before.access_token)
        self.assertEqual(self.stored().tokens.access_token, context.tokens.access_token)
        self.assertEqual(context.tokens.expires_at, self.clock.seconds() + 3600)
        self.assertEqual(self.fake.token_requests[-1]["grant_type"], "refresh_token")

    def test_margin_is_at_most_half_the_lifetime(self) -> None:
        """
        Tokens that live 60 s are refreshed 30 s before expiry, not on every
        call because the margin (60 s) exceeds their life.
        """
        self.fake.access_token_lifetime = 60
        self.log_in()
        hits = self.fake.hits["token"]
        self.settle(29)
        self.successResultOf(self.refresh())
        self.assertEqual(self.fake.hits["token"], hits)
        self.settle(2)
        self.successResultOf(self.refresh())
        self.assertEqual(self.fake.hits["token"], hits + 1)
        self.successResultOf(self.refresh())
        self.assertEqual(self.fake.hits["token"], hits + 1)

    def test_rotation_replaces_the_refresh_token(self) -> None:
        """A rotated refresh token replaces the old one; the old is never reused (#45)."""
        seen = [self.stored().tokens.refresh_token]
        for _ in range(3):
            self.settle(3600)
            context = self.successResultOf(self.refresh())
            self.assertNotIn(context.tokens.refresh_token, seen)
            self.assertEqual(self.stored().tokens.refresh_token, context.tokens.refresh_token)
            seen.append(context.tokens.refresh_token)
        self.assertEqual(self.fake.hits["token"], 4)
        self.assertEqual(self.fake.reused_refresh_tokens, 0)

    def test_refresh_without_a_new_refresh_token_keeps_the_old(self) -> None:
        before = self.stored().tokens
        self.fake.misbehave("token", "no_refresh_token", once=True)
        self.settle(3600)
        context = self.successResultOf(self.refresh())
        self.assertEqual(context.tokens.refresh_token, before.refresh_token)
        self.assertEqual(self.stored().tokens.refresh_token, before.refresh_token)
        self.assertEqual(self.stored().tokens.id_token, context.tokens.id_token)

    def test_refreshed_id_token_of_someone_else(self) -> None:
        """
        A refreshed ID token with another sub, iss or aud is discarded,
        the tokens deleted and the user's sessions ended (#46).
        """
        for fault in ("sub_changed", "wrong_iss", "wrong_aud"):
            self.ended.clear()
            self.fake.misbehave("id_token", fault, once=True)
            self.settle(3600)
            self.failureResultOf(self.refresh(), RefreshRejectedError)
            self.assertEqual(self.ended, [(USER, "refresh_rejected")], fault)
            self.failureResultOf(self.manager.get_user_context(USER), NoProviderLoginError)
            self.log_in()

    def test_dead_grant_ends_the_sessions(self) -> None:
        """invalid_grant or invalid_client: tokens deleted, sessions ended (#47)."""
        for fault in ("invalid_grant", "invalid_client"):
            self.ended.clear()
            self.fake.misbehave("token", fault, once=True)
            self.settle(3600)
            self.failureResultOf(self.refresh(), RefreshRejectedError)
            self.assertEqual(self.ended, [(USER, "refresh_rejected")])
            self.failureResultOf(self.manager.get_user_context(USER), NoProviderLoginError)
            user = self.successResultOf(self.users.get(USER))
            self.assertEqual([sid for sid, _ in self.manager.logins(user, "fake")[0]],
                             ["sid-1"] if fault == "invalid_grant" else ["sid-1", "sid-1"])
            self.log_in()

    def test_revoked_grant(self) -> None:
        self.fake.revoke_grants()
        self.settle(3600)
        self.failureResultOf(self.refresh(), RefreshRejectedError)
        self.assertEqual(self.ended, [(USER, "refresh_rejected")])

    def test_passing_failure_keeps_the_session_and_backs_off(self) -> None:
        """
        A 5xx keeps tokens and sessions; the current access token is used
        while it lasts; retries back off exponentially; once it expired the
        failure is the caller's (502); recovery refreshes (#47).
        """
        # (A rotating provider would rotate before its 500: see test_lost_answer.)
        self.fake.rotate_refresh_tokens = False
        before = self.stored().tokens
        self.fake.misbehave("token", "error_500")
        self.settle(3600 - 50)
        context = self.successResultOf(self.refresh())
        self.assertEqual(context.tokens.access_token, before.access_token)
        self.assertEqual(self.fake.hits["token"], 2)
        self.successResultOf(self.refresh())
        self.assertEqual(self.fake.hits["token"], 2)  # backing off: 1 s
        self.settle(1)
        self.successResultOf(self.refresh())
        self.assertEqual(self.fake.hits["token"], 3)
        self.settle(1)
        self.successResultOf(self.refresh())
        self.assertEqual(self.fake.hits["token"], 3)  # now 2 s
        self.settle(1)
        self.successResultOf(self.refresh())
        self.assertEqual(self.fake.hits["token"], 4)
        self.settle(60)  # expired now
        self.failureResultOf(self.refresh(), ProviderBadResponseError)
        self.assertEqual(self.ended, [])
        self.fake.behave()
        self.settle(60)
        context = self.successResultOf(self.refresh())
        self.assertNotEqual(context.tokens.access_token, before.access_token)
        self.assertEqual(self.manager.counts["failed"], 4)

    def test_lost_answer(self) -> None:
        """
        A rotating provider that rotated but whose answer was lost (a 500
        after rotating) sees the old refresh token again, calls it reuse and
        revokes the grant: the login ends (nothing better is possible; it
        is why refreshes are single-flight).
        """
        self.fake.misbehave("token", "error_500", once=True)
        self.settle(3600 - 30)
        self.successResultOf(self.refresh())
        self.settle(1)
        self.failureResultOf(self.refresh(), RefreshRejectedError)
        self.assertEqual(self.fake.reused_refresh_tokens, 1)
        self.assertEqual(self.ended, [(USER, "refresh_rejected")])

    def test_network_failure_is_passing(self) -> None:
        self.fake.misbehave("token", "reset", once=True)
        self.settle(3600 - 30)
        before = self.stored().tokens
        context = self.successResultOf(self.refresh())
        self.assertEqual(context.tokens.access_token, before.access_token)
        self.assertEqual(self.ended, [])
        self.settle(1)
        self.assertNotEqual(self.successResultOf(self.refresh()).tokens.access_token,
                            before.access_token)

    def test_timeout_is_passing(self) -> None:
        self.fake.slow_seconds = 30
        self.fake.misbehave("token", "slow", once=True)
        self.settle(3600 - 30)
        d = self.refresh()
        self.assertNoResult(d)
        self.settle(5)
        context = self.successResultOf(d)
        self.assertEqual(context.tokens.access_token, self.stored().tokens.access_token)
        self.assertEqual(self.ended, [])
        self.settle(30)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_refresh_token(self) -> None:
        self.fake.misbehave("token", "no_refresh_token", once=True)
        self.ended.clear()
        self.log_in()
        self.settle(3600 - 30)
        self.successResultOf(self.refresh())  # still valid
        self.settle(60)
        self.failureResultOf(self.refresh(), ProviderLoginExpiredError)
        self.assertEqual(self.ended, [])

    def test_new_login_during_a_refresh_wins(self) -> None:
        self.fake.misbehave("token", "slow", once=True)
        self.settle(3600)
        d = self.refresh()
        newer = self.log_in()
        self.settle(1)
        self.successResultOf(d)
        self.assertEqual(self.stored().tokens.access_token, newer.tokens.access_token)
        self.assertEqual(self.manager.counts["superseded"], 1)


class SingleFlightTests(_Base):
    def test_concurrent_callers_share_one_refresh(self) -> None:
        """N concurrent callers in one process: one token-endpoint call (#48)."""
        for n in (2, 5, 50):
            self.fake.misbehave("token", "slow", once=True)
            self.settle(3600)
            hits = self.fake.hits["token"]
            calls = [self.refresh() for _ in range(n)]
            for d in calls:
                self.assertNoResult(d)
            self.settle(1)
            tokens = {self.successResultOf(d).tokens.access_token for d in calls}
            self.assertEqual(len(tokens), 1)
            self.assertEqual(self.fake.hits["token"], hits + 1, n)
        self.assertEqual(self.fake.reused_refresh_tokens, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_caller_that_leaves(self) -> None:
        self.fake.misbehave("token", "slow", once=True)
        self.settle(3600)
        first, second, third = self.refresh(), self.refresh(), self.refresh()
        second.cancel()
        self.failureResultOf(second)
        first.cancel()
        self.failureResultOf(first)
        self.settle(1)
        self.successResultOf(third)
        self.assertEqual(self.fake.hits["token"], 2)

    def test_two_processes_share_one_refresh(self) -> None:
        """
        Two managers (two processes' worth of in-process state) over one
        lock and one user store: one token call; the waiting one polls and
        takes the result; the holder's lease is renewed while the refresh
        takes longer than the lease (#48).
        """
        other = self.make_manager()
        self.fake.slow_seconds = 3.0
        self.fake.misbehave("token", "slow", once=True)
        self.settle(3600)
        mine, theirs = self.refresh(), self.refresh(other)
        for _ in range(350):  # past the 3 s answer, and beyond the 2 s lease
            self.settle(0.01)
        a, b = self.successResultOf(mine), self.successResultOf(theirs)
        self.assertEqual(a.tokens.access_token, b.tokens.access_token)
        self.assertEqual(self.fake.hits["token"], 2)
        self.assertEqual(other.counts["waited"] + self.manager.counts["waited"], 1)
        self.assertEqual(self.manager.counts["refreshed"] + other.counts["refreshed"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waiting_too_long(self) -> None:
        """
        Another process holds the refresh longer than the wait: an expired
        token answers 503 (retry) rather than a second refresh.
        """
        other = self.make_manager(wait_timeout=1.0)
        self.fake.slow_seconds = 4.5
        self.fake.misbehave("token", "slow", once=True)
        self.settle(3700)  # expired
        mine = self.refresh()
        self.settle(0.5)
        theirs = self.refresh(other)
        for _ in range(500):
            self.settle(0.01)
        self.failureResultOf(theirs, RefreshPendingError)
        self.successResultOf(mine)
        self.assertEqual(self.fake.hits["token"], 2)

    def test_dead_lock_holder(self) -> None:
        """
        A process died holding the lock: its lease expires and the next
        caller refreshes, within the lease (#49, R1).
        """
        name = self.manager._lock_name(USER, "fake")
        self.settle(3600)
        self.successResultOf(self.lock.acquire(name, 2.0))
        started = self.clock.seconds()
        d = self.refresh()
        self.assertNoResult(d)
        while not d.called:
            self.settle(0.025)
        self.successResultOf(d)
        waited = self.clock.seconds() - started
        self.assertGreaterEqual(waited, 2.0)
        self.assertLess(waited, 2.1)
        self.assertEqual(self.fake.hits["token"], 2)

    def test_lock_released_by_its_owner_only(self) -> None:
        lease = self.successResultOf(self.lock.acquire("x", 2.0))
        self.assertIsNone(self.successResultOf(self.lock.acquire("x", 2.0)))
        self.assertFalse(self.successResultOf(self.lock.release("x", "not-the-token")))
        self.assertFalse(self.successResultOf(self.lock.renew("x", "not-the-token", 2.0)))
        self.assertIsNone(self.successResultOf(self.lock.acquire("x", 2.0)))
        self.assertTrue(self.successResultOf(lease.renew()))
        self.assertTrue(self.successResultOf(lease.release()))
        self.assertFalse(self.successResultOf(lease.release()))
        self.assertIsNotNone(self.successResultOf(self.lock.acquire("x", 2.0)))


class LoginsTests(_Base):
    def test_logins_are_remembered_and_pruned(self) -> None:
        manager = self.make_manager(max_logins=3, session_lifetime=1000)
        self.manager = manager
        for i in range(5):
            self.clock.advance(10)
            self.log_in(sid=f"s{i}")
        user = self.successResultOf(self.users.get(USER))
        logins, older = manager.logins(user, "fake")
        self.assertEqual([sid for sid, _ in logins], ["s2", "s3", "s4"])
        self.assertEqual(older, self.clock.seconds() - 30)
        self.clock.advance(1000)
        self.log_in(sid="late")
        user = self.successResultOf(self.users.get(USER))
        self.assertEqual(manager.logins(user, "fake"), ([("late", self.clock.seconds())], None))
        self.successResultOf(manager.forget_logins(USER, "fake", ["late"]))
        user = self.successResultOf(self.users.get(USER))
        self.assertEqual(manager.logins(user, "fake"), ([], None))
