"""
Who may call what: per-session method ACLs, role requirements, and the
authorizer the dispatcher runs before every JSON method.

Three layers decide whether a call runs, in this order (the first refusal
answers; the method never runs, and its parameters are not even checked):

1. **The account is still live.**  A logged-in session re-checks its user
   at most every ``recheck_interval`` seconds (default 60) through an
   `IRoleProvider`: a user whose account vanished or was disabled has every
   session ended (``401 auth_required``); changed roles are copied into the
   session.  The time of the last check is kept in the session state under
   `CHECK_KEY`, so a session in use costs one user-store read per interval,
   not one per request.
2. **The method's requirement** (carafe's ``auth.require``): a method
   registered with ``@method("admin.purge", roles=["admin"])``, or marked
   with ``@require.auth`` / ``@require.role("admin")``, needs a logged-in
   session (else ``401 auth_required``) holding one of the roles (else
   ``403 forbidden``).
3. **The session's ACL** (gevent-socketio's namespace ACL, default-deny):
   the method's name must match a rule of the session's ACL (else ``403
   forbidden``).

ACL rules are patterns over dotted method names: ``account.login`` (that
method), ``public.*`` (every method under ``public.``, at any depth) and
``*`` (every method).  An anonymous session starts with the *initial* ACL
(`DEFAULT_INITIAL_ACL` unless configured); a logged-in one with the *lifted*
ACL (``["*"]`` plus any per-role grants, unless configured), so login lifts
and logout (which ends the session) resets without any call.  Methods and
hooks change a session's ACL through `acl` (or the gevent-socketio names
`lift_acl_restrictions`, `add_acl_method`, `del_acl_method`, `reset_acl`,
`is_method_allowed`).  The most specific matching rule decides (an exact
name beats ``a.b.*``, which beats ``a.*``, which beats ``*``; on a tie a
removal beats a grant), so ``del_acl_method("admin.purge")`` carves one
method out of a lifted ``*``.

Where the ACL lives: in the session state under `ACL_KEY`
(``"twistauth.acl"``), as ``{"user": <user id or null>, "base": "initial" |
"lifted", "allow": [sorted patterns], "deny": [sorted patterns]}``, written
only when it differs from the default.  It is bound to the user it was made
for: after a login as someone else it no longer applies, so a grant made to
an anonymous session (or to another user) never survives a login.

Every refusal is logged with the rule that refused it (socketio's
``method_access_denied``), naming the method and the user (or
``anonymous``), never the session id.

The same requirements guard plain Klein routes of a host application
(`Require`), answering the same JSON error envelope.  Roles come from the
user store (`StoreRoles`), a host application's own database (any
`IRoleProvider`), and OpenID Connect claims (`ClaimRoles`, used by the
OIDC login).
"""

from __future__ import annotations

import functools
import inspect
import re
import weakref
from types import MappingProxyType
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import attr
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from twistauth.errors import (
    AuthRequiredError,
    ForbiddenError,
    InternalError,
    TwistauthError,
)
from twistauth.methods.handler import Handler
from twistauth.methods.registry import Method
from twistauth.observe import request_id_of
from twistauth.web.envelope import render_error

log = Logger()

F = TypeVar("F", bound=Callable[..., Any])

ACL_KEY = "twistauth.acl"
"""The session-state key holding a session's ACL (when not the default)."""

CHECK_KEY = "twistauth.access_checked"
"""The session-state key recording when the session's account was last
checked: ``{"user": <user id>, "at": <clock seconds>}``."""

INITIAL = "initial"
LIFTED = "lifted"

DEFAULT_INITIAL_ACL: Tuple[str, ...] = (
    "account.*",
    "echo",
    "public.*",
    "session.*",
    "time.now",
)
"""What an anonymous session may call when nothing is configured: the
account and session methods (logging in needs them), the demo methods, and
the ``public.*`` namespace for an application's open methods."""

DEFAULT_LIFTED_ACL: Tuple[str, ...] = ("*",)
"""What a logged-in session may call when nothing is configured: every
method, each still subject to its own role requirement."""

DEFAULT_RECHECK_INTERVAL = 60.0

_IDENT = r"[A-Za-z][A-Za-z0-9_]*"
_PATTERN = re.compile(rf"(?:\*|{_IDENT}(?:\.{_IDENT})*(?:\.\*)?)\Z")
_ROLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}\Z")
_PATTERN_HELP = (
    "use a method name ('account.login'), a namespace ('public.*': every method "
    "under 'public.') or '*' (every method); names are dotted identifiers "
    "(letters, digits, '_', each part starting with a letter)"
)
_ROLE_HELP = (
    "a role name is 1 to 128 characters: letters, digits and '_.:@-', "
    "starting with a letter or digit"
)
_MARK = "__twistauth_require__"


# ---------------------------------------------------------------------------
# Validation: what settings and decorators accept.


def check_acl_pattern(pattern: Any) -> str:
    """
    Check one ACL pattern.

    :return: the pattern.
    :raises ValueError: it does not parse; the message says what parses.
    """
    if not isinstance(pattern, str) or not _PATTERN.match(pattern):
        raise ValueError(f"invalid ACL pattern {pattern!r}: {_PATTERN_HELP}")
    return pattern


def check_acl_patterns(patterns: Any) -> Tuple[str, ...]:
    """
    Check a list of ACL patterns.

    :return: the patterns, sorted, without duplicates.
    :raises ValueError: a pattern does not parse, or a single string was
        given where a list belongs.
    """
    if isinstance(patterns, str) or not isinstance(patterns, Iterable):
        raise ValueError(f"expected a list of ACL patterns such as ['public.*'], got {patterns!r}")
    return tuple(sorted({check_acl_pattern(p) for p in patterns}))


