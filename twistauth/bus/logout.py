"""
Logout waiters: "tell me when this session is logged out", on the bus,
with durable re-checks, caps and a clean shutdown.

The keys: a session's logout is notified on `session_key` (the session id
hashed: ids are secrets and keys travel through Redis) and a user's ("log
out everywhere", the identity provider's back-channel logout) on
`user_key`.  `publish_logout` sends both kinds; the message is
``{"reason": ...}``.

A `LogoutWatcher` turns one request's wait into an answer:

  1. it registers a bus wait on both keys *first*,
  2. once the bus is `listening <twistauth.bus.IBus.listening>`, asks the
     durable state (``logged_out_reason(session)``) whether the session is
     already logged out, so nothing between page load and poll is lost,
  3. answers ``{"logged_out": true, "reason": ...}`` when a notification
     arrives or the durable state says so;
  4. at the wait's timeout re-checks the durable state and answers
     ``{"logged_out": false}`` if the session is still live (a continuous
     watch, for Server-Sent Events, re-checks and keeps waiting instead);
  5. after every bus reconnection (`when_resumed
     <twistauth.bus.IBus.when_resumed>`) re-checks every watch: pub/sub is
     at most once, so a logout published while disconnected still arrives
     within one wait period.

Whoever logs a session out must record it durably *before* notifying.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistauth.bus.errors import (
    BusTimeoutError,
    ShuttingDownError,
    TooManyWaitersError,
    WaitersFullError,
)

log = Logger()

SESSION_PREFIX = "logout:session:"
USER_PREFIX = "logout:user:"
PROVIDER_PREFIX = "logout:provider:"

LOGGED_IN: Dict[str, Any] = {"logged_out": False}
"""The answer at a wait's timeout: still logged in, wait again."""

SHUTDOWN: Dict[str, Any] = {"logged_out": False, "reason": "shutdown"}
"""The answer every pending wait gets when the server shuts down."""


def session_key(session_id: str) -> str:
    """
    The bus key of one session's logout: ``logout:session:`` and 32 hex
    digits of the SHA-256 of the id (never the id itself).
    """
    digest = hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:32]
    return SESSION_PREFIX + digest


def user_key(user_id: str) -> str:
    """
    The bus key of every session of a user: ``logout:user:<user id>``.
    """
    return USER_PREFIX + user_id


def provider_key(issuer: str, provider_sid: str) -> str:
    """
    The bus key of every session bound to one OpenID provider session
    (back-channel logout with a ``sid``): ``logout:provider:`` and 32 hex
    digits of the SHA-256 of the issuer and ``sid``.
    """
    text = issuer + "\n" + provider_sid
    return PROVIDER_PREFIX + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def publish_logout(
    bus: Any,
    *,
    reason: str,
    session_id: Optional[str] = None,
    user_id: Optional[str] = None,
    provider_session: Optional[Tuple[str, str]] = None,
) -> Deferred[int]:
    """
    Wake the logout waiters of a session and/or of a user.  Record the
    logout durably first (delete the session, set the user's logged-out
    mark): the waiters re-check that when a notification may have been lost.

    :param bus: an `twistauth.bus.IBus`.
    :param provider_session: ``(issuer, sid)`` of an OpenID provider
        session (back-channel logout by ``sid``).
    :param reason: why, e.g. ``"logout"``, ``"logout_everywhere"``,
        ``"backchannel"``: the waiting page is told.
    :return: Deferred firing with the number of waiters woken (as the bus
        counts them).
    """
    message = {"reason": reason}
    sends = []
    if session_id is not None:
        sends.append(bus.notify_all(session_key(session_id), message))
    if user_id is not None:
        sends.append(bus.notify_all(user_key(user_id), message))
    if provider_session is not None:
        sends.append(bus.notify_all(provider_key(*provider_session), message))
    if not sends:
        raise ValueError("publish_logout needs a session_id, user_id or provider_session")
    d = gatherResults(sends, consumeErrors=True)
    return d.addCallback(sum)


