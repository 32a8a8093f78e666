"""A real, throwaway Knot DNS authoritative server for the registry tests.

The issue asks for lookups tested against a real authoritative server, not a mock: Debian's
``knot`` package provides ``knotd``; this module writes a config and the zones a test gives it
into a temporary directory, runs ``knotd`` in the foreground on 127.0.0.1 and a free port (UDP
and TCP, so truncated answers can be retried over TCP), waits until it answers the first zone's
SOA (bounded), and always stops it and deletes the directory.

A missing ``knotd`` is :class:`KnotUnavailable`, a loud failure, never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

#: how long knotd may take to answer after starting
START_TIMEOUT_S = 10.0
#: how long it may take to exit after SIGTERM before it is killed
STOP_TIMEOUT_S = 5.0


class KnotUnavailable(RuntimeError):
    """knotd is missing or would not start; the message says why and how to fix it."""


def find_knotd(search_path: str | None = None) -> str:
    """knotd on ``search_path`` (default: $PATH plus /usr/sbin and /sbin, where Debian puts it)."""
    if search_path is None:
        search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    path = shutil.which("knotd", path=search_path)
    if path is None:
        raise KnotUnavailable(
            "knotd not found: the DNS registry tests need a real authoritative server. "
            "Install it with 'apt-get install knot' (make test does this)."
        )
    return path


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (knotd listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise KnotUnavailable("no port free for both UDP and TCP on 127.0.0.1")


def soa_zone(origin: str, body: str, *, negative_ttl: int = 300, ttl: int = 3600) -> str:
    """A zone file: $ORIGIN, SOA (MINIMUM = ``negative_ttl``), NS, then ``body``."""
    origin = origin.rstrip(".") + "."
    return (
        f"$ORIGIN {origin}\n$TTL {ttl}\n"
        f"@ {ttl} IN SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 {negative_ttl}\n"
        f"@ {ttl} IN NS ns.{origin}\n"
        f"ns {ttl} IN A 127.0.0.1\n" + body + "\n"
    )


class KnotServer:
    """knotd serving ``zones`` ({origin: zone file text}). Use as a context manager."""

    def __init__(self, zones: Mapping[str, str]) -> None:
        if not zones:
            raise ValueError("give at least one zone")
        self.zones = {origin.rstrip("."): text for origin, text in zones.items()}
        self.knotd = find_knotd()
        self.base: Path | None = None
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """ "127.0.0.1:PORT", as registry.nameservers takes it."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> KnotServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="overflowd-knot-"))
        try:
            for attempt in range(3):
                self.port = free_udp_tcp_port()
                self._write_config()
                with (self.base / "knotd.log").open("wb") as log:
                    self._proc = subprocess.Popen(
                        [self.knotd, "-c", str(self.base / "knot.conf")],
                        stdout=subprocess.DEVNULL,
                        stderr=log,  # the child keeps its own copy of the descriptor
                        cwd=self.base,
                    )
                if self._wait_ready():
                    return
                self._terminate()
                if attempt == 2 or "address already in use" not in self.log_tail().lower():
                    break
            raise KnotUnavailable(f"knotd did not answer on {self.address}:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _write_config(self) -> None:
        assert self.base is not None
        zone_entries = []
        for origin, text in self.zones.items():
            filename = f"{origin}.zone"
            (self.base / filename).write_text(text, encoding="ascii")
            zone_entries.append(f'  - domain: "{origin}."\n    file: "{self.base / filename}"')
        conf = (
            f"""\
server:
    rundir: "{self.base}"
    listen: 127.0.0.1@{self.port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1

database:
    storage: "{self.base}"

log:
  - target: stderr
    any: warning

control:
    listen: "{self.base}/knot.sock"

template:
  - id: default
    storage: "{self.base}"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none
    semantic-checks: off

zone:
"""
            + "\n".join(zone_entries)
            + "\n"
        )
        (self.base / "knot.conf").write_text(conf, encoding="ascii")

    def _wait_ready(self) -> bool:
        """True once every zone's SOA is answered with NOERROR, within START_TIMEOUT_S."""
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = list(self.zones)
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                return False
            try:
                q = dns.message.make_query(pending[0] + ".", "SOA")
                r = dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.2)
                if r.rcode() == dns.rcode.NOERROR and r.answer:
                    pending.pop(0)
                    if not pending:
                        return True
                    continue
            except (dns.exception.DNSException, OSError):
                pass
            time.sleep(0.02)
        return False

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Stop knotd and delete its directory; safe to call twice."""
        try:
            self._terminate()
        finally:
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None

    def log_tail(self, lines: int = 30) -> str:
        if self.base is None:
            return "(no log)"
        try:
            text = (self.base / "knotd.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def running_knot(zones: dict[str, str]) -> Iterator[KnotServer]:
    """A started Knot server with ``zones``, stopped afterwards; a test failure without Knot."""
    import pytest

    try:
        server = KnotServer(zones)
        server.start()
    except KnotUnavailable as exc:
        pytest.fail(f"Knot DNS is required for these tests: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
