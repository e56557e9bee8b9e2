#!/usr/bin/env bash
# The services benchmark (issue 10's numbers): the cluster DNS's answers/s and latency beside
# dnsmasq's (Debian's dnsmasq-base, installed if missing), connection setup and throughput
# through the service proxy (iptables and userspace) beside direct connections, and the
# time from an EndpointSlice change to the proxy and the DNS following it. Needs root
# (port 53, iptables). Builds flotilla and apibench in release and leaves the JSON figures
# in benches/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh
command -v dnsmasq > /dev/null || apt-get install -y -q dnsmasq-base > /dev/null
cargo build --release --locked --bin flotilla --bin flotilla-shim
(cd benches/apibench && cargo build --release)
mkdir -p benches/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
"$CARGO_TARGET_DIR/release/apibench" --flotilla "$CARGO_TARGET_DIR/release/flotilla" \
  --scenario services --concurrency 16 --out "benches/results/services-$stamp.json"
echo "figures: benches/results/services-$stamp.json"
