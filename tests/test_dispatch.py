"""
Tests for `twistauth.methods.dispatch` through the whole HTTP stack
(``StubTreq(app.resource())``) on a `Clock`: the kinds of methods, late
answers, errors and the exception hook (checklist case 91), instrumentation
hooks, and batches.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import eventAsText, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twistauth.app import make_app
from twistauth.errors import (
    ForbiddenError,
    InvalidParametersError,
    RateLimitedError,
    TwistauthError,
    UnknownMethodError,
)
from twistauth.methods.dispatch import Transaction
from twistauth.methods.handler import Handler
from twistauth.methods.registry import MethodRegistry
from twistauth.testing._client import MethodClient, Response

# These tests are not about access control: every method is callable, and
# the users they log in need not exist in a user store.
OPEN_ACCESS = {"acl_initial": ["*"], "access_account_check": False}

SECRET_DETAIL = "s3cret-detail-in-exception"


class AppError(Exception):
    """An application's own exception, mapped by the exception hook."""


class _Base(SynchronousTestCase):
    """
    An app with methods of every kind, a Clock, and captured log events.
    """

    hooks: Dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.handlers: List[Handler] = []
        self.pending: List[Deferred[Any]] = []
        registry = MethodRegistry()
        clock = self.clock

        @registry.method("sync")
        def sync(handler: Handler, x: int = 0) -> Dict[str, Any]:
            self.handlers.append(handler)
            return {"x": x}

        @registry.method("deferred.now")
        def deferred_now(handler: Handler) -> Deferred[str]:
            return succeed("now")

        @registry.method("deferred.later")
        def deferred_later(handler: Handler, seconds: float = 1) -> Deferred[str]:
            self.handlers.append(handler)
            return deferLater(clock, seconds, lambda: "later")

        @registry.method("coroutine")
        async def coroutine(handler: Handler, seconds: float = 5) -> Dict[str, Any]:
            self.handlers.append(handler)
            await deferLater(clock, seconds, lambda: None)
            return {"waited": seconds}

        @registry.method("coroutine.fails")
        async def coroutine_fails(handler: Handler) -> None:
            await deferLater(clock, 1, lambda: None)
            raise RateLimitedError("slow down", headers={"Retry-After": "7"})

        @registry.method("late")
        def late(handler: Handler) -> Deferred[Any]:
            self.handlers.append(handler)
            return handler.respond_later()

        @registry.method("raises.twistauth")
        def raises_twistauth(handler: Handler) -> None:
            raise ForbiddenError("not you")

        @registry.method("raises.unexpected")
        def raises_unexpected(handler: Handler) -> None:
            self.handlers.append(handler)
            raise ZeroDivisionError(SECRET_DETAIL)

        @registry.method("raises.app")
        def raises_app(handler: Handler) -> None:
            raise AppError(SECRET_DETAIL)

        @registry.method("fails.later")
        def fails_later(handler: Handler) -> Deferred[None]:
            self.handlers.append(handler)
            return deferLater(clock, 1, lambda: {}["missing-" + SECRET_DETAIL])

        @registry.method("fails.now")
        def fails_now(handler: Handler) -> Deferred[None]:
            return fail(KeyError(SECRET_DETAIL))

        self.registry = registry
        self.app = make_app(**OPEN_ACCESS, clock=self.clock, registry=registry, **self.hooks)
        self.client = MethodClient(self.app)

    def call(self, name: str, **parameters: Any) -> Deferred[Any]:
        return self.client.call(name, **parameters)

    def logged(self, *types: type) -> None:
        """
        The failures logged (and so seen by trial) are exactly ``types``.
        """
        flushed = self.flushLoggedErrors()
        self.assertEqual(
            sorted(type(f.value).__name__ for f in flushed), sorted(t.__name__ for t in types)
        )

    def raw(self, name: str, **parameters: Any) -> Deferred[Response]:
        return self.client.post({"method": name, "parameters": parameters})


