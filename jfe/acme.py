"""ACME (RFC 8555) issuance for jfe with certbot's ``acme`` library, answering tls-alpn-01.

The library is synchronous (requests): :class:`AcmeIssuer.issue` runs in a worker thread that
:mod:`jfe.certs` starts under a CapacityLimiter and a deadline (``acme_order_timeout_s``); every
HTTP request has ``acme_request_timeout_s``. This is the one module that talks to the library:
whatever it raises leaves here as :class:`~overflowd.errors.AcmeError`.

The challenge is tls-alpn-01 (RFC 8737), which jfe answers on the TLS port it already holds:
while an order's authorization is pending, :meth:`jfe.certs.Certificates.challenge_context`
returns a context whose certificate carries the acmeIdentifier extension and whose only ALPN
protocol is ``acme-tls/1``; the proxy serves it to a ClientHello offering ``acme-tls/1`` for
that name, and closes. The ``acme`` library dropped its tls-alpn-01 classes, so this module
computes the key authorization itself (RFC 8555 §8.1) and posts the empty object ``{}``.

badNonce (RFC 8555 §6.5) is retryable by design; the library retries once, which Pebble's
default 5% rejection defeats about once in 400 requests, so :class:`_Network` retries up to
:data:`BAD_NONCE_RETRIES` times, each with a fresh nonce.

The account key (ECDSA P-256, ES256) is created on first use in the cache directory, mode
0600, with the account URL beside it. Only names that passed the gate reach :meth:`issue`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import requests
from acme import client as acme_client
from acme import crypto_util, messages
from acme import errors as acme_errors
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy import errors as jose_errors
from josepy.b64 import b64encode
from josepy.interfaces import JSONDeSerializable
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from jfe.ca import Leaf, key_pem, new_leaf_key, tls_alpn_challenge_pem, write_private
from jfe.certconfig import CertificateSettings
from overflowd.errors import AcmeError

log = logging.getLogger(__name__)

#: badNonce retries per request (each a new nonce); 0.05**9 makes a loss vanishingly rare.
BAD_NONCE_RETRIES = 8
TLS_ALPN_01 = "tls-alpn-01"
USER_AGENT = "jfe (overflowd) acme-python"
ACCOUNT_KEY_FILE = "account.pem"
ACCOUNT_FILE = "account.json"
#: An account file over this is not ours.
MAX_ACCOUNT_FILE_BYTES = 16 * 1024


class ChallengeHooks(Protocol):
    """Where an issuer publishes tls-alpn-01 answers (jfe.certs.Certificates)."""

    def publish_challenge(self, name: str, pem: bytes) -> None: ...

    def withdraw_challenge(self, name: str) -> None: ...


class _Network(acme_client.ClientNetwork):
    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for attempt in range(BAD_NONCE_RETRIES + 1):
            try:
                return self._post_once(*args, **dict(kwargs))
            except messages.Error as error:
                if error.code != "badNonce" or attempt == BAD_NONCE_RETRIES:
                    raise
        raise AssertionError("unreachable")


class _EmptyObject(JSONDeSerializable):
    """The challenge response body RFC 8555 §7.5.1 asks for: ``{}``."""

    def to_partial_json(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_json(cls, jobj: Any) -> _EmptyObject:
        return cls()

    def __bool__(self) -> bool:  # the library sends an empty body for falsy objects
        return True


def key_authorization(token: str, account_key: JWK) -> str:
    """RFC 8555 §8.1: token || '.' || base64url(SHA-256 JWK thumbprint of the account key)."""
    thumb = account_key.public_key().thumbprint(hash_function=hashes.SHA256)
    return token + "." + b64encode(thumb).decode("ascii")


def issuer_label(directory_url: str) -> str:
    """Certificates of one ACME server are cached apart from another's (staging vs prod)."""
    return "acme-" + hashlib.sha256(directory_url.encode()).hexdigest()[:12]


