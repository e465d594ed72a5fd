"""
Access control through the whole HTTP stack (``StubTreq``, no sockets,
sessions in header mode, a `Clock`): ACL transitions anonymous → login →
lift → del → reset → logout, 401/403 in the error envelope, batches (each
entry checked; a refused one reveals nothing about the others), roles from
the user store, from a host application's provider and from an OpenID
Connect claim, the account re-check (checklist case 74), Klein-route
decorators, and log lines that name the refusing rule but never a session id.
Checklist cases 84, 85 and the ACL part of 86.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import attr
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twistauth.access import (
    ACL_KEY,
    AccessControl,
    ClaimRoles,
    CombinedRoles,
    Require,
    StaticRoles,
    StoreRoles,
    acl,
    add_acl_method,
    del_acl_method,
    is_method_allowed,
    lift_acl_restrictions,
    require,
    reset_acl,
    session_resolver,
)
from twistauth.accounts import User, modify_user
from twistauth.app import make_app
from twistauth.errors import AuthRequiredError, ForbiddenError, TwistauthError
from twistauth.methods.handler import Handler
from twistauth.methods.registry import MethodRegistry, method
from twistauth.testing._client import MethodClient, Response

SESSION = "X-Twistauth-Session"
ANONYMOUS = {"user_id": None, "roles": [], "authenticated_at": None, "permanent": False}



def wire(app: Any, control: Optional[AccessControl], cache: Any = None) -> None:
    """
    Replace the access control (and method cache) ``make_app`` wired with
    the test's own: the authorizer on the dispatcher, the parts in the
    services.  ``None`` removes the authorizer.
    """
    app.dispatcher.services = attr.evolve(
        app.dispatcher.services, access=control, method_cache=cache
    )
    app.dispatcher.authorize = control.authorize if control is not None else None


# -- the methods the tests call ---------------------------------------------

RAN: List[str] = []


@method("public.login_as")
async def login_without_password(handler: Handler, user_id: str) -> Dict[str, Any]:
    """Log in as a user of the store, with the store's roles (no password)."""
    user = await handler.services.users.get(user_id)
    await handler.log_in(user_id, user.roles if user is not None else ())
    return {"user_id": user_id}


@method("public.claims_login")
async def claims_login(handler: Handler, user_id: str, claims: Dict[str, Any]) -> List[str]:
    """Log in as an OIDC login would: roles mapped from the ID token's claims."""
    roles = ClaimRoles(claim="groups", mapping=["idp-admins=admin", "idp-staff=staff"]).roles(
        claims
    )
    store = handler.services.users
    if await store.get(user_id) is None:
        await store.create(User(user_id=user_id, roles=roles))
    await handler.log_in(user_id, roles)
    return sorted(handler.session.roles)


@method("admin.purge", roles=["admin"])
def purge(handler: Handler, everything: bool = False) -> str:
    RAN.append("admin.purge")
    return "purged"


@method("reports.view")
@require.auth
def reports_view(handler: Handler) -> str:
    RAN.append("reports.view")
    return "report"


@require.role("auditor", "admin")
@method("reports.export")
def reports_export(handler: Handler) -> str:
    RAN.append("reports.export")
    return "export"


@method("app.data")
def app_data(handler: Handler) -> Dict[str, Any]:
    RAN.append("app.data")
    return {"secret": "app-data-value"}


@method("app.other")
def app_other(handler: Handler) -> str:
    return "other"


@method("zzz.hidden")
def hidden(handler: Handler) -> str:
    return "hidden"


@method("public.acl.grant")
def grant(handler: Handler, name: str) -> Deferred[None]:
    return add_acl_method(handler, name)


@method("public.acl.revoke")
def revoke(handler: Handler, name: str) -> Deferred[None]:
    return del_acl_method(handler, name)


@method("public.acl.lift")
def lift(handler: Handler) -> Deferred[None]:
    return lift_acl_restrictions(handler)


@method("public.acl.reset")
def reset(handler: Handler) -> Deferred[None]:
    return reset_acl(handler)


@method("public.acl.allowed")
def allowed(handler: Handler, name: str) -> Dict[str, bool]:
    return {"full": is_method_allowed(handler, name), "acl": acl(handler).allows(name)}


