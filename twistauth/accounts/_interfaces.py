"""
The user record and the contracts of the account stores and the login
throttle.

A `User` is an immutable record; a store keeps them by ``user_id``.  Every
store operation answers through a Deferred, whatever the backend (memory
answers at once, the YAML file from a thread, Redis over the network), so
callers never branch on the backend.  A backend that cannot be reached or
written fails the Deferred with `twistauth.errors.BackendUnavailableError`
(503): an outage is never mistaken for "no such user".

Writes are compare-and-set: every record carries a ``version``, a store
refuses to replace a record whose version changed since it was read
(`UserConflictError`), and `modify_user` retries.  Later issues add OAuth
tokens (the ``tokens`` field is reserved for them) and login flows to the
store.
"""

from __future__ import annotations

import copy
import math
import unicodedata
from typing import Any, Callable, Dict, FrozenSet, Iterable, Optional

import attr
from twisted.internet.defer import ensureDeferred
from zope.interface import Attribute, Interface

from twistauth.accounts.errors import InvalidUserIdError, UnknownUserError, UserConflictError

MAX_USER_ID_LENGTH = 256


def check_user_id(user_id: Any) -> str:
    """
    Check a user id and return it in Unicode normal form C, so that an id
    typed with combining accents names the same account as the precomposed
    one.  User ids are otherwise compared exactly (case matters).

    :raises InvalidUserIdError: not a string, empty, longer than 256
        characters, with leading or trailing white space, or with control
        or format characters.
    """
    if not isinstance(user_id, str):
        raise InvalidUserIdError()
    try:
        normal = unicodedata.normalize("NFC", user_id)
        normal.encode("utf-8")
    except UnicodeError:
        raise InvalidUserIdError() from None
    if not normal or len(normal) > MAX_USER_ID_LENGTH or normal != normal.strip():
        raise InvalidUserIdError()
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for c in normal):
        raise InvalidUserIdError()
    return normal


def _roles(value: Iterable[str]) -> FrozenSet[str]:
    return frozenset(value)


@attr.s(frozen=True, kw_only=True, slots=True)
class User:
    """
    One account.  Immutable: make a changed copy with `evolve`.

    :ivar user_id: the account's id (see `check_user_id`).
    :ivar password_hash: the argon2 hash of the password (PHC string), or
        ``None`` for accounts that log in elsewhere (OpenID Connect).  Never
        shown in ``repr``.
    :ivar roles: the roles a session of this user gets.
    :ivar disabled: a disabled account cannot log in.
    :ivar created: when the account was created (clock seconds), set by the store.
    :ivar updated: when the record was last written (clock seconds), set by the store.
    :ivar profile: application data (JSON values): what `Account` reads and
        writes.
    :ivar tokens: reserved for the OpenID Connect issue (token sets by
        provider); JSON values, never shown in ``repr``.
    :ivar version: incremented by every write; the store's compare-and-set
        uses it.  0 for a record that was never stored.
    """

    user_id: str = attr.ib()
    password_hash: Optional[str] = attr.ib(default=None, repr=False)
    roles: FrozenSet[str] = attr.ib(default=frozenset(), converter=_roles)
    disabled: bool = attr.ib(default=False)
    created: float = attr.ib(default=0.0)
    updated: float = attr.ib(default=0.0)
    profile: Dict[str, Any] = attr.ib(factory=dict)
    tokens: Dict[str, Any] = attr.ib(factory=dict, repr=False)
    version: int = attr.ib(default=0)

    def evolve(self, **changes: Any) -> User:
        """
        A copy with ``changes`` applied (the version stays: the store bumps it).
        """
        return attr.evolve(self, **changes)

    def to_record(self) -> Dict[str, Any]:
        """
        The record as plain JSON/YAML values, for storage.
        """
        return {
            "user_id": self.user_id,
            "password_hash": self.password_hash,
            "roles": sorted(self.roles),
            "disabled": self.disabled,
            "created": self.created,
            "updated": self.updated,
            "profile": copy.deepcopy(self.profile),
            "tokens": copy.deepcopy(self.tokens),
            "version": self.version,
        }

    @classmethod
    def from_record(cls, record: Any) -> User:
        """
        Rebuild a user from `to_record`'s form.

        :raises ValueError: a field is missing or of the wrong type; the
            message names it.
        """
        if not isinstance(record, dict):
            raise ValueError("a user record must be a mapping")

        def field(name: str, types: Any, default: Any = None, required: bool = False) -> Any:
            if name not in record:
                if required:
                    raise ValueError(f"field {name!r} is missing")
                return default
            value = record[name]
            if isinstance(value, bool) and bool not in types:
                raise ValueError(f"field {name!r} has the wrong type")
            if not isinstance(value, types):
                raise ValueError(f"field {name!r} has the wrong type")
            return value

        roles = field("roles", (list,), [])
        if not all(isinstance(r, str) for r in roles):
            raise ValueError("field 'roles' must be a list of strings")
        created = float(field("created", (int, float), 0.0))
        updated = float(field("updated", (int, float), 0.0))
        if not (math.isfinite(created) and math.isfinite(updated)):
            raise ValueError("fields 'created' and 'updated' must be finite numbers")
        return cls(
            user_id=field("user_id", (str,), required=True),
            password_hash=field("password_hash", (str, type(None))),
            roles=roles,
            disabled=field("disabled", (bool,), False),
            created=created,
            updated=updated,
            profile=copy.deepcopy(field("profile", (dict,), {})),
            tokens=copy.deepcopy(field("tokens", (dict,), {})),
            version=field("version", (int,), 0),
        )


