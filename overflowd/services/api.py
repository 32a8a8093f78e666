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
import importlib
import json
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from overflowd.config import ApiSettings, parse_listen
from overflowd.errors import ConfigError
from overflowd.identity import NodeIdentity
from overflowd.services.api_peers import PeerInbox
from overflowd.services.api_subscriptions import SubscriptionDesk
from overflowd.store.repository import Store

if TYPE_CHECKING:
    from fastapi import FastAPI

    from overflowd.dashboard.history import CounterHistory
    from overflowd.services.dns import DnsRegistry

log = logging.getLogger(__name__)

#: Reports per page at most: a page of 1000 reports is about 2 MB of JSON.
MAX_PAGE = 1000
#: One WARNING per this long while the store fails: every request then fails alike, and a
#: client must not write the log as fast as it asks (an unhandled error is hypercorn's
#: traceback per request). The answer is 503 with this Retry-After, saying nothing internal.
STORE_ERROR_LOG_INTERVAL_S = 60.0
STORE_ERROR_RETRY_AFTER_S = 5
#: Connections waiting to be accepted, as hypercorn's default ``backlog``.
API_BACKLOG = 100
#: Where the OpenAPI document is shipped in the package (a test keeps it equal to the code's).
OPENAPI_FILE = Path(__file__).resolve().parent.parent / "openapi.json"


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


class LazyApp:
    """The node's ASGI app, built when the first HTTP request arrives (issue #16).

    FastAPI, pydantic, Starlette and the route modules are ~20 MB of an idle daemon's memory and
    most nodes' API is asked nothing for hours; the listening socket is open from the start (so
    the port is held and the first connection is answered), and the app is built in a worker
    thread (the event loop goes on receiving flows meanwhile) by the first request, which every
    concurrent first request waits for. Until then a lifespan scope is answered here: the app
    has no start-up or shutdown handlers.
    """

    def __init__(self, build: Callable[[], FastAPI]) -> None:
        self._build = build
        self._app: FastAPI | None = None
        self._lock: Any = None  # an anyio.Lock, made in the loop that first needs it

    @property
    def built(self) -> bool:
        return self._app is not None

    def get(self) -> FastAPI:
        """The app, built now if it was not (synchronously: tests add routes to it)."""
        if self._app is None:
            self._app = self._build()
        return self._app

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        app = self._app
        if app is None:
            if scope.get("type") == "lifespan":
                await _lifespan(receive, send)
                return
            import anyio
            import anyio.to_thread

            if self._lock is None:
                self._lock = anyio.Lock()
            async with self._lock:
                if self._app is None:
                    built = await anyio.to_thread.run_sync(self._build)
                    log.info("api.app_built")
                    self._app = built
            app = self._app
        await app(scope, receive, send)  # type: ignore[arg-type]  # an ASGI 3 app


