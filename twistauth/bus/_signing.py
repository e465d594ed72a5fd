"""
Sealing bus messages: HMAC-SHA256 under a key derived from the deployment
key, bound to the channel, so that a Redis client without the key cannot
forge a notification (a forged logout, or a forged "still logged in").

Wire form: 64 hex digits of MAC, then the JSON body.  The MAC covers the
channel name and the body, so a sealed message cannot be replayed on another
key's channel; the body carries a timestamp and a random id, so the
receiver can refuse stale and repeated messages.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional

_PURPOSE = b"twistauth bus message v1"
_MAC_CHARS = 64


def derive_key(deployment_key: bytes) -> bytes:
    """
    The bus's own key: a deployment key used for nothing else directly.

    :raises ValueError: the deployment key is not 32 bytes.
    """
    if not isinstance(deployment_key, bytes) or len(deployment_key) != 32:
        raise ValueError("the bus needs a 32-byte deployment key")
    return hmac.new(deployment_key, _PURPOSE, hashlib.sha256).digest()


def seal(key: bytes, channel: bytes, body: bytes) -> bytes:
    """
    The wire form of ``body`` on ``channel``.
    """
    mac = hmac.new(key, channel + b"\n" + body, hashlib.sha256).hexdigest()
    return mac.encode("ascii") + body


def unseal(key: bytes, channel: bytes, wire: bytes) -> Optional[bytes]:
    """
    The body of a sealed message, or ``None`` if its MAC is wrong (compared
    in constant time).
    """
    if len(wire) <= _MAC_CHARS:
        return None
    mac, body = wire[:_MAC_CHARS], wire[_MAC_CHARS:]
    expected = hmac.new(key, channel + b"\n" + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, expected.encode("ascii")):
        return None
    return body
