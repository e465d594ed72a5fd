"""
The bus's errors: the 60-69 range of `twistauth.errors`.

Client-facing errors (`InvalidTimeoutError`, `TooManyWaitersError`,
`WaitersFullError`, `ShuttingDownError`, `BusTimeoutError` when a method lets
it escape) are `twistauth.errors.TwistauthError` subclasses and answer in
the error envelope.  Programming errors (a key or message of the wrong type)
are `TypeError` subclasses raised where they are made.
"""

from __future__ import annotations

from twistauth.errors import TwistauthError


class BusTimeoutError(TwistauthError):
    """
    A wait on the bus reached its deadline before any notification.
    """

    code = 50460
    name = "wait_timed_out"
    status = 504
    default_message = "no notification arrived before the wait's deadline"


class InvalidTimeoutError(TwistauthError):
    """
    A wait's ``timeout`` parameter is not a non-negative number of seconds.
    """

    code = 40061
    name = "invalid_timeout"
    status = 400
    default_message = "timeout must be a non-negative number of seconds, such as 25 or 2.5"


class TooManyWaitersError(TwistauthError):
    """
    This session already has as many pending waits as it may.
    """

    code = 42962
    name = "too_many_waiters"
    status = 429
    default_message = (
        "this session already has the most pending waits it may have; "
        "close another tab's wait or retry later"
    )


class WaitersFullError(TwistauthError):
    """
    The server already holds as many waits as it may.
    """

    code = 42963
    name = "waiters_full"
    status = 429
    default_message = "the server holds the most pending waits it may; retry later"


class ShuttingDownError(TwistauthError):
    """
    The server is shutting down and takes no new waits.
    """

    code = 50364
    name = "shutting_down"
    status = 503
    default_message = "the server is shutting down; retry on another server"


class BusKeyError(TypeError):
    """
    A bus key is not a str, bytes, int, or a tuple of those.
    """


class BusMessageError(TypeError):
    """
    A bus message is not a JSON-serialisable value, or is too large.
    """


__all__ = [
    "BusKeyError",
    "BusMessageError",
    "BusTimeoutError",
    "InvalidTimeoutError",
    "ShuttingDownError",
    "TooManyWaitersError",
    "WaitersFullError",
]
