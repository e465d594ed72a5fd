"""
The session caches' errors: numbers 35-39 of the sessions-and-transport
range (20-39) of `twistauth.errors`; the transport uses the lower numbers.

`SessionStoreUnavailableError` is what a client sees when the session store
(Redis) cannot be reached: a 503, never "no session", so an outage logs
nobody out.  `SessionTooLargeError` is a programming or configuration error
(a client-side session was asked to carry more than a cookie can hold); its
message names the way out.
"""

from __future__ import annotations

from typing import Any, Optional

from twistauth.errors import BackendUnavailableError, TwistauthError


class SessionStoreUnavailableError(BackendUnavailableError):
    """
    The session store (Redis) did not answer in time or is down; the client's
    session is not lost: retry later.
    """

    code = 50335
    name = "session_store_unavailable"
    status = 503
    default_message = "the session store is unavailable; your session is kept, retry shortly"

    def __init__(self, value: Any = None, *, retry_after: int = 2) -> None:
        super().__init__(value, headers={"Retry-After": str(retry_after)})


class SessionTooLargeError(TwistauthError):
    """
    A client-side session sealed to more bytes than its carrier (a cookie)
    can hold.

    :ivar size: the sealed size in bytes (carrier name included).
    :ivar limit: the limit it exceeded.
    """

    code = 50036
    name = "session_too_large"
    status = 500
    default_message = "the session is too large for a client-side session cookie"

    def __init__(self, value: Optional[str] = None, *, size: int = 0, limit: int = 0) -> None:
        self.size = size
        self.limit = limit
        if value is None:
            value = (
                f"the sealed session is {size} bytes, over the {limit}-byte limit of a "
                "client-side session cookie: store less in the session, or use a "
                'server-side session cache (session_cache = "memory", or '
                '"redis://host:port/db" for several processes)'
            )
        super().__init__(value)
