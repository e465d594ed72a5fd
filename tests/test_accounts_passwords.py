"""
Password hashing (checklist cases 92 and 95): argon2id with argon2-cffi's
defaults, on a bounded pool of threads and never on the reactor thread,
rehash detection, the dummy hash, and the policy (a documented minimum,
a 1 KiB maximum, long passwords allowed, no truncation, no normalisation).
"""

from __future__ import annotations

import threading
from typing import Any, Iterator, List

import argon2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import globalLogPublisher

from twistauth.accounts import PasswordHasher, PasswordHasherBusyError, PasswordPolicy
from twistauth.accounts.errors import PasswordPolicyError
from twistauth.accounts.passwords import DEFAULT_MAX_BYTES, DEFAULT_MIN_LENGTH
from twistauth.errors import BackendUnavailableError


def cheap() -> argon2.PasswordHasher:
    """Fast parameters for tests that are not about the cost."""
    return argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


class Spy:
    """
    An argon2 hasher that records the threads it runs on and how many of
    its calls run at once, and can hold its calls until released.
    """

    def __init__(self, inner: Any, hold: bool = False) -> None:
        self.inner = inner
        self.threads: List[int] = []
        self.running = 0
        self.most = 0
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self._lock = threading.Lock()

    def _enter(self) -> None:
        with self._lock:
            self.threads.append(threading.get_ident())
            self.running += 1
            self.most = max(self.most, self.running)

    def _leave(self) -> None:
        with self._lock:
            self.running -= 1

    def hash(self, password: Any) -> str:
        self._enter()
        try:
            self.release.wait(10)
            return self.inner.hash(password)  # type: ignore[no-any-return]
        finally:
            self._leave()

    def verify(self, password_hash: str, password: Any) -> bool:
        self._enter()
        try:
            self.release.wait(10)
            return self.inner.verify(password_hash, password)  # type: ignore[no-any-return]
        finally:
            self._leave()

    def check_needs_rehash(self, password_hash: str) -> bool:
        return self.inner.check_needs_rehash(password_hash)  # type: ignore[no-any-return]


@pytest.fixture
def hasher() -> Iterator[PasswordHasher]:
    service = PasswordHasher(reactor=reactor, argon2_hasher=cheap())
    service.startService()
    yield service
    service.stopService()


async def until(condition: Any, seconds: float = 5.0) -> None:
    """Let the reactor run until ``condition()`` (threads report through it)."""
    deadline = reactor.seconds() + seconds
    while not condition():
        assert reactor.seconds() < deadline, "timed out waiting"
        await deferLater(reactor, 0.005, lambda: None)


# -- case 92: argon2id, off the reactor thread, bounded ---------------------


@pytest_twisted.ensureDeferred
async def test_default_parameters_are_argon2id_at_least_owasp() -> None:
    service = PasswordHasher(reactor=reactor)
    service.startService()
    try:
        digest = await service.hash("correct horse battery staple")
        assert await service.verify(digest, "correct horse battery staple") is True
    finally:
        service.stopService()
    # argon2id, 64 MiB, 3 passes, 4 lanes >= OWASP's 19 MiB, 2 passes, 1 lane.
    assert digest.startswith("$argon2id$v=19$m=65536,t=3,p=4$")


@pytest_twisted.ensureDeferred
async def test_hash_and_verify(hasher: PasswordHasher) -> None:
    digest = await hasher.hash("s3cret password")
    assert digest.startswith("$argon2id$")
    assert await hasher.verify(digest, "s3cret password") is True
    assert await hasher.verify(digest, "s3cret passworD") is False
    assert await hasher.verify_dummy("s3cret password") is False
    # Salted: the same password never hashes the same twice.
    assert await hasher.hash("s3cret password") != digest


@pytest_twisted.ensureDeferred
async def test_malformed_stored_hash_is_false_and_logged(hasher: PasswordHasher) -> None:
    events: List[Any] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert await hasher.verify("$2b$12$notargon", "whatever1") is False
        assert await hasher.verify("", "whatever1") is False
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [e.get("log_format", "") for e in events]
    assert sum("malformed or not argon2" in t for t in texts) == 2
    assert not any("whatever1" in repr(e) for e in events)


@pytest_twisted.ensureDeferred
async def test_reactor_keeps_running_while_hashing() -> None:
    """
    A LoopingCall every 5 ms keeps ticking while a full-cost hash (about
    0.1 s, argon2-cffi's defaults) runs, and argon2 never runs on the
    reactor thread.
    """
    spy = Spy(argon2.PasswordHasher())
    service = PasswordHasher(reactor=reactor, argon2_hasher=spy)
    service.startService()
    ticks: List[float] = []
    loop = LoopingCall(lambda: ticks.append(reactor.seconds()))
    try:
        await until(lambda: len(spy.threads) >= 1)  # the dummy hash is made first
        await until(lambda: spy.running == 0)
        loop.start(0.005)
        started = reactor.seconds()
        digest = await service.hash("a long enough password")
        elapsed = reactor.seconds() - started
        during = [t for t in ticks if started <= t <= started + elapsed]
        assert await service.verify(digest, "a long enough password")
    finally:
        loop.stop()
        service.stopService()
    assert elapsed > 0.05
    # Blocking would give at most one or two ticks; running gives ~elapsed/5 ms.
    assert len(during) >= elapsed / 0.005 / 4
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert max(gaps) < elapsed / 2
    assert threading.get_ident() not in spy.threads


