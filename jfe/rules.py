"""jfe's nftables table and policy routing: generated, applied atomically, always removable.

The 2016 prototype flushed iptables and forwarded to 127.0.0.1. jfe instead:

- owns one table, ``inet <nft_table>`` (default ``jfe``), and never lists, flushes or deletes
  anything else. The ruleset is one ``nft -f`` transaction: ``table inet jfe {}`` (create if
  missing), ``delete table inet jfe`` (drop whatever an earlier run left), then the new table —
  so applying is atomic and idempotent, and a crashed run's leftovers are replaced, never
  doubled;
- TPROXYs (no DNAT) so the accepted socket's ``getsockname()`` is the original destination and
  the proxy connects there, never to loopback unless loopback was the destination;
- never intercepts: loopback traffic (``iifname lo``: jfe's own upstream connections to local
  backends come back in through ``lo``), replies (``ct direction reply``), or excluded ports;
- needs no ``route_localnet``: the listener is on 127.0.0.1 and TPROXY delivers to it
  directly; policy routing (``ip rule fwmark M lookup T`` and ``local 0.0.0.0/0 dev lo`` in
  table T) makes marked packets local;
- an ``output`` route chain copies the mark of jfe's upstream sockets (``SO_MARK``) to conntrack
  and back onto the backend's replies, so replies to a spoofed client address on this host
  reach jfe's transparent socket instead of the wire.

`Plan` is pure (the text and the commands); `apply`, `remove` and `installed` run nft and ip.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from jfe.config import JfeSettings
from overflowd.errors import RulesError

#: nft and ip answer in milliseconds; a hung one must not hang jfe's start or exit.
COMMAND_TIMEOUT_S = 10.0
#: nft resolves ``socket cgroupv2`` paths under this directory (fixed in nftables). On a
#: pure cgroup v2 host it is the v2 root; on a hybrid host the v2 tree is its ``unified``.
CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup2_prefix() -> str:
    """The prefix that makes a v2-root-relative path resolvable by nft on this host."""
    try:
        with open("/proc/self/mounts", encoding="ascii", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2":
                    if fields[1] == CGROUP_ROOT:
                        return ""
                    if fields[1].startswith(CGROUP_ROOT + "/"):
                        return fields[1][len(CGROUP_ROOT) + 1 :] + "/"
    except OSError:
        pass
    return ""


@dataclass(frozen=True)
class Plan:
    """Everything jfe installs for one settings object; `ruleset` is fed to ``nft -f``."""

    table: str
    ruleset: str
    ip_rule: tuple[str, ...]
    ip_route: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"# nft -f - <<'EOF'\n{self.ruleset}EOF\n"
            f"ip -4 rule add {' '.join(self.ip_rule)}\n"
            f"ip -4 route add {' '.join(self.ip_route)}\n"
        )


def _elements(values: Sequence[object]) -> str:
    return ", ".join(str(v) for v in values)


def plan(settings: JfeSettings, cgroup_prefix: str | None = None) -> Plan:
    """The ruleset and routing commands for ``settings``; `rules show` needs no root.

    ``cgroup_prefix`` is where the cgroup v2 tree sits under /sys/fs/cgroup (found from
    /proc/self/mounts unless given).
    """
    table = settings.nft_table
    mark = f"{settings.fwmark:#x}"
    ports = [p for p in sorted(set(settings.ports)) if p not in settings.excluded_ports]
    lines = [
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
    ]
    match = ["meta nfproto ipv4", "meta l4proto tcp"]
    if ports:
        lines += [f"\tset ports {{ type inet_service; elements = {{ {_elements(ports)} }} }}"]
        match.append("tcp dport @ports")
    if settings.excluded_ports:
        excluded = _elements(sorted(set(settings.excluded_ports)))
        lines += [f"\tset excluded {{ type inet_service; elements = {{ {excluded} }} }}"]
    if settings.addresses:
        nets = [str(ipaddress.ip_network(a, strict=False)) for a in settings.addresses]
        lines += [
            "\tset addresses { type ipv4_addr; flags interval; "
            f"elements = {{ {_elements(nets)} }} }}"
        ]
        match.append("ip daddr @addresses")
    match.append("fib daddr type local")
    tproxy = f"tproxy ip to {settings.listen_address}:{settings.listen_port} meta mark set {mark}"
    lines += [
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority mangle; policy accept;",
        # jfe's own upstream connections to this host, and every loopback packet.
        '\t\tiifname "lo" accept',
        # Packets of sockets that are already transparent (jfe's accepted and upstream ones)
        # are delivered locally by the policy route: mark, never TPROXY again.
        f"\t\tmeta l4proto tcp socket transparent 1 meta mark set {mark} accept",
        "\t\tct direction reply accept",
    ]
    if settings.excluded_ports:
        lines.append("\t\ttcp dport @excluded accept")
    if ports:
        if settings.cgroups:
            prefix = _cgroup2_prefix() if cgroup_prefix is None else cgroup_prefix
            for cgroup in settings.cgroups:
                level = len([part for part in cgroup.split("/") if part])
                scope = f'socket cgroupv2 level {level} "{prefix}{cgroup}"'
                lines.append(f"\t\t{' '.join(match)} {scope} {tproxy}")
        else:
            lines.append(f"\t\t{' '.join(match)} {tproxy}")
    lines += [
        "\t}",
        "\tchain output {",
        "\t\ttype route hook output priority mangle; policy accept;",
        f"\t\tmeta mark {mark} ct mark set {mark}",
        f"\t\tct mark {mark} meta mark set {mark}",
        "\t}",
        "}",
    ]
    ruleset = "\n".join(lines) + "\n"
    rule = ("fwmark", mark, "lookup", str(settings.route_table), "priority",
            str(settings.rule_priority))  # fmt: skip
    route = ("local", "0.0.0.0/0", "dev", "lo", "table", str(settings.route_table))
    return Plan(table, ruleset, rule, route)


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        raise RulesError(f"{argv[0]} not found: install nftables and iproute2") from None
    except subprocess.TimeoutExpired:
        raise RulesError(f"{' '.join(argv)} did not answer within {COMMAND_TIMEOUT_S} s") from None


def _check(done: subprocess.CompletedProcess[str], what: str) -> None:
    if done.returncode != 0:
        words = " ".join((done.stderr or done.stdout).split())[:500]
        raise RulesError(f"{what} failed: {words}")


def check(p: Plan) -> None:
    """``nft -c``: the kernel's parser checks the ruleset without changing anything."""
    _check(_run(["nft", "-c", "-f", "-"], p.ruleset), "nft -c (checking jfe's ruleset)")


