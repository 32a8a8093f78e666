"""The webhook receiver: an ASGI app on hypercorn + trio that verifies and appends reports.

``POST`` (any path): a Standard Webhooks delivery of one report or of several
(``{"reports": [...]}``), checked by :func:`overflowd.receiver.verify_batch`; each new report is
appended once as one JSON line to the sink (flushed and fsynced before we answer). One report:
``204``, or ``200`` without writing when its id was already written (the sender is retrying
after a lost answer). A batch: ``200`` with ``{"accepted": N, "duplicates": M}``, duplicates
counted per report; when a cap stops part of a batch, what fits is written and the cap's
answer (429 with Retry-After, 507) carries the same counts.
Rejections answer 4xx/5xx with a short reason and are counted by reason. ``GET /metrics``
renders the counters in the Prometheus text format; ``GET /healthz`` says ``ok``.

Every byte comes from a stranger, so every resource has a bound (defaults and reasons in
:class:`ReceiverLimits`, documented in docs/webhooks.md), in the order a request meets them:

* **connections**, at accept: at most ``max_connections`` open, ``max_connections_per_client``
  per client (an IPv4 address or an IPv6 /64, :func:`~overflowd.receiver.client_key`) and
  ``max_connections_per_network`` per IPv6 /48 (:func:`network_key`); more are closed at once,
  unanswered, and counted. hypercorn bounds none of this (it accepts every connection), so we
  run its per-connection :class:`TCPServer` from our own accept loop.
* **HTTP/1.1 only**: our sender speaks nothing else, and h2 lets one connection buffer ~1 MiB
  of header fragments (64 CONTINUATION frames of 16 KiB) before the headers end. A connection
  that opens with the HTTP/2 preface is closed unanswered and counted (``http2``);
  ``Upgrade: h2c`` is ignored (the request is answered over HTTP/1.1, RFC 9110 §7.8); no TLS,
  so no ALPN (and ``h2`` is not among its protocols if that changes).
* **headers**: hypercorn's keep-alive timer runs from the connection's start (and after each
  answer) until a request's headers are complete, so ``header_timeout_s`` is a whole-headers
  deadline; h11 refuses headers over 16 KiB (``h11_max_incomplete_size``), the only header
  buffer a connection has.
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
import ipaddress
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

from overflowd import report as rpt
from overflowd.errors import DecodeError, ReportDecodeError, SignatureError
from overflowd.receiver import (
    DEFAULT_SEEN_IDS,
    MAX_BATCH_REPORTS,
    MAX_BODY_BYTES,
    KeyBudget,
    KeyCaps,
    SeenIds,
    UntrustedKeyError,
    client_key,
    encode_body,
    verify_batch,
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
#: Why a connection was closed at accept (or at its first bytes: http2), unanswered.
CONNECTION_REFUSALS = ("total", "per_client", "per_network", "http2")
#: RFC 9113 §3.4: what an HTTP/2 client with prior knowledge sends first. We refuse it: h2
#: buffers up to 64 CONTINUATION frames of 16 KiB a connection (h2's CONTINUATION_BACKLOG)
#: before a header block ends, where h11 holds 16 KiB, and our sender never speaks HTTP/2.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: The IPv6 prefix length of the coarse per-network connection cap: a site is usually given
#: a /48 (RFC 6177 allows /56 too), so one attacker's /56 or /48 is 256 or 65 536 /64 clients.
NETWORK_PREFIX_V6 = 48
#: One warning per this many seconds for unexpected exceptions: a bug that every request
#: triggers must not turn into one traceback per request.
ERROR_LOG_INTERVAL_S = 10 * SECONDS
#: Distinct exception type names counted; beyond, "other" (the label set stays bounded).
MAX_ERROR_TYPES = 32
#: 1 GiB: the output file's cap unless told otherwise; beyond it deliveries get 507.
DEFAULT_MAX_OUT_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class ReceiverLimits:
    #: Largest body read; a report's JSON is under 3 KiB, a batch's (several) up to this.
    max_body_bytes: int = MAX_BODY_BYTES
    #: Reports one batch may carry (each costs an Ed25519 check), else 400.
    max_batch_reports: int = MAX_BATCH_REPORTS
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
    #: Open connections per IPv6 /48 (NETWORK_PREFIX_V6): a /56 holds 256 /64 "clients", so
    #: without it one site could take all of max_connections; a quarter leaves the rest to
    #: others and still 16 senders' pools to one site. IPv4 has no coarser cap: a /24 is many
    #: unrelated customers behind one ISP as often as one attacker, and addresses cost money.
    max_connections_per_network: int = 128
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
    #: HTTP/1.1 requests asking ``Upgrade: h2c``, answered over HTTP/1.1 all the same.
    h2c_upgrades_ignored: int = 0
    #: verified deliveries in the batch form ({"reports": [...]})
    batches: int = 0


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
        self.write_many([line])

    def write_many(self, lines: list[bytes]) -> None:
        """Append ``lines``, each as one line, with one flush and fsync for all of them."""
        with self._lock:
            data = b"".join(line + b"\n" for line in lines)
            self._fh.write(data)
            self.size += len(data)
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
        self._connections_by_network = _PerClient()
        self._h2c_upgrades_ignored = 0
        self._batches = 0
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
            h2c_upgrades_ignored=self._h2c_upgrades_ignored,
            batches=self._batches,
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
            "Verified reports of an id already written",
            [("", s.duplicates)],
        )
        metric(
            p + "batches_total",
            "counter",
            "Verified deliveries carrying several reports",
            [("", s.batches)],
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
            p + "h2c_upgrades_ignored_total",
            "counter",
            "Requests asking Upgrade: h2c, answered over HTTP/1.1",
            [("", s.h2c_upgrades_ignored)],
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
            reports = verify_batch(
                headers,
                body,
                now=self._clock(),
                trusted_keys=self._trusted,
                tolerance_s=self._limits.tolerance_s,
                max_reports=self._limits.max_batch_reports,
                max_body_bytes=self._limits.max_body_bytes,
            )
        except (DecodeError, SignatureError) as exc:
            reason, status = _reason(exc)
            self._rejected[reason] += 1
            log.debug("webhook rejected: %s", reason)
            await _answer(send, status, f"{reason}: {exc}"[:200])
            return
        if _is_batch(body):
            self._batches += 1
            await self._accept_batch(reports, send)
        else:
            await self._accept(reports[0], send)

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

    def _admit(self, reports: list[rpt.SignedReport]) -> _Admitted:
        """Which of ``reports`` (in order) to write now: duplicates are skipped (counted), the
        rest admitted while the output cap and, without a trust list, the key's caps allow;
        the first one refused stops it (the caps count every report and byte of a batch).
        Under the write lock."""
        out = _Admitted()
        cap = self._limits.max_out_bytes
        size = self._sink.size
        fresh: set[str] = set()
        for i, report in enumerate(reports):
            if report.report_id in self._seen or report.report_id in fresh:
                out.duplicates += 1
                continue
            line = encode_body(report)
            if cap and size + len(line) + 1 > cap:
                out.refusal = ("out_full", 507, 0.0)
                out.left = len(reports) - i
                return out
            if self._trusted is None:
                refusal = self._budget.admit(
                    report.observer_key, len(line) + 1, trio.current_time()
                )
                if refusal is not None:
                    out.left = len(reports) - i
                    wait = refusal.retry_after_s
                    if refusal.reason == "key_rate":
                        # Room for the rest (up to a burst) at once, not for one at a time:
                        # the sender retries the whole POST, and each try spends an attempt.
                        caps = self._limits.keys
                        wait += (min(out.left, caps.burst) - 1) / caps.rate_per_s
                    out.refusal = (refusal.reason, 429, wait)
                    return out
            size += len(line) + 1
            fresh.add(report.report_id)
            out.lines.append(line)
            out.ids.append(report.report_id)
        return out

    async def _write_admitted(self, admitted: _Admitted) -> bool:
        """Write the admitted lines with one fsync; False (counted, logged) if it failed."""
        if not admitted.lines:
            return True
        try:
            await trio.to_thread.run_sync(self._sink.write_many, admitted.lines)
        except OSError as exc:
            self._rejected["write_failed"] += 1
            log.warning("cannot write a verified report: %s", exc.strerror or exc)
            return False
        for report_id in admitted.ids:
            self._seen.add(report_id)
        self._accepted += len(admitted.ids)
        return True

    async def _accept(self, report: rpt.SignedReport, send: Send) -> None:
        # One writer at a time: two concurrent deliveries of one id must write it once, and
        # the caps below are checked and charged together with the write.
        async with self._write_lock:
            admitted = self._admit([report])
            if admitted.duplicates:
                self._duplicates += 1
                await _answer(send, 200, "duplicate")
                return
            if admitted.refusal is not None:
                reason, status, wait = admitted.refusal
                self._rejected[reason] += 1
                if status == 507:
                    await _answer(send, 507, "the receiver's output is full")
                else:
                    await _answer(
                        send, 429, f"{reason}: slow down", [(b"retry-after", _seconds(wait))]
                    )
                return
            if not await self._write_admitted(admitted):
                await _answer(send, 500, "cannot store the report")
                return
        await _answer(send, 204, "")

    async def _accept_batch(self, reports: list[rpt.SignedReport], send: Send) -> None:
        """Write each new report of a batch once; answer 200 ``{"accepted":N,"duplicates":M}``.

        When a cap stops part of it, what fits is written and the answer is the cap's (429
        with Retry-After, or 507) with the same counts: the sender sends the POST again, and
        what was written is then a duplicate, which costs nothing.
        """
        async with self._write_lock:
            admitted = self._admit(reports)
            self._duplicates += admitted.duplicates
            if not await self._write_admitted(admitted):
                await _answer(send, 500, "cannot store the reports")
                return
        counts = {"accepted": len(admitted.ids), "duplicates": admitted.duplicates}
        if admitted.refusal is None:
            await _answer_json(send, 200, counts)
            return
        reason, status, wait = admitted.refusal
        self._rejected[reason] += admitted.left
        extra = [] if status == 507 else [(b"retry-after", _seconds(wait))]
        await _answer_json(send, status, {**counts, "refused": reason}, extra)

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
        are counted and capped, in all, per client and per network, before any byte is parsed,
        and so that each speaks HTTP/1.1 only (:func:`_http11_server`).
        """
        from hypercorn.config import Config
        from hypercorn.trio.worker_context import WorkerContext
        from hypercorn.utils import repr_socket_addr, wrap_app

        lim = self._limits
        host, port = listen
        config = Config()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("overflowd.receive.http")
        config.read_timeout = max(1, math.ceil(lim.read_timeout_s))  # hypercorn wants an int
        config.keep_alive_timeout = lim.header_timeout_s
        # No TLS is served (only insecure sockets below); should it be, never offer h2 by ALPN.
        config.alpn_protocols = ["http/1.1"]
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

        def refuse_http2() -> None:
            self._refused["http2"] += 1

        def ignore_h2c() -> None:
            self._h2c_upgrades_ignored += 1

        async def connection(stream: trio.SocketStream) -> None:
            try:
                peer = stream.socket.getpeername()
            except OSError:
                return  # gone already
            addr = str(peer[0]) if isinstance(peer, tuple) else "-"
            who, net = client_key(addr), network_key(addr)
            if self._connections >= lim.max_connections:
                self._refused["total"] += 1
                return  # serve_listeners closes it
            if not self._connections_by_client.acquire(who, lim.max_connections_per_client):
                self._refused["per_client"] += 1
                return
            if net is not None and not self._connections_by_network.acquire(
                net, lim.max_connections_per_network
            ):
                self._connections_by_client.release(who)
                self._refused["per_network"] += 1
                return
            self._connections += 1
            try:
                await _http11_server(
                    app, config, context, _RefuseHttp2(stream, refuse_http2), ignore_h2c
                )
            except Exception as exc:  # the per-connection boundary: hypercorn's bug, one client
                self._count_error(exc)
            finally:
                self._connections -= 1
                self._connections_by_client.release(who)
                if net is not None:
                    self._connections_by_network.release(net)

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, connection, listeners)
            task_status.started(_bound(binds[0]))