class MethodKindTests(_Base):
    def test_sync(self) -> None:
        self.assertEqual(self.successResultOf(self.call("sync", x=3)), {"x": 3})

    def test_handler(self) -> None:
        """
        The method gets a handler naming its call, with the app's services.
        """
        self.successResultOf(self.call("sync"))
        (handler,) = self.handlers
        self.assertEqual(handler.method, "sync")
        self.assertIs(handler.services.clock, self.clock)
        self.assertIs(handler.services.registry, self.registry)
        self.assertIsNotNone(handler.request)
        self.successResultOf(self.call("sync"))
        self.assertNotEqual(self.handlers[0].transaction_id, self.handlers[1].transaction_id)

    def test_deferred_already_fired(self) -> None:
        self.assertEqual(self.successResultOf(self.call("deferred.now")), "now")

    def test_deferred_later(self) -> None:
        d = self.call("deferred.later", seconds=2)
        self.assertNoResult(d)
        self.clock.advance(1.5)
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.assertEqual(self.successResultOf(d), "later")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_coroutine(self) -> None:
        d = self.call("coroutine", seconds=5)
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d), {"waited": 5})

    def test_coroutine_raises_twistauth_error(self) -> None:
        d = self.raw("coroutine.fails")
        self.clock.advance(1)
        response = self.successResultOf(d)
        self.assertEqual(response.status, 429)
        self.assertEqual(response.header("retry-after"), "7")
        self.assertEqual(response.decoded()["error"]["value"], "slow down")

    def test_respond_later(self) -> None:
        d = self.call("late")
        self.assertNoResult(d)
        (handler,) = self.handlers
        self.assertIs(handler.respond_later(), handler.respond_later())
        handler.respond({"done": True})
        self.assertEqual(self.successResultOf(d), {"done": True})
        handler.respond("again")  # a second answer is ignored

    def test_respond_error(self) -> None:
        d = self.call("late")
        self.handlers[0].respond_error(ForbiddenError("later, no"))
        failure = self.failureResultOf(d, ForbiddenError)
        self.assertEqual(failure.value.value, "later, no")

    def test_respond_error_unexpected(self) -> None:
        d = self.raw("late")
        self.handlers[0].respond_error(RuntimeError(SECRET_DETAIL))
        response = self.successResultOf(d)
        self.assertEqual(response.status, 500)
        self.assertNotIn(SECRET_DETAIL, response.body.decode())
        self.logged(RuntimeError)

    def test_respond_without_respond_later_is_ignored(self) -> None:
        self.successResultOf(self.call("sync"))
        self.handlers[0].respond("nobody asked")
        self.handlers[0].respond_error(ValueError("nobody asked"))


class ErrorTests(_Base):
    def test_twistauth_error(self) -> None:
        response = self.successResultOf(self.raw("raises.twistauth"))
        self.assertEqual(response.status, 403)
        self.assertEqual(
            response.decoded(),
            {"error": {"code": 40300, "name": "forbidden", "value": "not you"}},
        )

    def test_invalid_parameters(self) -> None:
        self.failureResultOf(self.call("sync", x="1"), InvalidParametersError)
        self.assertEqual(self.handlers, [])

    def assertInternal(self, response: Response, exception: type) -> str:
        """
        Case 91: a 500 whose body is a generic error with a correlation id,
        without a traceback, path, exception or library text; the traceback
        is in the log under that id.
        """
        self.assertEqual(response.status, 500)
        body = response.body.decode()
        error = response.decoded()["error"]
        self.assertEqual(error["code"], 50000)
        self.assertEqual(error["name"], "internal_error")
        cid = error["value"]["correlation_id"]
        self.assertRegex(cid, re.compile(r"\A[0-9a-f]{8}-\d+\Z"))
        self.assertEqual(set(error["value"]), {"message", "correlation_id"})
        for leak in (
            SECRET_DETAIL,
            exception.__name__,
            "Traceback",
            "File ",
            ".py",
            "line ",
            "twisted",
            "twistauth",
            "/",
        ):
            self.assertNotIn(leak, body)
        logged = [e for e in self.events if e.get("cid") == cid and "log_failure" in e]
        self.assertEqual(len(logged), 1, self.events)
        self.assertTrue(logged[0]["log_failure"].check(exception))
        text = eventAsText(logged[0], includeTraceback=True)
        self.assertIn(cid, text)
        self.assertIn("Traceback", text)
        self.assertIn(SECRET_DETAIL, text)
        self.logged(exception)
        return cid

    def test_unexpected_exception(self) -> None:
        response = self.successResultOf(self.raw("raises.unexpected"))
        cid = self.assertInternal(response, ZeroDivisionError)
        self.assertEqual(cid, self.handlers[0].transaction_id)

    def test_unexpected_async_failure(self) -> None:
        d = self.raw("fails.later")
        self.clock.advance(1)
        self.assertInternal(self.successResultOf(d), KeyError)

    def test_unexpected_failed_deferred(self) -> None:
        self.assertInternal(self.successResultOf(self.raw("fails.now")), KeyError)

    def test_correlation_ids_differ(self) -> None:
        first = self.successResultOf(self.raw("raises.unexpected")).decoded()
        second = self.successResultOf(self.raw("raises.unexpected")).decoded()
        self.logged(ZeroDivisionError, ZeroDivisionError)
        self.assertNotEqual(
            first["error"]["value"]["correlation_id"], second["error"]["value"]["correlation_id"]
        )

    def test_failure_is_logged_once_as_error(self) -> None:
        self.successResultOf(self.raw("raises.app"))
        failures = [e for e in self.events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["log_level"].name, "critical")
        self.logged(AppError)


