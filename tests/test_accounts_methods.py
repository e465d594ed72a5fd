"""
The account methods through the whole HTTP stack (``StubTreq``, no
sockets; sessions in header mode): create, login, logout, log out
everywhere, change password, session.info, the dict-like account; the
checklist cases 92 (rehash on login), 93 (unknown user and wrong password
alike, timing measured), 94 (429 with Retry-After over HTTP) and 95; and no
password or session id in the logs.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Dict, List, Optional

import argon2
import attr
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from twistauth.accounts import (
    MemoryLoginThrottle,
    MemoryUserStore,
    PasswordHasher,
    User,
    current_account,
)
from twistauth.accounts.account import Account, AccountNotLoadedError
from twistauth.app import make_app
from twistauth.methods.registry import MethodRegistry, method
from twistauth.testing._client import MethodClient, Response

SESSION = "X-Twistauth-Session"


def cheap() -> argon2.PasswordHasher:
    return argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@method("test.profile")
async def profile_method(handler: Any, set: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Read (and optionally change) the caller's profile through `Account`."""
    account = current_account(handler)
    before = await account.get("name")
    for key, value in (set or {}).items():
        if value is None:
            del account[key]
        else:
            account[key] = value
    await account.save()
    return {"before": before, "now": dict(account), "roles": sorted(account.roles)}