def check_role_name(role: Any) -> str:
    """
    Check one role name.

    :raises ValueError: it is not a role name.
    """
    if not isinstance(role, str) or not _ROLE.match(role):
        raise ValueError(f"invalid role name {role!r}: {_ROLE_HELP}")
    return role


def check_role_names(roles: Any) -> FrozenSet[str]:
    """
    Check a collection of role names (``roles="admin"`` is refused: a
    string is not a list of roles).

    :raises ValueError: not a list, or a name that is not a role name.
    """
    if isinstance(roles, str) or not isinstance(roles, Iterable):
        raise ValueError(f"roles must be a list such as ['admin'], got {roles!r}")
    return frozenset(check_role_name(r) for r in roles)


def check_role_grant(text: Any) -> str:
    """
    Check one ``"role=pattern"`` entry of the ``acl_role_grants`` setting.

    :raises ValueError: it is not ``role=pattern`` with a valid role and pattern.
    """
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"expected 'role=pattern' such as 'admin=admin.*', got {text!r}")
    role, _, pattern = text.partition("=")
    check_role_name(role.strip())
    check_acl_pattern(pattern.strip())
    return text


def parse_role_grants(
    grants: Union[Iterable[str], Mapping[str, Any], None],
) -> Dict[str, Tuple[str, ...]]:
    """
    The per-role ACL grants: a role's patterns are added to the lifted ACL
    of a session holding the role.

    :param grants: ``"role=pattern"`` strings (a role may appear in several),
        or a mapping of role to a list of patterns.
    :raises ValueError: an entry does not parse.
    """
    result: Dict[str, set] = {}
    if grants is None:
        return {}
    if isinstance(grants, Mapping):
        for role, patterns in grants.items():
            result.setdefault(check_role_name(role), set()).update(check_acl_patterns(patterns))
    else:
        if isinstance(grants, str):
            raise ValueError(f"expected a list of 'role=pattern' entries, got {grants!r}")
        for text in grants:
            check_role_grant(text)
            role, _, pattern = text.partition("=")
            result.setdefault(role.strip(), set()).add(pattern.strip())
    return {role: tuple(sorted(patterns)) for role, patterns in result.items()}


def check_claim_mapping(text: Any) -> str:
    """
    Check one ``"claim value=role"`` entry of the ``roles_claim_map``
    setting (the claim value may itself hold ``=``; the role may not).

    :raises ValueError: it is not ``value=role`` with a valid role.
    """
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"expected 'claim value=role' such as 'admins=admin', got {text!r}")
    value, _, role = text.rpartition("=")
    if not value:
        raise ValueError(f"the claim value of {text!r} is empty")
    check_role_name(role.strip())
    return text


def parse_claim_map(
    entries: Union[Iterable[str], Mapping[str, str], None],
) -> Dict[str, FrozenSet[str]]:
    """
    The claim-value → roles mapping of the ``roles_claim_map`` setting.

    :param entries: ``"value=role"`` strings (a value may map to several
        roles), or a mapping of value to role (or list of roles).
    :raises ValueError: an entry does not parse.
    """
    result: Dict[str, set] = {}
    if entries is None:
        return {}
    if isinstance(entries, Mapping):
        for value, roles in entries.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"a claim value must be a non-empty string, got {value!r}")
            given = [roles] if isinstance(roles, str) else roles
            result.setdefault(value, set()).update(check_role_names(given))
    else:
        if isinstance(entries, str):
            raise ValueError(f"expected a list of 'claim value=role' entries, got {entries!r}")
        for text in entries:
            check_claim_mapping(text)
            value, _, role = text.rpartition("=")
            result.setdefault(value, set()).add(role.strip())
    return {value: frozenset(roles) for value, roles in result.items()}


# ---------------------------------------------------------------------------
# Compiled ACLs.


def _candidates(name: str) -> List[str]:
    """
    The rules that could match ``name``, most specific first: the name,
    then each enclosing namespace (``a.b.*``, ``a.*``), then ``*``.
    """
    found = [name]
    end = name.rfind(".")
    while end > 0:
        found.append(name[:end] + ".*")
        end = name.rfind(".", 0, end)
    found.append("*")
    return found


@attr.s(slots=True, eq=False)
class CompiledACL:
    """
    One ACL ready for matching: sets of allowing and denying rules, and the
    decisions made so far (by method name).

    :ivar origin: what the ACL is, for log lines (``"initial"``,
        ``"lifted"``, ``"session"``).
    """

    allow: FrozenSet[str] = attr.ib()
    deny: FrozenSet[str] = attr.ib()
    origin: str = attr.ib()
    _decisions: Dict[str, Optional[str]] = attr.ib(factory=dict)

    def refusal(self, name: str) -> Optional[str]:
        """
        Why ``name`` is refused, or ``None`` if it is allowed.
        """
        try:
            return self._decisions[name]
        except KeyError:
            pass
        decision = self._decide(name)
        if len(self._decisions) >= 4096:
            self._decisions.clear()
        self._decisions[name] = decision
        return decision

    def _decide(self, name: str) -> Optional[str]:
        for rule in _candidates(name):
            if rule in self.deny:
                return f"the rule {rule!r} was removed from the {self.origin} ACL"
            if rule in self.allow:
                return None
        return f"no rule of the {self.origin} ACL allows it"


# ---------------------------------------------------------------------------
# Roles: where they come from.


