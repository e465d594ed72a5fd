"""
Answering a ``twisted.web`` request with an error in the JSON envelope.

The one place that writes ``{"error": {"code", "name", "value"}}`` with its
status and headers for every route outside the JSON-method endpoint (which
also speaks msgpack).  It imports no Klein, so core modules that guard a
host's routes (`twistauth.access`) use it too.
"""

from __future__ import annotations

import json
from typing import Any

from twistauth.errors import TwistauthError


def render_error(request: Any, error: TwistauthError) -> bytes:
    """
    Set ``request``'s status and headers for ``error`` and return the body.
    """
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return json.dumps({"error": error.to_json()}).encode("utf-8")