class AcmeIssuer:
    """One ACME account at one directory; :meth:`issue` is one order (blocking)."""

    def __init__(self, directory: Path, settings: CertificateSettings) -> None:
        self.settings = settings
        self.label = issuer_label(settings.acme_directory_url)
        self.dir = directory
        self._hooks: ChallengeHooks | None = None
        self._lock = threading.Lock()
        self._key: JWKEC | None = None
        self._account: messages.RegistrationResource | None = None
        self._directory: messages.Directory | None = None
        self.orders = 0

    @classmethod
    def open(cls, cache_dir: Path, settings: CertificateSettings) -> AcmeIssuer:
        issuer = cls(cache_dir / "acme" / issuer_label(settings.acme_directory_url), settings)
        issuer._load_key()
        return issuer

    def attach(self, hooks: ChallengeHooks) -> None:
        self._hooks = hooks

    def _verify(self) -> bool | str:
        return self.settings.acme_ca_bundle_file or True

    def _load_key(self) -> None:
        path = self.dir / ACCOUNT_KEY_FILE
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            key = new_leaf_key()
            write_private(path, key_pem(key))
        except (OSError, ValueError) as exc:
            raise AcmeError(f"{path}: not an ACME account key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AcmeError(f"{path}: the ACME account key must be ECDSA P-256")
        self._key = JWKEC(key=key)

    def _network(self) -> _Network:
        return _Network(
            self._key,
            account=self._account,
            alg=ES256,
            verify_ssl=self._verify(),  # type: ignore[arg-type]  # requests takes a path too
            user_agent=USER_AGENT,
            timeout=int(self.settings.acme_request_timeout_s),
        )

    def _ensure_account(self, fresh: bool = False) -> None:
        """Fetch the directory and register (or find) the account, once per process."""
        with self._lock:
            if self._account is not None and not fresh:
                return
            net = self._network()
            net.account = None
            if self._directory is None:
                self._directory = acme_client.ClientV2.get_directory(
                    self.settings.acme_directory_url, net
                )
            acme = acme_client.ClientV2(self._directory, net)
            contact: tuple[str, ...] = (
                (self.settings.acme_contact,) if self.settings.acme_contact else ()
            )
            reg = messages.NewRegistration(contact=contact, terms_of_service_agreed=True)
            try:
                account = acme.new_account(reg)
            except acme_errors.ConflictError as exc:  # the key has an account already
                account = messages.RegistrationResource(
                    uri=exc.location, body=messages.Registration()
                )
            self._account = account
            write_private(
                self.dir / ACCOUNT_FILE,
                json.dumps(
                    {"uri": account.uri, "directory": self.settings.acme_directory_url}
                ).encode(),
            )
            log.info("acme_account uri=%s", account.uri)

    def issue(self, name: str) -> Leaf:
        """One order for ``name`` (tls-alpn-01), blocking; AcmeError for every failure."""
        try:
            try:
                return self._issue(name)
            except messages.Error as exc:
                if exc.code != "accountDoesNotExist":
                    raise
                # the server forgot the account (a test CA restarted, an account deactivated
                # elsewhere): register again, once, and retry the order
                self._ensure_account(fresh=True)
                return self._issue(name)
        except AcmeError:
            raise
        except messages.Error as exc:
            raise AcmeError(f"acme order for {name}: {exc.typ}: {exc.detail}") from None
        except acme_errors.ValidationError as exc:
            raise AcmeError(f"acme order for {name}: validation failed: {_problems(exc)}") from None
        except acme_errors.TimeoutError:
            raise AcmeError(f"acme order for {name}: timed out") from None
        except (acme_errors.Error, requests.RequestException, jose_errors.Error) as exc:
            raise AcmeError(f"acme order for {name}: {type(exc).__name__}: {exc}") from None

    def _issue(self, name: str) -> Leaf:
        if self._key is None:
            raise AcmeError("no ACME account key")
        self._ensure_account()
        assert self._directory is not None and self._hooks is not None
        deadline = dt.datetime.now() + dt.timedelta(seconds=self.settings.acme_order_timeout_s)
        acme = acme_client.ClientV2(self._directory, self._network())
        leaf_key = new_leaf_key()
        leaf_key_pem = key_pem(leaf_key)
        csr = crypto_util.make_csr(leaf_key_pem, [name])
        order = acme.new_order(csr)
        self.orders += 1
        published: list[str] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # reused authorization: nothing to prove
                challb = _find_challenge(authz.body.challenges)
                ident = authz.body.identifier.value
                token = _token(challb)
                pem = tls_alpn_challenge_pem(ident, key_authorization(token, self._key))
                self._hooks.publish_challenge(ident, pem)
                published.append(ident)
                acme.answer_challenge(challb, _EmptyObject())  # type: ignore[arg-type]
            order = acme.poll_and_finalize(order, deadline=deadline)
        finally:
            for ident in published:
                self._hooks.withdraw_challenge(ident)
        chain = order.fullchain_pem
        if not chain or "BEGIN CERTIFICATE" not in chain:
            raise AcmeError(f"acme order for {name}: no certificate in the answer")
        pem = leaf_key_pem + chain.encode("ascii")
        return Leaf(name=name, pem=pem, not_after=Leaf.not_after_of(chain.encode("ascii")))


def _find_challenge(challenges: Any) -> messages.ChallengeBody:
    for challb in challenges:
        if _typ(challb) == TLS_ALPN_01 and isinstance(challb, messages.ChallengeBody):
            return challb
    offered = ", ".join(sorted(_typ(c) for c in challenges))
    raise AcmeError(f"the ACME server offers no {TLS_ALPN_01} challenge (offers {offered})")


def _typ(challb: messages.ChallengeBody) -> str:
    chall = challb.chall
    jobj = getattr(chall, "jobj", None)
    if isinstance(jobj, Mapping):
        return str(jobj.get("type", ""))
    return str(getattr(chall, "typ", ""))


def _token(challb: messages.ChallengeBody) -> str:
    jobj = getattr(challb.chall, "jobj", None)
    token = jobj.get("token") if isinstance(jobj, Mapping) else None
    if not isinstance(token, str) or not token or len(token) > 256:
        raise AcmeError("tls-alpn-01 challenge without a usable token")
    return token


def _problems(exc: acme_errors.ValidationError) -> str:
    parts = []
    for authzr in exc.failed_authzrs:
        for chall in authzr.body.challenges:
            if chall.error is not None:
                parts.append(f"{chall.error.typ}: {chall.error.detail}")
    return "; ".join(parts) or "no detail"
