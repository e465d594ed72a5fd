"""
The notification bus: waits on keys with timeouts, and the notifications
that wake them, in one process (`MemoryBus`) or across processes over Redis
(`twistauth.bus.redis_bus.RedisBus`, imported on first use: importing
txredisapi installs the default reactor); logout waiters on top of it
(`LogoutWatcher`, `publish_logout`); the JSON-method helpers are in
`twistauth.bus.handlers`.
"""

from typing import TYPE_CHECKING, Any

from twistauth.bus._interfaces import IBus
from twistauth.bus.errors import (
    BusKeyError,
    BusMessageError,
    BusTimeoutError,
    InvalidTimeoutError,
    ShuttingDownError,
    TooManyWaitersError,
    WaitersFullError,
)
from twistauth.bus.logout import (
    LogoutWatcher,
    provider_key,
    publish_logout,
    session_key,
    user_key,
)
from twistauth.bus.memory import FIRST_BATCH, MemoryBus

if TYPE_CHECKING:  # pragma: no cover
    from twistauth.bus.redis_bus import RedisBus


def __getattr__(name: str) -> Any:
    if name == "RedisBus":
        from twistauth.bus.redis_bus import RedisBus

        return RedisBus
    raise AttributeError(f"module 'twistauth.bus' has no attribute {name!r}")


__all__ = [
    "FIRST_BATCH",
    "BusKeyError",
    "BusMessageError",
    "BusTimeoutError",
    "IBus",
    "InvalidTimeoutError",
    "LogoutWatcher",
    "MemoryBus",
    "RedisBus",
    "ShuttingDownError",
    "TooManyWaitersError",
    "WaitersFullError",
    "provider_key",
    "publish_logout",
    "session_key",
    "user_key",
]
