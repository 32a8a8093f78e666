"""The Python client of ratelockd: ask, then believe only what the node's key signed.

What it is for: an application's one way to ratelockd, over the Unix socket (or TCP). Every
request carries a fresh random nonce; every answer carries a verdict (``ratelock.verdict``)
that must verify with the node's public key, name this request's nonce, operation and subject,
bind the digest of our own token and the SHA-256 of the body we sent (so an answer to a request
re-addressed with another client's token, or with an altered body, is refused), sign the
SHA-256 of any answer body (a record, the status), and be dated within ``max_skew_s`` of our
clock. A forged, replayed, swapped or stale verdict raises :class:`overflowd.errors.VerdictError`
(a subclass naming which check failed); nothing here ever turns one into an answer. The HTTP
status is ignored: whoever sits on the socket can change it, not the signature.

What it must never do: accept a verdict it did not verify, reuse a nonce, or log a token,
password or record. Transport failures are mapped to :class:`RatelockUnavailable` here, at the
one boundary that talks to httpx.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from overflowd.errors import (
    RatelockUnavailable,
    VerdictDecodeError,
    VerdictError,
    VerdictSignatureError,
)
from overflowd.identity import check_signature
from ratelock import verdict as vd

NONCE_HEADER = "ratelock-nonce"
VERDICT_HEADER = "ratelock-verdict"
#: Nonce bytes per request: 128 bits never repeat in the life of a vault (the server accepts
#: 16..64).
NONCE_BYTES = 16
#: A verdict is a few hundred bytes plus at most one record; the daemon's record bound is
#: 64 KiB by default. We read at most this much of any answer.
MAX_ANSWER_BYTES = 1 << 20
#: Seconds a request may take end to end: an Argon2id hash waits for a slot behind others.
DEFAULT_TIMEOUT_S = 30.0
#: A verdict dated further than this from our clock is refused (the daemon's default).
DEFAULT_MAX_SKEW_S = 30.0


@dataclass(frozen=True)
class Answer:
    """What ratelockd decided, as its signed verdict says.

    ``outcome`` is the vault's word: ``ok``, ``wrong`` (a password that does not match),
    ``unknown`` (no such user), ``not_found`` (no such record), ``exists``, ``over_budget``
    (with ``retry_after_s``: no decision was made about the password), ``invalid`` (the vault
    refused the name or size), ``tampered`` (the stored verifier was edited in the database:
    refused, never hashed; tell the operator), ``unauthorized``, ``bad_request``,
    ``too_large``, ``busy``.
    """

    op: str
    subject: str
    outcome: str
    time_ms: int
    retry_after_s: float | None = None
    data: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def read_public_key(path: Path) -> bytes:
    """The node's public key from ``ratelock.pub`` (base64, as ratelockd writes it)."""
    try:
        text = path.read_text(encoding="ascii").strip()
        key = base64.b64decode(text, validate=True)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RatelockUnavailable(f"{path}: not a ratelock public key ({exc})") from None
    if len(key) != 32:
        raise RatelockUnavailable(f"{path}: not a ratelock public key (not 32 bytes)")
    return key


@dataclass(frozen=True)
class _Request:
    """One request, transport-free: what to send and what the verdict must bind."""

    method: str
    path: str
    op: str
    subject: str
    nonce: bytes
    body: bytes | None
    content_type: str | None


