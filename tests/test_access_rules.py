"""
Unit tests of `twistauth.access` without HTTP: what patterns, role names,
grants and claim mappings parse (bad ones are refused with a message that
says what would parse), rule matching, requirements and their start-up
checks, roles from OpenID Connect claims, and the real account methods
(``account.login`` lifts, ``account.logout`` resets) on the real reactor.
"""

from __future__ import annotations

from typing import Any, Dict

import argon2
import attr
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from twistauth.access import (
    AccessControl,
    ClaimRoles,
    CompiledACL,
    Require,
    Requirement,
    StaticRoles,
    check_acl_pattern,
    check_acl_patterns,
    check_claim_mapping,
    check_role_grant,
    check_role_name,
    parse_claim_map,
    parse_role_grants,
    require,
    requirement_of,
    roles_from_claims,
)
from twistauth.accounts import PasswordHasher, User
from twistauth.app import make_app
from twistauth.errors import AuthRequiredError, ForbiddenError
from twistauth.methods.handler import Handler
from twistauth.methods.registry import MethodRegistry, method
from twistauth.testing._client import MethodClient

# -- parsing -----------------------------------------------------------------

GOOD_PATTERNS = ["*", "echo", "account.login", "public.*", "a.b_c.D9.*", "x1"]
BAD_PATTERNS = [
    "",
    " echo",
    "echo ",
    "a..b",
    "a.",
    ".a",
    "**",
    "a.**",
    "a.*.b",
    "a*",
    "*.a",
    "_private",
    "a._b",
    "a.__init__",
    "9lives",
    "a-b",
    "a/b",
    "é",
    None,
    3,
]


@pytest.mark.parametrize("pattern", GOOD_PATTERNS)
def test_good_patterns(pattern: str) -> None:
    assert check_acl_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_bad_patterns(pattern: Any) -> None:
    with pytest.raises(ValueError) as raised:
        check_acl_pattern(pattern)
    message = str(raised.value)
    assert repr(pattern) in message
    assert "'public.*'" in message  # says what would parse


def test_pattern_lists() -> None:
    assert check_acl_patterns(["b", "a", "b"]) == ("a", "b")
    with pytest.raises(ValueError, match="list of ACL patterns"):
        check_acl_patterns("public.*")
    with pytest.raises(ValueError, match="invalid ACL pattern 'a..b'"):
        AccessControl(initial=["echo", "a..b"])
    with pytest.raises(ValueError, match="invalid ACL pattern"):
        AccessControl(lifted=["*", "x.*.y"])


@pytest.mark.parametrize("role", ["admin", "Admin", "0day", "team:ops", "a.b-c_d@x", "r" * 128])
def test_good_roles(role: str) -> None:
    assert check_role_name(role) == role


@pytest.mark.parametrize("role", ["", " admin", "admin ", "-x", "a b", "a/b", "r" * 129, None, 1])
def test_bad_roles(role: Any) -> None:
    with pytest.raises(ValueError, match="role name"):
        check_role_name(role)


def test_role_grants() -> None:
    assert parse_role_grants(["admin=admin.*", "admin=reports.*", " ops = ops.x "]) == {
        "admin": ("admin.*", "reports.*"),
        "ops": ("ops.x",),
    }
    assert parse_role_grants({"admin": ["admin.*"]}) == {"admin": ("admin.*",)}
    for bad in ["admin", "=admin.*", "admin=", "bad role=x", "admin=a..b"]:
        with pytest.raises(ValueError):
            check_role_grant(bad)
    with pytest.raises(ValueError, match="role=pattern"):
        parse_role_grants("admin=admin.*")
    with pytest.raises(ValueError, match="role name"):
        AccessControl(role_grants=["not a role=x"])


def test_claim_maps() -> None:
    assert parse_claim_map(["/admins=admin", "a=b=staff", "x=admin", "x=ops"]) == {
        "/admins": frozenset({"admin"}),
        "a=b": frozenset({"staff"}),
        "x": frozenset({"admin", "ops"}),
    }
    assert parse_claim_map({"g": "admin", "h": ["a", "b"]}) == {
        "g": frozenset({"admin"}),
        "h": frozenset({"a", "b"}),
    }
    for bad in ["admins", "=admin", "admins=", "admins=not a role"]:
        with pytest.raises(ValueError):
            check_claim_mapping(bad)
    with pytest.raises(ValueError):
        ClaimRoles(claim="")
    with pytest.raises(ValueError):
        ClaimRoles(claim="groups", mapping=["broken"])


# -- roles from claims ----------------------------------------------------------