class IRoleProvider(Interface):
    """
    Resolves a user's roles, asynchronously, from wherever they live: the
    user store, or a host application's own database (carafe's identity
    provider).  Also says whether the account is still live: the authorizer
    asks it every ``recheck_interval`` seconds per session.
    """

    def roles_for(user_id: str) -> Any:
        """
        :return: Deferred firing with the user's roles (an iterable of role
            names) when the account exists and may be used, or with ``None``
            when it does not exist or is disabled (every session of the user
            then ends).  Fails with
            `twistauth.errors.BackendUnavailableError` when the source
            cannot be reached (the call is then refused with 503: an outage
            is neither "no roles" nor "no account").
        """


@implementer(IRoleProvider)
@attr.s(kw_only=True, eq=False)
class StoreRoles:
    """
    Roles from the user store (``twistauth.accounts`` `IUserStore`): a
    missing or disabled user is ``None``.
    """

    users: Any = attr.ib()

    def roles_for(self, user_id: str) -> Deferred[Optional[FrozenSet[str]]]:
        def found(user: Any) -> Optional[FrozenSet[str]]:
            if user is None or user.disabled:
                return None
            return frozenset(user.roles)

        d: Deferred[Optional[FrozenSet[str]]] = self.users.get(user_id).addCallback(found)
        return d


@implementer(IRoleProvider)
@attr.s(kw_only=True, eq=False)
class StaticRoles:
    """
    Roles from a mapping held in memory (user id → roles): for tests and
    small deployments.  A user missing from the mapping has no account.
    The mapping may be changed while the server runs.
    """

    roles: Dict[str, Iterable[str]] = attr.ib(factory=dict)

    def roles_for(self, user_id: str) -> Deferred[Optional[FrozenSet[str]]]:
        found = self.roles.get(user_id)
        return succeed(None if found is None else frozenset(found))


@implementer(IRoleProvider)
@attr.s(kw_only=True, eq=False)
class CombinedRoles:
    """
    The ``primary`` provider decides whether the account is live; the
    roles are the union of every provider's answer (an ``extra`` provider
    answering ``None`` adds nothing).
    """

    primary: IRoleProvider = attr.ib()
    extra: Sequence[IRoleProvider] = attr.ib(factory=tuple)

    def roles_for(self, user_id: str) -> Deferred[Optional[FrozenSet[str]]]:
        async def resolve() -> Optional[FrozenSet[str]]:
            roles = await maybeDeferred(self.primary.roles_for, user_id)
            if roles is None:
                return None
            union = set(roles)
            for provider in self.extra:
                more = await maybeDeferred(provider.roles_for, user_id)
                if more is not None:
                    union.update(more)
            return frozenset(union)

        return ensureDeferred(resolve())


@attr.s(frozen=True, kw_only=True)
class ClaimRoles:
    """
    Roles from an OpenID Connect claim (the ``roles_claim`` and
    ``roles_claim_map`` settings).  The OIDC login calls `roles` with the
    validated ID token's (or UserInfo's) claims.

    :ivar claim: the claim's name, e.g. ``"groups"`` or ``"roles"``.  A
        name that is not a top-level claim is read as a dotted path
        (``"realm_access.roles"`` for Keycloak); a top-level claim whose
        name holds dots (``"https://example.com/roles"``) is found first.
    :ivar mapping: claim value → roles.  Empty: every value that is a valid
        role name is a role as it is (others are dropped).  Not empty: only
        mapped values give roles; unmapped values are dropped.
    """

    claim: str = attr.ib()
    mapping: Mapping[str, FrozenSet[str]] = attr.ib(factory=dict, converter=parse_claim_map)

    @claim.validator
    def _check_claim(self, attribute: Any, value: Any) -> None:
        if not isinstance(value, str) or not value or value != value.strip():
            raise ValueError(f"roles_claim must name a claim, such as 'groups', got {value!r}")

    @classmethod
    def from_settings(cls, settings: Any) -> Optional[ClaimRoles]:
        """
        The mapping of the ``roles_claim`` and ``roles_claim_map`` settings,
        or ``None`` when ``roles_claim`` is empty (no roles from claims).

        :raises ValueError: a mapping entry that does not parse.
        """
        claim = getattr(settings, "roles_claim", "")
        if not claim:
            return None
        return cls(claim=claim, mapping=getattr(settings, "roles_claim_map", ()))

    def roles(self, claims: Mapping[str, Any]) -> FrozenSet[str]:
        """
        The roles the claims give.  A missing claim, or one of the wrong
        type, gives none (never an error: the login goes on without roles).
        """
        return roles_from_claims(claims, self.claim, self.mapping)


def _claim_value(claims: Mapping[str, Any], claim: str) -> Any:
    if claim in claims:
        return claims[claim]
    value: Any = claims
    for part in claim.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def roles_from_claims(
    claims: Mapping[str, Any],
    claim: str,
    mapping: Optional[Mapping[str, FrozenSet[str]]] = None,
) -> FrozenSet[str]:
    """
    The roles an OpenID Connect claim gives (see `ClaimRoles`).  The claim
    may be a list of strings or one string of space-separated values.

    :param mapping: claim value → roles; empty or ``None``: values that are
        valid role names are taken as they are.
    """
    value = _claim_value(claims, claim) if isinstance(claims, Mapping) else None
    if isinstance(value, str):
        values: List[Any] = value.split()
    elif isinstance(value, list):
        values = value
    else:
        if value is not None:
            log.info(
                "twistauth: access: the {claim} claim is not a list of strings; no roles from it",
                claim=claim,
            )
        return frozenset()
    roles: set = set()
    for item in values:
        if not isinstance(item, str):
            continue
        if mapping:
            roles.update(mapping.get(item, ()))
        elif _ROLE.match(item):
            roles.add(item)
    return frozenset(roles)


