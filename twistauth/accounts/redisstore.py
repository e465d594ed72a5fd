"""
The Redis user store: one hash per user, for deployments of many processes
or machines.

Keys (``prefix`` defaults to ``"twistauth:"``):

- ``<prefix>user:<user_id>``: a hash with the fields ``password_hash``
  (absent for accounts without a password), ``roles``, ``profile`` and
  ``tokens`` (JSON), ``disabled`` (``"0"``/``"1"``), ``created``,
  ``updated`` (clock seconds) and ``version`` (an integer).
- ``<prefix>users``: a set of every user id.

Creation, compare-and-set replacement and deletion are Lua scripts, so each
is atomic: of two concurrent creates of one id (from any process) exactly
one succeeds, and a write based on a stale read is refused.  Every call has
a deadline; an outage answers `twistauth.errors.BackendUnavailableError`.
The connection must be made with ``convertNumbers=False`` (else a profile
value of ``"007"`` would come back as ``7``).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import attr
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twistauth import redisconn
from twistauth.accounts._interfaces import IUserStore, User
from twistauth.accounts._redis import RedisCaller
from twistauth.accounts.errors import UnknownUserError, UserConflictError, UserExistsError

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

_REPLACE = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return -1 end
if version ~= ARGV[1] then return 0 end
local created = redis.call('HGET', KEYS[1], 'created') or '0'
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('HSET', KEYS[1], 'created', created)
return created
"""

_DELETE = """
local n = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return n
"""

# (module-level: each script's EVALSHA prefix is encoded once: see
# `twistauth.redisconn.run_script`).
_CREATE_SCRIPT = redisconn.Script(_CREATE, keys=2)
_REPLACE_SCRIPT = redisconn.Script(_REPLACE, keys=1)
_DELETE_SCRIPT = redisconn.Script(_DELETE, keys=2)


def _encode(user: User) -> List[str]:
    """
    The user as a flat list of hash fields and values.
    """
    fields: Dict[str, str] = {
        "roles": json.dumps(sorted(user.roles)),
        "disabled": "1" if user.disabled else "0",
        "created": repr(float(user.created)),
        "updated": repr(float(user.updated)),
        "profile": json.dumps(user.profile, separators=(",", ":")),
        "tokens": json.dumps(user.tokens, separators=(",", ":")),
        "version": str(user.version),
    }
    if user.password_hash is not None:
        fields["password_hash"] = user.password_hash
    flat: List[str] = []
    for name, value in fields.items():
        flat += [name, value]
    return flat


def _decode(user_id: str, fields: Dict[str, str]) -> User:
    return User(
        user_id=user_id,
        password_hash=fields.get("password_hash"),
        roles=json.loads(fields.get("roles", "[]")),
        disabled=fields.get("disabled") == "1",
        created=float(fields.get("created", "0")),
        updated=float(fields.get("updated", "0")),
        profile=json.loads(fields.get("profile", "{}")),
        tokens=json.loads(fields.get("tokens", "{}")),
        version=int(fields.get("version", "0")),
    )


@implementer(IUserStore)
@attr.s(kw_only=True)
class RedisUserStore:
    """
    An `IUserStore` in Redis (see the module documentation).

    :ivar redis: a connected txredisapi connection or pool, made with
        ``convertNumbers=False``.
    :ivar clock: stamps ``created`` and ``updated`` and times every call.
    :ivar timeout: seconds a Redis call may take before it answers 503.
    :ivar prefix: the prefix of every key.
    """

    name = "redis"

    redis: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    timeout: float = attr.ib(default=2.0)
    prefix: str = attr.ib(default="twistauth:")
    _call: RedisCaller = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        self._call = RedisCaller(
            redis=self.redis, clock=self.clock, timeout=self.timeout, what="user store"
        )

    def _key(self, user_id: str) -> str:
        return f"{self.prefix}user:{user_id}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}users"

    def get(self, user_id: str) -> Any:
        def decode(fields: Optional[Dict[str, str]]) -> Optional[User]:
            if not fields:
                return None
            return _decode(user_id, fields)

        return self._call("hgetall", self._key(user_id)).addCallback(decode)

    def create(self, user: User) -> Any:
        now = self.clock.seconds()
        stored = user.evolve(created=now, updated=now, version=1)

        def created(answer: Any) -> User:
            if int(answer) != 1:
                raise UserExistsError()
            return stored

        d = self._call.eval(
            _CREATE_SCRIPT, [self._key(user.user_id), self._index], [user.user_id, *_encode(stored)]
        )
        return d.addCallback(created)

    def replace(self, user: User) -> Any:
        # The script keeps the stored ``created`` and answers it, or -1 (no
        # such user) or 0 (the version changed since the caller's read).
        stored = user.evolve(updated=self.clock.seconds(), version=user.version + 1)

        def replaced(answer: Any) -> User:
            if isinstance(answer, int):
                if answer == -1:
                    raise UnknownUserError()
                raise UserConflictError()
            return stored.evolve(created=float(answer))

        d = self._call.eval(
            _REPLACE_SCRIPT, [self._key(user.user_id)], [str(user.version), *_encode(stored)]
        )
        return d.addCallback(replaced)

    def delete(self, user_id: str) -> Any:
        d = self._call.eval(_DELETE_SCRIPT, [self._key(user_id), self._index], [user_id])
        return d.addCallback(lambda n: int(n) > 0)

    def user_ids(self) -> Any:
        return self._call("smembers", self._index).addCallback(lambda ids: sorted(ids or ()))


__all__ = ["RedisUserStore"]
