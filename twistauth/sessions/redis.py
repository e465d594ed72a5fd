"""
The Redis session cache: sessions shared by every process of a deployment.

Layout (``P`` is the key prefix, ``twistauth:`` by default):

``P s:<id>``
    One hash per session, with a TTL of min(idle remaining, absolute
    remaining) so Redis drops it when it expires.  Fields: ``v`` the
    version; ``f:<name>`` each of the session's own fields as JSON; ``d:<key>``
    each key of the application state as JSON.
``P u:<user id>``
    A set of the user's session ids: "log out everywhere" is one call.
``P p:<sha256(issuer, sid)>``
    A set of the ids of the sessions bound to one OpenID provider session:
    back-channel logout is one call.

The index sets may name sessions that have expired or changed user since;
the scripts that use them check each session before deleting it and prune
the dead ids, and an index lives as long as the longest absolute lifetime
of a session added to it, so it never expires before a session it holds.

Why a hash and not one JSON document: a save writes only the keys that
changed (``HSET``/``HDEL`` of single fields), so two requests that change
different keys of one session both keep their change, and Lua never
decodes the application's JSON (Redis's cjson turns ``[]`` into ``{}`` and
rounds numbers to 14 digits).

Every write is one Lua script, atomic in Redis: a save checks that the
session still exists (a save after a logout is dropped, never a
resurrection), writes its difference and bumps ``v``; a renewal renames the
hash; a load reads the hash and records the use only when the recorded one
is older than a fraction of the idle timeout, so a session in use costs no
write per request.

Every call has a deadline; an unreachable, hung or restarting Redis fails
the call with `twistauth.sessions.errors.SessionStoreUnavailableError`
(503), never "no session".  Nothing here is cached in the process, so once
Redis answers again the same sessions work (given a Redis that keeps its
data across a restart: ``appendonly yes``, or a replica).

The scripts touch keys they find in the index sets (not only those passed
as ``KEYS``): fine for one server or a Sentinel-managed master, not for
Redis Cluster.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attr
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twistauth import redisconn
from twistauth.sessions._common import (
    Timeouts,
    dump_fields,
    dump_value,
    is_session_id,
    load_session,
    new_id,
    new_session,
    run_store_script,
)
from twistauth.sessions._interfaces import ISessionCache, Session

#: An index set with more members than this is pruned of dead ids on write.
PRUNE_ABOVE = 16

#: The longest load reply sent as a status (one-line) reply; longer ones
#: are bulk strings (txredisapi drops a connection on lines over 16 KiB).
STATUS_MAX = 16000

# KEYS[1] the session. ARGV: now, idle, absolute, touch_after (seconds, as
# JSON numbers). Answers false (no live session) or the JSON text
# [touched, {field: value...}], assembled from the stored values (each is
# already JSON, written by this module; cjson only quotes the field names,
# so it neither rounds numbers nor reshapes arrays), decoded with one
# json.loads.  It comes as a status reply (one line: compact JSON holds no
# CR or LF) when it fits: txredisapi's own parser spends a reactor turn on
# every bulk string that another reply follows, and on every element of a
# multi-bulk reply, so a session read as a hash list is ~10 times slower and
# as a bulk string ~2 times slower under concurrent load.  A use is recorded
# only when due; an expired session is deleted.
_NEVER = 1e18
"""A touch interval no use reaches: loads that must not count as activity."""

_LOAD = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
local created, seen
for i = 1, #h, 2 do
  if h[i] == 'f:created' then created = tonumber(h[i + 1])
  elseif h[i] == 'f:last_seen' then seen = tonumber(h[i + 1]) end
end
local now = tonumber(ARGV[1])
if created == nil or seen == nil then return false end
local left = math.min(seen + tonumber(ARGV[2]), created + tonumber(ARGV[3])) - now
if left <= 0 then
  redis.call('DEL', KEYS[1])
  return false
end
local touched = 0
if now - seen >= tonumber(ARGV[4]) then
  left = math.min(now + tonumber(ARGV[2]), created + tonumber(ARGV[3])) - now
  redis.call('HSET', KEYS[1], 'f:last_seen', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.floor(left * 1000)))
  touched = 1
end
local parts = {}
for i = 1, #h, 2 do
  parts[#parts + 1] = cjson.encode(h[i]) .. ':' .. h[i + 1]
end
local reply = '[' .. touched .. ',{' .. table.concat(parts, ',') .. '}]'
if #reply <= STATUS_MAX then return redis.status_reply(reply) end
return reply
""".replace("STATUS_MAX", str(STATUS_MAX))

