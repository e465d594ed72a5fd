"""
`twistauth._fired.fired_value`: the value of an already-fired Deferred,
and nothing else.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twistauth._fired import PENDING, fired_value, is_deferred


class FiredValueTests(SynchronousTestCase):
    def test_fired(self) -> None:
        self.assertEqual(fired_value(succeed(7)), 7)
        self.assertIsNone(fired_value(succeed(None)))

    def test_not_fired(self) -> None:
        d: Deferred[int] = Deferred()
        self.assertIs(fired_value(d), PENDING)
        d.callback(3)
        self.assertEqual(fired_value(d), 3)

    def test_failed_stays_for_the_errbacks(self) -> None:
        d: Deferred[int] = fail(ValueError("no"))
        self.assertIs(fired_value(d), PENDING)
        self.failureResultOf(d, ValueError)  # still there, still handled once

    def test_waiting_on_another(self) -> None:
        inner: Deferred[int] = Deferred()
        outer = succeed(None).addCallback(lambda _: inner)
        self.assertIs(fired_value(outer), PENDING)
        inner.callback(5)
        self.assertEqual(fired_value(outer), 5)


class IsDeferredTests(SynchronousTestCase):
    def test_same_answer_as_isinstance(self) -> None:
        class Mine(Deferred):  # type: ignore[type-arg]
            pass

        class Plain:
            pass

        values = [
            Deferred(),
            succeed(1),
            Mine(),
            DeferredList([]),
            (200, {"result": 1}, None),
            {"x": 1},
            [1],
            "s",
            b"b",
            1,
            1.5,
            True,
            None,
            Failure(ValueError("no")),
            Plain(),
            Deferred,
        ]
        for value in values:
            self.assertEqual(is_deferred(value), isinstance(value, Deferred), value)
        self.assertEqual([is_deferred(v) for v in values[:4]], [True] * 4)
