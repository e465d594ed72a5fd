"""
What every session cache shares: ids, timeouts, and the stored form of a
`Session`.

The caches differ in where a session lives; the rules here do not: an id is
256 random bits from `secrets`, a session is live while it is within both its
idle and its absolute timeout measured on the cache's clock, and a session's
state is JSON (never pickle), encoded one key at a time so a cache can store
just the keys that changed.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Dict, Mapping, Sequence

import attr
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from twistauth import redisconn
from twistauth.sessions._interfaces import Session
from twistauth.sessions.errors import SessionStoreUnavailableError

#: Random bytes in a session id or CSRF token (256 bits; the floor is 128).
ID_BYTES = 32

_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_-]{43}\Z")

#: The session's own fields, as `Session.fields` names them, minus ``id``
#: and ``version``, which every cache stores its own way.
FIELD_NAMES = (
    "created",
    "last_seen",
    "user_id",
    "roles",
    "authenticated_at",
    "permanent",
    "issuer",
    "provider_sid",
    "csrf_token",
    "signing_key",
)


def new_id() -> str:
    """
    A fresh session id or CSRF token: `ID_BYTES` bytes from `secrets`,
    URL-safe base64 without padding (43 characters).
    """
    return secrets.token_urlsafe(ID_BYTES)


def is_session_id(token: Any) -> bool:
    """
    Whether ``token`` has the shape of an id made by `new_id`: lets a
    server-side cache answer "no session" for garbage without asking its
    backend.
    """
    return isinstance(token, str) and _ID_PATTERN.match(token) is not None


def new_session(now: float, permanent: bool = False) -> Session:
    """
    A new anonymous, never-saved session (``version`` 0) created at ``now``.
    """
    return Session(
        id=new_id(),
        created=now,
        last_seen=now,
        permanent=permanent,
        csrf_token=new_id(),
    )


def _positive(instance: Any, attribute: Any, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _fraction(instance: Any, attribute: Any, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{attribute.name} must be in [0, 1), got {value!r}")


@attr.s(kw_only=True, frozen=True)
class Timeouts:
    """
    How long a session lives.

    :ivar idle: seconds a session survives without being used.
    :ivar absolute: seconds a session survives after its creation, however
        much it is used.
    :ivar touch_fraction: a use is recorded (``last_seen`` written) only when
        the recorded one is older than this fraction of ``idle``, so a
        session in constant use costs no write per request.  The price: a
        session may expire up to ``touch_fraction * idle`` seconds earlier
        than ``idle`` after its last use, never later.
    """

    idle: float = attr.ib(default=1800.0, converter=float, validator=_positive)
    absolute: float = attr.ib(default=43200.0, converter=float, validator=_positive)
    touch_fraction: float = attr.ib(default=0.1, converter=float, validator=_fraction)

    @property
    def touch_after(self) -> float:
        """
        Seconds after which a use is worth recording.
        """
        return self.idle * self.touch_fraction

    def remaining(self, created: float, last_seen: float, now: float) -> float:
        """
        Seconds the session has left at ``now`` (zero or less: expired).
        """
        return min(last_seen + self.idle, created + self.absolute) - now

    def live(self, created: float, last_seen: float, now: float) -> bool:
        """
        Whether the session is within both timeouts at ``now``.
        """
        return self.remaining(created, last_seen, now) > 0

    def touch_due(self, last_seen: float, now: float) -> bool:
        """
        Whether a use at ``now`` should be recorded.
        """
        return now - last_seen >= self.touch_after


def dump_value(key: str, value: Any) -> str:
    """
    One state value as compact JSON.

    :raises TypeError: the value is not JSON-serialisable (or is NaN or an
        infinity): the same for every cache, so code that works with the
        memory cache works with the others.
    """
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"session value {key!r} is not JSON-serialisable: {e}") from None


def copy_json(value: Any) -> Any:
    """
    A copy of a decoded JSON value that shares no mutable part with it
    (strings, numbers, booleans and ``None`` are immutable, so shared): a
    fifth of what decoding the value again costs.
    """
    kind = type(value)
    if kind is dict:
        copied = value.copy()
        for key, item in copied.items():
            if type(item) is dict or type(item) is list:
                copied[key] = copy_json(item)
        return copied
    if kind is list:
        return [copy_json(item) for item in value]
    return value


def dump_fields(session: Session) -> Dict[str, str]:
    """
    The session's own fields (`FIELD_NAMES`), each as JSON.
    """
    fields = session.fields()
    return {name: json.dumps(fields[name], separators=(",", ":")) for name in FIELD_NAMES}


def load_session(
    session_id: str, fields: Mapping[str, Any], data: Dict[str, Any], version: int
) -> Session:
    """
    Rebuild a `Session` from decoded fields and state (as a cache stored
    them); it starts with no recorded changes.
    """
    return Session(
        id=session_id,
        created=float(fields["created"]),
        last_seen=float(fields["last_seen"]),
        user_id=fields.get("user_id"),
        roles=fields.get("roles") or (),
        authenticated_at=fields.get("authenticated_at"),
        permanent=bool(fields.get("permanent")),
        issuer=fields.get("issuer"),
        provider_sid=fields.get("provider_sid"),
        csrf_token=fields.get("csrf_token") or "",
        signing_key=fields.get("signing_key"),
        version=version,
        data=data,
    )


def run_store_script(
    redis: Any,
    clock: IReactorTime,
    timeout: float,
    script: redisconn.Script,
    keys: Sequence[str],
    args: Sequence[str],
) -> Deferred[Any]:
    """
    Run a Lua script of the Redis session store (the cache or its
    revocation records) with its deadline: an outage fails it with
    `SessionStoreUnavailableError`, as every call of the store does.
    """
    return redisconn.run_script(
        redis,
        script,
        keys,
        args,
        clock=clock,
        timeout=timeout,
        what="the session store (Redis)",
        unavailable=SessionStoreUnavailableError,
    )
