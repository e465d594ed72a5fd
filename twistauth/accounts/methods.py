"""
The built-in JSON methods of local password accounts: ``account.create``,
``account.login``, ``account.logout``, ``account.logout_everywhere``,
``account.change_password`` and ``session.info``.

Load them with the ``method_modules`` setting (``"twistauth.accounts.methods"``)
or ``registry.load("twistauth.accounts.methods")``.  They reach the user
store, the password hasher and the login throttle through
``handler.services`` (``users``, ``passwords``, ``throttle``), and the
session through the handler (``log_in`` renews the session id: an id from
before login never survives it).

A login answers the same error (`InvalidCredentialsError`, 401), with the
same body and in the same time, whether the user id is unknown, has no
password, or the password is wrong: unknown users are checked against a
dummy hash.  Failed attempts are throttled per account and per client
address (429 with ``Retry-After``).  Passwords are never logged.

Each login, logout and account change is a structured log event (fields
``event``, ``outcome``, ``reason``, ``user_id``, ``address``) carrying the
request's ``request_id``.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from twisted.logger import Logger

from twistauth.accounts._interfaces import ILoginThrottle, IUserStore, User, check_user_id
from twistauth.accounts._interfaces import modify_user as _modify_user
from twistauth.accounts.errors import AccountDisabledError, InvalidCredentialsError
from twistauth.accounts.passwords import PasswordHasher
from twistauth.errors import (
    AuthRequiredError,
    BackendUnavailableError,
    ForbiddenError,
    TwistauthError,
)
from twistauth.methods.registry import method
from twistauth.observe import RequestLogger, bind_request_id, request_id_of

log = Logger()


def _log(handler: Any) -> RequestLogger:
    """
    This module's logger, stamping the id of the handler's request.
    """
    return bind_request_id(log, request_id_of(handler.request))


def _parts(handler: Any) -> Tuple[IUserStore, PasswordHasher, ILoginThrottle]:
    services = handler.services
    users = getattr(services, "users", None)
    passwords = getattr(services, "passwords", None)
    throttle = getattr(services, "throttle", None)
    if users is None or passwords is None or throttle is None:
        raise BackendUnavailableError("local accounts are not enabled on this server")
    return users, passwords, throttle


def session_info(session: Any) -> Dict[str, Any]:
    """
    What ``session.info`` answers for a session (or ``None``): who is
    logged in, never the session id.
    """
    if session is None or session.user_id is None:
        return {"user_id": None, "roles": [], "authenticated_at": None, "permanent": False}
    return {
        "user_id": session.user_id,
        "roles": sorted(session.roles),
        "authenticated_at": session.authenticated_at,
        "permanent": bool(session.permanent),
    }


def _logged_in_user(handler: Any) -> str:
    session = handler.session
    if session is None or session.user_id is None:
        raise AuthRequiredError()
    return str(session.user_id)


async def check_password(handler: Any, user_id: str, password: str) -> User:
    """
    The user whose id and password these are, counting the attempt against
    the login throttle.  Unknown users, users without a password and wrong
    passwords all fail alike, in the same time.

    :raises PasswordPolicyError: the password is over the length limit.
    :raises LoginThrottledError: too many failures for the account or address.
    :raises InvalidCredentialsError: the id or the password is wrong.
    :raises AccountDisabledError: the password is right but the account disabled.
    """
    users, passwords, throttle = _parts(handler)
    passwords.policy.encode(password)  # over-long: 400 before any work
    address = handler.client_address
    attempt = await throttle.attempt(user_id, address)
    user = await users.get(user_id)
    password_hash = None if user is None else user.password_hash
    if user is None or password_hash is None:
        await passwords.verify_dummy(password)
        ok = False
    else:
        ok = await passwords.verify(password_hash, password)
    if user is None or password_hash is None or not ok:
        # Logged by the caller, with its outcome (login, password change).
        raise InvalidCredentialsError()
    if user.disabled:
        raise AccountDisabledError()
    await throttle.succeeded(attempt)
    if passwords.needs_rehash(password_hash):
        user = await _rehash(_log(handler), users, passwords, user, password)
    return user


async def _rehash(
    log: Logger, users: IUserStore, passwords: PasswordHasher, user: User, password: str
) -> User:
    """
    Store a hash with the current parameters (a failure only costs the
    upgrade, never the login).
    """
    old = user.password_hash
    try:
        new = await passwords.hash(password)

        def change(stored: User) -> User:
            if stored.password_hash != old:  # changed meanwhile: leave it
                return stored
            return stored.evolve(password_hash=new)

        user = await _modify_user(users, user.user_id, change)
        log.info("twistauth: password hash of {user_id} upgraded", user_id=user.user_id)
    except TwistauthError as e:
        log.warn(
            "twistauth: could not upgrade the password hash of {user_id}: {error}",
            user_id=user.user_id,
            error=e.name,
        )
    return user


@method("account.create")
async def create(handler: Any, user_id: str, password: str) -> Dict[str, Any]:
    """
    Create a local account and log in as it.  Answers like ``session.info``.
    Errors: ``invalid_user_id`` or ``password_policy`` (400), ``user_exists``
    (409), ``login_throttled`` (429: too many refused creations from this
    address).
    """
    if not handler.services.settings.account_signup:
        raise ForbiddenError("account creation is switched off on this server")
    users, passwords, throttle = _parts(handler)
    user_id = check_user_id(user_id)
    passwords.policy.check_new(password)
    address = handler.client_address
    attempt = await throttle.attempt(None, address)
    password_hash = await passwords.hash(password)
    # A refused creation (user_exists) stays counted against the address, so
    # probing for existing ids is throttled like guessing passwords.
    user = await users.create(User(user_id=user_id, password_hash=password_hash))
    await throttle.succeeded(attempt)
    _log(handler).info(
        "twistauth: account {user_id} created from {address}",
        user_id=user_id,
        address=address,
        event="account_created",
    )
    await handler.log_in(user.user_id, user.roles, permanent=False)
    return session_info(handler.session)


@method("account.login")
async def login(
    handler: Any, user_id: str, password: str, remember: bool = False
) -> Dict[str, Any]:
    """
    Log in with a user id and password; ``remember``: keep the session
    after the browser closes.  The session gets a new id.  Answers like
    ``session.info``.  Errors: ``invalid_credentials`` (401, for an unknown
    user and a wrong password alike), ``account_disabled`` (403),
    ``login_throttled`` (429, with ``Retry-After``).
    """
    user_id = check_user_id(user_id)
    try:
        user = await check_password(handler, user_id, password)
    except TwistauthError as e:
        _log(handler).info(
            "twistauth: login of {user_id} from {address} failed: {reason}",
            user_id=user_id,
            address=handler.client_address,
            event="login",
            outcome="failure",
            reason=e.name,
            kind="password",
        )
        raise
    await handler.log_in(user.user_id, user.roles, permanent=remember)
    _log(handler).info(
        "twistauth: {user_id} logged in from {address}",
        user_id=user.user_id,
        address=handler.client_address,
        event="login",
        outcome="success",
        kind="password",
    )
    return session_info(handler.session)


@method("account.logout")
async def logout(handler: Any) -> None:
    """
    End this session (logged in or not).
    """
    session = handler.session
    user_id = session.user_id if session is not None else None
    await handler.log_out()
    if user_id is not None:
        _log(handler).info(
            "twistauth: {user_id} logged out", user_id=user_id, event="logout", kind="password"
        )


@method("account.logout_everywhere")
async def logout_everywhere(handler: Any) -> Dict[str, Any]:
    """
    End every session of the logged-in user, this one included, on every
    process.  Answers ``{"ended": n}`` (-1 when the count is unknown, for
    client-side sessions, which are revoked).  Needs a logged-in session.
    """
    user_id = _logged_in_user(handler)
    ended = await handler.log_out_everywhere(user_id)
    await handler.log_out()
    _log(handler).info(
        "twistauth: {user_id} logged out everywhere",
        user_id=user_id,
        event="logout_everywhere",
        ended=ended,
    )
    return {"ended": ended}


@method("account.change_password")
async def change_password(handler: Any, old_password: str, new_password: str) -> Dict[str, Any]:
    """
    Change the logged-in user's password.  Every other session of the user
    ends, and this one continues under a new id.  Answers like
    ``session.info``.  Errors: ``auth_required`` (401), ``password_policy``
    (400), ``invalid_credentials`` (401: the old password is wrong),
    ``login_throttled`` (429).
    """
    users, passwords, _ = _parts(handler)
    user_id = _logged_in_user(handler)
    passwords.policy.check_new(new_password)
    permanent = bool(handler.session.permanent)
    try:
        user = await check_password(handler, user_id, old_password)
    except TwistauthError as e:
        _log(handler).info(
            "twistauth: password change of {user_id} from {address} refused: {reason}",
            user_id=user_id,
            address=handler.client_address,
            event="password_change",
            outcome="failure",
            reason=e.name,
        )
        raise
    new_hash = await passwords.hash(new_password)
    user = await _modify_user(users, user_id, lambda u: u.evolve(password_hash=new_hash))
    # End every session, this one too, then continue in a fresh one.
    await handler.log_out_everywhere(user_id, reason="password_changed")
    await handler.log_out()
    await handler.log_in(user_id, user.roles, permanent=permanent)
    _log(handler).info(
        "twistauth: {user_id} changed their password",
        user_id=user_id,
        event="password_change",
        outcome="success",
    )
    return session_info(handler.session)


@method("session.info")
def info(handler: Any) -> Dict[str, Any]:
    """
    Who this session belongs to: ``user_id`` (null when anonymous),
    ``roles``, ``authenticated_at`` (clock seconds) and ``permanent``.
    Never the session id.
    """
    return session_info(handler.session)


__all__ = [
    "change_password",
    "check_password",
    "create",
    "info",
    "login",
    "logout",
    "logout_everywhere",
    "session_info",
]
