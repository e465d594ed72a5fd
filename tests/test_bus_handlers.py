"""
The bus as JSON methods use it: a wait cancelled by the connection-close
hook, and Toto's event handlers (a callback tied to a request is never
called after that request finished).  Also the key and message forms the
Redis bus relies on.
"""

from __future__ import annotations

from typing import Any, Callable, List

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twistauth.bus import BusKeyError, MemoryBus
from twistauth.bus._keys import check_key, decode_key, encode_key, key_digest
from twistauth.bus._signing import derive_key, seal, unseal
from twistauth.bus.handlers import (
    deregister_event_handler,
    register_event_handler,
    send_event,
    wait_for_key,
    wait_for_keys,
)
from twistauth.methods.handler import Handler, Services


class FakeRequest:
    """
    The part of a ``twisted.web`` request the helpers use.
    """

    def __init__(self) -> None:
        self.finished = False
        self._disconnected = False
        self._waiting: List[Deferred[None]] = []

    def notifyFinish(self) -> Deferred[None]:  # noqa: N802
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def finish(self) -> None:
        self.finished = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def lose(self) -> None:
        self._disconnected = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(Failure(ConnectionDone()))


class HandlerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = MemoryBus(clock=self.clock)
        self.request = FakeRequest()
        services = Services(clock=self.clock, settings=None, registry=None, bus=self.bus)
        self.handler = Handler("m", "t-1", self.request, services)

    def assert_idle(self) -> None:
        self.assertEqual(
            self.bus.stats(), {"waiters": 0, "keys": 0, "listeners": 0, "pending_deliveries": 0}
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wait_is_cancelled_when_the_client_goes_away(self) -> None:
        d = wait_for_keys(self.handler, ["a", "b"], timeout=30)
        self.request.lose()
        self.failureResultOf(d, CancelledError)
        self.assert_idle()

    def test_wait_answers_normally(self) -> None:
        d = wait_for_key(self.handler, "a", timeout=30)
        send_event(self.handler, "a", {"x": 1})
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), {"x": 1})
        self.request.lose()  # the hook finds nothing left to cancel
        self.assert_idle()

    def test_event_handler_called_for_every_event_until_deregistered(self) -> None:
        got: List[Any] = []
        handle = register_event_handler(self.handler, "news", got.append)
        send_event(self.handler, "news", 1)
        send_event(self.handler, "news", 2)
        self.clock.advance(0)
        self.request.finish()  # not tied to the request: it stays
        send_event(self.handler, "news", 3)
        self.clock.advance(0)
        self.assertEqual(got, [1, 2, 3])
        deregister_event_handler(handle)
        deregister_event_handler(handle)
        send_event(self.handler, "news", 4)
        self.clock.advance(0)
        self.assertEqual(got, [1, 2, 3])
        self.assert_idle()

    def test_handler_tied_to_a_request_stops_when_it_finishes(self) -> None:
        got: List[Any] = []
        register_event_handler(self.handler, "news", got.append, deregister_on_finish=True)
        send_event(self.handler, "news", 1)
        self.clock.advance(0)
        send_event(self.handler, "news", 2)  # on its way when the request ends
        self.request.finish()
        self.clock.advance(0)
        self.assertEqual(got, [1])
        self.assert_idle()

    def test_tied_handler_never_called_after_a_disconnect(self) -> None:
        got: List[Any] = []
        register_event_handler(self.handler, "news", got.append, deregister_on_finish=True)
        send_event(self.handler, "news", 1)
        self.request._disconnected = True  # gone, and notifyFinish not yet told
        self.clock.advance(0)
        self.assertEqual(got, [])
        self.assert_idle()

    def test_tied_handler_on_a_finished_request_is_never_registered(self) -> None:
        self.request.finish()
        handle = register_event_handler(
            self.handler, "news", lambda m: self.fail("called"), deregister_on_finish=True
        )
        self.assertFalse(handle.active)
        send_event(self.handler, "news", 1)
        self.clock.advance(0)
        self.assert_idle()

    def test_send_event_to_one_waiter(self) -> None:
        a = wait_for_key(self.handler, "q")
        b = wait_for_key(self.handler, "q")
        self.assertIs(self.successResultOf(send_event(self.handler, "q", 1, broadcast=False)), True)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(a), 1)
        self.assertNoResult(b)
        b.cancel()
        self.failureResultOf(b, CancelledError)

    def test_no_bus(self) -> None:
        services = Services(clock=self.clock, settings=None, registry=None)
        handler = Handler("m", "t-2", None, services)
        with self.assertRaises(RuntimeError):
            wait_for_key(handler, "k")


keys: Callable[[], Any] = lambda: st.recursive(  # noqa: E731
    st.one_of(st.text(), st.binary(), st.integers()),
    lambda inner: st.lists(inner, max_size=3).map(tuple),
    max_leaves=8,
)


@given(keys(), keys())
def test_key_forms_round_trip_and_digests_separate_keys(a: Any, b: Any) -> None:
    check_key(a)
    assert decode_key(encode_key(a)) == a
    assert type(decode_key(encode_key(a))) is type(a)
    if a != b or type(a) is not type(b):
        assert key_digest(a) != key_digest(b) or (a == b)


def test_str_and_bytes_keys_are_different_channels() -> None:
    assert key_digest("a") != key_digest(b"a")
    assert key_digest(("a",)) != key_digest("a")
    assert key_digest(1) != key_digest("1")


def test_decode_rejects_forms_that_are_not_keys() -> None:
    for bad in (1.5, None, {"x": 1}, {"b": "!!"}, True):
        try:
            decode_key(bad)
        except BusKeyError:
            continue
        raise AssertionError(f"{bad!r} decoded")


def test_sealing_binds_key_and_channel() -> None:
    key = derive_key(bytes(32))
    wire = seal(key, b"ch", b'{"a":1}')
    assert unseal(key, b"ch", wire) == b'{"a":1}'
    assert unseal(key, b"other", wire) is None
    assert unseal(derive_key(bytes([1] * 32)), b"ch", wire) is None
    assert unseal(key, b"ch", wire[:-1] + b"2") is None
    assert unseal(key, b"ch", b"short") is None
    for bad in (b"", bytes(31), "x" * 32):
        try:
            derive_key(bad)  # type: ignore[arg-type]
        except ValueError:
            continue
        raise AssertionError("accepted a bad deployment key")
