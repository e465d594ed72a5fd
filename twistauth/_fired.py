"""
Taking the value of a Deferred that has already fired.

Every `twistauth.sessions.ISessionCache` operation answers through a
Deferred, whatever the backend, so callers never branch on the backend.
The memory and client-side caches answer with Deferreds that have already
fired; on the hot path (``POST /api`` with a session) the web layer takes
their value at once instead of adding callbacks, so a request that needs
no I/O is answered in the same call, without a chain of callbacks and with
a ``Content-Length`` instead of a chunked body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from typing_extensions import TypeGuard

PENDING: Any = object()
"""What `fired_value` answers for a Deferred whose value is not there yet."""

_PLAIN = frozenset({tuple, dict, list, str, bytes, int, float, bool, type(None), Failure})
"""Types no Deferred can be an instance of: the values the hot path meets."""


def is_deferred(value: object) -> TypeGuard[Deferred[Any]]:
    """
    ``isinstance(value, Deferred)``, at a third of the cost for the values
    the request path meets most (outcome tuples, results, ``None``):
    `Deferred` is an ``ABCMeta`` class (it is ``Awaitable``), whose instance
    check runs Python code on every call.
    """
    kind = type(value)
    return kind is Deferred or (kind not in _PLAIN and isinstance(value, Deferred))


def fired_value(d: Deferred[Any]) -> Any:
    """
    The value ``d`` has fired with, or `PENDING` when it has not fired, is
    waiting on another Deferred, or has failed (a failure stays in ``d``, to
    be handled by the callbacks the caller then adds).
    """
    # A fired Deferred that is not paused never holds a Deferred: one
    # returned by a callback either had fired (its result was taken) or
    # paused this one until it fires.
    if d.called and not d.paused:
        result = d.result
        if not isinstance(result, Failure):
            return result
    return PENDING
