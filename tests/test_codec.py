"""
Tests for `twistauth.methods.codec` and how the API uses it: JSON and
msgpack in and out, content negotiation, and every malformed body answering
400 (never 500; checklist case 97).
"""

from __future__ import annotations

import json
import random
from typing import Any, Dict, Optional

import msgpack
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twistauth.app import make_app
from twistauth.errors import InvalidJSONError, NotAcceptableError, TooDeepError
from twistauth.methods import codec as codec_module
from twistauth.methods.codec import (
    JSON,
    MSGPACK,
    json_depth_exceeds,
    request_codec,
    response_codec,
)
from twistauth.testing._client import MethodClient, Response


def nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


class DepthScanTests(SynchronousTestCase):
    def test_boundary(self) -> None:
        for depth in (1, 5, 32):
            body = json.dumps(nested(depth)).encode()
            self.assertFalse(json_depth_exceeds(body, depth), depth)
            self.assertTrue(json_depth_exceeds(body, depth - 1), depth)

    def test_objects_and_arrays_count_alike(self) -> None:
        body = b'{"a":[{"b":[1]}]}'
        self.assertFalse(json_depth_exceeds(body, 4))
        self.assertTrue(json_depth_exceeds(body, 3))

    def test_brackets_in_strings_do_not_count(self) -> None:
        body = json.dumps({"a": "[" * 1000 + "{" * 1000, "b": ['\\"[[[[', "]]]"]}).encode()
        self.assertFalse(json_depth_exceeds(body, 2))
        self.assertTrue(json_depth_exceeds(body, 1))

    def test_siblings_do_not_add_up(self) -> None:
        body = json.dumps([[1]] * 500).encode()
        self.assertFalse(json_depth_exceeds(body, 2))

    def test_huge_inputs(self) -> None:
        """
        Case 97's inputs, which make CPython's ``json`` raise RecursionError.
        """
        self.assertTrue(json_depth_exceeds(b"[" * 1000, 32))
        self.assertTrue(json_depth_exceeds(b'{"a":' * 5000, 32))
        with self.assertRaises(TooDeepError):
            JSON.decode(b"[" * 100_000, 256)
        with self.assertRaises(TooDeepError):
            JSON.decode(b'{"a":' * 5000 + b"1" + b"}" * 5000, 256)