def map_app_errors(handler: Handler, exception: BaseException) -> Any:
    if isinstance(exception, AppError):
        return ForbiddenError(f"mapped in {handler.method}")
    if isinstance(exception, KeyError):
        raise RuntimeError("the hook itself fails")
    return None


class ExceptionHookTests(_Base):
    hooks = {"exception_hook": map_app_errors}

    def test_maps_app_exception(self) -> None:
        response = self.successResultOf(self.raw("raises.app"))
        self.assertEqual(response.status, 403)
        self.assertEqual(response.decoded()["error"]["value"], "mapped in raises.app")
        self.assertEqual([e for e in self.events if "log_failure" in e], [])

    def test_no_answer_is_500(self) -> None:
        response = self.successResultOf(self.raw("raises.unexpected"))
        self.assertEqual(response.status, 500)
        self.logged(ZeroDivisionError)

    def test_failing_hook(self) -> None:
        """
        A hook that raises is logged, and the call answers 500 with the
        original exception logged under the correlation id.
        """
        response = self.successResultOf(self.raw("fails.now"))
        self.assertEqual(response.status, 500)
        cid = response.decoded()["error"]["value"]["correlation_id"]
        failures = [e for e in self.events if "log_failure" in e]
        self.assertEqual(
            sorted(type(e["log_failure"].value).__name__ for e in failures),
            ["KeyError", "RuntimeError"],
        )
        self.assertTrue(all(e["cid"] == cid for e in failures))
        self.logged(KeyError, RuntimeError)

    def test_hook_sees_async_failures(self) -> None:
        d = self.raw("fails.later")
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d).status, 500)
        self.assertEqual(len([e for e in self.events if "log_failure" in e]), 2)
        self.logged(KeyError, RuntimeError)

    def test_twistauth_errors_bypass_the_hook(self) -> None:
        response = self.successResultOf(self.raw("raises.twistauth"))
        self.assertEqual(response.decoded()["error"]["value"], "not you")

    def test_hook_by_dotted_name(self) -> None:
        app = make_app(**OPEN_ACCESS, clock=self.clock, exception_hook=f"{__name__}:map_app_errors")
        self.assertIs(app.dispatcher.exception_hook, map_app_errors)


class InstrumentationTests(_Base):
    def setUp(self) -> None:
        self.before: List[Transaction] = []
        self.after: List[Transaction] = []

        def before(transaction: Transaction) -> None:
            self.assertIsNone(transaction.duration)
            self.before.append(transaction)

        def after(transaction: Transaction) -> None:
            self.after.append(transaction)

        self.hooks = {"before_hook": before, "after_hook": after}
        super().setUp()

    def test_sync_call(self) -> None:
        self.clock.advance(100)
        self.successResultOf(self.call("sync", x=1))
        (before,) = self.before
        (after,) = self.after
        self.assertIs(before, after)
        self.assertEqual(after.id, self.handlers[0].transaction_id)
        self.assertEqual(after.method, "sync")
        self.assertIsNone(after.batch_key)
        self.assertEqual(after.started, 100)
        self.assertEqual(after.duration, 0)
        self.assertEqual(after.outcome, "ok")
        self.assertIsNone(after.code)

    def test_unknown_methods_reach_the_hooks(self) -> None:
        # Probes for methods that do not exist are instrumented too.
        self.failureResultOf(self.call("no.such.method"), UnknownMethodError)
        (after,) = self.after
        self.assertEqual(
            (after.method, after.outcome, after.code), ("no.such.method", "unknown_method", 40400)
        )

    def test_duration_of_async_method(self) -> None:
        d = self.call("coroutine", seconds=2.5)
        self.assertEqual(len(self.before), 1)
        self.assertEqual(self.after, [])
        self.clock.advance(2.5)
        self.successResultOf(d)
        (after,) = self.after
        self.assertEqual(after.duration, 2.5)
        self.assertEqual(after.outcome, "ok")

    def test_error_outcomes(self) -> None:
        self.failureResultOf(self.call("raises.twistauth"), ForbiddenError)
        self.failureResultOf(self.call("raises.unexpected"), TwistauthError)
        self.failureResultOf(self.call("sync", x="bad"), InvalidParametersError)
        d = self.call("coroutine.fails")
        self.clock.advance(1)
        self.failureResultOf(d, RateLimitedError)
        self.assertEqual(
            [(t.method, t.outcome, t.code) for t in self.after],
            [
                ("raises.twistauth", "forbidden", 40300),
                ("raises.unexpected", "internal_error", 50000),
                ("sync", "invalid_parameters", 40004),
                ("coroutine.fails", "rate_limited", 42900),
            ],
        )
        self.assertEqual(self.after[3].duration, 1)
        self.logged(ZeroDivisionError)

    def test_batch_entries_and_whole(self) -> None:
        """
        Each entry is reported under its key, and the whole batch once, after
        its slowest entry.
        """
        d = self.client.batch(
            {
                "a": ("sync", {"x": 1}),
                "b": ("coroutine", {"seconds": 3}),
                "c": ("raises.twistauth", {}),
                "d": ("deferred.later", {"seconds": 1}),
            }
        )
        self.assertEqual(
            sorted((t.method, t.batch_key) for t in self.before),
            [
                ("batch", None),
                ("coroutine", "b"),
                ("deferred.later", "d"),
                ("raises.twistauth", "c"),
                ("sync", "a"),
            ],
        )
        self.assertEqual([t.batch_key for t in self.after], ["a", "c"])
        self.clock.advance(1)
        self.assertEqual([t.batch_key for t in self.after], ["a", "c", "d"])
        self.clock.advance(2)
        answers = self.successResultOf(d)
        self.assertEqual(answers["b"], {"waited": 3})
        self.assertEqual([t.batch_key for t in self.after], ["a", "c", "d", "b", None])
        whole = self.after[-1]
        self.assertEqual((whole.method, whole.duration, whole.outcome), ("batch", 3, "ok"))
        self.assertEqual(len({t.id for t in self.before}), 5)

    def test_failing_hook_does_not_break_the_call(self) -> None:
        def broken(transaction: Transaction) -> None:
            raise RuntimeError("hook broke")

        registry = MethodRegistry()
        registry.add("sync", self.registry.get("sync").function)
        client = MethodClient(
            make_app(**OPEN_ACCESS, clock=self.clock, registry=registry, after_hook=broken)
        )
        self.assertEqual(self.successResultOf(client.call("sync", x=2)), {"x": 2})
        failures = [e for e in self.events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0]["log_failure"].check(RuntimeError))
        self.logged(RuntimeError)


