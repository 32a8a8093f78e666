#!/usr/bin/env bash
# The main job on embedded defaults, start to finish, touching no network:
# a node is created, a report is signed, verified, stored and queried back.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
HOME_DIR=${DEMO_HOME:-$(mktemp -d /tmp/overflowd-demo.XXXXXX)}
export OVERFLOWD_HOME="$HOME_DIR/node"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "create a node (identity readable by its owner only)"
$BIN/overflowd init
ls -l "$OVERFLOWD_HOME/identity.key"

step "the DNS record that publishes this node's key and abuse contact"
$BIN/overflowd key dns-record --contact mailto:abuse@example.net --url https://example.net/overflowd

step "sign a report about a flow (TEST-NET addresses) and store it"
$BIN/overflowd report --src 192.0.2.10 --dst 198.51.100.20 --proto udp --sport 123 \
    --dport 44321 --packets 120000 --bytes 56160000 --out "$HOME_DIR/report.cose"
$BIN/overflowd report --src 2001:db8::10 --dst 2001:db8:ffff::20 --proto tcp --sport 40000 \
    --dport 443 --packets 3 --bytes 180 >/dev/null

step "verify the report as anyone could (raw COSE bytes, $(stat -c %s "$HOME_DIR/report.cose") bytes)"
$BIN/overflowd-query verify "$HOME_DIR/report.cose"

step "a tampered copy is rejected"
python3 - "$HOME_DIR/report.cose" "$HOME_DIR/tampered.cose" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[-1] ^= 1  # one bit of the signature
open(sys.argv[2], "wb").write(data)
PY
if $BIN/overflowd-query verify "$HOME_DIR/tampered.cose"; then
    echo "tampered report verified: this is a bug" >&2; exit 1
fi

step "query the store: everything, then one destination prefix as JSON lines"
$BIN/overflowd-query reports
$BIN/overflowd-query reports --dst 198.51.100.0/24 --since 1h --json | cut -c1-160

if [ -f "${OVERFLOWD_SHARED:-../shared}/data/netflow_v5_simpleweb.pcap" ] && $BIN/overflowd replay --help >/dev/null 2>&1; then
    step "replay the shared NetFlow v5 trace: decode, sample, sign, store (sends nothing)"
    $BIN/overflowd replay "${OVERFLOWD_SHARED:-../shared}/data/netflow_v5_simpleweb.pcap" --rate 1e-4
    $BIN/overflowd-query reports --limit 5
fi

step "done; the node home is $OVERFLOWD_HOME"
