"""
The bus contract: `IBus`.

A bus lets code wait for a key and other code wake the waiters of that key
with a message.  Every wait gets its own Deferred; every operation answers
through a Deferred whatever the backend, so callers never branch on it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from zope.interface import Interface


class IBus(Interface):
    """
    Waits on keys, with timeouts; notifications that wake them.

    Keys are immutable values: ``str``, ``bytes``, ``int``, or tuples of
    those (a `twistauth.bus.errors.BusKeyError` otherwise).  Messages are
    JSON values of at most 64 KiB encoded (a
    `twistauth.bus.errors.BusMessageError` otherwise, raised by the notify
    call itself: never pickle, never a late surprise).  A waiter receives a
    decoded copy of the message, shared by the waiters of one notification:
    treat it as read-only.

    Guarantees every implementation keeps:

      - each wait's Deferred fires exactly once: with a message, with
        `twistauth.bus.errors.BusTimeoutError` at exactly its deadline on the
        bus's clock, or with ``CancelledError`` when it is cancelled;
      - a waiter woken by a notification fires on a later reactor turn, never
        inside the notify call; waking many waiters is spread over several
        turns so the first ones answer before the last ones are processed;
      - an exception in one waiter's callbacks does not stop the others;
      - a wait that ends (notified, timed out, cancelled) leaves no trace:
        no registry entry, no empty key entry, no delayed call.
    """

    def wait_for_key(key: Any, timeout: Optional[float] = None) -> Any:
        """
        Wait for a notification on one key.

        :param key: the key.
        :param timeout: seconds to wait at most (``None``: no limit; ``0``:
            until the next reactor turn).
        :return: Deferred firing with the message, or failing with
            `BusTimeoutError`; cancel it to stop waiting.
        :raises BusKeyError: the key is invalid.
        :raises ValueError: the timeout is negative.
        """

    def wait_for_keys(keys: Any, timeout: Optional[float] = None) -> Any:
        """
        Wait for a notification on any of several keys.

        :param keys: a non-empty sequence of keys.
        :param timeout: as for `wait_for_key`.
        :return: Deferred firing with ``(key, message)`` for the first key
            notified, or failing with `BusTimeoutError`.
        """

    def notify(key: Any, message: Any) -> Any:
        """
        Wake one waiter of ``key`` (the longest waiting one, where the backend
        can tell) with ``message``.  Listeners (`listen`) see it too.

        :return: Deferred firing with ``True`` if a waiter was woken (see the
            implementation for what a distributed backend can know).
        :raises BusMessageError: the message is not a JSON value.
        """

    def notify_all(key: Any, message: Any) -> Any:
        """
        Wake every waiter of ``key`` with ``message``; listeners see it too.

        :return: Deferred firing with how many were woken (see the
            implementation for what a distributed backend can count).
        :raises BusMessageError: the message is not a JSON value.
        """

    def listen(key: Any, callback: Callable[[Any], Any]) -> Any:
        """
        Call ``callback(message)`` for every notification of ``key``, on a
        later reactor turn, until the returned listener is stopped.  A
        listener is not a waiter: it never counts in `notify`'s or
        `notify_all`'s answers and does not take `notify`'s one message.

        :return: an object with a ``stop()`` method; stopping is idempotent,
            and no call happens after it.
        """

    def listening(keys: Any) -> Any:
        """
        A Deferred that fires once notifications of ``keys`` sent from now on
        will reach this process's waiters: the moment after which a check of
        durable state cannot miss an event.  Fires at once for backends that
        are always listening, and at once while disconnected (the
        `when_resumed` observers cover that case).
        """

    def when_resumed(observer: Callable[[], Any]) -> Callable[[], None]:
        """
        Call ``observer()`` each time the bus resumes delivery after it may
        have missed notifications (a distributed backend reconnected).  Use
        it to re-check durable state.

        :return: a function that removes the observer.
        """

    def stats() -> Dict[str, int]:
        """
        Counters, as a ``dict`` of ``str`` to ``int``: at least ``waiters``
        (pending waits), ``keys`` (keys with waiters), ``listeners`` and
        ``pending_deliveries`` (woken but not yet fired).
        """

    def ping(timeout: float) -> Any:
        """
        Check that the bus can deliver now (the readiness probe): for a
        distributed backend, that it is subscribed and its server answers
        within ``timeout`` seconds.

        :return: Deferred firing with ``True``, or failing with
            `twistauth.errors.BackendUnavailableError` saying what is wrong.
        """

    def start() -> Any:
        """
        Start connecting, for backends that connect.

        :return: Deferred firing when the bus is ready (or at once).
        """

    def stop() -> Any:
        """
        Disconnect.  Pending local waits stay registered (a service stops
        its waiters first, see `twistauth.bus.logout.LogoutWatcher.shutdown`).

        :return: Deferred firing when disconnected.
        """
