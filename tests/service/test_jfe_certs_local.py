"""jfe's local CA and certificate cache through the CertificateSource seam, with real TLS
handshakes (Python ssl clients against a trio TLS server using the source's contexts)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from jfe.ca import FALLBACK_NAME, derive_ca_key, verify_binding
from jfe.certconfig import DAY_S, CertificateSettings
from jfe.certs import open_certificate_source
from overflowd.identity import NodeIdentity
from tests.support.jfe_tls import TlsServer, handshake

CLIENT = ipaddress.ip_address("127.0.0.1")


class Wall:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _open(home: Path, identity: NodeIdentity, wall: Wall | None = None, **kw: object):
    settings = CertificateSettings(allow_names=("*.example.test", "exact.test"), **kw)  # type: ignore[arg-type]
    if wall is None:
        return open_certificate_source(home, settings, identity)
    return open_certificate_source(home, settings, identity, wall=wall)


def test_ca_key_is_derived_from_the_identity_with_its_own_label() -> None:
    ident = NodeIdentity(seed=bytes(range(32)))
    a = derive_ca_key(ident).private_numbers().private_value
    assert a == derive_ca_key(NodeIdentity(seed=bytes(range(32)))).private_numbers().private_value
    assert a != derive_ca_key(NodeIdentity(seed=bytes(32))).private_numbers().private_value
    assert a.to_bytes(32, "big") != ident.seed


async def test_leaves_verify_under_the_ca_and_refused_names_get_the_fallback(
    tmp_path: Path,
) -> None:
    ident = NodeIdentity.generate()
    source = _open(tmp_path, ident)
    cafile = str(tmp_path / "jfe" / "certs" / "ca.pem")
    ca = x509.load_pem_x509_certificate(Path(cafile).read_bytes())
    assert verify_binding(ca, ident.public_key)
    assert not verify_binding(ca, NodeIdentity.generate().public_key)
    server = TlsServer(source)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        _, line = await trio.to_thread.run_sync(handshake, port, "a.example.test", cafile)
        assert line == "ok a.example.test\n"
        _, line = await trio.to_thread.run_sync(handshake, port, "exact.test", cafile)
        assert line == "ok exact.test\n"
        # not allowed: the fallback, which no client accepts for the name it asked
        _, line = await trio.to_thread.run_sync(handshake, port, "b.other.test", cafile)
        assert line.startswith("verify-failed") and "mismatch" in line
        _, line = await trio.to_thread.run_sync(handshake, port, "deep.a.example.test", cafile)
        assert line.startswith("verify-failed")
        nursery.cancel_scope.cancel()
    stats = source.statistics()
    assert stats.granted == 2 and stats.names == 2
    assert stats.refused == {"not_allowed": 2}
    leaf_dir = tmp_path / "jfe" / "certs" / "local"
    for path in leaf_dir.glob("*.pem"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    fallback = x509.load_pem_x509_certificate((leaf_dir / "_fallback.pem").read_bytes())
    san = fallback.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [FALLBACK_NAME]
    leaf = x509.load_pem_x509_certificate((leaf_dir / "a.example.test.pem").read_bytes())
    assert leaf.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert leaf.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != ca.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_a_restart_serves_the_cache_without_issuing_and_keeps_the_ca(tmp_path: Path) -> None:
    ident = NodeIdentity.generate()
    first = _open(tmp_path, ident)
    await first.context_for("a.example.test", CLIENT)
    ca_pem = (tmp_path / "jfe" / "certs" / "ca.pem").read_bytes()
    again = _open(tmp_path, ident)
    assert again.cached("a.example.test") is not None
    assert again.cached("A.Example.Test.") is not None
    assert again.statistics().granted == 0 and again.statistics().names == 1
    assert (tmp_path / "jfe" / "certs" / "ca.pem").read_bytes() == ca_pem
    # a new identity is a new CA: the old CA file is replaced, never reused
    other = _open(tmp_path, NodeIdentity.generate())
    assert (tmp_path / "jfe" / "certs" / "ca.pem").read_bytes() != ca_pem
    assert other.ca.cert.public_key() != again.ca.cert.public_key()


async def test_renewal_before_expiry_and_expired_names_are_not_served(tmp_path: Path) -> None:
    wall = Wall(1_900_000_000.0)
    ident = NodeIdentity.generate()
    source = _open(tmp_path, ident, wall, leaf_lifetime_days=10.0, renew_before_days=3.0)
    old = await source.context_for("a.example.test", CLIENT)
    assert source.cached("a.example.test") is old
    wall.t += 6 * DAY_S
    assert await source.renew_due() == 0  # not yet due
    wall.t += 2 * DAY_S  # 2 days left: inside the renewal margin
    assert source.cached("a.example.test") is old  # still valid, served meanwhile
    assert await source.renew_due() == 1
    new = source.cached("a.example.test")
    assert new is not None and new is not old
    assert source.statistics().renewed == 1
    leaf = x509.load_pem_x509_certificate(
        (tmp_path / "jfe" / "certs" / "local" / "a.example.test.pem").read_bytes()
    )
    assert leaf.not_valid_after_utc.timestamp() > wall.t + 9 * DAY_S
    wall.t += 11 * DAY_S  # past the new one's end too
    assert source.cached("a.example.test") is None


async def test_concurrent_handshakes_for_a_new_name_cause_one_issuance(tmp_path: Path) -> None:
    source = _open(tmp_path, NodeIdentity.generate(), per_client_burst=1)
    got: list[object] = []

    async def ask() -> None:
        got.append(await source.context_for("a.example.test", CLIENT))

    async with trio.open_nursery() as nursery:
        await nursery.start(source.run)
        async with trio.open_nursery() as clients:
            for _ in range(50):
                clients.start_soon(ask)
        nursery.cancel_scope.cancel()
    # one client token spent, one certificate made, every handshake got it
    assert source.statistics().granted == 1
    assert len({id(ctx) for ctx in got}) == 1 and got[0] is not source.fallback_context


async def test_past_max_names_new_names_get_the_fallback(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    source = _open(tmp_path, identity, max_names=3, per_client_burst=10)
    got = [await source.context_for(f"n{i}.example.test", CLIENT) for i in range(5)]
    assert [ctx is source.fallback_context for ctx in got] == [False, False, False, True, True]
    assert source.statistics().refused == {"full": 2}
    # a restart loads no more than max_names either
    assert _open(tmp_path, identity, max_names=2).statistics().names == 2
    # a new identity is a new CA: the old CA's leaves are not served (clients would reject them)
    renewed = _open(tmp_path, NodeIdentity.generate())
    assert renewed.statistics().names == 0 and renewed.cached("n0.example.test") is None
    assert renewed.ca.signed((tmp_path / "jfe/certs/local/_fallback.pem").read_bytes())


async def test_names_no_longer_allowed_are_neither_served_nor_renewed(tmp_path: Path) -> None:
    """Review (jfe #12): the cache on disk was served and renewed whatever the allow-list says
    now, so a name the operator removed kept its certificate (and, with ACME, its orders)."""
    ident = NodeIdentity.generate()
    wall = Wall(1_800_000_000.0)
    source = _open(tmp_path, ident, wall)
    assert await source.context_for("a.example.test", CLIENT) is not source.fallback_context
    assert await source.context_for("exact.test", CLIENT) is not source.fallback_context
    narrowed = CertificateSettings(allow_names=("exact.test",))
    again = open_certificate_source(tmp_path, narrowed, ident, wall=wall)
    assert again.cached("exact.test") is not None
    assert again.cached("a.example.test") is None
    assert await again.context_for("a.example.test", CLIENT) is again.fallback_context
    assert again.statistics().names == 1
    # past both renewal times, before expiry: only the allowed name is renewed
    wall.t += (again.settings.leaf_lifetime_days - again.settings.renew_before_days / 2) * DAY_S
    assert await again.renew_due() == 1
    assert again.statistics().renewed == 1
