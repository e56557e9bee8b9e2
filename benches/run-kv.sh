#!/usr/bin/env bash
# Put throughput/latency and leader failover: Flotilla against a three-member etcd 3.4, in one
# run on this machine. Installs etcd-server and protoc if missing, builds both binaries in
# release, runs kvbench, and leaves the JSON figures in benches/results/.
# Extra arguments go to kvbench (e.g. --clients 1,256 --seconds 5 --failover-trials 0).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh
missing=()
for p in etcd-server protobuf-compiler; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release --locked --bin flotilla
(cd benches/kvbench && cargo build --release --locked)
mkdir -p benches/results
out="benches/results/kv-$(date -u +%Y%m%dT%H%M%SZ).json"
"$CARGO_TARGET_DIR/release/kvbench" --flotilla "$CARGO_TARGET_DIR/release/flotilla" --out "$out" "$@"
echo "figures: $out"
