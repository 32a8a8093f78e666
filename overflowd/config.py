"""Node settings: TOML into frozen dataclasses, strictly.

An unknown key or a value of the wrong type is an error that names the file, the key and the
line, because a typo in a router's config must never silently become a default. Names carry
their unit (``timeout_s``, ``max_bytes``). Command-line flags override only when given.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from overflowd.errors import ConfigError
from overflowd.notify import (
    MAX_SECRET_FILE_BYTES,
    BudgetSettings,
    InbandSettings,
    WebhookSettings,
    parse_endpoints,
    parse_secret,
)
from overflowd.peers import PeeringSettings, PeerSettings, parse_peers
from overflowd.registry import RegistrySettings

_T = TypeVar("_T")

CONFIG_FILE = "overflowd.toml"
HOME_ENV = "OVERFLOWD_HOME"


@dataclass(frozen=True)
class NodeSettings:
    #: Contact URIs put in every report and DNS record (mailto:, https:, tel:).
    contacts: tuple[str, ...] = ()
    #: Free text naming where flows are observed (router, interface); at most 64 bytes.
    observation_point: str = ""


@dataclass(frozen=True)
class StoreSettings:
    #: SQLAlchemy URL; empty means SQLite (WAL) in the node home.
    url: str = ""


@dataclass(frozen=True)
class SamplingSettings:
    #: Reports per packet: p = min(1, rate × packets × interval × boost).
    rate: float = 1e-6
    #: Upper bound on any boost, whatever policy or a destination asks.
    boost_cap: float = 1000.0
    #: Reports signed per second at most (token bucket): spoofed or absurd flow records can
    #: make p = 1 for everything; beyond this, sampled records are shed and counted.
    max_reports_per_s: float = 1000.0
    max_reports_burst: int = 5000


@dataclass(frozen=True)
class CollectorSettings:
    #: UDP addresses taking NetFlow v5/v9, IPFIX and sFlow v5 alike ("ADDR:PORT", "[v6]:PORT").
    listen: tuple[str, ...] = ("0.0.0.0:2055",)
    #: Socket receive buffer (SO_RCVBUFFORCE as root, like nfcapd -B): absorbs export bursts.
    rcvbuf_bytes: int = 4 * 1024 * 1024
    #: Datagrams waiting for the decoder; beyond this the newest is dropped and counted.
    queue_datagrams: int = 10_000
    #: Per-exporter sampling the operator knows better than the exporter: "ADDR=N".
    sampling_overrides: tuple[str, ...] = ()
    #: On shutdown, how long queued datagrams and reports may take to drain.
    drain_timeout_s: float = 5.0
    #: Exporters (addresses or prefixes) whose datagrams are decoded; others are counted and
    #: dropped. Empty: every source (UDP sources can be spoofed: list your routers).
    allowed_exporters: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaptureSettings:
    #: Interfaces to sample packets on, in the kernel (root or CAP_NET_RAW). Empty: none.
    interfaces: tuple[str, ...] = ()
    #: The kernel passes one packet in this many to us, at random (classic BPF, docs/capture.md).
    one_in: int = 1000
    #: Bytes of each sampled packet read: enough for IPv6 + TCP headers.
    snaplen_bytes: int = 128
    #: Also sample what this host sends (off: a router counts forwarded packets once).
    outgoing: bool = False
    #: Socket receive buffer for sampled packets.
    rcvbuf_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class MetricsSettings:
    #: Prometheus exposition ("ADDR:PORT"); empty disables it.
    listen: str = "127.0.0.1:9590"
    #: Exporter addresses with a label of their own in the per-exporter families; the first
    #: this many seen keep theirs for the life of the process, the rest are summed as
    #: exporter="other". UDP sources are spoofable: without a cap a flood of forged sources
    #: would grow every scrape and the Prometheus server's series without bound.
    max_exporter_labels: int = 64
    #: How often the store gauges (outbox rows by state, store size) are read, and how long
    #: one read may take before it is abandoned (the gauges keep their last values).
    gauges_interval_s: float = 5.0
    gauges_timeout_s: float = 2.0


#: Bounds of the [metrics] settings: a label set larger than this is a mistake (each label is
#: four series on every scrape), and a gauge read once a day is no gauge.
MAX_EXPORTER_LABELS = 10_000
MAX_GAUGES_S = 86_400.0


# -- [storage]: budgets and retention of the report store (docs/storage.md) -------------------

#: One megabyte / gigabyte, for defaults written with their unit.
MB, GB = 1_000_000, 1_000_000_000
DAY_S = 86_400.0


@dataclass(frozen=True)
class StorageSettings:
    """What the store may hold. Received reports (any ``via`` but ``local``) are other
    nodes' words, signed with keys anybody can make: they get a budget of their own, admitted
    per observer key, per sender network and in total, and are the first to go when the disk
    runs short. Our own reports (``local``) and the webhook outbox are never refused."""

    #: Received reports stored at most, in bytes (COSE bytes plus an estimated row overhead)
    #: and in rows. 300 MB is about half a million reports: weeks of what a busy neighbourhood
    #: of honest nodes sends, and minutes of what one socket can flood.
    received_max_bytes: int = 300 * MB
    received_max_reports: int = 500_000
    #: Received reports stored at most per observer key: no single key, throwaway or not, may
    #: take more than a small share of the budget.
    received_max_reports_per_key: int = 20_000
    #: Received reports stored at most per sender network (/24 IPv4, /48 IPv6). Sources are
    #: spoofable, so this bounds one socket's flood, not a determined attacker's.
    received_max_reports_per_sender: int = 50_000
    #: Keys whose first stored report is younger than ``established_after_s`` share at most
    #: this fraction of the received budget, so a flood of throwaway keys can never crowd out
    #: the observers we have heard from before.
    new_keys_max_fraction: float = 0.25
    established_after_s: float = DAY_S
    #: ... and a key leaves that pool only once it also has this many reports stored: age
    #: alone is free (one report, then wait a day), so a key must have been stored, and
    #: counted in the pool, this many times first. The pool bounds how many keys can get there
    #: a day (its share divided by this). Keys already in the store at start are established
    #: by age alone (the store is the record).
    established_min_reports: int = 10
    #: Received reports older than this (by the time we received them) are pruned.
    received_max_age_days: float = 30.0
    #: Our own reports: kept this long and up to this size (oldest pruned first); never pruned
    #: while a pending webhook delivery still refers to them.
    own_max_bytes: int = 4 * GB
    own_max_age_days: float = 365.0
    #: Disk headroom: when free space falls below the larger of these two, received reports are
    #: refused and pruned oldest first, so our own reports and the outbox keep being written.
    min_free_bytes: int = 1 * GB
    min_free_fraction: float = 0.05
    #: The most the database may take, in bytes; 0 for no limit. On PostgreSQL this is the only
    #: headroom check (the disk is on another machine): pg_database_size() against it.
    max_database_bytes: int = 0
    #: How often headroom is checked, and how often age and size are pruned.
    headroom_interval_s: float = 10.0
    prune_interval_s: float = 300.0
    #: Rows deleted per transaction: a prune never holds the write lock for long.
    prune_batch_rows: int = 1000
    #: Memory of the admission policy: keys and sender networks counted (least recently used
    #: forgotten first).
    max_tracked_keys: int = 65_536
    max_tracked_senders: int = 65_536


#: What ``send.allowed_prefixes`` is when the switch is on and the key is not given: every
#: address. Addresses no datagram should go to (multicast, broadcast, unspecified, reserved,
#: loopback and link-local) stay refused by the confinement whatever this says.
SEND_EVERYWHERE = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True)
class ApiSettings:
    """``[api]``: the node's HTTP API (overflowd.services.api)."""

    #: "ADDR:PORT"; empty disables it. Loopback by default: it is for this host's tools until
    #: peers are configured.
    listen: str = "127.0.0.1:9591"
    #: TLS: a PEM certificate chain and its key; both empty: plain HTTP.
    tls_certificate_file: str = ""
    tls_key_file: str = ""
    #: Client certificates required, and checked against this CA bundle (PEM); empty: none.
    client_ca_file: str = ""
    #: An idle keep-alive connection is closed after this long. hypercorn runs the same timer
    #: from a connection's start (and after each answer) until a request's headers are whole,
    #: so it is also the headers deadline: a client that trickles headers (slowloris) holds a
    #: connection this long at most.
    keep_alive_s: float = 5.0
    # -- limits (issue #11: the API faces peers) -------------------------------------------
    #: A route's whole answer must be ready within this, or the client gets 503 with
    #: Retry-After (counted, overflowd_api_refused_total{reason="deadline"}); the slowest
    #: honest query (who/top over a day of a busy store) takes well under a second.
    request_timeout_s: float = 10.0
    #: hypercorn's read timeout: the longest wait for the next bytes of a request (a body
    #: that stalls); whole seconds.
    read_timeout_s: float = 10.0
    #: The largest request head (request line and headers) h11 buffers before refusing it
    #: (hypercorn's h11_max_incomplete_size): our clients send a few hundred bytes.
    max_header_bytes: int = 16 * 1024
    #: Requests one client (an IPv4 address or an IPv6 /64) may have in flight at once; more
    #: get 429 with Retry-After (overflowd_api_refused_total{reason="per_client"}). A peer
    #: pulls with one request at a time; a dashboard asks a few at once.
    max_requests_per_client: int = 16
    # -- end limits ------------------------------------------------------------------------
    #: The operator token for the dashboard (docs/dashboard.md): required, as a bearer token
    #: or the cookie /login sets, when set; empty: the dashboard answers on loopback only.
    dashboard_token: str = ""


