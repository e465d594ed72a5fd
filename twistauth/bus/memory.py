"""
The memory bus: waiters in one process, on Deferreds and an injected clock.

This is ClefStorm's ``AsyncBus`` on Deferreds, with the habits of
magic-wormhole's observers: every waiter has its own Deferred, is woken on a
later reactor turn, and is unregistered by its canceller.  It is the bus of a
single-process deployment and the local half of `twistauth.bus.redis_bus`.

Waking many waiters is spread over reactor turns: a notification queues its
waiters, and each turn fires a batch (growing from `FIRST_BATCH` up to
``batch_size``) and then lets the reactor run, so the responses written by
the first batch reach their sockets while later batches are still being
processed.  With 10 000 waiters the first client has its answer in a few
milliseconds instead of after the whole loop.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twistauth.bus._interfaces import IBus
from twistauth.bus._keys import Key, check_key, check_keys, freeze_message
from twistauth.bus.errors import BusTimeoutError

log = Logger()

FIRST_BATCH = 16
"""How many waiters the first turn of a fan-out wakes; later turns double it."""

_NO_KEY = object()
_WAITING = 0
_SELECTED = 1
_DONE = 2


class _Waiter:
    """
    One pending wait.  ``keys`` is a tuple for `MemoryBus.wait_for_keys`
    (which fires with ``(key, message)``) and a bare key otherwise.
    """

    __slots__ = ("bus", "keys", "multi", "deferred", "timer", "state")

    def __init__(self, bus: MemoryBus, keys: Any, multi: bool) -> None:
        self.bus = bus
        self.keys = keys
        self.multi = multi
        self.timer: Optional[IDelayedCall] = None
        self.state = _WAITING
        self.deferred: Deferred[Any] = Deferred(self.cancelled)

    def cancelled(self, _: Any) -> None:
        """
        The Deferred's canceller: forget the wait (the Deferred then fails
        with ``CancelledError``).
        """
        self.bus._forget(self)


class _Listener:
    """
    A persistent observer of one key (`MemoryBus.listen`).
    """

    __slots__ = ("bus", "key", "callback", "active")

    def __init__(self, bus: MemoryBus, key: Key, callback: Callable[[Any], Any]) -> None:
        self.bus = bus
        self.key = key
        self.callback = callback
        self.active = True

    def stop(self) -> None:
        """
        Stop listening; idempotent.  The callback is never called after this.
        """
        if self.active:
            self.active = False
            self.bus._drop_listener(self)


class _Delivery:
    """
    Waiters (or listeners) chosen by one notification, not all fired yet.
    """

    __slots__ = ("targets", "next", "key", "message", "listeners")

    def __init__(self, targets: List[Any], key: Key, message: Any, listeners: bool) -> None:
        self.targets = targets
        self.next = 0
        self.key = key
        self.message = message
        self.listeners = listeners


@implementer(IBus)
class MemoryBus:
    """
    The in-process `IBus`.

    :param clock: where deadlines and later turns come from.
    :param batch_size: the most waiters one reactor turn wakes (at least 1).
    :param on_first_waiter: called with a key when it gets its first waiter
        or listener (the Redis bus subscribes its channel then).
    :param on_last_waiter: called with a key when its last waiter or
        listener leaves.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        batch_size: int = 256,
        on_first_waiter: Optional[Callable[[Key], None]] = None,
        on_last_waiter: Optional[Callable[[Key], None]] = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.clock = clock
        self.batch_size = batch_size
        self._on_first = on_first_waiter
        self._on_last = on_last_waiter
        # A key's waiters: the waiter itself while it is the only one (most
        # keys: a session's), else an insertion-ordered dict of them.
        self._waiters: Dict[Key, Any] = {}
        self._listeners: Dict[Key, Dict[_Listener, None]] = {}
        self._count = 0
        self._queue: Deque[_Delivery] = deque()
        self._pending = 0
        self._pump_call: Optional[IDelayedCall] = None
        self._batch = FIRST_BATCH
        self._resumed: List[Callable[[], Any]] = []

    # -- waiting ----------------------------------------------------------

    def wait_for_key(self, key: Key, timeout: Optional[float] = None) -> Deferred[Any]:
        """
        See `IBus.wait_for_key`.
        """
        check_key(key)
        return self._wait(key, (key,), False, timeout)

    def wait_for_keys(
        self, keys: Iterable[Key], timeout: Optional[float] = None
    ) -> Deferred[Tuple[Key, Any]]:
        """
        See `IBus.wait_for_keys`.
        """
        checked = check_keys(keys)
        return self._wait(checked, checked, True, timeout)

    def _wait(
        self, keys: Any, each: Tuple[Key, ...], multi: bool, timeout: Optional[float]
    ) -> Deferred[Any]:
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        waiter = _Waiter(self, keys, multi)
        registry = self._waiters
        for key in each:
            entry = registry.get(key)
            if entry is None:
                registry[key] = waiter
                if self._on_first is not None and key not in self._listeners:
                    self._on_first(key)
            elif type(entry) is _Waiter:
                registry[key] = {entry: None, waiter: None}
            else:
                entry[waiter] = None
        self._count += 1
        if timeout is not None:
            waiter.timer = self.clock.callLater(timeout, self._timed_out, waiter, timeout)
        return waiter.deferred

    def _unregister(self, waiter: _Waiter, skip: Any = _NO_KEY) -> None:
        """
        Count a waiter off, stop its timer and remove it from its keys but
        ``skip`` (whose entry the caller has already taken out).
        """
        self._count -= 1
        timer = waiter.timer
        if timer is not None:
            waiter.timer = None
            if timer.active():
                timer.cancel()
        if waiter.multi:
            keys = waiter.keys
        elif skip is _NO_KEY:
            keys = (waiter.keys,)
        else:
            return
        registry = self._waiters
        for key in keys:
            if skip is not _NO_KEY and key == skip:
                continue
            entry = registry.get(key)
            if entry is waiter:
                del registry[key]
                self._key_closed(key)
            elif type(entry) is dict:
                entry.pop(waiter, None)
                if not entry:
                    del registry[key]
                    self._key_closed(key)

    def _key_closed(self, key: Key) -> None:
        if self._on_last is not None and key not in self._listeners:
            self._on_last(key)

    def _forget(self, waiter: _Waiter) -> None:
        """
        Cancellation: drop the waiter wherever it is.
        """
        if waiter.state == _WAITING:
            waiter.state = _DONE
            self._unregister(waiter)
        elif waiter.state == _SELECTED:
            # Chosen by a notification but not fired yet: the pump skips it.
            waiter.state = _DONE
            self._pending -= 1

    def _timed_out(self, waiter: _Waiter, timeout: float) -> None:
        waiter.timer = None
        if waiter.state != _WAITING:
            return
        waiter.state = _DONE
        self._unregister(waiter)
        waiter.deferred.errback(
            BusTimeoutError(f"no notification arrived within {timeout:g} seconds")
        )

    # -- listening --------------------------------------------------------

    def listen(self, key: Key, callback: Callable[[Any], Any]) -> _Listener:
        """
        See `IBus.listen`.
        """
        check_key(key)
        listener = _Listener(self, key, callback)
        entry = self._listeners.get(key)
        if entry is None:
            first = key not in self._waiters
            self._listeners[key] = {listener: None}
            if first and self._on_first is not None:
                self._on_first(key)
        else:
            entry[listener] = None
        return listener

    def _drop_listener(self, listener: _Listener) -> None:
        entry = self._listeners.get(listener.key)
        if entry is None:
            return
        entry.pop(listener, None)
        if not entry:
            del self._listeners[listener.key]
            if self._on_last is not None and listener.key not in self._waiters:
                self._on_last(listener.key)

    # -- notifying --------------------------------------------------------

    def notify(self, key: Key, message: Any) -> Deferred[bool]:
        """
        See `IBus.notify`: wakes the longest-waiting waiter.
        """
        check_key(key)
        return succeed(self.wake_one(key, freeze_message(message)))

    def notify_all(self, key: Key, message: Any) -> Deferred[int]:
        """
        See `IBus.notify_all`.
        """
        check_key(key)
        return succeed(self.wake_all(key, freeze_message(message)))

    def has_waiters(self, key: Key) -> bool:
        """
        Whether ``key`` has a waiter now (not counting listeners).
        """
        return key in self._waiters

    def wake_one(self, key: Key, message: Any, listeners: bool = True) -> bool:
        """
        `notify` for a checked key and an already frozen message.

        :param listeners: whether to tell the key's listeners too.
        """
        if listeners:
            self.tell_listeners(key, message)
        entry = self._waiters.get(key)
        if entry is None:
            return False
        if type(entry) is _Waiter:
            waiter = entry
            empty = True
        else:
            waiter = next(iter(entry))
            del entry[waiter]
            empty = not entry
        waiter.state = _SELECTED
        self._unregister(waiter, skip=key)
        if empty:
            del self._waiters[key]
            self._key_closed(key)
        self._enqueue(_Delivery([waiter], key, message, False), 1)
        return True

    def wake_all(self, key: Key, message: Any) -> int:
        """
        `notify_all` for a checked key and an already frozen message.
        """
        self.tell_listeners(key, message)
        entry = self._waiters.pop(key, None)
        if entry is None:
            return 0
        chosen = [entry] if type(entry) is _Waiter else list(entry)
        for waiter in chosen:
            waiter.state = _SELECTED
            self._unregister(waiter, skip=key)
        self._key_closed(key)
        self._enqueue(_Delivery(chosen, key, message, False), len(chosen))
        return len(chosen)

    def tell_listeners(self, key: Key, message: Any) -> None:
        """
        Queue ``message`` for the listeners of ``key``.
        """
        entry = self._listeners.get(key)
        if entry:
            chosen = list(entry)
            self._enqueue(_Delivery(chosen, key, message, True), len(chosen))

    # -- delivering, in batches over reactor turns ------------------------

    def _enqueue(self, delivery: _Delivery, count: int) -> None:
        if not self._queue:
            self._batch = FIRST_BATCH if FIRST_BATCH < self.batch_size else self.batch_size
        self._queue.append(delivery)
        self._pending += count
        if self._pump_call is None:
            self._pump_call = self.clock.callLater(0, self._pump)

    def _pump(self) -> None:
        self._pump_call = None
        budget = self._batch
        queue = self._queue
        # Only what was queued before this turn: a notification sent by a
        # callback fired here waits for the next turn, like any other.
        ready = len(queue)
        while ready and budget > 0:
            delivery = queue[0]
            targets = delivery.targets
            start = delivery.next
            end = min(len(targets), start + budget)
            budget -= end - start
            delivery.next = end
            if end >= len(targets):
                queue.popleft()
                ready -= 1
            if delivery.listeners:
                for index in range(start, end):
                    self._call_listener(targets[index], delivery.message)
            else:
                key = delivery.key
                message = delivery.message
                for index in range(start, end):
                    self._fire(targets[index], key, message)
        if queue and self._pump_call is None:
            self._batch = min(self._batch * 2, self.batch_size)
            self._pump_call = self.clock.callLater(0, self._pump)

    def _fire(self, waiter: _Waiter, key: Key, message: Any) -> None:
        if waiter.state != _SELECTED:
            return  # cancelled after it was chosen
        waiter.state = _DONE
        self._pending -= 1
        try:
            waiter.deferred.callback((key, message) if waiter.multi else message)
        except Exception:
            log.failure("a bus waiter's callback failed")

    def _call_listener(self, listener: _Listener, message: Any) -> None:
        self._pending -= 1
        if not listener.active:
            return
        try:
            listener.callback(message)
        except Exception:
            log.failure("a bus listener failed")

    # -- the rest of IBus -------------------------------------------------

    def listening(self, keys: Iterable[Key]) -> Deferred[None]:
        """
        Always listening: fires at once.
        """
        return succeed(None)

    def when_resumed(self, observer: Callable[[], Any]) -> Callable[[], None]:
        """
        A memory bus never misses a notification: the observer is kept
        (`resumed` calls it) but nothing in the bus itself calls it.
        """
        self._resumed.append(observer)

        def remove() -> None:
            if observer in self._resumed:
                self._resumed.remove(observer)

        return remove

    def resumed(self) -> None:
        """
        Call every `when_resumed` observer (the Redis bus does, after a
        reconnect); one failing does not stop the others.
        """
        for observer in list(self._resumed):
            try:
                observer()
            except Exception:
                log.failure("a bus resume observer failed")

    def stats(self) -> Dict[str, int]:
        """
        See `IBus.stats`.
        """
        return {
            "waiters": self._count,
            "keys": len(self._waiters),
            "listeners": sum(len(entry) for entry in self._listeners.values()),
            "pending_deliveries": self._pending,
        }

    def ping(self, timeout: float) -> Deferred[bool]:
        """
        See `IBus.ping`: a memory bus always delivers.
        """
        return succeed(True)

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)


__all__ = ["FIRST_BATCH", "MemoryBus"]
