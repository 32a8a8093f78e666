"""Memory measurements that cost what the test allocates, not what the session holds.

A test that checks a byte count against ``tracemalloc`` calls ``gc.collect()`` so that only
live objects are counted. A full collection scans every tracked object in the process, and
late in the suite that is millions (session fixtures such as the decoded shared trace,
Hypothesis's caches, every module imported): each collection took about a second there, and
a footprint test that takes 0.3 s alone took 4-5 s in the whole suite.

:func:`own_objects_only` sets everything that exists when it is entered aside with
``gc.freeze()`` (CPython's permanent generation, never scanned), so a ``gc.collect()``
inside it scans only what was made since, and puts it all back on the way out. What a
collection inside finds is the same: ``tracemalloc`` counts only blocks allocated after
``tracemalloc.start()``, and those objects are never frozen. It never frees an object that is
still referenced, and the set-aside objects are collected as usual after the block.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def own_objects_only() -> Iterator[None]:
    """``gc.collect()`` inside scans only the objects made inside (see the module docstring)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