# ---------------------------------------------------------------------------
# Requirements: require.auth, require.role, @method(..., roles=[...]).


@attr.s(frozen=True, slots=True)
class Requirement:
    """
    What a method or route needs: a logged-in session, and for each set of
    ``role_sets`` at least one of its roles.
    """

    auth: bool = attr.ib(default=False)
    role_sets: Tuple[FrozenSet[str], ...] = attr.ib(default=())

    def merge(self, other: Optional[Requirement]) -> Requirement:
        if other is None:
            return self
        sets = tuple(dict.fromkeys(self.role_sets + other.role_sets))
        return Requirement(auth=self.auth or other.auth, role_sets=sets)

    @property
    def needs_login(self) -> bool:
        return self.auth or bool(self.role_sets)

    def refusal(
        self, user_id: Optional[str], roles: FrozenSet[str]
    ) -> Optional[Tuple[TwistauthError, str]]:
        """
        The error and the log's reason if a caller (``user_id`` ``None``:
        anonymous) holding ``roles`` is refused, else ``None``.
        """
        if not self.needs_login:
            return None
        if user_id is None:
            return AuthRequiredError(), "it needs a logged-in session"
        for role_set in self.role_sets:
            if roles.isdisjoint(role_set):
                return (
                    ForbiddenError("this call needs a role this session does not have"),
                    f"it needs one of the roles {', '.join(sorted(role_set))}",
                )
        return None


def requirement_of(method: Method) -> Optional[Requirement]:
    """
    The requirement of a registered method: its ``roles`` and ``auth``
    options and any `require` marks on its function.

    :raises ValueError: the ``roles`` option is not a list of role names.
    """
    found: Optional[Requirement] = getattr(method.function, _MARK, None)
    roles = method.options.get("roles")
    if roles is not None:
        try:
            checked = check_role_names(roles)
        except ValueError as e:
            raise ValueError(f"method {method.name!r}: {e}") from None
        if not checked:
            raise ValueError(f"method {method.name!r}: roles=[] would let no one call it")
        found = Requirement(auth=True, role_sets=(checked,)).merge(found)
    if method.options.get("auth"):
        found = Requirement(auth=True).merge(found)
    return found


def _find_request(args: Sequence[Any]) -> Any:
    from twisted.web.iweb import IRequest

    for arg in args[:2]:
        if IRequest.providedBy(arg):
            return arg
    return None


def session_resolver(sessions: Any, transport: Any) -> Callable[[Any], Deferred[Any]]:
    """
    A ``resolve_session(request)`` for `Require` on a host application's
    Klein routes: the session the request's cookie or session header names
    (through the deployment's ``twistauth.web.transport.SessionTransport``),
    or ``None``.  Read-only: nothing is created or saved.

    :param sessions: the `twistauth.sessions.ISessionCache`.
    :param transport: the app's ``SessionTransport``.
    """

    def resolve(request: Any) -> Deferred[Any]:
        token, _ = transport.token(request)
        if token is None:
            return succeed(None)
        d: Deferred[Any] = sessions.load(token)
        return d

    return resolve


_GUARDS: weakref.WeakKeyDictionary[Callable[..., Any], Tuple[Callable[..., Any], Require]] = (
    weakref.WeakKeyDictionary()
)
"""Our guard wrappers: what each wraps and which `Require` made it."""