def test_roles_from_claims() -> None:
    claims: Dict[str, Any] = {
        "groups": ["admin", "staff", "has space", 7, "/slash"],
        "realm_access": {"roles": ["ops"]},
        "https://example.com/roles": ["editor"],
        "scope_like": "a b  c",
        "number": 5,
    }
    assert roles_from_claims(claims, "groups") == {"admin", "staff"}  # invalid names dropped
    assert roles_from_claims(claims, "realm_access.roles") == {"ops"}
    assert roles_from_claims(claims, "https://example.com/roles") == {"editor"}
    assert roles_from_claims(claims, "scope_like") == {"a", "b", "c"}
    assert roles_from_claims(claims, "number") == frozenset()
    assert roles_from_claims(claims, "missing") == frozenset()
    assert roles_from_claims(claims, "realm_access.nope.deeper") == frozenset()
    assert roles_from_claims("not a mapping", "groups") == frozenset()  # type: ignore[arg-type]
    mapped = ClaimRoles(claim="groups", mapping=["/slash=admin", "staff=staff"])
    assert mapped.roles(claims) == {"admin", "staff"}  # only mapped values count

    @attr.s(frozen=True)
    class Configured:
        roles_claim = attr.ib(default="realm_access.roles")
        roles_claim_map = attr.ib(default=("ops=admin",))

    from_settings = ClaimRoles.from_settings(Configured())
    assert from_settings is not None and from_settings.roles(claims) == {"admin"}
    assert ClaimRoles.from_settings(Configured(roles_claim="")) is None
    assert ClaimRoles.from_settings(object()) is None  # settings without the keys


# -- matching ------------------------------------------------------------------


def test_most_specific_rule_wins() -> None:
    acl = CompiledACL(
        frozenset({"*", "admin.read", "pub.*"}), frozenset({"admin.*", "pub.secret"}), "test"
    )
    assert acl.refusal("anything") is None
    assert acl.refusal("admin.read") is None  # exact grant beats the namespace removal
    assert acl.refusal("admin.purge") == "the rule 'admin.*' was removed from the test ACL"
    assert acl.refusal("admin.deep.x") is not None
    assert acl.refusal("pub.x.y") is None
    assert acl.refusal("pub.secret") is not None
    tie = CompiledACL(frozenset({"a.*"}), frozenset({"a.*"}), "test")
    assert tie.refusal("a.b") is not None  # on a tie, removal wins
    namespace = CompiledACL(frozenset({"public.*"}), frozenset(), "initial")
    assert namespace.refusal("public") == "no rule of the initial ACL allows it"
    assert namespace.refusal("public.a.b.c") is None
    assert namespace.refusal("publicity") is not None


def test_lifted_acl_adds_role_grants() -> None:
    control = AccessControl(lifted=["app.*"], role_grants=["admin=admin.*", "ops=ops.*"])
    plain = control.compiled("lifted", frozenset())
    admin = control.compiled("lifted", frozenset({"admin"}))
    assert plain.refusal("admin.purge") is not None
    assert admin.refusal("admin.purge") is None
    assert admin.refusal("ops.x") is not None
    assert control.compiled("initial", frozenset({"admin"})).refusal("admin.purge") is not None
    assert control.compiled("lifted", frozenset({"admin"})) is admin  # compiled once


def test_from_settings_defaults_and_keys() -> None:
    app = make_app(clock=Clock(), user_store="memory", local_accounts=False)
    control = AccessControl.from_settings(app.settings)
    assert control.initial == ("account.*", "echo", "public.*", "session.*", "time.now")
    assert control.lifted == ("*",)
    assert control.recheck_interval == 60.0
    assert control.roles is None

    @attr.s(frozen=True)
    class Configured:
        acl_initial = attr.ib(default=("account.login",))
        acl_lifted = attr.ib(default=("app.*",))
        acl_role_grants = attr.ib(default=("admin=admin.*",))
        acl_lift_on_login = attr.ib(default=False)
        access_recheck_interval = attr.ib(default=0.0)

    control = AccessControl.from_settings(Configured(), roles=StaticRoles())
    assert control.initial == ("account.login",)
    assert control.role_grants == {"admin": ("admin.*",)}
    assert control.lift_on_login is False
    assert control.recheck_interval == 0.0

    @attr.s(frozen=True)
    class Unchecked:
        access_account_check = attr.ib(default=False)

    assert AccessControl.from_settings(Unchecked()).recheck_interval is None
    with pytest.raises(ValueError, match="recheck_interval"):
        AccessControl(recheck_interval=-1)
    with pytest.raises(TypeError, match="IRoleProvider"):
        AccessControl(roles=object())  # type: ignore[arg-type]