class BatchTests(_Base):
    def test_mixed_sync_async_errors(self) -> None:
        d = self.client.batch(
            {
                "sync": ("sync", {"x": 1}),
                "now": ("deferred.now", {}),
                "later": ("deferred.later", {"seconds": 2}),
                "coroutine": ("coroutine", {"seconds": 1}),
                "forbidden": ("raises.twistauth", {}),
                "boom": ("raises.unexpected", {}),
                "async_boom": ("fails.later", {}),
                "unknown": ("nope", {}),
                "params": ("sync", {"y": 1}),
            }
        )
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertNoResult(d)
        self.clock.advance(1)
        answers = self.successResultOf(d)
        self.assertEqual(answers["sync"], {"x": 1})
        self.assertEqual(answers["now"], "now")
        self.assertEqual(answers["later"], "later")
        self.assertEqual(answers["coroutine"], {"waited": 1})
        self.assertIsInstance(answers["forbidden"], ForbiddenError)
        self.assertIsInstance(answers["unknown"], UnknownMethodError)
        self.assertIsInstance(answers["params"], InvalidParametersError)
        for key in ("boom", "async_boom"):
            self.assertIsInstance(answers[key], TwistauthError)
            self.assertEqual(answers[key].code, 50000)
            self.assertIn("correlation_id", answers[key].value)
        self.assertNotEqual(
            answers["boom"].value["correlation_id"], answers["async_boom"].value["correlation_id"]
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.logged(ZeroDivisionError, KeyError)

    def test_all_sync_batch_answers_at_once(self) -> None:
        answers = self.successResultOf(
            self.client.batch({"a": ("sync", {"x": 1}), "b": ("sync", {"x": 2})})
        )
        self.assertEqual(answers, {"a": {"x": 1}, "b": {"x": 2}})

    def test_batch_entries_share_the_request(self) -> None:
        self.successResultOf(self.client.batch({"a": ("sync", {}), "b": ("sync", {})}))
        first, second = self.handlers
        self.assertIs(first.request, second.request)
        self.assertNotEqual(first.transaction_id, second.transaction_id)

    def test_respond_later_in_a_batch(self) -> None:
        d = self.client.batch({"a": ("late", {}), "b": ("late", {}), "c": ("sync", {})})
        first, second = self.handlers[:2]
        first.respond(1)
        self.assertNoResult(d)
        second.respond_error(ForbiddenError())
        answers = self.successResultOf(d)
        self.assertEqual(answers["a"], 1)
        self.assertIsInstance(answers["b"], ForbiddenError)
