"""jfe's ACME issuance against a real Pebble, with its nonce rejection (5% of good nonces) and
validation delays on, tls-alpn-01 answered through the same TLS listener as every handshake.

The suite issues for ``JFE_ACME_NAMES`` names (default 5) with Pebble's delays capped at
``JFE_PEBBLE_SLEEP_S`` seconds (default 2: still random, still on, so the client must poll);
``make jfe-acme-100`` runs it with 100 names and Pebble's default delays (0-15 s).
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from jfe.certconfig import CertificateSettings
from jfe.certs import Certificates, open_certificate_source
from overflowd.identity import NodeIdentity
from tests.support.jfe_tls import TlsServer, handshake
from tests.support.knot import free_udp_tcp_port, running_knot, soa_zone
from tests.support.pebble import Pebble, PebbleUnavailable

NAMES = int(os.environ.get("JFE_ACME_NAMES", "5"))
SLEEP_S = os.environ.get("JFE_PEBBLE_SLEEP_S", "2")
CLIENT = ipaddress.ip_address("127.0.0.1")


@dataclass
class Acme:
    pebble: Pebble
    tls_port: int


@pytest.fixture(scope="module")
def acme() -> Iterator[Acme]:
    zone = soa_zone("acme.test", "* IN A 127.0.0.1\nelsewhere IN A 192.0.2.1")
    with running_knot({"acme.test": zone}) as knot:
        tls_port = free_udp_tcp_port()
        env = {} if SLEEP_S in ("", "default") else {"PEBBLE_VA_SLEEPTIME": SLEEP_S}
        try:
            pebble = Pebble(dns_server=knot.address, tls_port=tls_port, env=env)
            pebble.start()
        except PebbleUnavailable as exc:
            pytest.fail(f"Pebble is required for the ACME tests: {exc}", pytrace=False)
        try:
            yield Acme(pebble, tls_port)
        finally:
            pebble.cleanup()


def _source(home: Path, acme: Acme, **kw: object) -> Certificates:
    settings = CertificateSettings(
        mode="acme",
        acme_directory_url=acme.pebble.directory_url,
        acme_ca_bundle_file=str(acme.pebble.ca_bundle),
        allow_names=("*.acme.test",),
        per_client_burst=1000,
        per_domain_burst=1000,
        total_burst=1000,
        max_concurrent_issues=50,
        acme_order_timeout_s=120.0,
        wait_for_issue_s=60.0,
        **kw,  # type: ignore[arg-type]
    )
    return open_certificate_source(home, settings, NodeIdentity.generate())


async def test_every_allowed_name_gets_a_certificate_that_verifies(
    tmp_path: Path, acme: Acme
) -> None:
    source = _source(tmp_path, acme)
    server = TlsServer(source, port=acme.tls_port)
    names = [f"n{i}.acme.test" for i in range(NAMES)]
    root = tmp_path / "pebble-root.pem"
    root.write_bytes(acme.pebble.root_pem())
    started = time.monotonic()
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await nursery.start(source.run)
            # orders go through the gate like any handshake's: refused names order nothing
            refused = await source.context_for("evil.example.com", CLIENT)
            assert refused is source.fallback_context
            async with trio.open_nursery() as clients:
                for name in names:
                    clients.start_soon(source.context_for, name, CLIENT)
            elapsed = time.monotonic() - started
            stats = source.statistics()
            assert stats.granted == NAMES, (stats, acme.pebble.log_tail())
            assert stats.challenges_served >= NAMES
            for name in names:
                _, line = await trio.to_thread.run_sync(handshake, server.port, name, str(root))
                assert line == f"ok {name}\n"
            # Pebble goes down: names with certificates keep being served, new ones fall back
            acme.pebble.stop()
            try:
                late = await source.context_for("late.acme.test", CLIENT)
                assert late is source.fallback_context
                _, line = await trio.to_thread.run_sync(handshake, server.port, names[0], str(root))
                assert line == f"ok {names[0]}\n"
            finally:
                acme.pebble.start()
            # the restarted Pebble forgot the account: registered again, the order goes through
            again = await source.context_for("again.acme.test", CLIENT)
            assert again is source.cached("again.acme.test") is not None
            # a restart of jfe: certificates come from disk, the account key is reused (the
            # server answers "exists" for it)
            (account_file,) = tmp_path.glob("jfe/certs/acme/*/account.json")
            account = json.loads(account_file.read_text())["uri"]
            reopened = open_certificate_source(tmp_path, source.settings, NodeIdentity.generate())
            await nursery.start(reopened.run)
            server.source = reopened
            assert all(reopened.cached(name) is not None for name in names)
            third = await reopened.context_for("third.acme.test", CLIENT)
            assert third is reopened.cached("third.acme.test") is not None
            _, line = await trio.to_thread.run_sync(handshake, server.port, names[1], str(root))
            assert line == f"ok {names[1]}\n"
            assert reopened.statistics().granted == 1
            assert json.loads(account_file.read_text())["uri"] == account  # the same account
            nursery.cancel_scope.cancel()
    # one order per allowed name; none for the refused name, none reached Pebble while down
    assert source.issuer.orders == NAMES + 1  # type: ignore[attr-defined]  # again.acme.test
    assert source.statistics().refused.get("not_allowed") == 1
    assert source.statistics().issue_failures == 1
    print(f"acme: {NAMES} names in {elapsed:.1f} s")
