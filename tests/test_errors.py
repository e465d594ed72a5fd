"""
Tests for `twistauth.errors`: the error tree, its codes and its JSON form.
"""

from __future__ import annotations

import gc
import re

from twisted.trial.unittest import SynchronousTestCase

from twistauth import errors
from twistauth.errors import (
    BodyTooLargeError,
    InvalidJSONError,
    TwistauthError,
    UnknownMethodError,
    all_errors,
)

# The protocol's codes are a public contract: clients switch on them.  A
# change here is a breaking change and must be deliberate.
STABLE_CODES = {
    "internal_error": 50000,
    "bad_request": 40000,
    "invalid_json": 40001,
    "invalid_envelope": 40002,
    "too_deep": 40003,
    "invalid_parameters": 40004,
    "auth_required": 40100,
    "forbidden": 40300,
    "unknown_method": 40400,
    "not_found": 40401,
    "method_not_allowed": 40500,
    "not_acceptable": 40600,
    "request_timeout": 40800,
    "body_too_large": 41300,
    "batch_too_large": 41301,
    "unsupported_media_type": 41500,
    "rate_limited": 42900,
    "bad_gateway": 50200,
    "backend_unavailable": 50300,
    "gateway_timeout": 50400,
}


def _own_errors() -> list:
    """
    The error classes defined in `twistauth.errors` itself.
    """
    return [cls for cls in all_errors() if cls.__module__ == errors.__name__]


class ErrorTreeTests(SynchronousTestCase):
    def test_stable_codes(self) -> None:
        """
        The protocol errors keep their published codes.
        """
        found = {cls.name: cls.code for cls in _own_errors()}
        self.assertEqual(found, STABLE_CODES)

    def test_code_is_status_times_100_plus_n(self) -> None:
        """
        Every error's code tells its HTTP status: ``status * 100 + n``.
        """
        for cls in all_errors():
            self.assertEqual(cls.code // 100, cls.status, cls)
            self.assertGreaterEqual(cls.status, 400, cls)
            self.assertLess(cls.status, 600, cls)

    def test_foundation_codes_in_protocol_range(self) -> None:
        """
        The errors of the protocol and server use ``n`` from 0 to 19 only.
        """
        for cls in _own_errors():
            self.assertLess(cls.code % 100, 20, cls)

    def test_codes_and_names_unique(self) -> None:
        """
        No two errors share a code or a name.
        """
        classes = all_errors()
        codes = [cls.code for cls in classes]
        names = [cls.name for cls in classes]
        self.assertEqual(len(codes), len(set(codes)), sorted(codes))
        self.assertEqual(len(names), len(set(names)), sorted(names))

    def test_names_snake_case_and_messages(self) -> None:
        """
        Names are snake_case; every error has a default message.
        """
        for cls in all_errors():
            self.assertRegex(cls.name, re.compile(r"\A[a-z][a-z0-9_]*\Z"))
            self.assertTrue(cls.default_message, cls)

    def test_all_errors_sorted_by_code(self) -> None:
        codes = [cls.code for cls in all_errors()]
        self.assertEqual(codes, sorted(codes))
        self.assertIs(all_errors()[0], errors.BadRequestError)

    def test_all_errors_finds_subclasses_anywhere(self) -> None:
        """
        An area's own error, defined in another module, is found too (and
        subclasses of subclasses).
        """

        class AreaError(BodyTooLargeError):
            code = 41399
            name = "test_area_error"

        self.assertIn(AreaError, all_errors())
        del AreaError
        gc.collect()
        self.assertNotIn("test_area_error", [cls.name for cls in all_errors()])


class ErrorValueTests(SynchronousTestCase):
    def test_default_message(self) -> None:
        error = UnknownMethodError()
        self.assertEqual(error.value, UnknownMethodError.default_message)
        self.assertEqual(str(error), UnknownMethodError.default_message)

    def test_to_json(self) -> None:
        """
        The JSON form is code, name and value (a message or an object).
        """
        self.assertEqual(
            InvalidJSONError("bad").to_json(),
            {"code": 40001, "name": "invalid_json", "value": "bad"},
        )
        detail = {"field": "x", "why": "missing"}
        self.assertEqual(InvalidJSONError(detail).to_json()["value"], detail)

    def test_headers_are_per_instance(self) -> None:
        """
        Headers given to one error do not leak into another.
        """
        given = {"Retry-After": "5"}
        first = TwistauthError(headers=given)
        first.headers["X-More"] = "1"
        self.assertEqual(given, {"Retry-After": "5"})
        self.assertEqual(TwistauthError().headers, {})

    def test_internal_error_is_the_base(self) -> None:
        self.assertIs(errors.InternalError, TwistauthError)
        self.assertEqual(TwistauthError().status, 500)
