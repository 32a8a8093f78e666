"""Network namespaces for tests: made here, used, and always taken down again.

Everything is named ``ovft-<pid>-<random>`` (veths ``ovt<random><n>``), so parallel runs never
collide and `sweep_stale` can remove what a killed run (SIGKILL, power loss) left behind without
touching anyone else's namespaces. Only TEST-NET addresses are used (192.0.2.0/24,
198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) and nothing is routed out of the namespaces:
they have no default route and no link to the host's namespace.

Cleanup runs in ``finally`` (so also on failure and KeyboardInterrupt): every process started
through `Namespace.spawn` is stopped by its PID, TERM then KILL, then the namespaces are
deleted, which destroys their veths. A new namespace copies the host's IPv4 sysctls, so the
ones that change routing (``rp_filter``, ``route_localnet``, ``src_valid_mark``) are set
explicitly; IPv6 is off unless asked for, because link-local chatter adds flows to exact counts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "ovft"
#: How long a stopped process gets between TERM and KILL. A node drains, prints its stats
#: and closes its store in well under a second, but on a loaded 2-core machine interpreter
#: teardown alone was seen to pass 3 s, and the KILL made a passing test fail (exit -9).
STOP_GRACE_S = 15.0
#: Any single `ip`/`sysctl` command; they take milliseconds.
COMMAND_TIMEOUT_S = 10.0

_TEST_NETS = [
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
]


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here: not root, or a tool is missing. Says which."""


def require(*tools: str) -> None:
    """Fail with the reason unless running as root with every tool on PATH."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("netns tests need root (they create network namespaces)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(
            f"missing {', '.join(missing)}: apt-get install the Debian packages "
            "(make deps-test does it)"
        )


def run(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run a short command in the host namespace; raise with its stderr if it fails."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _check_test_net(address: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    iface = ipaddress.ip_interface(address)
    if not any(iface.ip in net for net in _TEST_NETS):
        raise ValueError(f"{address} is not in a TEST-NET range; tests never use real addresses")
    return iface


@dataclass
class Process:
    """A process started in a namespace; `Namespace` stops it by PID on the way out."""

    argv: list[str]
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def wait_for_output(self, pattern: str, timeout: float) -> None:
        """Wait until stdout or stderr matches ``pattern``; raise if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            if regex.search(self.output()):
                return
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.argv[0]} exited ({self.popen.returncode}) before {pattern!r}: "
                    f"{self.output()[-2000:]}"
                )
            time.sleep(0.02)
        raise TimeoutError(f"{self.argv[0]}: no {pattern!r} within {timeout} s: {self.output()}")

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, signum: int = signal.SIGTERM, grace: float = STOP_GRACE_S) -> int:
        """``signum`` (TERM by default), then KILL after ``grace`` seconds. Returns the status."""
        self.send_signal(signum)
        try:
            return self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            return self.popen.wait(timeout=grace)


@dataclass
class Namespace:
    name: str
    workdir: Path
    processes: list[Process] = field(default_factory=list)

    def argv(self, argv: Sequence[str]) -> list[str]:
        # `ip netns exec` execs the command after setns: the PID we get is the command's.
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside the namespace, bounded by ``timeout``."""
        done = subprocess.run(
            self.argv(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"[{self.name}] {' '.join(argv)} failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        return done

    def spawn(self, argv: Sequence[str], *, label: str | None = None) -> Process:
        """Start a process inside the namespace, output to files; stopped on exit at the latest."""
        label = label or Path(argv[0]).name
        n = len(self.processes)
        stdout_path = self.workdir / f"{self.name}.{n}.{label}.out"
        stderr_path = self.workdir / f"{self.name}.{n}.{label}.err"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            popen = subprocess.Popen(
                self.argv(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        process = Process(list(argv), popen, stdout_path, stderr_path)
        self.processes.append(process)
        return process

    def sysctl(self, key: str, value: str | int) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def addresses(self) -> str:
        return self.run(["ip", "-brief", "address"]).stdout

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop()


def _unique(prefix: str = PREFIX) -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def list_namespaces() -> list[str]:
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    ).stdout
    return [line.split()[0] for line in listing.splitlines() if line.split()]


def created_here(name: str, prefix: str = PREFIX) -> bool:
    """Whether ``name`` is one of this process's namespaces."""
    return name.startswith(f"{prefix}-{os.getpid()}-")


