"""jfe's certificate gate at its edges, with real components on loopback: a Knot zone for the
DNS check, a real HTTP ``ask`` endpoint that goes down (closed, then hanging), and TLS
handshakes from Python ssl clients against a trio TLS server using the source's contexts."""

from __future__ import annotations

import functools
import ipaddress
import random
import socket
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import trio

from jfe.certconfig import CertificateSettings
from jfe.certs import Certificates, open_certificate_source
from overflowd.identity import NodeIdentity
from tests.support.jfe_tls import TlsServer, handshake
from tests.support.knot import running_knot, soa_zone

LOCAL = ipaddress.ip_address("127.0.0.1")


def _source(home: Path, **kw: object) -> Certificates:
    settings = CertificateSettings(**kw)  # type: ignore[arg-type]
    return open_certificate_source(home, settings, NodeIdentity.generate())


async def test_ten_thousand_random_sni_names_under_a_wildcard_stay_within_budgets(
    tmp_path: Path,
) -> None:
    source = _source(
        tmp_path,
        allow_names=("*.flood.test",),
        per_client_burst=4,
        per_domain_burst=1000,
        total_burst=60,
    )
    rng = random.Random(7)
    clients = [ipaddress.ip_address(f"127.0.{i // 250}.{i % 250 + 1}") for i in range(40)]
    granted: Counter[str] = Counter()
    for _ in range(10_000):
        label = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(16))
        client = rng.choice(clients)
        ctx = await source.context_for(f"{label}.flood.test", client)
        if ctx is not source.fallback_context:
            granted[str(client)] += 1
    stats = source.statistics()
    assert stats.granted == sum(granted.values()) == 60  # the total budget
    assert max(granted.values()) <= 4  # each client's budget
    assert stats.refused["total_budget"] + stats.refused.get("client_budget", 0) == 10_000 - 60
    assert stats.names == 60 and len(list((tmp_path / "jfe/certs/local").glob("*.pem"))) == 61


