"""
The failed-login throttle: at most ``account_limit`` failed attempts per
account and ``address_limit`` per client address in a sliding ``window``
(defaults: 100 and 300 per hour; ASVS 4.0 2.2.1 asks for no more than 100
per hour per account).  Over a limit, an attempt is refused with
`LoginThrottledError` (429) whose ``Retry-After`` says when the oldest
counted failure leaves the window.

Two implementations of `ILoginThrottle`: `MemoryLoginThrottle` (one
process; time from the injected clock) and `RedisLoginThrottle` (every
process shares the counts; a sorted set per key, changed by Lua scripts so
that checking and counting are one atomic step).  Both count an attempt
when it begins, so a burst of concurrent guesses cannot overshoot the limit.

Addresses are counted per IPv4 address and per IPv6 /64 network (one host
usually owns a whole /64).  Unknown user ids are counted like known ones:
the throttle tells nothing about which accounts exist.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import secrets
from typing import Any, Deque, Dict, List, Optional, Tuple

import attr
from twisted.internet.defer import fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twistauth import redisconn
from twistauth.accounts._interfaces import ILoginThrottle
from twistauth.accounts._redis import RedisCaller
from twistauth.accounts.errors import LoginThrottledError

DEFAULT_ACCOUNT_LIMIT = 100
DEFAULT_ADDRESS_LIMIT = 300
DEFAULT_WINDOW = 3600.0


def address_key(address: str) -> str:
    """
    What a client address is counted as: the IPv4 address, the IPv6 /64
    network (an IPv4-mapped IPv6 address counts as its IPv4 address), or
    the text itself if it is not an IP address (``"-"`` for none).
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:100] or "-"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Attempt:
    """
    One counted attempt (what `ILoginThrottle.attempt` gives).

    :ivar account: the account's counting key, or ``None``.
    :ivar address: the address's counting key.
    :ivar member: this attempt's unique id in the counts.
    :ivar time: when it began (clock seconds).
    """

    account: Optional[str]
    address: str
    member: str
    time: float


def _check_limits(account_limit: int, address_limit: int, window: float) -> None:
    if account_limit < 1 or address_limit < 1 or not 0 < window < math.inf:
        raise ValueError("throttle limits must be >= 1 and the window a positive number")


