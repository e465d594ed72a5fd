"""
Password hashing: argon2id on a bounded thread pool, and the password
policy.

Hashing is deliberately slow (argon2-cffi's defaults: argon2id, 64 MiB,
3 passes, 4 lanes; about 0.1 s here), so it never runs on the reactor
thread: `PasswordHasher` owns a small `ThreadPool` (2 threads by default;
more jobs wait in its queue, and past ``max_pending`` a login is answered
503 at once instead of queueing for ever).  It is an ``IService``: add it
to the service tree, which starts and stops the pool.

Unknown users cost the same as known ones: `PasswordHasher.verify_dummy`
checks the password against a hash of a random secret made with the same
parameters, so "no such user" and "wrong password" take the same time.

The policy (`PasswordPolicy`): a new password has at least ``min_length``
characters (default 8, as ASVS 6.2.1 asks); every password is at most
``max_bytes`` bytes of UTF-8 (default 1024, which bounds the hashing cost).
A password is hashed exactly as received: no truncation (bcrypt's 72-byte
limit does not apply to argon2), no normalisation, no character classes,
long passphrases welcome.
"""

from __future__ import annotations

import secrets
import threading
from typing import Any, Callable, Optional, Set

import argon2
import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twistauth.accounts.errors import PasswordHasherBusyError, PasswordPolicyError
from twistauth.errors import BackendUnavailableError

log = Logger()

DEFAULT_MIN_LENGTH = 8
"""The shortest new password accepted, in characters (ASVS 5.0 6.2.1)."""

DEFAULT_MAX_BYTES = 1024
"""The longest password accepted, in bytes of UTF-8 (checklist case 95)."""


@attr.s(frozen=True, kw_only=True)
class PasswordPolicy:
    """
    What a password must be.

    :ivar min_length: the fewest characters (Unicode code points) a new
        password may have.
    :ivar max_bytes: the most bytes (UTF-8) any password may have, new or
        presented at login.
    """

    min_length: int = attr.ib(default=DEFAULT_MIN_LENGTH)
    max_bytes: int = attr.ib(default=DEFAULT_MAX_BYTES)

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_bytes:
            raise ValueError("the password policy needs 1 <= min_length <= max_bytes")

    def encode(self, password: Any) -> bytes:
        """
        The password as the bytes that are hashed (UTF-8, exactly as given).

        :raises PasswordPolicyError: not text, or longer than ``max_bytes``.
        """
        if not isinstance(password, str):
            raise PasswordPolicyError("the password must be a string")
        try:
            raw = password.encode("utf-8")
        except UnicodeEncodeError:
            raise PasswordPolicyError("the password must be valid Unicode text") from None
        if len(raw) > self.max_bytes:
            raise PasswordPolicyError(f"the password is longer than {self.max_bytes} bytes (UTF-8)")
        return raw

    def check_new(self, password: Any) -> bytes:
        """
        Check a password being set (account creation, change).

        :return: its bytes, as `encode`.
        :raises PasswordPolicyError: it breaks the policy; the message says how.
        """
        raw = self.encode(password)
        if len(password) < self.min_length:
            raise PasswordPolicyError(
                f"the password must have at least {self.min_length} characters"
            )
        return raw


