"""
Revocation records for client-side sessions: `IRevocations` in memory and
in Redis.

A client-side session cannot be deleted (the client holds it), so ending one
means remembering, until it would have expired anyway, that it must be
refused: a revoked session id, a per-user *not-before* time ("log out
everywhere": every session that logged in at or before it), or a revoked
OpenID provider session (back-channel logout).  Each record is kept only as
long as its ``ttl``: the caller passes the longest time a session it names
could still be live, so the store stays small.

The memory store is for one process; the Redis one is shared by every
process, and like every Redis user here fails with a 503 when Redis is down
(never "not revoked").  A not-before time is compared with a session's
``authenticated_at``, both from the processes' clocks: keep them in sync.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from typing import Any, Dict, List, Sequence, Tuple

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twistauth import redisconn
from twistauth.sessions._common import run_store_script
from twistauth.sessions._interfaces import IRevocations, Session
from twistauth.sessions.errors import SessionStoreUnavailableError


def _revoked(session: Session, revoked_id: bool, not_before: Any, provider_revoked: bool) -> bool:
    if revoked_id or provider_revoked:
        return True
    if not_before is None or session.user_id is None:
        return False
    logged_in = session.authenticated_at
    # A session bound to a user but without a login time is treated as old.
    # A login at the very instant of the revocation came after it (the
    # revoke-then-log-in-again of a password change on one clock reading).
    return logged_in is None or logged_in < float(not_before)


@implementer(IRevocations)
@attr.s(kw_only=True, eq=False)
class MemoryRevocations:
    """
    Revocation records in this process's memory, dropped when their ``ttl``
    passes (on the injected clock; no timer runs).
    """

    clock: IReactorTime = attr.ib()
    _sessions: Dict[str, float] = attr.ib(init=False, factory=dict)
    _users: Dict[str, Tuple[float, float]] = attr.ib(init=False, factory=dict)
    _providers: Dict[Tuple[str, str], float] = attr.ib(init=False, factory=dict)
    _expiries: List[Tuple[float, int, Any]] = attr.ib(init=False, factory=list)

    def __len__(self) -> int:
        """
        How many records are kept.
        """
        self._purge()
        return len(self._sessions) + len(self._users) + len(self._providers)

    def _purge(self) -> None:
        now = self.clock.seconds()
        while self._expiries and self._expiries[0][0] <= now:
            _, kind, key = heapq.heappop(self._expiries)
            table: Dict[Any, Any] = (self._sessions, self._users, self._providers)[kind]
            entry = table.get(key)
            if entry is not None:
                expires = entry[1] if kind == 1 else entry
                if expires <= now:
                    del table[key]

    def _expires(self, ttl: float, kind: int, key: Any) -> float:
        expires = self.clock.seconds() + ttl
        heapq.heappush(self._expiries, (expires, kind, key))
        return expires

    def revoke_session(self, session_id: str, ttl: float) -> Deferred[None]:
        self._purge()
        expires = self._expires(ttl, 0, session_id)
        self._sessions[session_id] = max(expires, self._sessions.get(session_id, expires))
        return succeed(None)

    def revoke_user(self, user_id: str, not_before: float, ttl: float) -> Deferred[None]:
        self._purge()
        expires = self._expires(ttl, 1, user_id)
        old_not_before, old_expires = self._users.get(user_id, (not_before, expires))
        self._users[user_id] = (max(not_before, old_not_before), max(expires, old_expires))
        return succeed(None)

    def revoke_provider_session(self, issuer: str, provider_sid: str, ttl: float) -> Deferred[None]:
        self._purge()
        key = (issuer, provider_sid)
        expires = self._expires(ttl, 2, key)
        self._providers[key] = max(expires, self._providers.get(key, expires))
        return succeed(None)

    def is_revoked(self, session: Session) -> Deferred[bool]:
        self._purge()
        user = self._users.get(session.user_id) if session.user_id is not None else None
        provider = (
            session.issuer is not None
            and session.provider_sid is not None
            and (session.issuer, session.provider_sid) in self._providers
        )
        return succeed(
            _revoked(session, session.id in self._sessions, user[0] if user else None, provider)
        )


# KEYS[1] the user's not-before record. ARGV: the time, the TTL in ms.
# A later time replaces an earlier one, never the reverse.
_REVOKE_USER = """
local current = tonumber(redis.call('GET', KEYS[1]))
if current == nil or current < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


