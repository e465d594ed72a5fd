"""
How cache keys are made: names, canonical parameters, hashes.

A value key is ``v:<namespace generation>[:<user generation>]:<method>:<user
hash or ->:<parameter hash>``.  The parameters are canonical JSON (keys
sorted, no spaces, ASCII only, no NaN) so that ``{"a": 1, "b": 2}`` and
``{"b": 2, "a": 1}`` share an entry; user ids and parameters are hashed
(BLAKE2b, 128 bits) so a key's length is bounded and holds nothing a client
sent verbatim.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable, Optional, Tuple

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*\Z")

_canonical = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
).encode


def canonical(value: Any) -> str:
    """
    The canonical JSON text of ``value``.

    :raises TypeError: a value JSON has no form for (bytes, sets, objects),
        or a mapping key that is not a string.
    :raises ValueError: a NaN or infinite number, or a circular reference.
    """
    if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
        raise TypeError("mapping keys must be strings")
    return _canonical(value)


def encode_value(value: Any) -> str:
    """
    A method result as stored: compact JSON, ASCII only (so Redis can answer
    it on one status line), no NaN.

    :raises TypeError: or ``ValueError``: it is not JSON.
    """
    return _canonical(value)


def digest(text: str) -> str:
    """
    A 128-bit hex digest of ``text``.
    """
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def user_hash(user_id: Optional[str]) -> Optional[str]:
    """
    The hash that stands for a user in keys (``None`` for anonymous callers).
    """
    return None if user_id is None else digest("user\x00" + str(user_id))


def check_namespace(name: Any, what: str = "namespace") -> str:
    """
    :raises ValueError: ``name`` is not a dotted identifier.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid {what} {name!r}: use dotted identifiers such as 'profile' or "
            f"'app.feed' (letters, digits, '_'; each part starting with a letter)"
        )
    return name


def check_namespaces(names: Any, what: str) -> Tuple[str, ...]:
    """
    :raises ValueError: not a list of namespaces (a bare string is refused).
    """
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise ValueError(f"{what} must be a list of namespaces such as ['feed'], got {names!r}")
    return tuple(dict.fromkeys(check_namespace(n, f"namespace in {what}") for n in names))


def generation_key(namespace: str, user: Optional[str] = None) -> str:
    """
    The name of a namespace's generation, or of a user's within it.
    """
    if user is None:
        return "g:" + namespace
    return "g:" + namespace + ":u:" + user


def value_suffix(method: str, user: Optional[str], parameters: Any) -> str:
    """
    The generation-free part of a value key.

    :raises TypeError: or ``ValueError``: the parameters are not canonical JSON.
    """
    return f"{method}:{user or '-'}:{digest(canonical(parameters))}"
