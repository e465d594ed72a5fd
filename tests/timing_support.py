"""
For tests that time things in the test process itself (how fast a call
fails, how late the reactor runs): no garbage-collector pause in the middle.

By the time the whole suite reaches them, the test process holds the
leftovers of about a thousand tests, and a full collection of them takes
0.17 to 0.28 s (measured with ``gc.callbacks`` during a full run on the
2-core VM): a call that fails in a millisecond then appears to take a
quarter of a second, and the reactor to stall.  That is the test process's
history, not the code under test, so these tests collect first and keep
the collector off while they run.

Import the fixture into a test module to apply it to every test there::

    from timing_support import no_gc_pauses  # noqa: F401 (autouse fixture)
"""

from __future__ import annotations

import gc
from typing import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_gc_pauses() -> Iterator[None]:
    """
    Collect now, and keep the garbage collector off during the test.
    """
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