@dataclass(frozen=True)
class Installed:
    table: bool
    ip_rule: bool
    ip_route: bool

    @property
    def any(self) -> bool:
        return self.table or self.ip_rule or self.ip_route


def installed(settings: JfeSettings) -> Installed:
    """What of jfe's is in the kernel now (leftovers after a SIGKILL show up here)."""
    table = _run(["nft", "list", "table", "inet", settings.nft_table]).returncode == 0
    rules = _run(["ip", "-4", "rule", "show", "priority", str(settings.rule_priority)])
    routes = _run(["ip", "-4", "route", "show", "table", str(settings.route_table)])
    # jfe's rule is the one with jfe's mark and table: another rule at the same priority is
    # somebody else's and must neither stand in for it nor be removed with it.
    ours = (f"fwmark {settings.fwmark:#x} ", f"lookup {settings.route_table} ")
    return Installed(
        table=table,
        ip_rule=rules.returncode == 0
        and any(all(word in line + " " for word in ours) for line in rules.stdout.splitlines()),
        ip_route=routes.returncode == 0 and bool(routes.stdout.strip()),
    )


def remove(settings: JfeSettings) -> Installed:
    """Remove jfe's table, rule and route, whatever is left of them; returns what was there."""
    found = installed(settings)
    if found.table:
        _check(
            _run(["nft", "delete", "table", "inet", settings.nft_table]),
            f"nft delete table inet {settings.nft_table}",
        )
    if found.ip_rule:
        # Only jfe's rule (its mark, table and priority; a stranger may share the priority),
        # every copy of it.
        p = plan(settings, cgroup_prefix="")
        for _ in range(16):
            done = _run(["ip", "-4", "rule", "del", *p.ip_rule])
            if done.returncode != 0:
                break
    if found.ip_route:
        _check(
            _run(["ip", "-4", "route", "flush", "table", str(settings.route_table)]),
            f"ip route flush table {settings.route_table}",
        )
    return found


def apply(settings: JfeSettings) -> Plan:
    """Install jfe's table (one nft transaction) and policy routing; undone on failure."""
    p = plan(settings)
    _check(_run(["nft", "-f", "-"], p.ruleset), "nft -f (jfe's ruleset)")
    try:
        if not installed(settings).ip_rule:
            _check(_run(["ip", "-4", "rule", "add", *p.ip_rule]), "ip rule add")
        _check(_run(["ip", "-4", "route", "replace", *p.ip_route]), "ip route replace")
    except RulesError:
        remove(settings)
        raise
    return p
