"""The node dashboard (issue #14): what the node sees, sends and receives, in a browser.

Served by the node API (services/api.py mounts :func:`router`), with its auth rules; pages in
:mod:`overflowd.dashboard.pages`, charts in :mod:`~overflowd.dashboard.svg`, the victim
view's time series in :mod:`~overflowd.dashboard.series`, the counters' last hour in
:class:`~overflowd.dashboard.history.CounterHistory` (a service of ``overflowd run``).
docs/dashboard.md says what each page shows.
"""

from __future__ import annotations

from overflowd.dashboard.history import CounterHistory
from overflowd.dashboard.pages import router

__all__ = ["CounterHistory", "router"]