class _Core:
    """Requests and verdict checks shared by the sync and the async client (no I/O)."""

    def __init__(
        self, token: str, public_key: bytes, *, max_skew_s: float, clock: Callable[[], float]
    ) -> None:
        if len(public_key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        self.token = token
        self.token_digest = vd.token_digest(token)
        self.public_key = public_key
        self.max_skew_s = max_skew_s
        self.clock = clock

    def request(
        self, method: str, path: str, op: str, subject: str,
        body: bytes | None = None, content_type: str | None = None,
    ) -> _Request:
        if len(subject.encode("utf-8", "surrogatepass")) > vd.MAX_NAME_BYTES:
            # no verdict can name it, so no answer could be checked: the caller's bug
            raise ValueError(f"a user or key is at most {vd.MAX_NAME_BYTES} bytes")
        return _Request(method, path, op, subject, secrets.token_bytes(NONCE_BYTES), body,
                        content_type)

    def headers(self, req: _Request) -> dict[str, str]:
        h = {"authorization": f"Bearer {self.token}", NONCE_HEADER: _b64(req.nonce)}
        if req.content_type:
            h["content-type"] = req.content_type
        return h

    def answer(self, req: _Request, status: int, headers: httpx.Headers, body: bytes) -> Answer:
        text = headers.get(VERDICT_HEADER)
        if text is None:
            # No verdict: the daemon refused the request's form (it signs everything else),
            # or something else answered. Either way nothing here is to be believed.
            raise VerdictDecodeError(f"answer {status} carries no verdict ({body[:120]!r})")
        if len(text) > 2 * vd.MAX_VERDICT_BYTES:
            raise VerdictDecodeError("verdict header too long")
        try:
            cose = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError:
            raise VerdictDecodeError("verdict header is not base64url") from None
        # The nonce proves it answers this request; op and subject prove it answers the
        # question we asked (a man in the middle could re-address our request, nonce and all);
        # the token and body digests that it was asked with our token and our body (a man in
        # the middle holding another client's token could otherwise get a genuine "ok" for a
        # user of the same name in that client's namespace).
        verdict = vd.verify_verdict(
            cose,
            check_signature,
            public_key=self.public_key,
            nonce=req.nonce,
            now_ms=int(self.clock() * 1000),
            token=self.token_digest,
            request=vd.body_digest(req.body or b""),
            max_skew_ms=int(self.max_skew_s * 1000),
            expect={"op": req.op, "subject": req.subject},
        )
        data: bytes | None = None
        if verdict.digest is not None:
            if not hmac.compare_digest(hashlib.sha256(body).digest(), verdict.digest):
                raise VerdictSignatureError("the answer's body is not what the verdict signed")
            data = body
        elif body:
            raise VerdictDecodeError("the answer has a body its verdict does not sign")
        return Answer(
            op=verdict.op, subject=verdict.subject, outcome=verdict.outcome,
            time_ms=verdict.time_ms,
            retry_after_s=None if verdict.retry_after_ms is None
            else verdict.retry_after_ms / 1000,
            data=data,
        )


def _password(password: bytes | str) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else password


def _user_path(user: str, what: str = "") -> str:
    return f"/v1/users/{quote(user, safe='')}" + (f"/{what}" if what else "")


def _record_path(key: str) -> str:
    return f"/v1/records/{quote(key, safe='')}"


def _json_body(**fields: bytes) -> bytes:
    return json.dumps({k: _b64(v) for k, v in fields.items()}).encode("ascii")


class _Operations:
    """The operations as requests (shared by both clients)."""

    core: _Core

    def _enroll(self, user: str, password: bytes | str) -> _Request:
        return self.core.request("POST", _user_path(user, "enroll"), "enroll", user,
                                 _json_body(password=_password(password)), "application/json")

    def _verify(self, user: str, password: bytes | str) -> _Request:
        return self.core.request("POST", _user_path(user, "verify"), "verify", user,
                                 _json_body(password=_password(password)), "application/json")

    def _change(self, user: str, old: bytes | str, new: bytes | str) -> _Request:
        return self.core.request(
            "POST", _user_path(user, "change"), "change", user,
            _json_body(old=_password(old), new=_password(new)), "application/json",
        )

    def _delete_user(self, user: str) -> _Request:
        return self.core.request("DELETE", _user_path(user), "delete_user", user)

    def _put(self, key: str, data: bytes) -> _Request:
        return self.core.request("PUT", _record_path(key), "put", key, data,
                                 "application/octet-stream")

    def _get(self, key: str) -> _Request:
        return self.core.request("GET", _record_path(key), "get", key)

    def _delete_record(self, key: str) -> _Request:
        return self.core.request("DELETE", _record_path(key), "delete_record", key)

    def _status(self) -> _Request:
        return self.core.request("GET", "/v1/status", "status", "")


def _transport_args(socket_path: Path | None, url: str | None) -> tuple[str, dict[str, Any]]:
    if (socket_path is None) == (url is None):
        raise ValueError("give exactly one of socket_path and url")
    if socket_path is not None:
        return "http://ratelockd", {"uds": str(socket_path)}
    assert url is not None
    return url.rstrip("/"), {}


def _where(socket_path: Path | None, url: str | None) -> str:
    return f"unix:{socket_path}" if socket_path is not None else str(url)


class Client(_Operations):
    """A synchronous client (httpx). One per thread or shared: httpx's pool is thread-safe."""

    def __init__(
        self, *, token: str, public_key: bytes, socket_path: Path | None = None,
        url: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
        max_skew_s: float = DEFAULT_MAX_SKEW_S, clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = _Core(token, public_key, max_skew_s=max_skew_s, clock=clock)
        base, kw = _transport_args(socket_path, url)
        self.where = _where(socket_path, url)
        self._http = httpx.Client(
            base_url=base, transport=httpx.HTTPTransport(**kw), timeout=timeout_s,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, req: _Request) -> Answer:
        try:
            with self._http.stream(
                req.method, req.path, content=req.body, headers=self.core.headers(req)
            ) as resp:
                body = bytearray()
                for chunk in resp.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise VerdictError(f"answer from {self.where} over {MAX_ANSWER_BYTES} B")
                status, headers = resp.status_code, resp.headers
        except httpx.HTTPError as exc:
            raise RatelockUnavailable(f"ratelockd at {self.where}: {exc}") from None
        return self.core.answer(req, status, headers, bytes(body))

    def enroll(self, user: str, password: bytes | str) -> Answer:
        return self._send(self._enroll(user, password))

    def verify(self, user: str, password: bytes | str) -> Answer:
        return self._send(self._verify(user, password))

    def change(self, user: str, old: bytes | str, new: bytes | str) -> Answer:
        return self._send(self._change(user, old, new))

    def delete_user(self, user: str) -> Answer:
        return self._send(self._delete_user(user))

    def put(self, key: str, data: bytes) -> Answer:
        return self._send(self._put(key, data))

    def get(self, key: str) -> Answer:
        return self._send(self._get(key))

    def delete_record(self, key: str) -> Answer:
        return self._send(self._delete_record(key))

    def status(self) -> dict[str, Any]:
        answer = self._send(self._status())
        if not answer.ok or answer.data is None:
            raise VerdictError(f"status refused: {answer.outcome}")
        result: dict[str, Any] = json.loads(answer.data)
        return result


class AsyncClient(_Operations):
    """The same over httpx's async client (trio or asyncio, through anyio)."""

    def __init__(
        self, *, token: str, public_key: bytes, socket_path: Path | None = None,
        url: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
        max_skew_s: float = DEFAULT_MAX_SKEW_S, clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = _Core(token, public_key, max_skew_s=max_skew_s, clock=clock)
        base, kw = _transport_args(socket_path, url)
        self.where = _where(socket_path, url)
        self._http = httpx.AsyncClient(
            base_url=base, transport=httpx.AsyncHTTPTransport(**kw), timeout=timeout_s,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, req: _Request) -> Answer:
        try:
            async with self._http.stream(
                req.method, req.path, content=req.body, headers=self.core.headers(req)
            ) as resp:
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        raise VerdictError(f"answer from {self.where} over {MAX_ANSWER_BYTES} B")
                status, headers = resp.status_code, resp.headers
        except httpx.HTTPError as exc:
            raise RatelockUnavailable(f"ratelockd at {self.where}: {exc}") from None
        return self.core.answer(req, status, headers, bytes(body))

    async def enroll(self, user: str, password: bytes | str) -> Answer:
        return await self._send(self._enroll(user, password))

    async def verify(self, user: str, password: bytes | str) -> Answer:
        return await self._send(self._verify(user, password))

    async def change(self, user: str, old: bytes | str, new: bytes | str) -> Answer:
        return await self._send(self._change(user, old, new))

    async def delete_user(self, user: str) -> Answer:
        return await self._send(self._delete_user(user))

    async def put(self, key: str, data: bytes) -> Answer:
        return await self._send(self._put(key, data))

    async def get(self, key: str) -> Answer:
        return await self._send(self._get(key))

    async def delete_record(self, key: str) -> Answer:
        return await self._send(self._delete_record(key))


__all__ = ["Answer", "AsyncClient", "Client", "read_public_key"]
