"""The node API: one HTTP server per node for peers, queries, dashboards and Prometheus.

An ASGI application (FastAPI, so the OpenAPI document is generated from these routes and their
types, not written by hand) served by hypercorn on trio, in the daemon's nursery. FastAPI
over bare Starlette because the peers and query issues add a dozen routes with typed query
parameters and JSON bodies: FastAPI validates them (422 naming the parameter) and documents
them from the same code; Starlette would need both written twice.

Routes here: ``/healthz``, ``/metrics`` (the same exposition as ``metrics.listen``),
``/v1/openapi.json``, ``/v1/identity`` (key, contacts, the DNS record to publish) and
``/v1/reports`` (cursor paging in the store's sequence order: :meth:`Store.reports_after`).
The peers issue adds ``/v1/inbox`` and subscriptions, the query issue ``/v1/who`` and
``/v1/top``.

Bounds: a page holds at most ``MAX_PAGE`` reports; the store is read in a worker thread
(anyio's limiter, 40 at once) so a slow query never blocks the event loop. The server listens
on loopback by default. Limits (:class:`RequestLimits`, ``[api]`` settings, docs/api.md
"Limits"): each request answered within ``request_timeout_s`` (else 503), at most
``max_requests_per_client`` in flight per client address (else 429), and hypercorn's headers
deadline, read timeout and head size. Not here yet: the receiver's cap on *connections* per
client at accept (``overflowd.services.receive_http``), which needs our own accept loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import anyio.to_thread
import trio
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field

from overflowd import __version__
from overflowd import report as rpt
from overflowd.answers import (
    DEFAULT_TOP_N,
    MAX_TOP_N,
    WHO_TOP_SOURCES,
    make_filter,
    prefix_lengths,
    top_json,
)
from overflowd.config import ApiSettings, parse_listen
from overflowd.errors import ConfigError, StoreError
from overflowd.estimate import GROUP_BY
from overflowd.identity import NodeIdentity, sign_node_record
from overflowd.registry import format_record
from overflowd.services.api_peers import PeerInbox
from overflowd.services.api_peers import router as peers_router
from overflowd.services.api_subscriptions import SubscriptionDesk
from overflowd.services.api_subscriptions import router as subscriptions_router
from overflowd.store.repository import MAX_SEQ, CursorAhead, Store, StoredReport
from overflowd.wire import peering

if TYPE_CHECKING:
    from overflowd.dashboard.history import CounterHistory
    from overflowd.services.dns import DnsRegistry
    from overflowd.store.query import ReportFilter, WhoRow

log = logging.getLogger(__name__)
#: `top`'s ?by= words (overflowd.estimate.GROUP_BY), as a type FastAPI documents.
GROUP_BY_NAMES = Literal["observer", "src", "dst", "srcport", "dstport", "proto"]
assert get_args(GROUP_BY_NAMES) == GROUP_BY, "keep GROUP_BY_NAMES equal to estimate.GROUP_BY"

#: Reports per page at most: a page of 1000 reports is about 2 MB of JSON.
MAX_PAGE = 1000
#: One WARNING per this long while the store fails: every request then fails alike, and a
#: client must not write the log as fast as it asks (an unhandled error is hypercorn's
#: traceback per request). The answer is 503 with this Retry-After, saying nothing internal.
STORE_ERROR_LOG_INTERVAL_S = 60.0
STORE_ERROR_RETRY_AFTER_S = 5
#: Where the OpenAPI document is shipped in the package (a test keeps it equal to the code's).
OPENAPI_FILE = Path(__file__).resolve().parent.parent / "openapi.json"


class DnsRecord(BaseModel):
    """The TXT record that publishes this node's key (``overflowd key dns-record``)."""

    text: str = Field(description="the record's text: v=OVF1; k=ed25519; p=...; c=...")


class PeerRecord(BaseModel):
    #: a peer's signed node record (COSE_Sign1, base64url), as that peer served it
    signed: str


class PeerRecords(BaseModel):
    peers: list[PeerRecord]
    latency: dict[str, dict[str, float | None]] = Field(
        default_factory=dict,
        description="per configured peer name, this node's recent latency to it in seconds "
        "(push_rtt_p50/max, delivery_age_p50/max, pull_rtt_p50/max; null: none yet); "
        "docs/peers.md 'Latency'",
    )


