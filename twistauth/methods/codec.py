"""
Body codecs: JSON (the default) and msgpack, with the limits a server needs.

Decoding never raises anything but `InvalidJSONError` or `TooDeepError`:
Python's ``json`` raises ``RecursionError`` near 1000 levels of nesting, so
depth is checked before decoding (cheaply: a body with fewer opening brackets
than the limit cannot be too deep).
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any, Callable, Dict, Optional

import attr
import msgpack

from twistauth.errors import InvalidJSONError, NotAcceptableError, TooDeepError

JSON_TYPE = b"application/json"
MSGPACK_TYPE = b"application/msgpack"
_MSGPACK_NAMES = (b"application/msgpack", b"application/x-msgpack", b"application/vnd.msgpack")
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_INT_RANGE = (-(2**63), 2**64 - 1)
"""Integers a request may hold: what msgpack can carry, so any request value can be answered."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text[:40]} is out of range")
    return number


def _bounded_int(text: str) -> int:
    number = int(text)
    if not _INT_RANGE[0] <= number <= _INT_RANGE[1]:
        raise ValueError(f"the integer {text[:40]}... is out of range (64 bits at most)")
    return number


_json_decode = json.JSONDecoder(
    parse_constant=_no_constants, parse_float=_finite_float, parse_int=_bounded_int
).decode

_MAYBE_OUT_OF_RANGE = re.compile(rb"NaN|Infinity|\d{19}|[eE][-+]?\d{3}")
"""What a body holds before any of its numbers can be out of range: a
constant, 19 digits in a row (the least an integer beyond 64 bits takes;
a float too long to be exact), or an exponent of three digits (the least
an infinite float takes).  Strings may hold them too: then the body is
merely decoded the careful way."""


def _pypy_decode(text: str, body: bytes) -> Any:
    """
    `_json_decode`'s answer, through PyPy's built-in decoder when the body
    cannot hold a number out of range: a decoder with hooks (as
    `_json_decode` has) runs PyPy's pure-Python scanner, which took about
    an eighth of a JSON call's time on PyPy (vmprof).  Anything the
    built-in decoder refuses is decoded again by `_json_decode`, so errors
    read the same.
    """
    if _MAYBE_OUT_OF_RANGE.search(body) is None:
        try:
            return json.loads(text)
        except ValueError:
            pass
    return _json_decode(text)


def _careful_decode(text: str, body: bytes) -> Any:
    """
    `_json_decode`'s answer (``body`` is the undecoded ``text``, unused).
    """
    return _json_decode(text)


# On CPython the hooks cost less than the extra scan of the body.
_decode_text = _pypy_decode if sys.implementation.name == "pypy" else _careful_decode

# No check for circular references (a map of the containers seen, kept on
# every call): a circular answer recurses until ``RecursionError``, which
# the endpoint answers as it does every value it cannot encode.
_json_encode = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
).encode


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """
    Whether the JSON text ``body`` nests arrays and objects deeper than ``limit``.
    Brackets inside strings do not count.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for match in _TOKENS.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def _check_structure(value: Any, limit: int) -> None:
    """
    Check a decoded msgpack value: nesting within ``limit``, and only what
    JSON can say (string keys; no binary, extension or non-finite values), so
    methods see the same data whichever format a client speaks.

    :raises TooDeepError: nested too deeply.
    :raises InvalidJSONError: a value JSON has no form for.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                raise TooDeepError(
                    f"the body nests arrays and maps deeper than {limit} levels"
                )
            if isinstance(item, dict):
                if not all(type(key) is str for key in item):
                    raise InvalidJSONError("the body has a map key that is not a string")
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidJSONError("the body holds a NaN or infinite number")
        elif item is not None and not isinstance(item, (str, int)):
            raise InvalidJSONError(
                f"the body holds a msgpack {type(item).__name__}; only JSON's types are accepted"
            )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Codec:
    """
    One body format.
    """

    content_type: bytes
    decode: Callable[[bytes, int], Any]
    """``decode(body, max_depth)``: raises InvalidJSONError or TooDeepError."""
    encode: Callable[[Any], bytes]
    """Raises ``TypeError`` or ``ValueError`` for values it cannot encode."""


