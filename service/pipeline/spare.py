"""Lending an idle compute slot to the request that is running, so one request can use two cores.

At low load most cores sit idle while a single request runs its models one after another. Stages that do
not depend on each other (the quality model and the segmenter) can then run
side by side. A side task only runs on a slot nobody holds, and only while fewer requests are admitted than
there are slots: under load every admitted request will want a slot soon, so nothing is borrowed and each
request keeps to one core. Overlap buys latency at low load and stays out of the way at high load.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class SpareCores:
    """Runs side tasks on compute slots that are free right now; says so when there is none."""

    def __init__(
        self, slots: threading.BoundedSemaphore | None, workers: int, demand: Callable[[], int] = lambda: 0
    ) -> None:
        """`demand`: how many requests are admitted now (each will want a slot of its own)."""
        self._slots, self._workers, self._demand = slots, workers, demand
        self._executor = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cervigate-spare")
            if slots is not None
            else None
        )

    def try_submit(self, task: Callable[[], T]) -> Future[T] | None:
        """Start `task` on an idle slot and return its future, or return None (run it yourself)."""
        if self._slots is None or self._executor is None or self._demand() >= self._workers:
            return None
        if not self._slots.acquire(blocking=False):
            return None
        slots = self._slots
        try:
            return self._executor.submit(_releasing, task, slots)
        except RuntimeError:  # shut down while a request was finishing: do the work inline
            slots.release()
            return None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def _releasing(task: Callable[[], T], slots: threading.BoundedSemaphore) -> T:
    # The slot is held until the task is done, even when its caller stopped waiting (a recapture that
    # made a speculative segmentation moot), so the count of running computations stays true.
    try:
        return task()
    finally:
        slots.release()


NO_SPARE_CORES = SpareCores(None, 0)  # every stage inline, in order: tools, evaluation, and tests