def _own_address() -> str:
    """An address of this host that is not loopback: the source address the kernel picks for
    a route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("203.0.113.1", 9))
        address = str(probe.getsockname()[0])
    assert not ipaddress.ip_address(address).is_loopback, "this host has no routed address"
    return address


async def test_the_dns_check_refuses_names_that_resolve_elsewhere(tmp_path: Path) -> None:
    own = _own_address()
    zone = soa_zone(
        "zone.test",
        "\n".join(
            [
                f"self IN A {own}",
                "here IN A 127.0.0.1",
                "here6 IN AAAA ::1",
                "elsewhere IN A 198.51.100.77",
                "routed IN A 203.0.113.80",
                "mixed IN A 127.0.0.1",
                "mixed IN A 198.51.100.77",
                "alias IN CNAME here",
                'nowhere IN TXT "no address"',
            ]
        ),
    )
    hosts = ("self", "here", "here6", "alias", "elsewhere", "routed", "mixed", "nowhere", "absent")
    with running_knot({"zone.test": zone}) as knot:
        plain = _source(
            tmp_path / "plain",
            dns_check=True,
            dns_nameservers=(knot.address,),
            per_client_burst=20,
        )
        # loopback and a routed prefix declared as this host's (a TPROXY router)
        declared = _source(
            tmp_path / "declared",
            dns_check=True,
            dns_nameservers=(knot.address,),
            local_addresses=("127.0.0.0/8", "::1/128", "203.0.113.0/24"),
            per_client_burst=20,
        )
        got = {}
        for source in (plain, declared):
            for host in hosts:
                ctx = await source.context_for(f"{host}.zone.test", LOCAL)
                got[(source is plain, host)] = ctx is not source.fallback_context
        # a refused name is remembered: asking again costs no query
        checks = plain.statistics().dns_checks
        assert await plain.context_for("elsewhere.zone.test", LOCAL) is plain.fallback_context
        assert plain.statistics().dns_checks == checks
    granted_plain = {h for h in hosts if got[(True, h)]}
    granted_declared = {h for h in hosts if got[(False, h)]}
    # the host's own address (the kernel lets us bind it) counts; loopback is anybody's name
    assert granted_plain == {"self"}
    assert granted_declared == {"self", "here", "here6", "alias", "routed"}
    stats = plain.statistics()
    assert stats.refused == {"dns_elsewhere": len(hosts) - 1, "recently_refused": 1}


@dataclass
class AskServer:
    """A real HTTP/1.1 ``ask`` endpoint: 200 for names in ``allow``, 403 otherwise; ``hang``
    accepts and never answers."""

    allow: set[str]
    asked: list[tuple[str, str]] = field(default_factory=list)
    hang: bool = False
    port: int = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 8192:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            if self.hang:
                await trio.sleep_forever()
            target = data.split(b" ", 2)[1].decode()
            query = parse_qs(urlsplit(target).query)
            name, client = query["domain"][0], query["client"][0]
            self.asked.append((name, client))
            status = b"200 OK" if name in self.allow else b"403 Forbidden"
            await stream.send_all(
                b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno"
            )


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


async def test_cached_names_keep_their_handshake_p99_while_ask_is_down(tmp_path: Path) -> None:
    names = [f"svc{i}.ask.test" for i in range(5)]
    ask = AskServer(allow=set(names))
    async with trio.open_nursery() as nursery:
        ask_scope = trio.CancelScope()
        ask_closed = trio.Event()

        async def serve_ask(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            with ask_scope:
                await ask.run(task_status=task_status)
            ask_closed.set()  # its listener is closed: connections are refused from here

        port = await nursery.start(serve_ask)
        source = _source(
            tmp_path,
            ask_url=f"http://127.0.0.1:{port}/ask",
            ask_timeout_s=1.0,
            refused_cache_s=0.0,
            per_client_burst=1000,
        )
        cafile = str(tmp_path / "jfe" / "certs" / "ca.pem")
        server = TlsServer(source)
        tls_port = await nursery.start(server.run)
        for name in names:
            _, line = await trio.to_thread.run_sync(handshake, tls_port, name, cafile)
            assert line == f"ok {name}\n"
        denied = await source.context_for("intruder.ask.test", LOCAL)
        assert denied is source.fallback_context
        assert ("intruder.ask.test", "127.0.0.1") in ask.asked
        asked_before = len(ask.asked)

        async def measure(count: int) -> list[float]:
            out = []
            for i in range(count):
                elapsed, line = await trio.to_thread.run_sync(
                    handshake, tls_port, names[i % len(names)], cafile
                )
                assert line.startswith("ok ")
                out.append(elapsed)
            return out

        up = await measure(100)
        # down, closed: new names are refused (ask_failed), cached ones do not ask at all
        ask_scope.cancel()
        with trio.fail_after(10):
            await ask_closed.wait()
        assert await source.context_for("new1.ask.test", LOCAL) is source.fallback_context
        closed = await measure(100)
        # down, hanging: handshakes of new names wait out ask_timeout_s meanwhile
        ask.hang = True
        ask.port = port
        hang_scope = trio.CancelScope()

        async def serve_hanging(
            task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
        ) -> None:
            with hang_scope:
                await ask.run(task_status=task_status)

        await nursery.start(serve_hanging)

        async def new_names(asks: trio.Nursery) -> None:
            for i in range(20):
                asks.start_soon(source.context_for, f"hang{i}.ask.test", LOCAL)
                await trio.sleep(0.05)

        # the block ends when every pending ask has timed out (each within ask_timeout_s + 0.5)
        with trio.fail_after(60):
            async with trio.open_nursery() as asks:
                asks.start_soon(new_names, asks)
                hanging = await measure(100)
        stats = source.statistics()
        assert stats.refused["ask_failed"] >= 21 and stats.refused["ask_refused"] == 1
        assert len(ask.asked) == asked_before  # cached names never asked
        assert stats.granted == len(names)
        hang_scope.cancel()
        nursery.cancel_scope.cancel()
    base = _p99(up)
    # the same work on the same path (dict lookup, then the handshake): the bound only absorbs
    # the noise of a loaded machine (2 cores shared by several test runs), never a check on
    # the path, which would cost an ask timeout (1,000 ms); that cached names never reach the
    # ask endpoint at all is asserted above (its request log did not grow)
    limit = max(3 * base, base + 0.100)
    print(
        f"handshake p99 ms: ask up {base * 1e3:.2f}, closed {_p99(closed) * 1e3:.2f}, "
        f"hanging {_p99(hanging) * 1e3:.2f}"
    )
    assert _p99(closed) < limit and _p99(hanging) < limit


async def _hostile(stream: trio.SocketStream, mode: str) -> None:
    try:
        await _hostile_answer(stream, mode)
    except trio.BrokenResourceError:
        pass  # jfe hung up on it: what the test wants


async def _hostile_answer(stream: trio.SocketStream, mode: str) -> None:
    async with stream:
        await stream.receive_some(8192)
        if mode == "endless":  # 200, then a body that never ends
            await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
            with trio.move_on_after(10):
                while True:
                    await stream.send_all(chunk)
        else:  # a header a byte at a time, never finished
            with trio.move_on_after(10):
                for byte in b"HTTP/1.1 200 OK\r\nx-slow: " + b"y" * 1000:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.05)


async def test_a_hostile_ask_endpoint_costs_bounded_time_and_memory(tmp_path: Path) -> None:
    for mode, allowed in (("endless", True), ("drip", False)):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(
                    trio.serve_tcp, functools.partial(_hostile, mode=mode), 0, host="127.0.0.1"
                ),
            )
            port = listeners[0].socket.getsockname()[1]
            source = _source(
                tmp_path / mode, ask_url=f"http://127.0.0.1:{port}/", ask_timeout_s=0.5
            )
            start = trio.current_time()
            ctx = await source.context_for(f"{mode}.hostile.test", LOCAL)
            took = trio.current_time() - start
            assert (ctx is not source.fallback_context) is allowed, mode
            # ask_timeout_s plus the safety margin (1.0 s), with room for a loaded machine; the
            # drip alone would last over 50 s
            assert took < 3.0, (mode, took)
            if not allowed:
                assert source.statistics().refused == {"ask_failed": 1}
            nursery.cancel_scope.cancel()


async def test_the_dns_check_is_not_fooled_by_v4_mapped_loopback_or_any(tmp_path: Path) -> None:
    """Review (jfe #12): ``::ffff:127.0.0.1`` and ``::ffff:0.0.0.0`` are bindable on this host
    and Python 3.11 calls neither loopback nor unspecified, so a hostile zone pointing its names
    there passed the "this host's address" check and got certificates."""
    zone = soa_zone(
        "mapped.test",
        "\n".join(
            [
                "lo IN AAAA ::ffff:127.0.0.1",
                "lo2 IN AAAA ::ffff:127.3.2.1",
                "any IN AAAA ::ffff:0.0.0.0",
                "zero IN A 0.0.0.0",
                "compat IN AAAA ::127.0.0.1",
            ]
        ),
    )
    hosts = ("lo", "lo2", "any", "zero", "compat")
    with running_knot({"mapped.test": zone}) as knot:
        source = _source(
            tmp_path, dns_check=True, dns_nameservers=(knot.address,), per_client_burst=20
        )
        granted = {
            host
            for host in hosts
            if await source.context_for(f"{host}.mapped.test", LOCAL) is not source.fallback_context
        }
    assert granted == set()
    assert source.statistics().refused == {"dns_elsewhere": len(hosts)}
