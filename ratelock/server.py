"""ratelockd: the vault's HTTP face, on a Unix socket in the node home (or TCP).

What it is for: the application asks, ratelockd decides within budgets the vault enforces
itself (``ratelock.vault``), and every answer is a verdict signed with the node identity that
binds the client's request nonce (``ratelock.verdict``), so whoever sits between the two can
neither forge an answer nor replay an old one. What it must never do: answer before the
vault's charge is committed, hold more Argon2id hashes in memory than ``max_concurrent_hashes``,
read an unbounded body, or log a token, a password or a record.

Wire protocol (docs/ratelock.md has it for operators)::

    Authorization: Bearer <token>        per client; the vault keeps only its hash
    Ratelock-Nonce: <base64url>          16..64 fresh random bytes per request

    POST   /v1/users/{user}/enroll       {"password": b64url}
    POST   /v1/users/{user}/verify       {"password": b64url}
    POST   /v1/users/{user}/change       {"old": b64url, "new": b64url}
    DELETE /v1/users/{user}
    PUT    /v1/records/{key}             the record's bytes
    GET    /v1/records/{key}
    DELETE /v1/records/{key}
    GET    /v1/status
    GET    /healthz, /metrics, /v1/identity   (no token, no verdict: liveness, counters, key)

Every answer to a request that carried a well-formed nonce carries a signed verdict (COSE_Sign1,
``application/ratelock-verdict+cbor``, base64url in the ``Ratelock-Verdict`` header; the body is
the record or status bytes the verdict's ``digest`` binds), refusals included: the client
believes the verdict,
never the HTTP status (a man in the middle can rewrite the status, not the signature). The
status still follows the verdict for people and proxies: 429 with ``Retry-After`` over budget,
401 for a bad token, 400/413 for bad input, 503 when the hash slots are all taken.

Every verdict (v2) also binds a digest of the bearer token the request presented and the
SHA-256 of the body read, so the client library refuses an answer to its request re-addressed
with another client's token or carrying an altered body. ``/v1/status`` answers the caller's
own view only (Vault.client_status). Requests refused before the vault are counted per
(client, op, reason) and audited as one ``refused:N`` row per key per
``audit_refusal_window_s`` (ratelock.audit.RefusalTally): a flood cannot grow the log a row
per request.

Blocking work (the vault's SQL and Argon2id) runs in worker threads, at most
``max_concurrent_hashes`` at once (one ``trio.CapacityLimiter``), and is never abandoned on
cancellation: a client that disconnects mid-request does not get its charge refunded, because
the vault committed it before it computed the answer.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import errno
import grp
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from overflowd import logformat
from overflowd.config import key_origin, resolve_home
from overflowd.errors import ConfigError, IdentityError, OverflowdError, RatelockError
from overflowd.homelock import acquire
from overflowd.identity import NodeIdentity, load_identity
from overflowd.sandbox import confine
from ratelock import policy
from ratelock import verdict as vd
from ratelock.audit import RefusalTally
from ratelock.config import RatelockSettings, load_ratelock
from ratelock.vault import Outcome, Vault

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Limits. Every request is an attacker's: each bound below names what it protects.

#: Request nonce size: 16 bytes (128 bits) is the least that cannot be guessed or collide in
#: the life of a vault; 64 bounds what we copy into each verdict.
MIN_NONCE_BYTES = vd.MIN_NONCE_BYTES
MAX_NONCE_BYTES = vd.MAX_NONCE_BYTES
#: A password body ({"password": b64url} or old/new) is far below this; the bound keeps a
#: client from making us buffer and parse megabytes of JSON per request.
MAX_PASSWORD_BODY_BYTES = 4096
#: Pending TCP connections the kernel queues for us (hypercorn's default).
LISTEN_BACKLOG = 100
#: An idle keep-alive connection is closed after this long: clients are few and local, and an
#: idle connection holds a file descriptor.
KEEP_ALIVE_S = 15
#: The whole request (headers, body, the vault's decision) must finish within this long; a
#: slow client is dropped (the vault's charge, once taken, stays taken).
REQUEST_BODY_TIMEOUT_S = 10.0
#: Requests waiting for a hash slot at most, beyond the slots themselves; more is 503 with
#: this Retry-After, so a flood queues in bounded memory instead of in every coroutine.
MAX_WAITING_PER_SLOT = 8
BUSY_RETRY_AFTER_S = 1
#: At shutdown, the last window's refusal rows get this long to commit.
REFUSAL_FLUSH_TIMEOUT_S = 5.0
#: Header names: the request nonce, and the answer's verdict (base64url COSE_Sign1, at most
#: verdict.MAX_VERDICT_BYTES): a header so that a record's bytes can be the body, bound to the
#: verdict by its SHA-256 ``digest``.
NONCE_HEADER = "ratelock-nonce"
VERDICT_HEADER = "ratelock-verdict"
#: The file beside the socket holding the node's public key (base64), readable by all: what a
#: client pins to verify verdicts (the key is public; the daemon rewrites it at every start).
PUBLIC_KEY_FILE = "ratelock.pub"

OPERATIONS = ("enroll", "verify", "change", "delete_user", "put", "get", "delete_record", "status")


# ---------------------------------------------------------------------------------------------
# Metrics


class RatelockMetrics:
    """The daemon's Prometheus families (each listed in docs/ratelock.md "Metrics")."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ratelock_requests", "Answered requests by operation and outcome",
            ["op", "outcome"], registry=self.registry,
        )
        self.refused = Counter(
            "ratelock_refused", "Requests refused before the vault by reason",
            ["reason"], registry=self.registry,
        )
        self.seconds = Histogram(
            "ratelock_request_seconds", "Time to answer a vault operation",
            ["op"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.busy = Gauge(
            "ratelock_hash_slots_busy", "Vault calls running in worker threads now",
            registry=self.registry,
        )
        self.waiting = Gauge(
            "ratelock_hash_slots_waiting", "Requests waiting for a hash slot now",
            registry=self.registry,
        )
        self.tampered = Counter(
            "ratelock_tampered_rows", "Verifies refused because the stored verifier was edited "
            "(parameters out of bounds, or sealed for other parameters): never hashed",
            registry=self.registry,
        )
        self.refusal_rows = Counter(
            "ratelock_refusal_audit_rows", "Aggregated audit rows written for refusals before "
            "the vault (one per client, op and reason per window)", registry=self.registry,
        )
        self.refusal_requests = Counter(
            "ratelock_refusal_audit_requests", "Refusals before the vault counted in those rows",
            registry=self.registry,
        )
        self.refusal_overflow = Counter(
            "ratelock_refusal_audit_overflow", "Refusals counted in a window's overflow row "
            "(past its distinct-key bound)", registry=self.registry,
        )
        self.refusal_failed = Counter(
            "ratelock_refusal_audit_failures", "Refusal rows that could not be written "
            "(the store failed; their counts are lost, the metrics keep them)",
            registry=self.registry,
        )
        self.audit_signed = Counter(
            "ratelock_audit_heads_signed", "Audit heads signed by the periodic task",
            registry=self.registry,
        )
        self.audit_failed = Counter(
            "ratelock_audit_head_failures", "Periodic audit head signings that failed",
            registry=self.registry,
        )


# ---------------------------------------------------------------------------------------------
# The application


#: The worker threads' own limiter: the hash slots (ServerContext.limiter) already bound them.
_UNBOUNDED = trio.CapacityLimiter(1_000_000)


class Refusal(Exception):
    """A request refused before the vault: HTTP status, verdict outcome, counter reason."""

    def __init__(self, status: int, outcome: str, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.status = status
        self.outcome = outcome
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class ServerContext:
    vault: Vault
    identity: NodeIdentity
    settings: RatelockSettings
    metrics: RatelockMetrics = field(default_factory=RatelockMetrics)
    clock: Callable[[], float] = time.time
    limiter: trio.CapacityLimiter | None = None
    #: refusals before the vault, audited in aggregate by RatelockService (one row per key)
    refusals: RefusalTally = field(default_factory=RefusalTally)

    def __post_init__(self) -> None:
        if self.limiter is None:
            self.limiter = trio.CapacityLimiter(self.settings.max_concurrent_hashes)
        self.sign = self.identity.signer()


#: HTTP status of each vault outcome; the verdict is the truth, this is for people and proxies.
_STATUS = {
    "ok": 200, "wrong": 200, "unknown": 404, "not_found": 404, "exists": 409,
    "over_budget": 429, "invalid": 400, "unauthorized": 401, "bad_request": 400,
    "too_large": 413, "busy": 503, "tampered": 500,
}


def _nonce(request: Request) -> bytes:
    text = request.headers.get(NONCE_HEADER)
    if text is None:
        raise Refusal(400, "bad_request", "no_nonce")
    try:
        nonce = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise Refusal(400, "bad_request", "bad_nonce") from None
    if not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise Refusal(400, "bad_request", "bad_nonce")
    return nonce


def _name(text: str, max_bytes: int) -> str:
    """User names and record keys are path segments: short, printable, no control characters."""
    if not text or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise Refusal(400, "bad_request", "bad_name")
    if not text.isprintable():
        raise Refusal(400, "bad_request", "bad_name")
    return text


async def _body(request: Request, limit: int) -> bytes:
    """The body, at most ``limit`` bytes, within REQUEST_BODY_TIMEOUT_S."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise Refusal(413, "too_large", "too_large")
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(REQUEST_BODY_TIMEOUT_S) as scope:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refusal(413, "too_large", "too_large")
            chunks.append(chunk)
    if scope.cancelled_caught:
        raise Refusal(400, "bad_request", "slow_body")
    return b"".join(chunks)


def _b64(obj: dict[str, Any], key: str, max_bytes: int) -> bytes:
    value = obj.get(key)
    if not isinstance(value, str):
        raise Refusal(400, "bad_request", "bad_body")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise Refusal(400, "bad_request", "bad_body") from None
    if len(raw) > max_bytes:
        raise Refusal(413, "too_large", "too_large")
    return raw


def _json(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # "[[[[..." nests past the stack
        raise Refusal(400, "bad_request", "bad_body") from None
    if not isinstance(obj, dict):
        raise Refusal(400, "bad_request", "bad_body")
    return obj


def create_app(ctx: ServerContext) -> Starlette:
    """The ASGI app; Starlette, not FastAPI: bodies are raw bytes and answers CBOR verdicts,
    so FastAPI's JSON validation and OpenAPI would describe none of what matters."""
    m = ctx.metrics
    limiter = ctx.limiter
    assert limiter is not None
    max_waiting = MAX_WAITING_PER_SLOT * ctx.settings.max_concurrent_hashes
    max_name = ctx.settings.max_name_bytes
    max_pw = ctx.settings.max_password_bytes

    public_key = ctx.identity.public_key

    def verdict_response(
        op: str, client: str, subject: str, nonce: bytes, token: bytes, request: bytes | None,
        outcome: str, retry_after_s: float | None = None, data: bytes | None = None,
    ) -> Response:
        retry_ms = None if retry_after_s is None else max(0, int(retry_after_s * 1000))
        cose = vd.encode_verdict(
            vd.Verdict(
                op=op, nonce=nonce, client=client, subject=subject, outcome=outcome,
                time_ms=int(ctx.clock() * 1000), token=token, request=request,
                retry_after_ms=retry_ms,
                digest=None if data is None else hashlib.sha256(data).digest(),
            ),
            public_key,
            ctx.sign,
        )
        headers = {VERDICT_HEADER: base64.urlsafe_b64encode(cose).rstrip(b"=").decode("ascii")}
        if retry_ms is not None:
            headers["Retry-After"] = str(policy.retry_after_header(retry_ms))
        return Response(
            data or b"", status_code=_STATUS.get(outcome, 200),
            media_type="application/octet-stream", headers=headers,
        )

    async def in_thread(fn: Callable[[], Outcome]) -> Outcome:
        stats = limiter.statistics()
        if stats.tasks_waiting >= max_waiting:
            raise Refusal(503, "busy", "busy", BUSY_RETRY_AFTER_S)
        m.waiting.inc()
        try:
            await limiter.acquire()
        finally:
            m.waiting.dec()
        m.busy.inc()
        try:
            # Not abandoned on cancel: the charge is the vault's, and we wait for it.
            return await trio.to_thread.run_sync(fn, limiter=_UNBOUNDED)
        finally:
            m.busy.dec()
            limiter.release()

    def handler(
        op: str, subject_param: str | None, body_limit: int,
        call: Callable[[bytes, str, str], Callable[[], Outcome]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.monotonic()
            try:
                nonce = _nonce(request)
            except Refusal as r:
                m.refused.labels(r.reason).inc()
                ctx.refusals.add("", op, r.reason)
                return JSONResponse({"error": r.reason}, status_code=r.status)
            subject = client = ""
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            # the verdict binds the token presented, whatever it is, so that the client can
            # tell an answer to its own request from one earned with another client's token
            bound_token = vd.token_digest(token if scheme.lower() == "bearer" else "")
            bound_body: bytes | None = None
            try:
                if subject_param is not None:
                    raw = request.path_params[subject_param]
                    # echoed in the refusal so the client can match it; the verdict bounds it
                    if len(raw.encode("utf-8", "surrogatepass")) <= vd.MAX_NAME_BYTES:
                        subject = raw
                    _name(raw, max_name)
                if scheme.lower() != "bearer" or not token or len(token) > 512:
                    raise Refusal(401, "unauthorized", "bad_token")
                name = await trio.to_thread.run_sync(ctx.vault.authenticate, token.strip())
                if name is None:
                    raise Refusal(401, "unauthorized", "bad_token")
                client = name
                body = await _body(request, body_limit)
                bound_body = vd.body_digest(body)
                fn = call(body, client, subject)
                outcome = await in_thread(fn)
            except Refusal as r:
                m.refused.labels(r.reason).inc()
                ctx.refusals.add(client, op, r.reason)
                return verdict_response(
                    op, client, subject, nonce, bound_token, bound_body, r.outcome,
                    r.retry_after_s,
                )
            m.requests.labels(op, outcome.kind).inc()
            if outcome.kind == "tampered":
                m.tampered.inc()
            m.seconds.labels(op).observe(time.monotonic() - started)
            return verdict_response(
                op, client, subject, nonce, bound_token, bound_body, outcome.kind,
                outcome.retry_after_s, outcome.data,
            )

        return endpoint

    v = ctx.vault

    def enroll(body: bytes, client: str, user: str) -> Callable[[], Outcome]:
        password = _b64(_json(body), "password", max_pw)
        return lambda: v.enroll(client, user, password)

    def verify(body: bytes, client: str, user: str) -> Callable[[], Outcome]:
        password = _b64(_json(body), "password", max_pw)
        return lambda: v.verify(client, user, password)

    def change(body: bytes, client: str, user: str) -> Callable[[], Outcome]:
        obj = _json(body)
        old, new = _b64(obj, "old", max_pw), _b64(obj, "new", max_pw)
        return lambda: v.change(client, user, old, new)

    def delete_user(body: bytes, client: str, user: str) -> Callable[[], Outcome]:
        return lambda: v.delete_user(client, user)

    def put(body: bytes, client: str, key: str) -> Callable[[], Outcome]:
        return lambda: v.put(client, key, body)

    def get(body: bytes, client: str, key: str) -> Callable[[], Outcome]:
        return lambda: v.get(client, key)

    def delete_record(body: bytes, client: str, key: str) -> Callable[[], Outcome]:
        return lambda: v.delete_record(client, key)

    def status(body: bytes, client: str, subject: str) -> Callable[[], Outcome]:
        def answer() -> Outcome:
            s = dataclasses.asdict(v.client_status(client))
            return Outcome(kind="ok", data=json.dumps(s, sort_keys=True).encode())

        return answer

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(m.registry), media_type="text/plain; version=0.0.4")

    async def identity(request: Request) -> Response:
        return JSONResponse({
            "key": ctx.identity.public_key_b64, "fingerprint": ctx.identity.fingerprint,
        })

    pw, rec = MAX_PASSWORD_BODY_BYTES, ctx.settings.max_record_bytes
    user, key = "/v1/users/{user:path}", "/v1/records/{key:path}"
    routes = [
        Route(f"{user}/enroll", handler("enroll", "user", pw, enroll), methods=["POST"]),
        Route(f"{user}/verify", handler("verify", "user", pw, verify), methods=["POST"]),
        Route(f"{user}/change", handler("change", "user", pw, change), methods=["POST"]),
        Route(user, handler("delete_user", "user", 0, delete_user), methods=["DELETE"]),
        Route(key, handler("put", "key", rec, put), methods=["PUT"]),
        Route(key, handler("get", "key", 0, get), methods=["GET"]),
        Route(key, handler("delete_record", "key", 0, delete_record), methods=["DELETE"]),
        # a body on GET/DELETE is refused (too_large): the verdict binds an empty one
        Route("/v1/status", handler("status", None, 0, status), methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/identity", identity, methods=["GET"]),
    ]
    async def no_route(request: Request, exc: Exception) -> Response:
        """Wrong method or no such path: refused before the vault, so counted and audited in
        aggregate like any other (no client is known: the token is not even looked at)."""
        status = getattr(exc, "status_code", 404)
        reason = "wrong_method" if status == 405 else "no_route"
        m.refused.labels(reason).inc()
        ctx.refusals.add("", "-", reason)
        return JSONResponse({"error": reason}, status_code=status)

    return Starlette(routes=routes, exception_handlers={404: no_route, 405: no_route})


# ---------------------------------------------------------------------------------------------
# Sockets


@dataclass(frozen=True)
class Listen:
    """Where to listen: a Unix socket path, or a TCP host and port."""

    path: Path | None = None
    host: str = ""
    port: int = 0

    def text(self) -> str:
        return f"unix:{self.path}" if self.path is not None else _hostport(self.host, self.port)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(text: str, home: Path) -> Listen:
    """``unix:PATH`` (relative to the home) or ``tcp:HOST:PORT`` / ``HOST:PORT``."""
    if text.startswith("unix:"):
        rest = text[5:]
        if not rest:
            raise ValueError(f"{text!r}: unix: needs a path")
        path = Path(rest).expanduser()
        return Listen(path=path if path.is_absolute() else home / path)
    rest = text[4:] if text.startswith("tcp:") else text
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"{text!r} is neither unix:PATH nor HOST:PORT")
    return Listen(host=host.strip("[]"), port=int(port))


def _socket_group(name: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ConfigError(f"ratelock.socket_group: no group named {name!r}") from None


def open_unix_socket(path: Path, mode: int, group: str) -> socket.socket:
    """Bind a Unix socket with ``mode`` and ``group``, never looser in between.

    A stale socket file (left by a crash) is removed only when nobody answers on it: a second
    ratelockd on the same socket is an error, not a takeover.
    """
    gid = _socket_group(group)
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, "exists and is not a socket", str(path))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise OSError(errno.EADDRINUSE, "another ratelockd answers there", str(path))
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # bound 0600: nobody else connects before the chmod below
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.setblocking(False)
    return sock


def open_tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, exc.strerror, _hostport(host, port)) from None
    sock.setblocking(False)
    return sock


# ---------------------------------------------------------------------------------------------
# The service


@dataclass(frozen=True)
class ServerStatistics:
    requests: int
    refused: int
    audit_heads_signed: int


class RatelockService:
    """ratelockd as a trio service: ``await nursery.start(service.run)`` gives the address."""

    def __init__(self, ctx: ServerContext, listen: Listen) -> None:
        self.ctx = ctx
        self.listen = listen
        self.app = create_app(ctx)
        self._stop = trio.Event()
        self._audit_signed = 0
        self._audit_scope = trio.CancelScope()
        self._refusal_scope = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        from hypercorn.config import Config, Sockets
        from hypercorn.trio.run import worker_serve
        from hypercorn.utils import wrap_app

        s = self.ctx.settings
        if self.listen.path is not None:
            sock = open_unix_socket(self.listen.path, int(s.socket_mode, 8), s.socket_group)
        else:
            sock = open_tcp_socket(self.listen.host, self.listen.port)
        sock.listen(LISTEN_BACKLOG)
        config = Config()
        config.accesslog = None
        config.errorlog = logging.getLogger("ratelock.server.hypercorn")
        config.keep_alive_timeout = KEEP_ALIVE_S
        # No read_timeout: hypercorn's would also fire while a request waits for its hash
        # (the reader idles meanwhile) and reset the connection of an honest, queued client.
        # Bodies are timed by _body; idle connections by keep_alive_timeout; slow headers are
        # bounded by who may connect at all (the socket's 0660 and group).
        config.read_timeout = None
        config.graceful_timeout = 2.0
        config.h11_max_incomplete_size = 16 * 1024  # headers: a token and a nonce, not more
        config.alpn_protocols = ["http/1.1"]
        config.include_server_header = False
        app = wrap_app(self.app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
        try:
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(
                    lambda task_status: worker_serve(
                        app, config, sockets=Sockets([], [sock], []),
                        shutdown_trigger=self._stop.wait, task_status=task_status,
                    )
                )
                if self.ctx.settings.audit_sign_interval_s > 0:
                    nursery.start_soon(self._sign_audit_heads)
                nursery.start_soon(self._audit_refusals)
                where = self.listen.text() if self.listen.path is not None else binds[0]
                log.info("ratelockd.listening at=%s", where)
                task_status.started(where)
                await self._stop.wait()
                # hypercorn drains the requests in flight within graceful_timeout and returns;
                # the audit timer just stops (a head it was signing commits or rolls back).
                self._audit_scope.cancel()
                self._refusal_scope.cancel()
            # what the last window counted is written before we go
            with trio.move_on_after(REFUSAL_FLUSH_TIMEOUT_S):
                await self._flush_refusals()
        finally:
            if self.listen.path is not None:
                with contextlib.suppress(OSError):
                    self.listen.path.unlink()

    async def _sign_audit_heads(self) -> None:
        """Sign the audit chain's head every interval (the first one at once), so a deleted tail
        of the log shows: the last signed head must still be on the chain."""
        with self._audit_scope:
            await self._audit_loop()

    async def _audit_loop(self) -> None:
        while True:
            try:
                signed = await trio.to_thread.run_sync(self.ctx.vault.sign_audit_head)
            except (RatelockError, OSError) as exc:
                self.ctx.metrics.audit_failed.inc()
                log.warning("ratelockd.audit_head_failed error=%s", exc)
            else:
                if signed is not None:
                    self._audit_signed += 1
                    self.ctx.metrics.audit_signed.inc()
            await trio.sleep(self.ctx.settings.audit_sign_interval_s)

    async def _audit_refusals(self) -> None:
        """Every ``audit_refusal_window_s``: the window's refusals as counted audit rows."""
        with self._refusal_scope:
            while True:
                await trio.sleep(self.ctx.settings.audit_refusal_window_s)
                await self._flush_refusals()

    async def _flush_refusals(self) -> None:
        tally, m = self.ctx.refusals, self.ctx.metrics
        overflowed, tally.overflowed = tally.overflowed, 0
        rows = tally.take()
        if not rows:
            return
        counted = sum(int(outcome.partition(":")[2]) for *_, outcome in rows)
        try:
            # not abandoned on cancel: the transaction commits or rolls back as a whole
            written = await trio.to_thread.run_sync(self.ctx.vault.record_refusals, rows)
        except (RatelockError, OSError) as exc:
            m.refusal_failed.inc(len(rows))
            log.warning("ratelockd.refusal_audit_failed rows=%d error=%s", len(rows), exc)
            return
        m.refusal_rows.inc(written)
        m.refusal_requests.inc(counted)
        m.refusal_overflow.inc(overflowed)

    def stop(self) -> None:
        self._stop.set()

    def statistics(self) -> ServerStatistics:
        reg = self.ctx.metrics.registry

        def total(name: str) -> int:
            return int(sum(s.value for mf in reg.collect() if mf.name == name
                           for s in mf.samples if s.name.endswith("_total")))

        return ServerStatistics(
            requests=total("ratelock_requests"), refused=total("ratelock_refused"),
            audit_heads_signed=self._audit_signed,
        )


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def public_key_path(listen: Listen, home: Path) -> Path:
    """Beside the socket (the directory its clients can reach), else in the home."""
    return (listen.path.parent if listen.path is not None else home) / PUBLIC_KEY_FILE


def write_public_key(listen: Listen, home: Path, identity: NodeIdentity) -> Path:
    path = public_key_path(listen, home)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(identity.public_key_b64 + "\n", encoding="ascii")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# ratelockd


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ratelockd", description="The ratelock daemon: budgets, verifiers, signed verdicts."
    )
    p.add_argument("--home", help="node home (default $OVERFLOWD_HOME or ~/.overflowd)")
    p.add_argument("--listen", help="unix:PATH or HOST:PORT (overrides ratelock.listen)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=logformat.FORMATS, default="plain")
    return p


async def _serve(service: RatelockService, home: Path | None = None) -> None:
    async with trio.open_nursery() as nursery:
        where = await nursery.start(service.run)
        confine("ratelockd", home)  # seccomp from here on (docs/deploy.md)
        # The handler first, then the ready line: a supervisor that stops ratelockd as soon as
        # it says it listens must get the orderly stop, not the default SIGTERM death.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            print(f"ratelockd listening {where}", flush=True)
            async for _ in signals:
                service.stop()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logformat.configure(getattr(logging, args.log_level.upper()), args.log_format, sys.stderr)
    home = resolve_home(args.home)
    try:
        settings = load_ratelock(home)
        text = args.listen or settings.listen
        try:
            listen = parse_listen(text, home)
        except ValueError as exc:
            flag = "--listen" if args.listen else "ratelock.listen"
            print(f"ratelockd: {flag}: {exc}", file=sys.stderr)
            return 2 if args.listen else 1
        identity = load_identity(home)
        lock = acquire(home, "ratelockd")  # one ratelockd per home; held until exit
        try:
            vault = Vault.open(home, settings, identity=identity)
        except BaseException:
            lock.release()
            raise
    except (ConfigError, IdentityError, OverflowdError) as exc:
        print(f"ratelockd: {exc}", file=sys.stderr)
        return 1
    try:
        write_public_key(listen, home, identity)
        ctx = ServerContext(vault=vault, identity=identity, settings=settings)
        trio.run(_serve, RatelockService(ctx, listen), home)
    except (OSError, OverflowdError, BaseExceptionGroup) as exc:
        leaf = _first_leaf(exc)
        if isinstance(leaf, OSError):
            origin = "--listen" if args.listen else key_origin(home, "ratelock", "listen")
            print(f"ratelockd: {origin} {leaf.filename or text}: cannot listen: {leaf.strerror}",
                  file=sys.stderr)
        elif isinstance(leaf, OverflowdError):
            print(f"ratelockd: {leaf}", file=sys.stderr)
        else:
            raise
        return 1
    finally:
        vault.close()
        lock.release()
    return 0


__all__ = [
    "PUBLIC_KEY_FILE", "Listen", "RatelockService", "ServerContext", "create_app", "main",
    "parse_listen",
]
