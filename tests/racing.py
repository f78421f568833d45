"""Concurrent starts for the tests: `n` threads released together by a barrier, each calling `start()`."""

from __future__ import annotations

import threading
from collections.abc import Callable

from bench.errors import BenchError


def race(start: Callable[[], object], n: int) -> list:
    """What each of `n` simultaneous calls of `start` returned, or the BenchError it raised (in finishing order)."""
    barrier = threading.Barrier(n)
    outcomes = []

    def one():
        barrier.wait()
        try:
            outcomes.append(start())
        except BenchError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def winners(outcomes: list) -> list:
    """The outcomes that are not refusals."""
    return [o for o in outcomes if not isinstance(o, BenchError)]
