"""
The logout waiters as the app wires them: a session's ``/logout/wait``
answers the moment the session (or its user) is logged out through the JSON
methods, times out on the Clock, answers at once when already logged out,
never keeps an idle session alive, and gets a final answer at shutdown.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Dict

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth.app import make_app
from twistauth.methods import MethodRegistry

# These tests are not about access control: every method is callable, and
# the users they log in need not exist in a user store.
OPEN_ACCESS = {"acl_initial": ["*"], "access_account_check": False}

START = 1_800_000_000.0
HEADER = "x-twistauth-session"


def methods() -> MethodRegistry:
    registry = MethodRegistry()

    @registry.method("t.login")
    async def login(handler: Any, user_id: str) -> None:
        await handler.log_in(user_id, ["user"])

    @registry.method("t.logout")
    async def logout(handler: Any) -> None:
        await handler.log_out()

    @registry.method("t.everywhere")
    async def everywhere(handler: Any) -> None:
        await handler.log_out_everywhere(handler.session.user_id)

    @registry.method("t.whoami")
    def whoami(handler: Any) -> Any:
        return handler.session.user_id if handler.session is not None else None

    @registry.method("t.wait")
    async def wait(handler: Any, key: str) -> Any:
        return await handler.wait_for_key(key, timeout=5)

    @registry.method("t.send")
    async def send(handler: Any, key: str, message: Any) -> Any:
        return await handler.send_event(key, message)

    return registry


class LogoutWiringTests(SynchronousTestCase):
    session_cache = "memory"

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        options: Dict[str, Any] = {"session_cache": self.session_cache}
        if self.session_cache == "client":
            options["session_keys"] = [secrets.token_bytes(32)]
        self.app = make_app(
            **OPEN_ACCESS, clock=self.clock, registry=methods(), local_accounts=False, **options
        )
        for service in self.app.background:
            service.startService()
        self.addCleanup(self._stop)
        self.client = StubTreq(self.app.resource())

    def _stop(self) -> None:
        for service in reversed(self.app.background):
            service.stopService()

    def call(self, method: str, token: str = "", **parameters: Any) -> Any:
        d = self.client.post(
            "http://localhost/api",
            data=json.dumps({"method": method, "parameters": parameters}).encode(),
            headers={HEADER: token, "content-type": "application/json"},
        )
        self.client.flush()
        response = self.successResultOf(d)
        body = json.loads(self.successResultOf(response.content()))
        return response.headers.getRawHeaders(HEADER, [""])[0], body

    def login(self, user: str) -> str:
        token, body = self.call("t.login", user_id=user)
        self.assertIn("result", body)
        return str(token)

    def wait(self, token: str, timeout: float = 20) -> Deferred[Any]:
        d = self.client.get(
            f"http://localhost/logout/wait?timeout={timeout:g}", headers={HEADER: token}
        )
        self.client.flush()
        return d

    def answer(self, d: Deferred[Any]) -> Any:
        self.client.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_logout_wakes_the_wait(self) -> None:
        token = self.login("alice")
        waiting = self.wait(token)
        self.clock.advance(0)
        self.assertNoResult(waiting)
        self.call("t.logout", token)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(self.answer(waiting), (200, {"logged_out": True, "reason": "logout"}))

    def test_logout_everywhere_wakes_every_session_of_the_user(self) -> None:
        first, second, other = self.login("bob"), self.login("bob"), self.login("carol")
        waits = [self.wait(t) for t in (first, second, other)]
        self.clock.advance(1)
        self.call("t.everywhere", first)
        for _ in range(3):
            self.clock.advance(0)
        for d in waits[:2]:
            code, body = self.answer(d)
            self.assertEqual(
                (code, body["logged_out"], body["reason"]), (200, True, "logout_everywhere")
            )
        self.assertNoResult(waits[2])
        self.clock.advance(20)
        self.assertEqual(self.answer(waits[2]), (200, {"logged_out": False}))

    def test_timeout_answers_not_logged_out(self) -> None:
        token = self.login("dave")
        waiting = self.wait(token, timeout=3)
        self.clock.advance(2.9)
        self.assertNoResult(waiting)
        self.clock.advance(0.2)
        self.assertEqual(self.answer(waiting), (200, {"logged_out": False}))

    def test_already_logged_out_answers_at_once(self) -> None:
        token = self.login("erin")
        self.call("t.logout", token)
        code, body = self.answer(self.wait(token))
        # A dead token has no session: the wait is refused as unauthenticated.
        self.assertEqual(code, 401, body)

    def test_no_session_is_401(self) -> None:
        code, body = self.answer(self.wait(""))
        self.assertEqual(code, 401)
        self.assertIn("error", body)

    def test_waiting_does_not_keep_an_idle_session_alive(self) -> None:
        token = self.login("frank")
        ended_after = None
        for _ in range(80):
            d = self.wait(token, timeout=25)
            self.clock.advance(25)
            code, body = self.answer(d)
            if code != 200 or body.get("logged_out"):
                ended_after = self.clock.seconds() - START
                break
        # Waits alone never counted as use: the session ended at its idle
        # timeout (1800 s), not later.
        self.assertEqual(ended_after, 1800)
        _, body = self.call("t.whoami", token)
        self.assertIsNone(body["result"])

    def test_shutdown_answers_pending_waits(self) -> None:
        token = self.login("gina")
        waiting = self.wait(token)
        self.clock.advance(0)
        self.app.shutdown()
        for _ in range(3):
            self.clock.advance(0)
        code, body = self.answer(waiting)
        self.assertEqual((code, body), (200, {"logged_out": False, "reason": "shutdown"}))

    def test_methods_wait_on_the_bus(self) -> None:
        token = self.login("hana")
        d = self.client.post(
            "http://localhost/api",
            data=json.dumps({"method": "t.wait", "parameters": {"key": "k"}}).encode(),
            headers={HEADER: token, "content-type": "application/json"},
        )
        self.client.flush()
        self.call("t.send", token, key="k", message={"hello": 1})
        for _ in range(3):
            self.clock.advance(0)
        self.client.flush()
        response = self.successResultOf(d)
        self.assertEqual(
            json.loads(self.successResultOf(response.content())), {"result": {"hello": 1}}
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ClientSideLogoutWiringTests(LogoutWiringTests):
    session_cache = "client"
