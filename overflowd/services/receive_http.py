"""The webhook receiver: an ASGI app on hypercorn + trio that verifies and appends reports.

``POST`` (any path): a Standard Webhooks delivery, checked by
:func:`overflowd.receiver.verify_delivery`; a new report is appended once as one JSON line to
the sink (flushed and fsynced before we answer), then ``204``. A delivery whose ``webhook-id``
was already written answers ``200`` without writing: the sender is retrying after a lost answer.
Rejections answer 4xx/5xx with a short reason and are counted by reason. ``GET /metrics``
renders the counters in the Prometheus text format; ``GET /healthz`` says ``ok``.

Every byte comes from a stranger, so every resource has a bound (defaults and reasons in
:class:`ReceiverLimits`, documented in docs/webhooks.md), in the order a request meets them:

* **connections**, at accept: at most ``max_connections`` open, ``max_connections_per_client``
  per client (an IPv4 address or an IPv6 /64, :func:`~overflowd.receiver.client_key`); more are
  closed at once, unanswered, and counted. hypercorn bounds none of this (it accepts every
  connection), so we run its per-connection :class:`TCPServer` from our own accept loop.
* **headers**: hypercorn's keep-alive timer runs from the connection's start (and after each
  answer) until a request's headers are complete, so ``header_timeout_s`` is a whole-headers
  deadline; h11 refuses headers over 16 KiB (``h11_max_incomplete_size``).
* **bodies**: ``max_reading`` requests may be reading their body at once,
  ``max_reading_per_client`` per client (503 / 429 beyond); each body must arrive whole within
  ``body_timeout_s`` (408 and the connection closed; hypercorn's ``read_timeout`` only bounds
  the wait for one more byte) and be at most ``max_body_bytes`` (413).
* **work**: only a request whose body is read counts as in flight; at most ``max_in_flight``
  are verified and written at once, more get 503 with ``Retry-After``.
* **bytes**: without a trust list, each signing key has a report rate and a byte budget and
  keys never seen before are admitted at a bounded rate (:class:`~overflowd.receiver.KeyBudget`,
  429 with ``Retry-After``); the output file never grows past ``max_out_bytes`` (507).
* **errors**: an unexpected exception while handling one request answers 500, is counted by
  type and logged at most once per ``ERROR_LOG_INTERVAL_S``; the server keeps serving.

It never logs report bodies.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

from overflowd import report as rpt
from overflowd.errors import DecodeError, ReportDecodeError, SignatureError
from overflowd.receiver import (
    DEFAULT_SEEN_IDS,
    MAX_BODY_BYTES,
    KeyBudget,
    KeyCaps,
    SeenIds,
    UntrustedKeyError,
    client_key,
    encode_body,
    verify_delivery,
)
from overflowd.wire import webhook as wh

log = logging.getLogger(__name__)

SECONDS = 1.0
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Every rejection reason, in the order /metrics lists them.
REASONS = (
    "malformed",
    "report_malformed",
    "stale",
    "untrusted",
    "bad_signature",
    "too_large",
    "body_timeout",
    "reading_full",
    "client_reading_full",
    "overloaded",
    "key_rate",
    "key_bytes",
    "new_key_rate",
    "all_keys_bytes",
    "out_full",
    "write_failed",
    "internal_error",
    "method",
)
#: Why a connection was closed at accept, unanswered.
CONNECTION_REFUSALS = ("total", "per_client")
#: One warning per this many seconds for unexpected exceptions: a bug that every request
#: triggers must not turn into one traceback per request.
ERROR_LOG_INTERVAL_S = 10 * SECONDS
#: Distinct exception type names counted; beyond, "other" (the label set stays bounded).
MAX_ERROR_TYPES = 32
#: 1 GiB: the output file's cap unless told otherwise; beyond it deliveries get 507.
DEFAULT_MAX_OUT_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class ReceiverLimits:
    #: Largest body read; a report's JSON is under 3 KiB.
    max_body_bytes: int = MAX_BODY_BYTES
    #: Requests being verified and written at once (counted once their body is read); more are
    #: answered 503 at once instead of queueing behind the fsyncs.
    max_in_flight: int = 64
    #: webhook-timestamp window, both directions (Standard Webhooks' recommendation).
    tolerance_s: float = wh.DEFAULT_TOLERANCE_S
    #: Delivered ids remembered for de-duplication.
    seen_ids: int = DEFAULT_SEEN_IDS
    #: A whole body must arrive within this, from the end of its headers; a 3 KiB report
    #: takes milliseconds, so 10 s only ever cuts off a slow reader holding a slot (408).
    body_timeout_s: float = 10 * SECONDS
    #: hypercorn's keep-alive timeout: an idle keep-alive connection is closed after it, and it
    #: is also the deadline for a request's whole headers from the connection's start.
    header_timeout_s: float = 5 * SECONDS
    #: hypercorn's read timeout: the longest wait for any next bytes (sub-deadline of the two).
    read_timeout_s: float = 10 * SECONDS
    #: Requests reading their body at once, in all (each holds up to max_body_bytes) ...
    max_reading: int = 256
    #: ... and per client: a sender runs 8 deliveries at once (webhook max_concurrency).
    max_reading_per_client: int = 16
    #: Open connections: below the default file descriptor limit (1024) with room for the rest.
    max_connections: int = 512
    #: Open connections per client (IPv4 address or IPv6 /64): a sender's pool is 8.
    max_connections_per_client: int = 32
    #: Per-key caps, applied when there is no trust list (anybody may sign).
    keys: KeyCaps = field(default_factory=KeyCaps)
    #: The output file stops growing here (507); 0 for no cap. Bytes already in it count.
    max_out_bytes: int = DEFAULT_MAX_OUT_BYTES


@dataclass(frozen=True, slots=True)
class ReceiverStatistics:
    requests: int
    accepted: int
    duplicates: int
    rejected: dict[str, int]
    in_flight: int
    seen_ids: int
    reading: int = 0
    connections: int = 0
    connections_refused: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    keys_tracked: int = 0
    out_bytes: int = 0


class _PerClient:
    """Counts per client key, entries dropped at zero: its size is bounded by what it counts."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> bool:
        n = self._counts.get(key, 0)
        if n >= limit:
            return False
        self._counts[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self._counts[key] - 1
        if n:
            self._counts[key] = n
        else:
            del self._counts[key]


class JsonLinesSink:
    """Append-only JSON lines, each flushed and fsynced before the call returns.

    ``"-"`` is standard output (fsync is skipped where the kernel refuses it: pipes, ttys).
    Blocking; call through ``trio.to_thread``. Thread-safe.
    """

    def __init__(self, out: str) -> None:
        self.path = None if out == "-" else Path(out)
        self._lock = threading.Lock()
        self._fh: IO[bytes]
        #: Bytes in the file (those already there count: the cap is on the disk's use).
        self.size = 0
        if self.path is None:
            self._fh = sys.stdout.buffer
        else:
            self._fh = open(self.path, "ab")  # noqa: SIM115 - held for the sink's lifetime
            # A crash in the middle of a line left it unterminated: start ours on a new one.
            if self._fh.tell() > 0:
                with open(self.path, "rb") as check:
                    check.seek(-1, os.SEEK_END)
                    if check.read(1) != b"\n":
                        self._fh.write(b"\n")
            self.size = self._fh.tell()

    def existing_ids(self, limit: int) -> list[str]:
        """Ids of the last ``limit`` reports in the file, to de-duplicate across restarts."""
        if self.path is None or not self.path.exists():
            return []
        ids: collections.deque[str] = collections.deque(maxlen=limit)
        with open(self.path, "rb") as fh:
            for line in fh:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                    ids.append(doc["id"])
        return list(ids)

    def write(self, line: bytes) -> None:
        with self._lock:
            self._fh.write(line + b"\n")
            self.size += len(line) + 1
            self._fh.flush()
            try:
                os.fsync(self._fh.fileno())
            except OSError:
                if self.path is not None:
                    raise

    def close(self) -> None:
        if self.path is not None:
            self._fh.close()


class WebhookReceiver:
    """The receiver as an ASGI application, and ``run()`` to serve it with hypercorn."""

    def __init__(
        self,
        sink: JsonLinesSink,
        *,
        trusted_keys: Collection[bytes] | None = None,
        limits: ReceiverLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sink = sink
        self._trusted = None if trusted_keys is None else frozenset(trusted_keys)
        self._limits = limits or ReceiverLimits()
        self._clock = clock
        self._seen = SeenIds(self._limits.seen_ids, sink.existing_ids(self._limits.seen_ids))
        self._budget = KeyBudget(self._limits.keys)
        self._write_lock = trio.Lock()
        self._requests = 0
        self._accepted = 0
        self._duplicates = 0
        self._rejected = dict.fromkeys(REASONS, 0)
        self._in_flight = 0
        self._reading = 0
        self._reading_by_client = _PerClient()
        self._connections = 0
        self._connections_by_client = _PerClient()
        self._refused = dict.fromkeys(CONNECTION_REFUSALS, 0)
        self._errors: dict[str, int] = {}
        self._last_error_log: float | None = None
        self._errors_unlogged = 0

    def statistics(self) -> ReceiverStatistics:
        return ReceiverStatistics(
            requests=self._requests,
            accepted=self._accepted,
            duplicates=self._duplicates,
            rejected=dict(self._rejected),
            in_flight=self._in_flight,
            seen_ids=len(self._seen),
            reading=self._reading,
            connections=self._connections,
            connections_refused=dict(self._refused),
            errors=dict(self._errors),
            keys_tracked=self._budget.statistics().keys,
            out_bytes=self._sink.size,
        )

    def metrics_text(self) -> str:
        """The counters in the Prometheus text exposition format (version 0.0.4)."""
        s = self.statistics()
        out = []

        def metric(name: str, kind: str, doc: str, rows: Iterable[tuple[str, int]]) -> None:
            out.append(f"# HELP {name} {doc}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value}" for labels, value in rows)

        p = "overflowd_receiver_"
        metric(p + "requests_total", "counter", "HTTP requests received", [("", s.requests)])
        metric(p + "accepted_total", "counter", "Reports verified and written", [("", s.accepted)])
        metric(
            p + "duplicates_total",
            "counter",
            "Verified deliveries of an id already written",
            [("", s.duplicates)],
        )
        metric(
            p + "rejected_total",
            "counter",
            "Deliveries refused, by reason",
            [(f'{{reason="{r}"}}', n) for r, n in s.rejected.items()],
        )
        metric(
            p + "connections_refused_total",
            "counter",
            "Connections closed at accept, by limit",
            [(f'{{reason="{r}"}}', n) for r, n in s.connections_refused.items()],
        )
        metric(
            p + "errors_total",
            "counter",
            "Unexpected exceptions while handling a request, by type",
            [(f'{{type="{t}"}}', n) for t, n in sorted(s.errors.items())],
        )
        metric(p + "in_flight", "gauge", "Requests being verified or written", [("", s.in_flight)])
        metric(p + "reading", "gauge", "Requests reading their body", [("", s.reading)])
        metric(p + "connections", "gauge", "Open connections", [("", s.connections)])
        metric(p + "seen_ids", "gauge", "Ids held for de-duplication", [("", s.seen_ids)])
        metric(p + "keys_tracked", "gauge", "Signing keys with a budget", [("", s.keys_tracked)])
        metric(p + "out_bytes", "gauge", "Bytes in the output file", [("", s.out_bytes)])
        return "\n".join(out) + "\n"

    # -- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self._requests += 1
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        # The per-request boundary: one request's bug is its own 500, never the server's.
        try:
            await self._http(scope, receive, tracked_send)
        except Exception as exc:
            self._rejected["internal_error"] += 1
            self._count_error(exc)
            if not started:
                await _answer(send, 500, "internal error", [(b"connection", b"close")])

    def _count_error(self, exc: Exception) -> None:
        name = type(exc).__name__
        if name not in self._errors and len(self._errors) >= MAX_ERROR_TYPES:
            name = "other"
        self._errors[name] = self._errors.get(name, 0) + 1
        now = trio.current_time()
        if self._last_error_log is not None and now - self._last_error_log < ERROR_LOG_INTERVAL_S:
            self._errors_unlogged += 1
            return
        log.warning(
            "receive.internal_error type=%s suppressed_since_last=%d",
            name,
            self._errors_unlogged,
            exc_info=exc,
        )
        self._last_error_log = now
        self._errors_unlogged = 0

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/metrics":
            await _answer(
                send,
                200,
                self.metrics_text(),
                content_type=b"text/plain; version=0.0.4; charset=utf-8",
            )
            return
        if method == "GET" and path == "/healthz":
            await _answer(send, 200, "ok")
            return
        if method != "POST":
            self._rejected["method"] += 1
            await _answer(send, 405, "POST a webhook delivery", [(b"allow", b"POST")])
            return
        headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        client = scope.get("client")
        who = client_key(str(client[0])) if client else "-"
        lim = self._limits
        # Readers are bounded apart from the in-flight slots: a stranger dripping bodies holds
        # reading slots (its own client's first), never the ones verification and writing use.
        if self._reading >= lim.max_reading:
            self._rejected["reading_full"] += 1
            await _answer(send, 503, "overloaded", [(b"retry-after", b"1")])
            return
        if not self._reading_by_client.acquire(who, lim.max_reading_per_client):
            self._rejected["client_reading_full"] += 1
            await _answer(send, 429, "too many requests from you", [(b"retry-after", b"1")])
            return
        self._reading += 1
        try:
            with trio.move_on_after(lim.body_timeout_s) as deadline:
                body = await self._read_body(headers, receive)
        finally:
            self._reading -= 1
            self._reading_by_client.release(who)
        if deadline.cancelled_caught:
            self._rejected["body_timeout"] += 1
            await _answer(
                send,
                408,
                f"body not received within {lim.body_timeout_s:g} s",
                [(b"connection", b"close")],
            )
            return
        if body is None:
            self._rejected["too_large"] += 1
            await _answer(send, 413, f"body larger than {lim.max_body_bytes} bytes")
            return
        if self._in_flight >= lim.max_in_flight:
            self._rejected["overloaded"] += 1
            await _answer(send, 503, "overloaded", [(b"retry-after", b"1")])
            return
        self._in_flight += 1
        try:
            await self._verify_and_accept(headers, body, send)
        finally:
            self._in_flight -= 1

    async def _verify_and_accept(
        self, headers: list[tuple[bytes, bytes]], body: bytes, send: Send
    ) -> None:
        try:
            report = verify_delivery(
                headers,
                body,
                now=self._clock(),
                trusted_keys=self._trusted,
                tolerance_s=self._limits.tolerance_s,
            )
        except (DecodeError, SignatureError) as exc:
            reason, status = _reason(exc)
            self._rejected[reason] += 1
            log.debug("webhook rejected: %s", reason)
            await _answer(send, status, f"{reason}: {exc}"[:200])
            return
        await self._accept(report, send)

    async def _read_body(
        self, headers: list[tuple[bytes, bytes]], receive: Receive
    ) -> bytes | None:
        limit = self._limits.max_body_bytes
        for name, value in headers:
            if name.lower() == b"content-length":
                try:
                    if int(value) > limit:
                        return None
                except ValueError:
                    pass
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _accept(self, report: rpt.SignedReport, send: Send) -> None:
        # One writer at a time: two concurrent deliveries of one id must write it once, and
        # the caps below are checked and charged together with the write.
        async with self._write_lock:
            if report.report_id in self._seen:
                self._duplicates += 1
                await _answer(send, 200, "duplicate")
                return
            line = encode_body(report)
            cap = self._limits.max_out_bytes
            if cap and self._sink.size + len(line) + 1 > cap:
                self._rejected["out_full"] += 1
                await _answer(send, 507, "the receiver's output is full")
                return
            if self._trusted is None:
                refusal = self._budget.admit(
                    report.observer_key, len(line) + 1, trio.current_time()
                )
                if refusal is not None:
                    self._rejected[refusal.reason] += 1
                    retry = str(max(1, math.ceil(refusal.retry_after_s))).encode("ascii")
                    await _answer(
                        send, 429, f"{refusal.reason}: slow down", [(b"retry-after", retry)]
                    )
                    return
            try:
                await trio.to_thread.run_sync(self._sink.write, line)
            except OSError as exc:
                self._rejected["write_failed"] += 1
                log.warning("cannot write a verified report: %s", exc.strerror or exc)
                await _answer(send, 500, "cannot store the report")
                return
            self._seen.add(report.report_id)
            self._accepted += 1
        await _answer(send, 204, "")

    # -- serving ----------------------------------------------------------------------------

    async def run(
        self,
        listen: tuple[str, int],
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on ``listen`` (port 0 picks one); ``started`` with the bound (host, port).

        hypercorn's ``worker_serve`` accepts every connection it is offered; we run its
        per-connection protocol (``TCPServer``) from our own accept loop so that connections
        are counted and capped, in all and per client, before any byte is parsed.
        """
        from hypercorn.config import Config
        from hypercorn.trio.tcp_server import TCPServer
        from hypercorn.trio.worker_context import WorkerContext
        from hypercorn.typing import ConnectionState
        from hypercorn.utils import repr_socket_addr, wrap_app

        lim = self._limits
        host, port = listen
        config = Config()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("overflowd.receive.http")
        config.read_timeout = max(1, math.ceil(lim.read_timeout_s))  # hypercorn wants an int
        config.keep_alive_timeout = lim.header_timeout_s
        # HTTP/2 (h2c) multiplexes requests on one connection: no more streams than a client
        # may have reading at once.
        config.h2_max_concurrent_streams = lim.max_reading_per_client
        config.graceful_timeout = 1 * SECONDS
        config.include_server_header = False

        # Bound here, outside any nursery, so that a busy port is a plain OSError for the
        # caller rather than one buried in an exception group.
        sockets = config.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
        app = wrap_app(self, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
        context = WorkerContext(None)
        listeners = [
            trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            for sock in sockets.insecure_sockets
        ]
        binds = [
            f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
            for sock in sockets.insecure_sockets
        ]

        async def connection(stream: trio.SocketStream) -> None:
            try:
                peer = stream.socket.getpeername()
            except OSError:
                return  # gone already
            who = client_key(str(peer[0])) if isinstance(peer, tuple) else "-"
            if self._connections >= lim.max_connections:
                self._refused["total"] += 1
                return  # serve_listeners closes it
            if not self._connections_by_client.acquire(who, lim.max_connections_per_client):
                self._refused["per_client"] += 1
                return
            self._connections += 1
            try:
                await TCPServer(app, config, context, ConnectionState({}), stream)  # type: ignore[arg-type]
            except Exception as exc:  # the per-connection boundary: hypercorn's bug, one client
                self._count_error(exc)
            finally:
                self._connections -= 1
                self._connections_by_client.release(who)

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, connection, listeners)
            task_status.started(_bound(binds[0]))


def _bound(bind: str) -> tuple[str, int]:
    # hypercorn reports "http://127.0.0.1:8000" or "http://[::1]:8000"
    hostport = bind.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def _reason(exc: Exception) -> tuple[str, int]:
    if isinstance(exc, wh.StaleWebhookError):
        return "stale", 401
    if isinstance(exc, UntrustedKeyError):
        return "untrusted", 401
    if isinstance(exc, SignatureError):
        return "bad_signature", 401
    if isinstance(exc, ReportDecodeError):
        return "report_malformed", 400
    return "malformed", 400


async def _answer(
    send: Send,
    status: int,
    text: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
) -> None:
    body = b"" if status == 204 else (text + "\n").encode("utf-8")
    headers = [(b"content-length", str(len(body)).encode("ascii"))]
    if body:
        headers.append((b"content-type", content_type))
    headers.extend(extra or [])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
