"""
Each user's tokens at their identity provider (wxc_sdk's ``user_context``
and ``TokenManager``): kept sealed in the user store, refreshed once.

**Users.**  A login at provider ``NAME`` of the subject ``SUB`` is the user
``NAME:SUB`` (`user_id_for`).  The record remembers who it is
(``profile["oidc"]``: provider, issuer, subject and a few display claims),
so a local password account that happens to have that id is never taken
over by a login (`LoginConflictError`, 409).

**At rest.**  ``User.tokens[NAME]`` holds, sealed with AES-256-GCM
(`TokenSealer`), the provider's `TokenSet` and the ID token claims of the
login, plus, in the clear, the logins it serves (``logins``: provider
``sid`` and time, for back-channel logout of a ``sub``).  The key is
derived with HKDF-SHA256 from the deployment key (`derive_token_key`); the
associated data binds each sealed value to its user and provider, so it
cannot be moved to another record.  Tokens are never sent to the browser
(checklist #44).

**Refresh** (`TokenManager.get_user_context_and_refresh`): when the access
token expires within ``margin`` seconds it is refreshed, single-flight
(#48, #49, R1):

  - in one process, concurrent callers for one user share one refresh;
  - across processes, the refresher holds a lock (`IRefreshLock`: in Redis
    ``SET key token NX PX lease``, renewed while the refresh runs, released
    by its owner only, with a token-checked Lua delete); the others poll
    the user record until it holds fresh tokens or the lock is free, for at
    most ``wait_timeout`` seconds.  A holder that dies stops renewing, its
    lease expires and the next caller refreshes.

A rotated refresh token replaces the old one in the same compare-and-set
write (#45).  ``invalid_grant`` (or a refreshed ID token naming another
``iss``/``sub``/``aud``: #46) deletes the tokens and ends the user's
sessions (#47); a network error, a timeout or a 5xx keeps them and is
retried with exponential backoff, the current access token being used while
it lasts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attr
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from twistauth import redisconn
from twistauth.accounts._interfaces import User, check_user_id, modify_user
from twistauth.accounts.errors import InvalidUserIdError, UserExistsError
from twistauth.errors import TwistauthError
from twistauth.identity.client import LoginResult, TokenSet
from twistauth.identity.errors import (
    TRANSIENT_ERRORS,
    RefreshRejectedError,
)

log = Logger()

TOKEN_KEY_INFO = b"twistauth/oidc-tokens-at-rest/v1"
"""HKDF ``info`` of the token key: separates it from every other use of the deployment key."""

_AAD_PREFIX = b"twistauth oidc tokens v1\x00"

#: ID token claims shown in ``profile["oidc"]["claims"]`` (display only).
DISPLAY_CLAIMS = (
    "name",
    "given_name",
    "family_name",
    "preferred_username",
    "nickname",
    "email",
    "email_verified",
    "picture",
    "locale",
    "zoneinfo",
)

LOCAL_SID_PREFIX = "rp:"
"""Prefix of the session ``sid`` twistauth makes up when the provider sends none."""


class LoginConflictError(TwistauthError):
    """The user id of this login belongs to another account (a local one, or another identity)."""

    code = 40970
    name = "login_conflict"
    status = 409
    default_message = "an account with this identity's user id already exists"


class NoProviderLoginError(TwistauthError):
    """The session's user has no tokens at an identity provider."""

    code = 40171
    name = "no_provider_login"
    status = 401
    default_message = "this session did not log in with an identity provider; log in again"


class ProviderLoginExpiredError(TwistauthError):
    """The access token expired and cannot be refreshed (no refresh token)."""

    code = 40172
    name = "provider_login_expired"
    status = 401
    default_message = "the identity provider's login has expired; log in again"


class RefreshPendingError(TwistauthError):
    """Another process is refreshing this user's tokens and did not finish in time."""

    code = 50374
    name = "refresh_pending"
    status = 503
    default_message = "the login is being renewed; retry in a moment"


class _Unreadable(Exception):
    """A sealed token entry cannot be opened (another key, tampered, malformed)."""


class _Superseded(Exception):
    """The stored tokens changed while they were refreshed: keep the newer ones."""


