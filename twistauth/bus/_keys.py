"""
Bus keys and messages: what is accepted, and their canonical JSON forms.

A key is an immutable value: ``str``, ``bytes``, ``int`` (not ``bool``), or a
tuple of keys.  Its canonical form is JSON that keeps those types apart
(``bytes`` become ``{"b": base64}``, tuples become arrays) so that the Redis
bus can carry a key between processes and rebuild exactly the same key.

A message is any JSON value.  It is encoded once when it is sent, and every
waiter receives the decoded copy: the same value on every backend (tuples
arrive as lists, as they would through Redis), and never the sender's own
object, which the sender may go on changing.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Tuple

from twistauth.bus.errors import BusKeyError, BusMessageError

Key = Any
"""A bus key: ``str``, ``bytes``, ``int`` or a tuple of keys."""

MAX_MESSAGE_BYTES = 64 * 1024
"""The largest message, JSON-encoded, the bus carries."""

_MAX_KEY_DEPTH = 8


def check_key(key: Any, _depth: int = 0) -> Key:
    """
    Return ``key`` if it is a valid bus key.

    :raises BusKeyError: it is not.
    """
    kind = type(key)
    if kind is str or kind is bytes or kind is int:
        return key
    if kind is tuple and _depth < _MAX_KEY_DEPTH:
        for part in key:
            check_key(part, _depth + 1)
        return key
    raise BusKeyError(
        f"a bus key is a str, bytes, int or tuple of those, not {kind.__name__}"
    )


def check_keys(keys: Any) -> Tuple[Key, ...]:
    """
    The distinct keys of ``keys``, in order.

    :raises BusKeyError: ``keys`` is a single str/bytes, empty, or holds an
        invalid key.
    """
    if isinstance(keys, (str, bytes)):
        raise BusKeyError("wait_for_keys takes a sequence of keys, not one key")
    out = tuple(dict.fromkeys(check_key(k) for k in keys))
    if not out:
        raise BusKeyError("wait_for_keys needs at least one key")
    return out


def encode_key(key: Key) -> Any:
    """
    The canonical JSON form of a valid key.
    """
    if type(key) is bytes:
        return {"b": base64.b64encode(key).decode("ascii")}
    if type(key) is tuple:
        return [encode_key(part) for part in key]
    return key


def decode_key(form: Any, _depth: int = 0) -> Key:
    """
    The key a canonical JSON form names.

    :raises BusKeyError: ``form`` is not such a form.
    """
    kind = type(form)
    if kind is str or kind is int:
        return form
    if kind is list and _depth < _MAX_KEY_DEPTH:
        return tuple(decode_key(part, _depth + 1) for part in form)
    if kind is dict and len(form) == 1 and type(form.get("b")) is str:
        try:
            return base64.b64decode(form["b"], validate=True)
        except ValueError:
            pass
    raise BusKeyError("not a canonical key form")


def key_digest(key: Key) -> str:
    """
    A short stable hex digest of a key: names its Redis channel without
    putting the key (which may hold a secret) on the wire in clear.
    """
    text = json.dumps(encode_key(key), separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def encode_message(message: Any) -> str:
    """
    The JSON text of a message.

    :raises BusMessageError: it is not JSON-serialisable, or is larger than
        `MAX_MESSAGE_BYTES`.
    """
    try:
        text = json.dumps(message, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise BusMessageError(f"bus messages must be JSON values: {e}") from None
    if len(text) > MAX_MESSAGE_BYTES:
        raise BusMessageError(
            f"the message is {len(text)} bytes of JSON; at most {MAX_MESSAGE_BYTES} are carried"
        )
    return text


def freeze_message(message: Any) -> Any:
    """
    Check a message and return the copy waiters receive.

    :raises BusMessageError: as `encode_message`.
    """
    kind = type(message)
    if message is None or kind is bool or kind is int or kind is str:
        if kind is str and len(message) > MAX_MESSAGE_BYTES:
            encode_message(message)
        return message
    return json.loads(encode_message(message))