class IUserStore(Interface):
    """
    Keeps `User` records by id.  Every method answers with a Deferred; a
    backend that cannot be reached or written fails it with
    `twistauth.errors.BackendUnavailableError`.  Stores stamp ``created``
    and ``updated`` from their injected clock and keep ``version``.
    """

    name: str = Attribute('The kind of store: ``"memory"``, ``"yaml"`` or ``"redis"``.')

    def get(user_id: str) -> Any:
        """
        :return: Deferred firing with the `User`, or ``None`` if there is none.
        """

    def create(user: User) -> Any:
        """
        Store a new user.  Of two concurrent creates of one id (in any
        process) exactly one succeeds.

        :return: Deferred firing with the stored `User` (version 1, times
            stamped), or failing with `UserExistsError`.
        """

    def replace(user: User) -> Any:
        """
        Write ``user`` over the stored record, if the stored record's version
        is still ``user.version`` (compare-and-set).

        :return: Deferred firing with the stored `User` (version + 1,
            ``updated`` stamped), or failing with `UserConflictError` (the
            record changed meanwhile) or `UnknownUserError` (it was deleted).
        """

    def delete(user_id: str) -> Any:
        """
        :return: Deferred firing with ``True`` if a user was deleted,
            ``False`` if there was none.
        """

    def user_ids() -> Any:
        """
        :return: Deferred firing with a sorted list of every user id.
        """


def modify_user(
    store: IUserStore,
    user_id: str,
    change: Callable[[User], User],
    *,
    attempts: int = 5,
) -> Any:
    """
    Read a user, apply ``change`` and write the result, retrying from a
    fresh read when another writer got there first.

    :param change: a pure function from the stored `User` to the new one
        (it may be called more than once).
    :return: Deferred firing with the stored `User`, or failing with
        `UnknownUserError`, or `UserConflictError` after ``attempts``
        conflicts in a row.
    """

    async def run() -> User:
        for attempt in range(attempts):
            user = await store.get(user_id)
            if user is None:
                raise UnknownUserError()
            try:
                return await store.replace(change(user))
            except UserConflictError:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    return ensureDeferred(run())


class ILoginThrottle(Interface):
    """
    Counts failed login attempts per account and per client address in a
    sliding window, and refuses attempts over the limit.

    An attempt is counted when it begins (`attempt`), so a burst of
    concurrent guesses cannot slip past the limit; `succeeded` then takes
    it back: it clears the account's failures (the owner proved the
    password) and removes this one attempt from the address's count, but
    never the address's other failures.  An attempt that failed needs no
    call.  Every method answers with a Deferred; a backend outage fails it
    with `twistauth.errors.BackendUnavailableError` (logins fail closed).
    """

    def attempt(account: Optional[str], address: str) -> Any:
        """
        Begin an attempt for ``account`` (``None``: count only the address,
        e.g. for account creation) from ``address``.

        :return: Deferred firing with an opaque attempt record to give to
            `succeeded`, or failing with `LoginThrottledError` (429, with a
            ``Retry-After`` header) when the account or the address is over
            its limit; a refused attempt is not counted.
        """

    def succeeded(attempt: Any) -> Any:
        """
        The attempt succeeded: forget the account's failures and this
        attempt's count against its address.

        :return: Deferred firing with ``None``.
        """


__all__ = [
    "ILoginThrottle",
    "IUserStore",
    "MAX_USER_ID_LENGTH",
    "User",
    "check_user_id",
    "modify_user",
]