# KEYS: 1 the session, 2 the user's index or '', 3 the provider index or
# '', 4 the old session (renewal) or ''.
# ARGV: 1 mode ('c' create, 'u' update, 'r' renew), 2 TTL ms, 3 index TTL
# ms, 4 session id, 5 old session id, 6 key prefix of sessions, 7 number of
# field/value pairs to set, 8 number of fields to delete, then the pairs,
# then the fields to delete.
# Answers the new version, 0 if the session is gone (dropped), -1 if the id
# is taken.
_SAVE = """
local key, mode = KEYS[1], ARGV[1]
local nset, ndel = tonumber(ARGV[7]), tonumber(ARGV[8])
if mode == 'c' then
  if redis.call('EXISTS', key) == 1 then return -1 end
elseif mode == 'u' then
  if redis.call('EXISTS', key) == 0 then return 0 end
else
  if redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
  if redis.call('EXISTS', key) == 1 then return -1 end
  redis.call('RENAME', KEYS[4], key)
  for i = 2, 3 do
    if KEYS[i] ~= '' then redis.call('SREM', KEYS[i], ARGV[5]) end
  end
end
if nset > 0 then redis.call('HSET', key, unpack(ARGV, 9, 8 + 2 * nset)) end
if ndel > 0 then redis.call('HDEL', key, unpack(ARGV, 9 + 2 * nset, 8 + 2 * nset + ndel)) end
local version = redis.call('HINCRBY', key, 'v', 1)
redis.call('PEXPIRE', key, ARGV[2])
local index_ttl = tonumber(ARGV[3])
for i = 2, 3 do
  local index = KEYS[i]
  if index ~= '' then
    redis.call('SADD', index, ARGV[4])
    if redis.call('PTTL', index) < index_ttl then redis.call('PEXPIRE', index, index_ttl) end
    if redis.call('SCARD', index) > PRUNE_ABOVE then
      for _, id in ipairs(redis.call('SMEMBERS', index)) do
        if redis.call('EXISTS', ARGV[6] .. id) == 0 then redis.call('SREM', index, id) end
      end
    end
  end
end
return version
""".replace("PRUNE_ABOVE", str(PRUNE_ABOVE))

# KEYS: 1 the session, 2 and 3 indexes or ''. ARGV[1] the session id.
_DELETE = """
redis.call('DEL', KEYS[1])
for i = 2, 3 do
  if KEYS[i] ~= '' then redis.call('SREM', KEYS[i], ARGV[1]) end
end
return 0
"""

# KEYS[1] an index set. ARGV: 1 the sessions' key prefix, then field/value
# pairs a session must still have to be deleted (its user, or its issuer
# and sid). Answers how many sessions ended.
_DELETE_INDEXED = """
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. id
  local match = redis.call('EXISTS', key) == 1
  for i = 2, #ARGV, 2 do
    if match and redis.call('HGET', key, ARGV[i]) ~= ARGV[i + 1] then match = false end
  end
  if match then
    redis.call('DEL', key)
    n = n + 1
  end
end
redis.call('DEL', KEYS[1])
return n
"""