@attr.s(frozen=True, kw_only=True, eq=False)
class Require:
    """
    carafe's ``auth.require``: decorators for JSON methods and Klein routes.

    On a JSON method (below ``@method``, or anywhere: the mark survives
    ``functools.wraps``)::

        @method("admin.purge")
        @require.role("admin")
        def purge(handler): ...

    the authorizer refuses the call before it runs; the decorator also
    checks when it is called with a `Handler`, so the rule holds even in an
    app without the authorizer.  On a Klein route of a host application
    (below ``@app.route``), build a `Require` that can find the session::

        guard = Require(resolve_session=session_resolver(cache, transport))

        @app.route("/admin")
        @guard.role("admin")
        def admin_page(request): ...

    Not logged in answers ``401 auth_required``, logged in without the role
    ``403 forbidden``, in the JSON error envelope.

    :ivar resolve_session: ``resolve_session(request)`` → the request's
        `twistauth.sessions.Session` or ``None`` (a value or a Deferred);
        needed for routes only.
    :ivar control: the app's `AccessControl`: with it, a route also
        re-checks the account as JSON calls do (without saving the check
        time, so a route pays one role lookup per request once the
        session's check is due) and ends its sessions when it is gone.
    :ivar sessions: the session cache whose ``delete_user`` ends a gone
        account's sessions (routes only).
    :ivar clock: the time source of the account re-check (needed with
        ``control``).
    """

    resolve_session: Optional[Callable[[Any], Any]] = attr.ib(default=None)
    control: Optional[AccessControl] = attr.ib(default=None)
    sessions: Any = attr.ib(default=None)
    clock: Any = attr.ib(default=None)

    def __attrs_post_init__(self) -> None:
        if self.control is not None and self.clock is None:
            raise ValueError("Require(control=...) needs the clock its account re-check runs on")

    def auth(self, function: F) -> F:
        """
        Decorator: the caller must be logged in.
        """
        return self._guard(function, Requirement(auth=True))

    def role(self, *roles: str) -> Callable[[F], F]:
        """
        Decorator factory: the caller must be logged in and hold one of
        ``roles``.  Stacked decorators must all hold.

        :raises ValueError: no role given, or an invalid role name.
        """
        if not roles:
            raise ValueError("require.role needs at least one role, e.g. require.role('admin')")
        checked = check_role_names(roles)
        requirement = Requirement(auth=True, role_sets=(checked,))

        def decorate(function: F) -> F:
            return self._guard(function, requirement)

        return decorate

    def _guard(self, function: F, requirement: Requirement) -> F:
        if not callable(function):
            raise TypeError(f"require decorates functions, got {function!r}")
        guard = self
        stacked = _GUARDS.get(function)
        requirement = requirement.merge(getattr(function, _MARK, None))
        if stacked is not None:  # stacked: one wrapper checks everything
            function, below = stacked  # type: ignore[assignment]
            if guard.resolve_session is None:
                guard = below  # keep the one that can find sessions on routes

        @functools.wraps(function)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else None
            if isinstance(first, Handler):
                session = first.session
                refused = requirement.refusal(
                    session.user_id if session is not None else None,
                    session.roles if session is not None else frozenset(),
                )
                if refused is not None:
                    _log_refusal(first.method, session, refused[1], first.request)
                    raise refused[0]
                return function(*args, **kwargs)
            request = _find_request(args)
            if request is None:
                raise TypeError(
                    f"{function.__qualname__} is guarded by require: call it with a "
                    f"twistauth handler (JSON method) or a request (Klein route)"
                )
            return ensureDeferred(guard._route(request, requirement, function, args, kwargs))

        setattr(guarded, _MARK, requirement)
        _GUARDS[guarded] = (function, guard)
        return guarded  # type: ignore[return-value]

    async def _route(
        self,
        request: Any,
        requirement: Requirement,
        function: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
    ) -> Any:
        where = request.path.decode("utf-8", "replace")[:200]
        if self.resolve_session is None:
            log.error(
                "twistauth: access: the route {path} is guarded by require but its Require "
                "has no resolve_session: build Require(resolve_session=...) for routes",
                path=where,
            )
            return render_error(request, InternalError())
        try:
            session = await maybeDeferred(self.resolve_session, request)
            user_id = session.user_id if session is not None else None
            roles: FrozenSet[str] = session.roles if session is not None else frozenset()
            if user_id is not None and self.control is not None:
                live = await self.control.account_roles(session, self.clock.seconds())
                if live is None:
                    if self.sessions is not None:
                        await self.sessions.delete_user(user_id)
                    _log_refusal(where, session, "its account is gone or disabled", request)
                    return render_error(
                        request,
                        AuthRequiredError(
                            "this session has ended: its account is no longer active"
                        ),
                    )
                roles = live
        except TwistauthError as e:
            return render_error(request, e)
        refused = requirement.refusal(user_id, roles)
        if refused is not None:
            _log_refusal(where, session, refused[1], request)
            return render_error(request, refused[0])
        result = function(*args, **kwargs)
        if isinstance(result, Deferred) or inspect.isawaitable(result):
            result = await result
        return result


require = Require()
"""The decorators for JSON methods: ``@require.auth``, ``@require.role("admin")``."""


def _who(session: Any) -> str:
    if session is None or session.user_id is None:
        return "anonymous"
    return str(session.user_id)


def _log_refusal(method: str, session: Any, reason: str, request: Any) -> None:
    log.info(
        "twistauth: access: refused {method} for {who}: {reason}",
        method=method,
        who=_who(session),
        reason=reason,
        event="acl_refusal",
        request_id=request_id_of(request),
    )


# ---------------------------------------------------------------------------
# The access control: policy, authorizer, session ACLs.


def _read_only_grants(
    grants: Union[Iterable[str], Mapping[str, Any], None],
) -> Mapping[str, Tuple[str, ...]]:
    """
    `parse_role_grants`, as a mapping that cannot be changed.
    """
    return MappingProxyType(parse_role_grants(grants))


def _recheck_interval(value: Optional[float]) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 86400:
        raise ValueError(f"recheck_interval must be from 0 to 86400 seconds or None, got {value!r}")
    return float(value)


