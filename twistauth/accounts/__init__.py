"""
Local password accounts: the user record and its stores (memory, YAML file,
Redis), argon2id password hashing on a bounded thread pool, the
failed-login throttle, the current account as a dict-like object, and the
built-in JSON methods (in `twistauth.accounts.methods`, loaded separately).

The Redis implementations are imported on first use: importing txredisapi
installs Twisted's default reactor.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from twistauth.accounts._interfaces import (
    ILoginThrottle,
    IUserStore,
    User,
    check_user_id,
    modify_user,
)
from twistauth.accounts.account import Account, AccountNotLoadedError, current_account
from twistauth.accounts.errors import (
    AccountDisabledError,
    InvalidCredentialsError,
    InvalidUserIdError,
    LoginThrottledError,
    PasswordHasherBusyError,
    PasswordPolicyError,
    UnknownUserError,
    UserConflictError,
    UserExistsError,
    UserFileError,
)
from twistauth.accounts.memory import MemoryUserStore
from twistauth.accounts.passwords import PasswordHasher, PasswordPolicy
from twistauth.accounts.throttle import MemoryLoginThrottle
from twistauth.accounts.yamlfile import YAMLUserStore

if TYPE_CHECKING:  # pragma: no cover
    from twistauth.accounts.redisstore import RedisUserStore
    from twistauth.accounts.throttle import RedisLoginThrottle

_LAZY = {
    "RedisUserStore": "twistauth.accounts.redisstore",
    "RedisLoginThrottle": "twistauth.accounts.throttle",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'twistauth.accounts' has no attribute {name!r}")


__all__ = [
    "Account",
    "AccountDisabledError",
    "AccountNotLoadedError",
    "ILoginThrottle",
    "IUserStore",
    "InvalidCredentialsError",
    "InvalidUserIdError",
    "LoginThrottledError",
    "MemoryLoginThrottle",
    "MemoryUserStore",
    "PasswordHasher",
    "PasswordHasherBusyError",
    "PasswordPolicy",
    "PasswordPolicyError",
    "RedisLoginThrottle",
    "RedisUserStore",
    "UnknownUserError",
    "User",
    "UserConflictError",
    "UserExistsError",
    "UserFileError",
    "YAMLUserStore",
    "check_user_id",
    "current_account",
    "modify_user",
]
