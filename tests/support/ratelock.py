"""Shared ratelock test settings: libsodium's smallest Argon2id cost, so a hash is ~0.3 ms.

``TEST_ARGON2_*`` is the named test setting the issue asks for; never use it outside tests
(docs/ratelock-design.md gives the production parameters).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ratelock.config import RatelockSettings

#: the test Argon2id cost: one pass over 8 KiB (libsodium's minimum)
TEST_ARGON2_TIME_COST = 1
TEST_ARGON2_MEMORY_KIB = 8


def fast_settings(store_url: str = "", **overrides: Any) -> RatelockSettings:
    """RatelockSettings with the test Argon2 cost and ``overrides`` (budgets, limits)."""
    base = RatelockSettings(
        store_url=store_url,
        argon2_time_cost=TEST_ARGON2_TIME_COST,
        argon2_memory_kib=TEST_ARGON2_MEMORY_KIB,
    )
    return dataclasses.replace(base, **overrides)
