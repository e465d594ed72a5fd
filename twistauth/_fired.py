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

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

PENDING: Any = object()
"""What `fired_value` answers for a Deferred whose value is not there yet."""


def fired_value(d: Deferred[Any]) -> Any:
    """
    The value ``d`` has fired with, or `PENDING` when it has not fired, is
    waiting on another Deferred, or has failed (a failure stays in ``d``, to
    be handled by the callbacks the caller then adds).
    """
    if d.called and not d.paused:
        result = d.result
        if not isinstance(result, (Failure, Deferred)):
            return result
    return PENDING