def network_key(host: str) -> str | None:
    """The IPv6 /48 that ``host`` is in, for the coarse connection cap; None for IPv4 (and
    IPv4-mapped IPv6, and anything that is not an address): those have no coarser cap."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if not isinstance(ip, ipaddress.IPv6Address) or ip.ipv4_mapped is not None:
        return None
    shift = 128 - NETWORK_PREFIX_V6
    return str(ipaddress.IPv6Network((int(ip) >> shift << shift, NETWORK_PREFIX_V6)))


class _RefuseHttp2(trio.abc.HalfCloseableStream):
    """A connection's stream that ends it, unanswered, if it opens with the HTTP/2 preface.

    The check reads (rather than peeks: a peek cannot wait for more bytes without polling)
    until the bytes so far stop being a prefix of :data:`H2_PREFACE`, which for HTTP/1.1 is the
    first byte or two of the first read, and hands them on; at most 23 bytes are held. It runs
    inside hypercorn's first ``receive_some``, so hypercorn's timers bound it: the headers
    deadline (keep-alive timer, from the connection's start) and the read timeout.
    """

    def __init__(self, stream: trio.SocketStream, on_refused: Callable[[], None]) -> None:
        self.socket = stream.socket
        self._stream = stream
        self._on_refused = on_refused
        self._checked = False
        self._held = b""
        #: It opened with the preface and was refused.
        self.refused = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._checked:
            data = b""
            while len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                chunk = await self._stream.receive_some()
                if not chunk:
                    break
                data += chunk
            self._checked = True
            if data.startswith(H2_PREFACE):
                self.refused = True
                self._on_refused()
                log.debug("receive.http2_refused")
                raise trio.BrokenResourceError("HTTP/2 is not served")
            self._held = data
        if self._held:
            n = len(self._held) if max_bytes is None else max_bytes
            data, self._held = self._held[:n], self._held[n:]
            return data
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _http11_server(
    app: Any,
    config: Any,
    context: Any,
    stream: _RefuseHttp2,
    on_h2c_upgrade: Callable[[], None],
) -> None:
    """hypercorn's ``TCPServer`` for one plain-TCP connection, speaking HTTP/1.1 only.

    ``TCPServer.run`` builds a ``ProtocolWrapper`` that switches to HTTP/2 on the preface
    (on any request of the connection) or on ``Upgrade: h2c`` (after answering 101 itself), so
    we replace ``run`` with its plain-TCP path around an ``H11Protocol`` that never switches.
    hypercorn is pinned to 0.18.x for these internals; tests/service/test_receiver_h2.py
    checks them.
    """
    import h11
    from hypercorn.protocol.h11 import H11Protocol
    from hypercorn.trio.task_group import TaskGroup
    from hypercorn.trio.tcp_server import TCPServer
    from hypercorn.typing import ConnectionState
    from hypercorn.utils import parse_socket_addr

    class Http11Only(H11Protocol):
        async def _check_protocol(self, event: h11.Request) -> None:
            # Upgrade is optional for a server to honour (RFC 9110 §7.8): serve it as HTTP/1.1.
            # "PRI * HTTP/2.0" past the first request is then a request like any other (405).
            for name, value in event.headers:
                if name.lower() == b"upgrade" and value.strip().lower() == b"h2c":
                    on_h2c_upgrade()

    class Server(TCPServer):
        async def run(self) -> None:
            sock = self.stream.socket
            try:
                client = parse_socket_addr(sock.family, sock.getpeername())
                server = parse_socket_addr(sock.family, sock.getsockname())
                with trio.CancelScope() as scope:
                    async with TaskGroup() as task_group:
                        self._task_group = task_group
                        self.protocol = Http11Only(  # type: ignore[assignment]
                            self.app,
                            self.config,
                            self.context,
                            task_group,
                            ConnectionState(self.state),
                            False,
                            client,
                            server,
                            self.protocol_send,
                        )
                        await self.protocol.initiate()
                        await self.idle_task.restart(self._task_group, self._idle_timeout)
                        await self._read_data()
                        if stream.refused:
                            # No request was parsed, so no app task runs; the idle timer
                            # would hold the connection (and its slot) for header_timeout_s.
                            scope.cancel()
            except OSError:
                pass
            finally:
                await self._close()

    await Server(app, config, context, ConnectionState({}), stream)  # type: ignore[arg-type]


def _bound(bind: str) -> tuple[str, int]:
    # hypercorn reports "http://127.0.0.1:8000" or "http://[::1]:8000"
    hostport = bind.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class _Admitted:
    lines: list[bytes] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    duplicates: int = 0
    #: (reason, status, retry-after seconds) of the cap that stopped it, and how many were left
    refusal: tuple[str, int, float] | None = None
    left: int = 0


def _is_batch(body: bytes) -> bool:
    """Whether a verified body is the batch form (verify_batch told the two apart already;
    a single report's rendering has no "reports" key at its top level)."""
    doc = json.loads(body)
    return isinstance(doc, dict) and "reports" in doc and "cose" not in doc


def _seconds(wait_s: float) -> bytes:
    """A Retry-After: whole seconds, at least 1."""
    return str(max(1, math.ceil(min(wait_s, 86_400.0)))).encode("ascii")


async def _answer_json(
    send: Send,
    status: int,
    doc: Mapping[str, object],
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await _answer(
        send,
        status,
        json.dumps(doc, separators=(",", ":")),
        extra,
        content_type=b"application/json",
    )


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
