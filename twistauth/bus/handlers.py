"""
The bus as JSON methods use it: waits that the client's going away
cancels, and Toto's event handlers.

These functions take the method's `twistauth.methods.Handler` (they use
its ``services.bus``, ``request`` and ``on_connection_close``), so the
handler can expose them as methods of its own::

    def wait_for_keys(self, keys, timeout=None):
        return bus_handlers.wait_for_keys(self, keys, timeout)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from twistauth.bus._keys import Key

log = Logger()


def _bus(handler: Any) -> Any:
    bus = getattr(handler.services, "bus", None)
    if bus is None:
        raise RuntimeError("this application has no bus (services.bus is None)")
    return bus


def _finished(request: Any) -> bool:
    return bool(getattr(request, "finished", False) or getattr(request, "_disconnected", False))


def wait_for_key(handler: Any, key: Key, timeout: Optional[float] = None) -> Deferred[Any]:
    """
    `twistauth.bus.IBus.wait_for_key` for a method: the wait is cancelled
    when the client goes away (the handler's connection-close hook).
    """
    d = _bus(handler).wait_for_key(key, timeout)
    handler.on_connection_close(d.cancel)
    return d


def wait_for_keys(
    handler: Any, keys: Iterable[Key], timeout: Optional[float] = None
) -> Deferred[Any]:
    """
    `twistauth.bus.IBus.wait_for_keys` for a method, cancelled when the
    client goes away.
    """
    d = _bus(handler).wait_for_keys(keys, timeout)
    handler.on_connection_close(d.cancel)
    return d


class EventHandle:
    """
    A registered event handler (Toto's): pass it to
    `deregister_event_handler`.

    :ivar key: the key it listens to.
    :ivar active: whether it is still registered.
    """

    __slots__ = ("key", "callback", "request", "listener", "active")

    def __init__(self, key: Key, callback: Callable[[Any], Any], request: Any) -> None:
        self.key = key
        self.callback = callback
        self.request = request
        self.listener: Any = None
        self.active = True

    def _deliver(self, message: Any) -> None:
        if not self.active:
            return
        if self.request is not None and _finished(self.request):
            deregister_event_handler(self)
            return
        self.callback(message)


def register_event_handler(
    handler: Any,
    key: Key,
    callback: Callable[[Any], Any],
    deregister_on_finish: bool = False,
) -> EventHandle:
    """
    Call ``callback(message)`` for every notification of ``key`` (Toto's
    ``register_event_handler``), on a later reactor turn, until
    `deregister_event_handler`.

    :param deregister_on_finish: tie the handler to the method's request:
        it is deregistered when the request finishes (answered or client
        gone), and is never called after that, even for a notification
        already on its way.
    :return: the handle.
    """
    request = handler.request if deregister_on_finish else None
    handle = EventHandle(key, callback, request)
    handle.listener = _bus(handler).listen(key, handle._deliver)
    if request is not None:
        if _finished(request):
            deregister_event_handler(handle)
        else:
            request.notifyFinish().addBoth(lambda _: deregister_event_handler(handle))
    return handle


def deregister_event_handler(handle: EventHandle) -> None:
    """
    Stop an event handler; idempotent.  Its callback is never called after.
    """
    if handle.active:
        handle.active = False
        handle.listener.stop()
        handle.request = None


def send_event(handler: Any, key: Key, message: Any, broadcast: bool = True) -> Deferred[Any]:
    """
    Toto's ``send_event``: notify every listener and waiter of ``key``
    (``broadcast``), or one waiter.
    """
    bus = _bus(handler)
    return bus.notify_all(key, message) if broadcast else bus.notify(key, message)


__all__ = [
    "EventHandle",
    "deregister_event_handler",
    "register_event_handler",
    "send_event",
    "wait_for_key",
    "wait_for_keys",
]
