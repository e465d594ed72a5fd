"""
The errors of local password accounts (codes ``status * 100 + n``, ``n`` in
40-59).

Start-up problems with the user file are not client errors: they raise
`UserFileError`, a plain exception whose message names the file.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from twistauth.errors import TwistauthError


class PasswordPolicyError(TwistauthError):
    """A new password does not meet the policy (too short, too long, not text)."""

    code = 40040
    name = "password_policy"
    status = 400
    default_message = "the password does not meet the password policy"


class InvalidUserIdError(TwistauthError):
    """A user id is empty, too long, or contains control characters."""

    code = 40041
    name = "invalid_user_id"
    status = 400
    default_message = (
        "the user id must be 1 to 256 printable characters without leading or trailing spaces"
    )


class InvalidCredentialsError(TwistauthError):
    """
    The user id or the password is wrong.  One error, one message and one
    timing for both, so a client cannot tell which (checklist case 93).
    """

    code = 40140
    name = "invalid_credentials"
    status = 401
    default_message = "the user id or the password is wrong"


class AccountDisabledError(TwistauthError):
    """
    The account is disabled.  Only answered after the right password, so it
    tells nothing to someone who does not know it.
    """

    code = 40340
    name = "account_disabled"
    status = 403
    default_message = "this account is disabled"


class UnknownUserError(TwistauthError):
    """No user has this id (answered to administrative calls, never to a login)."""

    code = 40440
    name = "unknown_user"
    status = 404
    default_message = "no user has this id"


class UserExistsError(TwistauthError):
    """A user with this id already exists."""

    code = 40940
    name = "user_exists"
    status = 409
    default_message = "a user with this id already exists; choose another user id"


class UserConflictError(TwistauthError):
    """
    The user record changed since it was read (another request saved it
    first).  Read it again and retry; `twistauth.accounts.modify_user` does.
    """

    code = 40941
    name = "user_conflict"
    status = 409
    default_message = "the account was changed by another request; retry"


class LoginThrottledError(TwistauthError):
    """
    Too many failed logins for this account or from this address; the
    ``Retry-After`` header says when to try again.

    :ivar retry_after: whole seconds until an attempt is allowed again.
    """

    code = 42940
    name = "login_throttled"
    status = 429
    default_message = "too many failed attempts; retry later"

    def __init__(
        self,
        value: Any = None,
        *,
        retry_after: float = 1.0,
        headers: Optional[Dict[str, str]] = None,
    ) -> None:
        self.retry_after = max(1, int(math.ceil(retry_after)))
        if value is None:
            value = f"too many failed attempts; retry in {self.retry_after} seconds"
        super().__init__(
            value, headers=dict(headers or {}, **{"Retry-After": str(self.retry_after)})
        )


class PasswordHasherBusyError(TwistauthError):
    """
    Too many password hashes are queued (a burst of logins); retry shortly.
    """

    code = 50340
    name = "password_hasher_busy"
    status = 503
    default_message = "the server is busy checking passwords; retry in a second"

    def __init__(self, value: Any = None, *, headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(value, headers=dict(headers or {}, **{"Retry-After": "1"}))


class UserFileError(Exception):
    """
    The YAML user file cannot be used: unreadable, not valid YAML, or not in
    the expected shape.  Raised at start-up (`YAMLUserStore.check`); the
    message names the file and says what is wrong.

    :ivar path: the file's path.
    """

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        super().__init__(f"user file {path}: {problem}")


__all__ = [
    "AccountDisabledError",
    "InvalidCredentialsError",
    "InvalidUserIdError",
    "LoginThrottledError",
    "PasswordHasherBusyError",
    "PasswordPolicyError",
    "UnknownUserError",
    "UserConflictError",
    "UserExistsError",
    "UserFileError",
]