@dataclass(frozen=True)
class SendSettings:
    """``[send]``: the one switch for telling the ends of the flows a node sees.

    "Telling a flow's ends" is every message whose destination is read from a flow record:
    the in-band datagram to its source and destination, and the webhook POSTed to a URL that
    one of them publishes in DNS (``u=``). Webhook endpoints the operator lists
    (``webhook.targets``, ``[[webhook.endpoints]]``) are the operator's own recipients, not
    a flow's ends, and get their reports whatever this says.
    """

    #: Off (the default): nothing is ever sent to an address read from a flow.
    to_flow_addresses: bool = False
    #: Which flow ends may be told when the switch is on (the confinement).
    allowed_prefixes: tuple[str, ...] = SEND_EVERYWHERE


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    collector: CollectorSettings = field(default_factory=CollectorSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    send: SendSettings = field(default_factory=SendSettings)
    inband: InbandSettings = field(default_factory=InbandSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    #: ``[[peers]]`` and ``[peering]`` (overflowd.peers, docs/peers.md)
    peers: tuple[PeerSettings, ...] = ()
    peering: PeeringSettings = field(default_factory=PeeringSettings)
    #: Where this came from, for messages; not a TOML key.
    source: str = field(default="(defaults)", compare=False)
    #: Keys that still work but have a new name: one warning line each at start.
    deprecations: tuple[str, ...] = field(default=(), compare=False)


_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "store": StoreSettings,
    "sampling": SamplingSettings,
    "collector": CollectorSettings,
    "metrics": MetricsSettings,
    "capture": CaptureSettings,
    "registry": RegistrySettings,
    "api": ApiSettings,
    "send": SendSettings,
    "inband": InbandSettings,
    "budget": BudgetSettings,
    "webhook": WebhookSettings,
    "storage": StorageSettings,
    "peering": PeeringSettings,
}

DEFAULT_CONFIG_TEXT = """\
# overflowd node configuration. Every key is optional; the values shown are the defaults.
# Unknown keys are an error, so a typo never silently becomes a default.

[node]
# Contact URIs carried in every report and in your _overflowd DNS record.
# contacts = ["mailto:abuse@example.net", "https://example.net/abuse"]
# Where flows are observed, for people reading the report (at most 64 bytes).
# observation_point = "edge-router-1"

[store]
# SQLAlchemy URL. Empty: SQLite (WAL) in this directory. For several machines:
# url = "postgresql+psycopg://overflowd@db.example.net/overflowd"
url = ""

[sampling]
# Reports per packet: p = min(1, rate x packets x exporter interval x boost).
rate = 1e-6
# Upper bound on any boost, whatever policy or a destination asks.
boost_cap = 1000.0
# Reports signed per second at most, and the burst above it; the rest are shed and counted.
max_reports_per_s = 1000.0
max_reports_burst = 5000

[collector]
# UDP addresses taking NetFlow v5/v9, IPFIX and sFlow v5 alike.
listen = ["0.0.0.0:2055"]
# Socket receive buffer; as root it may exceed net.core.rmem_max (like nfcapd -B).
rcvbuf_bytes = 4194304
# Datagrams waiting for the decoder; beyond this the newest is dropped and counted.
queue_datagrams = 10000
# Exporters whose sampling you know better than they announce it: "ADDR=N".
# sampling_overrides = ["192.0.2.1=1000"]
# On shutdown, how long queued work may take to drain.
drain_timeout_s = 5.0
# Exporters (addresses or prefixes) whose datagrams are decoded; empty: every source.
# UDP sources can be spoofed: list your routers.
# allowed_exporters = ["192.0.2.0/28", "2001:db8::1"]
allowed_exporters = []

[capture]
# Live capture: the kernel samples one packet in one_in on these interfaces (needs root or
# CAP_NET_RAW); each sampled packet becomes a flow record. Empty: no capture.
interfaces = []
one_in = 1000
snaplen_bytes = 128
outgoing = false
rcvbuf_bytes = 4194304

[metrics]
# Prometheus exposition; "" disables it.
listen = "127.0.0.1:9590"
# Exporters with a label of their own (the first seen); the rest count as exporter="other".
max_exporter_labels = 64
# How often the outbox and store-size gauges are read, and the longest one read may take.
gauges_interval_s = 5.0
gauges_timeout_s = 2.0

[registry]
# Resolvers asked for _overflowd and abuse-zone TXT records: "ADDR", "ADDR:PORT", "[V6]:PORT".
# Empty: those of /etc/resolv.conf.
nameservers = []
# Longest one question may take (retries included); questions one lookup may send.
timeout_s = 2.0
max_queries = 8
max_concurrent_queries = 64
# Cache sizes and lifetimes; NXDOMAIN/NODATA are kept at most negative_ttl_cap_s.
cache_entries = 4096
negative_cache_entries = 4096
# ... and bytes (estimated): an answer's size is the zone owner's choice. An answer larger
# than cache_entry_max_bytes is not kept: it is remembered as a failure for failure_ttl_s.
cache_max_bytes = 16777216
negative_cache_max_bytes = 4194304
cache_entry_max_bytes = 16384
positive_ttl_cap_s = 86400.0
negative_ttl_cap_s = 300.0
failure_ttl_s = 30.0
# Zones of the <reversed-ip>.<zone> TXT form, asked in order for abuse contacts.
abuse_zones = []
# Keys you vouch for: "BASE64KEY" or "LABEL=BASE64KEY".
pinned = []
# Continuity: the same key and contacts over this many days, networks and reports.
continuity_min_days = 7.0
continuity_min_networks = 2
continuity_min_reports = 3

[api]
# The node's HTTP API (/v1/..., /metrics, /healthz; docs/api.md); "" disables it.
listen = "127.0.0.1:9591"
# TLS certificate chain and key (PEM); both empty: plain HTTP, fine on loopback.
tls_certificate_file = ""
tls_key_file = ""
# Require client certificates issued by this CA (PEM); empty: none asked.
client_ca_file = ""
# An idle connection is closed after this long; also the deadline for a request's headers.
keep_alive_s = 5.0
# Limits (docs/api.md "Limits"): a route's answer within request_timeout_s or 503; the wait
# for a request's next bytes; the largest request head; requests in flight per client
# address (an IPv6 /64) before 429.
request_timeout_s = 10.0
read_timeout_s = 10.0
max_header_bytes = 16384
max_requests_per_client = 16
# The dashboard (docs/dashboard.md) beyond loopback needs this operator token (bearer or the
# cookie /login sets; at least 16 characters); empty: the dashboard answers on loopback only.
dashboard_token = ""

[send]
# The one switch for telling the ends of the flows you see: a UDP datagram to the flow's
# source and destination (port inband.port), and a webhook to a URL they publish in DNS
# (u=). Off, nothing is ever sent to an address read from a flow record. Webhook endpoints
# you list under [webhook] are your own recipients: they get their reports either way.
to_flow_addresses = false
# With the switch on, only flow ends inside these prefixes are told. Whatever they say,
# multicast, broadcast, unspecified and reserved addresses never are, nor loopback and
# link-local unless a prefix inside 127.0.0.0/8, ::1 or fe80::/10 is listed. Everything
# sent is bounded by [budget] (per /24 or /48, global, once per flow and target a window).
allowed_prefixes = ["0.0.0.0/0", "::/0"]

[inband]
# Reports as UDP datagrams: sent to port `port` of the flow's ends (when [send] allows),
# and other nodes' reports taken in on `listen`. enabled = false: neither.
enabled = true
listen = "[::]:65535"
port = 65535
queue_reports = 1000
store_batch = 200
seen_ids = 65536
max_age_s = 3600.0
max_future_s = 300.0
drain_timeout_s = 5.0

[budget]
# Everything this node sends in band: it must never be an amplifier.
global_per_s = 100.0
burst = 200
per_prefix_per_s = 1.0
per_prefix_burst = 10
dedup_window_s = 600.0
max_prefixes = 65536
max_dedup_entries = 65536

[webhook]
# Reports whose source or destination is in `prefix` are POSTed to `url` (Standard Webhooks,
# signed with the node key), through a durable outbox with retries.
# targets = [{ prefix = "198.51.100.0/24", url = "https://abuse.example.net/overflowd" }]
targets = []
# The long form, one table per endpoint, with an optional shared secret (adds a v1 HMAC
# signature for the Standard Webhooks libraries); secret_file is relative to the node home.
# [[webhook.endpoints]]
# url = "https://abuse.example.net/overflowd"
# prefixes = ["198.51.100.0/24", "2001:db8::/32"]
# secret_file = "webhook.secret"    # or: secret = "whsec_..."
# Internal addresses (loopback, private, link-local) are refused unless listed here.
allow_prefixes = []
require_https = true
connect_timeout_s = 5.0
io_timeout_s = 10.0
total_timeout_s = 30.0
max_attempts = 12
backoff_base_s = 10.0
backoff_cap_s = 21600.0
retry_after_cap_s = 21600.0
lease_s = 60.0
max_concurrency = 8
# ... of them to one host at once: a host that never answers cannot hold them all.
max_concurrency_per_host = 2
batch_size = 64
poll_interval_s = 1.0
keep_delivered_s = 604800.0
# Dead letters (overflowd-query outbox --dead) are kept this long, then deleted.
keep_dead_s = 2592000.0
# Retries (first attempts are the [budget]'s) per second and burst, per URL and per host:
# an endpoint failing everything is not hammered; a row over budget waits, never dropped.
retry_per_url_per_s = 1.0
retry_per_url_burst = 30
retry_per_host_per_s = 2.0
retry_per_host_burst = 60
# Webhooks have budgets of their own (not [budget]'s). What they do not let through waits in
# the outbox and goes in the next POST, which carries up to max_batch_reports reports.
max_batch_reports = 50
max_batch_bytes = 61440
# POSTs per second and burst to one endpoint.
endpoint_posts_per_s = 1.0
endpoint_posts_burst = 5
# Reports per second and burst about one /24 or /48 to one endpoint; over it the first
# attempt is deferred, and shed (counted prefix_backlog) if that would be over max_defer_s.
prefix_reports_per_s = 2.0
prefix_reports_burst = 60
max_defer_s = 600.0
# The same flow to the same endpoint once per window (counted duplicate).
dedup_window_s = 600.0
max_prefixes = 65536
max_dedup_entries = 65536
# Rows kept (pending or dead) per endpoint and in all; beyond, new deliveries are shed
# (outbox_full).
max_pending_per_url = 10000
max_pending = 100000

[storage]
# Budgets and retention of the report store (docs/storage.md). Received reports are other
# nodes' (signed with keys anybody can make); own reports are this node's.
# Received reports stored at most: bytes (COSE plus row overhead) and rows.
received_max_bytes = 300000000
received_max_reports = 500000
# ... per observer key, and per sender network (/24 IPv4, /48 IPv6; sources can be spoofed).
received_max_reports_per_key = 20000
received_max_reports_per_sender = 50000
# Keys first stored less than established_after_s ago share at most this fraction of the
# received budget: a flood of throwaway keys cannot crowd out observers heard from before.
new_keys_max_fraction = 0.25
established_after_s = 86400.0
# ... and leave it once they also have this many reports stored (age alone is free).
established_min_reports = 10
# Received reports are pruned after this many days.
received_max_age_days = 30.0
# Own reports: kept this long and up to this size, oldest pruned first (never one a pending
# webhook delivery refers to).
own_max_bytes = 4000000000
own_max_age_days = 365.0
# Disk headroom: below the larger of these, received reports are refused and pruned oldest
# first, so own reports and the webhook outbox keep being written.
min_free_bytes = 1000000000
min_free_fraction = 0.05
# The most the database may take (0: no limit). On PostgreSQL, the only headroom check:
# pg_database_size() against this.
max_database_bytes = 0
# How often headroom is checked and age/size pruned; rows deleted per transaction.
headroom_interval_s = 10.0
prune_interval_s = 300.0
prune_batch_rows = 1000
# Keys and sender networks the admission policy counts (least recently used forgotten).
max_tracked_keys = 65536
max_tracked_senders = 65536

# Peers (docs/peers.md): nodes this one pulls reports from and pushes its own to. Each
# [[peers]] table names one: its API base URL and its Ed25519 key (its /v1/identity "key").
# [[peers]]
# name = "upstream-1"
# url = "http://192.0.2.10:9591/"
# key = "BASE64-ED25519-PUBLIC-KEY"
# trust = "pinned"            # the trust its reports get: unknown, continuity, dns, pinned
# push = true                 # push our reports to its inbox
# pull = true                 # pull its reports, on start and every pull_interval_s
# pull_interval_s = 60.0
# in_reports_per_s = 100.0    # what it may push to us, and the burst above that
# in_reports_burst = 5000
# in_bytes_per_s = 1000000.0
# in_bytes_burst = 10000000
# out_reports_per_s = 100.0   # what we push to it; the rest waits in the outbox
# out_reports_burst = 5000
# out_bytes_per_s = 1000000.0
# out_bytes_burst = 10000000

# [peering]
# Hops a report travels from its observer at most; inbox requests at most (bytes, reports).
# hop_limit = 4
# inbox_max_body_bytes = 2000000
# inbox_max_reports = 500
# Pulling: reports per page asked, bytes of one page read at most, time for one page (and
# for its connect), pages per round, first pause after a failure (doubling).
# pull_page_reports = 1000
# pull_max_body_bytes = 4000000
# pull_timeout_s = 30.0
# pull_connect_timeout_s = 5.0
# pull_max_pages = 200
# pull_retry_s = 5.0
# Reports made longer ago than this, or dated further ahead than max_future_s, are refused.
# max_report_age_s = 604800.0
# max_future_s = 300.0
# This node's API base URL as peers reach it, in its signed node record (/v1/identity).
# Empty: http://<api.listen>/ when that is one address and port.
# api_url = ""
# Learn peers from the signed node records configured peers serve at /v1/peers (off: a
# learned peer is a stranger; pulled only, at the lowest trust), also those at internal
# addresses (loopback, private), and at most this many.
# learn = false
# learn_allow_private = false
# max_learned_peers = 16
# learned_pull_interval_s = 60.0  # how often a learned peer is pulled
"""


def parse_listen(text: str) -> tuple[str, int]:
    """'ADDR:PORT', '[v6]:PORT' or ':PORT' into (host, port); ValueError when it is not."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not ADDR:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def resolve_home(home: str | os.PathLike[str] | None) -> Path:
    """--home, else $OVERFLOWD_HOME, else ~/.overflowd."""
    if home:
        return Path(home).expanduser()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".overflowd"


def load_settings(home: Path) -> Settings:
    """Read ``overflowd.toml`` from the node home; a missing file means the defaults."""
    path = home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Settings()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    settings = parse_settings(text, str(path))
    webhook = read_secret_files(settings.webhook, home, str(path))
    return (
        dataclasses.replace(settings, webhook=webhook)
        if webhook is not settings.webhook
        else settings
    )


def read_secret_files(webhook: WebhookSettings, home: Path, source: str) -> WebhookSettings:
    """Each ``[[webhook.endpoints]]`` ``secret_file`` (relative to the node home) read into its
    ``secret``; ConfigError naming the file and the endpoint when it cannot be read or is not
    a ``whsec_`` secret."""
    if not any(e.secret_file for e in webhook.endpoints):
        return webhook
    endpoints = []
    for e in webhook.endpoints:
        if e.secret_file:
            path = home / Path(e.secret_file).expanduser()
            where = f"{source}: webhook endpoint {e.url!r} secret_file {str(path)!r}"
            try:
                with open(path, "rb") as fh:
                    raw = fh.read(MAX_SECRET_FILE_BYTES + 1)
                text = raw.decode("utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ConfigError(f"{where}: cannot read: {why}") from None
            if len(raw) > MAX_SECRET_FILE_BYTES:
                raise ConfigError(f"{where}: larger than {MAX_SECRET_FILE_BYTES} bytes")
            try:
                parse_secret(text, "the secret")
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            e = dataclasses.replace(e, secret=text)
        endpoints.append(e)
    return dataclasses.replace(webhook, endpoints=tuple(endpoints))


def parse_settings(text: str, source: str = "<string>") -> Settings:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends with "(at line L, column C)".
        raise ConfigError(f"{source}: {exc}") from None
    except RecursionError:  # tomllib recurses per "[" or "{": "a = [[[[..." past the stack
        raise ConfigError(f"{source}: {TOO_DEEP}") from None
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name == "peers":  # an array of tables: overflowd.peers parses it
            sections["peers"] = parse_peers(table, source, text)
            continue
        if name in OTHER_PROGRAMS_SECTIONS:  # read and checked by that program (section_table)
            if not isinstance(table, dict):
                raise ConfigError(_where(source, text, None, name) + f"'{name}' must be a table")
            continue
        if name not in _SECTIONS:
            raise ConfigError(_where(source, text, None, name) + f"unknown section or key '{name}'")
        if not isinstance(table, dict):
            raise ConfigError(_where(source, text, None, name) + f"'{name}' must be a table")
        sections[name] = _build(_SECTIONS[name], table, source, text, name)
    deprecations: list[str] = []
    inband_table = data.get("inband", {})
    if "allowed_prefixes" in inband_table:
        if "send" in data:
            raise ConfigError(
                _where(source, text, "inband", "allowed_prefixes")
                + "'inband.allowed_prefixes' is the old name of [send]: give only [send] "
                "(to_flow_addresses = true, allowed_prefixes = [...])"
            )
        # The old form: a non-empty list switched sending on, confined to it.
        legacy = sections["inband"].allowed_prefixes
        sections["send"] = SendSettings(
            to_flow_addresses=bool(legacy), allowed_prefixes=legacy or SEND_EVERYWHERE
        )
        deprecations.append(
            f"{source}: 'inband.allowed_prefixes' is deprecated: write [send] "
            f"to_flow_addresses = {'true' if legacy else 'false'}"
            + (f", allowed_prefixes = {list(legacy)}" if legacy else "")
        )
    else:
        send = sections.get("send", SendSettings())
        inband = sections.get("inband", InbandSettings())
        # The node's confinement lives in InbandSettings; [send] decides what it holds.
        sections["inband"] = dataclasses.replace(
            inband, allowed_prefixes=send.allowed_prefixes if send.to_flow_addresses else ()
        )
    return Settings(**sections, source=source, deprecations=tuple(deprecations))


#: Sections of ``overflowd.toml`` that belong to the other programs sharing the node home (jfe,
#: ratelockd; [sandbox], read by all three through overflowd.sandbox): the node skips them,
#: and each program parses its own with :func:`load_section`, as strictly as the node parses
#: its sections.
OTHER_PROGRAMS_SECTIONS = ("jfe", "ratelock", "sandbox")


def load_section(
    home: Path, section: str, cls: type[_T], *, subtables: tuple[str, ...] = ()
) -> _T:
    """One other program's section of the node home's ``overflowd.toml`` as a frozen dataclass.

    A missing file or section means the dataclass defaults. Unknown keys and wrong types are a
    ConfigError naming the file, line and key, exactly as for the node's own sections; the rest
    of the file must parse as the node's too, so one program never accepts what another refuses.
    """
    path = home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return cls()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_section(text, section, cls, str(path), subtables=subtables)


def parse_section(
    text: str,
    section: str,
    cls: type[_T],
    source: str = "<string>",
    *,
    subtables: tuple[str, ...] = (),
) -> _T:
    """:func:`load_section` on text already read (tests, ``jfe rules show --config``).

    ``section`` may be dotted (``jfe.certificates``); ``subtables`` are the names of the
    section's sub-tables that another dataclass parses, left out of this one.
    """
    parse_settings(text, source)
    table: Any = tomllib.loads(text)
    for part in section.split("."):
        table = table.get(part, {})
        if not isinstance(table, dict):
            raise ConfigError(_where(source, text, None, part) + f"'{section}' must be a table")
    own = {k: v for k, v in table.items() if not (k in subtables and isinstance(v, dict))}
    result: _T = _build(cls, own, source, text, section)
    return result


class KeyProblem(ConfigError):
    """A ConfigError about one key of a section: ``config check`` leaves the key out and goes
    on, to report every problem of a file and not only the first."""

    def __init__(self, message: str, section: str, key: str) -> None:
        super().__init__(message)
        self.section = section
        self.key = key


def _build(cls: type, table: dict[str, Any], source: str, text: str, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = _where(source, text, section, key)
        if key not in known:
            raise KeyProblem(where + f"unknown key '{section}.{key}'", section, key)
        try:
            if section == "webhook" and key == "targets":
                value = _webhook_targets(value, where)
            if section == "webhook" and key == "endpoints":  # tables: notify parses them
                values[key] = parse_endpoints(value, where)
                continue
            values[key] = _coerce(value, hints[key], where + f"'{section}.{key}'")
        except KeyProblem:
            raise
        except ConfigError as exc:
            raise KeyProblem(str(exc), section, key) from None
    try:
        settings = cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_where(source, text, section, None) + str(exc)) from None
    _validate(settings, source, text, section)
    return settings


def _webhook_targets(value: Any, where: str) -> list[list[str]]:
    """``[{prefix = "...", url = "..."}, ...]`` into pairs for the generic coercion."""
    if not isinstance(value, list):
        raise ConfigError(where + "'webhook.targets' must be an array of tables")
    pairs = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"prefix", "url"}:
            raise ConfigError(
                where
                + 'each \'webhook.targets\' entry needs exactly prefix = "..." and url = "..."'
            )
        pairs.append([item["prefix"], item["url"]])
    return pairs


def _coerce(value: Any, hint: Any, what: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{what} must be a number")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{what} must be an integer")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{what} must be true or false")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{what} must be a string")
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list):
            raise ConfigError(f"{what} must be a list")
        return tuple(_coerce(v, item, what + " items") for v in value)
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arm in typing.get_args(hint):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(value, arm, what)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1])
    raise TypeError(f"unsupported setting type {hint!r}")  # a bug in this module, not input


def _validate(settings: Any, source: str, text: str, section: str) -> None:
    def fail(key: str, why: str) -> None:
        where = _where(source, text, section, key)
        raise KeyProblem(where + f"'{section}.{key}' {why}", section, key)

    # A section's own cross-key checks (PeeringSettings, and jfe's and ratelock's sections):
    # ``problems()`` yields (key, why) pairs.
    if callable(getattr(settings, "problems", None)):
        for key, why in settings.problems():
            fail(key, why)
    if isinstance(settings, ApiSettings):
        if settings.listen and not re.match(
            r"^(\[[0-9a-fA-F:.]+\]|[0-9.]*|[0-9a-fA-F:]*):\d{1,5}$", settings.listen
        ):
            fail("listen", f"has {settings.listen!r}, which is not ADDR:PORT (ADDR an IP)")
        if bool(settings.tls_certificate_file) != bool(settings.tls_key_file):
            fail("tls_certificate_file", "and api.tls_key_file go together: give both or neither")
        if settings.client_ca_file and not settings.tls_certificate_file:
            fail("client_ca_file", "needs TLS: set api.tls_certificate_file and api.tls_key_file")
        for key in ("keep_alive_s", "request_timeout_s", "read_timeout_s"):
            value = getattr(settings, key)
            if not (value > 0 and math.isfinite(value)):
                fail(key, "must be a positive number of seconds")
        if not 1024 <= settings.max_header_bytes <= 1024 * 1024:
            fail("max_header_bytes", "must be within 1024..1048576 (a request head's bytes)")
        if settings.max_requests_per_client < 1:
            fail("max_requests_per_client", "must be at least 1")
        if settings.dashboard_token and not (
            16 <= len(settings.dashboard_token) <= 512 and settings.dashboard_token.isprintable()
        ):
            fail("dashboard_token", "must be 16 to 512 printable characters (or empty)")
    if isinstance(settings, SendSettings | InbandSettings):
        # strict, as notify.Confinement parses them at start: "192.0.2.1/24" (host bits set)
        # must fail here, naming the key, not later in the daemon naming neither key nor file.
        for item in settings.allowed_prefixes:
            try:
                ipaddress.ip_network(item.strip(), strict=True)
            except ValueError as exc:
                fail("allowed_prefixes", f"has {item!r}, which is not a prefix: {exc}")
    if isinstance(settings, SamplingSettings):
        if not 0 < settings.rate <= 1:
            fail("rate", "must be in (0, 1]")
        if settings.max_reports_per_s <= 0 or settings.max_reports_burst < 1:
            fail("max_reports_per_s", "and max_reports_burst must be positive")
        if settings.boost_cap < 1:
            fail("boost_cap", "must be at least 1")
    if isinstance(settings, CaptureSettings):
        if not 1 <= settings.one_in <= 2**32:
            fail("one_in", "must be between 1 and 4294967296")
        if not 64 <= settings.snaplen_bytes <= 65535:
            fail("snaplen_bytes", "must be between 64 and 65535")
    if isinstance(settings, CollectorSettings):
        for item in settings.listen:
            if not re.match(r"^(\[[0-9a-fA-F:.]+\]|[0-9.]*|[0-9a-fA-F:]*):\d{1,5}$", item):
                fail("listen", f"has {item!r}, which is not ADDR:PORT")
        if settings.rcvbuf_bytes < 4096:
            fail("rcvbuf_bytes", "must be at least 4096")
        if settings.queue_datagrams < 1:
            fail("queue_datagrams", "must be at least 1")
        for item in settings.allowed_exporters:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                fail("allowed_exporters", f"has {item!r}, which is not an address or prefix")
        for item in settings.sampling_overrides:
            if not re.match(r"^[^=\s]+=[1-9][0-9]*$", item):
                fail("sampling_overrides", f"has {item!r}, which is not ADDR=N (N >= 1)")
    if isinstance(settings, StorageSettings):
        for name in (
            "received_max_bytes",
            "received_max_reports",
            "received_max_reports_per_key",
            "received_max_reports_per_sender",
            "own_max_bytes",
            "prune_batch_rows",
            "max_tracked_keys",
            "max_tracked_senders",
        ):
            if getattr(settings, name) < 1:
                fail(name, "must be at least 1")
        for name in ("min_free_bytes", "max_database_bytes"):
            if getattr(settings, name) < 0:
                fail(name, "must not be negative")
        for name in ("new_keys_max_fraction", "min_free_fraction"):
            if not 0 <= getattr(settings, name) <= 1:
                fail(name, "must be between 0 and 1")
        for name in (
            "received_max_age_days",
            "own_max_age_days",
            "headroom_interval_s",
            "prune_interval_s",
        ):
            if getattr(settings, name) <= 0:
                fail(name, "must be positive")
        if settings.established_after_s < 0:
            fail("established_after_s", "must not be negative")
        if settings.established_min_reports < 0:
            fail("established_min_reports", "must not be negative")
    listen_re = r"^(\[[0-9a-fA-F:.]+\]|[0-9.]*|[A-Za-z0-9.-]*):\d{1,5}$"
    if isinstance(settings, MetricsSettings):
        if not re.match(listen_re, settings.listen or ":0"):
            fail("listen", f"has {settings.listen!r}, which is not ADDR:PORT")
        if not 0 <= settings.max_exporter_labels <= MAX_EXPORTER_LABELS:
            fail("max_exporter_labels", f"must be between 0 and {MAX_EXPORTER_LABELS}")
        for name in ("gauges_interval_s", "gauges_timeout_s"):
            value = getattr(settings, name)
            if not (math.isfinite(value) and 0 < value <= MAX_GAUGES_S):
                fail(name, f"must be a number of seconds in (0, {MAX_GAUGES_S:g}]")
    if isinstance(settings, NodeSettings):
        if len(settings.observation_point.encode()) > 64:
            fail("observation_point", "must be at most 64 bytes")
        # What every report carries must fit the report (docs/protocol.md §2).
        if len(settings.contacts) > 4:
            fail("contacts", "has more than 4 entries (a report carries at most 4)")
        if sum(len(c.encode()) for c in settings.contacts) > 512:
            fail("contacts", "are longer than 512 bytes together (a report's limit)")
        for contact in settings.contacts:
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:\S+$", contact):
                fail("contacts", f"has '{contact}', which is not a URI (mailto:, https:, tel:)")


# -- config check: every problem of a file, not only the first ----------------------------------

#: ``config check`` stops after this many problems: each costs a rebuild of its section and a
#: scan of the file for its line, so a file of 200,000 bad keys would otherwise run for minutes.
MAX_CHECK_PROBLEMS = 100
TOO_DEEP = "nested too deeply to be a config (arrays or inline tables)"


class _TooManyProblems(Exception):
    pass


class _Problems(list[str]):
    """The problems found; raises _TooManyProblems at MAX_CHECK_PROBLEMS."""

    def append(self, problem: str) -> None:
        super().append(problem)
        if len(self) >= MAX_CHECK_PROBLEMS:
            raise _TooManyProblems

    def append_last(self, problem: str) -> None:
        super().append(problem)


#: Sections another program parses (``overflowd config check`` passes jfe's and ratelock's):
#: dotted name -> (dataclass, names of sub-tables another entry parses).
OtherSections = dict[str, tuple[type, tuple[str, ...]]]


def check_text(text: str, source: str, others: OtherSections | None = None) -> list[str]:
    """Every problem ``parse_settings`` (and the other programs' ``parse_section``) would
    raise one at a time, each a 'FILE:LINE: ...' line. A key found bad is left out and its
    section built again, so later keys are checked too; a problem of a whole section (no key
    to leave out) ends that section's checks. Empty: the file would load."""
    problems = _Problems()
    try:
        _check_into(problems, text, source, others)
    except _TooManyProblems:
        problems.append_last(f"{source}: more than {MAX_CHECK_PROBLEMS} problems: stopped")
    return list(problems)


def _check_into(
    problems: _Problems, text: str, source: str, others: OtherSections | None
) -> None:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{source}: {exc}")
        return
    except RecursionError:
        problems.append(f"{source}: {TOO_DEEP}")
        return
    others = others or {}

    def build(cls: type, table: dict[str, Any], section: str) -> None:
        table = dict(table)
        for _ in range(len(table) + 1):  # each round leaves one key out: bounded
            try:
                _build(cls, table, source, text, section)
                return
            except KeyProblem as exc:
                problems.append(str(exc))
                if exc.key not in table:
                    return
                del table[exc.key]
            except ConfigError as exc:
                problems.append(str(exc))
                return

    for name, table in data.items():
        if name == "peers":
            try:
                parse_peers(table, source, text)
            except ConfigError as exc:
                problems.append(str(exc))
            continue
        if name not in _SECTIONS and name not in OTHER_PROGRAMS_SECTIONS:
            problems.append(_where(source, text, None, name) + f"unknown section or key '{name}'")
            continue
        if not isinstance(table, dict):
            problems.append(_where(source, text, None, name) + f"'{name}' must be a table")
            continue
        if name in _SECTIONS:
            build(_SECTIONS[name], table, name)
    for section, (cls, subtables) in others.items():
        table = data
        for part in section.split("."):
            table = table.get(part, {}) if isinstance(table, dict) else {}
        if not isinstance(table, dict):
            continue  # named above: "'jfe' must be a table"
        own = {k: v for k, v in table.items() if not (k in subtables and isinstance(v, dict))}
        build(cls, own, section)
    if not problems:  # what only the whole file shows (inband.allowed_prefixes beside [send])
        try:
            parse_settings(text, source)
        except ConfigError as exc:
            problems.append(str(exc))
    return


def key_origin(home: Path, section: str, key: str) -> str:
    """Where a setting came from, for a one-line error: 'FILE:LINE section.key', or
    'FILE section.key (default)' when the file does not set it."""
    path = home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    line = _find_line(text, section, key)
    return f"{path}:{line} {section}.{key}" if line else f"{path} {section}.{key} (default)"


def _where(source: str, text: str, section: str | None, key: str | None) -> str:
    """'file:line: ' for a key in a table, found by reading the file as a person would."""
    line = _find_line(text, section, key)
    return f"{source}:{line}: " if line else f"{source}: "


def _find_line(text: str, section: str | None, key: str | None) -> int | None:
    current: str | None = None
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
    for number, raw in enumerate(text.splitlines(), start=1):
        m = header.match(raw)
        if m:
            current = m.group(1)
            if section is None and key is not None and current == key:
                return number
            if key is None and current == section:
                return number
            continue
        key_line = key is not None and re.match(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=", raw)
        if key_line and current == section:
            return number
    return None
