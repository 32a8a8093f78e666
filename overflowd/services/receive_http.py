"""The webhook receiver: an ASGI app on hypercorn + trio that verifies and appends reports.

``POST`` (any path): a Standard Webhooks delivery, checked by
:func:`overflowd.receiver.verify_delivery`; a new report is appended once as one JSON line to
the sink (flushed and fsynced before we answer), then ``204``. A delivery whose ``webhook-id``
was already written answers ``200`` without writing: the sender is retrying after a lost answer.
Rejections answer 4xx with a short reason and are counted by reason. ``GET /metrics`` renders
the counters in the Prometheus text format; ``GET /healthz`` says ``ok``.

Limits, each with its reason (defaults in :class:`ReceiverLimits`): bodies over 64 KiB are
refused with 413 before reading them (a report's JSON is under 3 KiB); at most 64 requests are
handled at once, more get 503 with ``Retry-After`` so a flood cannot queue without bound;
hypercorn closes connections that send nothing for 10 s (slow clients) and idle keep-alives
after 5 s; the de-duplication memory is bounded (:class:`~overflowd.receiver.SeenIds`).

It never logs report bodies.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import trio

from overflowd import report as rpt
from overflowd.errors import DecodeError, ReportDecodeError, SignatureError
from overflowd.receiver import (
    DEFAULT_SEEN_IDS,
    MAX_BODY_BYTES,
    SeenIds,
    UntrustedKeyError,
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
    "overloaded",
    "write_failed",
    "method",
)


@dataclass(frozen=True)
class ReceiverLimits:
    #: Largest body read; a report's JSON is under 3 KiB.
    max_body_bytes: int = MAX_BODY_BYTES
    #: Requests handled at once; more are answered 503 at once instead of queueing.
    max_in_flight: int = 64
    #: webhook-timestamp window, both directions (Standard Webhooks' recommendation).
    tolerance_s: float = wh.DEFAULT_TOLERANCE_S
    #: Delivered ids remembered for de-duplication.
    seen_ids: int = DEFAULT_SEEN_IDS
    #: A connection that sends nothing for this long is closed (slowloris).
    read_timeout_s: float = 10 * SECONDS
    keep_alive_timeout_s: float = 5 * SECONDS


@dataclass(frozen=True, slots=True)
class ReceiverStatistics:
    requests: int
    accepted: int
    duplicates: int
    rejected: dict[str, int]
    in_flight: int
    seen_ids: int


class JsonLinesSink:
    """Append-only JSON lines, each flushed and fsynced before the call returns.

    ``"-"`` is standard output (fsync is skipped where the kernel refuses it: pipes, ttys).
    Blocking; call through ``trio.to_thread``. Thread-safe.
    """

    def __init__(self, out: str) -> None:
        self.path = None if out == "-" else Path(out)
        self._lock = threading.Lock()
        self._fh: IO[bytes]
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
        self._write_lock = trio.Lock()
        self._requests = 0
        self._accepted = 0
        self._duplicates = 0
        self._rejected = dict.fromkeys(REASONS, 0)
        self._in_flight = 0

    def statistics(self) -> ReceiverStatistics:
        return ReceiverStatistics(
            requests=self._requests,
            accepted=self._accepted,
            duplicates=self._duplicates,
            rejected=dict(self._rejected),
            in_flight=self._in_flight,
            seen_ids=len(self._seen),
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
        metric(p + "in_flight", "gauge", "Requests being handled", [("", s.in_flight)])
        metric(p + "seen_ids", "gauge", "Ids held for de-duplication", [("", s.seen_ids)])
        return "\n".join(out) + "\n"

    # -- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self._requests += 1
        if self._in_flight >= self._limits.max_in_flight:
            self._rejected["overloaded"] += 1
            await _answer(send, 503, "overloaded", [(b"retry-after", b"1")])
            return
        self._in_flight += 1
        try:
            await self._http(scope, receive, send)
        finally:
            self._in_flight -= 1

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
        body = await self._read_body(headers, receive)
        if body is None:
            self._rejected["too_large"] += 1
            await _answer(send, 413, f"body larger than {self._limits.max_body_bytes} bytes")
            return
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
        # One writer at a time: two concurrent deliveries of one id must write it once.
        async with self._write_lock:
            if report.report_id in self._seen:
                self._duplicates += 1
                await _answer(send, 200, "duplicate")
                return
            try:
                await trio.to_thread.run_sync(self._sink.write, encode_body(report))
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
        """Serve on ``listen`` (port 0 picks one); ``started`` with the bound (host, port)."""
        from hypercorn.config import Config
        from hypercorn.trio.run import worker_serve
        from hypercorn.utils import wrap_app

        host, port = listen
        config = Config()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("overflowd.receive.http")
        config.read_timeout = int(self._limits.read_timeout_s)
        config.keep_alive_timeout = self._limits.keep_alive_timeout_s
        config.graceful_timeout = 1 * SECONDS
        config.include_server_header = False

        # Bound here, outside any nursery, so that a busy port is a plain OSError for the
        # caller rather than one buried in an exception group.
        sockets = config.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
        app = wrap_app(self, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]

        async def serving(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await worker_serve(app, config, sockets=sockets, task_status=task_status)

        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(serving)
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
