"""
Dispatch: run one call or a batch, and turn every outcome into an envelope.

A method may return a value, a Deferred, or a coroutine.  Whatever it raises
becomes an error envelope: a `TwistauthError` answers with its own code; any
other exception passes through the application's exception hook, and if the
hook has no answer, becomes a 500 whose body carries only a correlation id
(the traceback goes to the server log under that id).

An outcome is ``(status, envelope, headers)``; a synchronous method gets its
outcome without any Deferred being made, which keeps the hot path short.
"""

from __future__ import annotations

import inspect
import itertools
import secrets
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import attr
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    ensureDeferred,
    succeed,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistauth._fired import is_deferred
from twistauth.errors import InternalError, TwistauthError, UnknownMethodError
from twistauth.methods.envelope import Batch, Call
from twistauth.methods.handler import Handler, Services
from twistauth.methods.registry import Method, MethodRegistry
from twistauth.observe import request_id_of

Outcome = Tuple[int, Dict[str, Any], Optional[Dict[str, str]]]
MaybeOutcome = Union[Outcome, "Deferred[Outcome]"]

log = Logger()


async def _as_awaitable(result: Any) -> Any:
    """
    Await ``result`` if it is awaitable (a Deferred or a coroutine).
    """
    if isinstance(result, Deferred) or inspect.iscoroutine(result):
        return await result
    return result


@attr.s(slots=True, auto_attribs=True)
class Transaction:
    """
    What the instrumentation hooks see of one call (or one whole batch).
    """

    id: str
    method: str
    batch_key: Optional[str]
    started: float
    duration: Optional[float] = None
    outcome: str = "ok"
    """``"ok"``, an error name, or ``"cancelled"``."""
    code: Optional[int] = None


def error_envelope(error: TwistauthError) -> Outcome:
    """
    The outcome that answers with ``error``.
    """
    return (error.status, {"error": error.to_json()}, error.headers or None)