# KEYS: the session id's record, the user's not-before record or '', the
# provider session's record or ''. ARGV[1] the session's login time or ''.
# Answers 1 if revoked: an integer, the cheapest reply for txredisapi to
# parse (an MGET list costs it a reactor turn per element).
_IS_REVOKED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if KEYS[3] ~= '' and redis.call('EXISTS', KEYS[3]) == 1 then return 1 end
if KEYS[2] ~= '' then
  local not_before = redis.call('GET', KEYS[2])
  if not_before then
    if ARGV[1] == '' or tonumber(ARGV[1]) <= tonumber(not_before) then return 1 end
  end
end
return 0
"""

# (module-level: each script's EVALSHA prefix is encoded once, and the
# checks run on the lean path: see `redisconn.run_script`).
_REVOKE_USER_SCRIPT = redisconn.Script(_REVOKE_USER, keys=1)
_IS_REVOKED_SCRIPT = redisconn.Script(_IS_REVOKED, keys=3)


def _ms(ttl: float) -> str:
    return str(max(1, int(ttl * 1000)))


@implementer(IRevocations)
@attr.s(kw_only=True, eq=False)
class RedisRevocations:
    """
    Revocation records in Redis, each a key with a TTL:
    ``P rv:s:<session id>``, ``P rv:u:<user id>`` (the not-before time) and
    ``P rv:p:<sha256(issuer, sid)>``.  A check is one Lua script
    (`redisconn.run_script`).

    :param redis: a connection from `twistauth.redisconn.connect`.
    :param clock: the clock of the call deadlines.
    :param call_timeout: seconds every Redis call may take.
    :param key_prefix: the prefix of every key written.
    """

    redis: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    call_timeout: float = attr.ib(default=2.0)
    key_prefix: str = attr.ib(default="twistauth:")

    def _call(self, method: str, *args: Any) -> Deferred[Any]:
        return redisconn.call(
            self.clock,
            self.call_timeout,
            getattr(self.redis, method),
            *args,
            what="the session store (Redis)",
            unavailable=SessionStoreUnavailableError,
        )

    def _run(
        self, script: redisconn.Script, keys: Sequence[str], args: Sequence[str]
    ) -> Deferred[Any]:
        return run_store_script(self.redis, self.clock, self.call_timeout, script, keys, args)

    def _session_key(self, session_id: str) -> str:
        return f"{self.key_prefix}rv:s:{session_id}"

    def _user_key(self, user_id: str) -> str:
        return f"{self.key_prefix}rv:u:{user_id}"

    def _provider_key(self, issuer: str, provider_sid: str) -> str:
        digest = hashlib.sha256(json.dumps([issuer, provider_sid]).encode("utf-8")).hexdigest()
        return f"{self.key_prefix}rv:p:{digest}"

    def _done(self, d: Deferred[Any]) -> Deferred[None]:
        d.addCallback(lambda _: None)
        return d

    def revoke_session(self, session_id: str, ttl: float) -> Deferred[None]:
        return self._done(self._call("set", self._session_key(session_id), "1", None, _ms(ttl)))

    def revoke_user(self, user_id: str, not_before: float, ttl: float) -> Deferred[None]:
        return self._done(
            self._run(
                _REVOKE_USER_SCRIPT, (self._user_key(user_id),), (json.dumps(not_before), _ms(ttl))
            )
        )

    def revoke_provider_session(self, issuer: str, provider_sid: str, ttl: float) -> Deferred[None]:
        key = self._provider_key(issuer, provider_sid)
        return self._done(self._call("set", key, "1", None, _ms(ttl)))

    def is_revoked(self, session: Session) -> Deferred[bool]:
        user = "" if session.user_id is None else self._user_key(session.user_id)
        provider = ""
        if session.issuer is not None and session.provider_sid is not None:
            provider = self._provider_key(session.issuer, session.provider_sid)
        logged_in = "" if session.authenticated_at is None else json.dumps(session.authenticated_at)
        d = self._run(
            _IS_REVOKED_SCRIPT, (self._session_key(session.id), user, provider), (logged_in,)
        )
        d.addCallback(_is_one)
        return d


def _is_one(reply: Any) -> bool:
    return int(reply) == 1
