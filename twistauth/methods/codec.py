"""
Body codecs: JSON (the default) and msgpack, with the limits a server needs.

Decoding never raises anything but `InvalidJSONError` or `TooDeepError`:
Python's ``json`` raises ``RecursionError`` near 1000 levels of nesting, so
depth is checked before decoding (cheaply: a body with fewer opening brackets
than the limit cannot be too deep).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional

import attr
import msgpack

from twistauth.errors import InvalidJSONError, NotAcceptableError, TooDeepError

JSON_TYPE = b"application/json"
MSGPACK_TYPE = b"application/msgpack"
_MSGPACK_NAMES = (b"application/msgpack", b"application/x-msgpack", b"application/vnd.msgpack")
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_json_decode = json.JSONDecoder(parse_constant=_no_constants).decode
_json_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


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


def _structure_depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


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
        return _json_decode(text)
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
        value = msgpack.unpackb(body, raw=False, strict_map_key=True, max_buffer_size=len(body))
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise InvalidJSONError(f"the body is not valid msgpack: {e}") from None
    if _structure_depth_exceeds(value, max_depth):
        raise TooDeepError(f"the body nests arrays and maps deeper than {max_depth} levels")
    return value


def _encode_msgpack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


JSON = Codec(JSON_TYPE, _decode_json, _encode_json)
MSGPACK = Codec(MSGPACK_TYPE, _decode_msgpack, _encode_msgpack)


def request_codec(content_type: Optional[bytes]) -> Codec:
    """
    The codec of a request body: msgpack when its Content-Type says so,
    otherwise JSON (so ``curl -d '{...}'`` works).
    """
    if content_type is not None and content_type.split(b";", 1)[0].strip().lower() in _MSGPACK_NAMES:
        return MSGPACK
    return JSON


def response_codec(accept: Optional[bytes]) -> Codec:
    """
    The codec of a response, from the request's Accept header: msgpack when
    it is asked for before JSON, JSON when it is acceptable or nothing is said.

    :raises NotAcceptableError: the client accepts neither.
    """
    if accept is None:
        return JSON
    accept = accept.lower()
    msgpack_at = min((accept.find(name) for name in _MSGPACK_NAMES if name in accept), default=-1)
    json_at = accept.find(b"json")
    if msgpack_at >= 0 and (json_at < 0 or msgpack_at < json_at):
        return MSGPACK
    if json_at >= 0 or b"*/*" in accept or b"application/*" in accept or not accept.strip():
        return JSON
    raise NotAcceptableError(
        "the Accept header allows neither application/json nor application/msgpack"
    )