@attr.s
class Dispatcher:
    """
    Runs calls against a registry.
    """

    registry: MethodRegistry = attr.ib()
    services: Services = attr.ib()
    exception_hook: Optional[Callable[[Handler, BaseException], Any]] = attr.ib(default=None)
    before_hook: Optional[Callable[[Transaction], Any]] = attr.ib(default=None)
    after_hook: Optional[Callable[[Transaction], Any]] = attr.ib(default=None)
    authorize: Optional[Callable[[Handler, Method], Any]] = attr.ib(default=None)
    """Called as ``authorize(handler, method)`` before every method runs: raises
    (or fails its Deferred with) a `TwistauthError` to refuse the call."""
    _prefix: str = attr.ib(factory=lambda: secrets.token_hex(4))
    _counter: itertools.count[int] = attr.ib(factory=itertools.count)

    def next_id(self) -> str:
        """
        A transaction id, unique in this process and unlikely across processes.
        """
        return f"{self._prefix}-{next(self._counter)}"

    def run(
        self, call: Call, request: Any = None, scope: Any = None, batch_key: Optional[str] = None
    ) -> MaybeOutcome:
        """
        Run one call.  Never raises; never fails the Deferred it may return
        (except by cancellation, when the client has gone away).
        """
        handler = Handler(call.method, self.next_id(), request, self.services, scope)
        transaction = None
        if self.before_hook is not None or self.after_hook is not None:
            transaction = Transaction(
                handler.transaction_id, call.method[:200], batch_key, self.services.clock.seconds()
            )
            if self.before_hook is not None:
                self._hook(self.before_hook, transaction)
        method = self.registry.lookup(call.method)
        if method is None:
            unknown = UnknownMethodError(f"no method named {call.method[:100]!r}")
            return self._finish(transaction, error_envelope(unknown))
        if self.authorize is not None:
            try:
                allowed = self.authorize(handler, method)
            except Exception as e:
                return self._finish(transaction, self._failed(handler, e))
            if is_deferred(allowed):
                d: Deferred[Any] = allowed.addCallback(
                    lambda _: ensureDeferred(_as_awaitable(method.invoke(handler, call.parameters)))
                )
                return self._settle(d, transaction, handler)
        try:
            result = method.invoke(handler, call.parameters)
        except Exception as e:
            return self._finish(transaction, self._failed(handler, e))
        if is_deferred(result) or inspect.iscoroutine(result):
            return self._settle(ensureDeferred(result), transaction, handler)
        return self._finish(transaction, (200, {"result": result}, None))

    def _settle(
        self, d: Deferred[Any], transaction: Optional[Transaction], handler: Handler
    ) -> Deferred[Outcome]:
        d.addCallbacks(
            lambda value: self._finish(transaction, (200, {"result": value}, None)),
            lambda failure: self._async_failed(transaction, handler, failure),
        )
        return d

    def run_batch(self, batch: Batch, request: Any = None, scope: Any = None) -> MaybeOutcome:
        """
        Run every call of a batch; each is answered under its key, and one
        failing does not stop the others.
        """
        transaction = None
        if self.after_hook is not None or self.before_hook is not None:
            transaction = Transaction(self.next_id(), "batch", None, self.services.clock.seconds())
            if self.before_hook is not None:
                self._hook(self.before_hook, transaction)
        keys: List[str] = []
        outcomes: List[MaybeOutcome] = []
        for key, call in batch.calls.items():
            keys.append(key)
            if isinstance(call, TwistauthError):
                outcomes.append(error_envelope(call))
            else:
                outcomes.append(self.run(call, request, scope, batch_key=key))

        def assemble(done: List[Outcome]) -> Outcome:
            answer = {key: envelope for key, (_, envelope, _) in zip(keys, done)}
            return self._finish(transaction, (200, {"batch": answer}, None))

        pending = [o for o in outcomes if isinstance(o, Deferred)]
        if not pending:
            return assemble(outcomes)  # type: ignore[arg-type]
        waiting = DeferredList(
            [o if isinstance(o, Deferred) else succeed(o) for o in outcomes],
            consumeErrors=True,
        )

        def cancel_all(_: Any) -> None:
            for d in pending:
                d.cancel()

        result: Deferred[Outcome] = Deferred(cancel_all)

        def gathered(results: List[Tuple[bool, Any]]) -> None:
            # An entry fails only by cancellation, and then so has the result.
            if not result.called and all(ok for ok, _ in results):
                result.callback(assemble([value for _, value in results]))

        waiting.addCallback(gathered)
        return result

    def _failed(self, handler: Handler, error: BaseException) -> Outcome:
        if isinstance(error, TwistauthError):
            return error_envelope(error)
        if self.exception_hook is not None:
            try:
                mapped = self.exception_hook(handler, error)
            except Exception:
                log.failure(
                    "exception hook failed for {method} (correlation id {cid})",
                    method=handler.method,
                    cid=handler.transaction_id,
                    request_id=request_id_of(handler.request),
                )
                mapped = None
            if isinstance(mapped, TwistauthError):
                return error_envelope(mapped)
        log.failure(
            "method {method} failed (correlation id {cid})",
            failure=Failure(error),
            method=handler.method,
            cid=handler.transaction_id,
            request_id=request_id_of(handler.request),
        )
        return error_envelope(
            InternalError(
                {
                    "message": "internal error; quote the correlation id when reporting it",
                    "correlation_id": handler.transaction_id,
                }
            )
        )

    def _async_failed(
        self, transaction: Optional[Transaction], handler: Handler, failure: Failure
    ) -> Any:
        if failure.check(CancelledError):
            if transaction is not None:
                transaction.outcome = "cancelled"
                self._finish(transaction, None)
            return failure
        return self._finish(transaction, self._failed(handler, failure.value or Exception()))

    def _finish(self, transaction: Optional[Transaction], outcome: Any) -> Any:
        if transaction is not None:
            transaction.duration = self.services.clock.seconds() - transaction.started
            if outcome is not None:
                error = outcome[1].get("error")
                if error is not None:
                    transaction.outcome = error["name"]
                    transaction.code = error["code"]
            if self.after_hook is not None:
                self._hook(self.after_hook, transaction)
        return outcome

    def _hook(self, hook: Callable[[Transaction], Any], transaction: Transaction) -> None:
        try:
            hook(transaction)
        except Exception:
            log.failure("instrumentation hook failed for {method}", method=transaction.method)