class Identity(BaseModel):
    """Who this node is: its key, its contacts and the record that vouches for it in DNS."""

    key: str = Field(description="Ed25519 public key, base64")
    fingerprint: str = Field(description="first 8 bytes of SHA-256 of the key, xxxx-xxxx-...")
    contacts: list[str]
    observation_point: str
    dns_record: DnsRecord
    software: str
    signed: str = Field(
        description="base64url COSE_Sign1 by the node key (content type "
        "application/overflowd-node+cbor) over key, contacts, observation point, API endpoint "
        "and time: what peers check, not the fields above (docs/peers.md)"
    )


class StoredReportOut(BaseModel):
    """A stored report: the observer's signed COSE bytes and this node's facts about it."""

    seq: int = Field(description="this node's number for the report: the paging cursor")
    received: str = Field(description="when this node stored it, RFC 3339")
    via: str = Field(description="how it arrived: local, udp, webhook, import, gossip")
    trust: str | None = Field(description="the observer's trust when it arrived")
    hops: int = Field(
        default=0, description="the fewest peer-to-peer hops it made to this node (0: none)"
    )
    report: dict[str, Any] = Field(
        description="the report's JSON rendering, with `cose` (base64url): verify that"
    )


class ReportPage(BaseModel):
    reports: list[StoredReportOut]
    next: int = Field(description="the cursor for the next page: pass it as ?after=")
    total: int | None = Field(
        default=None, description="order=flow: how many reports match (the footer's M)"
    )


class WhoAnswer(BaseModel):
    """Per observer: trust, contacts, reports, estimated packets and bytes (95% intervals),
    first and last seen (the flows'), top source prefixes; the largest first."""

    observers: list[dict[str, Any]]
    reports: int = Field(description="reports behind the answer")


class TopAnswer(BaseModel):
    """The top groups by estimated ``measure``, then the row ``other`` (rank null)."""

    by: str
    measure: str
    rows: list[dict[str, Any]]
    groups: int = Field(description="groups seen (an upper bound when folded > 0)")
    folded: int = Field(description="groups folded into 'other' to bound memory")


class FilterParams:
    """The filters of every query route: the CLI's flags, with underscores."""

    def __init__(
        self,
        since: Annotated[
            str | None, Query(description="flow last seen at or after: 1h, 2d, RFC 3339")
        ] = None,
        until: Annotated[str | None, Query(description="flow first seen at or before")] = None,
        received_since: Annotated[str | None, Query(description="stored at or after")] = None,
        received_until: Annotated[str | None, Query(description="stored at or before")] = None,
        src: Annotated[str | None, Query(description="source address or prefix")] = None,
        dst: Annotated[str | None, Query(description="destination address or prefix")] = None,
        prefix: Annotated[
            str | None, Query(description="source or destination in this prefix")
        ] = None,
        proto: Annotated[str | None, Query(description="tcp, udp, icmp... or 0-255")] = None,
        port: Annotated[str | None, Query(description="source or destination port")] = None,
        sport: Annotated[str | None, Query(description="source port")] = None,
        dport: Annotated[str | None, Query(description="destination port")] = None,
        kind: Annotated[str | None, Query(description="report kind")] = None,
        observer: Annotated[
            str | None, Query(description="observer key (base64) or fingerprint prefix")
        ] = None,
        min_trust: Annotated[
            str | None, Query(description="unknown < continuity < dns < pinned")
        ] = None,
    ) -> None:
        self.values: dict[str, str | None] = {
            "since": since, "until": until, "received_since": received_since,
            "received_until": received_until, "src": src, "dst": dst, "prefix": prefix,
            "proto": proto, "port": port, "sport": sport, "dport": dport, "kind": kind,
            "observer": observer, "min_trust": min_trust,
        }  # fmt: skip

    def text(self) -> dict[str, str | None]:
        return self.values