async def _lifespan(receive: _Receive, send: _Send) -> None:
    """ASGI lifespan for an app not built yet: nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class ApiService:
    """The API server as a service of the daemon: ``await nursery.start(api.run)``.

    Settings are checked here (a bad TLS file fails the start); the app itself is built on the
    first request (:class:`LazyApp`), or when ``app`` is read.
    """

    def __init__(self, settings: ApiSettings, ctx: ApiContext) -> None:
        check_tls_files(settings)
        #: the server's TLS context, its files read now: hypercorn would read them on its
        #: first connection, and files changed since start (a renewal half written) would
        #: then stop the service, the node with it
        self._tls = _server_tls_context(settings)
        self.settings = settings
        self.limits = RequestLimits(settings)
        ctx = dataclasses.replace(ctx, collectors=(*ctx.collectors, self.limits.collector()))
        self._ctx = ctx
        self.lazy = LazyApp(self._build)
        self._stop = trio.Event()
        self.bound: tuple[str, int] | None = None

    @property
    def app(self) -> FastAPI:
        """The FastAPI app (built now if no request has built it yet)."""
        return self.lazy.get()

    def _build(self) -> FastAPI:
        from overflowd.services.api_app import create_app

        ctx, settings = self._ctx, self.settings
        app = create_app(ctx)
        # The dashboard (docs/dashboard.md): HTML at /, under the same limits; not in OpenAPI.
        from overflowd.dashboard import router as dashboard_router

        app.include_router(dashboard_router(ctx, settings, ctx.history))
        if _listens_on_loopback(settings):
            app.add_middleware(LoopbackHostOnly)
        return app

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        """Listen now; start hypercorn when the first connection waits on the socket.

        hypercorn with h11, h2, wsproto and their tables is ~3 MB of an idle daemon (issue
        #16), so the socket is bound and listening from the start, as hypercorn binds it (the
        port is held, ``task_status`` gets it, a bind error names ``host:port``), and hypercorn
        is imported (in a worker thread) when a client first connects: that connection waits in
        the kernel's backlog meanwhile. hypercorn is handed the listening socket itself
        (``worker_serve(sockets=)``: it calls no ``listen``, which the daemon's seccomp filter
        refuses once it is on).
        """
        host, port = parse_listen(self.settings.listen)
        try:
            sock = _listening_socket(host, port)
        except OSError as exc:
            # Named by "host:port", as the other services name theirs, so the daemon can say
            # which flag or key the socket came from.
            raise OSError(exc.errno, exc.strerror or str(exc), f"{host}:{port}") from None
        with sock:
            self.bound = sock.getsockname()[0], sock.getsockname()[1]
            scheme = "https" if self.settings.tls_certificate_file else "http"
            shown = f"[{self.bound[0]}]" if sock.family == socket.AF_INET6 else self.bound[0]
            log.info("api.listening url=%s://%s:%d", scheme, shown, self.bound[1])
            task_status.started(self.bound)
            async with trio.open_nursery() as waiting:

                async def stop_waiting() -> None:
                    await self._stop.wait()
                    waiting.cancel_scope.cancel()

                waiting.start_soon(stop_waiting)
                await trio.lowlevel.wait_readable(sock)  # a client connected: it waits
                waiting.cancel_scope.cancel()
            if self._stop.is_set():
                return  # stopped before anyone connected: hypercorn never loaded
            await trio.to_thread.run_sync(importlib.import_module, "hypercorn.trio.run")
            await self._serve(sock)

    async def _serve(self, sock: socket.socket) -> None:
        from hypercorn.config import Config, Sockets
        from hypercorn.trio.run import worker_serve
        from hypercorn.utils import wrap_app

        config = Config()
        config.accesslog = None
        config.errorlog = logging.getLogger("overflowd.api.hypercorn")
        config.keep_alive_timeout = self.settings.keep_alive_s  # also the headers deadline
        config.read_timeout = max(1, math.ceil(self.settings.read_timeout_s))  # an int
        config.h11_max_incomplete_size = self.settings.max_header_bytes
        config.include_server_header = False
        config.graceful_timeout = 2.0
        config.backlog = API_BACKLOG
        # HTTP/1.1 only (no h2: see receive_http for what one h2 connection can buffer).
        config.alpn_protocols = ["http/1.1"]
        secure: list[socket.socket] = []
        insecure = [sock]
        if self.settings.tls_certificate_file:
            config.certfile = self.settings.tls_certificate_file
            config.keyfile = self.settings.tls_key_file
            if self.settings.client_ca_file:
                config.ca_certs = self.settings.client_ca_file
                config.verify_mode = ssl.CERT_REQUIRED
            tls = self._tls
            config.create_ssl_context = lambda: tls  # type: ignore[method-assign]
            secure, insecure = insecure, secure
        # What hypercorn.trio.serve does, with our socket instead of one it binds.
        app = self.limits.wrap(self.lazy)
        await worker_serve(
            wrap_app(app, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]  # ASGI 3
            config,
            sockets=Sockets(secure, insecure, []),
            shutdown_trigger=self._stop.wait,
        )

    def stop(self) -> None:
        self._stop.set()


def _listens_on_loopback(settings: ApiSettings) -> bool:
    import ipaddress

    try:
        host, _ = parse_listen(settings.listen)
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_tls_context(settings: ApiSettings) -> ssl.SSLContext | None:
    """The context hypercorn's ``Config.create_ssl_context`` makes of our settings (its
    default ciphers, TLS 1.2 at least, no compression, ALPN http/1.1, the client CA)."""
    if not settings.tls_certificate_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_ciphers("ECDHE+AESGCM")
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options = ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(settings.tls_certificate_file, settings.tls_key_file)
    if settings.client_ca_file:
        context.load_verify_locations(settings.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket made as hypercorn's ``Config.create_sockets`` and ``worker_serve``
    make theirs (family from the address, TCP_NODELAY, SO_REUSEADDR, its backlog)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(API_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def __getattr__(name: str) -> Any:
    """``create_app`` and ``openapi_text`` as before they moved to services/api_app.py, imported
    only when asked for (FastAPI with them)."""
    if name in ("create_app", "openapi_text"):
        from overflowd.services import api_app

        return getattr(api_app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:  # pragma: no cover - used by `make openapi`
    """Print the OpenAPI document (the shipped file is this output)."""
    from overflowd.services.api_app import create_app, openapi_text

    ctx = ApiContext(
        identity=NodeIdentity.generate(),
        contacts=(),
        observation_point="",
        store=None,  # type: ignore[arg-type]  # routes are not called
    )
    print(openapi_text(create_app(ctx)), end="")


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["MAX_PAGE", "ApiContext", "ApiService", "LazyApp"]