# -- requirements ----------------------------------------------------------------


def test_requirements_from_options_and_marks() -> None:
    registry = MethodRegistry()

    @registry.method("a.open")
    def open_(handler: Handler) -> None: ...

    @registry.method("a.admin", roles=["admin", "root"])
    @require.role("staff")
    def admin(handler: Handler) -> None: ...

    @registry.method("a.auth", auth=True)
    def auth(handler: Handler) -> None: ...

    assert requirement_of(registry.get("a.open")) is None
    req = requirement_of(registry.get("a.admin"))
    assert req == Requirement(
        auth=True, role_sets=(frozenset({"admin", "root"}), frozenset({"staff"}))
    )
    assert req.refusal("u", frozenset({"admin"}))[1] == "it needs one of the roles staff"
    assert req.refusal("u", frozenset({"root", "staff"})) is None
    assert isinstance(req.refusal(None, frozenset())[0], AuthRequiredError)
    assert isinstance(req.refusal("u", frozenset())[0], ForbiddenError)
    assert requirement_of(registry.get("a.auth")) == Requirement(auth=True)
    AccessControl().check_registry(registry)


@pytest.mark.parametrize("roles", ["admin", ["bad role"], [], [1]])
def test_bad_roles_option_is_refused_at_start_up(roles: Any) -> None:
    registry = MethodRegistry()
    registry.add("x.y", lambda handler: None, roles=roles)
    with pytest.raises(ValueError, match="'x.y'"):
        AccessControl().check_registry(registry)


def test_require_decorators() -> None:
    with pytest.raises(ValueError, match="at least one role"):
        require.role()
    with pytest.raises(ValueError, match="role name"):
        require.role("bad role")
    with pytest.raises(ValueError, match="clock"):
        Require(control=AccessControl())

    def f(handler: Handler, x: int, y: str = "") -> int:
        """Doc."""
        return x

    stacked = require.auth(require.role("a")(require.role("b")(f)))
    import inspect

    assert inspect.signature(stacked) == inspect.signature(f)
    assert stacked.__doc__ == "Doc."
    assert stacked.__wrapped__ is f  # stacking makes one wrapper
    marked = stacked.__twistauth_require__
    assert marked.auth
    assert set(marked.role_sets) == {frozenset({"a"}), frozenset({"b"})}
    with pytest.raises(TypeError, match="handler"):
        stacked(object(), 1)


# -- the real account methods -------------------------------------------------------


@method("app.private")
def private(handler: Handler) -> str:
    return "private"


def _wire(app: Any, control: AccessControl) -> None:
    from twistauth.methods.handler import Services

    @attr.s(frozen=True, kw_only=True)
    class WiredServices(Services):
        access: Any = attr.ib(default=None)
        method_cache: Any = attr.ib(default=None)

    services = app.dispatcher.services
    fields = {a.name: getattr(services, a.name) for a in attr.fields(Services)}
    app.dispatcher.services = WiredServices(**{**fields, "access": control})
    app.dispatcher.authorize = control.authorize


@pytest_twisted.ensureDeferred
async def test_account_login_lifts_and_logout_resets() -> None:
    clock = Clock()
    registry = MethodRegistry()
    registry.add("app.private", private)
    app = make_app(clock=clock, reactor=reactor, registry=registry, user_store="memory")
    passwords = PasswordHasher(
        reactor=reactor,
        argon2_hasher=argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
    )
    passwords.startService()
    try:
        app.dispatcher.services = attr.evolve(app.dispatcher.services, passwords=passwords)
        _wire(app, AccessControl())
        users = app.services.users
        await users.create(
            User(user_id="kim", password_hash=await passwords.hash("kim's password"))
        )
        client = MethodClient(app, headers={"X-Twistauth-Session": ""})
        token = ""

        async def call(name: str, **parameters: Any) -> Any:
            nonlocal token
            response = await client.post(
                {"method": name, "parameters": parameters},
                headers={"X-Twistauth-Session": token},
            )
            new = response.header("X-Twistauth-Session")
            if new is not None:
                token = new
            return response.status, response.decoded()

        assert (await call("app.private"))[0] == 403
        status, body = await call("account.login", user_id="kim", password="kim's password")
        assert status == 200, body
        assert await call("app.private") == (200, {"result": "private"})
        assert (await call("account.logout"))[0] == 200
        assert token == ""
        assert (await call("app.private"))[0] == 403
        status, body = await call("account.create", user_id="lee", password="lee's password")
        assert status == 200, body
        assert await call("app.private") == (200, {"result": "private"})
    finally:
        passwords.stopService()