@dataclass(frozen=True)
class ApiContext:
    """What the routes read: the node's identity and settings, its store, its counters."""

    identity: NodeIdentity
    contacts: tuple[str, ...]
    observation_point: str
    store: Store
    #: the Prometheus collectors of the node (the same as metrics.listen serves)
    collectors: tuple[Collector, ...] = ()
    #: the peer inbox (POST /v1/inbox, services/api_peers.py); None: no peers configured
    inbox: PeerInbox | None = None
    #: POST/GET /v1/subscriptions (services/api_subscriptions.py); None: no peers configured
    subscriptions: SubscriptionDesk | None = None
    #: this node's API base URL for peers, in its signed node record ("" when not known)
    endpoint: str = ""
    #: DNS for /v1/who's `registry` (services/who_dns.py); None: DNS not configured
    registry: DnsRegistry | None = None
    #: the counters' last hour for the dashboard's Node page (overflowd.dashboard.history)
    history: CounterHistory | None = None


def _stored(row: StoredReport) -> StoredReportOut:
    return StoredReportOut(
        seq=row.seq,
        received=rpt.iso_ms(row.received_ms),
        via=row.via,
        trust=row.trust,
        hops=row.hops,
        report=rpt.to_json(row.signed_report()),
    )


def create_app(ctx: ApiContext) -> FastAPI:
    """The node's ASGI application over ``ctx``."""
    app = FastAPI(
        title="overflowd node API",
        version=__version__,
        description="Reports this node holds, who it is, and its counters. "
        "Every report carries the observer's own COSE signature: verify it, not this server.",
        openapi_url="/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    store_errors: dict[str, float] = {"next_log": -math.inf, "suppressed": 0}

    async def store_unavailable(request: Request, exc: Exception) -> Response:
        now = time.monotonic()
        if now < store_errors["next_log"]:
            store_errors["suppressed"] += 1
        else:
            log.warning(
                "api.store_error path=%s error=%s suppressed_since_last=%d",
                request.url.path,
                str(exc)[:200],
                int(store_errors["suppressed"]),
            )
            store_errors["next_log"] = now + STORE_ERROR_LOG_INTERVAL_S
            store_errors["suppressed"] = 0
        return JSONResponse(
            {"detail": "the store is unavailable"},
            status_code=503,
            headers={"retry-after": str(STORE_ERROR_RETRY_AFTER_S)},
        )

    app.add_exception_handler(StoreError, store_unavailable)
    registry = CollectorRegistry(auto_describe=False)
    for collector in ctx.collectors:
        registry.register(collector)
    record = format_record(ctx.identity.public_key, list(ctx.contacts))

    @app.get("/healthz", response_class=PlainTextResponse, summary="liveness")
    def healthz() -> str:
        return "ok"

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus counters")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/identity", summary="this node's key, contacts and DNS record")
    def identity() -> Identity:
        return Identity(
            key=ctx.identity.public_key_b64,
            fingerprint=ctx.identity.fingerprint,
            contacts=list(ctx.contacts),
            observation_point=ctx.observation_point,
            dns_record=DnsRecord(text=record),
            software=f"overflowd {__version__}",
            signed=rpt.b64url(
                sign_node_record(
                    ctx.identity,
                    contacts=ctx.contacts,
                    point=ctx.observation_point,
                    endpoint=ctx.endpoint,
                    time_ms=int(time.time() * 1000),
                )
            ),
        )

    @app.get("/v1/peers", summary="the signed node records this node holds of its peers")
    async def peers() -> PeerRecords:
        """Each peer's latest record as it served it (verbatim: check each signature), so
        that this node's peers can learn of each other (docs/peers.md "Learned peers")."""
        from overflowd.peers import MAX_PEER_RECORDS
        from overflowd.services.peer_latency import latency_of_collectors
        from overflowd.store.peers import list_records

        records = await anyio.to_thread.run_sync(
            lambda: list_records(ctx.store, limit=MAX_PEER_RECORDS)
        )
        return PeerRecords(
            peers=[PeerRecord(signed=rpt.b64url(r)) for r in records],
            latency=latency_of_collectors(ctx.collectors),
        )

    def make(params: FilterParams) -> ReportFilter:
        """The filter of the query parameters (in a worker thread: --observer reads the store)."""
        from overflowd.store.query import resolve_observer

        try:
            return make_filter(
                params.text(),
                now_ms=int(time.time() * 1000),
                observers=lambda text: resolve_observer(ctx.store, text),
            )
        except ValueError as exc:
            raise HTTPException(400, str(exc)[:300]) from None

    @app.get(
        "/v1/reports",
        summary="stored reports that match the filters, from a cursor",
        response_model=ReportPage,
        responses={
            200: {
                "content": {
                    peering.CBOR: {
                        "schema": {"type": "string", "format": "binary"},
                        "description": "with Accept: application/cbor and order=seq, the lean "
                        'page peers pull: {"next": n, "reports": [[seq, h\'COSE\', hops], ...]} '
                        "(docs/peers.md)",
                    }
                }
            }
        },
    )
    async def reports(
        request: Request,
        params: Annotated[FilterParams, Depends()],
        after: Annotated[
            int, Query(ge=0, le=MAX_SEQ, description="cursor: the `next` of the last page")
        ] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        order: Annotated[
            Literal["seq", "flow"],
            Query(
                description="`seq` (default): this node's order, paged by `after` and `next`, "
                "complete while reports arrive. `flow`: the `limit` newest flows (last seen) "
                "and `total`, what `overflowd-query reports --limit` shows; `next` is then "
                "the cursor to follow new reports from"
            ),
        ] = "seq",
    ) -> ReportPage | Response:
        # The lean page for peers (docs/peers.md "Pulling"): seq, COSE bytes and hops only,
        # in CBOR, without rendering each report: JSON stays the default for people.
        lean = order == "seq" and peering.CBOR in request.headers.get("accept", "").lower()

        def answer() -> ReportPage | Response:
            from overflowd.store.query import count_reports, find_reports, page_reports

            flt = make(params)
            if order == "flow":
                cursor = ctx.store.last_seq()  # before the rows: nothing after it is missed
                rows = find_reports(ctx.store, flt, limit=limit)
                total = count_reports(ctx.store, flt)
                return ReportPage(
                    reports=[_stored(r) for r in rows], next=cursor, total=max(total, len(rows))
                )
            page, nxt = page_reports(ctx.store, flt, after=after, limit=limit)
            if lean:
                body = peering.encode_page([(r.seq, r.cose, r.hops) for r in page], nxt)
                return Response(body, media_type=peering.CBOR)
            return ReportPage(reports=[_stored(r) for r in page], next=nxt)

        try:
            return await anyio.to_thread.run_sync(answer)
        except CursorAhead as exc:
            raise HTTPException(409, f"after: {exc}; page again from 0") from None

    @app.get("/v1/who", summary="whom to call: the observers behind the matching reports")
    async def who(
        params: Annotated[FilterParams, Depends()],
        prefix_len: Annotated[
            int | None,
            Query(ge=0, le=32, description="top sources by /N (IPv4, default 24; IPv6 /N+24)"),
        ] = None,
        dns: Annotated[
            bool,
            Query(
                description="look up the contacts the observers' networks publish in DNS "
                "(`registry`; null when false or DNS is not configured on this node)"
            ),
        ] = True,
    ) -> WhoAnswer:
        from overflowd.services.who_dns import registry_contacts, wanted, who_objects
        from overflowd.store.query import who as who_query

        v4_len, v6_len = prefix_lengths(prefix_len)
        registry = ctx.registry if dns else None

        def answer() -> tuple[list[WhoRow], list[tuple[bytes, list[str]]] | None]:
            rows = who_query(
                ctx.store, make(params), top_sources=WHO_TOP_SOURCES, v4_len=v4_len,
                v6_len=v6_len,
            )  # fmt: skip
            return rows, None if registry is None else wanted(ctx.store, rows)

        rows, want = await anyio.to_thread.run_sync(answer)
        found = None if registry is None or want is None else await registry_contacts(
            registry, want
        )  # fmt: skip
        return WhoAnswer(observers=who_objects(rows, found), reports=sum(r.reports for r in rows))

    @app.get("/v1/top", summary="top N by estimated packets or bytes, the rest as 'other'")
    async def top(
        params: Annotated[FilterParams, Depends()],
        by: Annotated[GROUP_BY_NAMES, Query(description="what to group by")],
        n: Annotated[int, Query(ge=1, le=MAX_TOP_N, description="rows before other")] = (
            DEFAULT_TOP_N
        ),
        prefix_len: Annotated[
            int | None,
            Query(ge=0, le=32, description="addresses by /N (IPv4, default 24; IPv6 /N+24)"),
        ] = None,
        measure: Annotated[Literal["packets", "bytes"], Query()] = "packets",
    ) -> TopAnswer:
        from overflowd.store.query import top as top_query

        v4_len, v6_len = prefix_lengths(prefix_len)

        def answer() -> TopAnswer:
            result = top_query(
                ctx.store, make(params), by=by, n=n, v4_len=v4_len, v6_len=v6_len,
                measure=measure,
            )  # fmt: skip
            return TopAnswer(
                by=by, measure=measure, rows=top_json(result, by=by), groups=result.groups,
                folded=result.folded,
            )  # fmt: skip

        return await anyio.to_thread.run_sync(answer)

    app.include_router(peers_router(lambda: ctx.inbox))
    app.include_router(subscriptions_router(lambda: ctx.subscriptions))
    return app