@attr.s(kw_only=True, eq=False)
class AccessControl:
    """
    The deployment's access policy and the authorizer that applies it.

    Install it with ``Dispatcher(authorize=control.authorize)`` and put it
    in ``Services.access`` so that `acl` finds it.

    :ivar initial: the ACL of anonymous sessions (patterns).
    :ivar lifted: the ACL of logged-in (or lifted) sessions, before role
        grants.
    :ivar role_grants: role → patterns added to the lifted ACL of a session
        holding the role.
    :ivar lift_on_login: a logged-in session starts lifted (default);
        false: it keeps the initial ACL until a method or hook calls
        `lift_acl_restrictions` (gevent-socketio's behaviour).
    :ivar roles: where roles and account liveness come from; ``None``: the
        app's user store (``handler.services.users``), if any.
    :ivar recheck_interval: seconds between two checks of a logged-in
        session's account (0: every call; ``None``: never).

    ``initial``, ``lifted``, ``role_grants`` and ``lift_on_login`` are
    read-only once made (compiled ACLs are cached from them): make a new
    `AccessControl` for another policy.
    """

    initial: Tuple[str, ...] = attr.ib(
        default=DEFAULT_INITIAL_ACL, converter=check_acl_patterns, on_setattr=attr.setters.frozen
    )
    lifted: Tuple[str, ...] = attr.ib(
        default=DEFAULT_LIFTED_ACL, converter=check_acl_patterns, on_setattr=attr.setters.frozen
    )
    role_grants: Mapping[str, Tuple[str, ...]] = attr.ib(
        factory=dict, converter=_read_only_grants, on_setattr=attr.setters.frozen
    )
    lift_on_login: bool = attr.ib(default=True, on_setattr=attr.setters.frozen)
    roles: Optional[IRoleProvider] = attr.ib(default=None)
    recheck_interval: Optional[float] = attr.ib(
        default=DEFAULT_RECHECK_INTERVAL, converter=_recheck_interval
    )
    _compiled: Dict[Any, CompiledACL] = attr.ib(factory=dict, init=False)
    _requirements: Dict[str, Tuple[Method, Optional[Requirement]]] = attr.ib(
        factory=dict, init=False
    )
    _checks: Dict[int, Tuple[Any, List[Deferred[None]]]] = attr.ib(factory=dict, init=False)
    _store_roles: Optional[Tuple[Any, StoreRoles]] = attr.ib(default=None, init=False)

    @roles.validator
    def _check_roles(self, attribute: Any, value: Any) -> None:
        if value is not None and not IRoleProvider.providedBy(value):
            raise TypeError(f"roles must provide IRoleProvider, got {value!r}")

    @classmethod
    def from_settings(
        cls, settings: Any, *, users: Any = None, roles: Optional[IRoleProvider] = None
    ) -> AccessControl:
        """
        The access control the settings describe (keys ``acl_initial``,
        ``acl_lifted``, ``acl_role_grants``, ``acl_lift_on_login``,
        ``access_account_check``, ``access_recheck_interval``; each
        optional, with the defaults above).

        :param users: the user store: roles and liveness come from it
            unless ``roles`` is given.
        :param roles: a host application's `IRoleProvider` (combined with
            the store's when both are given: the store decides liveness).
        :raises ValueError: a pattern, role or grant that does not parse.
        """
        provider = roles
        if users is not None:
            store = StoreRoles(users=users)
            provider = store if roles is None else CombinedRoles(primary=store, extra=(roles,))
        interval = getattr(settings, "access_recheck_interval", DEFAULT_RECHECK_INTERVAL)
        if not getattr(settings, "access_account_check", True):
            interval = None
        return cls(
            initial=getattr(settings, "acl_initial", DEFAULT_INITIAL_ACL),
            lifted=getattr(settings, "acl_lifted", DEFAULT_LIFTED_ACL),
            role_grants=getattr(settings, "acl_role_grants", ()),
            lift_on_login=getattr(settings, "acl_lift_on_login", True),
            roles=provider,
            recheck_interval=interval,
        )

    # -- compiled ACLs -----------------------------------------------------

    def compiled(
        self,
        base: str,
        roles: FrozenSet[str] = frozenset(),
        allow: Tuple[str, ...] = (),
        deny: Tuple[str, ...] = (),
    ) -> CompiledACL:
        """
        The compiled ACL for a base (`INITIAL` or `LIFTED`), the session's
        roles (they matter to a lifted base only) and its own changes.
        """
        if base != LIFTED:
            roles = frozenset()
        key = (base, roles, allow, deny)
        found = self._compiled.get(key)
        if found is not None:
            return found
        rules = set(self.initial if base == INITIAL else self.lifted)
        if base == LIFTED:
            for role in roles:
                rules.update(self.role_grants.get(role, ()))
        rules.update(allow)
        origin = base if not (allow or deny) else f"session's ({base})"
        found = CompiledACL(frozenset(rules), frozenset(deny), origin)
        if len(self._compiled) >= 1024:
            self._compiled.clear()
        self._compiled[key] = found
        return found

    def default_base(self, user_id: Optional[str]) -> str:
        """
        The base of a session's ACL before anyone changed it.
        """
        return LIFTED if user_id is not None and self.lift_on_login else INITIAL

    def state(self, session: Any) -> Tuple[str, Tuple[str, ...], Tuple[str, ...]]:
        """
        ``(base, allow, deny)`` of a session's ACL (``session`` may be
        ``None``: no session yet).
        """
        if session is None:
            return INITIAL, (), ()
        user_id = session.user_id
        raw = session.get(ACL_KEY)
        if raw is not None:
            try:
                if raw["user"] == user_id:
                    base = raw["base"]
                    if base not in (INITIAL, LIFTED):
                        raise ValueError(base)
                    allow = tuple(check_acl_pattern(p) for p in raw["allow"])
                    deny = tuple(check_acl_pattern(p) for p in raw["deny"])
                    return base, allow, deny
            except (KeyError, TypeError, ValueError):
                log.warn(
                    "twistauth: access: the stored ACL of a session of {who} is malformed; "
                    "the initial ACL applies",
                    who=_who(session),
                )
                return INITIAL, (), ()
        return self.default_base(user_id), (), ()

    def acl_of(self, session: Any) -> CompiledACL:
        """
        The compiled ACL of a session (or of no session: the initial one).
        """
        if session is None:
            return self.compiled(INITIAL)
        base, allow, deny = self.state(session)
        return self.compiled(base, session.roles, allow, deny)

    def write_state(
        self, session: Any, base: str, allow: Iterable[str], deny: Iterable[str]
    ) -> None:
        """
        Store a session's ACL (or remove the stored one when it is the default).
        """
        allow = sorted(set(allow))
        deny = sorted(set(deny))
        if base == self.default_base(session.user_id) and not allow and not deny:
            if ACL_KEY in session:
                del session[ACL_KEY]
            return
        session[ACL_KEY] = {"user": session.user_id, "base": base, "allow": allow, "deny": deny}

    # -- requirements ------------------------------------------------------

    def requirement(self, method: Method) -> Optional[Requirement]:
        """
        The requirement of a registered method (cached per method object).
        """
        cached = self._requirements.get(method.name)
        if cached is not None and cached[0] is method:
            return cached[1]
        found = requirement_of(method)
        self._requirements[method.name] = (method, found)
        return found

    def check_registry(self, registry: Any) -> List[str]:
        """
        Check every registered method's requirement at start-up and list
        the methods no ACL could ever let anyone call (logged as a warning).

        :return: the unreachable methods' names.
        :raises ValueError: a method's ``roles`` option is not a list of
            role names (the message names the method).
        """
        union = set(self.initial) | set(self.lifted)
        for patterns in self.role_grants.values():
            union.update(patterns)
        everything = CompiledACL(frozenset(union), frozenset(), "configured")
        unreachable = []
        for name in registry.names():
            self.requirement(registry.lookup(name))
            if everything.refusal(name) is not None:
                unreachable.append(name)
        if unreachable:
            log.warn(
                "twistauth: access: no ACL rule allows {methods}: nobody can call them "
                "unless a method adds them with add_acl_method",
                methods=", ".join(unreachable),
            )
        return unreachable

    # -- the authorizer ----------------------------------------------------

    def authorize(self, handler: Handler, method: Method) -> Optional[Deferred[None]]:
        """
        The dispatcher's hook: refuse the call (raise, or fail the returned
        Deferred, with `AuthRequiredError` or `ForbiddenError`) or let it
        run (return ``None``: the common case costs no Deferred).
        """
        session = handler.session
        if (
            session is not None
            and session.user_id is not None
            and self.recheck_interval is not None
        ):
            if self._due(session, handler.services.clock.seconds()):
                provider = self._provider(handler)
                if provider is not None:
                    d = self._recheck(handler, session, provider)
                    d.addCallback(lambda _: self._decide(handler, method))
                    return d
        self._decide(handler, method)
        return None

    __call__ = authorize

    def _decide(self, handler: Handler, method: Method) -> None:
        session = handler.session
        requirement = self.requirement(method)
        if requirement is not None:
            refused = requirement.refusal(
                session.user_id if session is not None else None,
                session.roles if session is not None else frozenset(),
            )
            if refused is not None:
                _log_refusal(method.name, session, refused[1], handler.request)
                raise refused[0]
        reason = self.acl_of(session).refusal(method.name)
        if reason is not None:
            _log_refusal(method.name, session, reason, handler.request)
            raise ForbiddenError(f"this session may not call {method.name!r}")

    def _provider(self, handler: Handler) -> Optional[IRoleProvider]:
        if self.roles is not None:
            return self.roles
        users = getattr(handler.services, "users", None)
        if users is None:
            return None
        if self._store_roles is None or self._store_roles[0] is not users:
            self._store_roles = (users, StoreRoles(users=users))
        return self._store_roles[1]

    def _due(self, session: Any, now: float) -> bool:
        stamp = session.get(CHECK_KEY)
        if not isinstance(stamp, dict) or stamp.get("user") != session.user_id:
            return True
        at = stamp.get("at")
        if isinstance(at, bool) or not isinstance(at, (int, float)):
            return True
        return not (at <= now < at + self.recheck_interval)  # type: ignore[operator]

    def _recheck(self, handler: Handler, session: Any, provider: IRoleProvider) -> Deferred[None]:
        """
        Check the session's account; concurrent calls on one session (the
        entries of a batch) share one check, each with its own Deferred.
        """
        mine: Deferred[None] = Deferred()
        # Sessions are unhashable (mutable mappings): keyed by identity,
        # holding the session so that the id cannot be reused meanwhile.
        waiting = self._checks.get(id(session))
        if waiting is not None and waiting[0] is session:
            waiting[1].append(mine)
            return mine
        self._checks[id(session)] = (session, [mine])

        def settle(result: Any) -> None:
            _, waiters = self._checks.pop(id(session), (None, []))
            for d in waiters:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)

        ensureDeferred(self._check_account(handler, session, provider)).addBoth(settle)
        return mine

    async def _check_account(self, handler: Handler, session: Any, provider: IRoleProvider) -> None:
        user_id = session.user_id
        roles = await maybeDeferred(provider.roles_for, user_id)
        current: Any = handler.session
        if current is not session or session.user_id != user_id:
            return  # logged out or in as someone else meanwhile: decided anew
        if roles is None:
            log.info(
                "twistauth: access: the account of {user} is gone or disabled: "
                "every session of it ends",
                user=user_id,
            )
            await handler.log_out_everywhere(user_id)
            await handler.log_out()
            raise AuthRequiredError("this session has ended: its account is no longer active")
        fresh = frozenset(roles)
        if fresh != session.roles:
            log.info(
                "twistauth: access: the roles of {user} changed to {roles}",
                user=user_id,
                roles=", ".join(sorted(fresh)) or "(none)",
            )
            session.set_roles(fresh)
        session[CHECK_KEY] = {"user": user_id, "at": handler.services.clock.seconds()}

    def account_roles(self, session: Any, now: float) -> Deferred[Optional[FrozenSet[str]]]:
        """
        A logged-in session's roles, re-checked through the role provider
        when the session's check is due at ``now`` (nothing is saved):
        ``None`` when the account is gone or disabled.  Used by `Require`
        on routes.
        """
        if self.roles is None or self.recheck_interval is None or not self._due(session, now):
            return succeed(session.roles)

        def found(roles: Any) -> Optional[FrozenSet[str]]:
            return None if roles is None else frozenset(roles)

        d: Deferred[Optional[FrozenSet[str]]] = maybeDeferred(
            self.roles.roles_for, session.user_id
        ).addCallback(found)
        return d