class DecodeTests(SynchronousTestCase):
    def test_json_round_trip(self) -> None:
        value = {"a": [1, 2.5, "\u00e9\U0001f600", None, True], "b": {}}
        self.assertEqual(JSON.decode(JSON.encode(value), 32), value)
        self.assertEqual(JSON.encode({"x": "\u00e9"}), '{"x":"\u00e9"}'.encode())

    def test_msgpack_round_trip(self) -> None:
        value = {"a": [1, 2.5, "\u00e9", None, True, -(2**63), 2**64 - 1], "b": {}}
        self.assertEqual(MSGPACK.decode(MSGPACK.encode(value), 32), value)

    def bad_json(self, body: bytes, fragment: str) -> None:
        with self.assertRaises(InvalidJSONError) as caught:
            JSON.decode(body, 32)
        self.assertIn(fragment, str(caught.exception))

    def test_constants_rejected(self) -> None:
        for constant in (b"NaN", b"Infinity", b"-Infinity"):
            self.bad_json(b'{"x":' + constant + b"}", "not valid JSON")

    def test_overflowing_numbers_rejected(self) -> None:
        self.bad_json(b"[1e400]", "out of range")
        self.bad_json(b"[-1e400]", "out of range")
        self.bad_json(b"[" + b"9" * 400 + b".0]", "out of range")
        self.bad_json(b"[18446744073709551616]", "out of range")
        self.bad_json(b"[-9223372036854775809]", "out of range")
        self.bad_json(b"[" + b"1" * 5000 + b"]", "not valid JSON")
        self.assertEqual(
            JSON.decode(b"[18446744073709551615,-9223372036854775808,1e308]", 32),
            [2**64 - 1, -(2**63), 1e308],
        )

    def test_invalid_utf8(self) -> None:
        self.bad_json(b'{"method":"\xff"}', "not UTF-8")
        self.bad_json(b'{"method":"\xed\xa0\x80"}', "not UTF-8")

    def test_lone_surrogate_escape(self) -> None:
        self.bad_json(b'["\\ud800"]', "surrogate")
        self.bad_json(b'["\\uDC00x"]', "surrogate")
        self.assertEqual(JSON.decode(b'["\\ud83d\\ude00"]', 32), ["\U0001f600"])
        self.assertEqual(JSON.decode(b'["\\\\ud800"]', 32), ["\\ud800"])

    def test_not_json(self) -> None:
        for body in (b"", b"{", b"{'a': 1}", b"[1,]", b"\xef\xbb\xbf{}", b"{} {}"):
            with self.assertRaises(InvalidJSONError, msg=repr(body)):
                JSON.decode(body, 32)

    def test_built_in_decoder_answers_as_the_careful_one(self) -> None:
        """
        PyPy decodes through its built-in decoder when a body cannot hold a
        number out of range: every body decodes to the same values (and
        types, and float bits), or fails with the same message, as through
        the careful decoder.  Run on both interpreters.
        """
        rng = random.Random(97)
        bodies = [
            b'{"method":"echo","parameters":{"x":1}}',
            b'["NaN", "Infinity", "1234567890123456789012", "1e999"]',
            b"[NaN]",
            b"[-Infinity]",
            b"[1e308, 1e-307, 1E+308, 2.5e-5, -0.0, -0]",
            b"[1e309]",
            b"[1E+0400]",
            b"[18446744073709551615, -9223372036854775808]",
            b"[18446744073709551616]",
            b"[999999999999999999, -999999999999999999]",
            b"[" + b"9" * 400 + b".0]",
            b"[" + b"1" * 5000 + b"]",
            b'{"a":1,"a":2}',
            b' {"a": [1, 2, {"b": null}]} ',
            b'["\\u00e9\\ud83d\\ude00", "\\\\u0000"]',
            b'["a\x01b"]',
            b'"a\\u0001b"',
            b'"tab\\there"',
            b'"raw\tcontrol"',
            b"",
            b"{",
            b"[1,]",
            b"{} {}",
            b"\xef\xbb\xbf{}",
            b"[01]",
            b"[.5]",
            b"[1.]",
            b"[true, false, null, TRUE]",
        ]
        for _ in range(500):
            number = rng.uniform(-1e6, 1e6) * 10 ** rng.randrange(-300, 300)
            bodies.append(b"[%r, %.17g, %d]" % (number, number, rng.randrange(-(10**18), 10**18)))
        for body in bodies:
            text = body.decode("utf-8")
            outcomes = []
            for decode in (codec_module._pypy_decode, codec_module._careful_decode):
                try:
                    outcomes.append(("value", repr(decode(text, body))))
                except ValueError as e:
                    outcomes.append(("error", str(e)))
            self.assertEqual(outcomes[0], outcomes[1], body[:80])

    def test_msgpack_rejects_what_json_cannot_say(self) -> None:
        for value, fragment in [
            ({b"method": "echo"}, "not a string"),
            ({1: "x"}, "not valid msgpack"),
            ([b"bytes"], "bytes"),
            ([msgpack.ExtType(5, b"x")], "ExtType"),
            ([float("nan")], "NaN"),
            ([float("inf")], "NaN"),
        ]:
            body = msgpack.packb(value, use_bin_type=True, strict_types=False)
            with self.assertRaises(InvalidJSONError, msg=repr(value)) as caught:
                MSGPACK.decode(body, 32)
            self.assertIn(fragment, str(caught.exception))

    def test_msgpack_garbage(self) -> None:
        for body in (b"", b"\xc1", b"\x92\x01", b"\x81\xa1a", b"\xa2\xff\xfe", b"\x01\x02"):
            with self.assertRaises(InvalidJSONError, msg=repr(body)):
                MSGPACK.decode(body, 32)

    def test_msgpack_depth(self) -> None:
        self.assertEqual(MSGPACK.decode(MSGPACK.encode(nested(32)), 32), nested(32))
        with self.assertRaises(TooDeepError):
            MSGPACK.decode(MSGPACK.encode(nested(33)), 32)
        with self.assertRaises((TooDeepError, InvalidJSONError)):
            MSGPACK.decode(b"\x91" * 60_000 + b"\xc0", 256)