def openapi_text(app: FastAPI) -> str:
    """The OpenAPI document as shipped: stable key order, one trailing newline."""
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"


def check_tls_files(settings: ApiSettings) -> None:
    """Load the certificate, key and client CA once at start, so a bad file is one clear line
    naming it (hypercorn would only fail later, on its first connection)."""
    if not settings.tls_certificate_file:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.tls_certificate_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"api.tls_certificate_file {settings.tls_certificate_file} / api.tls_key_file "
            f"{settings.tls_key_file}: cannot load: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if settings.client_ca_file:
        try:
            context.load_verify_locations(settings.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"api.client_ca_file {settings.client_ca_file}: cannot load: "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None


# -- limits: a deadline per request, a cap on each client's requests in flight -------------

#: Retry-After of a 429 (a client over api.max_requests_per_client): one of its own requests
#: ends within a second or so, or at api.request_timeout_s.
PER_CLIENT_RETRY_AFTER_S = 1
#: Retry-After of a 503 after api.request_timeout_s: whatever made a route that slow (a store
#: under load, a lock) lasts longer than one request.
DEADLINE_RETRY_AFTER_S = 5
#: Why the limits answered instead of a route, in the order /metrics lists them.
LIMIT_REASONS = ("deadline", "deadline_started", "per_client")

_Scope = dict[str, Any]
_Message = dict[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_Asgi = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ApiLimitStatistics:
    requests: int
    in_flight: int
    #: answered by the limits instead of a route, by LIMIT_REASONS
    refused: dict[str, int]
    #: handlers still running after their deadline passed (each in its worker thread, which
    #: cannot be interrupted: it ends on its own, within anyio's 40 threads)
    abandoned: int


class RequestLimits:
    """ASGI middleware in front of the routes: each request's answer within
    ``request_timeout_s`` (else 503 with Retry-After, at the deadline itself even while the
    route's store read goes on in its thread) and at most ``max_requests_per_client`` in
    flight per client key (an IPv4 address or an IPv6 /64; else 429 with Retry-After).

    What a route would send after its deadline is dropped. A route that had begun its answer
    when the deadline passed cannot be told to stop it cleanly: the rest is dropped and
    hypercorn closes the connection (``deadline_started``). Connections themselves, before a
    request exists, are hypercorn's: its headers deadline (keep_alive_s), read timeout and
    head size (ApiSettings).
    """

    def __init__(self, settings: ApiSettings) -> None:
        from overflowd.receiver import client_key

        self._client_key = client_key
        self._timeout_s = settings.request_timeout_s
        self._per_client = settings.max_requests_per_client
        self._by_client: dict[str, int] = {}
        self._requests = 0
        self._in_flight = 0
        self._abandoned = 0
        self._refused = dict.fromkeys(LIMIT_REASONS, 0)

    def statistics(self) -> ApiLimitStatistics:
        return ApiLimitStatistics(
            requests=self._requests,
            in_flight=self._in_flight,
            refused=dict(self._refused),
            abandoned=self._abandoned,
        )

    def collector(self) -> Collector:
        return _LimitsCollector(self.statistics)

    def wrap(self, app: _Asgi) -> _Asgi:
        async def limited(scope: _Scope, receive: _Receive, send: _Send) -> None:
            if scope.get("type") != "http":
                await app(scope, receive, send)  # lifespan
                return
            client = scope.get("client")
            key = self._client_key(str(client[0])) if client else "-"
            self._requests += 1
            held = self._by_client.get(key, 0)
            if held >= self._per_client:
                self._refused["per_client"] += 1
                await _answer(send, 429, "too many requests in flight", PER_CLIENT_RETRY_AFTER_S)
                return
            self._by_client[key] = held + 1
            self._in_flight += 1
            try:
                await self._within_deadline(app, scope, receive, send)
            finally:
                self._in_flight -= 1
                if self._by_client[key] == 1:
                    del self._by_client[key]
                else:
                    self._by_client[key] -= 1

        return limited

    async def _within_deadline(
        self,
        app: _Asgi,
        scope: _Scope,
        receive: _Receive,
        send: _Send,
    ) -> None:
        state = {"started": False, "over": False}
        done = trio.Event()
        errors: list[Exception] = []

        async def guarded(message: _Message) -> None:
            if state["over"]:
                return  # the deadline answered already
            if message.get("type") == "http.response.start":
                state["started"] = True
            await send(message)

        async def route() -> None:
            try:
                await app(scope, receive, guarded)
            except Exception as exc:  # re-raised below, as itself (not in an exception group)
                errors.append(exc)
            finally:
                done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(route)
            with trio.move_on_after(self._timeout_s):
                await done.wait()
            if not done.is_set():
                state["over"] = True
                self._abandoned += 1
                if state["started"]:
                    self._refused["deadline_started"] += 1
                else:
                    self._refused["deadline"] += 1
                    await _answer(send, 503, "the answer took too long", DEADLINE_RETRY_AFTER_S)
                # A route awaiting trio stops here; one in a worker thread runs on (a thread
                # cannot be interrupted), its answer dropped, and this request's task waits
                # for it with the client answered already.
                nursery.cancel_scope.cancel()
        if state["over"]:
            self._abandoned -= 1
        if errors and not state["over"]:
            raise errors[0]


async def _answer(send: _Send, status: int, detail: str, retry_after_s: int) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(retry_after_s).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _LimitsCollector(Collector):
    def __init__(self, snapshot: Callable[[], ApiLimitStatistics]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._snapshot()
        requests = CounterMetricFamily("overflowd_api_requests", "HTTP requests the API received")
        requests.add_metric([], s.requests)
        yield requests
        refused = CounterMetricFamily(
            "overflowd_api_refused",
            "API requests answered by its limits instead of a route",
            labels=["reason"],
        )
        for reason in LIMIT_REASONS:
            refused.add_metric([reason], s.refused[reason])
        yield refused
        in_flight = GaugeMetricFamily("overflowd_api_in_flight", "API requests being answered")
        in_flight.add_metric([], s.in_flight)
        yield in_flight
        abandoned = GaugeMetricFamily(
            "overflowd_api_abandoned",
            "API route handlers still running after their deadline (in worker threads)",
        )
        abandoned.add_metric([], s.abandoned)
        yield abandoned


# -- end limits ---------------------------------------------------------------------------

#: What a server listening on loopback answers to a loopback ``Host`` only (the dashboard's
#: own pages have the same rule in overflowd.dashboard.pages.Gate; /healthz says nothing).
LOOPBACK_HOST_PATHS = ("/v1/", "/metrics")


class LoopbackHostOnly:
    """ASGI middleware of a server listening on loopback: ``/v1/`` and ``/metrics`` answer
    only a request whose ``Host`` names loopback (``127.0.0.1``, ``[::1]``, ``localhost``,
    any port), else **403**.

    Listening on loopback means "this host's users", but any web page they visit can make
    their browser ask: a page whose name its owner then points at 127.0.0.1 (DNS rebinding)
    is same-origin with what it fetches from there, and reads the answers (reports, who,
    counters). Its requests carry its own name as Host, which is what this refuses. A server
    listening beyond loopback does not check (peers and clients name it as they like)."""

    def __init__(self, app: _Asgi) -> None:
        from overflowd.dashboard.pages import loopback_host

        self.app = app
        self._loopback_host = loopback_host

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope.get("type") == "http" and str(scope.get("path", "")).startswith(
            LOOPBACK_HOST_PATHS
        ):
            host = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"")
            if not self._loopback_host(host.decode("latin-1")):
                body = json.dumps(
                    {
                        "detail": "on loopback the API answers a loopback Host only "
                        "(127.0.0.1, [::1], localhost): docs/api.md"
                    }
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class ApiService:
    """The API server as a service of the daemon: ``await nursery.start(api.run)``."""

    def __init__(self, settings: ApiSettings, ctx: ApiContext) -> None:
        check_tls_files(settings)
        self.settings = settings
        self.limits = RequestLimits(settings)
        ctx = dataclasses.replace(ctx, collectors=(*ctx.collectors, self.limits.collector()))
        self.app = create_app(ctx)
        # The dashboard (docs/dashboard.md): HTML at /, under the same limits; not in OpenAPI.
        from overflowd.dashboard import router as dashboard_router

        self.app.include_router(dashboard_router(ctx, settings, ctx.history))
        if _listens_on_loopback(settings):
            self.app.add_middleware(LoopbackHostOnly)
        self._stop = trio.Event()
        self.bound: tuple[str, int] | None = None

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        from hypercorn.config import Config
        from hypercorn.trio import serve

        host, port = parse_listen(self.settings.listen)
        config = Config()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("overflowd.api.hypercorn")
        config.keep_alive_timeout = self.settings.keep_alive_s  # also the headers deadline
        config.read_timeout = max(1, math.ceil(self.settings.read_timeout_s))  # an int
        config.h11_max_incomplete_size = self.settings.max_header_bytes
        config.include_server_header = False
        config.graceful_timeout = 2.0
        # HTTP/1.1 only (no h2: see receive_http for what one h2 connection can buffer).
        config.alpn_protocols = ["http/1.1"]
        if self.settings.tls_certificate_file:
            config.certfile = self.settings.tls_certificate_file
            config.keyfile = self.settings.tls_key_file
            if self.settings.client_ca_file:
                config.ca_certs = self.settings.client_ca_file
                config.verify_mode = ssl.CERT_REQUIRED

        async def started_at(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(
                    self.limits.wrap(self.app),  # type: ignore[arg-type]  # an ASGI 3 app
                    config,
                    shutdown_trigger=self._stop.wait,
                    task_status=task_status,
                )
            except* OSError as group:
                # Named by "host:port", as the other services name theirs, so the daemon can
                # say which flag or key the socket came from.
                first = _first_leaf(group)
                raise OSError(first.errno, first.strerror or str(first), f"{host}:{port}") from None

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(started_at)
            self.bound = _bound(binds[0])
            log.info("api.listening url=%s", binds[0])
            task_status.started(self.bound)

    def stop(self) -> None:
        self._stop.set()


def _listens_on_loopback(settings: ApiSettings) -> bool:
    import ipaddress

    try:
        host, _ = parse_listen(settings.listen)
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _first_leaf(group: BaseExceptionGroup[OSError]) -> OSError:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, OSError)
    return leaf


def _bound(url: str) -> tuple[str, int]:
    """('127.0.0.1', 9591) from hypercorn's 'http://127.0.0.1:9591'."""
    hostport = url.split("://", 1)[1]
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def main() -> None:  # pragma: no cover - used by `make openapi`
    """Print the OpenAPI document (the shipped file is this output)."""
    ctx = ApiContext(
        identity=NodeIdentity.generate(),
        contacts=(),
        observation_point="",
        store=None,  # type: ignore[arg-type]  # routes are not called
    )
    print(openapi_text(create_app(ctx)), end="")


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["MAX_PAGE", "ApiContext", "ApiService", "create_app", "openapi_text"]
