"""
Built-in methods every twistauth server answers when it keeps sessions.
"""

from __future__ import annotations

import secrets
from typing import Any, Dict

from twistauth.methods.handler import Handler
from twistauth.methods.registry import method


@method("session.enable_signing")
async def enable_signing(handler: Handler) -> Dict[str, Any]:
    """
    Make the caller's session sign its requests, and hand over the key.
    From then on every request of this session must be signed (an unsigned
    one is refused, never downgraded); a signed call to this method again
    replaces the key.

    The key is 256 random bits, URL-safe base64.  See ``docs/protocol.rst``
    for what to sign.
    """
    session = await handler.ensure_session()
    key = secrets.token_urlsafe(32)
    session.set_signing_key(key)
    return {"signing_key": key, "algorithm": "HMAC-SHA256"}