# ---------------------------------------------------------------------------
# A session's ACL, as methods and hooks see it.


_last_default: List[Any] = [None, None]


def access_control(handler: Any) -> AccessControl:
    """
    The app's `AccessControl`: ``handler.services.access``, or one built
    from ``handler.services.settings`` (an app without the wiring).
    """
    services = handler.services
    control = getattr(services, "access", None)
    if control is not None:
        return control
    settings = services.settings
    if _last_default[0] is not settings:
        _last_default[1] = AccessControl.from_settings(settings)
        _last_default[0] = settings
    return _last_default[1]


@attr.s(frozen=True, slots=True)
class SessionACL:
    """
    The caller's ACL (gevent-socketio's namespace ACL).  Get it with `acl`.

    Changes are kept in the session and saved after the call; a change on
    a call without a session creates one (the client gets its token).
    Changing privileges does not change the session id: call
    ``handler.renew_session()`` as well where that matters.
    """

    control: AccessControl = attr.ib()
    handler: Any = attr.ib()

    def allows(self, name: str) -> bool:
        """
        Whether the session's ACL lets it call ``name`` (the ACL alone).
        """
        return self.control.acl_of(self.handler.session).refusal(name) is None

    def is_method_allowed(self, name: str) -> bool:
        """
        Whether a call of ``name`` would be let through now: the method is
        registered, its requirement holds, and the ACL allows it.
        """
        registry = getattr(self.handler.services, "registry", None)
        method = registry.lookup(name) if registry is not None else None
        if method is None:
            return False
        session = self.handler.session
        requirement = self.control.requirement(method)
        if requirement is not None and requirement.refusal(
            session.user_id if session is not None else None,
            session.roles if session is not None else frozenset(),
        ):
            return False
        return self.allows(name)

    def rules(self) -> Dict[str, Any]:
        """
        The session's ACL: ``{"base": ..., "allow": [...], "deny": [...]}``
        (``allow`` and ``deny`` are its own changes to the base).
        """
        base, allow, deny = self.control.state(self.handler.session)
        return {"base": base, "allow": list(allow), "deny": list(deny)}

    def _change(self, change: Callable[[Any], None], create: bool = True) -> Deferred[None]:
        session = self.handler.session
        if session is not None:
            change(session)
            return succeed(None)
        if not create:
            return succeed(None)
        d: Deferred[None] = self.handler.ensure_session().addCallback(change)
        return d

    def lift(self) -> Deferred[None]:
        """
        Lift the restrictions: everything the session's roles allow (the
        lifted ACL and its role grants), dropping earlier changes.
        """
        return self._change(lambda s: self.control.write_state(s, LIFTED, (), ()))

    def reset(self) -> Deferred[None]:
        """
        Back to the initial ACL, dropping earlier changes.
        """
        return self._change(lambda s: self.control.write_state(s, INITIAL, (), ()), create=False)

    def add(self, pattern: str) -> Deferred[None]:
        """
        Allow ``pattern`` (a method name or namespace).

        :raises ValueError: it does not parse.
        """
        check_acl_pattern(pattern)

        def change(session: Any) -> None:
            base, allow, deny = self.control.state(session)
            self.control.write_state(session, base, set(allow) | {pattern}, set(deny) - {pattern})

        return self._change(change)

    def remove(self, pattern: str) -> Deferred[None]:
        """
        Refuse ``pattern`` (a method name or namespace), even where a
        broader rule allows it.

        :raises ValueError: it does not parse.
        """
        check_acl_pattern(pattern)

        def change(session: Any) -> None:
            base, allow, deny = self.control.state(session)
            self.control.write_state(session, base, set(allow) - {pattern}, set(deny) | {pattern})

        return self._change(change)


