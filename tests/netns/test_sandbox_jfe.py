"""jfe under its seccomp allow-list (overflowd.sandbox): the real ``jfe run`` end-to-end test
(tests/netns/test_jfe_netns.py, local CA, TPROXY and nft in a namespace) recorded under
``strace -f`` (its calls, and those of the nft and ip it runs when it stops, all on its list),
then run with the filter on and forbidden calls refused from inside."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from overflowd import sandbox
from tests.netns import test_jfe_netns
from tests.netns.test_jfe_netns import Lab, lab  # noqa: F401  (the module's namespaces)
from tests.service.test_sandbox import Recorder, check_recorded, check_refused, needs_strace
from tests.support import netns


def _hooked(
    monkeypatch: pytest.MonkeyPatch, lab: Lab, trace: Path | None  # noqa: F811
) -> list[Any]:
    """Spawns of the real jfe, with a Recorder attached when ``trace`` is given."""
    seen: list[Any] = []
    spawn = lab.host.spawn

    def hooked(argv: Sequence[str], *, label: str | None = None) -> netns.Process:
        process = spawn(argv, label=label)
        if label == "jfe-real":
            seen.append(Recorder(process.pid, trace) if trace is not None else process)
        return process

    monkeypatch.setattr(lab.host, "spawn", hooked)
    shutil.rmtree(lab.home.parent / "real-home", ignore_errors=True)
    return seen


@needs_strace
def test_jfe_calls_are_on_its_list(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setenv(sandbox.ENV, "record")
    recorders = _hooked(monkeypatch, lab, tmp_path / "strace")
    test_jfe_netns.test_real_jfe_run_with_the_node_ca(lab)
    check_recorded("jfe", recorders[0].calls())


def test_jfe_e2e_under_its_filter(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv(sandbox.ENV, "1")
    monkeypatch.setenv(sandbox.PROBE_ENV, "ptrace,mount")
    processes = _hooked(monkeypatch, lab, None)
    test_jfe_netns.test_real_jfe_run_with_the_node_ca(lab)
    check_refused("jfe", processes[0].output(), ("ptrace", "mount"))
