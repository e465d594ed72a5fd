"""
Provider metadata: OpenID Connect Discovery 1.0, checked before it is trusted.

`MetadataSource` fetches ``{issuer}/.well-known/openid-configuration`` once
(concurrent callers share the fetch), applies the configured endpoint
overrides and checks the result:

  - the document's ``issuer`` equals the configured issuer exactly
    (Discovery §4.3; checklist #36);
  - every endpoint and the ``jwks_uri`` is https, or plain http on a loopback
    host (a warning is logged) (#37).

A provider failing a check is **disabled**: one clear log line, and every
later call fails with `ProviderDisabledError` (503) until the process is
restarted with a fixed configuration.  A provider that merely cannot be
reached fails with `ProviderUnavailableError` (503) and is asked again, at
most once per ``retry_after`` seconds.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import attr
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twistauth.identity._urls import URLProblem, check_endpoint_url
from twistauth.identity.config import ProviderConfig
from twistauth.identity.errors import (
    IdentityError,
    ProviderBadResponseError,
    ProviderDisabledError,
    ProviderUnavailableError,
)
from twistauth.identity.http import ProviderHTTP

log = Logger(namespace="twistauth.identity.discovery")

WELL_KNOWN = "/.well-known/openid-configuration"


def discovery_url(issuer: str) -> str:
    """
    Where an issuer's metadata lives: the issuer without its trailing slash,
    then ``/.well-known/openid-configuration`` (Discovery §4).
    """
    return issuer.rstrip("/") + WELL_KNOWN


@attr.s(frozen=True, kw_only=True)
class ProviderMetadata:
    """
    What twistauth uses of a provider's metadata, checked.

    :ivar issuer: equal to the configured issuer.
    :ivar authorization_endpoint: where the browser is sent to log in.
    :ivar token_endpoint: where codes and refresh tokens are exchanged.
    :ivar jwks_uri: the provider's signing keys.
    :ivar userinfo_endpoint: or ``None``.
    :ivar end_session_endpoint: RP-initiated logout, or ``None``.
    :ivar iss_parameter_supported: ``authorization_response_iss_parameter_supported``:
        the callback must then carry ``iss`` (RFC 9207).
    :ivar id_token_signing_alg_values_supported: as published (empty: not published).
    :ivar token_endpoint_auth_methods_supported: as published.
    :ivar backchannel_logout_supported: as published.
    :ivar backchannel_logout_session_supported: as published.
    :ivar loopback_http: some endpoint is plain http on a loopback host.
    """

    issuer: str = attr.ib()
    authorization_endpoint: str = attr.ib()
    token_endpoint: str = attr.ib()
    jwks_uri: str = attr.ib()
    userinfo_endpoint: Optional[str] = attr.ib(default=None)
    end_session_endpoint: Optional[str] = attr.ib(default=None)
    iss_parameter_supported: bool = attr.ib(default=False)
    id_token_signing_alg_values_supported: Tuple[str, ...] = attr.ib(default=())
    token_endpoint_auth_methods_supported: Tuple[str, ...] = attr.ib(default=())
    backchannel_logout_supported: bool = attr.ib(default=False)
    backchannel_logout_session_supported: bool = attr.ib(default=False)
    loopback_http: bool = attr.ib(default=False)


_ENDPOINTS = ("authorization_endpoint", "token_endpoint", "jwks_uri",
              "userinfo_endpoint", "end_session_endpoint")
_REQUIRED = ("authorization_endpoint", "token_endpoint", "jwks_uri")


def _str_list(document: Any, key: str) -> Tuple[str, ...]:
    value = document.get(key)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def parse_metadata(document: Any, config: ProviderConfig) -> ProviderMetadata:
    """
    Check a provider's metadata document against its configuration.

    :param document: the decoded JSON (``{}`` when discovery is off).
    :param config: the provider's configuration; its endpoint overrides win.
    :return: the checked metadata.
    :raises ProviderDisabledError: the issuer differs, an endpoint is
        missing, malformed or plain http off loopback.  The message says which.
    """
    if not isinstance(document, dict):
        raise ProviderDisabledError(f"provider {config.name!r}: the metadata is not a JSON object")
    if config.discovery:
        issuer = document.get("issuer")
        if not isinstance(issuer, str) or issuer != config.issuer:
            raise ProviderDisabledError(
                f"provider {config.name!r}: the metadata's issuer {issuer!r} is not the "
                f"configured issuer {config.issuer!r} (they must be equal, character for character)"
            )
    endpoints: Dict[str, Optional[str]] = {}
    loopback = False
    for key in _ENDPOINTS:
        value = config.endpoint_overrides.get(key, document.get(key))
        if value is None:
            if key in _REQUIRED:
                raise ProviderDisabledError(f"provider {config.name!r}: the metadata has no {key}")
            endpoints[key] = None
            continue
        try:
            loopback = check_endpoint_url(value, key) or loopback
        except URLProblem as e:
            raise ProviderDisabledError(f"provider {config.name!r}: {e}") from None
        endpoints[key] = value
    try:
        loopback = check_endpoint_url(config.issuer, "issuer") or loopback
    except URLProblem as e:
        raise ProviderDisabledError(f"provider {config.name!r}: {e}") from None

    announced = _str_list(document, "id_token_signing_alg_values_supported")
    if announced and not set(announced) & set(config.allowed_algs):
        raise ProviderDisabledError(
            f"provider {config.name!r}: it signs ID tokens with {', '.join(announced)}, "
            f"none of which is in allowed_algs ({', '.join(config.allowed_algs)})"
        )

    return ProviderMetadata(
        issuer=config.issuer,
        authorization_endpoint=str(endpoints["authorization_endpoint"]),
        token_endpoint=str(endpoints["token_endpoint"]),
        jwks_uri=str(endpoints["jwks_uri"]),
        userinfo_endpoint=endpoints["userinfo_endpoint"],
        end_session_endpoint=endpoints["end_session_endpoint"],
        iss_parameter_supported=document.get("authorization_response_iss_parameter_supported")
        is True,
        id_token_signing_alg_values_supported=announced,
        token_endpoint_auth_methods_supported=_str_list(
            document, "token_endpoint_auth_methods_supported"
        ),
        backchannel_logout_supported=document.get("backchannel_logout_supported") is True,
        backchannel_logout_session_supported=document.get("backchannel_logout_session_supported")
        is True,
        loopback_http=loopback,
    )


@attr.s(kw_only=True)
class MetadataSource:
    """
    A provider's metadata, fetched once and kept.

    :ivar config: the provider's configuration.
    :ivar http: its HTTP client.
    :ivar clock: for the retry pause after a failed fetch.
    :ivar retry_after: seconds during which a failed fetch is not retried
        (callers fail fast with 503 meanwhile).
    """

    config: ProviderConfig = attr.ib()
    http: ProviderHTTP = attr.ib()
    clock: IReactorTime = attr.ib()
    retry_after: float = attr.ib(default=10.0)
    _metadata: Optional[ProviderMetadata] = attr.ib(default=None, init=False)
    _disabled: Optional[ProviderDisabledError] = attr.ib(default=None, init=False)
    _failed_at: Optional[float] = attr.ib(default=None, init=False)
    _inflight: bool = attr.ib(default=False, init=False)
    _waiters: List[Deferred[ProviderMetadata]] = attr.ib(factory=list, init=False)

    @property
    def disabled(self) -> Optional[ProviderDisabledError]:
        """Why the provider is disabled, or ``None``."""
        return self._disabled

    def get(self) -> Deferred[ProviderMetadata]:
        """
        The provider's metadata.

        :return: a Deferred firing with `ProviderMetadata`, or failing with
            `ProviderDisabledError` (misconfigured) or
            `ProviderUnavailableError` (cannot be fetched now).
        """
        if self._metadata is not None:
            return succeed(self._metadata)
        if self._disabled is not None:
            return fail(self._disabled)
        if (
            self._failed_at is not None
            and not self._inflight
            and self.clock.seconds() - self._failed_at < self.retry_after
        ):
            return fail(ProviderUnavailableError(
                f"identity provider {self.config.name!r} is unavailable; retry later"
            ))
        waiter: Deferred[ProviderMetadata] = Deferred()
        self._waiters.append(waiter)
        if not self._inflight:
            self._inflight = True
            ensureDeferred(self._load()).addBoth(self._loaded)
        return waiter

    async def _load(self) -> ProviderMetadata:
        document: Any = {}
        if self.config.discovery:
            document = await self.http.get_json(
                discovery_url(self.config.issuer), what="discovery endpoint"
            )
        return parse_metadata(document, self.config)

    def _loaded(self, result: Any) -> None:
        self._inflight = False
        waiters, self._waiters = self._waiters, []
        outcome: Any
        if isinstance(result, ProviderMetadata):
            self._metadata = outcome = result
            log.info(
                "identity provider {name}: issuer {issuer}, keys at {jwks_uri}, "
                "RFC 9207 iss parameter {iss}",
                name=self.config.name, issuer=result.issuer, jwks_uri=result.jwks_uri,
                iss="required" if result.iss_parameter_supported else "not announced",
            )
            if result.loopback_http:
                log.warn(
                    "identity provider {name} uses plain http on a loopback host: "
                    "fine for development and tests only",
                    name=self.config.name,
                )
        elif isinstance(result, Failure) and result.check(ProviderDisabledError):
            assert isinstance(result.value, ProviderDisabledError)
            self._disabled = result.value
            log.error("identity provider {name} disabled: {reason}; its login answers 503",
                      name=self.config.name, reason=str(result.value))
            outcome = result
        else:
            self._failed_at = self.clock.seconds()
            kind = (
                type(result.value).__name__
                if isinstance(result, Failure) else type(result).__name__
            )
            if isinstance(result, Failure) and not result.check(IdentityError):
                log.failure("identity provider {name}: unexpected discovery failure",
                            result, name=self.config.name)
            else:
                log.warn("identity provider {name}: metadata unavailable ({kind})",
                         name=self.config.name, kind=kind)
            outcome = Failure(ProviderUnavailableError(
                f"identity provider {self.config.name!r} is unavailable; retry later"
            ))
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)


__all__ = [
    "MetadataSource",
    "ProviderBadResponseError",
    "ProviderMetadata",
    "discovery_url",
    "parse_metadata",
]