class NegotiationTests(SynchronousTestCase):
    def test_request_codec(self) -> None:
        for header in (
            b"application/msgpack",
            b"application/x-msgpack",
            b"Application/VND.msgpack; charset=binary",
        ):
            self.assertIs(request_codec(header), MSGPACK, header)
        for header in (None, b"application/json", b"text/plain", b"", b"application/x-www-form"):
            self.assertIs(request_codec(header), JSON, header)

    def test_response_codec(self) -> None:
        for header, codec in [
            (None, JSON),
            (b"", JSON),
            (b"*/*", JSON),
            (b"application/*", JSON),
            (b"application/json", JSON),
            (b"text/html, */*;q=0.1", JSON),
            (b"application/msgpack", MSGPACK),
            (b"application/x-msgpack", MSGPACK),
            (b"application/msgpack, application/json", MSGPACK),
            (b"application/json, application/msgpack", JSON),
            (b"application/json;q=0, application/msgpack", MSGPACK),
            (b"application/msgpack;q=0.5, application/json", JSON),
            (b"application/json;q=0.4, application/msgpack;q=0.9", MSGPACK),
            (b"text/html, application/xhtml+xml, */*;q=0.8", JSON),
        ]:
            self.assertIs(response_codec(header), codec, header)

    def test_not_acceptable(self) -> None:
        for header in (
            b"text/html",
            b"image/png, text/*",
            b"application/xml",
            b"application/json;q=0",
            b"*/*;q=0, application/msgpack;q=0",
        ):
            with self.assertRaises(NotAcceptableError):
                response_codec(header)


