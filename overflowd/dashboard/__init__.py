"""The node dashboard (issue #14): what the node sees, sends and receives, in a browser.

Served by the node API (services/api.py mounts :func:`router`), with its auth rules; pages in
:mod:`overflowd.dashboard.pages`, charts in :mod:`~overflowd.dashboard.svg`, the victim
view's time series in :mod:`~overflowd.dashboard.series`, the counters' last hour in
:class:`~overflowd.dashboard.history.CounterHistory` (a service of ``overflowd run``).
docs/dashboard.md says what each page shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from overflowd.dashboard.history import CounterHistory

if TYPE_CHECKING:
    from overflowd.dashboard.pages import router


def __getattr__(name: str) -> Any:
    """``router`` imported when asked for: the pages import FastAPI, which ``overflowd run``
    loads only when the API app is built on its first request (issue #16, idle RSS)."""
    if name == "router":
        from overflowd.dashboard.pages import router

        return router
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CounterHistory", "router"]