def _reason_of(message: Any) -> str:
    if isinstance(message, dict):
        reason = message.get("reason")
        if isinstance(reason, str) and reason:
            return reason[:100]
    return "logged_out"


_WAITING = 0
_DONE = 1


class Watch:
    """
    One pending wait for a session's logout.  It calls its ``on_answer``
    exactly once with the answer (a JSON-serialisable dict), unless it is
    cancelled first (`cancel`: the client went away).

    Answers: ``{"logged_out": true, "reason": ...}``, `LOGGED_IN` or
    `SHUTDOWN` (the same objects every time: never change them).

    :ivar via: what ended it: ``"bus"``, ``"recheck"``, ``"timeout"``,
        ``"shutdown"`` or ``"cancelled"``.
    """

    __slots__ = (
        "watcher",
        "session",
        "tally_key",
        "keys",
        "timeout",
        "continuous",
        "on_answer",
        "bus_wait",
        "check",
        "final",
        "state",
        "via",
    )

    def __init__(
        self,
        watcher: LogoutWatcher,
        session: Any,
        tally_key: str,
        keys: Tuple[str, ...],
        timeout: float,
        continuous: bool,
        on_answer: Callable[[Dict[str, Any]], Any],
    ) -> None:
        self.watcher = watcher
        self.session = session
        self.tally_key = tally_key
        self.keys = keys
        self.timeout = timeout
        self.continuous = continuous
        self.on_answer: Optional[Callable[[Dict[str, Any]], Any]] = on_answer
        self.bus_wait: Optional[Deferred[Any]] = None
        self.check: Optional[Deferred[Any]] = None
        self.final = False
        self.state = _WAITING
        self.via = ""

    def cancel(self) -> None:
        """
        End the watch without an answer (the client went away); idempotent.
        """
        if self.state == _WAITING:
            self._end("cancelled")

    # -- the bus ----------------------------------------------------------

    def _wait(self) -> None:
        d = self.watcher.bus.wait_for_keys(self.keys, self.timeout)
        self.bus_wait = d
        d.addCallbacks(self._notified, self._bus_failed)

    def _notified(self, key_message: Any) -> None:
        self.bus_wait = None
        self._answer(self.watcher._logout_answer(key_message[1]), "bus")

    def _bus_failed(self, failure: Failure) -> None:
        self.bus_wait = None
        if self.state != _WAITING:
            return
        if failure.check(BusTimeoutError):
            if self.continuous:
                self._wait()  # first: no window without a wait
                self.recheck(final=False)
            else:
                self.recheck(final=True)
            return
        if not failure.check(CancelledError):
            log.failure("a logout wait failed", failure)
        self._answer(LOGGED_IN, "timeout")

    def _listening(self, _: Any) -> None:
        self.recheck()

    # -- durable state ----------------------------------------------------

    def recheck(self, final: bool = False) -> None:
        """
        Ask the durable state whether the session is logged out; answer if
        it is, or (``final``) answer `LOGGED_IN` if it is not.
        """
        if self.state != _WAITING:
            return
        if final:
            self.final = True
        if self.check is not None:
            return  # the pending check answers for both
        try:
            result = self.watcher.logged_out_reason(self.session)
        except Exception:
            self._check_failed(Failure())
            return
        if isinstance(result, Deferred):
            self.check = result
            result.addCallbacks(self._checked, self._check_failed)
        else:
            self._checked(result)

    def _checked(self, reason: Optional[str]) -> None:
        self.check = None
        if self.state != _WAITING:
            return
        if reason:
            self._answer({"logged_out": True, "reason": str(reason)[:100]}, "recheck")
        elif self.final:
            self._answer(LOGGED_IN, "timeout")

    def _check_failed(self, failure: Failure) -> None:
        self.check = None
        if self.state != _WAITING or failure.check(CancelledError):
            return
        # The kind of error only: its message might name the session.
        error = failure.value
        log.warn(
            "could not check whether a session is logged out: {why}",
            why=getattr(error, "name", None) or type(error).__name__,
        )
        if self.final:
            self._answer(LOGGED_IN, "timeout")

    # -- ending -----------------------------------------------------------

    def _answer(self, answer: Dict[str, Any], via: str) -> None:
        if self.state != _WAITING:
            return
        on_answer = self.on_answer
        self._end(via)
        if on_answer is not None:
            try:
                on_answer(answer)
            except Exception:
                log.failure("answering a logout watch failed")

    def _end(self, via: str) -> None:
        self.state = _DONE
        self.via = via
        self.on_answer = None
        self.watcher._release(self)
        bus_wait, self.bus_wait = self.bus_wait, None
        if bus_wait is not None:
            bus_wait.cancel()
        check, self.check = self.check, None
        if check is not None:
            check.cancel()
        self.session = None


