"""Fixtures for the netns suite: one lab run per session, shared by every exporter's tests.

These tests need root, iproute2, ethtool, tcpdump, tshark, softflowd and pmacctd. Without
them the suite fails with the reason (CONVENTIONS.md: a skip must say why, loudly; here the
issue promises the comparison, so it is a failure).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import exporters, netns


@pytest.fixture(scope="session")
def netns_ready() -> Iterator[None]:
    """Root and tools present, and no namespaces left by an earlier, killed run."""
    try:
        netns.require(*exporters.TOOLS)
    except netns.NetnsUnavailable as exc:
        pytest.fail(f"netns suite cannot run: {exc}", pytrace=False)
    netns.sweep_stale()
    yield
    leftover = [name for name in netns.list_namespaces() if netns.created_here(name)]
    assert not leftover, f"namespaces left behind: {leftover}"


@pytest.fixture(scope="session")
def exporter_run(
    netns_ready: None, tmp_path_factory: pytest.TempPathFactory
) -> exporters.Collection:
    """Generated traffic exported by softflowd (v5, v9, IPFIX) and pmacctd (v9, IPFIX, sFlow)."""
    return exporters.collect(tmp_path_factory.mktemp("exporters"))
