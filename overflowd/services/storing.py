"""Writes that must not be lost: tried again with backoff until they commit.

The daemon's own reports and the in-band listener's received ones go through one
:class:`PersistentWrite` each. A batch the store refuses (locked past its busy timeout, disk
full, PostgreSQL away) is kept and tried again after ``STORE_RETRY_FIRST_S``, doubling up to
``STORE_RETRY_MAX_S``; meanwhile the queue in front of the writer fills and its producer sheds
input, counted, rather than losing what was already accepted. Only cancellation (the drain
deadline at stop) gives a batch up, and the caller counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import trio

from overflowd.errors import StoreError

log = logging.getLogger(__name__)

#: First pause after a failed write, and the longest one (the pause doubles in between).
STORE_RETRY_FIRST_S, STORE_RETRY_MAX_S = 0.1, 5.0
#: At most one warning per writer per this many seconds (every failure is counted).
STORE_LOG_INTERVAL_S = 10.0

T = TypeVar("T")


class PersistentWrite:
    """Run blocking store writes in a thread, again and again until each one commits."""

    def __init__(self, event: str) -> None:
        """``event`` names the warning (e.g. ``store.write_failed``)."""
        self._event = event
        self.errors = 0  # failed tries
        self.retried = 0  # writes that committed after one or more failed tries
        self._last_log = -STORE_LOG_INTERVAL_S

    async def write(self, fn: Callable[[], T], *, reports: int) -> T:
        """``fn()`` in a worker thread until it stops raising :class:`StoreError`."""
        delay, tries = STORE_RETRY_FIRST_S, 0
        while True:
            try:
                result = await trio.to_thread.run_sync(fn)
            except StoreError as exc:
                tries += 1
                self.errors += 1
                self._warn(reports, tries, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_S)
                continue
            if tries:
                self.retried += 1
            return result

    def _warn(self, reports: int, tries: int, exc: StoreError) -> None:
        now = trio.current_time()
        if now - self._last_log < STORE_LOG_INTERVAL_S:
            return
        self._last_log = now
        log.warning(
            "%s reports=%d tries=%d error=%s (kept, tried again)", self._event, reports, tries, exc
        )
