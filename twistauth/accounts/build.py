"""
Building the account parts from plain values, for the composition root:
one call per part, each logging one line that says what it chose.

The settings keys that feed these (proposed; declared in
`twistauth.settings`) are named in each function's documentation.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import argon2
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twistauth.accounts._interfaces import ILoginThrottle, IUserStore
from twistauth.accounts.memory import MemoryUserStore
from twistauth.accounts.passwords import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MIN_LENGTH,
    PasswordHasher,
    PasswordPolicy,
)
from twistauth.accounts.throttle import (
    DEFAULT_ACCOUNT_LIMIT,
    DEFAULT_ADDRESS_LIMIT,
    DEFAULT_WINDOW,
    MemoryLoginThrottle,
)
from twistauth.accounts.yamlfile import YAMLUserStore

log = Logger()

USER_FILE_NAME = "users.yaml"


def make_user_store(
    kind: str,
    *,
    clock: IReactorTime,
    reactor: Any,
    data_dir: str = "twistauth-data",
    path: Optional[str] = None,
    redis: Any = None,
    redis_timeout: float = 2.0,
    prefix: str = "twistauth:",
) -> IUserStore:
    """
    The user store (settings ``user_store``, ``data_dir``, ``user_file``).

    :param kind: ``"yaml"`` (the default: a file in ``data_dir``),
        ``"memory"``, or ``"redis"`` (then ``redis`` is the connection, made
        from the ``user_store`` URL with `twistauth.redisconn.connect`).
    :param path: the YAML file; default ``<data_dir>/users.yaml``.
    :raises UserFileError: the YAML file cannot be used (its start-up
        check runs here; the message names the file).
    :raises ValueError: an unknown kind, or ``"redis"`` without a connection.
    """
    if kind == "memory":
        log.info("twistauth: user store: memory (one process; lost at exit)")
        return MemoryUserStore(clock=clock)
    if kind == "yaml":
        store = YAMLUserStore(
            path=path or os.path.join(data_dir, USER_FILE_NAME), clock=clock, reactor=reactor
        )
        store.check()
        return store
    if kind == "redis":
        if redis is None:
            raise ValueError("a Redis user store needs a connection")
        from twistauth.accounts.redisstore import RedisUserStore

        log.info("twistauth: user store: Redis (keys {prefix}user:*)", prefix=prefix)
        return RedisUserStore(redis=redis, clock=clock, timeout=redis_timeout, prefix=prefix)
    raise ValueError(f"unknown user store {kind!r}: use 'yaml', 'memory' or a Redis URL")


def make_password_hasher(
    *,
    reactor: Any,
    min_length: int = DEFAULT_MIN_LENGTH,
    max_bytes: int = DEFAULT_MAX_BYTES,
    time_cost: int = argon2.DEFAULT_TIME_COST,
    memory_cost: int = argon2.DEFAULT_MEMORY_COST,
    parallelism: int = argon2.DEFAULT_PARALLELISM,
    threads: int = 2,
    max_pending: int = 64,
) -> PasswordHasher:
    """
    The password hasher (settings ``password_min_length``,
    ``password_max_bytes``, ``argon2_time_cost``, ``argon2_memory_cost``
    (KiB), ``argon2_parallelism``, ``password_hash_threads``,
    ``password_hash_queue``).  It is a service: add it to the service tree.
    Changing a cost parameter rehashes each user's password at their next
    login.
    """
    return PasswordHasher(
        reactor=reactor,
        argon2_hasher=argon2.PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism
        ),
        policy=PasswordPolicy(min_length=min_length, max_bytes=max_bytes),
        threads=threads,
        max_pending=max_pending,
    )


def make_login_throttle(
    kind: str,
    *,
    clock: IReactorTime,
    account_limit: int = DEFAULT_ACCOUNT_LIMIT,
    address_limit: int = DEFAULT_ADDRESS_LIMIT,
    window: float = DEFAULT_WINDOW,
    redis: Any = None,
    redis_timeout: float = 2.0,
    prefix: str = "twistauth:",
) -> ILoginThrottle:
    """
    The failed-login throttle (settings ``login_max_failures_per_account``,
    ``login_max_failures_per_address``, ``login_failure_window``; its
    backend follows the deployment: ``"redis"`` when processes share Redis,
    else ``"memory"``).
    """
    if kind == "memory":
        throttle: ILoginThrottle = MemoryLoginThrottle(
            clock=clock, account_limit=account_limit, address_limit=address_limit, window=window
        )
    elif kind == "redis":
        if redis is None:
            raise ValueError("a Redis login throttle needs a connection")
        from twistauth.accounts.throttle import RedisLoginThrottle

        throttle = RedisLoginThrottle(
            redis=redis,
            clock=clock,
            account_limit=account_limit,
            address_limit=address_limit,
            window=window,
            timeout=redis_timeout,
            prefix=prefix,
        )
    else:
        raise ValueError(f"unknown login throttle {kind!r}: use 'memory' or 'redis'")
    log.info(
        "twistauth: login throttle: {kind}, at most {account} failures per account and "
        "{address} per address in {window:g} s",
        kind=kind,
        account=account_limit,
        address=address_limit,
        window=window,
    )
    return throttle


__all__ = ["USER_FILE_NAME", "make_login_throttle", "make_password_hasher", "make_user_store"]
