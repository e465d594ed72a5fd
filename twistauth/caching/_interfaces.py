"""
The contract of a method-cache backend.

A backend keeps encoded method results under keys that embed *generations*:
one per namespace, and one per (namespace, user) for per-user entries.
Invalidating a namespace replaces its generation with a fresh, never-reused
token, so every key built with the old one becomes unreachable at once and
expires on its own: no key is ever scanned or listed (carafe used Redis
``KEYS``, which blocks a server).

Every operation answers through a Deferred whatever the backend (memory
answers with ``succeed``), so `twistauth.caching.MethodCache` never branches
on the backend.  A backend that cannot be reached fails the Deferred (with
`twistauth.errors.BackendUnavailableError` or any other error): the method
cache then runs methods uncached for a while, never answering an error
because of the cache.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class ICacheBackend(Interface):
    """
    Keeps method results under generation-stamped keys.
    """

    name: str = Attribute('The kind of backend: ``"memory"`` or ``"redis"``.')

    immediate: bool = Attribute(
        "Whether every Deferred this backend answers has already fired when it "
        "is returned (memory): lets a cache hit answer without a reactor turn."
    )

    def lookup(generation_keys: Any, suffix: str) -> Any:
        """
        Read the current generations of ``generation_keys`` (creating a fresh
        token for any that has none, or has been forgotten), build the value
        key ``v:<generation>:...:<suffix>`` from them, and read it.

        :param generation_keys: the generation names, in key order (e.g.
            ``["g:profile", "g:profile:u:<user hash>"]``).
        :param suffix: the rest of the key: method, user hash, parameter hash.
        :return: Deferred firing with ``(key, value)``: the full key (to give
            to `store`) and the stored text, or ``None`` on a miss.
        """

    def store(key: str, value: str, ttl: float) -> Any:
        """
        Keep ``value`` under ``key`` (from `lookup`) for ``ttl`` seconds.

        :return: Deferred firing with ``None``.
        """

    def bump(generation_keys: Any) -> Any:
        """
        Give each generation a fresh token no earlier key used: everything
        cached under the old ones is unreachable from now on.

        :return: Deferred firing with ``None``.
        """