@implementer(ILoginThrottle)
@attr.s(kw_only=True)
class MemoryLoginThrottle:
    """
    An `ILoginThrottle` in this process's memory.

    At most ``max_keys`` accounts and addresses are tracked: beyond that
    expired counts are dropped, then the oldest-tracked keys.

    :ivar clock: the time.
    """

    clock: IReactorTime = attr.ib()
    account_limit: int = attr.ib(default=DEFAULT_ACCOUNT_LIMIT)
    address_limit: int = attr.ib(default=DEFAULT_ADDRESS_LIMIT)
    window: float = attr.ib(default=DEFAULT_WINDOW)
    max_keys: int = attr.ib(default=100_000)
    _logs: Dict[Tuple[str, str], Deque[Tuple[float, str]]] = attr.ib(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        _check_limits(self.account_limit, self.address_limit, self.window)

    def attempt(self, account: Optional[str], address: str) -> Any:
        now = self.clock.seconds()
        keys: List[Tuple[Tuple[str, str], int]] = [
            (("address", address_key(address)), self.address_limit)
        ]
        if account is not None:
            keys.append((("account", account), self.account_limit))
        wait = 0.0
        for key, limit in keys:
            entries = self._prune(key, now)
            if entries is not None and len(entries) >= limit:
                wait = max(wait, entries[0][0] + self.window - now)
        if wait > 0:
            return fail(LoginThrottledError(retry_after=wait))
        member = secrets.token_hex(8)
        for key, _ in keys:
            if key not in self._logs:
                self._make_room(now)
                self._logs[key] = collections.deque()
            self._logs[key].append((now, member))
        return succeed(Attempt(account, address_key(address), member, now))

    def succeeded(self, attempt: Attempt) -> Any:
        if attempt.account is not None:
            self._logs.pop(("account", attempt.account), None)
        entries = self._logs.get(("address", attempt.address))
        if entries is not None:
            for entry in entries:
                if entry[1] == attempt.member:
                    entries.remove(entry)
                    break
            if not entries:
                del self._logs[("address", attempt.address)]
        return succeed(None)

    def _prune(self, key: Tuple[str, str], now: float) -> Optional[Deque[Tuple[float, str]]]:
        entries = self._logs.get(key)
        if entries is None:
            return None
        horizon = now - self.window
        while entries and entries[0][0] <= horizon:
            entries.popleft()
        if not entries:
            del self._logs[key]
            return None
        return entries

    def _make_room(self, now: float) -> None:
        if len(self._logs) < self.max_keys:
            return
        for key in list(self._logs):
            self._prune(key, now)
        while len(self._logs) >= self.max_keys:
            del self._logs[next(iter(self._logs))]

    def tracked(self) -> int:
        """How many accounts and addresses have counted attempts (for tests and metrics)."""
        return len(self._logs)


_ATTEMPT = """
local now = tonumber(ARGV[1])
local wait = 0
for i = 1, #KEYS do
  local window = tonumber(ARGV[1 + 2 * i])
  local limit = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  if redis.call('ZCARD', KEYS[i]) >= limit then
    local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    local w = tonumber(oldest[2]) + window - now
    if w > wait then wait = w end
  end
end
if wait > 0 then return tostring(wait) end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[i], math.ceil(tonumber(ARGV[1 + 2 * i]) * 1000))
end
return ''
"""

_SUCCEEDED = """
if #KEYS > 1 then redis.call('DEL', KEYS[2]) end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""

# (module-level: each script's EVALSHA prefix is encoded once per number of
# keys, one for an address alone, two with an account: see
# `twistauth.redisconn.Script.for_keys`).
_ATTEMPT_SCRIPT = redisconn.Script(_ATTEMPT)
_SUCCEEDED_SCRIPT = redisconn.Script(_SUCCEEDED)


@implementer(ILoginThrottle)
@attr.s(kw_only=True)
class RedisLoginThrottle:
    """
    An `ILoginThrottle` shared through Redis.  Keys:
    ``<prefix>throttle:account:<user_id>`` and
    ``<prefix>throttle:address:<address>``, sorted sets of attempts scored
    by their time, expiring with the window.  Times come from the injected
    clock (keep the processes' clocks in step).

    :ivar redis: a txredisapi connection made with ``convertNumbers=False``.
    :ivar clock: the time, and the deadline of every call.
    :ivar timeout: seconds a Redis call may take before it answers 503.
    """

    redis: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    account_limit: int = attr.ib(default=DEFAULT_ACCOUNT_LIMIT)
    address_limit: int = attr.ib(default=DEFAULT_ADDRESS_LIMIT)
    window: float = attr.ib(default=DEFAULT_WINDOW)
    timeout: float = attr.ib(default=2.0)
    prefix: str = attr.ib(default="twistauth:")
    _call: RedisCaller = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        _check_limits(self.account_limit, self.address_limit, self.window)
        self._call = RedisCaller(
            redis=self.redis, clock=self.clock, timeout=self.timeout, what="login throttle"
        )

    def _address(self, key: str) -> str:
        return f"{self.prefix}throttle:address:{key}"

    def _account(self, account: str) -> str:
        return f"{self.prefix}throttle:account:{account}"

    def attempt(self, account: Optional[str], address: str) -> Any:
        now = self.clock.seconds()
        member = secrets.token_hex(8)
        where = address_key(address)
        keys = [self._address(where)]
        args: List[Any] = [repr(now), member, repr(self.window), self.address_limit]
        if account is not None:
            keys.append(self._account(account))
            args += [repr(self.window), self.account_limit]

        def answered(wait: Any) -> Attempt:
            if wait:
                raise LoginThrottledError(retry_after=float(wait))
            return Attempt(account, where, member, now)

        return self._call.eval(_ATTEMPT_SCRIPT.for_keys(len(keys)), keys, args).addCallback(answered)

    def succeeded(self, attempt: Attempt) -> Any:
        keys = [self._address(attempt.address)]
        if attempt.account is not None:
            keys.append(self._account(attempt.account))
        return self._call.eval(
            _SUCCEEDED_SCRIPT.for_keys(len(keys)), keys, [attempt.member]
        ).addCallback(lambda _: None)


__all__ = [
    "Attempt",
    "DEFAULT_ACCOUNT_LIMIT",
    "DEFAULT_ADDRESS_LIMIT",
    "DEFAULT_WINDOW",
    "MemoryLoginThrottle",
    "RedisLoginThrottle",
    "address_key",
]
