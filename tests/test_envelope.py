"""
Tests for `twistauth.methods.envelope`: what a body must look like to be a
call or a batch, the batch limit (checklist case 86), and a hypothesis fuzz
of the whole parser through the HTTP stack: no input ever answers 500, and
every answer is a valid envelope.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth.app import make_app
from twistauth.errors import (
    BatchTooLargeError,
    InvalidEnvelopeError,
    InvalidParametersError,
    UnknownMethodError,
    all_errors,
)
from twistauth.methods.envelope import Batch, Call, parse_call, parse_envelope
from twistauth.methods.registry import MethodRegistry
from twistauth.testing._client import MethodClient, Response

# These tests are not about access control: every method is callable, and
# the users they log in need not exist in a user store.
OPEN_ACCESS = {"acl_initial": ["*"], "access_account_check": False}


class ParseTests(SynchronousTestCase):
    def invalid(self, value: Any, fragment: str = "") -> InvalidEnvelopeError:
        with self.assertRaises(InvalidEnvelopeError) as caught:
            parse_envelope(value, 32)
        self.assertIn(fragment, str(caught.exception))
        return caught.exception

    def test_call(self) -> None:
        self.assertEqual(
            parse_envelope({"method": "a.b", "parameters": {"x": 1}}, 32), Call("a.b", {"x": 1})
        )

    def test_parameters_optional(self) -> None:
        self.assertEqual(parse_envelope({"method": "a"}, 32), Call("a", {}))

    def test_not_an_object(self) -> None:
        for value in ([], "echo", 1, None, True, [{"method": "echo"}]):
            self.invalid(value, "must be an object")

    def test_method_not_a_string(self) -> None:
        for method in (None, 1, "", [], {}, True):
            self.invalid({"method": method}, "non-empty string")
        self.invalid({"parameters": {}}, "'method'")

    def test_parameters_not_an_object(self) -> None:
        for parameters in ([], [1], "x", 1, None, True):
            self.invalid({"method": "echo", "parameters": parameters}, "must be an object")

    def test_unknown_keys(self) -> None:
        self.invalid({"method": "echo", "params": {}}, "unknown key 'params'")
        self.invalid({"method": "echo", "parameters": {}, "id": 1}, "unknown key 'id'")

    def test_batch(self) -> None:
        batch = parse_envelope(
            {"batch": {"a": {"method": "echo"}, "b": {"method": "x", "parameters": {"y": 2}}}}, 32
        )
        assert isinstance(batch, Batch)
        self.assertEqual(batch.calls, {"a": Call("echo", {}), "b": Call("x", {"y": 2})})

    def test_batch_shape(self) -> None:
        for entries in ({}, [], [{"method": "echo"}], None, "x"):
            self.invalid({"batch": entries}, "non-empty object")
        self.invalid({"batch": {"a": {"method": "echo"}}, "method": "echo"}, "only the key")

    def test_batch_limit(self) -> None:
        entries = {str(i): {"method": "echo"} for i in range(33)}
        with self.assertRaises(BatchTooLargeError) as caught:
            parse_envelope({"batch": entries}, 32)
        self.assertEqual(caught.exception.status, 413)
        self.assertIn("33 calls", str(caught.exception))
        del entries["0"]
        self.assertEqual(len(parse_envelope({"batch": entries}, 32).calls), 32)  # type: ignore[union-attr]

    def test_bad_entries_kept_as_errors(self) -> None:
        batch = parse_envelope(
            {"batch": {"good": {"method": "echo"}, "bad": [1], "worse": {"method": "e", "x": 1}}},
            32,
        )
        assert isinstance(batch, Batch)
        self.assertEqual(batch.calls["good"], Call("echo", {}))
        self.assertIsInstance(batch.calls["bad"], InvalidEnvelopeError)
        self.assertIn("batch entry 'bad'", str(batch.calls["bad"]))
        self.assertIsInstance(batch.calls["worse"], InvalidEnvelopeError)

    def test_long_keys_truncated_in_messages(self) -> None:
        batch = parse_envelope({"batch": {"k" * 10_000: []}}, 32)
        assert isinstance(batch, Batch)
        (error,) = batch.calls.values()
        self.assertLess(len(str(error)), 200)
        with self.assertRaises(InvalidEnvelopeError):
            parse_call([])


def typed(handler: Any, n: int) -> int:
    return n + 1


class HTTPEnvelopeTests(SynchronousTestCase):
    def setUp(self) -> None:
        registry = MethodRegistry()
        registry.add("inc", typed)
        self.client = MethodClient(make_app(**OPEN_ACCESS, clock=Clock(), registry=registry))

    def post(self, value: Any) -> Response:
        return self.successResultOf(self.client.post(value))

    def assertError(self, response: Response, status: int, name: str) -> Dict[str, Any]:
        self.assertEqual(response.status, status, response.body)
        error: Dict[str, Any] = response.decoded()["error"]
        self.assertEqual(error["name"], name)
        return error

    def test_parameters_not_an_object(self) -> None:
        error = self.assertError(
            self.post({"method": "echo", "parameters": [1, 2]}), 400, "invalid_envelope"
        )
        self.assertIn("'parameters'", error["value"])

    def test_unknown_envelope_key(self) -> None:
        error = self.assertError(
            self.post({"method": "echo", "parameters": {}, "jsonrpc": "2.0"}),
            400,
            "invalid_envelope",
        )
        self.assertIn("'jsonrpc'", error["value"])

    def test_wrong_top_level(self) -> None:
        for value in ([], "echo", 3, None):
            self.assertError(self.post(value), 400, "invalid_envelope")

    def test_invalid_parameters(self) -> None:
        self.assertError(self.post({"method": "inc", "parameters": {}}), 400, "invalid_parameters")
        self.assertError(
            self.post({"method": "inc", "parameters": {"n": True}}), 400, "invalid_parameters"
        )

    def test_empty_batch(self) -> None:
        self.assertError(self.post({"batch": {}}), 400, "invalid_envelope")

    def test_batch_too_large_case_86(self) -> None:
        entries = {str(i): {"method": "echo"} for i in range(33)}
        error = self.assertError(self.post({"batch": entries}), 413, "batch_too_large")
        self.assertEqual(error["code"], 41301)

    def test_batch_at_the_limit(self) -> None:
        entries = {str(i): ("echo", {"i": i}) for i in range(32)}
        answers = self.successResultOf(self.client.batch(entries))
        self.assertEqual(answers, {str(i): {"i": i} for i in range(32)})

    def test_configured_batch_limit(self) -> None:
        client = MethodClient(make_app(**OPEN_ACCESS, clock=Clock(), max_batch_size=2))
        self.failureResultOf(client.batch({k: ("echo", {}) for k in "abc"}), BatchTooLargeError)

    def test_body_too_large_case_86(self) -> None:
        """
        A body over 64 KiB is refused 413 by the API itself (this StubTreq
        site has no limit of its own).
        """
        body = json.dumps({"method": "echo", "parameters": {"x": "a" * 65_536}}).encode()
        response = self.successResultOf(self.client.request("POST", body))
        self.assertError(response, 413, "body_too_large")

    def test_batch_entries_fail_on_their_own(self) -> None:
        answers = self.successResultOf(
            self.client.batch(
                {
                    "ok": ("echo", {"x": 1}),
                    "unknown": ("nope", {}),
                    "params": ("inc", {"n": "1"}),
                    "shape": {"method": "echo", "parameters": []},
                    "notcall": {"meth": "echo"},
                    "inc": ("inc", {"n": 1}),
                }
            )
        )
        self.assertEqual(answers["ok"], {"x": 1})
        self.assertEqual(answers["inc"], 2)
        self.assertIsInstance(answers["unknown"], UnknownMethodError)
        self.assertIsInstance(answers["params"], InvalidParametersError)
        self.assertIsInstance(answers["shape"], InvalidEnvelopeError)
        self.assertIsInstance(answers["notcall"], InvalidEnvelopeError)

    def test_batch_status_is_200_with_failing_entries(self) -> None:
        response = self.post({"batch": {"a": {"method": "nope"}}})
        self.assertEqual(response.status, 200)
        self.assertEqual(response.decoded()["batch"]["a"]["error"]["code"], 40400)


# ---------------------------------------------------------------------------
# The fuzz.

_CODES = {cls.code: cls for cls in all_errors()}

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
method_names = st.sampled_from(
    ["echo", "time.now", "inc", "nope", "__class__", "echo.__globals__", ""]
) | st.text(max_size=12)
calls = st.fixed_dictionaries(
    {},
    optional={
        "method": method_names | json_values,
        "parameters": st.dictionaries(st.text(max_size=8), json_values, max_size=4) | json_values,
        "extra": json_values,
    },
)
envelopes = (
    calls
    | st.fixed_dictionaries(
        {"batch": st.dictionaries(st.text(max_size=6), calls | json_values, max_size=6)}
    )
    | json_values
)
content_types = st.sampled_from(
    ["application/json", "application/msgpack", "text/plain", "application/x-msgpack"]
)
accepts = st.sampled_from(
    ["application/json", "application/msgpack", "*/*", "text/html", ""]
) | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)

fuzz = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FuzzTests(SynchronousTestCase):
    """
    Whatever arrives, the answer is never a 500 and always an envelope.
    """

    def setUp(self) -> None:
        registry = MethodRegistry()
        registry.add("inc", typed)
        self.client = MethodClient(make_app(**OPEN_ACCESS, clock=Clock(), registry=registry))

    def send(self, body: bytes, content_type: str, accept: str) -> Response:
        headers = {"Content-Type": content_type, "Accept": accept}
        return self.successResultOf(self.client.request("POST", body, headers=headers))

    def check(self, response: Response) -> Any:
        self.assertNotEqual(response.status, 500, response.body)
        self.assertLess(response.status, 500, response.body)
        decoded = response.decoded()
        self.assertIsInstance(decoded, dict)
        if response.status == 200:
            self.assertEqual(len(decoded), 1)
            if "batch" in decoded:
                for entry in decoded["batch"].values():
                    self.check_entry(entry)
            else:
                self.assertIn("result", decoded)
        else:
            self.assertEqual(set(decoded), {"error"})
            error = decoded["error"]
            self.assertEqual(set(error), {"code", "name", "value"})
            self.assertIn(error["code"], _CODES)
            self.assertEqual(error["code"] // 100, response.status)
            self.assertEqual(_CODES[error["code"]].name, error["name"])
        return decoded

    def check_entry(self, entry: Dict[str, Any]) -> None:
        self.assertEqual(len(entry), 1, entry)
        if "error" in entry:
            self.assertIn(entry["error"]["code"], _CODES)
            self.assertLess(entry["error"]["code"], 50000)
        else:
            self.assertIn("result", entry)

    @fuzz
    @given(body=st.binary(max_size=300), content_type=content_types, accept=accepts)
    def test_arbitrary_bytes(self, body: bytes, content_type: str, accept: str) -> None:
        self.check(self.send(body, content_type, accept))

    @fuzz
    @given(value=envelopes, accept=accepts)
    def test_arbitrary_json_values(self, value: Any, accept: str) -> None:
        body = json.dumps(value, allow_nan=True).encode()
        self.check(self.send(body, "application/json", accept))

    @fuzz
    @given(
        value=envelopes | st.binary() | st.lists(st.binary()),
        accept=accepts,
    )
    def test_arbitrary_msgpack_values(self, value: Any, accept: str) -> None:
        try:
            body = msgpack.packb(value, use_bin_type=True)
        except (OverflowError, ValueError):
            return  # integers msgpack cannot carry cannot be sent either
        self.check(self.send(body, "application/msgpack", accept))

    @settings(fuzz, max_examples=50)
    @given(parameters=st.dictionaries(st.text(max_size=8), json_values, max_size=5))
    def test_echo_round_trip(self, parameters: Dict[str, Any]) -> None:
        """
        Whatever JSON can carry comes back unchanged; what it cannot
        (non-finite numbers, integers beyond 64 bits) is a 400.
        """
        body = json.dumps({"method": "echo", "parameters": parameters}).encode()
        for accept in ("application/json", "application/msgpack"):
            response = self.send(body, "application/json", accept)
            decoded = self.check(response)
            if response.status == 200:
                self.assertTrue(_same(decoded["result"], parameters))
            else:
                self.assertEqual(decoded["error"]["name"], "invalid_json")
                self.assertFalse(_representable(parameters))

    @fuzz
    @given(key=st.text(max_size=50), method=method_names)
    def test_batch_keys_and_names(self, key: str, method: str) -> None:
        decoded = self.check(
            self.send(
                json.dumps({"batch": {key: {"method": method}}}).encode(),
                "application/json",
                "application/json",
            )
        )
        self.assertEqual(list(decoded["batch"]), [key])


def _representable(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value <= 2**64 - 1
    if isinstance(value, list):
        return all(_representable(v) for v in value)
    if isinstance(value, dict):
        return all(_representable(v) for v in value.values())
    return True


def _same(got: Any, sent: Any) -> bool:
    if isinstance(sent, float) and isinstance(got, float):
        return got == sent or (got == 0.0 and sent == 0.0)
    if isinstance(sent, list):
        return (
            isinstance(got, list)
            and len(got) == len(sent)
            and all(_same(g, s) for g, s in zip(got, sent))
        )
    if isinstance(sent, dict):
        return (
            isinstance(got, dict)
            and got.keys() == sent.keys()
            and all(_same(got[k], sent[k]) for k in sent)
        )
    return type(got) is type(sent) and got == sent  # type: ignore[no-any-return]
