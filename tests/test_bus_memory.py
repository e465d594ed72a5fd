"""
The memory bus's contract, on a `Clock`: timeouts at exactly the deadline,
cancellation, notify one/all, exactly-once delivery on a later turn, failing
callbacks isolated, batched fan-out, and no leaks after any mix (checklist
case 99, fault test R7 at the bus level).
"""

from __future__ import annotations

import random
from typing import Any, List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.base import DelayedCall
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twistauth.bus import (
    FIRST_BATCH,
    BusKeyError,
    BusMessageError,
    BusTimeoutError,
    IBus,
    MemoryBus,
)


class FastClock(Clock):
    """
    A `Clock` that finds a call's place by binary search instead of sorting
    the whole list at every ``callLater`` and scanning it at every
    ``cancel`` (which makes 10 000 timers take seconds).  Same order as
    `Clock`: by time, then by insertion.
    """

    _sequence = 0

    def _place(self, when: float, sequence: float) -> int:
        calls = self.calls
        low, high = 0, len(calls)
        while low < high:
            middle = (low + high) // 2
            other = calls[middle]
            if (other.getTime(), other._sequence) <= (when, sequence):
                low = middle + 1
            else:
                high = middle
        return low

    def _sortCalls(self) -> None:
        calls = self.calls
        if len(calls) < 2:
            return
        last, before = calls[-1], calls[-2]
        if (before.getTime(), before._sequence) <= (last.getTime(), last._sequence):
            return
        calls.pop()
        calls.insert(self._place(last.getTime(), last._sequence), last)

    def callLater(self, delay: float, callable: Any, *args: Any, **kw: Any) -> Any:
        FastClock._sequence += 1
        sequence = FastClock._sequence
        call = DelayedCall(
            self.seconds() + delay, callable, args, kw, self._cancel, lambda c: None, self.seconds
        )
        call._sequence = sequence
        self.calls.append(call)
        self._sortCalls()
        return call

    def _cancel(self, call: Any) -> None:
        index = self._place(call.getTime(), call._sequence) - 1
        assert self.calls[index] is call
        del self.calls[index]


def one_turn(clock: Clock) -> None:
    """
    Run the calls that are due now, as one reactor turn does: unlike
    ``Clock.advance(0)``, calls they schedule wait for the next turn.
    """
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def outcomes(d: Deferred[Any]) -> List[Tuple[str, Any]]:
    """
    Record how ``d`` fires, consuming failures.
    """
    seen: List[Tuple[str, Any]] = []
    d.addCallbacks(
        lambda value: seen.append(("value", value)),
        lambda failure: seen.append(("failure", failure.type)),
    )
    return seen


class MemoryBusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryBus(clock=self.clock)

    def assert_idle(self) -> None:
        stats = self.bus.stats()
        self.assertEqual(
            stats, {"waiters": 0, "keys": 0, "listeners": 0, "pending_deliveries": 0}
        )
        self.assertEqual(self.bus._waiters, {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_provides_ibus(self) -> None:
        self.assertTrue(verifyObject(IBus, self.bus))

    def test_notify_fires_on_a_later_turn(self) -> None:
        d = self.bus.wait_for_key("k")
        woke = self.successResultOf(self.bus.notify("k", {"a": 1}))
        self.assertIs(woke, True)
        self.assertNoResult(d)  # never inside notify
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), {"a": 1})
        self.assert_idle()

    def test_notify_without_waiters(self) -> None:
        self.assertIs(self.successResultOf(self.bus.notify("k", 1)), False)
        self.assertEqual(self.successResultOf(self.bus.notify_all("k", 1)), 0)
        self.assert_idle()

    def test_notify_wakes_exactly_one_the_oldest(self) -> None:
        first = self.bus.wait_for_key("k")
        second = self.bus.wait_for_key("k")
        self.assertIs(self.successResultOf(self.bus.notify("k", "m")), True)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(first), "m")
        self.assertNoResult(second)
        self.assertEqual(self.bus.stats()["waiters"], 1)
        self.assertIs(self.successResultOf(self.bus.notify("k", "n")), True)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(second), "n")
        self.assert_idle()

    def test_notify_all_wakes_every_waiter_of_the_key(self) -> None:
        ds = [self.bus.wait_for_key("k") for _ in range(5)]
        other = self.bus.wait_for_key("other")
        self.assertEqual(self.successResultOf(self.bus.notify_all("k", [1])), 5)
        self.clock.advance(0)
        self.assertEqual([self.successResultOf(d) for d in ds], [[1]] * 5)
        self.assertNoResult(other)
        other.cancel()
        self.failureResultOf(other, CancelledError)
        self.assert_idle()

    def test_timeout_fails_at_exactly_the_deadline(self) -> None:
        d = self.bus.wait_for_key("k", timeout=10)
        self.clock.advance(9)
        self.clock.advance(0.5)
        self.assertNoResult(d)
        self.clock.advance(0.5)  # now == 10.0 exactly
        failure = self.failureResultOf(d, BusTimeoutError)
        self.assertEqual(failure.value.status, 504)
        self.assert_idle()
        self.assertIs(self.successResultOf(self.bus.notify("k", 1)), False)

    def test_timeout_zero_waits_one_turn(self) -> None:
        d = self.bus.wait_for_key("k", timeout=0)
        self.assertNoResult(d)
        self.clock.advance(0)
        self.failureResultOf(d, BusTimeoutError)
        self.assert_idle()

    def test_negative_or_nan_timeout_is_refused(self) -> None:
        for bad in (-1, -0.001, float("nan")):
            with self.assertRaises(ValueError):
                self.bus.wait_for_key("k", timeout=bad)
        self.assert_idle()

    def test_cancel_removes_the_waiter(self) -> None:
        d = self.bus.wait_for_keys(["a", "b"], timeout=30)
        self.assertEqual(self.bus.stats()["keys"], 2)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assert_idle()
        self.assertEqual(self.successResultOf(self.bus.notify_all("a", 1)), 0)

    def test_cancel_after_selection_before_delivery(self) -> None:
        d = self.bus.wait_for_key("k", timeout=5)
        self.assertEqual(self.successResultOf(self.bus.notify_all("k", 1)), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.advance(0)
        self.assert_idle()

    def test_notified_waiter_never_times_out_afterwards(self) -> None:
        d = self.bus.wait_for_key("k", timeout=1)
        seen = outcomes(d)
        self.bus.notify_all("k", "m")
        self.clock.advance(0)
        self.clock.advance(5)
        self.assertEqual(seen, [("value", "m")])
        d.cancel()  # no effect once fired
        self.assertEqual(seen, [("value", "m")])
        self.assert_idle()

    def test_wait_for_keys_answers_the_first_key_notified(self) -> None:
        d = self.bus.wait_for_keys(["a", ("t", 1), b"c"], timeout=30)
        self.bus.notify_all(("t", 1), {"x": True})
        self.bus.notify_all("a", "later")  # same turn: the waiter is gone
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), (("t", 1), {"x": True}))
        self.assert_idle()

    def test_each_waiter_fires_exactly_once(self) -> None:
        d = self.bus.wait_for_keys(["a", "b"], timeout=3)
        seen = outcomes(d)
        self.assertIs(self.successResultOf(self.bus.notify("a", 1)), True)
        self.assertIs(self.successResultOf(self.bus.notify("b", 2)), False)
        self.assertEqual(self.successResultOf(self.bus.notify_all("a", 3)), 0)
        self.clock.advance(0)
        self.clock.advance(10)
        self.assertEqual(seen, [("value", ("a", 1))])
        self.assert_idle()

    def test_a_failing_callback_does_not_stop_the_others(self) -> None:
        ds = [self.bus.wait_for_key("k") for _ in range(3)]

        def boom(_: Any) -> None:
            raise RuntimeError("boom")

        ds[0].addCallback(boom)
        seen = [outcomes(d) for d in ds[1:]]
        self.bus.notify_all("k", "m")
        self.clock.advance(0)
        self.assertEqual(seen, [[("value", "m")], [("value", "m")]])
        self.failureResultOf(ds[0], RuntimeError)
        self.assert_idle()

    def test_callbacks_may_notify_again(self) -> None:
        later = self.bus.wait_for_key("second")
        first = self.bus.wait_for_key("first")
        first.addCallback(lambda m: self.bus.notify_all("second", m + 1))
        self.bus.notify_all("first", 1)
        one_turn(self.clock)
        self.assertNoResult(later)
        one_turn(self.clock)
        self.assertEqual(self.successResultOf(later), 2)
        self.assert_idle()

    def test_messages_must_be_json(self) -> None:
        d = self.bus.wait_for_key("k")
        for bad in ({1, 2}, object(), float("nan"), {"k": b"bytes"}, "x" * 70000):
            with self.assertRaises(BusMessageError):
                self.bus.notify_all("k", bad)
            with self.assertRaises(BusMessageError):
                self.bus.notify("k", bad)
        self.assertNoResult(d)
        message = {"list": (1, 2), "nested": {"n": None}}
        self.bus.notify_all("k", message)
        message["nested"]["n"] = "changed by the sender"
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), {"list": [1, 2], "nested": {"n": None}})
        self.assert_idle()

    def test_keys_must_be_immutable_values(self) -> None:
        for bad in (1.5, ["a"], {"a": 1}, None, True, ("a", ["b"])):
            with self.assertRaises(BusKeyError):
                self.bus.wait_for_key(bad)
            with self.assertRaises(BusKeyError):
                self.bus.notify_all(bad, 1)
        for bad_keys in ("ab", b"ab", [], [1.5]):
            with self.assertRaises(BusKeyError):
                self.bus.wait_for_keys(bad_keys)
        self.assert_idle()

    def test_fan_out_is_spread_over_turns_in_growing_batches(self) -> None:
        bus = MemoryBus(clock=self.clock, batch_size=100)
        ds = [bus.wait_for_key("k", timeout=60) for _ in range(1000)]
        self.assertEqual(self.successResultOf(bus.notify_all("k", 0)), 1000)
        self.assertEqual(self.clock.getDelayedCalls().__len__(), 1)  # timers already stopped
        fired_per_turn = []
        before = 0
        while self.clock.getDelayedCalls():
            one_turn(self.clock)
            now = sum(1 for d in ds if d.called)
            fired_per_turn.append(now - before)
            before = now
        self.assertEqual(fired_per_turn[:4], [FIRST_BATCH, 2 * FIRST_BATCH, 4 * FIRST_BATCH, 100])
        self.assertEqual(sum(fired_per_turn), 1000)
        self.assertEqual([self.successResultOf(d) for d in ds], [0] * 1000)
        self.assertEqual(bus.stats()["pending_deliveries"], 0)

    def test_listeners_see_every_notification_until_stopped(self) -> None:
        got: List[Any] = []
        listener = self.bus.listen("k", got.append)
        d = self.bus.wait_for_key("k")
        self.assertIs(self.successResultOf(self.bus.notify("k", 1)), True)
        self.assertIs(self.successResultOf(self.bus.notify("k", 2)), False)  # no waiter left
        self.assertEqual(got, [])
        self.clock.advance(0)
        self.assertEqual(got, [1, 2])
        self.assertEqual(self.successResultOf(d), 1)
        self.bus.notify_all("k", 3)
        listener.stop()  # before the delivery turn: never called
        listener.stop()
        self.clock.advance(0)
        self.assertEqual(got, [1, 2])
        self.assert_idle()

    def test_a_failing_listener_does_not_stop_the_others(self) -> None:
        got: List[Any] = []

        def boom(_: Any) -> None:
            raise ValueError("boom")

        a = self.bus.listen("k", boom)
        b = self.bus.listen("k", got.append)
        self.bus.notify_all("k", "m")
        self.clock.advance(0)
        self.assertEqual(got, ["m"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        a.stop()
        b.stop()
        self.assert_idle()

    def test_first_and_last_waiter_hooks(self) -> None:
        events: List[Tuple[str, Any]] = []
        bus = MemoryBus(
            clock=self.clock,
            on_first_waiter=lambda k: events.append(("first", k)),
            on_last_waiter=lambda k: events.append(("last", k)),
        )
        d1 = bus.wait_for_keys(["a", "b"])
        d2 = bus.wait_for_key("a", timeout=1)
        listener = bus.listen("c", lambda m: None)
        self.assertEqual(events, [("first", "a"), ("first", "b"), ("first", "c")])
        self.clock.advance(1)
        self.failureResultOf(d2, BusTimeoutError)
        self.assertEqual(len(events), 3)
        bus.notify("b", 1)
        self.assertEqual(events[3:], [("last", "a"), ("last", "b")])
        listener.stop()
        self.assertEqual(events[5:], [("last", "c")])
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d1), ("b", 1))

    def test_churn_of_ten_thousand_waiters_leaves_nothing(self) -> None:
        """
        R7 at the bus level: 10 000 waits with random cancels (client
        disconnects), timeouts and notifications; the registry returns to 0.
        """
        self.clock = FastClock()
        self.bus = MemoryBus(clock=self.clock)
        rng = random.Random(7)
        users = [f"logout:user:{i}" for i in range(50)]
        ds = []
        for i in range(10_000):
            keys = [f"logout:session:{i}", rng.choice(users)]
            ds.append(self.bus.wait_for_keys(keys, timeout=rng.choice([5, 10, 30])))
        fired = [outcomes(d) for d in ds]
        for d in rng.sample(ds, 3000):
            d.cancel()
        self.clock.advance(6)
        for user in users[:25]:
            self.bus.notify_all(user, {"reason": "logout"})
        for i in rng.sample(range(10_000), 500):
            self.bus.notify(f"logout:session:{i}", {"reason": "session"})
        self.clock.advance(0)
        for d in rng.sample(ds, 1000):
            d.cancel()
        for _ in range(200):
            self.clock.advance(0.5)
        self.assertTrue(all(len(f) == 1 for f in fired))
        self.assert_idle()