def derive_token_key(deployment_key: bytes) -> bytes:
    """
    The AES-256 key that seals tokens at rest: HKDF-SHA256 of the
    deployment key with the `TOKEN_KEY_INFO` label.

    :raises ValueError: the deployment key is not 32 bytes.
    """
    if not isinstance(deployment_key, bytes) or len(deployment_key) != 32:
        raise ValueError("the deployment key must be 32 bytes")
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=TOKEN_KEY_INFO)
    return kdf.derive(deployment_key)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@attr.s(frozen=True, kw_only=True, repr=False)
class TokenSealer:
    """
    Seals JSON values with AES-256-GCM for one user and provider.

    :ivar key: 32 bytes (see `derive_token_key`).
    """

    key: bytes = attr.ib()

    @key.validator
    def _check_key(self, attribute: Any, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != 32:
            raise ValueError("a token key is 32 bytes")

    def __repr__(self) -> str:
        return f"<TokenSealer kid={self.kid}>"

    @property
    def kid(self) -> str:
        """A short, public identifier of the key (to tell a key change from tampering)."""
        return hashlib.sha256(b"twistauth token kid\x00" + self.key).hexdigest()[:8]

    @staticmethod
    def _aad(user_id: str, provider: str) -> bytes:
        return _AAD_PREFIX + user_id.encode("utf-8") + b"\x00" + provider.encode("utf-8")

    def seal(self, user_id: str, provider: str, value: Any) -> Dict[str, str]:
        """
        :return: ``{"alg": "A256GCM", "kid": ..., "data": base64url(nonce | ciphertext+tag)}``.
        """
        nonce = os.urandom(12)
        plain = json.dumps(value, separators=(",", ":")).encode("utf-8")
        sealed = AESGCM(self.key).encrypt(nonce, plain, self._aad(user_id, provider))
        return {"alg": "A256GCM", "kid": self.kid, "data": _b64(nonce + sealed)}

    def open(self, user_id: str, provider: str, entry: Mapping[str, Any]) -> Any:
        """
        :raises _Unreadable: another key, tampered, moved, or malformed.
        """
        data = entry.get("data") if isinstance(entry, Mapping) else None
        if entry.get("alg") != "A256GCM" or not isinstance(data, str):
            raise _Unreadable("not a sealed token entry")
        if entry.get("kid") != self.kid:
            raise _Unreadable("sealed with another key")
        try:
            raw = _unb64(data)
            plain = AESGCM(self.key).decrypt(raw[:12], raw[12:], self._aad(user_id, provider))
            return json.loads(plain.decode("utf-8"))
        except (InvalidTag, ValueError, UnicodeDecodeError):
            raise _Unreadable("the sealed tokens do not open") from None


def user_id_for(provider: str, subject: str) -> str:
    """
    The user id of ``subject`` at ``provider``: ``provider:subject``, or
    ``provider:#`` and a hash when the subject would not make a valid user
    id (too long, control characters).
    """
    candidate = f"{provider}:{subject}"
    try:
        if check_user_id(candidate) == candidate:
            return candidate
    except InvalidUserIdError:
        pass
    return f"{provider}:#{hashlib.sha256(subject.encode('utf-8')).hexdigest()}"


def provider_of(user_id: str) -> str:
    """The provider name part of a `user_id_for` id."""
    return user_id.partition(":")[0]


def new_local_sid() -> str:
    """A session ``sid`` for logins whose ID token carries none (never sent anywhere)."""
    return LOCAL_SID_PREFIX + secrets.token_urlsafe(16)


@attr.s(frozen=True, kw_only=True, repr=False)
class UserContext:
    """
    A user's live login at a provider.  Never send `tokens` to a browser.

    :ivar user_id: the user.
    :ivar provider: the provider's name.
    :ivar tokens: the current `TokenSet`.
    :ivar claims: the ID token claims (of the login, or the latest refresh).
    :ivar obtained_at: when the tokens were obtained (clock seconds), or ``None``.
    """

    user_id: str = attr.ib()
    provider: str = attr.ib()
    tokens: TokenSet = attr.ib()
    claims: Dict[str, Any] = attr.ib()
    obtained_at: Optional[float] = attr.ib(default=None)

    def __repr__(self) -> str:
        return f"<UserContext user={self.user_id!r} provider={self.provider!r}>"


# -- the refresh lock -------------------------------------------------------


class IRefreshLock(Interface):
    """
    A lock with a lease, shared by every process that may refresh a user's
    tokens.  Every method answers with a Deferred; an unreachable backend
    fails it with `twistauth.errors.BackendUnavailableError`.
    """

    def acquire(name: str, lease: float) -> Any:
        """
        Take the lock ``name`` for ``lease`` seconds if nobody holds it.

        :return: Deferred firing with a `Lease`, or ``None`` when it is held.
        """

    def renew(name: str, token: str, lease: float) -> Any:
        """
        Extend the lease of ``name`` to ``lease`` seconds from now, if
        ``token`` still holds it.

        :return: Deferred firing with whether it did.
        """

    def release(name: str, token: str) -> Any:
        """
        Release ``name`` if ``token`` holds it (never someone else's lock).

        :return: Deferred firing with whether it did.
        """


@attr.s(frozen=True, kw_only=True, repr=False)
class Lease:
    """
    A held lock.

    :ivar lock: the `IRefreshLock` it came from.
    :ivar name: the lock's name.
    :ivar token: the random token that proves ownership.
    :ivar seconds: the lease length.
    """

    lock: Any = attr.ib()
    name: str = attr.ib()
    token: str = attr.ib()
    seconds: float = attr.ib()

    def __repr__(self) -> str:
        return "<Lease>"

    def renew(self) -> Deferred[bool]:
        return self.lock.renew(self.name, self.token, self.seconds)

    def release(self) -> Deferred[bool]:
        return self.lock.release(self.name, self.token)


@implementer(IRefreshLock)
@attr.s(kw_only=True, eq=False)
class MemoryRefreshLock:
    """
    The lock for a deployment of one process (where the in-process
    single flight already does the work): same contract, in a dict.
    """

    clock: IReactorTime = attr.ib()
    _held: Dict[str, Tuple[str, float]] = attr.ib(init=False, factory=dict)

    def _holder(self, name: str) -> Optional[str]:
        entry = self._held.get(name)
        if entry is None:
            return None
        if entry[1] <= self.clock.seconds():
            del self._held[name]
            return None
        return entry[0]

    def acquire(self, name: str, lease: float) -> Deferred[Optional[Lease]]:
        if self._holder(name) is not None:
            return succeed(None)
        token = secrets.token_hex(16)
        self._held[name] = (token, self.clock.seconds() + lease)
        return succeed(Lease(lock=self, name=name, token=token, seconds=lease))

    def renew(self, name: str, token: str, lease: float) -> Deferred[bool]:
        if self._holder(name) != token:
            return succeed(False)
        self._held[name] = (token, self.clock.seconds() + lease)
        return succeed(True)

    def release(self, name: str, token: str) -> Deferred[bool]:
        if self._holder(name) != token:
            return succeed(False)
        del self._held[name]
        return succeed(True)


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# (module-level: each script's EVALSHA prefix is encoded once: see
# `redisconn.run_script`).
_RENEW_SCRIPT = redisconn.Script(_RENEW, keys=1)
_RELEASE_SCRIPT = redisconn.Script(_RELEASE, keys=1)


@implementer(IRefreshLock)
@attr.s(kw_only=True, eq=False)
class RedisRefreshLock:
    """
    The lock in the deployment's shared Redis, under ``<prefix>lock:<name>``.

    :ivar redis: a txredisapi connection.
    :ivar clock: the clock deadlines run on.
    :ivar timeout: seconds a Redis call may take.
    :ivar prefix: the key prefix.
    """

    redis: Any = attr.ib()
    clock: IReactorTime = attr.ib()
    timeout: float = attr.ib(default=2.0)
    prefix: str = attr.ib(default="twistauth:oidc:")

    def key(self, name: str) -> str:
        return self.prefix + "lock:" + name

    def _call(self, function: Any, *args: Any) -> Deferred[Any]:
        return redisconn.call(
            self.clock, self.timeout, function, *args, what="the token refresh lock (Redis)"
        )

    def _run(
        self, script: redisconn.Script, keys: Sequence[str], args: Sequence[str]
    ) -> Deferred[Any]:
        """
        Run one of the scripts, with the call deadline (an outage fails it
        with `twistauth.errors.BackendUnavailableError`).
        """
        return redisconn.run_script(
            self.redis,
            script,
            keys,
            args,
            clock=self.clock,
            timeout=self.timeout,
            what="the token refresh lock (Redis)",
        )

    def acquire(self, name: str, lease: float) -> Deferred[Optional[Lease]]:
        token = secrets.token_hex(16)
        ms = max(1, int(lease * 1000))
        d = self._call(self.redis.set, self.key(name), token, None, ms, True)

        def answered(reply: Any) -> Optional[Lease]:
            if reply is None:
                return None
            return Lease(lock=self, name=name, token=token, seconds=lease)

        return d.addCallback(answered)

    def renew(self, name: str, token: str, lease: float) -> Deferred[bool]:
        ms = str(max(1, int(lease * 1000)))
        d = self._run(_RENEW_SCRIPT, (self.key(name),), (token, ms))
        return d.addCallback(lambda reply: bool(int(reply or 0)))

    def release(self, name: str, token: str) -> Deferred[bool]:
        d = self._run(_RELEASE_SCRIPT, (self.key(name),), (token,))
        return d.addCallback(lambda reply: bool(int(reply or 0)))


# -- single flight within a process -------------------------------------------


class _Shared:
    """
    One refresh in progress and the callers waiting on it.  A caller that
    goes away (its Deferred cancelled) leaves; the refresh goes on for the
    others.
    """

    def __init__(self) -> None:
        self.waiters: List[Deferred[Any]] = []
        self.callers = 0

    def follow(self) -> Deferred[Any]:
        self.callers += 1

        def cancel(d: Deferred[Any]) -> None:
            if d in self.waiters:
                self.waiters.remove(d)

        waiter: Deferred[Any] = Deferred(cancel)
        self.waiters.append(waiter)
        return waiter

    def fire(self, result: Any) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


@attr.s(frozen=True, slots=True)
class _Backoff:
    next_at: float = attr.ib()
    delay: float = attr.ib()
    error: Failure = attr.ib()


EndSessions = Callable[[str, str], Any]
"""``end_sessions(user_id, reason)``: end every session of a user, and wake
its logout waiters; may return a Deferred."""


@attr.s(kw_only=True, eq=False)
class TokenManager:
    """
    Users' provider tokens: stored sealed, given back fresh.

    :ivar users: the `twistauth.accounts.IUserStore`.
    :ivar parties: the `RelyingParty` of each provider, by name.
    :ivar sealer: the `TokenSealer`.
    :ivar clock: the time source.
    :ivar lock: the `IRefreshLock` shared by the deployment's processes.
    :ivar end_sessions: called when a user's login at the provider is dead.
    :ivar margin: refresh when the access token expires within this many
        seconds (at most half its lifetime).
    :ivar lock_lease: seconds of the refresh lock's lease (renewed every third of it).
    :ivar wait_timeout: the longest a caller waits for another process's refresh.
    :ivar poll_interval: seconds between looks while waiting.
    :ivar retry_initial: the first delay after a failed (transient) refresh.
    :ivar retry_max: the longest delay between refresh attempts.
    :ivar session_lifetime: logins older than this (the sessions' absolute
        timeout) are forgotten.
    :ivar max_logins: the most logins remembered per user and provider.
    """

    users: Any = attr.ib()
    parties: Mapping[str, Any] = attr.ib()
    sealer: TokenSealer = attr.ib()
    clock: IReactorTime = attr.ib()
    lock: Any = attr.ib()
    end_sessions: EndSessions = attr.ib()
    margin: float = attr.ib(default=60.0)
    lock_lease: float = attr.ib(default=2.0)
    wait_timeout: float = attr.ib(default=5.0)
    poll_interval: float = attr.ib(default=0.025)
    retry_initial: float = attr.ib(default=1.0)
    retry_max: float = attr.ib(default=60.0)
    session_lifetime: float = attr.ib(default=43200.0)
    max_logins: int = attr.ib(default=50)
    metrics: Any = attr.ib(default=None)
    """Counts refreshes by outcome and reason (an `IMetrics`), or ``None``."""
    _inflight: Dict[Tuple[str, str], _Shared] = attr.ib(init=False, factory=dict)
    _backoff: Dict[Tuple[str, str], _Backoff] = attr.ib(init=False, factory=dict)
    counts: Dict[str, int] = attr.ib(
        init=False,
        factory=lambda: dict.fromkeys(
            ("refreshed", "shared", "waited", "rejected", "failed", "superseded"), 0
        ),
    )
    """What refreshes did in this process (observable)."""

    # -- users --------------------------------------------------------------

    def prepare_user(self, result: LoginResult) -> Deferred[User]:
        """
        The user of a finished login: created if new, checked if not.

        :return: Deferred firing with the `User`, or failing with
            `LoginConflictError` when the id belongs to another account.
        """
        return ensureDeferred(self._prepare_user(result))

    async def _prepare_user(self, result: LoginResult) -> User:
        user_id = user_id_for(result.provider, result.subject)
        user = await self.users.get(user_id)
        if user is None:
            fresh = User(
                user_id=user_id,
                profile={"oidc": self._identity(result)},
            )
            try:
                user = await self.users.create(fresh)
            except UserExistsError:
                user = await self.users.get(user_id)
                if user is None:
                    raise LoginConflictError() from None
        self._check_identity(user, result.provider, result.issuer, result.subject)
        return user

    @staticmethod
    def _identity(result: LoginResult) -> Dict[str, Any]:
        source = dict(result.claims)
        if result.userinfo:
            source.update(result.userinfo)
        claims = {
            k: source[k]
            for k in DISPLAY_CLAIMS
            if k in source and isinstance(source[k], (str, bool, int, float))
        }
        return {
            "provider": result.provider,
            "issuer": result.issuer,
            "subject": result.subject,
            "claims": claims,
        }

    @staticmethod
    def _check_identity(user: User, provider: str, issuer: str, subject: str) -> None:
        identity = user.profile.get("oidc")
        if (
            user.password_hash is not None
            or not isinstance(identity, dict)
            or identity.get("provider") != provider
            or identity.get("issuer") != issuer
            or identity.get("subject") != subject
        ):
            log.warn(
                "twistauth: login at {provider} refused: the user id {user_id} belongs "
                "to another account",
                provider=provider,
                user_id=user.user_id,
            )
            raise LoginConflictError()

    def record_login(self, user_id: str, result: LoginResult, *, sid: str) -> Deferred[User]:
        """
        Store a finished login's tokens (sealed), its claims, and the login
        (``sid`` and time) for back-channel logout.

        :param sid: the session's provider ``sid`` (the ID token's, or a
            `new_local_sid`).
        :return: Deferred firing with the stored `User`.
        """
        now = self.clock.seconds()
        sealed = self.sealer.seal(
            user_id,
            result.provider,
            {"tokens": result.tokens.to_dict(), "claims": result.claims, "obtained": now},
        )

        def change(user: User) -> User:
            self._check_identity(user, result.provider, result.issuer, result.subject)
            previous = user.tokens.get(result.provider)
            logins, older = self._pruned_logins(previous, now)
            logins.append([sid, now])
            if len(logins) > self.max_logins:
                dropped = logins[: len(logins) - self.max_logins]
                logins = logins[len(logins) - self.max_logins :]
                older = max([older or 0.0] + [at for _, at in dropped])
            entry: Dict[str, Any] = dict(sealed, updated=now, logins=logins)
            if older is not None:
                entry["older_logins_before"] = older
            tokens = dict(user.tokens)
            tokens[result.provider] = entry
            profile = dict(user.profile)
            profile["oidc"] = self._identity(result)
            return user.evolve(tokens=tokens, profile=profile)

        self._backoff.pop((user_id, result.provider), None)
        return modify_user(self.users, user_id, change)

    def _pruned_logins(
        self, entry: Optional[Mapping[str, Any]], now: float
    ) -> Tuple[List[List[Any]], Optional[float]]:
        if not isinstance(entry, Mapping):
            return [], None
        horizon = now - self.session_lifetime
        logins = [[sid, at] for sid, at in _logins(entry) if at > horizon]
        older = entry.get("older_logins_before")
        if not isinstance(older, (int, float)) or older <= horizon:
            older = None
        return logins, older

    def logins(self, user: User, provider: str) -> Tuple[List[Tuple[str, float]], Optional[float]]:
        """
        The logins of ``user`` at ``provider`` that may still have sessions:
        ``([(sid, logged_in_at), ...], older)`` where ``older`` is the time of
        the newest login forgotten for lack of room (its sessions can only
        be ended with the user's), or ``None``.
        """
        logins, older = self._pruned_logins(user.tokens.get(provider), self.clock.seconds())
        return [(sid, at) for sid, at in logins], older

    def forget_logins(self, user_id: str, provider: str, sids: List[str]) -> Deferred[Any]:
        """Drop logins whose sessions were ended (best effort)."""
        gone = set(sids)

        def change(user: User) -> User:
            entry = user.tokens.get(provider)
            if not isinstance(entry, dict):
                return user
            tokens = dict(user.tokens)
            tokens[provider] = dict(
                entry, logins=[[sid, at] for sid, at in _logins(entry) if sid not in gone]
            )
            return user.evolve(tokens=tokens)

        return modify_user(self.users, user_id, change)

    def forget_tokens(self, user_id: str, provider: str) -> Deferred[Any]:
        """
        Delete a user's tokens at a provider (its logins stay, for logout).
        """

        def change(user: User) -> User:
            entry = user.tokens.get(provider)
            if not isinstance(entry, dict):
                return user
            tokens = dict(user.tokens)
            tokens[provider] = {
                k: v for k, v in entry.items() if k in ("logins", "older_logins_before")
            }
            return user.evolve(tokens=tokens)

        self._backoff.pop((user_id, provider), None)
        return modify_user(self.users, user_id, change)

    # -- reading ------------------------------------------------------------

    def _provider_for(self, user: User, provider: Optional[str]) -> str:
        if provider is not None:
            return provider
        identity = user.profile.get("oidc")
        if isinstance(identity, dict) and isinstance(identity.get("provider"), str):
            return identity["provider"]
        return provider_of(user.user_id)

    def _context(
        self, user: Optional[User], user_id: str, provider: Optional[str]
    ) -> Tuple[UserContext, Dict[str, Any]]:
        if user is None:
            raise NoProviderLoginError()
        name = self._provider_for(user, provider)
        entry = user.tokens.get(name)
        if not isinstance(entry, dict) or "data" not in entry:
            raise NoProviderLoginError()
        try:
            opened = self.sealer.open(user_id, name, entry)
            tokens = TokenSet.from_dict(opened["tokens"])
            claims = opened["claims"]
            obtained = opened.get("obtained")
            if not isinstance(claims, dict):
                raise TypeError
            if not isinstance(obtained, (int, float)) or isinstance(obtained, bool):
                obtained = None
        except (_Unreadable, KeyError, TypeError):
            log.warn(
                "twistauth: the stored tokens of {user_id} at {provider} cannot be opened "
                "(the deployment key changed?): log in again",
                user_id=user_id,
                provider=name,
            )
            raise NoProviderLoginError() from None
        context = UserContext(
            user_id=user_id, provider=name, tokens=tokens, claims=claims, obtained_at=obtained
        )
        return context, entry

    def get_user_context(
        self, user_id: str, provider: Optional[str] = None
    ) -> Deferred[UserContext]:
        """
        The user's stored login, as it is (no refresh).

        :param provider: the provider's name (default: the user's own).
        :return: Deferred firing with a `UserContext`, or failing with
            `NoProviderLoginError` (401).
        """

        def found(user: Optional[User]) -> UserContext:
            return self._context(user, user_id, provider)[0]

        return self.users.get(user_id).addCallback(found)

    def _expiring(self, context: UserContext) -> bool:
        """
        Whether the access token expires within the margin, the margin
        being at most half the token's lifetime (a provider whose tokens
        live less than twice the margin is not called on every request).
        """
        margin = self.margin
        expires_at, obtained = context.tokens.expires_at, context.obtained_at
        if expires_at is not None and obtained is not None:
            margin = min(margin, max(0.0, (expires_at - obtained) / 2))
        return context.tokens.expires_within(self.clock.seconds(), margin)

    def _usable(self, context: UserContext) -> bool:
        expires_at = context.tokens.expires_at
        return expires_at is None or expires_at > self.clock.seconds()

    # -- refreshing ---------------------------------------------------------

    def get_user_context_and_refresh(
        self, user_id: str, provider: Optional[str] = None
    ) -> Deferred[UserContext]:
        """
        The user's login with an access token valid for at least ``margin``
        seconds, refreshed first if needed (single-flight across callers and
        processes).

        :return: Deferred firing with a `UserContext`, or failing with
            `NoProviderLoginError` / `ProviderLoginExpiredError` (401),
            `RefreshRejectedError` (401: the grant is dead, the user's
            sessions were ended), `RefreshPendingError` (503) or a transient
            provider error (502/503/504: the session is kept; retried later).
        """
        return ensureDeferred(self._get_and_refresh(user_id, provider))

    async def _get_and_refresh(self, user_id: str, provider: Optional[str]) -> UserContext:
        user = await self.users.get(user_id)
        context, _ = self._context(user, user_id, provider)
        if not self._expiring(context):
            return context
        key = (user_id, context.provider)
        if not context.tokens.refresh_token:
            if self._usable(context):
                return context
            raise ProviderLoginExpiredError()
        backoff = self._backoff.get(key)
        if backoff is not None and self.clock.seconds() < backoff.next_at:
            if self._usable(context):
                return context
            backoff.error.raiseException()
        shared = self._inflight.get(key)
        if shared is not None:
            self.counts["shared"] += 1
            result: UserContext = await shared.follow()
            return result
        shared = self._inflight[key] = _Shared()
        waiter = shared.follow()

        def done(outcome: Any) -> None:
            del self._inflight[key]
            shared.fire(outcome)

        ensureDeferred(self._refresh_once(user_id, context)).addBoth(done)
        result = await waiter
        return result

    def _lock_name(self, user_id: str, provider: str) -> str:
        text = f"{user_id}\n{provider}".encode()
        return "refresh:" + hashlib.sha256(text).hexdigest()[:32]

    async def _refresh_once(self, user_id: str, context: UserContext) -> UserContext:
        provider = context.provider
        name = self._lock_name(user_id, provider)
        deadline = self.clock.seconds() + self.wait_timeout
        waited = False
        while True:
            lease = await self.lock.acquire(name, self.lock_lease)
            if lease is not None:
                try:
                    # Whoever held the lock before may have just refreshed.
                    user = await self.users.get(user_id)
                    context, entry = self._context(user, user_id, provider)
                    if not self._expiring(context):
                        return context
                    return await self._refresh_with(lease, context, entry)
                finally:
                    try:
                        await lease.release()
                    except Exception:
                        # An outage: the lease expires by itself.
                        log.warn("twistauth: could not release a token refresh lock")
            if not waited:
                waited = True
                self.counts["waited"] += 1
            if self.clock.seconds() >= deadline:
                if self._usable(context):
                    return context
                raise RefreshPendingError()
            await deferLater(self.clock, self.poll_interval, lambda: None)
            user = await self.users.get(user_id)
            context, _ = self._context(user, user_id, provider)
            if not self._expiring(context):
                return context

    async def _refresh_with(
        self, lease: Lease, context: UserContext, entry: Mapping[str, Any]
    ) -> UserContext:
        user_id, provider = context.user_id, context.provider
        party = self.parties.get(provider)
        if party is None:
            raise NoProviderLoginError("this login's identity provider is no longer configured")
        renewing = LoopingCall(self._renew, lease)
        renewing.clock = self.clock
        renewing.start(max(0.01, self.lock_lease / 3), now=False)
        try:
            result = await party.refresh(context.tokens, claims=context.claims)
        except RefreshRejectedError as e:
            self.counts["rejected"] += 1
            if self.metrics is not None:
                self.metrics.refresh("failure", e.name)
            log.warn(
                "twistauth: {provider} refused to renew the login of {user_id}: "
                "its tokens are deleted and its sessions ended",
                provider=provider,
                user_id=user_id,
            )
            await self._end(user_id, provider)
            raise
        except TRANSIENT_ERRORS as e:
            self.counts["failed"] += 1
            if self.metrics is not None:
                self.metrics.refresh("failure", e.name)
            key = (user_id, provider)
            previous = self._backoff.get(key)
            delay = (
                self.retry_initial if previous is None else min(self.retry_max, previous.delay * 2)
            )
            self._backoff[key] = _Backoff(
                next_at=self.clock.seconds() + delay, delay=delay, error=Failure(e)
            )
            log.warn(
                "twistauth: renewing the login of {user_id} at {provider} failed "
                "({error}); next attempt in {delay:g} s",
                user_id=user_id,
                provider=provider,
                error=e.name,
                delay=delay,
            )
            if self._usable(context):
                return context
            raise
        finally:
            if renewing.running:
                renewing.stop()
        self._backoff.pop((user_id, provider), None)
        fresh = UserContext(
            user_id=user_id,
            provider=provider,
            tokens=result.tokens,
            claims=result.claims,
            obtained_at=self.clock.seconds(),
        )
        await self._store_refreshed(fresh, entry)
        self.counts["refreshed"] += 1
        if self.metrics is not None:
            self.metrics.refresh("success")
        return fresh

    def _renew(self, lease: Lease) -> Deferred[None]:
        def answered(held: bool) -> None:
            if not held:
                log.warn("twistauth: a token refresh outlived its lock's lease")

        def failed(failure: Failure) -> None:
            log.warn(
                "twistauth: could not renew a token refresh lock: {error}",
                error=failure.getErrorMessage(),
            )

        return lease.renew().addCallbacks(answered, failed)

    async def _store_refreshed(self, fresh: UserContext, old: Mapping[str, Any]) -> None:
        sealed = self.sealer.seal(
            fresh.user_id,
            fresh.provider,
            {
                "tokens": fresh.tokens.to_dict(),
                "claims": fresh.claims,
                "obtained": fresh.obtained_at,
            },
        )
        now = self.clock.seconds()

        def change(user: User) -> User:
            entry = user.tokens.get(fresh.provider)
            if not isinstance(entry, dict) or entry.get("data") != old.get("data"):
                # A new login stored newer tokens meanwhile: keep those.
                raise _Superseded()
            tokens = dict(user.tokens)
            tokens[fresh.provider] = dict(entry, **sealed, updated=now)
            return user.evolve(tokens=tokens)

        try:
            await modify_user(self.users, fresh.user_id, change)
        except _Superseded:
            self.counts["superseded"] += 1

    async def _end(self, user_id: str, provider: str) -> None:
        try:
            await self.forget_tokens(user_id, provider)
        except CancelledError:
            raise
        except Exception as e:
            log.error(
                "twistauth: could not delete the dead tokens of {user_id}: {error}",
                user_id=user_id,
                error=str(e),
            )
        try:
            await maybeDeferred(self.end_sessions, user_id, "refresh_rejected")
        except CancelledError:
            raise
        except Exception as e:
            log.error(
                "twistauth: could not end the sessions of {user_id}: {error}",
                user_id=user_id,
                error=str(e),
            )


def _logins(entry: Mapping[str, Any]) -> List[Tuple[str, float]]:
    found: List[Tuple[str, float]] = []
    raw = entry.get("logins")
    if not isinstance(raw, list):
        return found
    for item in raw:
        if (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], (int, float))
            and not isinstance(item[1], bool)
        ):
            found.append((item[0], float(item[1])))
    return found


__all__ = [
    "DISPLAY_CLAIMS",
    "IRefreshLock",
    "Lease",
    "LoginConflictError",
    "MemoryRefreshLock",
    "NoProviderLoginError",
    "ProviderLoginExpiredError",
    "RedisRefreshLock",
    "RefreshPendingError",
    "TokenManager",
    "TokenSealer",
    "UserContext",
    "derive_token_key",
    "new_local_sid",
    "provider_of",
    "user_id_for",
]
