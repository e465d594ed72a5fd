"""
Where a browser may be sent after login: same-origin paths, or an allowlist.

`safe_return_path` is the only gate for a user-supplied ``next``: anything
it does not recognise as harmless becomes ``"/"`` (checklist #13).  It is
deliberately stricter than URL parsing, because browsers are laxer than
parsers: they treat ``\\`` as ``/``, drop tabs and newlines inside URLs, and
read ``//host`` as another origin.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import hyperlink

from twistauth.identity._urls import is_loopback_host

MAX_RETURN_LENGTH = 2048

_VISIBLE_ASCII = re.compile(r"^[\x21-\x7e]+$")
# "//", "/\", and the same with dots or encoded separators in between:
# what some browser or proxy may read as a new authority or a path escape.
_DOUBLE_SEPARATOR = re.compile(r"[/\\](?:\.{1,2})?[/\\]")
# Percent-encoded "/", "\", "." and control characters: a second decoding
# (a proxy, a framework) would turn them into the above.
_ENCODED_DANGER = re.compile(r"%(?:2f|5c|2e|[01][0-9a-f]|7f|25)", re.IGNORECASE)


def _safe_path(text: str) -> bool:
    path = text.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/") or path.startswith("//"):
        return False
    if "\\" in text or _DOUBLE_SEPARATOR.search(path) or _ENCODED_DANGER.search(path):
        return False
    return True


def _origin(url: Any) -> str:
    port = url.port
    default = {"http": 80, "https": 443}.get(url.scheme)
    host = url.host.lower()
    return f"{url.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def safe_return_path(value: Any, *, allowed_origins: Iterable[str] = ()) -> str:
    """
    The post-login destination to use for a requested ``next``.

    Accepted: a same-origin absolute path (``/a/b?c#d``) made only of visible
    ASCII, with no ``//``, ``/\\``, ``/./``, ``/../``, backslash, or encoded
    separator or control character in its path; or an absolute ``https`` URL
    (``http`` for loopback hosts) whose origin is in ``allowed_origins``, with
    no user info and the same path rules.  Everything else, including
    ``javascript:`` and ``data:`` URLs, protocol-relative ``//host``, CR/LF
    and tabs, becomes ``"/"``.

    :param value: the requested destination (a ``str``; anything else is ``"/"``).
    :param allowed_origins: origins such as ``"https://app.example.com"``
        that absolute destinations may point to.
    :return: ``value`` unchanged when accepted, else ``"/"``.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_RETURN_LENGTH:
        return "/"
    if not _VISIBLE_ASCII.match(value):
        return "/"
    if value.startswith("/"):
        return value if _safe_path(value) else "/"
    origins = {o.lower().rstrip("/") for o in allowed_origins}
    if not origins or not re.match(r"^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:[/?#]|$)", value):
        return "/"
    try:
        url = hyperlink.URL.from_text(value)
    except (hyperlink.URLParseError, ValueError):
        return "/"
    if url.userinfo or not url.host:
        return "/"
    if url.scheme == "http" and not is_loopback_host(url.host):
        return "/"
    if _origin(url) not in origins:
        return "/"
    rest = value[len(value.split("://", 1)[0]) + 3:]
    path_start = min([i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0]
                     or [len(rest)])
    path = rest[path_start:] or "/"
    if path.startswith(("?", "#")):
        path = "/" + path
    return value if _safe_path(path) else "/"