# Each script hashed and its EVALSHA prefix encoded once (loads are the hot
# path: see `redisconn.run_script`).
_LOAD_SCRIPT = redisconn.Script(_LOAD, keys=1)
_SAVE_SCRIPT = redisconn.Script(_SAVE, keys=4)
_DELETE_SCRIPT = redisconn.Script(_DELETE, keys=3)
_DELETE_INDEXED_SCRIPT = redisconn.Script(_DELETE_INDEXED, keys=1)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def provider_key(issuer: str, provider_sid: str) -> str:
    """
    The index name of an OpenID provider session: a hash, because issuers
    are URLs and either part may hold any character.
    """
    return hashlib.sha256(_json([issuer, provider_sid]).encode("utf-8")).hexdigest()


@implementer(ISessionCache)
@attr.s(kw_only=True, eq=False)
class RedisSessionCache:
    """
    Sessions in Redis.

    :param redis: a connection from `twistauth.redisconn.connect` (made with
        ``convertNumbers=False``; the cache does not own it).
    :param clock: the time source for creation, use, expiry and the call
        deadlines.
    :param idle_timeout: seconds a session lives unused.
    :param absolute_timeout: seconds a session lives at most.
    :param touch_fraction: a use is written only when the recorded one is
        older than this fraction of ``idle_timeout`` (see `Timeouts`).
    :param call_timeout: seconds every Redis call may take before it fails
        with `SessionStoreUnavailableError`.
    :param key_prefix: the prefix of every key this cache writes.
    """

    name = "redis"

    redis: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    idle_timeout: float = attr.ib(default=1800.0)
    absolute_timeout: float = attr.ib(default=43200.0)
    touch_fraction: float = attr.ib(default=0.1)
    call_timeout: float = attr.ib(default=2.0)
    key_prefix: str = attr.ib(default="twistauth:")
    _timeouts: Timeouts = attr.ib(init=False)
    _load_args: Dict[bool, Tuple[str, str, str]] = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        t = self._timeouts = Timeouts(
            idle=self.idle_timeout,
            absolute=self.absolute_timeout,
            touch_fraction=self.touch_fraction,
        )
        # The load script's arguments after "now", made once (loads are
        # the hot path); without ``touch`` the use is never "due".
        self._load_args = {
            touch: (_json(t.idle), _json(t.absolute), _json(t.touch_after if touch else _NEVER))
            for touch in (True, False)
        }

    # -- keys ------------------------------------------------------------

    def session_key(self, session_id: str) -> str:
        """
        The Redis key of a session's hash.
        """
        return f"{self.key_prefix}s:{session_id}"

    def user_key(self, user_id: str) -> str:
        """
        The Redis key of a user's index set.
        """
        return f"{self.key_prefix}u:{user_id}"

    def provider_index_key(self, issuer: str, provider_sid: str) -> str:
        """
        The Redis key of an OpenID provider session's index set.
        """
        return f"{self.key_prefix}p:{provider_key(issuer, provider_sid)}"

    def _indexes(self, session: Session) -> List[str]:
        user = self.user_key(session.user_id) if session.user_id is not None else ""
        provider = ""
        if session.issuer is not None and session.provider_sid is not None:
            provider = self.provider_index_key(session.issuer, session.provider_sid)
        return [user, provider]

    def _run(
        self, script: redisconn.Script, keys: Sequence[str], args: Sequence[str]
    ) -> Deferred[Any]:
        return run_store_script(self.redis, self.clock, self.call_timeout, script, keys, args)

    # -- ISessionCache ---------------------------------------------------

    def create(self, permanent: bool = False) -> Deferred[Session]:
        return succeed(new_session(self.clock.seconds(), permanent))

    def load(self, token: str, touch: bool = True) -> Deferred[Optional[Session]]:
        if not is_session_id(token):
            return succeed(None)
        now = self.clock.seconds()
        d = self._run(
            _LOAD_SCRIPT, (self.session_key(token),), (repr(now), *self._load_args[touch])
        )
        d.addCallback(self._loaded, token, now)
        return d

    @staticmethod
    def _loaded(reply: Optional[str], token: str, now: float) -> Optional[Session]:
        if not reply:
            return None
        touched, stored = json.loads(reply)
        fields: Dict[str, Any] = {}
        data: Dict[str, Any] = {}
        for name, value in stored.items():
            if name.startswith("d:"):
                data[name[2:]] = value
            elif name.startswith("f:"):
                fields[name[2:]] = value
        if touched:
            fields["last_seen"] = now
        return load_session(token, fields, data, int(stored.get("v", 0)))

    def save(self, session: Session) -> Deferred[Optional[str]]:
        if session.version and not session.dirty:
            return succeed(session.id)  # nothing to write
        return self._write(session, "c" if session.version == 0 else "u", "")

    @inlineCallbacks
    def renew(self, session: Session) -> Any:
        old_id = session.id
        old_csrf = session.csrf_token
        session.id = new_id()
        session.csrf_token = new_id()
        session.mark_fields_changed()
        if session.version == 0:
            token = yield self._write(session, "c", "")
        else:
            token = yield self._write(session, "r", old_id)
        if token is None:
            session.id, session.csrf_token = old_id, old_csrf
        return token

    def delete(self, session: Session) -> Deferred[None]:
        d = self._run(
            _DELETE_SCRIPT, [self.session_key(session.id), *self._indexes(session)], [session.id]
        )
        d.addCallback(lambda _: None)
        return d

    def delete_user(self, user_id: str) -> Deferred[int]:
        return self._delete_indexed(self.user_key(user_id), ["f:user_id", _json(user_id)])

    def delete_provider_session(self, issuer: str, provider_sid: str) -> Deferred[int]:
        return self._delete_indexed(
            self.provider_index_key(issuer, provider_sid),
            ["f:issuer", _json(issuer), "f:provider_sid", _json(provider_sid)],
        )

    # -- writing ---------------------------------------------------------

    def _delete_indexed(self, index: str, match: Sequence[str]) -> Deferred[int]:
        d = self._run(_DELETE_INDEXED_SCRIPT, [index], [self.key_prefix + "s:", *match])
        d.addCallback(int)
        return d

    @inlineCallbacks
    def _write(self, session: Session, mode: str, old_id: str) -> Any:
        """
        Store the session's difference with the save script.

        :param mode: ``"c"`` create, ``"u"`` update, ``"r"`` renew from
            ``old_id``.
        :return: Deferred firing with the session id, or ``None`` when the
            session is gone (deleted or expired) and the write was dropped.
        """
        now = self.clock.seconds()
        remaining = self._timeouts.remaining(session.created, now, now)
        if remaining <= 0:
            return None  # past its absolute lifetime: nothing to store
        pairs: List[str] = []
        if mode == "c":
            items = {key: session[key] for key in session}
        else:
            items = session.changes()
        for key, value in items.items():
            pairs += ["d:" + key, dump_value(key, value)]
        if mode != "u" or session.fields_changed():
            for name, text in dump_fields(session).items():
                if name != "last_seen":
                    pairs += ["f:" + name, text]
        pairs += ["f:last_seen", _json(now)]
        deleted = [] if mode == "c" else ["d:" + key for key in session.deleted_keys()]
        index_ttl = session.created + self._timeouts.absolute - now
        keys = [
            self.session_key(session.id),
            *self._indexes(session),
            self.session_key(old_id) if old_id else "",
        ]
        args = [
            mode,
            str(max(1, int(remaining * 1000))),
            str(max(1, int(index_ttl * 1000) + 1000)),
            session.id,
            old_id,
            self.key_prefix + "s:",
            str(len(pairs) // 2),
            str(len(deleted)),
            *pairs,
            *deleted,
        ]
        version = yield self._run(_SAVE_SCRIPT, keys, args)
        version = int(version)
        if version == -1:
            raise RuntimeError("session id collision")
        if version == 0:
            return None
        session.last_seen = now
        session.version = version
        session.mark_saved()
        return session.id
