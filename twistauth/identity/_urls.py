"""
URL checks shared by the provider configuration and discovery: endpoints
are absolute ``https`` URLs, except on loopback hosts (development, tests).
"""

from __future__ import annotations

import ipaddress
from typing import Mapping, Sequence, Tuple

import hyperlink


class URLProblem(ValueError):
    """A URL is malformed or not allowed; the message says why."""


def is_loopback_host(host: str) -> bool:
    """
    Whether ``host`` names this machine: ``localhost`` (and ``*.localhost``)
    or a loopback IP address (127.0.0.0/8, ::1).
    """
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint_url(url: object, what: str) -> bool:
    """
    Check a provider endpoint URL.

    :param url: the URL as configured or discovered.
    :param what: its name for the message ("token_endpoint").
    :return: ``True`` when it is a plain-http loopback URL (allowed, but
        worth a warning), ``False`` for https.
    :raises URLProblem: not a string, not absolute, has a fragment or user
        info, or plain http to another host.
    """
    if not isinstance(url, str) or not url:
        raise URLProblem(f"{what} must be a URL string, got {type(url).__name__}")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise URLProblem(f"{what} contains whitespace or control characters")
    try:
        parsed = hyperlink.URL.from_text(url)
    except hyperlink.URLParseError:
        raise URLProblem(f"{what} is not a valid URL: {url!r}") from None
    if not parsed.absolute or not parsed.host:
        raise URLProblem(f"{what} must be an absolute URL: {url!r}")
    if parsed.fragment or parsed.userinfo:
        raise URLProblem(f"{what} must have no fragment and no user info: {url!r}")
    if parsed.scheme == "https":
        return False
    if parsed.scheme == "http" and is_loopback_host(parsed.host):
        return True
    raise URLProblem(
        f"{what} must use https (plain http is allowed for loopback hosts only): {url!r}"
    )


def add_query(url: str, params: Sequence[Tuple[str, str]]) -> str:
    """
    Append query parameters to ``url`` (keeping the ones it has), encoded as
    ``application/x-www-form-urlencoded`` would encode them.

    :param url: an absolute URL.
    :param params: ``(name, value)`` pairs, in order.
    :return: the URL as ASCII text.
    """
    parsed = hyperlink.DecodedURL.from_text(url)
    for name, value in params:
        parsed = parsed.add(name, value)
    text: str = parsed.to_uri().to_text()
    return text


def query_dict(url: str) -> Mapping[str, str]:
    """
    The query parameters of ``url`` (the last value of each), decoded.
    """
    parsed = hyperlink.DecodedURL.from_text(url)
    return {k: (v or "") for k, v in parsed.query}