def _decode_json(body: bytes, max_depth: int) -> Any:
    if json_depth_exceeds(body, max_depth):
        raise TooDeepError(f"the body nests arrays and objects deeper than {max_depth} levels")
    try:
        text = body.decode("utf-8")
        value = _decode_text(text, body)
        if _SURROGATE_ESCAPE.search(body) is not None:
            # "\ud800" alone decodes to a str that cannot be encoded again.
            _json_encode(value).encode("utf-8")
        return value
    except UnicodeEncodeError:
        raise InvalidJSONError("the body holds a lone UTF-16 surrogate escape") from None
    except UnicodeDecodeError:
        raise InvalidJSONError("the body is not UTF-8") from None
    except ValueError as e:
        raise InvalidJSONError(f"the body is not valid JSON: {e}") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise TooDeepError("the body nests too deeply") from None


def _encode_json(value: Any) -> bytes:
    return _json_encode(value).encode("utf-8")


def _decode_msgpack(body: bytes, max_depth: int) -> Any:
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise InvalidJSONError(f"the body is not valid msgpack: {e}") from None
    _check_structure(value, max_depth)
    return value


def _encode_msgpack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


JSON = Codec(JSON_TYPE, _decode_json, _encode_json)
MSGPACK = Codec(MSGPACK_TYPE, _decode_msgpack, _encode_msgpack)


def request_codec(content_type: Optional[bytes]) -> Codec:
    """
    The codec of a request body: msgpack when its Content-Type says so,
    otherwise JSON (so ``curl -d '{...}'`` works).
    """
    if (
        content_type is not None
        and content_type.split(b";", 1)[0].strip().lower() in _MSGPACK_NAMES
    ):
        return MSGPACK
    return JSON


_ACCEPT_CACHE: Dict[bytes, Codec] = {}


def response_codec(accept: Optional[bytes]) -> Codec:
    """
    The codec of a response, from the request's Accept header (RFC 9110
    quality values honoured): msgpack when it is preferred, JSON when it is
    at least as acceptable or nothing is said.

    :raises NotAcceptableError: the client accepts neither.
    """
    if accept is None:
        return JSON
    codec = _ACCEPT_CACHE.get(accept)
    if codec is None:
        codec = _negotiate(accept)
        if len(_ACCEPT_CACHE) < 256:
            _ACCEPT_CACHE[accept] = codec
    if codec is _NEITHER:
        raise NotAcceptableError(
            "the Accept header allows neither application/json nor application/msgpack"
        )
    return codec


_NEITHER = Codec(b"", _decode_json, _encode_json)


def _negotiate(accept: bytes) -> Codec:
    """
    Choose by quality: the best of JSON and msgpack; on a tie, the one the
    client named first.
    """
    json_q = msgpack_q = -1.0
    msgpack_first = False
    for item in accept.lower().split(b","):
        media, _, parameters = item.partition(b";")
        media = media.strip()
        q = 1.0
        for parameter in parameters.split(b";"):
            name, _, value = parameter.partition(b"=")
            if name.strip() == b"q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        if media in _MSGPACK_NAMES:
            msgpack_first = msgpack_first or json_q < 0
            msgpack_q = max(msgpack_q, q)
        elif media in (b"application/json", b"*/*", b"application/*") or media.endswith(b"+json"):
            json_q = max(json_q, q)
    if not accept.strip():
        return JSON
    if msgpack_q > 0 and (msgpack_q > json_q or (msgpack_q == json_q and msgpack_first)):
        return MSGPACK
    if json_q > 0:
        return JSON
    return _NEITHER
