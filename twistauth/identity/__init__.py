"""
OpenID Connect relying party: discovery, keys, token validation, login,
refresh and logout against one or several providers, on treq and an
injected clock.
"""

from twistauth.identity.client import (
    LoginResult,
    LoginStart,
    LogoutRedirect,
    RefreshResult,
    RelyingParty,
    TokenSet,
    Transaction,
    check_logout_state,
    pkce_challenge,
)
from twistauth.identity.config import ProviderConfig
from twistauth.identity.discovery import MetadataSource, ProviderMetadata
from twistauth.identity.http import ProviderHTTP, make_http_client
from twistauth.identity.jose import (
    JWTRules,
    LogoutRequest,
    jti_key,
    validate_id_token,
    validate_logout_token,
    verify_jwt,
)
from twistauth.identity.jwks import JsonWebKey, JWKSCache
from twistauth.identity.redirects import safe_return_path

__all__ = [
    "JWKSCache",
    "JWTRules",
    "JsonWebKey",
    "LoginResult",
    "LoginStart",
    "LogoutRedirect",
    "LogoutRequest",
    "MetadataSource",
    "ProviderConfig",
    "ProviderHTTP",
    "ProviderMetadata",
    "RefreshResult",
    "RelyingParty",
    "TokenSet",
    "Transaction",
    "check_logout_state",
    "jti_key",
    "make_http_client",
    "pkce_challenge",
    "safe_return_path",
    "validate_id_token",
    "validate_logout_token",
    "verify_jwt",
]
