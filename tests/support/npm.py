"""npm packages for tests that run a JavaScript verifier under ``node``.

The Standard Webhooks tests check our deliveries with the npm ``standardwebhooks`` package, the
one a JavaScript receiver would use. :func:`npm_install` installs it (and its two dependencies)
into a directory the caller gives, once per test session, with its own npm cache there, so
nothing outside that directory is read or written. The registry is the one npm is configured
with; the package is pinned to a major version.

Outcomes: the install works; the registry cannot be reached (:class:`NpmOffline`, the one
reason a test may skip, and it says so); anything else, a missing ``node``/``npm`` included, is
:class:`NpmUnavailable`, a loud failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

#: npm resolves, downloads and unpacks three small packages; a slow mirror takes seconds.
INSTALL_TIMEOUT_S = 180.0
#: One verifier script answers within a second; the bound keeps a hung node from hanging CI.
NODE_TIMEOUT_S = 60.0

#: npm's error codes (its "npm error code X" line, or the errno in its message) that mean the
#: registry could not be reached: name resolution, refused, reset, timed out, no route.
NETWORK_CODES = (
    "ENOTFOUND",
    "EAI_AGAIN",
    "ECONNREFUSED",
    "ECONNRESET",
    "ETIMEDOUT",
    "ENETUNREACH",
    "EHOSTUNREACH",
    "ERR_SOCKET_TIMEOUT",
)


class NpmUnavailable(RuntimeError):
    """node or npm is missing, or npm failed for a reason other than the network."""


class NpmOffline(RuntimeError):
    """The npm registry cannot be reached from here: the message has npm's own words."""


def find(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise NpmUnavailable(
            f"{tool} not found: the Standard Webhooks JavaScript tests run the npm package "
            "under node. Install Node.js (Debian: apt-get install nodejs npm)."
        )
    return path


def is_network_failure(output: str) -> bool:
    """True when npm's output says the registry was unreachable (see NETWORK_CODES)."""
    return any(re.search(rf"\b{code}\b", output) for code in NETWORK_CODES)


def npm_install(
    prefix: Path,
    *packages: str,
    registry: str | None = None,
    retries: int = 1,
    timeout_s: float = INSTALL_TIMEOUT_S,
) -> Path:
    """Install ``packages`` under ``prefix``; returns ``prefix / "node_modules"``.

    Already installed (a marker naming the same packages): returns at once.
    """
    npm = find("npm")
    find("node")
    prefix.mkdir(parents=True, exist_ok=True)
    marker = prefix / ".installed"
    wanted = "\n".join(packages)
    if marker.exists() and marker.read_text() == wanted:
        return prefix / "node_modules"
    command = [
        npm,
        "install",
        "--prefix",
        str(prefix),
        "--cache",
        str(prefix / ".npm-cache"),
        "--no-audit",
        "--no-fund",
        "--no-save",
        "--no-package-lock",
        "--fetch-retries",
        str(retries),
        "--fetch-retry-mintimeout",
        "1000",
        "--fetch-retry-maxtimeout",
        "5000",
        "--fetch-timeout",
        "30000",
        *(["--registry", registry] if registry else []),
        *packages,
    ]
    env = {**os.environ, "npm_config_update_notifier": "false"}
    try:
        run = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        what = " ".join(packages)
        raise NpmOffline(f"npm install {what}: no answer in {timeout_s:g} s") from None
    output = run.stdout + run.stderr
    if run.returncode != 0:
        lines = "; ".join(line for line in output.splitlines() if line.strip())[-600:]
        if is_network_failure(output):
            raise NpmOffline(f"npm install {' '.join(packages)}: registry unreachable: {lines}")
        raise NpmUnavailable(f"npm install {' '.join(packages)} failed: {lines}")
    marker.write_text(wanted)
    return prefix / "node_modules"


def run_node(
    script: Path,
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout_s: float = NODE_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """``node script args...``, output captured; the script's own directory is its cwd, so a
    script placed in the install prefix finds its node_modules."""
    return subprocess.run(
        [find("node"), str(script), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=script.parent,
        env={**os.environ, **(env or {})},
        check=False,
    )