def acl(handler: Any) -> SessionACL:
    """
    The caller's ACL::

        await acl(handler).add("reports.export")
        if acl(handler).is_method_allowed("admin.purge"): ...
    """
    return SessionACL(access_control(handler), handler)


def lift_acl_restrictions(handler: Any) -> Deferred[None]:
    """
    gevent-socketio's name for ``acl(handler).lift()``.
    """
    return acl(handler).lift()


def add_acl_method(handler: Any, name: str) -> Deferred[None]:
    """
    gevent-socketio's name for ``acl(handler).add(name)``.
    """
    return acl(handler).add(name)


def del_acl_method(handler: Any, name: str) -> Deferred[None]:
    """
    gevent-socketio's name for ``acl(handler).remove(name)``.
    """
    return acl(handler).remove(name)


def reset_acl(handler: Any) -> Deferred[None]:
    """
    gevent-socketio's name for ``acl(handler).reset()``.
    """
    return acl(handler).reset()


def is_method_allowed(handler: Any, name: str) -> bool:
    """
    gevent-socketio's name for ``acl(handler).is_method_allowed(name)``.
    """
    return acl(handler).is_method_allowed(name)


__all__ = [
    "ACL_KEY",
    "AccessControl",
    "CHECK_KEY",
    "ClaimRoles",
    "CombinedRoles",
    "CompiledACL",
    "DEFAULT_INITIAL_ACL",
    "DEFAULT_LIFTED_ACL",
    "IRoleProvider",
    "Require",
    "Requirement",
    "SessionACL",
    "StaticRoles",
    "StoreRoles",
    "access_control",
    "acl",
    "add_acl_method",
    "check_acl_pattern",
    "check_acl_patterns",
    "check_claim_mapping",
    "check_role_grant",
    "check_role_name",
    "check_role_names",
    "del_acl_method",
    "is_method_allowed",
    "lift_acl_restrictions",
    "parse_claim_map",
    "parse_role_grants",
    "require",
    "requirement_of",
    "reset_acl",
    "roles_from_claims",
    "session_resolver",
]
