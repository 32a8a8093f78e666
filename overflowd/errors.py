"""The one exception tree of overflowd, jfe and ratelock.

Expected outcomes (a flow sampled out, a budget exhausted, an unknown template) are values and
counters, never exceptions. Exceptions are for input we refuse and for failures of the world::

    OverflowdError                    raised on purpose; CLIs print it in one line, exit 1
    ├── ConfigError                   bad config file or flag: names the file, key and line
    ├── IdentityError                 node key missing, unreadable, or readable by others
    ├── DecodeError                   bytes from a peer we cannot parse (format, offset)
    │   └── ReportDecodeError         a signed report that is malformed
    ├── SignatureError                a well-formed message whose signature does not verify
    ├── DeliveryError                 in-band or webhook delivery failed (after retries)
    ├── DiscoveryError                DNS lookups for keys and contacts failed
    ├── StoreError                    the database refused or could not be reached
    ├── JfeError                      jfe's own failures
    │   ├── NotTls                    first bytes of a connection that are not a TLS ClientHello
    │   ├── RulesError                nft / ip refused jfe's ruleset or policy routing
    │   ├── ProxyError                the listener or an upstream socket could not be set up
    │   ├── CertificateError          a certificate, key or CA file jfe cannot use
    │   └── AcmeError                 an ACME order or account failed (the reason inside)
    └── RatelockError                 ratelock's own failures
        ├── VaultError                the vault's database cannot be opened or used
        ├── SecretError               the vault secret file is missing, unreadable or too open
        ├── SealError                 a sealed verifier or record does not open (wrong secret)
        ├── VerdictError              a signed verdict the client must refuse
        │   ├── VerdictDecodeError    malformed, oversized, or not a ratelock verdict
        │   ├── VerdictSignatureError not signed by the expected ratelockd key
        │   ├── VerdictReplayError    does not bind this request's nonce (replayed or swapped)
        │   └── VerdictStaleError     dated too far from the client's clock
        └── RatelockUnavailable       ratelockd unreachable, or its answer unreadable (client)

Library misuse (wrong argument types, calling things in the wrong order) raises the ordinary
Python exceptions (TypeError, ValueError): those are bugs in the caller, not input to handle.
"""

from __future__ import annotations


class OverflowdError(Exception):
    """Base of every error overflowd raises on purpose."""


class ConfigError(OverflowdError):
    """A config file or command-line value we refuse; the message names where."""


class IdentityError(OverflowdError):
    """The node identity cannot be created or loaded safely."""


class DecodeError(OverflowdError):
    """Bytes from outside that do not parse.

    ``fmt`` names the format (``netflow-v5``, ``cose-report``...), ``offset`` the byte where
    decoding stopped, ``exporter`` who sent it, when known.
    """

    def __init__(
        self,
        reason: str,
        *,
        fmt: str = "",
        offset: int | None = None,
        exporter: str | None = None,
    ) -> None:
        self.reason = reason
        self.fmt = fmt
        self.offset = offset
        self.exporter = exporter
        where = []
        if fmt:
            where.append(fmt)
        if exporter:
            where.append(f"from {exporter}")
        if offset is not None:
            where.append(f"at byte {offset}")
        super().__init__(f"{' '.join(where)}: {reason}" if where else reason)


class ReportDecodeError(DecodeError):
    """A signed report (COSE_Sign1) that is malformed or not ours."""

    def __init__(self, reason: str, *, offset: int | None = None) -> None:
        super().__init__(reason, fmt="report", offset=offset)


class SignatureError(OverflowdError):
    """A well-formed message whose signature does not verify."""


class DeliveryError(OverflowdError):
    """A report could not be delivered."""


class DiscoveryError(OverflowdError):
    """Keys or contacts could not be looked up."""


class StoreError(OverflowdError):
    """The store failed; the message says which database and why."""


class JfeError(OverflowdError):
    """jfe failed."""


class NotTls(JfeError):
    """A client's first bytes are not a TLS ClientHello we answer (garbage, other protocol,
    or over the size bound). The proxy passes such connections through byte-exact; ``offset``
    is the byte where the sniffer stopped believing."""

    def __init__(self, reason: str, *, offset: int | None = None) -> None:
        self.reason = reason
        self.offset = offset
        where = f"not a TLS ClientHello at byte {offset}: " if offset is not None else ""
        super().__init__(where + reason)


class RulesError(JfeError):
    """nftables or policy routing refused what jfe asked; the message holds the tool's words."""


class ProxyError(JfeError):
    """The transparent listener or an upstream socket could not be set up."""


class CertificateError(JfeError):
    """A certificate, key or CA file jfe cannot read, parse or write (names the file)."""


class AcmeError(JfeError):
    """An ACME account or order failed; the message has the server's problem type."""


class RatelockError(OverflowdError):
    """ratelock failed."""


# -- ratelock (ratelock-core) ---------------------------------------------------------------


class VaultError(RatelockError):
    """The vault's database cannot be opened or used; the message names the store."""


class SecretError(RatelockError):
    """The vault secret cannot be created, read or trusted."""


class SealError(RatelockError):
    """A sealed value does not open with the secret (wrong key, edited row or other user)."""


class VerdictError(RatelockError):
    """A verdict the client library refuses; never act on its contents."""


class VerdictDecodeError(VerdictError):
    """Bytes that are not a well-formed ratelock verdict."""


class VerdictSignatureError(VerdictError):
    """A well-formed verdict not signed by the ratelockd key the client trusts."""


class VerdictReplayError(VerdictError):
    """A verdict for another request: its nonce is not the one this request sent."""


class VerdictStaleError(VerdictError):
    """A verdict dated too far from the client's clock."""


# -- ratelock (ratelock-server) -------------------------------------------------------------


class RatelockUnavailable(RatelockError):
    """The client could not reach ratelockd or read its answer (names the socket or URL)."""