class HTTPCodecTests(SynchronousTestCase):
    """
    The same, through the HTTP stack.
    """

    def setUp(self) -> None:
        self.client = MethodClient(make_app(clock=Clock()))

    def post(self, body: bytes, headers: Optional[Dict[str, str]] = None) -> Response:
        sent = {"Content-Type": "application/json", "Accept": "application/json"}
        sent.update(headers or {})
        return self.successResultOf(self.client.request("POST", body, headers=sent))

    def assertError(self, response: Response, status: int, name: str) -> Dict[str, Any]:
        self.assertEqual(response.status, status, response.body)
        error = response.decoded()["error"]
        self.assertEqual(error["name"], name, error)
        return error  # type: ignore[no-any-return]

    def test_json_in_json_out(self) -> None:
        response = self.post(b'{"method":"echo","parameters":{"x":[1,"\xc3\xa9"]}}')
        self.assertEqual(response.status, 200)
        self.assertEqual(response.content_type, "application/json")
        self.assertEqual(response.decoded(), {"result": {"x": [1, "\u00e9"]}})
        self.assertEqual(response.header("cache-control"), "no-store")
        self.assertEqual(response.header("x-content-type-options"), "nosniff")

    def test_no_content_type_is_json(self) -> None:
        """
        ``curl -d`` sends a form content type; the body is still JSON.
        """
        response = self.post(
            b'{"method":"echo","parameters":{"x":1}}',
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual(response.decoded(), {"result": {"x": 1}})

    def test_msgpack_in_msgpack_out(self) -> None:
        body = msgpack.packb({"method": "echo", "parameters": {"x": [1, "\u00e9", 2.5]}})
        response = self.post(
            body, {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.content_type, "application/msgpack")
        self.assertEqual(msgpack.unpackb(response.body), {"result": {"x": [1, "\u00e9", 2.5]}})

    def test_msgpack_in_json_out(self) -> None:
        body = msgpack.packb({"method": "echo", "parameters": {"x": 1}})
        response = self.post(body, {"Content-Type": "application/x-msgpack"})
        self.assertEqual(response.content_type, "application/json")
        self.assertEqual(response.decoded(), {"result": {"x": 1}})

    def test_json_in_msgpack_out(self) -> None:
        response = self.post(
            b'{"method":"echo","parameters":{"x":1}}', {"Accept": "application/msgpack"}
        )
        self.assertEqual(msgpack.unpackb(response.body), {"result": {"x": 1}})

    def test_client_codecs(self) -> None:
        for codec in ("json", "msgpack"):
            client = MethodClient(make_app(clock=Clock()), codec=codec)
            self.assertEqual(self.successResultOf(client.call("echo", x=[1])), {"x": [1]})

    def test_errors_in_the_accepted_format(self) -> None:
        response = self.post(b"{", {"Accept": "application/msgpack"})
        self.assertEqual(response.status, 400)
        self.assertEqual(msgpack.unpackb(response.body)["error"]["name"], "invalid_json")

    def test_not_acceptable(self) -> None:
        response = self.post(b'{"method":"echo"}', {"Accept": "text/html"})
        error = self.assertError(response, 406, "not_acceptable")
        self.assertEqual(error["code"], 40600)
        self.assertEqual(response.content_type, "application/json")

    def test_not_acceptable_for_get(self) -> None:
        response = self.successResultOf(
            self.client.request("GET", headers={"Accept": "image/png"})
        )
        self.assertError(response, 406, "not_acceptable")

    def test_constants(self) -> None:
        for constant in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
            body = b'{"method":"echo","parameters":{"x":' + constant + b"}}"
            self.assertError(self.post(body), 400, "invalid_json")

    def test_invalid_utf8(self) -> None:
        error = self.assertError(self.post(b'{"method":"ech\xff"}'), 400, "invalid_json")
        self.assertIn("UTF-8", error["value"])

    def test_lone_surrogate(self) -> None:
        body = b'{"method":"echo","parameters":{"x":"\\udfff"}}'
        for accept in ("application/json", "application/msgpack"):
            response = self.post(body, {"Accept": accept})
            self.assertEqual(response.status, 400)

    def test_big_integer_cannot_break_msgpack_answer(self) -> None:
        body = b'{"method":"echo","parameters":{"x":' + b"9" * 30 + b"}}"
        response = self.post(body, {"Accept": "application/msgpack"})
        self.assertEqual(response.status, 400)
        self.assertEqual(msgpack.unpackb(response.body)["error"]["name"], "invalid_json")

    def test_too_deep_case_97(self) -> None:
        """
        Case 97: ``'['*1000`` and ``'{"a":'*5000`` answer 400 too_deep.
        """
        for body in (b"[" * 1000, b'{"a":' * 5000):
            error = self.assertError(self.post(body), 400, "too_deep")
            self.assertEqual(error["code"], 40003)

    def test_depth_limit_boundary(self) -> None:
        """
        The body's own object and ``parameters`` count: 30 more levels fit a
        limit of 32, 31 do not.
        """
        for depth, status in ((30, 200), (31, 400)):
            body = json.dumps({"method": "echo", "parameters": {"x": nested(depth)}})
            self.assertEqual(self.post(body.encode()).status, status, depth)

    def test_brackets_inside_strings(self) -> None:
        body = json.dumps({"method": "echo", "parameters": {"x": "[" * 5000}}).encode()
        response = self.post(body)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.decoded()["result"]["x"], "[" * 5000)

    def test_msgpack_too_deep(self) -> None:
        body = msgpack.packb({"method": "echo", "parameters": {"x": nested(40)}})
        response = self.post(body, {"Content-Type": "application/msgpack"})
        self.assertError(response, 400, "too_deep")

    def test_configured_depth(self) -> None:
        client = MethodClient(make_app(clock=Clock(), max_json_depth=4))
        body = json.dumps({"method": "echo", "parameters": {"x": [[1]]}}).encode()
        self.assertEqual(self.successResultOf(client.request("POST", body)).status, 200)
        body = json.dumps({"method": "echo", "parameters": {"x": [[[1]]]}}).encode()
        self.assertEqual(self.successResultOf(client.request("POST", body)).status, 400)