class PasswordHasher(Service):
    """
    Hashes and verifies passwords with argon2id on its own bounded thread
    pool (see the module documentation).

    :ivar policy: the `PasswordPolicy`.
    :ivar threads: the most hashes that run at once.
    :ivar max_pending: the most hashes that may wait for a thread.
    """

    name = "twistauth-passwords"

    def __init__(
        self,
        *,
        reactor: Any,
        argon2_hasher: Any = None,
        policy: Optional[PasswordPolicy] = None,
        threads: int = 2,
        max_pending: int = 64,
    ) -> None:
        """
        :param reactor: delivers results from the pool's threads
            (``IReactorFromThreads``).
        :param argon2_hasher: an ``argon2.PasswordHasher`` (default: its
            default parameters); anything with its ``hash``, ``verify`` and
            ``check_needs_rehash`` will do.
        """
        if threads < 1 or max_pending < 0:
            raise ValueError("a PasswordHasher needs threads >= 1 and max_pending >= 0")
        self._reactor = reactor
        self._argon2 = argon2_hasher if argon2_hasher is not None else argon2.PasswordHasher()
        self.policy = policy if policy is not None else PasswordPolicy()
        self.threads = threads
        self.max_pending = max_pending
        self._pool: Optional[ThreadPool] = None
        self._pending: Set[Deferred[Any]] = set()
        self._dummy_lock = threading.Lock()
        self._dummy_hash: Optional[str] = None

    # -- the service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._pool = ThreadPool(minthreads=0, maxthreads=self.threads, name=self.name)
        self._pool.start()
        # Make the dummy hash now, so the first unknown user is not slower.
        self._run(self._dummy).addErrback(self._dummy_failed)
        parameters = getattr(self._argon2, "memory_cost", None)
        log.info(
            "twistauth: password hashing: argon2id (memory {memory} KiB, time cost "
            "{time}, lanes {lanes}) on {threads} threads; passwords {low} characters "
            "to {high} bytes",
            memory=parameters,
            time=getattr(self._argon2, "time_cost", None),
            lanes=getattr(self._argon2, "parallelism", None),
            threads=self.threads,
            low=self.policy.min_length,
            high=self.policy.max_bytes,
        )

    def _dummy_failed(self, failure: Failure) -> None:
        if not failure.check(BackendUnavailableError):  # stopped before it was made
            log.failure("twistauth: cannot make the dummy password hash", failure)

    def stopService(self) -> Any:
        super().stopService()
        pool, self._pool = self._pool, None
        pending, self._pending = self._pending, set()
        for d in pending:
            if not d.called:
                d.errback(BackendUnavailableError("the server is shutting down"))
        if pool is not None:
            pool.stop()  # waits for the hashes already running (at most one each)

    @property
    def pending(self) -> int:
        """How many hashes are running or waiting."""
        return len(self._pending)

    # -- the operations --------------------------------------------------------

    def hash(self, password: str) -> Deferred[str]:
        """
        Hash a password (checked against ``max_bytes`` only: see
        `PasswordPolicy.check_new` for new passwords).

        :return: Deferred firing with the PHC string
            (``$argon2id$v=19$m=...``).
        """
        try:
            raw = self.policy.encode(password)
        except PasswordPolicyError:
            return fail()
        return self._run(self._argon2.hash, raw)

    def verify(self, password_hash: str, password: str) -> Deferred[bool]:
        """
        Check a password against a stored hash.

        :return: Deferred firing with ``True`` if it matches, ``False`` if not
            (also for a malformed hash, which is logged).
        """
        try:
            raw = self.policy.encode(password)
        except PasswordPolicyError:
            return fail()
        return self._run(self._verify, password_hash, raw)

    def verify_dummy(self, password: str) -> Deferred[bool]:
        """
        Do the work of `verify` against a hash nobody's password matches:
        for unknown users and accounts without a password, so they take as
        long as a wrong password does.

        :return: Deferred firing with ``False``.
        """
        try:
            raw = self.policy.encode(password)
        except PasswordPolicyError:
            return fail()

        def work() -> bool:
            self._verify(self._dummy(), raw)
            return False

        return self._run(work)

    def needs_rehash(self, password_hash: str) -> bool:
        """
        Whether a stored hash was made with other parameters than the
        current ones (cheap: it parses the string).  Rehash it on the next
        successful login.
        """
        try:
            return bool(self._argon2.check_needs_rehash(password_hash))
        except Exception:  # an unparseable hash is replaced at the next login
            return True

    # -- plumbing ----------------------------------------------------------

    def _verify(self, password_hash: str, raw: bytes) -> bool:
        try:
            return bool(self._argon2.verify(password_hash, raw))
        except argon2.exceptions.VerifyMismatchError:
            return False
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            log.error("twistauth: a stored password hash is malformed or not argon2")
            return False

    def _dummy(self) -> str:
        with self._dummy_lock:
            if self._dummy_hash is None:
                self._dummy_hash = self._argon2.hash(secrets.token_bytes(32))
            return self._dummy_hash

    def _run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        Run ``function(*args)`` on the pool; deliver its result on the
        reactor thread.
        """
        pool = self._pool
        if pool is None:
            return fail(
                RuntimeError(
                    "the PasswordHasher service is not running: add it to the "
                    "service tree (or call startService) before hashing"
                )
            )
        if len(self._pending) >= self.threads + self.max_pending:
            return fail(PasswordHasherBusyError())
        d: Deferred[Any] = Deferred()
        self._pending.add(d)

        def deliver(ok: bool, result: Any) -> None:
            self._pending.discard(d)
            if d.called:  # failed by stopService meanwhile
                return
            if ok:
                d.callback(result)
            else:
                d.errback(result if isinstance(result, Failure) else Failure(result))

        def done(ok: bool, result: Any) -> None:
            self._reactor.callFromThread(deliver, ok, result)

        pool.callInThreadWithCallback(done, function, *args)
        return d


__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MIN_LENGTH",
    "PasswordHasher",
    "PasswordPolicy",
]
