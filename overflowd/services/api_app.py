"""The node API's ASGI application (FastAPI): its routes, response models and OpenAPI document.

Built by services/api.py's :class:`ApiService` when the first request arrives, not when the
daemon starts: FastAPI, pydantic and the route modules are ~20 MB of an idle daemon's memory
(issue #16). What the routes are and answer is described in services/api.py.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import anyio.to_thread
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
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
from overflowd.errors import StoreError
from overflowd.estimate import GROUP_BY
from overflowd.identity import sign_node_record
from overflowd.registry import format_record
from overflowd.services.api_peers import router as peers_router
from overflowd.services.api_subscriptions import router as subscriptions_router
from overflowd.store.repository import MAX_SEQ, CursorAhead, StoredReport
from overflowd.wire import peering

if TYPE_CHECKING:
    from overflowd.store.query import ReportFilter, WhoRow

from overflowd.services.api import (
    MAX_PAGE,
    STORE_ERROR_LOG_INTERVAL_S,
    STORE_ERROR_RETRY_AFTER_S,
    ApiContext,
)

#: the same logger as before the app moved here: operators' filters name it
log = logging.getLogger("overflowd.services.api")
#: `top`'s ?by= words (overflowd.estimate.GROUP_BY), as a type FastAPI documents.
GROUP_BY_NAMES = Literal["observer", "src", "dst", "srcport", "dstport", "proto"]
assert get_args(GROUP_BY_NAMES) == GROUP_BY, "keep GROUP_BY_NAMES equal to estimate.GROUP_BY"


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


__all__ = ["create_app", "openapi_text"]
