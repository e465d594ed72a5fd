"""
The Redis cache backend: one cache for every process of a deployment.

Layout (``P`` is the key prefix, ``twistauth:cache:`` by default):

``P g:<namespace>`` and ``P g:<namespace>:u:<user hash>``
    Generations: random tokens, replaced (never incremented) by an
    invalidation, kept ``generation_ttl`` seconds (two days by default).  A
    generation that expired or was evicted gets a fresh token on its next
    read, which can only make old entries unreachable.
``P v:<generation>[:<generation>]:<method>:<user hash or ->:<parameter hash>``
    A method result as compact ASCII JSON, with the method's TTL.

A lookup is one Lua script (one round trip): it reads or creates the
generations, builds the value key and reads it, and answers ``H<key>
<value>`` or ``M<key>`` as a status reply when it fits on one line
(txredisapi spends a reactor turn on every element of a multi-bulk reply).
The script builds a key it was not given in ``KEYS``: fine for one server
or a Sentinel-managed master, not for Redis Cluster.

Every call has a short deadline (``timeout``, 0.25 s by default): the cache
must never be slower than the method it saves.  A failure or a timeout fails
the Deferred; `twistauth.caching.MethodCache` then runs methods uncached.
"""

from __future__ import annotations

import secrets
from typing import Any, Optional, Sequence, Tuple

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twistauth import redisconn
from twistauth.caching._interfaces import ICacheBackend

#: The longest lookup reply sent as a status (one-line) reply.
STATUS_MAX = 16000

# KEYS: the generations.  ARGV: 1 a fresh token prefix, 2 the value-key
# prefix, 3 the key suffix, 4 the generations' TTL (s), 5 STATUS_MAX.
_LOOKUP = """
local gens = {}
for i = 1, #KEYS do
  local g = redis.call('GET', KEYS[i])
  if not g then
    g = ARGV[1] .. i
    redis.call('SET', KEYS[i], g, 'EX', ARGV[4])
  end
  gens[i] = g
end
local key = ARGV[2] .. table.concat(gens, ':') .. ':' .. ARGV[3]
local v = redis.call('GET', key)
local reply
if v then reply = 'H' .. key .. ' ' .. v else reply = 'M' .. key end
if #reply <= tonumber(ARGV[5]) then return redis.status_reply(reply) end
return reply
"""

# KEYS: the generations.  ARGV: 1 a fresh token prefix, 2 their TTL (s).
_BUMP = """
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1] .. i, 'EX', ARGV[2])
end
return redis.status_reply('OK')
"""


# (module-level: each script's EVALSHA prefix is encoded once per number of
# generation keys: see `redisconn.Script.for_keys`).
_LOOKUP_SCRIPT = redisconn.Script(_LOOKUP)
_BUMP_SCRIPT = redisconn.Script(_BUMP)


def _check_prefix(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"the cache key prefix must be text without spaces, got {value!r}")


@implementer(ICacheBackend)
@attr.s(kw_only=True, eq=False)
class RedisCacheBackend:
    """
    Method results in Redis.

    :ivar redis: a connection from `twistauth.redisconn.connect` (the
        backend does not own it).
    :ivar clock: the time source of the call deadlines.
    :ivar timeout: seconds each call may take.
    :ivar prefix: the prefix of every key.
    :ivar generation_ttl: seconds a generation is kept (longer than any
        method's TTL).
    """

    name = "redis"
    immediate = False

    redis: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    timeout: float = attr.ib(default=0.25)
    prefix: str = attr.ib(default="twistauth:cache:", validator=_check_prefix)
    generation_ttl: int = attr.ib(default=2 * 86400)

    def _run(
        self, script: redisconn.Script, keys: Sequence[str], args: Sequence[str]
    ) -> Deferred[Any]:
        return redisconn.run_script(
            self.redis,
            script,
            keys,
            args,
            clock=self.clock,
            timeout=self.timeout,
            what="the method cache (Redis)",
        )

    def _call(self, method: str, *args: Any) -> Deferred[Any]:
        return redisconn.call(
            self.clock,
            self.timeout,
            getattr(self.redis, method),
            *args,
            what="the method cache (Redis)",
        )

    def lookup(
        self, generation_keys: Sequence[str], suffix: str
    ) -> Deferred[Tuple[str, Optional[str]]]:
        keys = [self.prefix + g for g in generation_keys]
        args = [
            secrets.token_hex(8) + "-",
            self.prefix + "v:",
            suffix,
            str(self.generation_ttl),
            str(STATUS_MAX),
        ]
        d = self._run(_LOOKUP_SCRIPT.for_keys(len(keys)), keys, args)
        d.addCallback(self._parse)
        return d

    @staticmethod
    def _parse(reply: Any) -> Tuple[str, Optional[str]]:
        if isinstance(reply, bytes):
            reply = reply.decode("ascii")
        if not isinstance(reply, str) or not reply or reply[0] not in "HM":
            raise ValueError(f"unexpected cache lookup reply {str(reply)[:40]!r}")
        if reply[0] == "M":
            return reply[1:], None
        key, _, value = reply[1:].partition(" ")
        return key, value

    def store(self, key: str, value: str, ttl: float) -> Deferred[None]:
        d = self._call("set", key, value, None, max(1, int(ttl * 1000)))
        d.addCallback(lambda _: None)
        return d

    def bump(self, generation_keys: Sequence[str]) -> Deferred[None]:
        keys = [self.prefix + g for g in generation_keys]
        d = self._run(
            _BUMP_SCRIPT.for_keys(len(keys)),
            keys,
            [secrets.token_hex(8) + "-", str(self.generation_ttl)],
        )
        d.addCallback(lambda _: None)
        return d
