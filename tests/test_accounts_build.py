"""
Building the account parts from plain values (what the composition root
calls): each kind, its defaults, its start-up errors.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.task import Clock

from twistauth.accounts import (
    MemoryLoginThrottle,
    MemoryUserStore,
    RedisLoginThrottle,
    RedisUserStore,
    UserFileError,
    YAMLUserStore,
)
from twistauth.accounts.build import make_login_throttle, make_password_hasher, make_user_store


def test_user_store_kinds(tmp_path: Any) -> None:
    clock = Clock()
    assert isinstance(make_user_store("memory", clock=clock, reactor=reactor), MemoryUserStore)
    store = make_user_store("yaml", clock=clock, reactor=reactor, data_dir=str(tmp_path / "d"))
    assert isinstance(store, YAMLUserStore)
    assert store.file.path == str(tmp_path / "d" / "users.yaml")
    assert os.path.isdir(tmp_path / "d")
    redis = txredisapi.lazyConnection("127.0.0.1", 1, convertNumbers=False)
    try:
        store = make_user_store("redis", clock=clock, reactor=reactor, redis=redis)
        assert isinstance(store, RedisUserStore)
    finally:
        redis.disconnect()
    with pytest.raises(ValueError, match="connection"):
        make_user_store("redis", clock=clock, reactor=reactor)
    with pytest.raises(ValueError, match="unknown user store 'ldap'"):
        make_user_store("ldap", clock=clock, reactor=reactor)


def test_a_corrupt_user_file_stops_the_start(tmp_path: Any) -> None:
    path = tmp_path / "users.yaml"
    path.write_text("users: [\n")
    with pytest.raises(UserFileError, match=str(path)):
        make_user_store("yaml", clock=Clock(), reactor=reactor, path=str(path))


def test_login_throttle_kinds() -> None:
    clock = Clock()
    throttle = make_login_throttle("memory", clock=clock, account_limit=5, window=60)
    assert isinstance(throttle, MemoryLoginThrottle)
    assert (throttle.account_limit, throttle.address_limit, throttle.window) == (5, 300, 60)
    redis = txredisapi.lazyConnection("127.0.0.1", 1, convertNumbers=False)
    try:
        assert isinstance(
            make_login_throttle("redis", clock=clock, redis=redis), RedisLoginThrottle
        )
    finally:
        redis.disconnect()
    with pytest.raises(ValueError):
        make_login_throttle("file", clock=clock)


@pytest_twisted.ensureDeferred
async def test_password_hasher_parameters() -> None:
    hasher = make_password_hasher(
        reactor=reactor, min_length=12, time_cost=1, memory_cost=1024, parallelism=1, threads=1
    )
    assert hasher.policy.min_length == 12
    assert hasher.threads == 1
    hasher.startService()
    try:
        digest = await hasher.hash("twelve chars!")
    finally:
        hasher.stopService()
    assert digest.startswith("$argon2id$v=19$m=1024,t=1,p=1$")