class Harness:
    """
    A twistauth app with the account methods, a memory store and throttle
    on a `Clock`, and a real password hasher (threads need the reactor).
    """

    def __init__(self, argon2_hasher: Any = None, **throttle: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        registry = MethodRegistry()
        registry.add("test.profile", profile_method)
        self.app = make_app(
            clock=self.clock,
            reactor=reactor,
            registry=registry,
            method_modules=[],
            user_store="memory",
            acl_initial=["account.*", "session.*", "test.*"],
        )
        self.users = MemoryUserStore(clock=self.clock)
        self.passwords = PasswordHasher(
            reactor=reactor, argon2_hasher=argon2_hasher if argon2_hasher else cheap()
        )
        self.passwords.startService()
        self.throttle = MemoryLoginThrottle(clock=self.clock, **throttle)
        dispatcher = self.app.dispatcher
        dispatcher.services = attr.evolve(
            dispatcher.services, users=self.users, passwords=self.passwords, throttle=self.throttle
        )
        self.stub = MethodClient(self.app)

    def client(self) -> Client:
        return Client(self)

    def stop(self) -> None:
        self.passwords.stopService()


class Client:
    """A non-browser client: holds its session token from the header."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.token = ""

    async def raw(self, name: str, **parameters: Any) -> Response:
        response: Response = await self.harness.stub.post(
            {"method": name, "parameters": parameters}, headers={SESSION: self.token}
        )
        new = response.header(SESSION)
        if new is not None:
            self.token = new
        return response

    async def call(self, name: str, **parameters: Any) -> Any:
        response = await self.raw(name, **parameters)
        body = response.decoded()
        assert response.status == 200, body
        return body["result"]

    async def error(self, name: str, status: int, code_name: str, **parameters: Any) -> Response:
        response = await self.raw(name, **parameters)
        body = response.decoded()
        assert response.status == status, body
        assert body["error"]["name"] == code_name, body
        return response


@pytest.fixture
def harness() -> Any:
    h = Harness()
    yield h
    h.stop()


ANONYMOUS = {"user_id": None, "roles": [], "authenticated_at": None, "permanent": False}


# -- the happy paths -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_logs_in_and_session_info_never_shows_the_id(harness: Harness) -> None:
    client = harness.client()
    assert await client.call("session.info") == ANONYMOUS
    info = await client.call("account.create", user_id="alice", password="correct horse")
    assert info == {
        "user_id": "alice",
        "roles": [],
        "authenticated_at": harness.clock.seconds(),
        "permanent": False,
    }
    assert client.token
    response = await client.raw("session.info")
    assert json.loads(response.body)["result"]["user_id"] == "alice"
    assert client.token not in response.body.decode()
    stored = await harness.users.get("alice")
    assert stored.password_hash.startswith("$argon2id$")
    assert "correct horse" not in stored.password_hash


@pytest_twisted.ensureDeferred
async def test_login_renews_the_session_id(harness: Harness) -> None:
    await harness.users.create(
        User(
            user_id="bob",
            password_hash=await harness.passwords.hash("bob's password"),
            roles={"staff"},
        )
    )
    client = harness.client()
    await client.error("test.profile", 401, "auth_required")
    info = await client.call(
        "account.login", user_id="bob", password="bob's password", remember=True
    )
    assert info["user_id"] == "bob"
    assert info["roles"] == ["staff"]
    assert info["permanent"] is True
    first = client.token
    # Logging in again gives a new id; the old one stops working.
    await client.call("account.login", user_id="bob", password="bob's password")
    assert client.token and client.token != first
    stale = harness.client()
    stale.token = first
    assert await stale.call("session.info") == ANONYMOUS


@pytest_twisted.ensureDeferred
async def test_logout(harness: Harness) -> None:
    client = harness.client()
    await client.call("account.create", user_id="carol", password="carol's password")
    token = client.token
    assert await client.call("account.logout") is None
    assert client.token == ""
    old = harness.client()
    old.token = token
    assert await old.call("session.info") == ANONYMOUS
    assert await client.call("account.logout") is None  # idempotent


@pytest_twisted.ensureDeferred
async def test_logout_everywhere(harness: Harness) -> None:
    laptop, phone, other = harness.client(), harness.client(), harness.client()
    await laptop.call("account.create", user_id="dave", password="dave's password")
    await phone.call("account.login", user_id="dave", password="dave's password")
    await other.call("account.create", user_id="erin", password="erin's password")
    result = await phone.call("account.logout_everywhere")
    assert result == {"ended": 2}
    assert await laptop.call("session.info") == ANONYMOUS
    assert await phone.call("session.info") == ANONYMOUS
    assert (await other.call("session.info"))["user_id"] == "erin"
    await phone.error("account.logout_everywhere", 401, "auth_required")


@pytest_twisted.ensureDeferred
async def test_change_password_ends_other_sessions_and_renews_this_one(harness: Harness) -> None:
    here, elsewhere = harness.client(), harness.client()
    await here.call("account.create", user_id="frank", password="old password")
    await elsewhere.call("account.login", user_id="frank", password="old password", remember=True)
    await here.call("account.login", user_id="frank", password="old password", remember=True)
    before = here.token
    info = await here.call(
        "account.change_password", old_password="old password", new_password="new password!"
    )
    assert info["user_id"] == "frank"
    assert info["permanent"] is True
    assert here.token and here.token != before
    assert (await here.call("session.info"))["user_id"] == "frank"
    assert await elsewhere.call("session.info") == ANONYMOUS
    fresh = harness.client()
    await fresh.error(
        "account.login", 401, "invalid_credentials", user_id="frank", password="old password"
    )
    await fresh.call("account.login", user_id="frank", password="new password!")


@pytest_twisted.ensureDeferred
async def test_change_password_errors(harness: Harness) -> None:
    client = harness.client()
    await client.error(
        "account.change_password", 401, "auth_required", old_password="x" * 8, new_password="y" * 8
    )
    await client.call("account.create", user_id="gina", password="gina's password")
    await client.error(
        "account.change_password",
        400,
        "password_policy",
        old_password="gina's password",
        new_password="short",
    )
    await client.error(
        "account.change_password",
        401,
        "invalid_credentials",
        old_password="wrong password",
        new_password="long enough",
    )
    # A wrong old password does not end the session.
    assert (await client.call("session.info"))["user_id"] == "gina"


@pytest_twisted.ensureDeferred
async def test_account_object_loads_on_demand_and_saves_changes(harness: Harness) -> None:
    client = harness.client()
    await client.call("account.create", user_id="hana", password="hana's password")
    result = await client.call("test.profile", set={"name": "Hana", "zip": "007"})
    assert result == {"before": None, "now": {"name": "Hana", "zip": "007"}, "roles": []}
    result = await client.call("test.profile", set={"zip": None})
    assert result["before"] == "Hana"
    assert result["now"] == {"name": "Hana"}
    assert (await harness.users.get("hana")).profile == {"name": "Hana"}


@pytest_twisted.ensureDeferred
async def test_account_save_writes_only_changed_keys(harness: Harness) -> None:
    store = harness.users
    await store.create(User(user_id="ivan", profile={"a": 1, "b": 2}))
    mine, theirs = Account(store, "ivan"), Account(store, "ivan")
    assert not mine.loaded
    with pytest.raises(AccountNotLoadedError):
        mine["a"]
    assert await mine.get("a") == 1
    await theirs.load()
    mine["a"] = 10
    theirs["b"] = 20
    del theirs["a"]  # theirs deletes a, mine sets it: the later save wins for "a"
    await mine.save()
    await theirs.save()
    assert (await store.get("ivan")).profile == {"b": 20}
    assert dict(theirs) == {"b": 20}
    assert not theirs.dirty
    # Keys set before loading are kept over the stored values.
    fresh = Account(store, "ivan")
    fresh["c"] = 3
    await fresh.load()
    assert dict(fresh) == {"b": 20, "c": 3}
    assert fresh.dirty


# -- errors, policy, throttle ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_errors(harness: Harness) -> None:
    client = harness.client()
    await client.error(
        "account.create", 400, "invalid_user_id", user_id=" bad", password="long enough"
    )
    await client.error("account.create", 400, "password_policy", user_id="jack", password="short")
    await client.error(
        "account.create", 400, "password_policy", user_id="jack", password="x" * 1025
    )
    await client.error("account.create", 400, "invalid_parameters", user_id="jack")
    await client.error(
        "account.create", 400, "invalid_parameters", user_id="jack", password=12345678
    )
    await client.call("account.create", user_id="jack", password="x" * 1024)  # case 95: 1 KiB ok
    other = harness.client()
    await other.error("account.create", 409, "user_exists", user_id="jack", password="another one")
    assert await other.call("session.info") == ANONYMOUS


@pytest_twisted.ensureDeferred
async def test_long_passwords_work_end_to_end(harness: Harness) -> None:
    """Case 95: a 100-character passphrase; no truncation at 72 bytes."""
    passphrase = "correct horse battery staple " * 3 + "and one more word at the end"
    client = harness.client()
    await client.call("account.create", user_id="kate", password=passphrase)
    fresh = harness.client()
    await fresh.error(
        "account.login", 401, "invalid_credentials", user_id="kate", password=passphrase[:72]
    )
    await fresh.call("account.login", user_id="kate", password=passphrase)
    await fresh.error("account.login", 400, "password_policy", user_id="kate", password="x" * 1025)


@pytest_twisted.ensureDeferred
async def test_unknown_user_and_wrong_password_answer_alike(harness: Harness) -> None:
    """Case 93: same status, same body, for unknown, password-less and wrong."""
    await harness.users.create(
        User(user_id="liam", password_hash=await harness.passwords.hash("liam's password"))
    )
    await harness.users.create(User(user_id="oidc-only"))
    client = harness.client()
    answers = set()
    for user_id, password in (
        ("liam", "wrong password"),
        ("nobody", "wrong password"),
        ("oidc-only", "wrong password"),
        ("oidc-only", ""),
    ):
        response = await client.error(
            "account.login", 401, "invalid_credentials", user_id=user_id, password=password
        )
        answers.add((response.status, response.body))
    assert len(answers) == 1


@pytest_twisted.ensureDeferred
async def test_disabled_account(harness: Harness) -> None:
    await harness.users.create(
        User(
            user_id="mia",
            password_hash=await harness.passwords.hash("mia's password"),
            disabled=True,
        )
    )
    client = harness.client()
    await client.error(
        "account.login", 401, "invalid_credentials", user_id="mia", password="wrong one"
    )
    await client.error(
        "account.login", 403, "account_disabled", user_id="mia", password="mia's password"
    )
    assert await client.call("session.info") == ANONYMOUS


@pytest_twisted.ensureDeferred
async def test_failed_logins_are_throttled_with_retry_after() -> None:
    """Case 94 over HTTP: 429 with a Retry-After header; unknown ids too."""
    harness = Harness(account_limit=3, window=600)
    try:
        await harness.users.create(
            User(user_id="noah", password_hash=await harness.passwords.hash("noah's password"))
        )
        client = harness.client()
        for user_id in ("noah", "ghost"):
            for _ in range(3):
                await client.error(
                    "account.login",
                    401,
                    "invalid_credentials",
                    user_id=user_id,
                    password="wrong password",
                )
            response = await client.error(
                "account.login", 429, "login_throttled", user_id=user_id, password="wrong password"
            )
            assert response.header("Retry-After") == "600"
        # Even the right password waits: the attacker cannot test guesses.
        response = await client.error(
            "account.login", 429, "login_throttled", user_id="noah", password="noah's password"
        )
        harness.clock.advance(600)
        await client.call("account.login", user_id="noah", password="noah's password")
    finally:
        harness.stop()


@pytest_twisted.ensureDeferred
async def test_refused_creations_are_throttled_per_address() -> None:
    harness = Harness(address_limit=2)
    try:
        client = harness.client()
        await client.call("account.create", user_id="olga", password="olga's password")
        for _ in range(2):
            await client.error(
                "account.create", 409, "user_exists", user_id="olga", password="probe probe"
            )
        await client.error(
            "account.create", 429, "login_throttled", user_id="new-user", password="probe probe"
        )
    finally:
        harness.stop()


@pytest_twisted.ensureDeferred
async def test_rehash_on_login_when_parameters_change() -> None:
    """Case 92: a hash made with old parameters is replaced at login."""
    harness = Harness(argon2_hasher=argon2.PasswordHasher())  # the defaults
    try:
        old_hash = cheap().hash("pia's password")
        await harness.users.create(User(user_id="pia", password_hash=old_hash))
        client = harness.client()
        await client.call("account.login", user_id="pia", password="pia's password")
        new_hash = (await harness.users.get("pia")).password_hash
        assert new_hash != old_hash
        assert new_hash.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
        assert not harness.passwords.needs_rehash(new_hash)
        # A wrong password never rehashes.
        await client.call("account.logout")
        await client.error(
            "account.login", 401, "invalid_credentials", user_id="pia", password="wrong pass"
        )
        assert (await harness.users.get("pia")).password_hash == new_hash
        await client.call("account.login", user_id="pia", password="pia's password")
        assert (await harness.users.get("pia")).password_hash == new_hash  # current: kept
    finally:
        harness.stop()


@pytest_twisted.ensureDeferred
async def test_unknown_user_takes_as_long_as_a_wrong_password() -> None:
    """
    Case 93, measured: with argon2-cffi's default parameters, the median
    times of a login for an unknown user and for a wrong password are
    within a factor of 1.5 of each other (generous: the machine may be
    busy; both are one full argon2 verification, ~0.1 s, while an answer
    that skipped the hash for unknown users would be over 100 times
    faster).
    """
    harness = Harness(argon2_hasher=argon2.PasswordHasher(), account_limit=1000)
    try:
        password_hash = await harness.passwords.hash("quinn's password")
        await harness.users.create(User(user_id="quinn", password_hash=password_hash))
        client = harness.client()
        await client.error(
            "account.login", 401, "invalid_credentials", user_id="nobody", password="warm up"
        )
        timings: Dict[str, List[float]] = {"known": [], "unknown": []}
        for _ in range(4):
            for kind, user_id in (("known", "quinn"), ("unknown", "nobody")):
                started = time.perf_counter()
                await client.error(
                    "account.login",
                    401,
                    "invalid_credentials",
                    user_id=user_id,
                    password="wrong password",
                )
                timings[kind].append(time.perf_counter() - started)
    finally:
        harness.stop()
    known, unknown = statistics.median(timings["known"]), statistics.median(timings["unknown"])
    print(f"login, wrong password: {known * 1000:.1f} ms; unknown user: {unknown * 1000:.1f} ms")
    assert known > 0.02  # a real argon2 verification happened
    assert 1 / 1.5 < unknown / known < 1.5


# -- never log secrets ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_password_or_session_id_in_the_logs(harness: Harness) -> None:
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    secrets_seen: List[str] = []
    try:
        client = harness.client()
        await client.call("account.create", user_id="rosa", password="first-secret-pw")
        secrets_seen.append(client.token)
        await client.call("account.logout")
        await client.error(
            "account.login", 401, "invalid_credentials", user_id="rosa", password="wrong-secret-pw"
        )
        await client.error(
            "account.login",
            401,
            "invalid_credentials",
            user_id="nobody",
            password="other-secret-pw",
        )
        await client.call("account.login", user_id="rosa", password="first-secret-pw")
        secrets_seen.append(client.token)
        await client.call(
            "account.change_password",
            old_password="first-secret-pw",
            new_password="second-secret-pw",
        )
        secrets_seen.append(client.token)
        await client.call("test.profile", set={"name": "Rosa"})
        await client.call("account.logout_everywhere")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("rosa" in repr(e) for e in events)  # the run was logged
    text = "\n".join(repr(e) for e in events)
    stored_hash = (await harness.users.get("rosa")).password_hash
    for secret in [
        "first-secret-pw",
        "wrong-secret-pw",
        "other-secret-pw",
        "second-secret-pw",
        stored_hash,
    ]:
        assert secret not in text
    for token in secrets_seen:
        assert token and token not in text


@pytest_twisted.ensureDeferred
async def test_methods_without_accounts_configured_answer_503() -> None:
    app = make_app(
        clock=Clock(), local_accounts=False, method_modules=["twistauth.accounts.methods"]
    )
    client = MethodClient(app)
    response = await client.post(
        {"method": "account.login", "parameters": {"user_id": "a", "password": "b"}},
        headers={SESSION: ""},
    )
    assert response.status == 503
    assert "not enabled" in response.decoded()["error"]["value"]


@pytest_twisted.ensureDeferred
async def test_signup_can_be_switched_off() -> None:
    app = make_app(
        clock=Clock(), reactor=reactor, user_store="memory", account_signup=False
    )
    client = MethodClient(app)
    response = await client.post(
        {"method": "account.create", "parameters": {"user_id": "a", "password": "b" * 12}},
        headers={SESSION: ""},
    )
    assert response.status == 403
    assert "switched off" in response.decoded()["error"]["value"]
