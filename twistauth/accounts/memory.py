"""
The in-memory user store: for tests and for trying twistauth out.  It lives
and dies with its process, so it only suits one process.
"""

from __future__ import annotations

from typing import Any, Dict

import attr
from twisted.internet.defer import fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twistauth.accounts._interfaces import IUserStore, User
from twistauth.accounts.errors import UnknownUserError, UserConflictError, UserExistsError


@implementer(IUserStore)
@attr.s(kw_only=True)
class MemoryUserStore:
    """
    Users in a dictionary.  Records are copied in and out, so a caller can
    never change a stored record without `replace`.

    :ivar clock: stamps ``created`` and ``updated``.
    """

    name = "memory"

    clock: IReactorTime = attr.ib()
    _users: Dict[str, Dict[str, Any]] = attr.ib(factory=dict, init=False)

    def get(self, user_id: str) -> Any:
        record = self._users.get(user_id)
        return succeed(None if record is None else User.from_record(record))

    def create(self, user: User) -> Any:
        if user.user_id in self._users:
            return fail(UserExistsError())
        now = self.clock.seconds()
        stored = user.evolve(created=now, updated=now, version=1)
        self._users[user.user_id] = stored.to_record()
        return succeed(stored)

    def replace(self, user: User) -> Any:
        record = self._users.get(user.user_id)
        if record is None:
            return fail(UnknownUserError())
        if record["version"] != user.version:
            return fail(UserConflictError())
        stored = user.evolve(
            created=record["created"], updated=self.clock.seconds(), version=user.version + 1
        )
        self._users[user.user_id] = stored.to_record()
        return succeed(stored)

    def delete(self, user_id: str) -> Any:
        return succeed(self._users.pop(user_id, None) is not None)

    def user_ids(self) -> Any:
        return succeed(sorted(self._users))
