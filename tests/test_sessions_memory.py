"""
What only the memory session cache does: its size bound (least recently
used dropped first), dropping expired sessions without timers, and indexes
that do not leak.  Everything runs synchronously on a `Clock`.
"""

from __future__ import annotations

from typing import Any

from test_sessions_support import result_of
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth.sessions import MemorySessionCache


class MemoryCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no timer ever runs

    def cache(self, **kwargs: Any) -> MemorySessionCache:
        return MemorySessionCache(clock=self.clock, **kwargs)

    def saved(self, cache: MemorySessionCache, user: Any = None, **data: Any) -> str:
        session = result_of(cache.create())
        session.update(data)
        if user is not None:
            session.log_in(
                user, [], now=self.clock.seconds(), issuer="https://op", provider_sid=user
            )
        return result_of(cache.save(session))

    def test_size_bound_drops_the_least_recently_used(self) -> None:
        cache = self.cache(max_entries=3)
        a, b, c = (self.saved(cache, n=n) for n in range(3))
        self.assertIsNotNone(result_of(cache.load(a)))  # a is now the most recent
        d = self.saved(cache, n=3)
        self.assertEqual(len(cache), 3)
        self.assertIsNone(result_of(cache.load(b)))
        for token in (a, c, d):
            self.assertIsNotNone(result_of(cache.load(token)))

    def test_expired_sessions_are_dropped_on_writes(self) -> None:
        """
        Sessions nobody loads again still leave memory: each write drops a
        few expired ones from the least recently used end.
        """
        cache = self.cache(idle_timeout=10, absolute_timeout=100)
        for _ in range(20):
            self.saved(cache, "ann")
        self.clock.advance(11)
        for _ in range(5):
            self.saved(cache)
        self.assertEqual(len(cache), 5)
        self.assertEqual(cache._by_user, {})
        self.assertEqual(cache._by_provider, {})

    def test_indexes_do_not_leak(self) -> None:
        cache = self.cache(max_entries=2)
        tokens = [self.saved(cache, f"user{n}") for n in range(10)]
        self.assertEqual(len(cache._by_user), 2)
        for token in tokens[-2:]:
            result_of(cache.delete(result_of(cache.load(token))))
        self.assertEqual((len(cache), cache._by_user, cache._by_provider), (0, {}, {}))

    def test_loaded_sessions_do_not_alias_the_store(self) -> None:
        cache = self.cache()
        token = self.saved(cache, cart=["book"])
        session = result_of(cache.load(token))
        session["cart"].append("pen")  # changed in place, never saved
        self.assertEqual(result_of(cache.load(token))["cart"], ["book"])

    def test_every_use_is_recorded(self) -> None:
        """
        The memory cache records each use for free (no write cost), so its
        idle timeout is exact.
        """
        cache = self.cache(idle_timeout=100)
        token = self.saved(cache)
        self.clock.advance(99)
        session = result_of(cache.load(token))
        self.assertEqual(session.last_seen, self.clock.seconds())
        self.assertFalse(session.dirty)
        self.clock.advance(99)
        self.assertIsNotNone(result_of(cache.load(token)))

    def test_bad_configuration(self) -> None:
        for kwargs in ({"max_entries": 0}, {"idle_timeout": 0}, {"absolute_timeout": -1}):
            with self.assertRaises(ValueError):
                self.cache(**kwargs)
