"""
The current account as a dict-like object (Toto's ``TotoAccount``): its
profile loads on first use and is saved explicitly.

::

    from twistauth.accounts import current_account

    @method("profile.set_name")
    async def set_name(handler, name: str):
        account = current_account(handler)   # no I/O yet
        old = await account.get("name")      # loads the record once
        account["name"] = name               # recorded, not yet written
        await account.save()                 # writes only the changed keys
        return old

`Account.save` writes only the keys that changed, onto a fresh read of the
record, with the store's compare-and-set (retried on conflict): a request
that changes ``name`` does not undo another request's change to ``email``.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, FrozenSet, Iterator, MutableMapping, Optional, Set

from twisted.internet.defer import Deferred, ensureDeferred

from twistauth.accounts._interfaces import IUserStore, User, modify_user
from twistauth.accounts.errors import UnknownUserError
from twistauth.errors import AuthRequiredError, BackendUnavailableError


class AccountNotLoadedError(RuntimeError):
    """
    The account's record was read before it was loaded: ``await
    account.load()`` (or ``await account.get(key)``) first.
    """


class Account(MutableMapping[str, Any]):
    """
    One user's profile, loaded on demand.

    Mapping access (``account["email"]``) reads and writes the user's
    ``profile`` (JSON values); it needs the record loaded (`load`, or any
    `get`), and raises `AccountNotLoadedError` otherwise.

    :ivar user_id: whose account this is.
    """

    def __init__(self, store: IUserStore, user_id: str) -> None:
        self.user_id = user_id
        self._store = store
        self._user: Optional[User] = None
        self._changed: Set[str] = set()
        self._deleted: Set[str] = set()
        self._profile: Dict[str, Any] = {}

    # -- loading ---------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._user is not None

    def load(self) -> Deferred[Account]:
        """
        Read the record (once; later calls answer at once).

        :return: Deferred firing with this account, or failing with
            `UnknownUserError` if the user was deleted.
        """

        async def run() -> Account:
            if self._user is None:
                user = await self._store.get(self.user_id)
                if user is None:
                    raise UnknownUserError()
                if self._user is None:
                    self._user = user
                    profile = copy.deepcopy(user.profile)
                    profile.update(self._profile)  # keys set before loading win
                    for key in self._deleted:
                        profile.pop(key, None)
                    self._profile = profile
            return self

        return ensureDeferred(run())

    def get(self, key: str, default: Any = None) -> Deferred[Any]:
        """
        One profile value, loading the record if needed.

        :return: Deferred firing with the value, or ``default``.
        """
        return self.load().addCallback(lambda _: self._profile.get(key, default))

    def _need(self) -> User:
        if self._user is None:
            raise AccountNotLoadedError(
                "the account is not loaded: await account.load() or account.get(key) first"
            )
        return self._user

    @property
    def roles(self) -> FrozenSet[str]:
        """The user's roles (needs the record loaded)."""
        return self._need().roles

    @property
    def disabled(self) -> bool:
        """Whether the account is disabled (needs the record loaded)."""
        return self._need().disabled

    @property
    def created(self) -> float:
        return self._need().created

    # -- the mapping -----------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._need()
        return self._profile[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._profile[key] = value
        self._changed.add(key)
        self._deleted.discard(key)

    def __delitem__(self, key: str) -> None:
        if self._user is not None and key not in self._profile:
            raise KeyError(key)
        self._profile.pop(key, None)
        self._deleted.add(key)
        self._changed.discard(key)

    def __iter__(self) -> Iterator[str]:
        self._need()
        return iter(self._profile)

    def __len__(self) -> int:
        self._need()
        return len(self._profile)

    @property
    def dirty(self) -> bool:
        """Whether anything changed since the last load or save."""
        return bool(self._changed or self._deleted)

    # -- saving ------------------------------------------------------------------

    def save(self) -> Deferred[Account]:
        """
        Write the changed keys (only those) onto the stored record.

        :return: Deferred firing with this account (now holding the stored
            record), or failing with `UnknownUserError` or, after repeated
            conflicting writes, `UserConflictError`.
        """
        changed = {key: copy.deepcopy(self._profile[key]) for key in self._changed}
        deleted = set(self._deleted)

        def change(user: User) -> User:
            profile = copy.deepcopy(user.profile)
            profile.update(copy.deepcopy(changed))
            for key in deleted:
                profile.pop(key, None)
            return user.evolve(profile=profile)

        async def run() -> Account:
            if not changed and not deleted:
                return self
            stored = await modify_user(self._store, self.user_id, change)
            self._user = stored
            self._profile = copy.deepcopy(stored.profile)
            self._changed.clear()
            self._deleted.clear()
            return self

        return ensureDeferred(run())

    def __repr__(self) -> str:
        return f"<Account {self.user_id!r} loaded={self.loaded}>"


def current_account(handler: Any) -> Account:
    """
    The logged-in caller's `Account` (nothing is read until it is used).

    :raises AuthRequiredError: the caller is not logged in.
    :raises BackendUnavailableError: the app has no user store.
    """
    session = handler.session
    if session is None or session.user_id is None:
        raise AuthRequiredError()
    store = handler.services.users
    if store is None:
        raise BackendUnavailableError("local accounts are not enabled on this server")
    return Account(store, session.user_id)


__all__ = ["Account", "AccountNotLoadedError", "current_account"]
