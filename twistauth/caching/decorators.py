"""
The decorators: ``@cached`` for methods that read, ``@invalidates`` for
methods that write.

::

    @method("profile.get")
    @cached(ttl=60, namespace="profile", per_user=True, cascade=["feed"])
    async def get_profile(handler, fields: List[str], nonce: str = "") -> dict: ...

    @method("profile.update")
    @invalidates("profile", per_user=True)
    async def update_profile(handler, name: str) -> None: ...

Both keep the function's signature (``functools.wraps``; ``inspect.signature``
follows ``__wrapped__``), docstring and marks, so they compose with
`twistauth.methods.registry.method` in either order and the registry still
checks parameters against the real signature.  The cache is found at call
time as ``handler.services.method_cache`` (a `twistauth.caching.MethodCache`); an
app without one runs the methods uncached.

Everything that can be wrong is refused when the decorator is applied: a
TTL that is not a positive number of seconds up to a day, a bad namespace,
an ``ignore`` naming no parameter, a parameter whose annotation or default
JSON cannot carry (``bytes``, ``set``, a ``datetime``, a ``Tuple``), a
function that takes ``*args``.  A cascade naming an unknown namespace is
refused at start-up, by `twistauth.caching.MethodCache.configure`.

A cached result is shared by every caller with the same parameters (and the
same user, with ``per_user``): cache only what depends on nothing else, not
on the session, the roles or the time.  The authorizer runs before the
method, so a cached result is never served to a caller the ACL or the
method's role requirement refuses.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from twistauth.caching.cache import CACHE_MARK, INVALIDATES_MARK, CacheSpec, InvalidatesSpec
from twistauth.caching.keys import canonical, check_namespace, check_namespaces

log = Logger()

F = TypeVar("F", bound=Callable[..., Any])

MAX_TTL = 86400.0

_REQUIRE_MARK = "__twistauth_require__"
_JSON_SCALARS = (str, int, float, bool, type(None))
_warned: set = set()


def _json_annotation(annotation: Any) -> bool:
    """
    Whether a decoded JSON value can be what ``annotation`` names.
    """
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if annotation in _JSON_SCALARS or annotation in (list, dict):
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list:
        return all(_json_annotation(a) for a in args)
    if origin is dict:
        return not args or (args[0] is str and _json_annotation(args[1]))
    if origin is typing.Union:
        return all(_json_annotation(a) for a in args)
    if origin is typing.Literal:
        return all(isinstance(a, _JSON_SCALARS) for a in args)
    return False


def _check_ttl(ttl: Any) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise ValueError(f"ttl must be a number of seconds, got {ttl!r}")
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be more than 0 and at most {MAX_TTL:g} seconds, got {ttl!r}")
    return float(ttl)


def _check_ignore(ignore: Any) -> FrozenSet[str]:
    if isinstance(ignore, str) or not isinstance(ignore, Iterable):
        raise ValueError(
            f"ignore must be a list of parameter names such as ['nonce'], got {ignore!r}"
        )
    names = frozenset(ignore)
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"ignore names parameters; {name!r} is not a parameter name")
    return names


def _takes_dict(params: List[inspect.Parameter]) -> bool:
    rest = params[1:]
    return (
        len(rest) == 1
        and rest[0].name == "parameters"
        and rest[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    )


def _check_function(function: Callable[..., Any], ignore: FrozenSet[str], what: str) -> Any:
    """
    Check a function can be cached; return ``(signature, takes_dict,
    defaults, var_keyword)``.
    """
    if not callable(function):
        raise TypeError(f"{what} decorates functions, got {function!r}")
    name = getattr(function, "__qualname__", repr(function))
    signature = inspect.signature(function)
    params = list(signature.parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise TypeError(f"{what}: {name} must take the handler as its first positional parameter")
    takes_dict = _takes_dict(params)
    try:
        hints = typing.get_type_hints(function)
    except Exception:
        hints = {}  # unresolvable annotations: checked on the values at call time
    defaults: Dict[str, Any] = {}
    var_keyword: Optional[str] = None
    names = set()
    for p in params[1:]:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{what}: {name} takes *{p.name}; methods take keyword parameters")
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = p.name
            continue
        names.add(p.name)
        if takes_dict:
            continue
        hint = hints.get(p.name, inspect.Parameter.empty)
        if not _json_annotation(hint):
            raise TypeError(
                f"{what}: parameter {p.name!r} of {name} is annotated {hint!r}, which JSON "
                f"cannot carry: cached parameters must be JSON values (str, int, float, "
                f"bool, None, List[...], Dict[str, ...], Optional/Union of these)"
            )
        if p.default is not inspect.Parameter.empty:
            try:
                canonical(p.default)
            except (TypeError, ValueError):
                raise TypeError(
                    f"{what}: the default of parameter {p.name!r} of {name} "
                    f"({p.default!r}) is not a JSON value"
                ) from None
            defaults[p.name] = p.default
    if not takes_dict and var_keyword is None:
        unknown = sorted(ignore - names)
        if unknown:
            raise ValueError(
                f"{what}: ignore names {unknown[0]!r}, which is not a parameter of {name} "
                f"(it takes {', '.join(sorted(names)) or 'no parameters'})"
            )
    return signature, takes_dict, defaults, var_keyword


def _session_user(handler: Any) -> Optional[str]:
    session = handler.session
    return session.user_id if session is not None else None


def _cache_of(handler: Any, name: str) -> Any:
    cache = getattr(handler.services, "method_cache", None)
    if cache is None and name not in _warned:
        _warned.add(name)
        log.warn(
            "twistauth: cache: {method} is cached but the app has no method cache "
            "(services.method_cache): it runs uncached",
            method=name,
        )
    return cache


def cached(
    *,
    namespace: str,
    ttl: float = 60,
    per_user: bool = False,
    cascade: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> Callable[[F], F]:
    """
    Cache a method's result (carafe's ``cached_view``).

    :param namespace: the group of entries one invalidation clears.
    :param ttl: seconds an entry lives (at most a day).
    :param per_user: entries are per logged-in user (anonymous callers share
        one entry); otherwise shared by everyone allowed to call.
    :param cascade: namespaces invalidated whenever ``namespace`` is (their
        entries are built from this one's data).
    :param ignore: parameters left out of the key (a nonce, a client's
        request id).
    :raises ValueError: or `TypeError`: a bad argument or a function whose
        parameters are not JSON (see the module docstring).
    """
    namespace = check_namespace(namespace)
    spec = CacheSpec(
        ttl=_check_ttl(ttl),
        namespace=namespace,
        per_user=bool(per_user),
        cascade=tuple(c for c in check_namespaces(cascade, "cascade") if c != namespace),
        ignore=_check_ignore(ignore),
    )

    def decorate(function: F) -> F:
        signature, takes_dict, defaults, var_keyword = _check_function(
            function, spec.ignore, "cached"
        )
        first = next(iter(signature.parameters))
        ignored = spec.ignore

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            handler = args[0]
            cache = _cache_of(handler, handler.method)
            if cache is None:
                return function(*args, **kwargs)
            requirement = getattr(function, _REQUIRE_MARK, None)
            if requirement is not None:
                # A guard below this decorator must hold before any hit.
                session = handler.session
                refused = requirement.refusal(
                    _session_user(handler),
                    session.roles if session is not None else frozenset(),
                )
                if refused is not None:
                    raise refused[0]
            if takes_dict:
                given = args[1] if len(args) > 1 else kwargs.get("parameters", {})
                parameters = dict(given) if isinstance(given, dict) else given
            elif len(args) == 1:
                parameters = {**defaults, **kwargs}
            else:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                parameters = dict(bound.arguments)
                del parameters[first]
                if var_keyword is not None:
                    parameters.update(parameters.pop(var_keyword, {}))
            if ignored and isinstance(parameters, dict):
                parameters = {k: v for k, v in parameters.items() if k not in ignored}
            user = _session_user(handler) if spec.per_user else None
            cache.ensure_configured(getattr(handler.services, "registry", None))
            return cache.call(
                spec, handler.method, parameters, user, lambda: function(*args, **kwargs)
            )

        setattr(wrapper, CACHE_MARK, spec)
        return wrapper  # type: ignore[return-value]

    return decorate


def invalidates(*namespaces: str, per_user: bool = False) -> Callable[[F], F]:
    """
    After the method succeeds, invalidate ``namespaces`` (and what they
    cascade to) before answering, so the caller's next read sees the change.

    :param per_user: invalidate only the calling user's per-user entries
        (a namespace that also holds shared entries is invalidated whole).
    :raises ValueError: no namespace, or a bad one.
    """
    if not namespaces:
        raise ValueError("invalidates needs at least one namespace, e.g. invalidates('profile')")
    spec = InvalidatesSpec(
        namespaces=check_namespaces(namespaces, "invalidates"), per_user=bool(per_user)
    )

    def decorate(function: F) -> F:
        if not callable(function):
            raise TypeError(f"invalidates decorates functions, got {function!r}")

        def invalidate(handler: Any, user: Optional[str]) -> Optional[Deferred[None]]:
            cache = _cache_of(handler, handler.method)
            if cache is None:
                return None
            cache.ensure_configured(getattr(handler.services, "registry", None))
            d: Deferred[None] = cache.invalidate(spec.namespaces, user)
            return d

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            handler = args[0]
            user = _session_user(handler) if spec.per_user else None
            result = function(*args, **kwargs)
            if isinstance(result, Deferred) or inspect.iscoroutine(result):

                async def then() -> Any:
                    value = await result
                    pending = invalidate(handler, user)
                    if pending is not None:
                        await pending
                    return value

                return ensureDeferred(then())
            pending = invalidate(handler, user)
            if pending is not None and not pending.called:
                return pending.addCallback(lambda _: result)
            return result

        setattr(wrapper, INVALIDATES_MARK, spec)
        return wrapper  # type: ignore[return-value]

    return decorate


__all__ = ["MAX_TTL", "cached", "invalidates"]
