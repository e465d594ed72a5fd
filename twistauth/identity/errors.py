"""
The OpenID Connect errors: codes ``status*100 + n`` with ``n`` from 70 to 99.

Each says what went wrong without quoting what the provider or the browser
sent: an error's value may be shown to a client and written to a log, and
must never carry a code, a token, a verifier or a secret.

Errors a caller acts on:

  - 4xx: the browser's request (callback, logout token) is wrong; nothing was
    used.
  - `RefreshRejectedError`: the provider refused the refresh token (or sent
    back a different identity): the user's tokens are dead, end the session.
  - 502/503/504 (`ProviderBadResponseError`, `ProviderUnreachableError`,
    `ProviderUnavailableError`, `ProviderTimeoutError`, `LoginFailedError`):
    the provider misbehaved or is away; a refresh that fails this way is
    retried later and the session is kept.
"""

from __future__ import annotations

from typing import Optional

from twistauth.errors import TwistauthError


class IdentityError(TwistauthError):
    """
    Base of the OpenID Connect errors (never raised itself).
    """

    code = 50079
    name = "identity_error"
    status = 500
    default_message = "OpenID Connect error"


class InvalidStateError(IdentityError):
    """The callback's ``state`` is missing or belongs to no login of this browser."""

    code = 40070
    name = "invalid_state"
    status = 400
    default_message = "this login is unknown or was already used; start again"


class LoginExpiredError(IdentityError):
    """The login transaction is older than its lifetime."""

    code = 40071
    name = "login_expired"
    status = 400
    default_message = "this login took too long and expired; start again"


class IssuerMismatchError(IdentityError):
    """The callback's ``iss`` is not the transaction's issuer (RFC 9207), or is missing."""

    code = 40072
    name = "issuer_mismatch"
    status = 400
    default_message = "the authorization response came from the wrong issuer"


class InvalidTokenError(IdentityError):
    """An ID token failed validation: nothing from it was used."""

    code = 40073
    name = "invalid_token"
    status = 400
    default_message = "the identity provider's token is not valid"


class AuthorizationDeniedError(IdentityError):
    """
    The provider answered the authorization request with ``error=``.

    :ivar error: the provider's error code, restricted to RFC 6749's
        characters (safe to show, still HTML-escape it).
    :ivar description: the provider's ``error_description``, restricted the
        same way, or ``None``.
    """

    code = 40074
    name = "authorization_denied"
    status = 400
    default_message = "the identity provider did not authorize the login"

    def __init__(self, error: str = "access_denied", description: Optional[str] = None):
        super().__init__(f"the identity provider did not authorize the login ({error})")
        self.error = error
        self.description = description


class InvalidCallbackError(IdentityError):
    """The callback's query is malformed: no code, repeated parameters, implicit-flow tokens."""

    code = 40075
    name = "invalid_callback"
    status = 400
    default_message = "the login callback is malformed"


class LoginRejectedError(IdentityError):
    """The token endpoint refused the authorization code (``invalid_grant``)."""

    code = 40076
    name = "login_rejected"
    status = 400
    default_message = "the identity provider refused this login; start again"


class InvalidLogoutTokenError(InvalidTokenError):
    """A back-channel logout token failed validation (the route answers ``invalid_request``)."""

    code = 40077
    name = "invalid_logout_token"
    status = 400
    default_message = "the logout token is not valid"


class RefreshRejectedError(IdentityError):
    """
    The refresh token is dead (``invalid_grant``, ``invalid_client``), or the
    refreshed ID token names another identity: end the user's sessions.
    """

    code = 40170
    name = "refresh_rejected"
    status = 401
    default_message = "the login has ended; log in again"


class UnknownProviderError(IdentityError):
    """No identity provider of that name is configured."""

    code = 40470
    name = "unknown_provider"
    status = 404
    default_message = "no identity provider of that name"


class LoginFailedError(IdentityError):
    """The provider's token or UserInfo response failed our checks."""

    code = 50270
    name = "login_failed"
    status = 502
    default_message = "login failed: the identity provider answered badly"


class ProviderBadResponseError(IdentityError):
    """The provider answered with a bad status, too large a body, or not JSON."""

    code = 50271
    name = "provider_bad_response"
    status = 502
    default_message = "the identity provider answered badly"


class ProviderUnreachableError(IdentityError):
    """The provider could not be reached (connection, DNS or TLS failure)."""

    code = 50272
    name = "provider_unreachable"
    status = 502
    default_message = "the identity provider cannot be reached"


class ProviderUnavailableError(IdentityError):
    """The provider's metadata or keys cannot be had right now; retry later."""

    code = 50370
    name = "provider_unavailable"
    status = 503
    default_message = "the identity provider is unavailable; retry later"


class ProviderDisabledError(IdentityError):
    """The provider is misconfigured (issuer mismatch, plain-http endpoint) and disabled."""

    code = 50371
    name = "provider_disabled"
    status = 503
    default_message = "this identity provider is disabled by a configuration error"


class ProviderTimeoutError(IdentityError):
    """The provider did not answer within the deadline."""

    code = 50470
    name = "provider_timeout"
    status = 504
    default_message = "the identity provider did not answer in time"


TRANSIENT_ERRORS = (
    ProviderBadResponseError,
    ProviderUnreachableError,
    ProviderUnavailableError,
    ProviderTimeoutError,
    LoginFailedError,
)
"""Errors after which a refresh is retried later and the session kept."""
