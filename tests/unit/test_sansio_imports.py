"""Sans-IO modules import no trio, sockets, HTTP, database or crypto (CONVENTIONS.md rule 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"trio", "socket", "httpx", "sqlalchemy", "nacl", "asyncio", "dns"}
SANS_IO = [
    "overflowd/report.py",
    "overflowd/registry.py",
    "overflowd/flowsample.py",
    "overflowd/notify.py",
    "overflowd/flows.py",
    "overflowd/trust.py",
    "overflowd/ssrf.py",
    "overflowd/flowsample_batch.py",
    "overflowd/receiver.py",
    "overflowd/storage_policy.py",
    "overflowd/estimate.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "overflowd" / "formats").glob("*.py")),
    "overflowd/peers.py",
    "overflowd/peerscore.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "overflowd" / "wire").glob("*.py")),
    "jfe/sniff.py",
    "jfe/proxyv2.py",
    "jfe/gate.py",
    "ratelock/policy.py",
    "ratelock/verdict.py",
    "ratelock/audit.py",
]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", [m for m in SANS_IO if (ROOT / m).exists()])
def test_sans_io_module_imports_no_io(module: str) -> None:
    assert not (_imports(ROOT / module) & FORBIDDEN)


def test_the_walker_sees_forbidden_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom sqlalchemy import select\n")
    assert _imports(bad) & FORBIDDEN == {"trio", "sqlalchemy"}