# A model of arbitrary mixes of operations.
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.lists(st.sampled_from("abc"), min_size=1, max_size=3),
                  st.one_of(st.none(), st.integers(0, 5))),
        st.tuples(st.just("notify"), st.sampled_from("abc")),
        st.tuples(st.just("notify_all"), st.sampled_from("abc")),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("advance"), st.sampled_from([0, 0.5, 1, 2])),
        st.tuples(st.just("listen"), st.sampled_from("abc")),
        st.tuples(st.just("unlisten"), st.integers(0, 50)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_any_mix_fires_each_waiter_once_and_leaks_nothing(ops: List[Any]) -> None:
    clock = Clock()
    bus = MemoryBus(clock=clock, batch_size=2)
    waits: List[Deferred[Any]] = []
    seen: List[List[Tuple[str, Any]]] = []
    listeners: List[Any] = []
    for op in ops:
        if op[0] == "wait":
            d = bus.wait_for_keys(op[1], timeout=op[2])
            assert not d.called
            waits.append(d)
            seen.append(outcomes(d))
        elif op[0] in ("notify", "notify_all"):
            before = [len(s) for s in seen]
            getattr(bus, op[0])(op[1], op[1])
            assert [len(s) for s in seen] == before  # never re-entrant
        elif op[0] == "cancel" and waits:
            waits[op[1] % len(waits)].cancel()
        elif op[0] == "advance":
            clock.advance(op[1])
        elif op[0] == "listen":
            listeners.append(bus.listen(op[1], lambda m: None))
        elif op[0] == "unlisten" and listeners:
            listeners[op[1] % len(listeners)].stop()
    for listener in listeners:
        listener.stop()
    for d in waits:
        d.cancel()
    clock.advance(0)
    for s in seen:
        assert len(s) == 1
        kind, value = s[0]
        assert (kind, value) in (("failure", CancelledError), ("failure", BusTimeoutError)) or (
            kind == "value" and value[0] == value[1]
        )
    assert bus.stats() == {"waiters": 0, "keys": 0, "listeners": 0, "pending_deliveries": 0}
    assert bus._waiters == {} and bus._listeners == {}
    assert clock.getDelayedCalls() == []
