#!/usr/bin/env bash
# `make demo`: the whole idea on loopback in well under a minute, touching no other machine.
# A router's node and a victim's node on the embedded defaults; the shared NetFlow v5 trace
# replayed into the router with its busiest destination mapped onto the victim (127.0.0.2);
# reports arrive in band and by webhook; the victim's store and overflowd-query say who
# reported what, and whom to call. What it does and why: docs/demo.md. Arguments are passed
# on (overflowd demo --help).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${OVERFLOWD_SHARED:-../shared}
exec .venv/bin/overflowd demo --trace "$SHARED/data/netflow_v5_simpleweb.pcap" "$@"
