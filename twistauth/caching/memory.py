"""
The memory cache backend: one process, bounded, expiring on the injected
clock.

Values and generations live in two LRU-ordered dictionaries, each with a
size bound.  An entry past its TTL is dropped when it is next read (no timer
is ever scheduled, so nothing is left on the clock); the LRU bound drops the
least recently used ones when the cache is full.  A generation that is
dropped to make room gets a fresh token on its next read: that can only
make entries unreachable (an extra miss), never bring an old one back.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any, Iterator, Optional, Sequence, Tuple

import attr
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twistauth.caching._interfaces import ICacheBackend


def _positive_int(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@implementer(ICacheBackend)
@attr.s(kw_only=True, eq=False)
class MemoryCacheBackend:
    """
    Method results in this process's memory.

    :ivar clock: the time source of the TTLs.
    :ivar max_entries: most values kept (least recently used dropped first).
    :ivar max_generations: most generations kept.
    """

    name = "memory"
    immediate = True

    clock: IReactorTime = attr.ib()
    max_entries: int = attr.ib(default=10_000, validator=_positive_int)
    max_generations: int = attr.ib(default=100_000, validator=_positive_int)
    _values: OrderedDict[str, Tuple[float, str]] = attr.ib(factory=OrderedDict, init=False)
    _generations: OrderedDict[str, str] = attr.ib(factory=OrderedDict, init=False)
    _tokens: Iterator[int] = attr.ib(factory=lambda: itertools.count(1), init=False)

    def __len__(self) -> int:
        return len(self._values)

    def _generation(self, name: str) -> str:
        generations = self._generations
        token = generations.get(name)
        if token is None:
            token = str(next(self._tokens))
            generations[name] = token
            if len(generations) > self.max_generations:
                generations.popitem(last=False)
        else:
            generations.move_to_end(name)
        return token

    def lookup_now(self, generation_keys: Sequence[str], suffix: str) -> Tuple[str, Optional[str]]:
        """
        `lookup`, answered directly.
        """
        key = "v:" + ":".join([self._generation(g) for g in generation_keys]) + ":" + suffix
        entry = self._values.get(key)
        if entry is None:
            return key, None
        if entry[0] <= self.clock.seconds():
            del self._values[key]
            return key, None
        self._values.move_to_end(key)
        return key, entry[1]

    def lookup(
        self, generation_keys: Sequence[str], suffix: str
    ) -> Deferred[Tuple[str, Optional[str]]]:
        return succeed(self.lookup_now(generation_keys, suffix))

    def store(self, key: str, value: str, ttl: float) -> Deferred[None]:
        values = self._values
        values[key] = (self.clock.seconds() + ttl, value)
        values.move_to_end(key)
        while len(values) > self.max_entries:
            values.popitem(last=False)
        return succeed(None)

    def bump(self, generation_keys: Sequence[str]) -> Deferred[None]:
        for name in generation_keys:
            self._generations[name] = str(next(self._tokens))
            self._generations.move_to_end(name)
        while len(self._generations) > self.max_generations:
            self._generations.popitem(last=False)
        return succeed(None)