@method("public.acl.rules")
def rules(handler: Handler) -> Dict[str, Any]:
    return acl(handler).rules()


class Harness:
    """
    A twistauth app with the test methods, a memory user store on a
    `Clock`, and the access control installed.
    """

    def __init__(self, control: Optional[AccessControl] = None, wired: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        registry = MethodRegistry()
        registry.load(__name__)
        self.app = make_app(
            clock=self.clock,
            registry=registry,
            method_modules=["twistauth.demo_methods"],
            user_store="memory",
        )
        self.users = self.app.services.users
        self.control = control if control is not None else AccessControl()
        wire(self.app, self.control if wired else None)
        self.stub = MethodClient(self.app)
        self.reads = 0
        original = self.users.get

        def counting_get(user_id: str) -> Any:
            self.reads += 1
            return original(user_id)

        self.users.get = counting_get

    def add_user(self, user_id: str, roles: Any = (), disabled: bool = False) -> None:
        self.users.create(User(user_id=user_id, roles=roles, disabled=disabled))

    def client(self) -> Client:
        return Client(self)


class Client:
    """A non-browser client: holds its session token from the header."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.token = ""

    def _raw(self, envelope: Any) -> Deferred[Response]:
        d: Deferred[Response] = self.harness.stub.post(envelope, headers={SESSION: self.token})

        def keep(response: Response) -> Response:
            new = response.header(SESSION)
            if new is not None:
                self.token = new
            return response

        return d.addCallback(keep)

    def raw(self, method_name: str, **parameters: Any) -> Deferred[Response]:
        return self._raw({"method": method_name, "parameters": parameters})

    def batch(self, calls: Dict[str, Any]) -> Deferred[Response]:
        return self._raw(
            {"batch": {k: {"method": m, "parameters": p} for k, (m, p) in calls.items()}}
        )


class AccessTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: List[Dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        del RAN[:]

    def harness(self, **kwargs: Any) -> Harness:
        return Harness(**kwargs)

    def respond(self, d: Deferred[Response]) -> Response:
        return self.successResultOf(d)

    def ok(self, client: Client, method_name: str, **parameters: Any) -> Any:
        response = self.respond(client.raw(method_name, **parameters))
        body = response.decoded()
        self.assertEqual(response.status, 200, body)
        return body["result"]

    def refused(
        self, client: Client, method_name: str, status: int, **parameters: Any
    ) -> Dict[str, Any]:
        response = self.respond(client.raw(method_name, **parameters))
        body = response.decoded()
        self.assertEqual(response.status, status, body)
        expected = {401: "auth_required", 403: "forbidden"}[status]
        self.assertEqual(body["error"]["name"], expected, body)
        self.assertEqual(set(body), {"error"})
        return body["error"]  # type: ignore[no-any-return]

    def log_lines(self) -> List[str]:
        return [formatEvent(e) for e in self.events]

    def refusal_lines(self) -> List[str]:
        return [line for line in self.log_lines() if "twistauth: access: refused" in line]


# -- ACL transitions ----------------------------------------------------------


class TransitionTests(AccessTestCase):
    def test_anonymous_login_lift_del_reset_logout(self) -> None:
        h = self.harness()
        h.add_user("alice")
        c = h.client()
        # Anonymous: the initial ACL.
        self.assertEqual(self.ok(c, "echo", x=1), {"x": 1})
        self.assertIn("seconds", self.ok(c, "time.now"))
        self.assertEqual(self.ok(c, "session.info"), ANONYMOUS)
        self.refused(c, "app.data", 403)
        self.assertEqual(RAN, [])
        self.assertEqual(c.token, "")  # refusing made no session
        self.assertEqual(
            self.ok(c, "public.acl.rules"), {"base": "initial", "allow": [], "deny": []}
        )
        # A hook grants one method to the anonymous session.
        self.ok(c, "public.acl.grant", name="app.data")
        self.assertTrue(c.token)
        self.assertEqual(self.ok(c, "app.data"), {"secret": "app-data-value"})
        self.refused(c, "app.other", 403)
        self.ok(c, "public.acl.revoke", name="app.data")
        self.refused(c, "app.data", 403)
        # Login lifts: everything the (empty) roles allow.
        self.ok(c, "public.login_as", user_id="alice")
        self.assertEqual(
            self.ok(c, "public.acl.rules"), {"base": "lifted", "allow": [], "deny": []}
        )
        self.assertEqual(self.ok(c, "app.data"), {"secret": "app-data-value"})
        self.assertEqual(self.ok(c, "app.other"), "other")
        self.refused(c, "admin.purge", 403)  # the method's role still holds
        # del: one method carved out of the lifted ACL.
        self.ok(c, "public.acl.revoke", name="app.data")
        self.refused(c, "app.data", 403)
        self.assertEqual(self.ok(c, "app.other"), "other")
        self.assertEqual(
            self.ok(c, "public.acl.rules"), {"base": "lifted", "allow": [], "deny": ["app.data"]}
        )
        # lift again: the carve-out is gone.
        self.ok(c, "public.acl.lift")
        self.assertEqual(self.ok(c, "app.data"), {"secret": "app-data-value"})
        # reset: back to the initial ACL while still logged in.
        self.ok(c, "public.acl.reset")
        self.refused(c, "app.data", 403)
        self.assertEqual(self.ok(c, "echo"), {})
        self.assertEqual(self.ok(c, "session.info")["user_id"], "alice")
        # logout resets: the next session starts anonymous with the initial ACL.
        self.assertIsNone(self.ok(c, "account.logout"))
        self.assertEqual(c.token, "")
        self.refused(c, "app.data", 403)
        self.ok(c, "public.login_as", user_id="alice")
        self.assertEqual(self.ok(c, "app.data"), {"secret": "app-data-value"})

    def test_grants_never_survive_a_login_as_someone_else(self) -> None:
        h = self.harness(control=AccessControl(lift_on_login=False))
        h.add_user("bob")
        h.add_user("carol")
        c = h.client()
        self.ok(c, "public.acl.grant", name="app.data")
        self.assertEqual(self.ok(c, "app.data"), {"secret": "app-data-value"})
        self.ok(c, "public.login_as", user_id="bob")
        # Not lifted on login (socketio's way), and the anonymous grant is gone.
        self.refused(c, "app.data", 403)
        self.ok(c, "public.acl.lift")
        self.assertEqual(self.ok(c, "app.other"), "other")
        self.ok(c, "public.acl.grant", name="zzz.hidden")
        # Logging in as carol on bob's session: bob's ACL does not carry over.
        self.ok(c, "public.login_as", user_id="carol")
        self.assertEqual(self.ok(c, "public.acl.rules")["base"], "initial")
        self.refused(c, "app.other", 403)

    def test_most_specific_rule_decides(self) -> None:
        h = self.harness()
        h.add_user("dave")
        c = h.client()
        self.ok(c, "public.login_as", user_id="dave")
        self.ok(c, "public.acl.revoke", name="app.*")
        self.refused(c, "app.data", 403)
        self.refused(c, "app.other", 403)
        self.ok(c, "public.acl.grant", name="app.data")  # exact beats app.*
        self.assertEqual(self.ok(c, "app.data"), {"secret": "app-data-value"})
        self.refused(c, "app.other", 403)
        self.assertEqual(
            self.ok(c, "public.acl.allowed", name="app.other"), {"full": False, "acl": False}
        )
        self.assertEqual(
            self.ok(c, "public.acl.allowed", name="app.data"), {"full": True, "acl": True}
        )
        # The ACL allows admin.purge, its role does not.
        self.assertEqual(
            self.ok(c, "public.acl.allowed", name="admin.purge"), {"full": False, "acl": True}
        )
        self.assertEqual(
            self.ok(c, "public.acl.allowed", name="no.such"), {"full": False, "acl": True}
        )

    def test_acl_is_stored_in_the_session_state_only_when_changed(self) -> None:
        h = self.harness()
        h.add_user("erin")
        c = h.client()
        self.ok(c, "public.login_as", user_id="erin")
        session = self.successResultOf(h.app.services.sessions.load(c.token))
        self.assertNotIn(ACL_KEY, session)
        self.ok(c, "public.acl.revoke", name="app.data")
        session = self.successResultOf(h.app.services.sessions.load(c.token))
        self.assertEqual(
            session[ACL_KEY], {"user": "erin", "base": "lifted", "allow": [], "deny": ["app.data"]}
        )
        self.ok(c, "public.acl.lift")
        session = self.successResultOf(h.app.services.sessions.load(c.token))
        self.assertNotIn(ACL_KEY, session)

    def test_the_policy_is_read_only(self) -> None:
        """
        Compiled ACLs are cached from the policy, so the policy cannot be
        changed after it is made: a change would be silently ignored by
        every cached ACL.
        """
        control = AccessControl(lifted=["app.*"], role_grants={"admin": ["admin.*"]})
        before = control.compiled("lifted", frozenset({"admin"}))
        for name, value in [
            ("initial", ("app.*",)),
            ("lifted", ("*",)),
            ("role_grants", {}),
            ("lift_on_login", False),
        ]:
            with self.assertRaises(attr.exceptions.FrozenAttributeError):
                setattr(control, name, value)
        with self.assertRaises(TypeError):
            control.role_grants["admin"] = ("*",)  # type: ignore[index]
        self.assertEqual(control.role_grants, {"admin": ("admin.*",)})
        self.assertIs(control.compiled("lifted", frozenset({"admin"})), before)
        self.assertIsNone(before.refusal("admin.purge"))
        self.assertIsNotNone(before.refusal("other.call"))


# -- 401 / 403, batches, default deny ----------------------------------------


class RequirementTests(AccessTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.h = self.harness()
        self.h.add_user("user")
        self.h.add_user("root", roles={"admin"})
        self.h.add_user("auditor", roles={"auditor"})

    def test_roles_401_and_403(self) -> None:
        c = self.h.client()
        error = self.refused(c, "admin.purge", 401)
        self.assertEqual(error, AuthRequiredError().to_json())
        self.refused(c, "reports.view", 401)
        self.refused(c, "reports.export", 401)
        self.ok(c, "public.login_as", user_id="user")
        error = self.refused(c, "admin.purge", 403)
        self.assertEqual(error["code"], ForbiddenError.code)
        self.assertNotIn("admin", error["value"])  # no hint of what would pass
        self.assertEqual(self.ok(c, "reports.view"), "report")
        self.refused(c, "reports.export", 403)
        a = self.h.client()
        self.ok(a, "public.login_as", user_id="auditor")
        self.assertEqual(self.ok(a, "reports.export"), "export")
        self.refused(a, "admin.purge", 403)
        r = self.h.client()
        self.ok(r, "public.login_as", user_id="root")
        self.assertEqual(self.ok(r, "admin.purge"), "purged")
        self.assertEqual(self.ok(r, "reports.export"), "export")
        self.assertEqual(RAN, ["reports.view", "reports.export", "admin.purge", "reports.export"])

    def test_refused_before_parameters_are_checked(self) -> None:
        # ACL part of case 86: a refused call learns nothing of the method's
        # parameters (403/401, never 400), and the method does not run.
        c = self.h.client()
        self.refused(c, "admin.purge", 401, everything="not a bool", extra=1)
        self.ok(c, "public.login_as", user_id="user")
        self.refused(c, "admin.purge", 403, everything="not a bool", extra=1)
        self.assertEqual(RAN, [])

    def test_batches_check_every_entry(self) -> None:
        c = self.h.client()
        response = self.respond(
            c.batch(
                {
                    "a": ("echo", {"x": 1}),
                    "b": ("app.data", {}),
                    "c": ("admin.purge", {}),
                    "d": ("public.acl.rules", {}),
                }
            )
        )
        self.assertEqual(response.status, 200)
        answers = response.decoded()["batch"]
        self.assertEqual(answers["a"], {"result": {"x": 1}})
        self.assertEqual(answers["b"]["error"]["name"], "forbidden")
        self.assertEqual(answers["c"]["error"]["name"], "auth_required")
        self.assertEqual(answers["d"]["result"]["base"], "initial")
        self.ok(c, "public.login_as", user_id="user")
        response = self.respond(
            c.batch(
                {
                    "a": ("app.data", {}),
                    "b": ("admin.purge", {"everything": True}),
                    "c": ("reports.view", {}),
                }
            )
        )
        answers = response.decoded()["batch"]
        self.assertEqual(answers["a"], {"result": {"secret": "app-data-value"}})
        self.assertEqual(answers["c"], {"result": "report"})
        # The refused entry is the bare error: nothing of the others.
        self.assertEqual(
            answers["b"],
            {
                "error": ForbiddenError(
                    "this call needs a role this session does not have"
                ).to_json()
            },
        )
        self.assertNotIn("app-data-value", json.dumps(answers["b"]))
        self.assertEqual(RAN, ["app.data", "reports.view"])

    def test_default_deny(self) -> None:
        # Case 85: a method no rule names is refused (anonymous, and logged in
        # under a restrictive lifted ACL); the start-up check names it.
        h = self.harness(
            control=AccessControl(lifted=["app.*", "public.*"], role_grants=["admin=admin.*"])
        )
        h.add_user("user")
        h.add_user("root", roles={"admin"})
        c = h.client()
        self.refused(c, "zzz.hidden", 403)
        self.ok(c, "public.login_as", user_id="user")
        self.refused(c, "zzz.hidden", 403)
        self.refused(c, "reports.view", 403)  # logged in, but no rule names reports.*
        self.assertEqual(self.ok(c, "app.other"), "other")
        self.refused(c, "admin.purge", 403)
        r = h.client()
        self.ok(r, "public.login_as", user_id="root")
        self.assertEqual(self.ok(r, "admin.purge"), "purged")  # granted to the admin role
        self.refused(r, "zzz.hidden", 403)
        unreachable = h.control.check_registry(h.app.registry)
        self.assertIn("zzz.hidden", unreachable)
        self.assertIn("reports.view", unreachable)
        self.assertNotIn("admin.purge", unreachable)
        self.assertTrue(any("zzz.hidden" in line for line in self.log_lines()))

    def test_unknown_names_never_reach_the_acl(self) -> None:
        # Case 84's ACL part: names resolve only through the registry, and no
        # ACL pattern can name a private attribute.
        h = self.harness(control=AccessControl(initial=["*"]))
        c = h.client()
        for name in ("__class__", "a.__init__.__globals__", "echo.__globals__", "app"):
            response = self.respond(c.raw(name))
            self.assertEqual(response.status, 404, name)
            self.assertEqual(response.decoded()["error"]["name"], "unknown_method")
        self.assertEqual(
            self.ok(c, "public.acl.allowed", name="__class__"), {"full": False, "acl": True}
        )
        for pattern in ("__class__", "a.__init__", "a._b.*"):
            with self.assertRaises(ValueError):
                AccessControl(initial=[pattern])
        response = self.respond(c.raw("public.acl.grant", name="__class__"))
        self.assertEqual(response.status, 500)  # a programming error, not a grant
        self.assertNotIn("__class__", response.body.decode())
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_log_names_the_rule_never_the_session(self) -> None:
        c = self.h.client()
        self.ok(c, "public.login_as", user_id="user")
        self.ok(c, "public.acl.revoke", name="app.*")
        self.refused(c, "app.data", 403)
        self.refused(c, "admin.purge", 403)
        anonymous = self.h.client()
        self.refused(anonymous, "app.other", 403)
        self.refused(anonymous, "admin.purge", 401)
        lines = self.refusal_lines()
        self.assertEqual(
            lines,
            [
                "twistauth: access: refused app.data for user: the rule 'app.*' was removed "
                "from the session's (lifted) ACL",
                "twistauth: access: refused admin.purge for user: it needs one of the roles admin",
                "twistauth: access: refused app.other for anonymous: no rule of the initial "
                "ACL allows it",
                "twistauth: access: refused admin.purge for anonymous: it needs a logged-in session",
            ],
        )
        session = self.successResultOf(self.h.app.services.sessions.load(c.token))
        text = "\n".join(self.log_lines()) + repr(self.events)
        self.assertTrue(c.token)
        self.assertNotIn(c.token, text)
        self.assertNotIn(session.id, text)

    def test_no_authorizer_still_enforces_require_decorators(self) -> None:
        h = self.harness(wired=False)
        h.add_user("user")
        c = h.client()
        self.refused(c, "reports.view", 401)
        self.assertEqual(self.ok(c, "app.data"), {"secret": "app-data-value"})  # no ACL
        self.ok(c, "public.login_as", user_id="user")
        self.refused(c, "reports.export", 403)
        self.assertEqual(self.ok(c, "reports.view"), "report")


# -- roles: store, host provider, claims; the account re-check ----------------


class AccountCheckTests(AccessTestCase):
    def disable(self, h: Harness, user_id: str) -> None:
        self.successResultOf(modify_user(h.users, user_id, lambda u: u.evolve(disabled=True)))

    def test_disabled_account_ends_every_session_on_next_request(self) -> None:
        # Case 74.
        h = self.harness()
        h.add_user("alice")
        laptop, phone = h.client(), h.client()
        self.ok(laptop, "public.login_as", user_id="alice")
        self.ok(phone, "public.login_as", user_id="alice")
        self.ok(laptop, "app.data")  # first call after login: one check
        self.ok(phone, "app.data")
        reads = h.reads
        for _ in range(5):
            self.ok(laptop, "app.data")
        self.assertEqual(h.reads, reads)  # within the window: no store read
        self.disable(h, "alice")
        h.clock.advance(59)
        self.ok(laptop, "app.data")  # still within the 60 s window
        h.clock.advance(1)
        before = len(RAN)
        error = self.refused(laptop, "app.data", 401)
        self.assertIn("no longer active", error["value"])
        self.assertEqual(len(RAN), before)  # the method did not run
        self.assertEqual(laptop.token, "")  # told to drop its token
        # The other session ended too, without waiting for its own check.
        self.assertEqual(self.ok(phone, "session.info"), ANONYMOUS)
        self.assertTrue(any("alice is gone or disabled" in line for line in self.log_lines()))

    def test_deleted_account(self) -> None:
        h = self.harness()
        h.add_user("bob")
        c = h.client()
        self.ok(c, "public.login_as", user_id="bob")
        self.successResultOf(h.users.delete("bob"))
        self.refused(c, "app.data", 401)  # never checked since login: checked now
        self.assertEqual(self.ok(c, "session.info"), ANONYMOUS)

    def test_role_changes_apply_within_the_window(self) -> None:
        h = self.harness()
        h.add_user("carol")
        c = h.client()
        self.ok(c, "public.login_as", user_id="carol")
        self.refused(c, "admin.purge", 403)
        self.successResultOf(modify_user(h.users, "carol", lambda u: u.evolve(roles={"admin"})))
        self.refused(c, "admin.purge", 403)
        h.clock.advance(60)
        self.assertEqual(self.ok(c, "admin.purge"), "purged")
        self.assertEqual(self.ok(c, "session.info")["roles"], ["admin"])

    def test_a_batch_shares_one_check(self) -> None:
        h = self.harness()
        h.add_user("dave")
        c = h.client()
        self.ok(c, "public.login_as", user_id="dave")
        reads = h.reads
        response = self.respond(
            c.batch({**{k: ("app.data", {}) for k in "abcdef"}, "g": ("admin.purge", {})})
        )
        answers = response.decoded()["batch"]
        self.assertEqual(h.reads, reads + 1)
        self.assertEqual(answers["a"], {"result": {"secret": "app-data-value"}})
        self.assertEqual(answers["g"]["error"]["name"], "forbidden")
        self.disable(h, "dave")
        reads = h.reads
        h.clock.advance(60)
        response = self.respond(c.batch({k: ("app.data", {}) for k in "abc"}))
        answers = response.decoded()["batch"]
        # The first entry ends the session; the later ones run anonymous.
        self.assertEqual(answers["a"]["error"]["name"], "auth_required")
        self.assertEqual(answers["b"]["error"]["name"], "forbidden")
        self.assertEqual(answers["c"]["error"]["name"], "forbidden")
        self.assertEqual(h.reads, reads + 1)
        self.assertEqual(c.token, "")

    def test_store_outage_fails_closed(self) -> None:
        from twisted.internet.defer import fail

        from twistauth.errors import BackendUnavailableError

        h = self.harness()
        h.add_user("erin")
        c = h.client()
        self.ok(c, "public.login_as", user_id="erin")
        h.users.get = lambda user_id: fail(BackendUnavailableError())
        response = self.respond(c.raw("app.data"))
        self.assertEqual(response.status, 503)
        self.assertEqual(RAN, [])
        self.assertTrue(c.token)  # an outage is not a logout

    def test_host_provider_resolves_roles_asynchronously(self) -> None:
        clock_holder: List[Clock] = []

        @attr.s
        class SlowHostRoles:
            """A host application's database: answers a second later."""

            table: Dict[str, List[str]] = attr.ib()

            def roles_for(self, user_id: str) -> Deferred[Any]:
                return deferLater(clock_holder[0], 1.0, self.table.get, user_id)

        from zope.interface import classImplements

        from twistauth.access import IRoleProvider

        classImplements(SlowHostRoles, IRoleProvider)
        host = SlowHostRoles({"frank": ["admin"]})
        h = Harness(control=AccessControl(roles=host))
        clock_holder.append(h.clock)
        h.add_user("frank")
        c = h.client()
        self.ok(c, "public.login_as", user_id="frank")
        d = c.raw("admin.purge")
        self.assertNoResult(d)
        h.clock.advance(1)
        self.assertEqual(self.successResultOf(d).decoded(), {"result": "purged"})
        del host.table["frank"]
        h.clock.advance(60)
        d = c.raw("app.data")
        h.clock.advance(1)
        self.assertEqual(self.successResultOf(d).status, 401)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_combined_store_and_host_roles(self) -> None:
        h = self.harness()
        h.add_user("gina", roles={"staff"})
        host = StaticRoles(roles={"gina": ["admin"], "ghost": ["admin"]})
        combined = CombinedRoles(primary=StoreRoles(users=h.users), extra=[host])
        self.assertEqual(self.successResultOf(combined.roles_for("gina")), {"staff", "admin"})
        # The store decides whether the account is live.
        self.assertIsNone(self.successResultOf(combined.roles_for("ghost")))
        control = AccessControl.from_settings(h.app.settings, users=h.users, roles=host)
        self.assertEqual(self.successResultOf(control.roles.roles_for("gina")), {"staff", "admin"})

    def test_roles_from_an_oidc_claim(self) -> None:
        h = self.harness()
        c = h.client()
        roles = self.ok(
            c,
            "public.claims_login",
            user_id="oidc|henry",
            claims={"sub": "henry", "groups": ["idp-admins", "other", "idp-staff"]},
        )
        self.assertEqual(roles, ["admin", "staff"])
        self.assertEqual(self.ok(c, "admin.purge"), "purged")
        other = h.client()
        self.assertEqual(
            self.ok(other, "public.claims_login", user_id="oidc|ivy", claims={"groups": "other"}),
            [],
        )
        self.refused(other, "admin.purge", 403)

    def test_no_user_store_means_no_recheck(self) -> None:
        h = self.harness()
        h.add_user("jack")
        c = h.client()
        self.ok(c, "public.login_as", user_id="jack")
        h.app.dispatcher.services = attr.evolve(h.app.dispatcher.services, users=None)
        h.clock.advance(1000)
        self.assertEqual(self.ok(c, "app.data"), {"secret": "app-data-value"})


# -- Klein routes of a host application -------------------------------------


class RouteTests(AccessTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.h = self.harness()
        self.h.add_user("user")
        self.h.add_user("root", roles={"admin"})
        app = self.h.app
        resolve = session_resolver(app.services.sessions, app.api.transport)
        guard = Require(resolve_session=resolve)
        checked = Require(
            resolve_session=resolve,
            control=AccessControl(roles=StoreRoles(users=self.h.users)),
            sessions=app.services.sessions,
            clock=self.h.clock,
        )
        host = Klein()

        @host.route("/page")
        @guard.auth
        def page(request: Any) -> bytes:
            return b"page"

        @host.route("/admin")
        @guard.role("admin")
        def admin(request: Any) -> Deferred[bytes]:
            return succeed(b"admin page")

        @host.route("/checked")
        @checked.role("admin")
        async def checked_admin(request: Any) -> bytes:
            return b"checked"

        @host.route("/stacked")
        @require.auth
        @guard.role("admin")
        def stacked(request: Any) -> bytes:
            return b"stacked"

        @host.route("/unwired")
        @require.auth
        def unwired(request: Any) -> bytes:
            return b"never"

        class Pages:
            routes = Klein()

            @routes.route("/mine")
            @guard.role("admin")
            def mine(self, request: Any) -> bytes:
                return b"method route"

        self.host = StubTreq(host.resource())
        self.pages = StubTreq(Pages().routes.resource())

    def get(self, stub: Any, path: str, token: str = "") -> Any:
        response = self.successResultOf(
            stub.get("https://host.test" + path, headers={SESSION: token})
        )
        body = self.successResultOf(response.content())
        return response, body

    def token_for(self, user_id: str) -> str:
        c = self.h.client()
        self.ok(c, "public.login_as", user_id=user_id)
        return c.token

    def assertEnvelope(self, response: Any, body: bytes, error: TwistauthError) -> None:
        self.assertEqual(response.code, error.status)
        self.assertEqual(json.loads(body), {"error": error.to_json()})
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])

    def test_401_403_and_200(self) -> None:
        user, root = self.token_for("user"), self.token_for("root")
        response, body = self.get(self.host, "/page")
        self.assertEnvelope(response, body, AuthRequiredError())
        response, body = self.get(self.host, "/page", "not-a-live-token")
        self.assertEnvelope(response, body, AuthRequiredError())
        self.assertEqual(self.get(self.host, "/page", user)[1], b"page")
        response, body = self.get(self.host, "/admin", user)
        self.assertEnvelope(
            response, body, ForbiddenError("this call needs a role this session does not have")
        )
        self.assertEqual(self.get(self.host, "/admin", root)[1], b"admin page")
        self.assertEqual(self.get(self.pages, "/mine", root)[1], b"method route")
        self.assertEqual(self.get(self.host, "/stacked", root)[1], b"stacked")
        self.assertEqual(self.get(self.host, "/stacked", user)[0].code, 403)
        response, body = self.get(self.pages, "/mine", user)
        self.assertEqual(response.code, 403)
        self.assertIn("twistauth: access: refused /admin for user", "\n".join(self.log_lines()))

    def test_same_envelope_as_the_twistauth_routes(self) -> None:
        # twistauth's own routes answer a TwistauthError with render_error:
        # a guarded host route answers the very same status, headers and body.
        from twistauth.web.routes import make_routes

        routes = make_routes()

        @routes.route("/raises")
        def raises(request: Any) -> bytes:
            raise AuthRequiredError()

        theirs, their_body = self.get(StubTreq(routes.resource()), "/raises")
        ours, our_body = self.get(self.host, "/page")
        self.assertEqual(our_body, their_body)
        self.assertEqual(ours.code, theirs.code)
        for name in ("content-type", "cache-control"):
            self.assertEqual(ours.headers.getRawHeaders(name), theirs.headers.getRawHeaders(name))

    def test_route_recheck_ends_a_disabled_account(self) -> None:
        root = self.token_for("root")
        self.assertEqual(self.get(self.host, "/checked", root)[1], b"checked")
        self.successResultOf(modify_user(self.h.users, "root", lambda u: u.evolve(disabled=True)))
        response, body = self.get(self.host, "/checked", root)
        self.assertEqual(response.code, 401)
        self.assertEqual(self.get(self.host, "/admin", root)[0].code, 401)  # session ended

    def test_require_without_a_resolver_on_a_route(self) -> None:
        response, body = self.get(self.host, "/unwired", self.token_for("root"))
        self.assertEqual(response.code, 500)
        self.assertNotIn(b"never", body)
        self.assertTrue(any("has no resolve_session" in line for line in self.log_lines()))


class DefaultSettingsTests(SynchronousTestCase):
    """
    The app as ``make_app`` wires it with no access settings: default-deny.
    """

    def test_unlisted_methods_are_refused_to_anonymous_sessions(self) -> None:
        registry = MethodRegistry()
        registry.add("private.thing", lambda handler: "secret")
        client = MethodClient(
            make_app(clock=Clock(), registry=registry, user_store="memory", local_accounts=False)
        )
        failure = self.failureResultOf(client.call("private.thing"), ForbiddenError)
        self.assertIn("private.thing", str(failure.value))
        self.assertEqual(self.successResultOf(client.call("echo", x=1)), {"x": 1})