@pytest_twisted.ensureDeferred
async def test_pool_is_bounded_and_jobs_queue() -> None:
    spy = Spy(cheap(), hold=True)
    service = PasswordHasher(reactor=reactor, argon2_hasher=spy, threads=2)
    service.startService()
    try:
        jobs = [service.hash(f"password {n}") for n in range(6)]
        # dummy hash + 6 jobs: two run, the rest wait for a thread.
        await until(lambda: spy.running == 2)
        await deferLater(reactor, 0.05, lambda: None)  # give a third thread the chance
        assert spy.running == 2
        assert service.pending == 7
        spy.release.set()
        results = await DeferredList(jobs)
    finally:
        service.stopService()
    assert all(ok for ok, _ in results)
    assert spy.most == 2
    assert len(set(spy.threads)) <= 2
    assert service.pending == 0


@pytest_twisted.ensureDeferred
async def test_too_many_pending_answers_503_at_once() -> None:
    spy = Spy(cheap(), hold=True)
    service = PasswordHasher(reactor=reactor, argon2_hasher=spy, threads=1, max_pending=2)
    service.startService()  # the dummy hash takes the thread
    try:
        queued = [service.hash("password 1"), service.hash("password 2")]
        with pytest.raises(PasswordHasherBusyError) as caught:
            await service.hash("password 3")
        assert caught.value.status == 503
        assert caught.value.headers == {"Retry-After": "1"}
        spy.release.set()
        assert all(ok for ok, _ in await DeferredList(queued))
        assert await service.hash("password 4")  # room again
    finally:
        service.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_fails_what_is_pending_and_ignores_late_results() -> None:
    spy = Spy(cheap(), hold=True)
    service = PasswordHasher(reactor=reactor, argon2_hasher=spy, threads=1)
    service.startService()
    jobs = [service.hash("password 1"), service.hash("password 2")]
    failures: List[Any] = []
    for job in jobs:
        job.addErrback(failures.append)
    spy.release.set()
    service.stopService()  # waits for the running hash; results arrive later
    assert len(failures) == 2
    assert all(f.check(BackendUnavailableError) for f in failures)
    await deferLater(reactor, 0.02, lambda: None)  # late deliveries: ignored, no error
    with pytest.raises(RuntimeError, match="not running"):
        await service.hash("password 3")


@pytest_twisted.ensureDeferred
async def test_not_started_is_a_clear_error() -> None:
    service = PasswordHasher(reactor=reactor, argon2_hasher=cheap())
    with pytest.raises(RuntimeError, match="add it to the service tree"):
        await service.verify("$argon2id$x", "password")


@pytest_twisted.ensureDeferred
async def test_needs_rehash(hasher: PasswordHasher) -> None:
    old = await hasher.hash("a password here")  # cheap parameters
    current = PasswordHasher(reactor=reactor)  # argon2-cffi defaults
    assert current.needs_rehash(old) is True
    assert hasher.needs_rehash(old) is False
    assert current.needs_rehash("not a hash") is True


# -- case 95: the policy ------------------------------------------------------


def test_documented_policy_defaults() -> None:
    policy = PasswordPolicy()
    assert (policy.min_length, policy.max_bytes) == (DEFAULT_MIN_LENGTH, DEFAULT_MAX_BYTES)
    assert (DEFAULT_MIN_LENGTH, DEFAULT_MAX_BYTES) == (8, 1024)


@pytest.mark.parametrize(
    "password, ok",
    [
        ("1234567", False),  # 7 characters
        ("12345678", True),
        ("ééééééé", False),  # 7 characters, 14 bytes: characters count
        ("€€€€€€€€", True),
        ("x" * 64, True),
        ("x" * 1024, True),
        ("x" * 1025, False),
        ("€" * 341, True),  # 1023 bytes
        ("€" * 342, False),  # 1026 bytes
        ("pass word with spaces", True),
        (12345678, False),
        (None, False),
        ("\ud800" * 8, False),  # not valid Unicode
    ],
)
def test_new_password_policy(password: Any, ok: bool) -> None:
    policy = PasswordPolicy()
    if ok:
        assert policy.check_new(password) == password.encode("utf-8")
    else:
        with pytest.raises(PasswordPolicyError):
            policy.check_new(password)


def test_policy_must_be_sane() -> None:
    with pytest.raises(ValueError):
        PasswordPolicy(min_length=0)
    with pytest.raises(ValueError):
        PasswordPolicy(min_length=20, max_bytes=10)


@pytest_twisted.ensureDeferred
async def test_no_truncation_and_no_normalisation(hasher: PasswordHasher) -> None:
    """
    Passwords that differ only after byte 72 (bcrypt's limit) or at the
    last of 1024 bytes are different passwords; a composed and a decomposed
    accent are different passwords (verified exactly as received).
    """
    long_a = "a" * 1023 + "b"
    long_b = "a" * 1023 + "c"
    digest = await hasher.hash(long_a)
    assert await hasher.verify(digest, long_a) is True
    assert await hasher.verify(digest, long_b) is False
    assert await hasher.verify(digest, long_a[:72]) is False
    composed, decomposed = "caf\u00e9-caf\u00e9", "cafe\u0301-cafe\u0301"
    digest = await hasher.hash(composed)
    assert await hasher.verify(digest, composed) is True
    assert await hasher.verify(digest, decomposed) is False


@pytest_twisted.ensureDeferred
async def test_over_long_password_is_refused_before_hashing(hasher: PasswordHasher) -> None:
    spy = Spy(cheap())
    service = PasswordHasher(reactor=reactor, argon2_hasher=spy)
    service.startService()
    try:
        await until(lambda: spy.running == 0 and len(spy.threads) == 1)
        for call in (
            lambda: service.hash("x" * 1025),
            lambda: service.verify("$argon2id$x", "x" * 1025),
            lambda: service.verify_dummy("x" * 1025),
        ):
            with pytest.raises(PasswordPolicyError):
                await call()
        assert len(spy.threads) == 1  # only the dummy hash ran
    finally:
        service.stopService()