def sweep_stale(prefix: str = PREFIX) -> list[str]:
    """Delete ``<prefix>-<pid>-*`` namespaces whose creating process is gone."""
    removed = []
    for name in list_namespaces():
        match = re.fullmatch(rf"{re.escape(prefix)}-(\d+)-[0-9a-f]+", name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
            continue  # its creator is alive: not ours to touch
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_namespace_processes(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)
        removed.append(name)
    return removed


def _kill_namespace_processes(name: str) -> None:
    """Kill processes still inside a namespace (by PID, as `ip netns pids` lists them)."""
    for _ in range(2):
        done = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10, check=False
        )
        pids = [int(p) for p in done.stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


@contextlib.contextmanager
def namespace(workdir: Path, *, ipv6: bool = False, prefix: str = PREFIX) -> Iterator[Namespace]:
    """A fresh namespace with ``lo`` up and routing sysctls pinned; gone again afterwards."""
    name = _unique(prefix)
    run(["ip", "netns", "add", name])
    ns = Namespace(name, workdir)
    try:
        ns.run(["ip", "link", "set", "lo", "up"])
        for key, value in (
            ("net.ipv4.conf.all.rp_filter", 0),
            ("net.ipv4.conf.default.rp_filter", 0),
            ("net.ipv4.conf.all.route_localnet", 0),
            ("net.ipv4.conf.all.src_valid_mark", 0),
            ("net.ipv4.ip_forward", 0),
            ("net.ipv6.conf.all.disable_ipv6", 0 if ipv6 else 1),
            ("net.ipv6.conf.default.disable_ipv6", 0 if ipv6 else 1),
            # With IPv6 on: no router advertisements, no autoconfigured addresses.
            ("net.ipv6.conf.all.accept_ra", 0),
            ("net.ipv6.conf.default.accept_ra", 0),
            ("net.ipv6.conf.all.autoconf", 0),
            ("net.ipv6.conf.default.autoconf", 0),
        ):
            ns.sysctl(key, value)
        yield ns
    finally:
        ns.stop_all()
        _kill_namespace_processes(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)


@dataclass(frozen=True)
class Link:
    """One veth pair: ``a_dev`` in the first namespace, ``b_dev`` in the second."""

    a_dev: str
    b_dev: str


def veth(
    a: Namespace,
    b: Namespace,
    a_addresses: Sequence[str],
    b_addresses: Sequence[str],
) -> Link:
    """Connect ``a`` and ``b`` with a veth pair and address both ends (TEST-NET only).

    The pair is created in the host namespace and both ends moved away at once; if anything
    fails before the move, the half-made pair is deleted here. Once moved, the namespaces own
    it and deleting them removes it.
    """
    for address in (*a_addresses, *b_addresses):
        _check_test_net(address)
    tag = secrets.token_hex(4)
    link = Link(a_dev=f"{PREFIX[:3]}{tag}a", b_dev=f"{PREFIX[:3]}{tag}b")
    run(["ip", "link", "add", link.a_dev, "type", "veth", "peer", "name", link.b_dev])
    moved = False
    try:
        run(["ip", "link", "set", link.a_dev, "netns", a.name])
        run(["ip", "link", "set", link.b_dev, "netns", b.name])
        moved = True
    finally:
        if not moved:  # deleting either end of a veth deletes the pair
            for dev in (link.a_dev, link.b_dev):
                subprocess.run(["ip", "link", "del", dev], capture_output=True, timeout=10)
    for ns, dev, addresses in ((a, link.a_dev, a_addresses), (b, link.b_dev, b_addresses)):
        ns.sysctl(f"net.ipv4.conf.{dev}.rp_filter", 0)
        # No offloads: the exporters and tshark see the packets the wire would carry
        # (with TSO/GRO a capture holds 64 KiB "packets" that were never on any wire).
        for feature in ("tso", "gso", "gro"):
            ns.run(["ethtool", "-K", dev, feature, "off"])
        for address in addresses:
            family = "-6" if ipaddress.ip_interface(address).version == 6 else "-4"
            extra = ["nodad"] if family == "-6" else []
            ns.run(["ip", family, "address", "add", address, "dev", dev, *extra])
        ns.run(["ip", "link", "set", dev, "up"])
    return link