class LogoutWatcher:
    """
    Watches sessions for logout; holds the caps.

    :param bus: the `twistauth.bus.IBus`.
    :param clock: the clock for batching re-checks and shutdown answers.
    :param logged_out_reason: ``logged_out_reason(session)`` answers (or
        returns a Deferred firing with) why the session or its user has been
        logged out, or ``None`` if it has not: the durable state.
    :param max_wait: the longest wait, in seconds (a client asking for more
        gets this); also the re-check period of continuous watches.
    :param max_per_session: the most watches one session may hold at once.
    :param max_total: the most watches in this process.
    :param batch_size: how many watches one reactor turn re-checks (after a
        reconnection) or answers (at shutdown).
    """

    def __init__(
        self,
        *,
        bus: Any,
        clock: IReactorTime,
        logged_out_reason: Callable[[Any], Any],
        max_wait: float = 25.0,
        max_per_session: int = 4,
        max_total: int = 10_000,
        batch_size: int = 256,
    ) -> None:
        if not max_wait > 0 or max_per_session < 1 or max_total < 1 or batch_size < 1:
            raise ValueError("max_wait, max_per_session, max_total and batch_size must be positive")
        self.bus = bus
        self.clock = clock
        self.logged_out_reason = logged_out_reason
        self.max_wait = float(max_wait)
        self.max_per_session = max_per_session
        self.max_total = max_total
        self.batch_size = batch_size
        self._watches: Dict[Watch, None] = {}
        self._per_session: Dict[str, int] = {}
        self._user_keys: Dict[str, str] = {}
        self._last_message: Any = None
        self._last_answer: Dict[str, Any] = {}
        self._closing = False
        self._remove_observer = bus.when_resumed(self.resumed)
        self._sweep: List[Watch] = []
        self._sweep_call: Optional[IDelayedCall] = None
        self._counts: Dict[str, int] = dict.fromkeys(
            ("bus", "recheck", "timeout", "shutdown", "cancelled", "refused"), 0
        )

    def watch(
        self,
        session: Any,
        on_answer: Callable[[Dict[str, Any]], Any],
        timeout: Optional[float] = None,
        *,
        continuous: bool = False,
    ) -> Watch:
        """
        Start watching a session.

        :param session: a live `twistauth.sessions.Session`.
        :param on_answer: called once with the answer (see `Watch`),
            possibly before this returns (already logged out).
        :param timeout: seconds until the answer `LOGGED_IN` (capped at
            ``max_wait``; ``None``: ``max_wait``).  For a continuous watch,
            the period of its durable re-checks.
        :param continuous: never answer `LOGGED_IN`: keep waiting until the
            session is logged out, or shutdown (Server-Sent Events).
        :raises ShuttingDownError: after `shutdown`.
        :raises TooManyWaitersError: the session holds ``max_per_session``.
        :raises WaitersFullError: the process holds ``max_total``.
        """
        if self._closing:
            raise ShuttingDownError()
        tally = session_key(session.id)
        held = self._per_session.get(tally, 0)
        if held >= self.max_per_session:
            self._counts["refused"] += 1
            raise TooManyWaitersError(
                f"this session already has {held} pending waits, the most allowed",
                headers={"Retry-After": "5"},
            )
        if len(self._watches) >= self.max_total:
            self._counts["refused"] += 1
            raise WaitersFullError(headers={"Retry-After": "5"})
        if timeout is None or timeout > self.max_wait:
            timeout = self.max_wait
        keys: Tuple[str, ...] = (tally,)
        if session.user_id is not None:
            keys += (self._user_key(session.user_id),)
        issuer = getattr(session, "issuer", None)
        sid = getattr(session, "provider_sid", None)
        if issuer and sid:
            keys += (provider_key(issuer, sid),)
        watch = Watch(self, session, tally, keys, timeout, continuous, on_answer)
        self._per_session[tally] = held + 1
        self._watches[watch] = None
        watch._wait()
        if watch.state == _WAITING:
            self.bus.listening(keys).addBoth(watch._listening)
        return watch

    def _user_key(self, user_id: str) -> str:
        # One string per user, shared by that user's watches.
        key = self._user_keys.get(user_id)
        if key is None:
            if len(self._user_keys) > 10_000:
                self._user_keys.clear()
            key = self._user_keys[user_id] = user_key(user_id)
        return key

    def _logout_answer(self, message: Any) -> Dict[str, Any]:
        # The waiters of one notification share its message, and so share
        # one answer (and its encoding).
        if message is not self._last_message:
            self._last_message = message
            self._last_answer = {"logged_out": True, "reason": _reason_of(message)}
        return self._last_answer

    def _release(self, watch: Watch) -> None:
        self._counts[watch.via] = self._counts.get(watch.via, 0) + 1
        if watch in self._watches:
            del self._watches[watch]
            held = self._per_session[watch.tally_key] - 1
            if held:
                self._per_session[watch.tally_key] = held
            else:
                del self._per_session[watch.tally_key]

    # -- re-checks after a reconnection, answers at shutdown -------------

    def resumed(self) -> None:
        """
        The bus may have missed notifications: re-check every watch, a
        batch per reactor turn.
        """
        if not self._watches:
            return
        self._sweep = list(self._watches)
        if self._sweep_call is None:
            self._sweep_call = self.clock.callLater(0, self._run_sweep, None)

    def _run_sweep(self, answer: Optional[Dict[str, Any]]) -> None:
        self._sweep_call = None
        batch, self._sweep = self._sweep[: self.batch_size], self._sweep[self.batch_size :]
        for watch in batch:
            if answer is None:
                watch.recheck()
            else:
                watch._answer(answer, "shutdown")
        if self._sweep:
            self._sweep_call = self.clock.callLater(0, self._run_sweep, answer)
        elif answer is not None and self._shutdown_done is not None:
            done, self._shutdown_done = self._shutdown_done, None
            done.callback(None)

    _shutdown_done: Optional[Deferred[None]] = None

    def shutdown(self) -> Deferred[None]:
        """
        Refuse new watches and answer every pending one with `SHUTDOWN`, a
        batch per reactor turn, instead of cutting connections.

        :return: Deferred firing once every watch is answered.
        """
        self._closing = True
        self._remove_observer()
        if self._sweep_call is not None:
            self._sweep_call.cancel()
            self._sweep_call = None
        if not self._watches:
            return succeed(None)
        self._sweep = list(self._watches)
        self._shutdown_done = Deferred()
        done = self._shutdown_done
        self._sweep_call = self.clock.callLater(0, self._run_sweep, SHUTDOWN)
        return done

    @property
    def closing(self) -> bool:
        """
        Whether `shutdown` was called.
        """
        return self._closing

    def stats(self) -> Dict[str, int]:
        """
        ``watches`` pending, ``sessions`` holding them, and how many ended
        by each way (``bus``, ``recheck``, ``timeout``, ``shutdown``,
        ``cancelled``) or were ``refused`` by a cap.
        """
        stats = {"watches": len(self._watches), "sessions": len(self._per_session)}
        stats.update(self._counts)
        return stats


__all__ = [
    "LOGGED_IN",
    "SHUTDOWN",
    "LogoutWatcher",
    "Watch",
    "provider_key",
    "publish_logout",
    "session_key",
    "user_key",
]
