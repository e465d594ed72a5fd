"""
JSON methods for the ``cached`` scenario (issue 6), loaded by twistauth with
``--method-modules=twistauth.demo_methods,bench_methods`` (``bench/servers``
on ``PYTHONPATH``).

``public.work`` does about 200 µs of CPU work (SHA-256 rounds, calibrated
once at import) and answers a digest of its parameter; ``public.work_cached``
is the same function under ``@cached(ttl=60, namespace="bench")``, so after
the first call every call is a cache hit.  Both are ``public.*``: an
anonymous session may call them.
"""

from __future__ import annotations

import hashlib
import time
from typing import Dict

from twistauth.caching import cached
from twistauth.methods.registry import method

TARGET_SECONDS = 200e-6


def _rounds(seed: bytes, n: int) -> bytes:
    digest = seed
    for _ in range(n):
        digest = hashlib.sha256(digest).digest()
    return digest


def _calibrate() -> int:
    n = 2000
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        _rounds(b"calibrate", n)
        best = min(best, time.perf_counter() - start)
    return max(1, int(n * TARGET_SECONDS / best))


ROUNDS = _calibrate()


def _work(x: int) -> Dict[str, str]:
    return {"digest": _rounds(str(x).encode(), ROUNDS).hex()[:16]}


@method("public.work")
def work(handler: object, x: int) -> Dict[str, str]:
    """
    About 200 µs of CPU work, every call.
    """
    return _work(x)


@method("public.work_cached")
@cached(ttl=60, namespace="bench")
def work_cached(handler: object, x: int) -> Dict[str, str]:
    """
    The same work, cached for 60 s.
    """
    return _work(x)
